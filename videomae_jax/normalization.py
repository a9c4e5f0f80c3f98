"""ImageNet normalisation of video clips, done on the device."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def normalize(video: jax.Array, dtype=jnp.float32) -> jax.Array:
  """uint8 (..., 3) in [0, 255] -> ImageNet-normalised float, as the reference's transform."""
  x = video.astype(jnp.float32) / 255.0
  return ((x - IMAGENET_MEAN) / IMAGENET_STD).astype(dtype)


def unnormalize(video: jax.Array) -> jax.Array:
  """Inverse of :func:`normalize`, to float32 in [0, 1]."""
  return video.astype(jnp.float32) * IMAGENET_STD + IMAGENET_MEAN
