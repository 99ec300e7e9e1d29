"""Small numerics shared by the models and the losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cosine_similarity(a: jax.Array, b: jax.Array, axis: int = -1, eps: float = 1e-6) -> jax.Array:
  """a.b / (max(|a|, eps) * max(|b|, eps)) along `axis`: PyTorch's CosineSimilarity(eps=1e-6)."""
  dot = jnp.sum(a * b, axis=axis)
  norm_a = jnp.maximum(jnp.sqrt(jnp.sum(a * a, axis=axis)), eps)
  norm_b = jnp.maximum(jnp.sqrt(jnp.sum(b * b, axis=axis)), eps)
  return dot / (norm_a * norm_b)
