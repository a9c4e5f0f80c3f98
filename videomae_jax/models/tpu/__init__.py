"""Pallas TPU kernels (Mosaic), used by :mod:`videomae_jax.models.attention` on TPU only."""
