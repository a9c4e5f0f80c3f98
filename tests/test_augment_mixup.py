"""Mixup / CutMix and label smoothing vs timm's Mixup; the whole batch augmentation on a
batch-sharded input; the augmentation config's validation."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import reference_augment as ref
from videomae_jax.augment import (MixParams, augment_batch, box_lam, cutmix_box,
                                  default_aug_config, draw_mix_params, mixup_cutmix,
                                  mixup_cutmix_groups, mixup_cutmix_with, smooth_one_hot,
                                  validate_aug_config)
from videomae_jax.normalization import normalize

B, T, H, W, C, K = 6, 4, 20, 24, 3, 10
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def timm_mixup():
  return ref.timm_file("mixup")


def _timm_run(module, x_bcthw, labels, seed, **kw):
  """timm's Mixup on a (B, C, T, H, W) video with np.random seeded; returns (video, targets,
  lam, box or None). timm 1.0 boxes `x[:, :, yl:yh, xl:xh]`, i.e. dims 2 and 3, so the video is
  passed as (B, C*T, H, W): the same box on every frame, as the official VideoMAE copy does
  with `x[..., yl:yh, xl:xh]` on the 5-D video."""
  import torch
  mix = module.Mixup(num_classes=K, **kw)
  seen = {}
  real_bbox = module.cutmix_bbox_and_lam

  def bbox(*a, **k):
    seen["box"], lam = real_bbox(*a, **k)
    return seen["box"], lam

  real_mix = mix._mix_batch
  mix._mix_batch = lambda x: seen.setdefault("lam", real_mix(x))
  module.cutmix_bbox_and_lam = bbox
  try:
    np.random.seed(seed)
    x = torch.tensor(x_bcthw).reshape(x_bcthw.shape[0], -1, H, W)
    out, target = mix(x, torch.tensor(labels))
  finally:
    module.cutmix_bbox_and_lam = real_bbox
  return (out.reshape(x_bcthw.shape).numpy(), target.numpy(), float(seen["lam"]),
          seen.get("box"))


def _data(seed, b=B):
  rng = np.random.default_rng(seed)
  video = rng.normal(size=(b, T, H, W, C)).astype(np.float32)  # ours: channels-last
  labels = rng.integers(0, K, size=b)
  return video, labels


def _to_timm(video):
  return np.ascontiguousarray(video.transpose(0, 4, 1, 2, 3))  # (B, C, T, H, W)


def _from_timm(video):
  return video.transpose(0, 2, 3, 4, 1)


CONFIGS = {
    "mixup": dict(mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.1),
    "cutmix": dict(mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.1),
    "both": dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.1),
    "half_prob": dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.5, label_smoothing=0.0),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_core_equals_timm_for_its_lambda_and_box(timm_mixup, name):
  kinds = set()
  for seed in range(6):
    video, labels = _data(seed)
    want_x, want_y, lam, box = _timm_run(timm_mixup, _to_timm(video), labels, seed,
                                         **CONFIGS[name])
    kinds.add("off" if lam == 1.0 else "cut" if box is not None else "mix")
    box = None if box is None else tuple(int(b) for b in box)
    x, y = mixup_cutmix_with(jnp.asarray(video), jnp.asarray(labels), lam=lam, box=box,
                             num_classes=K, smoothing=CONFIGS[name]["label_smoothing"])
    np.testing.assert_allclose(np.asarray(x), _from_timm(want_x), atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(y), want_y, atol=1e-6, rtol=0)
  expected = {"mixup": {"mix"}, "cutmix": {"cut"}, "both": {"mix", "cut"},
              "half_prob": {"off", "mix", "cut"}}[name]
  assert expected <= kinds, kinds  # the seeds cover every branch


def test_groups_equal_timm_on_each_half(timm_mixup):
  video, labels = _data(10, b=8)
  halves = [_timm_run(timm_mixup, _to_timm(video[i:i + 4]), labels[i:i + 4], seed,
                      **CONFIGS["both"]) for i, seed in ((0, 2), (4, 1))]
  assert {h[3] is None for h in halves} == {True, False}  # one mixup half, one cutmix half
  lam = jnp.array([h[2] for h in halves], jnp.float32)
  boxes = [tuple(int(b) for b in h[3]) if h[3] is not None else (0, 0, 0, 0) for h in halves]
  params = MixParams(lam, jnp.array([h[3] is not None for h in halves]),
                     tuple(jnp.array(v) for v in zip(*boxes)))
  x, y = mixup_cutmix_groups(jnp.asarray(video), jnp.asarray(labels), params, num_classes=K,
                             smoothing=0.1)
  np.testing.assert_allclose(np.asarray(x),
                             _from_timm(np.concatenate([h[0] for h in halves])), atol=1e-6)
  np.testing.assert_allclose(np.asarray(y), np.concatenate([h[1] for h in halves]), atol=1e-6)


def test_cutmix_box_equals_timm_rand_bbox(timm_mixup):
  for seed, lam in enumerate([0.05, 0.3, 0.5, 0.77, 0.93, 0.999]):
    np.random.seed(seed)
    want_box, want_lam = timm_mixup.cutmix_bbox_and_lam((B, C, T, H, W), lam)
    np.random.seed(seed)  # replay timm's two draws of the centre
    cy, cx = np.random.randint(0, H), np.random.randint(0, W)
    box = cutmix_box(lam, cy, cx, H, W)
    assert tuple(int(b) for b in box) == tuple(int(b) for b in want_box), lam
    np.testing.assert_allclose(float(box_lam(box, H, W)), want_lam, atol=1e-7)


def test_label_smoothing_alone_equals_timm(timm_mixup):
  import torch
  labels = np.array([0, 3, 9, 3])
  for s in (0.0, 0.1, 0.3):
    want = timm_mixup.mixup_target(torch.tensor(labels), K, lam=1.0, smoothing=s).numpy()
    got = np.asarray(smooth_one_hot(jnp.asarray(labels), K, s))
    np.testing.assert_allclose(got, want, atol=1e-7)
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-6)


@pytest.fixture(scope="module")
def draws():
  """4000 seeded draws of draw_mix_params (prob 0.6, both alphas on)."""
  draw = jax.jit(jax.vmap(lambda k: draw_mix_params(k, H, W, mixup_alpha=0.8, cutmix_alpha=1.0,
                                                    prob=0.6, switch_prob=0.5)))
  return draw(jax.random.split(jax.random.key(0), 4000))


def test_draws_follow_timms_distribution(draws):
  lam, cut = np.asarray(draws.lam), np.asarray(draws.use_cutmix)
  off = (lam == 1.0) & ~cut  # (a CutMix box can also be empty: lam 1 after correction)
  assert abs(off.mean() - 0.4) < 0.03                    # prob
  assert abs(cut[~off].mean() - 0.5) < 0.03              # switch_prob
  mix = ~off & ~cut
  assert abs(lam[mix].mean() - 0.5) < 0.02               # Beta(0.8, 0.8) is symmetric
  assert abs(lam[mix].var() - 1 / (4 * 2.6)) < 0.01      # var = 1 / (4 (2a + 1))
  yl, yh, xl, xh = (np.asarray(b) for b in draws.box)
  area = (yh - yl) * (xh - xl)
  np.testing.assert_allclose(lam[cut], 1 - area[cut] / (H * W), atol=1e-6)  # corrected lam
  assert ((yl >= 0) & (yh <= H) & (xl >= 0) & (xh <= W)).all()


def test_groups_mix_only_within_themselves(draws):
  video = jnp.concatenate([jnp.ones((4, T, H, W, C)), -jnp.ones((4, T, H, W, C))])
  labels = jnp.array([0, 1, 2, 3, 4, 5, 6, 7])
  mix = jax.jit(lambda v, y, p: mixup_cutmix_groups(v, y, p, num_classes=K, smoothing=0.0))
  mixing = np.nonzero(np.asarray(draws.lam) < 0.9)[0]
  for i, j in ((0, 1), (2, 3), (4, 5)):  # pairs of draws, one per group
    p = jax.tree.map(lambda a: a[jnp.array([mixing[i], mixing[j]])], draws)
    x, y = mix(video, labels, p)
    assert (np.asarray(x[:4]) == 1).all() and (np.asarray(x[4:]) == -1).all()
    y = np.asarray(y)
    assert (y[:4, 4:] == 0).all() and (y[4:, :4] == 0).all()
    np.testing.assert_allclose(y.sum(1), 1.0, atol=1e-6)
    np.testing.assert_allclose(y[[0, 4], [0, 4]], np.asarray(p.lam), atol=1e-6)
  # One group over the same batch: the halves mix with each other.
  x, _ = mix(video, labels, jax.tree.map(lambda a: a[jnp.array([mixing[0]])], draws))
  assert not (np.asarray(x[:4]) == 1).all()
  with pytest.raises(ValueError):
    mixup_cutmix(jax.random.key(0), video, labels, num_classes=K, mixup_alpha=0.8,
                 cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, smoothing=0.0, num_groups=3)


def test_validate_aug_config_names_the_field():
  validate_aug_config(default_aug_config())
  for field, value, needle in [
      ("randaugment", "rand-m7-q3", "config.aug.randaugment"),
      ("randaugment", "augmix-m3", "config.aug.randaugment"),
      ("reprob", 1.5, "config.aug.reprob"), ("mixup_prob", -0.1, "config.aug.mixup_prob"),
      ("switch_prob", 2.0, "config.aug.switch_prob"), ("remode", "blur", "config.aug.remode"),
      ("recount", 0, "config.aug.recount"), ("mixup", -1.0, "config.aug.mixup"),
      ("mixup_mode", "pair", "not supported"), ("mixup_mode", "foo", "config.aug.mixup_mode"),
      ("smoothing", 1.0, "config.aug.smoothing")]:
    c = default_aug_config()
    c[field] = value
    with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
      validate_aug_config(c)
  c = default_aug_config()
  c.randaugment = ""
  validate_aug_config(c)


# augment_batch on 2 simulated CPU devices (XLA_FLAGS must be set before jax starts), in a
# subprocess; the test process computes the same batch unsharded meanwhile.
_SHARDED = r"""
import hashlib, json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tests.test_augment_mixup import sharded_case
assert jax.device_count() == 2
fn, key, video, labels = sharded_case()
mesh = Mesh(np.array(jax.devices()), ("data",))
batch = NamedSharding(mesh, P("data"))
step = jax.jit(fn, in_shardings=(NamedSharding(mesh, P()), batch, batch),
               out_shardings=(batch, batch))
x, y = step(key, jax.device_put(video, batch), jax.device_put(labels, batch))
digest = lambda a: hashlib.sha256(np.asarray(a, np.float32).tobytes()).hexdigest()
print(json.dumps(dict(devices=len(x.sharding.device_set), x=digest(x), y=digest(y))))
"""


def sharded_case():
  """(fn, key, video, labels) of the sharded test: the default recipe (one RandAugment layer to
  keep compilation short), 2 mixup groups, bfloat16 output."""
  cfg = default_aug_config()
  cfg.randaugment = "rand-m7-n1-mstd0.5-inc1"
  rng = np.random.default_rng(0)
  video = rng.integers(0, 256, (4, 4, 32, 32, 3), dtype=np.uint8)
  labels = np.array([1, 5, 2, 7], np.int32)

  def fn(r, v, lab):
    return augment_batch(r, v, lab, cfg, num_classes=K, dtype=jnp.bfloat16, num_groups=2)

  return fn, jax.random.key(3), video, labels


def test_augment_batch_on_a_batch_sharded_input():
  import hashlib
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  proc = subprocess.Popen([sys.executable, "-c", _SHARDED], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    fn, key, video, labels = sharded_case()
    x, y = jax.jit(fn)(key, video, labels)
    assert x.shape == video.shape and x.dtype == jnp.bfloat16 and y.shape == (4, K)
    np.testing.assert_allclose(np.asarray(y).sum(1), 1.0, atol=1e-6)
    plain = normalize(jnp.asarray(video), jnp.bfloat16)
    assert float(jnp.mean(x != plain)) > 0.1  # augmented
    stdout, stderr = proc.communicate(timeout=300)
  finally:
    proc.kill()
  assert proc.returncode == 0, stderr[-4000:]
  out = json.loads(stdout.strip().splitlines()[-1])
  assert out["devices"] == 2
  digest = lambda a: hashlib.sha256(np.asarray(a, np.float32).tobytes()).hexdigest()
  # Sharding the batch over devices changes nothing: same keys, same clips, same mixing.
  assert out["x"] == digest(x) and out["y"] == digest(y)
