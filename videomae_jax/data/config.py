"""Default `config.data`: every field the input pipeline reads (pre-training defaults)."""
from __future__ import annotations

import ml_collections


def default_data_config() -> ml_collections.ConfigDict:
  """Returns the input-pipeline defaults (K400-style pre-training, 16x4 clips at 224).

  Exactly one of `train_list`, `video_dir`, `frame_store` or `tfds_name` selects the source
  (a set `frame_store` takes precedence over `train_list` / `video_dir`).
  """
  c = ml_collections.ConfigDict()
  # Sources (exactly one of train_list / video_dir / tfds_name).
  c.train_list = ''        # Annotation list: `path label` (or `path 0 -1`) per line.
  c.root = ''              # Prefix joined to relative paths of `train_list`.
  c.video_dir = ''         # Folder scanned recursively for videos.
  c.video_extensions = ('.mp4', '.webm', '.avi', '.mkv', '.mov', '.m4v')
  c.frame_store = ''       # Folder made by `launch.prepare_videos --format=frames`.
  c.tfds_name = ''         # TFDS dataset with a video feature, e.g. 'ucf101'.
  c.tfds_split = 'train'
  c.tfds_data_dir = ''     # TFDS data_dir ('' = TFDS default, ~/tensorflow_datasets).
  c.tfds_manual_dir = ''   # Manually downloaded archives, for builders that need them.
  c.tfds_download = False  # Build the dataset if absent (needs the raw data / network).
  # Clip sampling (reference: 16 frames at stride 4 for K400, 2 for SSv2).
  c.num_frames = 16
  c.sampling_rate = 4
  c.min_frames = 1         # Videos with fewer decodable frames are skipped as too short.
  # 'pretrain' (one window at stride sampling_rate) | 'dense' (fine-tuning K400: official
  # kinetics.py, linspace over a window ending at random) | 'segment' (fine-tuning SSv2:
  # official ssv2.py, one random frame from each of num_frames equal segments).
  c.frame_sampling = 'pretrain'
  # Augmentation (reference multi-scale crop; no flip in the reference recipe).
  c.input_size = 224
  c.scales = (1.0, 0.875, 0.75, 0.66)
  c.max_distort = 1
  c.flip = False
  c.num_sample = 1         # Clips (crops) per decoded video; global_batch_size counts clips.
  # 'multiscale' (pre-training, scales / max_distort / flip above) | 'random_resized'
  # (fine-tuning: official RandomResizedCrop; no host flip, the fine-tuning step flips).
  c.crop = 'multiscale'
  c.rrc_scale = (0.08, 1.0)
  # Official kinetics.py `_aug_frame` passes [0.75, 1.3333], not exactly 4/3.
  c.rrc_ratio = (0.75, 1.3333)
  # Short side to decode at, when the stored video is larger (0 = auto:
  # ceil(input_size / min(scales)), so even the smallest crop is not upsampled).
  c.decode_short_side = 0
  # Decoding and robustness.
  c.reader = 'auto'        # 'auto' | 'decord' | 'pyav' | 'opencv' (auto: pyav on safe containers).
  c.decode_timeout_s = 60.0
  c.max_bad_fraction = 0.05
  c.max_replacements = 16  # Replacement tries for one example before giving up.
  c.max_abandoned_decodes = 4  # Timed-out decodes still running before BadDataError.
  # Order and parallelism.
  c.seed = 0               # Order and crops (the trainer's config: None = config.seed).
  c.shuffle_buffer = 1024  # TFDS only; file sources use an exact per-epoch permutation.
  c.num_parallel_calls = -1  # -1 = tf.data.AUTOTUNE.
  c.num_threads = 0        # tf.data private thread pool (0 = shared default pool).
  c.prefetch = 2           # Batches prefetched on the host.
  return c
