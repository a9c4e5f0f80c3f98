"""Named model sizes of the reference (v1 decoders unless named otherwise)."""
from __future__ import annotations

from typing import Any

_PRESETS: dict[str, dict[str, Any]] = {
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6,
                      decoder_embed_dim=192, decoder_depth=4, decoder_num_heads=3),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12,
                     decoder_embed_dim=384, decoder_depth=4, decoder_num_heads=6),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16,
                      decoder_embed_dim=512, decoder_depth=12, decoder_num_heads=8),
    "vit_huge": dict(embed_dim=1280, depth=32, num_heads=16,
                     decoder_embed_dim=640, decoder_depth=12, decoder_num_heads=8),
    # VideoMAE V2 decoders.
    "vit_huge_v2": dict(embed_dim=1280, depth=32, num_heads=16,
                        decoder_embed_dim=512, decoder_depth=4, decoder_num_heads=8),
    "vit_giant": dict(embed_dim=1408, depth=40, num_heads=16, patch_size=14, mlp_ratio=48 / 11,
                      decoder_embed_dim=512, decoder_depth=4, decoder_num_heads=8),
}

PRESET_NAMES = tuple(_PRESETS)


def preset(name: str, *, decoder: bool = True) -> dict[str, Any]:
  """Fields of a named size as a dict, e.g. ``VideoMAEPretrain(**preset('vit_base'))``.

  ``decoder=False`` leaves out the decoder fields, for ``VideoMAEClassifier(**preset(...))``.
  """
  if name not in _PRESETS:
    raise KeyError(f"unknown model preset {name!r}; known: {', '.join(_PRESETS)}")
  fields = dict(_PRESETS[name])
  if not decoder:
    fields = {k: v for k, v in fields.items() if not k.startswith("decoder_")}
  return fields
