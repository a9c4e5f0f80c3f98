"""videomae-jax: VideoMAE masked video pre-training in JAX/Flax."""
__version__ = "0.1.0"
