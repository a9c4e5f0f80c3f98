"""Exact matmul FLOP and parameter counts of the VideoMAE model, as functions of its fields.

FLOPs count 2*m*n*k for every matmul: the dense layers, the cube embedding and the two attention
products. Elementwise work (LayerNorm, softmax, GELU, adds, the optimizer) is left out, as in the
usual MFU convention; it is 1-3% of XLA's own count at ViT sizes (see ``bench/README.md``).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax

from videomae_jax import masking
from videomae_jax.models.presets import preset as _preset

# Checkpoint policies under which the block's matmuls are saved, not recomputed: (dense, attn).
_POLICY_SAVES = {
    "nothing_saveable": (False, False),
    "dots_saveable": (True, True),
    "checkpoint_dots": (True, True),
    "dots_with_no_batch_dims_saveable": (True, False),
    "checkpoint_dots_with_no_batch_dims": (True, False),
    "everything_saveable": (True, True),
}


def _model(cfg: Mapping[str, Any] | Any):
  """A ``VideoMAEPretrain`` from itself, or from a dict of its fields (``preset`` allowed)."""
  from videomae_jax.models import VideoMAEPretrain  # avoid a cycle at import time
  if isinstance(cfg, Mapping):
    cfg = dict(cfg)
    if "preset" in cfg:
      cfg = {**_preset(cfg.pop("preset")), **cfg}
    return VideoMAEPretrain(**{k: v for k, v in cfg.items()
                               if k in VideoMAEPretrain.__dataclass_fields__})
  return cfg


def _dense_flops(n: int, d: int, mlp: int) -> int:
  """qkv, proj, fc1 and fc2 of one block over n tokens."""
  return 2 * n * d * 3 * d + 2 * n * d * d + 2 * 2 * n * d * mlp


def _attn_flops(n: int, d: int) -> int:
  """q k^T and probs v of one block (every head together)."""
  return 2 * 2 * n * n * d


def token_counts(cfg, mask_ratio: float = 0.9, decoder_mask_ratio: float | None = None,
                 mask_type: str = "tube") -> dict[str, int]:
  """Tokens per clip: ``all``, encoder ``visible``, decoder ``predicted`` and decoder ``input``."""
  m = _model(cfg)
  n = m.num_tokens
  # The counts come from the mask functions themselves (shapes only, nothing runs).
  mask = jax.eval_shape(
      lambda: masking.MASKERS[mask_type](jax.random.key(0), 1, m.grid, mask_ratio))
  n_masked = mask.num_masked
  n_vis = n - n_masked
  if decoder_mask_ratio is None:
    n_pred = n_masked
  else:
    n_pred = n - int(masking.running_cell_maps(m.grid, decoder_mask_ratio)[0].sum())
  return dict(all=n, visible=n_vis, predicted=n_pred, input=n_vis + n_pred)


def forward_flops(cfg, mask_ratio: float = 0.9, decoder_mask_ratio: float | None = None,
                  mask_type: str = "tube") -> dict[str, int]:
  """Forward FLOPs of one clip through ``VideoMAEPretrain`` with the given masking.

  Returns ``embed``, ``encoder`` and ``decoder`` (encoder_to_decoder and head included), each
  block part split into ``*_dense`` and ``*_attn``, and ``total``.
  """
  m = _model(cfg)
  tok = token_counts(m, mask_ratio, decoder_mask_ratio, mask_type)
  d, dd = m.embed_dim, m.decoder_embed_dim
  n_vis, n_dec, n_pred = tok["visible"], tok["input"], tok["predicted"]
  out = dict(
      embed=2 * tok["visible"] * m.patch_dim * d,
      encoder_dense=m.depth * _dense_flops(n_vis, d, int(d * m.mlp_ratio)),
      encoder_attn=m.depth * _attn_flops(n_vis, d),
      decoder_dense=(2 * n_vis * d * dd
                     + m.decoder_depth * _dense_flops(n_dec, dd, int(dd * m.mlp_ratio))
                     + 2 * n_pred * dd * m.patch_dim),
      decoder_attn=m.decoder_depth * _attn_flops(n_dec, dd))
  out["encoder"] = out["encoder_dense"] + out["encoder_attn"]
  out["decoder"] = out["decoder_dense"] + out["decoder_attn"]
  out["total"] = out["embed"] + out["encoder"] + out["decoder"]
  return out


def recompute_flops(cfg, mask_ratio: float = 0.9, decoder_mask_ratio: float | None = None,
                    mask_type: str = "tube") -> int:
  """Forward matmuls the backward pass runs again under the model's remat knobs, per clip.

  Block remat recomputes what its policy does not save; attention remat (einsum path) recomputes
  q k^T (probs v is not needed for the gradients). The fused CPU kernel's backward pass runs
  seven N^2 matmuls instead of four (q k^T and dO v^T once per query block and again, transposed,
  per key block): 1.5x the forward attention on top.
  """
  from videomae_jax.models.layers import resolve_attention_impl
  m = _model(cfg)
  f = forward_flops(m, mask_ratio, decoder_mask_ratio, mask_type)
  extra = 0
  if m.remat:
    saves_dense, saves_attn = _POLICY_SAVES.get(m.remat_policy, (False, False))
    for part in ("encoder", "decoder"):
      # encoder_to_decoder and the head sit outside the blocks and are never recomputed.
      dense = f[f"{part}_dense"]
      if part == "decoder":
        tok = token_counts(m, mask_ratio, decoder_mask_ratio, mask_type)
        dense -= 2 * tok["visible"] * m.embed_dim * m.decoder_embed_dim
        dense -= 2 * tok["predicted"] * m.decoder_embed_dim * m.patch_dim
      extra += (0 if saves_dense else dense) + (0 if saves_attn else f[f"{part}_attn"])
  impl = resolve_attention_impl(m.attention_impl, m.dtype)
  if impl == "einsum":
    parts = {"none": (), "decoder": ("decoder",), "all": ("encoder", "decoder")}
    for part in parts[m.attention_remat]:
      extra += f[f"{part}_attn"] // 2
  elif impl == "cpu_fused":
    extra += 3 * (f["encoder_attn"] + f["decoder_attn"]) // 2
  return extra


def train_flops(cfg, mask_ratio: float = 0.9, decoder_mask_ratio: float | None = None,
                mask_type: str = "tube", *, recompute: bool = False) -> int:
  """FLOPs of one training step per clip: forward + backward.

  The backward of a matmul is two matmuls of the same size (input and weight gradients), except
  for the cube embedding, whose input (the video) needs no gradient. ``recompute=False`` gives
  model FLOPs (MFU convention); ``True`` adds what remat runs again, for comparing with a
  compiler's count.
  """
  f = forward_flops(cfg, mask_ratio, decoder_mask_ratio, mask_type)
  total = 3 * (f["encoder"] + f["decoder"]) + 2 * f["embed"]
  if recompute:
    total += recompute_flops(cfg, mask_ratio, decoder_mask_ratio, mask_type)
  return total


def param_counts(cfg) -> dict[str, int]:
  """Exact trainable parameters: ``encoder`` (patch embed, blocks, final norm), ``decoder``
  (encoder_to_decoder, mask token, blocks, norm, head) and ``total``."""
  m = _model(cfg)

  def block(d: int, mlp: int) -> int:
    ln = 2 * d
    attn = 3 * d * d + 2 * d + d * d + d  # qkv, q/v bias, proj (+ bias)
    ffn = d * mlp + mlp + mlp * d + d
    gammas = 2 * d if m.init_values > 0 else 0
    return 2 * ln + attn + ffn + gammas

  d, dd = m.embed_dim, m.decoder_embed_dim
  encoder = (m.patch_dim * d + d + m.depth * block(d, int(d * m.mlp_ratio)) + 2 * d)
  decoder = (d * dd + dd + m.decoder_depth * block(dd, int(dd * m.mlp_ratio)) + 2 * dd
             + dd * m.patch_dim + m.patch_dim)
  return dict(encoder=encoder, decoder=decoder, total=encoder + decoder)


def classifier_flops(model) -> dict[str, int]:
  """Forward FLOPs of one clip through a ``VideoMAEClassifier`` (every token, no mask):
  ``embed``, ``encoder`` and ``head``, and ``total``; a training step costs about 3x."""
  n, d = model.num_tokens, model.embed_dim
  out = dict(embed=2 * n * model.patch_dim * d,
             encoder=model.depth * (_dense_flops(n, d, int(d * model.mlp_ratio))
                                    + _attn_flops(n, d)),
             head=2 * d * int(model.num_classes))
  out["total"] = out["embed"] + out["encoder"] + out["head"]
  return out
