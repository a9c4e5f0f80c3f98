r"""VideoMAE ViT-B fine-tuning on UCF101, the official recipe; tested with 5 clips x 3 crops.

  python -m launch.finetune --config=configs/finetune_ucf101_vit_b.py --workdir=/ckpt/ucf101_vit_b_ft \
      --config.init=/ckpt/ucf101_vit_b --config.data.root=/data/ucf101/videos \
      --config.data.train_list=/data/ucf101/train.csv --config.data.val_list=/data/ucf101/val.csv \
      --config.num_classes=101
  python -m launch.evaluate --workdir=/ckpt/ucf101_vit_b_ft

--config.init: the pre-training workdir (configs/pretrain_ucf101_vit_b.py; any other size or an official
.pth / HF folder works the same way).
"""
from videomae_jax.finetune.config import finetune_recipe


def get_config():
  return finetune_recipe("ucf101", "vit_base")
