r"""A tiny classifier for fine-tuning tests: 4x32x32 clips, 2 blocks (the encoder of
tests/configs/tiny.py).

  --config=tests/configs/tiny_finetune.py --config.data.train_list=... --config.num_classes=N
"""
from videomae_jax.finetune.config import base_config


def get_config():
  c = base_config()
  c.model_name = "vit_small"
  c.model.img_size = 32
  c.model.patch_size = 8
  c.model.num_frames = 4
  c.model.embed_dim = 32
  c.model.depth = 2
  c.model.num_heads = 2
  c.data.sampling_rate = 2
  c.data.max_bad_fraction = 0.5
  c.batch_size = 8          # 4 videos x 2 clips
  c.total_steps = 12
  c.optim.base_lr = 1e-3 * 256 / 4
  c.optim.warmup_steps = 3
  c.eval.every_steps = 6
  c.eval.videos_per_batch = 2
  c.test.videos_per_batch = 2
  c.test.short_side = 32
  c.log_every_steps = 1
  c.checkpoint.every_steps = 4
  c.checkpoint.keep = 2
  return c
