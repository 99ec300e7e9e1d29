"""ops: the align-corners resize against a loop reference and torch; cosine against torch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from uccl_jax import ops


def resize_reference(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """Bilinear align_corners=True, per output pixel, from the definition (float64 loops)."""
  batch, in_h, in_w, channels = x.shape
  out = np.zeros((batch, out_h, out_w, channels))

  def source(i, in_size, out_size):
    position = i * (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    low = min(int(np.floor(position)), in_size - 1)
    high = min(low + 1, in_size - 1)
    return low, high, position - low

  for i in range(out_h):
    y0, y1, fy = source(i, in_h, out_h)
    for j in range(out_w):
      x0, x1, fx = source(j, in_w, out_w)
      out[:, i, j] = ((1 - fy) * (1 - fx) * x[:, y0, x0] + (1 - fy) * fx * x[:, y0, x1]
                      + fy * (1 - fx) * x[:, y1, x0] + fy * fx * x[:, y1, x1])
  return out


SIZES = [
    ((5, 7), (9, 13)),  # upsampling, odd sizes
    ((9, 13), (4, 6)),  # downsampling
    ((6, 6), (6, 11)),  # identity along one axis
    ((1, 1), (5, 3)),  # 1x1 input (the ASPP pooling branch)
    ((4, 5), (1, 1)),  # 1x1 output: PyTorch samples the top-left pixel
    ((1, 4), (3, 1)),  # mixed size-1 edges
    ((3, 2), (8, 2)),
]


@pytest.mark.parametrize('in_size,out_size', SIZES)
def test_resize_matches_loop_reference_in_float64(in_size, out_size):
  x = np.random.default_rng(0).normal(size=(2, *in_size, 3))
  with jax.enable_x64(True):
    got = np.asarray(ops.resize_bilinear_align_corners(jnp.asarray(x), out_size))
  assert got.dtype == np.float64
  np.testing.assert_allclose(got, resize_reference(x, *out_size), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('in_size,out_size', SIZES)
def test_resize_matches_torch_interpolate(in_size, out_size):
  x = np.random.default_rng(1).normal(size=(2, *in_size, 3)).astype(np.float32)
  expected = F.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)), size=out_size, mode='bilinear',
                           align_corners=True).numpy().transpose(0, 2, 3, 1)
  got = np.asarray(ops.resize_bilinear_align_corners(jnp.asarray(x), out_size))
  assert got.shape == expected.shape
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('in_size,out_size', SIZES)
def test_resize_gradient_matches_torch(in_size, out_size):
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, *in_size, 4)).astype(np.float32)
  cotangent = rng.normal(size=(2, *out_size, 4)).astype(np.float32)
  loss = lambda v: jnp.sum(ops.resize_bilinear_align_corners(v, out_size) * cotangent)
  grad = jax.jit(jax.grad(loss))(x)
  x_torch = torch.from_numpy(x.transpose(0, 3, 1, 2)).requires_grad_(True)
  out = F.interpolate(x_torch, size=out_size, mode='bilinear', align_corners=True)
  (out * torch.from_numpy(cotangent.transpose(0, 3, 1, 2))).sum().backward()
  np.testing.assert_allclose(np.asarray(grad), x_torch.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-5,
                             atol=1e-5)


def test_resize_keeps_bfloat16_and_corners():
  x = jnp.asarray(np.random.default_rng(3).normal(size=(1, 4, 4, 2)), jnp.bfloat16)
  out = ops.resize_bilinear_align_corners(x, (7, 10))
  assert out.dtype == jnp.bfloat16
  # align_corners: the four corner pixels are copied exactly.
  np.testing.assert_array_equal(np.asarray(out[:, ::6, ::9], np.float32),
                                np.asarray(x[:, ::3, ::3], np.float32))


def test_resize_works_under_jit_and_rejects_bad_sizes():
  x = jnp.ones((1, 3, 3, 1))
  np.testing.assert_allclose(jax.jit(ops.resize_bilinear_align_corners, static_argnums=1)(x, (5, 5)),
                             np.ones((1, 5, 5, 1)))
  with pytest.raises(ValueError, match='positive'):
    ops.resize_bilinear_align_corners(x, (0, 4))
  with pytest.raises(ValueError, match=r'\[\.\.\., H, W, C\]'):
    ops.resize_bilinear_align_corners(jnp.ones((3, 3)), (5, 5))


def test_cosine_similarity_matches_torch():
  rng = np.random.default_rng(4)
  a = rng.normal(size=(3, 5, 8)).astype(np.float32)
  b = rng.normal(size=(3, 5, 8)).astype(np.float32)
  a[0, 0] = 0.0  # a zero vector: the eps clamp decides the value (0)
  b[1, 2] = 1e-8
  expected = torch.nn.CosineSimilarity(dim=-1, eps=1e-6)(torch.from_numpy(a), torch.from_numpy(b)).numpy()
  np.testing.assert_allclose(np.asarray(ops.cosine_similarity(a, b)), expected, rtol=1e-5, atol=1e-6)
