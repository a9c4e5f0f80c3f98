"""Where videos come from: annotation lists in the official format and folders of files."""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

DEFAULT_EXTENSIONS = ('.mp4', '.webm', '.avi', '.mkv', '.mov', '.m4v')


@dataclasses.dataclass(frozen=True)
class VideoRecord:
  """One video of a file source; `label` is -1 where unknown (pre-training ignores it)."""
  path: str
  label: int = -1


class SourceError(ValueError):
  """A source that cannot be read: missing file/folder or a line that does not parse."""


def load_annotation_list(list_path: str, root: str = '') -> list[VideoRecord]:
  """Parses an official-format list: `path label` or `path 0 -1` per line.

  The path is the first field and the label the second; any further fields (the
  `-1` of the v2 pre-training lists) are ignored. A path may not contain spaces,
  as in the official loaders. Relative paths are joined to `root`. Blank lines and
  lines starting with `#` are skipped.
  """
  if not os.path.isfile(list_path):
    raise SourceError(f'data.train_list: annotation list {list_path!r} does not exist')
  records = []
  with open(list_path, encoding='utf-8') as f:
    for lineno, line in enumerate(f, 1):
      line = line.strip()
      if not line or line.startswith('#'):
        continue
      fields = line.split()
      if len(fields) < 2:
        raise SourceError(
            f'{list_path}:{lineno}: expected `path label` (space separated), got {line!r}')
      try:
        label = int(fields[1])
      except ValueError:
        raise SourceError(
            f'{list_path}:{lineno}: label {fields[1]!r} is not an integer in {line!r}'
        ) from None
      path = fields[0] if not root else os.path.join(root, fields[0])
      records.append(VideoRecord(path, label))
  if not records:
    raise SourceError(f'data.train_list: {list_path!r} lists no videos')
  return records


def check_labels(records: Sequence[VideoRecord], num_classes: int, source_name: str) -> int:
  """Checks that every label is a class in [0, num_classes) and returns the number of
  distinct labels.

  Raises SourceError naming `source_name` (the list file or folder), how many records are
  out of range, and the first offending path and label; -1 (no label, as in pre-training
  lists) is an error here too.
  """
  if num_classes < 1:
    raise ValueError(f'num_classes={num_classes} < 1')
  if not records:
    raise SourceError(f'{source_name}: lists no videos')
  bad = [r for r in records if not 0 <= r.label < num_classes]
  if bad:
    first = bad[0]
    what = 'no label (-1)' if first.label == -1 else f'label {first.label}'
    raise SourceError(
        f'{source_name}: {len(bad)} of {len(records)} videos have labels outside '
        f'[0, {num_classes}); first: {first.path!r} with {what}')
  return len({r.label for r in records})


def scan_video_folder(video_dir: str,
                      extensions: Sequence[str] = DEFAULT_EXTENSIONS) -> list[VideoRecord]:
  """All videos under `video_dir` (recursive, by extension), sorted for a stable order.

  Labels are the index of the first-level subfolder (sorted) when videos sit in
  class folders, as in UCF101/K400 layouts; -1 for files directly in `video_dir`.
  """
  if not os.path.isdir(video_dir):
    raise SourceError(f'data.video_dir: folder {video_dir!r} does not exist')
  exts = tuple(e.lower() if e.startswith('.') else '.' + e.lower() for e in extensions)
  paths = []
  for dirpath, dirnames, filenames in os.walk(video_dir, followlinks=True):
    dirnames.sort()
    paths.extend(os.path.join(dirpath, n) for n in filenames if n.lower().endswith(exts))
  paths.sort()
  if not paths:
    raise SourceError(f'data.video_dir: no videos with extensions {exts} under {video_dir!r}')
  classes = sorted({os.path.relpath(p, video_dir).split(os.sep)[0]
                    for p in paths if os.sep in os.path.relpath(p, video_dir)})
  class_id = {c: i for i, c in enumerate(classes)}
  records = []
  for p in paths:
    rel = os.path.relpath(p, video_dir)
    label = class_id[rel.split(os.sep)[0]] if os.sep in rel else -1
    records.append(VideoRecord(p, label))
  return records


def file_source_from_config(data_config) -> list[VideoRecord]:
  """The file source that `data_config` selects (`train_list` or `video_dir`)."""
  if data_config.get('train_list'):
    return load_annotation_list(data_config.train_list, data_config.get('root', ''))
  if data_config.get('video_dir'):
    return scan_video_folder(data_config.video_dir,
                             data_config.get('video_extensions', DEFAULT_EXTENSIONS))
  raise SourceError('config.data: set one of train_list, video_dir or tfds_name')
