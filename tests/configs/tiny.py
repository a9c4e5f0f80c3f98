r"""A tiny model for trainer tests: 4x32x32 clips, 2+1 blocks.

  --config=tests/configs/tiny.py           synthetic clips
  --config=tests/configs/tiny.py:/videos   real videos from that folder
"""
from videomae_jax.train.config import base_config


def get_config(arg: str = ""):
  c = base_config()
  c.model_name = "vit_small"
  c.model.img_size = 32
  c.model.patch_size = 8
  c.model.num_frames = 4
  c.model.embed_dim = 32
  c.model.depth = 2
  c.model.num_heads = 2
  c.model.decoder_embed_dim = 16
  c.model.decoder_depth = 1
  c.model.decoder_num_heads = 2
  c.mask.ratio = 0.75
  if arg:
    c.data.video_dir = arg
    c.data.sampling_rate = 2
    c.data.max_bad_fraction = 0.5
  else:
    c.data.synthetic = True
  c.batch_size = 8
  c.total_steps = 12
  c.optim.base_lr = 1e-3 * 256 / 8
  c.optim.warmup_steps = 3
  c.log_every_steps = 1
  c.vis_every_steps = 0
  c.checkpoint.every_steps = 4
  c.checkpoint.keep = 2
  return c
