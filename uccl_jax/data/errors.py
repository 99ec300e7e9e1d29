"""The data side's one exception type, in a module of its own.

Why a module: both the readers (`sources.py`) and the generators of the demo
datasets (`synthetic.py`, `synthetic_source.py`) raise it, and the readers call
the generators; with the class in `sources.py` the two imported each other.
"""


class DataError(Exception):
  """A problem with the dataset or its split files; the message is one line naming the file."""
