r"""VideoMAE ViT-B pre-training on Kinetics-400, the reference recipe.

  python -m launch.pretrain --config=configs/pretrain_k400_vit_b.py --workdir=/ckpt/k400_vit_b \
      --config.data.train_list=/data/k400/train.csv --config.data.root=/data/k400/videos
"""
from videomae_jax.train.recipes import pretrain_recipe


def get_config():
  return pretrain_recipe("k400", "vit_base")
