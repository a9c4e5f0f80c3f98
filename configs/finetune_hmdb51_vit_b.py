r"""VideoMAE ViT-B fine-tuning on HMDB51, the official recipe; tested with 5 clips x 3 crops.

  python -m launch.finetune --config=configs/finetune_hmdb51_vit_b.py --workdir=/ckpt/hmdb51_vit_b_ft \
      --config.init=/ckpt/hmdb51_vit_b --config.data.root=/data/hmdb51/videos \
      --config.data.train_list=/data/hmdb51/train.csv --config.data.val_list=/data/hmdb51/val.csv \
      --config.num_classes=51
  python -m launch.evaluate --workdir=/ckpt/hmdb51_vit_b_ft

--config.init: the pre-training workdir (configs/pretrain_hmdb51_vit_b.py; any other size or an official
.pth / HF folder works the same way).
The official v1 code has no HMDB51 script; this uses the UCF101 one (the paper fine-tunes
both alike).
"""
from videomae_jax.finetune.config import finetune_recipe


def get_config():
  return finetune_recipe("hmdb51", "vit_base")
