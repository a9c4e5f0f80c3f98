r"""VideoMAE ViT-S pre-training on Something-Something V2, the reference recipe.

  python -m launch.pretrain --config=configs/pretrain_ssv2_vit_s.py --workdir=/ckpt/ssv2_vit_s \
      --config.data.train_list=/data/ssv2/train.csv --config.data.root=/data/ssv2/videos
"""
from videomae_jax.train.recipes import pretrain_recipe


def get_config():
  return pretrain_recipe("ssv2", "vit_small")
