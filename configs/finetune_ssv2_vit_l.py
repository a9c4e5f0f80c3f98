r"""VideoMAE ViT-L fine-tuning on Something-Something V2, the official recipe; tested with 2 clips x 3 crops.

  python -m launch.finetune --config=configs/finetune_ssv2_vit_l.py --workdir=/ckpt/ssv2_vit_l_ft \
      --config.init=/ckpt/ssv2_vit_l --config.data.root=/data/ssv2/videos \
      --config.data.train_list=/data/ssv2/train.csv --config.data.val_list=/data/ssv2/val.csv \
      --config.num_classes=174
  python -m launch.evaluate --workdir=/ckpt/ssv2_vit_l_ft

--config.init: the pre-training workdir (configs/pretrain_ssv2_vit_l.py; any other size or an official
.pth / HF folder works the same way).
The official v1 code has no ViT-L SSv2 script; this uses the ViT-B 2400-epoch values.
"""
from videomae_jax.finetune.config import finetune_recipe


def get_config():
  return finetune_recipe("ssv2", "vit_large")
