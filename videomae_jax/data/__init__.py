"""Input pipeline for VideoMAE pre-training: sources, reference sampling and crops, tf.data."""
from videomae_jax.data.config import default_data_config
from videomae_jax.data.pipeline import BatchLayout, PretrainDataset, build_pretrain_dataset
from videomae_jax.data.sources import (SourceError, VideoRecord, load_annotation_list,
                                       scan_video_folder)
from videomae_jax.data.stats import BadDataError, BadDataStats

__all__ = [
    'BadDataError', 'BadDataStats', 'BatchLayout', 'PretrainDataset', 'SourceError',
    'VideoRecord', 'build_pretrain_dataset', 'default_data_config', 'load_annotation_list',
    'scan_video_folder',
]
