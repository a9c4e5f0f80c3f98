"""The reference pre-training recipes as configs (see REFERENCE: Recipes)."""
from __future__ import annotations

import ml_collections

from videomae_jax.train.config import base_config

# dataset -> (temporal stride, mask ratio, global batch, epochs by model size)
_DATASETS = {
    "k400": dict(sampling_rate=4, ratio=0.9, batch=2048,
                 epochs={"vit_small": 1600, "vit_base": 800, "vit_large": 1600,
                         "vit_huge": 1600}),
    "ssv2": dict(sampling_rate=2, ratio=0.9, batch=2048,
                 epochs={"vit_small": 2400, "vit_base": 800, "vit_large": 2400}),
    "ucf101": dict(sampling_rate=4, ratio=0.75, batch=192, epochs={"vit_base": 3200}),
    "hmdb51": dict(sampling_rate=2, ratio=0.9, batch=192, epochs={"vit_base": 4800}),
}


def pretrain_recipe(dataset: str, model_name: str) -> ml_collections.ConfigDict:
  """K400/SSv2/UCF101/HMDB51 pre-training of a VideoMAE v1 model, as the reference runs it.

  The annotation list and video root come from the command line
  (``--config.data.train_list=... --config.data.root=...``).
  """
  d = _DATASETS[dataset]
  c = base_config()
  c.model_name = model_name
  c.mask.ratio = d["ratio"]
  c.data.sampling_rate = d["sampling_rate"]
  c.batch_size = d["batch"]
  c.num_epochs = d["epochs"][model_name]
  c.optim.warmup_epochs = 40
  if model_name in ("vit_large", "vit_huge"):
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.mesh.fsdp = 8 if model_name == "vit_huge" else 1
  return c


def pretrain_v2_giant() -> ml_collections.ConfigDict:
  """VideoMAE V2 ViT-g: dual masking (tube 0.9 + running-cell decoder mask 0.5), repeated
  sampling 4, gradient clipping 0.02, bf16 with remat and FSDP."""
  c = base_config()
  c.model_name = "vit_giant"
  c.mask.ratio = 0.9
  c.mask.decoder_type = "run_cell"
  c.mask.decoder_ratio = 0.5
  c.data.sampling_rate = 4
  c.data.num_sample = 4
  c.batch_size = 8192
  c.num_epochs = 1200
  c.optim.warmup_epochs = 30
  c.optim.grad_clip = 0.02
  c.model.dtype = "bfloat16"
  c.model.remat = True
  c.model.scan = True
  c.mesh.fsdp = 16
  return c
