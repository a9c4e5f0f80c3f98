r"""VideoMAE ViT-H fine-tuning on Kinetics-400, the official recipe; tested with 5 clips x 3 crops.

  python -m launch.finetune --config=configs/finetune_k400_vit_h.py --workdir=/ckpt/k400_vit_h_ft \
      --config.init=/ckpt/k400_vit_h --config.data.root=/data/k400/videos \
      --config.data.train_list=/data/k400/train.csv --config.data.val_list=/data/k400/val.csv \
      --config.num_classes=400
  python -m launch.evaluate --workdir=/ckpt/k400_vit_h_ft

--config.init: the pre-training workdir (configs/pretrain_k400_vit_h.py; any other size or an official
.pth / HF folder works the same way).
"""
from videomae_jax.finetune.config import finetune_recipe


def get_config():
  return finetune_recipe("k400", "vit_huge")
