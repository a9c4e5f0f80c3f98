r"""VideoMAE ViT-B pre-training on UCF101, the reference recipe.

  python -m launch.pretrain --config=configs/pretrain_ucf101_vit_b.py --workdir=/ckpt/ucf101_vit_b \
      --config.data.train_list=/data/ucf101/train.csv --config.data.root=/data/ucf101/videos
"""
from videomae_jax.train.recipes import pretrain_recipe


def get_config():
  return pretrain_recipe("ucf101", "vit_base")
