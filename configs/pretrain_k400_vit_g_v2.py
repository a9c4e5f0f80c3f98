r"""VideoMAE V2 ViT-g pre-training with dual masking (running-cell decoder mask).

  python -m launch.pretrain --config=configs/pretrain_k400_vit_g_v2.py --workdir=/ckpt/vit_g \
      --config.data.train_list=/data/k400/train.csv --config.data.root=/data/k400/videos
"""
from videomae_jax.train.recipes import pretrain_v2_giant


def get_config():
  return pretrain_v2_giant()
