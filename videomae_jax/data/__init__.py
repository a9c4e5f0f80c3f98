"""Input pipeline for VideoMAE: sources, reference sampling and crops, tf.data; fine-tuning
samplers and the decode-once multi-view evaluation loader.

The pipeline (`build_pretrain_dataset`, `PretrainDataset`, `BatchLayout`) and the evaluation
loader (`build_eval_dataset`, `build_val_dataset`, `MultiViewLoader`, `eval_view_count`) are
imported on first use: they pull in the video decoders and OpenCV, which the config, a
synthetic-data run and `launch.export` do not need.
"""
from __future__ import annotations

import importlib
from typing import Any

from videomae_jax.data.config import default_data_config
from videomae_jax.data.sources import (SourceError, VideoRecord, check_labels,
                                       load_annotation_list, scan_video_folder)
from videomae_jax.data.stats import BadDataError, BadDataStats

_LAZY = {'BatchLayout': 'pipeline', 'PretrainDataset': 'pipeline',
         'build_pretrain_dataset': 'pipeline', 'MultiViewLoader': 'evaluation',
         'build_eval_dataset': 'evaluation', 'build_val_dataset': 'evaluation',
         'eval_view_count': 'evaluation'}

__all__ = [
    'BadDataError', 'BadDataStats', 'BatchLayout', 'MultiViewLoader', 'PretrainDataset',
    'SourceError', 'VideoRecord', 'build_eval_dataset', 'build_pretrain_dataset',
    'build_val_dataset', 'check_labels', 'default_data_config', 'eval_view_count',
    'load_annotation_list', 'scan_video_folder',
]


def __getattr__(name: str) -> Any:
  if name not in _LAZY:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  value = getattr(importlib.import_module(f'{__name__}.{_LAZY[name]}'), name)
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_LAZY))
