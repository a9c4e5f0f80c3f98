r"""VideoMAE ViT-B fine-tuning on Kinetics-400, the official recipe; tested with 5 clips x 3 crops.

  python -m launch.finetune --config=configs/finetune_k400_vit_b.py --workdir=/ckpt/k400_vit_b_ft \
      --config.init=/ckpt/k400_vit_b --config.data.root=/data/k400/videos \
      --config.data.train_list=/data/k400/train.csv --config.data.val_list=/data/k400/val.csv \
      --config.num_classes=400
  python -m launch.evaluate --workdir=/ckpt/k400_vit_b_ft

--config.init: the pre-training workdir (configs/pretrain_k400_vit_b.py; any other size or an official
.pth / HF folder works the same way).
The official script for the 800-epoch pre-training (512 videos, lr 1e-3, 100 epochs). For the
1600-epoch one: --config.batch_size=768 --config.data.num_sample=2 --config.optim.base_lr=5e-4
--config.num_epochs=75.
"""
from videomae_jax.finetune.config import finetune_recipe


def get_config():
  return finetune_recipe("k400", "vit_base")
