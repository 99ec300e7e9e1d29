"""Benchmarks, one module each; run them with `python -m uccl_jax.benchmark <name>`."""
