r"""VideoMAE as a data-efficient learner: pre-trained vs from scratch, at 100% and 10% of labels.

  python -m experiments.data_efficiency --out=/tmp/data_efficiency [--scale=full|tiny]

One command, every phase a real run of the library's own launchers:
  1. data      `experiments.temporal_dataset`: ~3,500 clips cut from real sample footage,
               labelled by a temporal transformation (no single frame tells the class), and
               its frame-level baseline (one frame per clip, three classifiers).
  2. pretrain  `launch.pretrain --config=configs/demo.py` on the training clips, no labels.
  3. finetune  `launch.finetune --config=configs/finetune_demo.py` four times: initialised
               from step 2 or from scratch, on all training labels or a class-stratified 10%.
               Both arms of a label budget run the identical recipe, steps and data order.
  4. evaluate  `launch.evaluate` on the held-out split (val clips come from time ranges of
               the footage that no training clip touches).
  5. report    results.json, results.md (the table) and results.png (the plot) in --out.

A phase whose output exists is not run again, so a killed experiment continues where it
stopped (the launchers resume their own checkpoints). `--scale=tiny` runs every phase in
about two minutes with a one-block model (a smoke test; its numbers mean nothing).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import Any, Sequence

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Scale:
  """Sizes of one experiment; the model is configs/demo.py's unless `model` overrides it."""
  clips: int             # dataset clips, train + val
  size: int              # stored side of the square clips
  frames: int            # stored frames per clip
  img_size: int          # model input side
  num_frames: int        # model input frames, sampled at `sampling_rate` from the stored ones
  sampling_rate: int
  pretrain_steps: int
  pretrain_batch: int    # clips per step (4 crops of each decoded clip)
  finetune_epochs: dict[float, int]  # label fraction -> epochs
  finetune_batch: int    # clips per step (2 clips of each video)
  model: tuple[tuple[str, Any], ...] = ()
  test_clips: int = 2


SCALES = {
    # About 30 minutes on 2 CPU cores. 8 frames at stride 4 span the stored 32: a pan moves
    # 3-6 px between sampled frames, which a 16-px tubelet sees (at stride 2 neither arm
    # learned the classes within these epochs), at half the tokens of 16 frames.
    'full': Scale(clips=3500, size=64, frames=32, img_size=64, num_frames=8, sampling_rate=4,
                  pretrain_steps=2000, pretrain_batch=64,
                  finetune_epochs={1.0: 8, 0.1: 50}, finetune_batch=32),
    # A smoke run of every phase (tests); its numbers mean nothing.
    'tiny': Scale(clips=70, size=32, frames=8, img_size=32, num_frames=4, sampling_rate=2,
                  pretrain_steps=4, pretrain_batch=8,
                  finetune_epochs={1.0: 1, 0.1: 2}, finetune_batch=8,
                  model=(('patch_size', 8), ('embed_dim', 32), ('depth', 1), ('num_heads', 2)),
                  test_clips=1),
}
FRACTIONS = (1.0, 0.1)


def _log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _run(args: Sequence[str], log_path: str) -> float:
  """Runs one launcher in its own process (stderr to `log_path`); returns its wall time."""
  t = time.time()
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  with open(log_path, 'a', encoding='utf-8') as log:
    proc = subprocess.run([sys.executable, '-m', *args], cwd=REPO, env=env, stdout=log,
                          stderr=subprocess.STDOUT)
  if proc.returncode != 0:
    with open(log_path, encoding='utf-8') as f:
      tail = f.read()[-3000:]
    raise RuntimeError(f"`python -m {' '.join(args)}` exited {proc.returncode}; its log is "
                       f"{log_path}:\n{tail}")
  return time.time() - t


def label_subset(train_list: str, fraction: float, out_path: str, seed: int = 0) -> int:
  """Writes a class-stratified `fraction` of `train_list` (at least one clip per class)."""
  from videomae_jax.data.sources import load_annotation_list  # pylint: disable=g-import-not-at-top
  by_class: dict[int, list[str]] = {}
  for r in load_annotation_list(train_list):
    by_class.setdefault(r.label, []).append(f'{r.path} {r.label}')
  rng = np.random.default_rng(seed)
  keep = []
  for label in sorted(by_class):
    items = by_class[label]
    n = max(1, int(round(fraction * len(items))))
    keep += [items[i] for i in sorted(rng.choice(len(items), size=n, replace=False))]
  with open(out_path, 'w', encoding='utf-8') as f:
    f.write('\n'.join(keep) + '\n')
  return len(keep)


def _geometry_flags(scale: Scale) -> list[str]:
  flags = [f'--config.model.img_size={scale.img_size}',
           f'--config.model.num_frames={scale.num_frames}',
           f'--config.data.sampling_rate={scale.sampling_rate}']
  return flags + [f'--config.model.{k}={v}' for k, v in scale.model]


def pretrain_command(scale: Scale, data_dir: str, workdir: str) -> list[str]:
  return ['launch.pretrain', '--config=configs/demo.py', f'--workdir={workdir}',
          '--config.data.video_dir=', f'--config.data.root={data_dir}/videos',
          f'--config.data.train_list={data_dir}/pretrain.txt',
          '--config.data.num_sample=4', f'--config.batch_size={scale.pretrain_batch}',
          f'--config.total_steps={scale.pretrain_steps}',
          f'--config.optim.warmup_steps={max(1, scale.pretrain_steps // 10)}',
          f'--config.optim.base_lr={1.5e-3 * 256 / scale.pretrain_batch}',
          f'--config.log_every_steps={max(1, scale.pretrain_steps // 20)}',
          f'--config.vis_every_steps={scale.pretrain_steps}',
          f'--config.checkpoint.every_steps={max(1, scale.pretrain_steps // 4)}',
          *_geometry_flags(scale)]


def finetune_command(scale: Scale, data_dir: str, workdir: str, train_list: str, init: str,
                     epochs: int) -> list[str]:
  return ['launch.finetune', f'--config=configs/finetune_demo.py:{data_dir}',
          f'--workdir={workdir}', f'--config.init={init}',
          f'--config.data.train_list={train_list}', f'--config.num_epochs={epochs}',
          f'--config.batch_size={scale.finetune_batch}',
          f'--config.eval.every_epochs={epochs}', f'--config.test.short_side={scale.size}',
          '--config.log_every_steps=20', '--config.checkpoint.every_steps=500',
          *_geometry_flags(scale)]


def evaluate_command(scale: Scale, workdir: str) -> list[str]:
  return ['launch.evaluate', f'--workdir={workdir}', f'--config.test.num_clips={scale.test_clips}',
          '--config.test.num_crops=1']


def _eval_path(scale: Scale, workdir: str) -> str:
  return os.path.join(workdir, f'eval_{scale.test_clips}x1.json')


def write_report(out: str, results: dict[str, Any]) -> None:
  """results.md (the table) and results.png (grouped bars) from results.json's fields."""
  runs, base = results['runs'], results['frame_baseline']
  chance = base['chance']
  rows = ['| labels | train clips | from scratch | pre-trained | gap (points) |',
          '|---|---|---|---|---|']
  for frac in FRACTIONS:
    s, p = runs[f'scratch_{frac:g}'], runs[f'pretrained_{frac:g}']
    rows.append(f"| {100 * frac:g}% | {s['train_clips']} | {100 * s['top1']:.1f}% | "
                f"{100 * p['top1']:.1f}% | {100 * (p['top1'] - s['top1']):+.1f} |")
  single = base['single_frame']
  rows.append('')
  rows.append(f"Frame-level baseline (one frame per clip): logistic {100 * single['logistic']:.1f}%"
              f", nearest centroid {100 * single['nearest_centroid']:.1f}%, 1-NN "
              f"{100 * single['nearest_neighbour']:.1f}%; chance {100 * chance:.1f}% "
              f"({base['num_classes']} classes, {base['num_val']} held-out clips).")
  with open(os.path.join(out, 'results.md'), 'w', encoding='utf-8') as f:
    f.write('\n'.join(rows) + '\n')

  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  w, h, pad = 560, 360, 50
  img = Image.new('RGB', (w, h), 'white')
  d = ImageDraw.Draw(img)
  plot_h = h - 2 * pad
  y_of = lambda v: h - pad - v * plot_h  # noqa: E731
  d.line([(pad, pad), (pad, h - pad), (w - 10, h - pad)], fill='black')
  for v in (0.0, 0.25, 0.5, 0.75, 1.0):
    d.line([(pad - 4, y_of(v)), (w - 10, y_of(v))], fill=(225, 225, 225))
    d.text((8, y_of(v) - 6), f'{100 * v:.0f}%', fill='black')
  # The two reference lines cross the bars, so their labels go in a legend above the plot.
  fb = single['logistic']
  for k, (v, colour, label) in enumerate((
      (chance, (150, 150, 150), f'chance {100 * chance:.1f}%'),
      (fb, (200, 120, 0), f'frame-level baseline {100 * fb:.1f}%'))):
    d.line([(pad, y_of(v)), (w - 10, y_of(v))], fill=colour)
    x0 = pad + 10 + 200 * k
    d.line([(x0, 32), (x0 + 20, 32)], fill=colour, width=2)
    d.text((x0 + 26, 26), label, fill=colour)
  colours = {'scratch': (120, 120, 200), 'pretrained': (220, 60, 60)}
  group_w = (w - pad - 20) / len(FRACTIONS)
  for g, frac in enumerate(FRACTIONS):
    x0 = pad + 20 + g * group_w
    for k, arm in enumerate(('scratch', 'pretrained')):
      v = runs[f'{arm}_{frac:g}']['top1']
      bx = x0 + k * 90
      d.rectangle([bx, y_of(v), bx + 70, h - pad], fill=colours[arm])
      d.text((bx + 12, y_of(v) - 14), f'{100 * v:.1f}%', fill='black')
    d.text((x0 + 40, h - pad + 8), f'{100 * frac:g}% of labels', fill='black')
  d.text((pad + 10, 10), 'held-out top-1: from scratch (blue) vs VideoMAE pre-trained (red)',
         fill='black')
  img.save(os.path.join(out, 'results.png'))


def run(out: str, scale_name: str = 'full', seed: int = 0) -> dict[str, Any]:
  """Runs (or continues) the experiment in `out`; returns what results.json holds."""
  scale = SCALES[scale_name]
  os.makedirs(out, exist_ok=True)
  data_dir, logs = os.path.join(out, 'data'), os.path.join(out, 'logs')
  os.makedirs(logs, exist_ok=True)
  results_path = os.path.join(out, 'results.json')
  walls: dict[str, float] = {}
  t0 = time.time()

  from experiments import temporal_dataset  # pylint: disable=g-import-not-at-top
  _log(f'data: {scale.clips} clips of {scale.frames}x{scale.size}px in {data_dir}')
  t = time.time()
  summary = temporal_dataset.build(data_dir, clips=scale.clips, size=scale.size,
                                   frames=scale.frames, seed=seed)
  walls['data'] = time.time() - t
  base_path = os.path.join(out, 'frame_baseline.json')
  if not os.path.exists(base_path):
    t = time.time()
    base = temporal_dataset.frame_baseline(data_dir, seed=seed)
    with open(base_path, 'w', encoding='utf-8') as f:
      json.dump(base, f, indent=1)
    walls['frame_baseline'] = time.time() - t
  with open(base_path, encoding='utf-8') as f:
    base = json.load(f)
  _log(f"frame baseline: logistic {base['single_frame']['logistic']:.3f}, chance "
       f"{base['chance']:.3f}; motion control {base['motion_control']['logistic']:.3f}")

  lists = {}
  for frac in FRACTIONS:
    path = os.path.join(out, f'train_{frac:g}.txt')
    lists[frac] = (path, label_subset(os.path.join(data_dir, 'train.txt'), frac, path, seed))

  pre_dir = os.path.join(out, 'pretrain')
  done = os.path.join(pre_dir, 'checkpoints', str(scale.pretrain_steps))
  if not os.path.isdir(done):
    _log(f'pretrain: {scale.pretrain_steps} steps of {scale.pretrain_batch} clips, no labels')
    walls['pretrain'] = _run(pretrain_command(scale, data_dir, pre_dir),
                             os.path.join(logs, 'pretrain.log'))
  pre_loss = _last_loss(os.path.join(pre_dir, 'metrics.jsonl'))

  runs = {}
  for frac in FRACTIONS:
    train_list, n = lists[frac]
    epochs = scale.finetune_epochs[frac]
    for arm, init in (('pretrained', pre_dir), ('scratch', '')):
      name = f'{arm}_{frac:g}'
      work = os.path.join(out, name)
      ev = _eval_path(scale, work)
      if not os.path.exists(ev):
        _log(f'finetune {name}: {n} labelled clips, {epochs} epochs')
        walls[f'finetune_{name}'] = _run(
            finetune_command(scale, data_dir, work, train_list, init, epochs),
            os.path.join(logs, f'finetune_{name}.log'))
        walls[f'evaluate_{name}'] = _run(evaluate_command(scale, work),
                                         os.path.join(logs, f'evaluate_{name}.log'))
      with open(ev, encoding='utf-8') as f:
        report = json.load(f)
      runs[name] = dict(top1=report['top1'], top5=report['top5'],
                        mean_class_accuracy=report.get('mean_class_accuracy'),
                        num_videos=report['num_videos'], train_clips=n, epochs=epochs,
                        init=init or 'scratch')
      _log(f"{name}: top-1 {100 * report['top1']:.1f}%")

  results = dict(scale=scale_name, sizes=dataclasses.asdict(scale) | dict(
      finetune_epochs={f'{k:g}': v for k, v in scale.finetune_epochs.items()}),
                 dataset=dict(summary['clips'], classes=list(temporal_dataset.CLASSES)),
                 frame_baseline=base, pretrain_final_loss=pre_loss, runs=runs,
                 gaps={f'{f:g}': runs[f'pretrained_{f:g}']['top1'] - runs[f'scratch_{f:g}']['top1']
                       for f in FRACTIONS})
  if os.path.exists(results_path):  # wall times of phases run by an earlier invocation
    with open(results_path, encoding='utf-8') as f:
      walls = json.load(f).get('wall_s', {}) | walls
  results['wall_s'] = {k: round(v, 1) for k, v in walls.items()}
  results['wall_s_this_invocation'] = round(time.time() - t0, 1)
  with open(results_path, 'w', encoding='utf-8') as f:
    json.dump(results, f, indent=1)
  write_report(out, results)
  _log(f'results in {results_path}, results.md, results.png')
  return results


def _last_loss(metrics_path: str) -> float | None:
  loss = None
  with open(metrics_path, encoding='utf-8') as f:
    for line in f:
      row = json.loads(line)
      if 'loss_avg' in row:
        loss = row['loss_avg']
  return loss


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--out', required=True, help='experiment directory (re-run to continue)')
  p.add_argument('--scale', default='full', choices=sorted(SCALES))
  p.add_argument('--seed', type=int, default=0)
  a = p.parse_args(argv)
  results = run(a.out, a.scale, a.seed)
  with open(os.path.join(a.out, 'results.md'), encoding='utf-8') as f:
    print(f.read())
  return results


if __name__ == '__main__':
  main()
