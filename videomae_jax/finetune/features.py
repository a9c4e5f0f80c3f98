"""Pooled clip features of a classifier's encoder (for linear probes, retrieval, k-NN)."""
from __future__ import annotations

import jax

from videomae_jax.models import VideoMAEClassifier

POOLS = ("fc_norm", "mean")


def encode(model: VideoMAEClassifier, params, video: jax.Array, *, train: bool = False,
           pool: str = "fc_norm", rngs: dict[str, jax.Array] | None = None) -> jax.Array:
  """Float32 features (B, embed_dim) of an ImageNet-normalised video (B, T, H, W, 3).

  ``pool='fc_norm'``: fc_norm(mean of the encoder's tokens), the official fine-tuning feature
  (what the head sees, before dropout); ``'mean'``: the plain mean of the tokens. With
  ``train=True`` drop path is active and needs ``rngs={'dropout': key}``.
  """
  if pool not in POOLS:
    raise ValueError(f"pool={pool!r}: use one of {POOLS}")
  return model.apply({"params": params}, video, train=train, pool=pool, rngs=rngs,
                     method=VideoMAEClassifier.encode)
