r"""VideoMAE ViT-B fine-tuning on Something-Something V2, the official recipe; tested with 2 clips x 3 crops.

  python -m launch.finetune --config=configs/finetune_ssv2_vit_b.py --workdir=/ckpt/ssv2_vit_b_ft \
      --config.init=/ckpt/ssv2_vit_b --config.data.root=/data/ssv2/videos \
      --config.data.train_list=/data/ssv2/train.csv --config.data.val_list=/data/ssv2/val.csv \
      --config.num_classes=174
  python -m launch.evaluate --workdir=/ckpt/ssv2_vit_b_ft

--config.init: the pre-training workdir (configs/pretrain_ssv2_vit_b.py; any other size or an official
.pth / HF folder works the same way).
The official script for the 800-epoch pre-training. For the 2400-epoch one:
--config.batch_size=768 --config.data.num_sample=2 --config.num_epochs=30.
"""
from videomae_jax.finetune.config import finetune_recipe


def get_config():
  return finetune_recipe("ssv2", "vit_base")
