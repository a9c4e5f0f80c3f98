"""Builds HF transformers VideoMAE reference models with random (non-default) weights."""
from __future__ import annotations

import numpy as np
import torch
from transformers import VideoMAEConfig, VideoMAEForPreTraining, VideoMAEForVideoClassification


def randomize_(model: torch.nn.Module, seed: int) -> None:
  """Every parameter random, biases and norms included, so no term of the math hides as 0/1."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g) * 0.05
      p.copy_(1.0 + noise if name.endswith("layernorm_before.weight")
              or name.endswith("layernorm_after.weight") or "norm.weight" in name else noise * 2)


def hf_config(**kw) -> VideoMAEConfig:
  return VideoMAEConfig(**kw)


def pretrain_model(seed: int = 0, **kw) -> VideoMAEForPreTraining:
  torch.manual_seed(seed)
  model = VideoMAEForPreTraining(hf_config(use_mean_pooling=False, **kw)).eval()
  randomize_(model, seed)
  return model


def classifier_model(seed: int = 0, **kw) -> VideoMAEForVideoClassification:
  torch.manual_seed(seed)
  model = VideoMAEForVideoClassification(hf_config(use_mean_pooling=True, **kw)).eval()
  randomize_(model, seed)
  return model


def to_torch_video(video: np.ndarray) -> torch.Tensor:
  """(B, T, H, W, C) -> HF's (B, T, C, H, W)."""
  return torch.from_numpy(np.ascontiguousarray(np.transpose(video, (0, 1, 4, 2, 3))))


def hf_to_official(sd: dict) -> dict:
  """Independent rename of an HF pre-training state dict into the official VideoMAE layout."""
  out = {}
  for k, v in sd.items():
    v = v.detach().numpy() if hasattr(v, "detach") else v
    k = (k.replace("videomae.embeddings.patch_embeddings.projection", "encoder.patch_embed.proj")
         .replace("videomae.encoder.layer.", "encoder.blocks.")
         .replace("videomae.layernorm", "encoder.norm")
         .replace("decoder.decoder_layers.", "decoder.blocks.")
         .replace("attention.output.dense", "attn.proj")
         .replace("layernorm_before", "norm1").replace("layernorm_after", "norm2")
         .replace("intermediate.dense", "mlp.fc1").replace("output.dense", "mlp.fc2")
         .replace("attention.attention.query.bias", "attn.q_bias")
         .replace("attention.attention.value.bias", "attn.v_bias"))
    out[k] = v
  for k in [k for k in out if k.endswith("attention.attention.query.weight")]:
    base = k[: -len("attention.attention.query.weight")]
    out[base + "attn.qkv.weight"] = np.concatenate([
        out.pop(base + "attention.attention.query.weight"),
        out.pop(base + "attention.attention.key.weight"),
        out.pop(base + "attention.attention.value.weight")], axis=0)
  return out
