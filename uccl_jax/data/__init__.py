"""The input side: record sources, views and CutMix, the grain pipeline, the demo dataset, the checker.

Kept free of imports so that `import uccl_jax.data.sources` (or any module here)
pays only for what it uses; see docs/ARCHITECTURE.md for the contracts.
"""
