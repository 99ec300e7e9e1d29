"""uccl_jax: UCCL semi-supervised semantic segmentation in JAX/Flax.

UCCL = the UniMatch recipe (weak-to-strong pseudo-labels, CutMix, two strong
views, feature perturbation) plus SBU (uncertain pixels still train, weighted by
cross-view feature dissimilarity) and CKR (class-level features of the weak and
strong views pulled together), on DeepLabv3+ with a deep-stem ResNet.

Importing the package needs neither TensorFlow nor PyTorch.
"""

__version__ = "0.1.0"
