"""Small numerics shared by the models and the losses."""

from __future__ import annotations

from collections.abc import Sequence
import functools

import jax
import jax.numpy as jnp
import numpy as np


def cosine_similarity(a: jax.Array, b: jax.Array, axis: int = -1, eps: float = 1e-6) -> jax.Array:
  """a.b / (max(|a|, eps) * max(|b|, eps)) along `axis`: PyTorch's CosineSimilarity(eps=1e-6)."""
  dot = jnp.sum(a * b, axis=axis)
  # max(sqrt(s), eps) == sqrt(max(s, eps^2)); the second form has a finite gradient at s = 0
  # (all-zero post-ReLU features), where d sqrt(s)/ds is infinite.
  norm_a = jnp.sqrt(jnp.maximum(jnp.sum(a * a, axis=axis), eps * eps))
  norm_b = jnp.sqrt(jnp.maximum(jnp.sum(b * b, axis=axis), eps * eps))
  return dot / (norm_a * norm_b)


def _align_corners_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(lower, upper, frac) per output index of align_corners=True resizing along one axis.

  Output index i samples the input at src = i * (in_size - 1) / (out_size - 1)
  (src = 0 when out_size == 1, as PyTorch does), mixing the two neighbouring
  input pixels floor(src) and floor(src) + 1 (clamped) with weights 1 - frac and
  frac. Computed in float64 on the host: sizes are static, so these are constants.
  """
  scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
  src = np.arange(out_size, dtype=np.float64) * scale
  lower = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  upper = np.minimum(lower + 1, in_size - 1)
  return lower, upper, src - lower


def align_corners_matrix(in_size: int, out_size: int) -> np.ndarray:
  """The [out_size, in_size] matrix of align_corners=True linear interpolation along one axis."""
  lower, upper, frac = _align_corners_taps(in_size, out_size)
  matrix = np.zeros((out_size, in_size), dtype=np.float64)
  rows = np.arange(out_size)
  np.add.at(matrix, (rows, lower), 1.0 - frac)
  np.add.at(matrix, (rows, upper), frac)
  return matrix


def _lerp_axis(x: jax.Array, axis: int, out_size: int) -> jax.Array:
  """Forward along one axis: two static-index gathers and a lerp (memory-bound, cheap)."""
  lower, upper, frac = _align_corners_taps(x.shape[axis], out_size)
  shape = [1] * x.ndim
  shape[axis] = out_size
  frac = jnp.asarray(frac.reshape(shape), x.dtype)
  return jnp.take(x, lower, axis=axis) * (1 - frac) + jnp.take(x, upper, axis=axis) * frac


def _transpose_axis(g: jax.Array, axis: int, in_size: int) -> jax.Array:
  """Gradient along one axis: the transposed interpolation matrix as a dense contraction.

  Dense rather than the gather's natural transpose (a scatter-add): no atomics,
  so the gradient is deterministic on GPUs, and it maps onto matmul units.
  """
  matrix = jnp.asarray(align_corners_matrix(in_size, g.shape[axis]), g.dtype)
  letters = 'abcdefghijklmn'[:g.ndim]
  in_letters = letters[:axis] + 'z' + letters[axis + 1:]
  # HIGHEST: GPUs would otherwise use TF32 and lose ~1e-3 relative.
  return jnp.einsum(f'{letters},{letters[axis]}z->{in_letters}', g, matrix,
                    precision=jax.lax.Precision.HIGHEST)


def _axis_plan(shape: tuple[int, ...], size: tuple[int, int]) -> list[tuple[int, int, int]]:
  """(axis, in_size, out_size) for the spatial axes that need interpolation (not identity/broadcast)."""
  plan = []
  for axis, out_size in ((len(shape) - 3, size[0]), (len(shape) - 2, size[1])):
    if shape[axis] not in (1, out_size):
      plan.append((axis, shape[axis], out_size))
  return plan


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  for axis, _, out_size in _axis_plan(x.shape, size):
    x = _lerp_axis(x, axis, out_size)
  return x


def _resize_fwd(x: jax.Array, size: tuple[int, int]) -> tuple[jax.Array, tuple[int, ...]]:
  # The only residual is the input's spatial shape, kept as a zero-size array (residuals are arrays).
  return _resize(x, size), jnp.zeros(x.shape[:-1] + (0,), x.dtype)


def _resize_bwd(size: tuple[int, int], shape_carrier: jax.Array, g: jax.Array) -> tuple[jax.Array]:
  in_shape = shape_carrier.shape[:-1] + (g.shape[-1],)
  for axis, in_size, _ in reversed(_axis_plan(in_shape, size)):
    g = _transpose_axis(g, axis, in_size)
  return (g,)


_resize.defvjp(_resize_fwd, _resize_bwd)


def resize_bilinear_align_corners(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """Bilinear resize of [..., H, W, C] to [..., h, w, C] with align_corners=True.

  The semantics of PyTorch's F.interpolate(mode='bilinear', align_corners=True),
  which every resize of the reference network uses (jax.image.resize uses
  half-pixel centres instead, which shifts the maps). Separable: per spatial
  axis, the forward is a two-tap gather + lerp and the gradient the dense
  transposed interpolation matrix (deterministic, no scatter). Identity axes
  are skipped and size-1 inputs broadcast. Arithmetic runs in at least
  float32; the result has x's dtype. Reverse-mode differentiable (custom VJP;
  forward-mode jvp is not supported).
  """
  if x.ndim < 3:
    raise ValueError(f'resize_bilinear_align_corners: expected [..., H, W, C], got shape {x.shape}')
  out_h, out_w = (int(s) for s in size)
  if out_h < 1 or out_w < 1:
    raise ValueError(f'resize_bilinear_align_corners: output size must be positive, got {tuple(size)}')
  compute_dtype = jnp.promote_types(x.dtype, jnp.float32)
  out = _resize(x.astype(compute_dtype), (out_h, out_w))
  # Size-1 axes broadcast: exact, and their gradient (a sum) comes from broadcast_to's own VJP.
  shape = list(out.shape)
  shape[-3] = out_h
  shape[-2] = out_w
  return jnp.broadcast_to(out, shape).astype(x.dtype)
