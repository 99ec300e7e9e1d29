"""The one exception of uccl_jax.convert.

Why one type: every expected failure of a conversion (a file that is not a
checkpoint, weights that do not fit the model, an --out that cannot be
written) is reported to a person as one line, and callers (training,
evaluation, prediction, the command line) catch this type alone; anything else
that escapes is a bug and keeps its traceback.
"""


class ConversionError(ValueError):
  """Weights that cannot be read, do not fit the model, or cannot be written (one line)."""
