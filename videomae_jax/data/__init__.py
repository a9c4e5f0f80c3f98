"""Input pipeline for VideoMAE pre-training: sources, reference sampling and crops, tf.data.

The pipeline (`build_pretrain_dataset`, `PretrainDataset`, `BatchLayout`) is imported on first
use: it pulls in the video decoders and OpenCV, which the config, a synthetic-data run and
`launch.export` do not need.
"""
from __future__ import annotations

import importlib
from typing import Any

from videomae_jax.data.config import default_data_config
from videomae_jax.data.sources import (SourceError, VideoRecord, load_annotation_list,
                                       scan_video_folder)
from videomae_jax.data.stats import BadDataError, BadDataStats

_LAZY = {'BatchLayout': 'pipeline', 'PretrainDataset': 'pipeline',
         'build_pretrain_dataset': 'pipeline'}

__all__ = [
    'BadDataError', 'BadDataStats', 'BatchLayout', 'PretrainDataset', 'SourceError',
    'VideoRecord', 'build_pretrain_dataset', 'default_data_config', 'load_annotation_list',
    'scan_video_folder',
]


def __getattr__(name: str) -> Any:
  if name not in _LAZY:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  value = getattr(importlib.import_module(f'{__name__}.{_LAZY[name]}'), name)
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_LAZY))
