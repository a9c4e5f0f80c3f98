"""Short faithful transcriptions of the official VideoMAE fine-tuning samplers and test views
(MCG-NJU/VideoMAE), the reference of tests/test_finetune_sampling.py and tests/test_eval_views.py.

Randomness is injected (`randint`, `uniform`) so that a test feeds the transcription and the
implementation the same random numbers. Decoding (`vr.get_batch`) is replaced by indexing a
full decode `frames`.
"""
import math

import cv2
import numpy as np


def kinetics_train_index(num_video_frames, clip_len, frame_sample_rate, randint,
                         num_segment=1):
  """kinetics.py `VideoClsDataset.loadvideo_decord`, mode 'train' (the index part);
  `randint` stands in for np.random.randint."""
  converted_len = int(clip_len * frame_sample_rate)
  seg_len = num_video_frames // num_segment

  all_index = []
  for i in range(num_segment):
    if seg_len <= converted_len:
      index = np.linspace(0, seg_len, num=seg_len // frame_sample_rate)
      index = np.concatenate((index, np.ones(clip_len - seg_len // frame_sample_rate) * seg_len))
      index = np.clip(index, 0, seg_len - 1).astype(np.int64)
    else:
      end_idx = randint(converted_len, seg_len)
      str_idx = end_idx - converted_len
      index = np.linspace(str_idx, end_idx, num=clip_len)
      index = np.clip(index, str_idx, end_idx - 1).astype(np.int64)
    index = index + i * seg_len
    all_index.extend(list(index))
  return all_index


def kinetics_test_buffer_index(num_video_frames, clip_len, frame_sample_rate):
  """kinetics.py `loadvideo_decord`, mode 'test': the frames decoded for every test view."""
  all_index = [x for x in range(0, num_video_frames, frame_sample_rate)]
  while len(all_index) < clip_len:
    all_index.append(all_index[-1])
  return all_index


def get_resize_sizes(im_h, im_w, size):
  """functional.py `get_resize_sizes`."""
  if im_w < im_h:
    ow = size
    oh = int(size * im_h / im_w)
  else:
    oh = size
    ow = int(size * im_w / im_h)
  return oh, ow


def resize_clip(clip, size):
  """functional.py `resize_clip` for numpy frames, interpolation 'bilinear' (the test
  `video_transforms.Resize(size=short_side_size, interpolation='bilinear')`)."""
  im_h, im_w, im_c = clip[0].shape
  # Min spatial dim already matches minimal size
  if (im_w <= im_h and im_w == size) or (im_h <= im_w and im_h == size):
    return clip
  new_h, new_w = get_resize_sizes(im_h, im_w, size)
  size = (new_w, new_h)
  scaled = [cv2.resize(img, size, interpolation=cv2.INTER_LINEAR) for img in clip]
  return scaled


def kinetics_test_view(buffer, chunk_nb, split_nb, clip_len, short_side_size, test_num_segment,
                       test_num_crop):
  """kinetics.py `VideoClsDataset.__getitem__`, mode 'test', after `loadvideo_decord`
  (`buffer` = the decoded frames) up to `data_transform` (normalisation)."""
  buffer = resize_clip(buffer, short_side_size)
  if isinstance(buffer, list):
    buffer = np.stack(buffer, 0)

  spatial_step = 1.0 * (max(buffer.shape[1], buffer.shape[2]) - short_side_size) \
      / (test_num_crop - 1)
  temporal_step = max(1.0 * (buffer.shape[0] - clip_len) / (test_num_segment - 1), 0)
  temporal_start = int(chunk_nb * temporal_step)
  spatial_start = int(split_nb * spatial_step)
  if buffer.shape[1] >= buffer.shape[2]:
    buffer = buffer[temporal_start:temporal_start + clip_len,
                    spatial_start:spatial_start + short_side_size, :, :]
  else:
    buffer = buffer[temporal_start:temporal_start + clip_len,
                    :, spatial_start:spatial_start + short_side_size, :]
  return buffer


def ssv2_train_index(num_video_frames, num_segment, randint):
  """ssv2.py `SSVideoClsDataset.loadvideo_decord`, mode 'train' (`clip_len=1`,
  `num_segment=num_frames` as datasets.py builds it); `randint` stands in for
  np.random.randint."""
  average_duration = num_video_frames // num_segment
  all_index = []
  if average_duration > 0:
    all_index += list(np.multiply(list(range(num_segment)), average_duration)
                      + randint(average_duration, size=num_segment))
  elif num_video_frames > num_segment:
    all_index += list(np.sort(randint(num_video_frames, size=num_segment)))
  else:
    all_index += list(np.zeros((num_segment,)))
  all_index = list(np.array(all_index))
  return all_index


def ssv2_test_buffer_index(num_video_frames, num_segment, test_num_segment):
  """ssv2.py `loadvideo_decord`, mode 'test': the frames decoded for every test view."""
  all_index = []
  tick = num_video_frames / float(num_segment)
  all_index = list(np.array([int(tick / 2.0 + tick * x) for x in range(num_segment)]
                            + [int(tick * x) for x in range(num_segment)]))
  while len(all_index) < (num_segment * test_num_segment):
    all_index.append(all_index[-1])
  all_index = list(np.sort(np.array(all_index)))
  return all_index


def ssv2_test_view(buffer, chunk_nb, split_nb, short_side_size, test_num_crop):
  """ssv2.py `SSVideoClsDataset.__getitem__`, mode 'test', up to `data_transform`."""
  buffer = resize_clip(buffer, short_side_size)
  if isinstance(buffer, list):
    buffer = np.stack(buffer, 0)

  spatial_step = 1.0 * (max(buffer.shape[1], buffer.shape[2]) - short_side_size) \
      / (test_num_crop - 1)
  temporal_start = chunk_nb  # 0/1
  spatial_start = int(split_nb * spatial_step)
  if buffer.shape[1] >= buffer.shape[2]:
    buffer = buffer[temporal_start::2, spatial_start:spatial_start + short_side_size, :, :]
  else:
    buffer = buffer[temporal_start::2, :, spatial_start:spatial_start + short_side_size, :]
  return buffer


def center_crop_offset(im_w, im_h, w, h):
  """video_transforms.py `CenterCrop.__call__` (the validation crop): (x1, y1)."""
  x1 = int(round((im_w - w) / 2.))
  y1 = int(round((im_h - h) / 2.))
  return x1, y1


def get_param_spatial_crop(scale, ratio, height, width, uniform, randint, num_repeat=10):
  """video_transforms.py `_get_param_spatial_crop` with `log_scale=True`, `switch_hw=False`
  (as `random_resized_crop` calls it); `uniform` / `randint` stand in for random.uniform /
  random.randint (both ends included). The official also draws np.random.uniform() each try
  for `switch_hw`, which is False: no effect on the box, left out."""
  for _ in range(num_repeat):
    area = height * width
    target_area = uniform(*scale) * area
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    aspect_ratio = math.exp(uniform(*log_ratio))

    w = int(round(math.sqrt(target_area * aspect_ratio)))
    h = int(round(math.sqrt(target_area / aspect_ratio)))

    if 0 < w <= width and 0 < h <= height:
      i = randint(0, height - h)
      j = randint(0, width - w)
      return i, j, h, w

  # Fallback to central crop
  in_ratio = float(width) / float(height)
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:  # whole image
    w = width
    h = height
  i = (height - h) // 2
  j = (width - w) // 2
  return i, j, h, w
