r"""VideoMAE ViT-B pre-training on HMDB51, the reference recipe.

  python -m launch.pretrain --config=configs/pretrain_hmdb51_vit_b.py --workdir=/ckpt/hmdb51_vit_b \
      --config.data.train_list=/data/hmdb51/train.csv --config.data.root=/data/hmdb51/videos
"""
from videomae_jax.train.recipes import pretrain_recipe


def get_config():
  return pretrain_recipe("hmdb51", "vit_base")
