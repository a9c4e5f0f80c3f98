"""Exact matmul FLOP counts of the VideoMAE model, as a function of its fields.

Counts 2*m*n*k for every matmul (the dense layers, the cube embedding and the two attention
products). Elementwise work (LayerNorm, softmax, GELU, adds) is under 1% at ViT sizes and is
left out, as in the usual MFU convention.
"""
from __future__ import annotations

from typing import Any, Mapping

from videomae_jax.models.presets import preset as _preset


def _fields(cfg: Mapping[str, Any] | Any) -> dict[str, Any]:
  from videomae_jax.models import VideoMAEPretrain  # avoid a cycle at import time
  if isinstance(cfg, Mapping):
    cfg = dict(cfg)
    if "preset" in cfg:
      cfg = {**_preset(cfg.pop("preset")), **cfg}
    model = VideoMAEPretrain(**{k: v for k, v in cfg.items()
                                if k in VideoMAEPretrain.__dataclass_fields__})
  else:
    model = cfg
  return model


def _block_flops(n: int, d: int, mlp: int) -> int:
  qkv = 2 * n * d * 3 * d
  attn = 2 * 2 * n * n * d  # q k^T and probs v
  proj = 2 * n * d * d
  ffn = 2 * 2 * n * d * mlp
  return qkv + attn + proj + ffn


def forward_flops(cfg, mask_ratio: float = 0.9, decoder_mask_ratio: float | None = None,
                  mask_type: str = "tube") -> dict[str, int]:
  """Forward FLOPs of one clip through ``VideoMAEPretrain`` with the given masking.

  Returns a dict with ``embed``, ``encoder``, ``decoder`` (incl. encoder_to_decoder and head)
  and ``total``.
  """
  m = _fields(cfg)
  t, h, w = m.grid
  n = t * h * w
  if mask_type == "tube":
    n_masked = t * int(mask_ratio * h * w)
  else:
    n_masked = int(mask_ratio * n)
  n_vis = n - n_masked
  if decoder_mask_ratio is None:
    n_dec_out = n_masked
  else:
    n_dec_out = n - t * h * w * int(4 * decoder_mask_ratio) // 4
  d, dd = m.embed_dim, m.decoder_embed_dim
  embed = 2 * n * m.patch_dim * d
  encoder = m.depth * _block_flops(n_vis, d, int(d * m.mlp_ratio))
  n_dec = n_vis + n_dec_out
  decoder = (2 * n_vis * d * dd + m.decoder_depth * _block_flops(n_dec, dd, int(dd * m.mlp_ratio))
             + 2 * n_dec_out * dd * m.patch_dim)
  return dict(embed=embed, encoder=encoder, decoder=decoder, total=embed + encoder + decoder)


def train_flops(cfg, mask_ratio: float = 0.9, decoder_mask_ratio: float | None = None,
                mask_type: str = "tube") -> int:
  """FLOPs of one training step per clip: forward + backward (2x forward; the cube embedding
  needs no input gradient, so its backward is 1x)."""
  f = forward_flops(cfg, mask_ratio, decoder_mask_ratio, mask_type)
  return 3 * (f["encoder"] + f["decoder"]) + 2 * f["embed"]
