"""RandAugment on the device vs timm's PIL ops and policy parser; one draw for every frame."""
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from tests import reference_augment as ref
from videomae_jax.augment import randaugment as ra

# One compiled program per op name (and shape), rather than op-by-op dispatch.
apply_op = jax.jit(ra.apply_op, static_argnames="name")
level_to_arg = jax.jit(ra.level_to_arg, static_argnames="name")

POLICIES = ["rand-m7-n4-mstd0.5-inc1", "rand-m9-mstd0.5", "rand-m9-n3-mstd101",
            "rand-n2-m10-inc0-p0.7", "rand-m5-mmax15-n1", "rand-foo-m3-mstd1"]


@pytest.fixture(scope="module")
def aa():
  return ref.timm_file("auto_augment")


@pytest.fixture(scope="module")
def frames():
  return ref.real_frames(3)


def test_policy_parse_matches_timm(aa):
  for s in POLICIES:
    t = aa.rand_augment_transform(s, {})
    p = ra.parse_policy(s)
    assert p.num_layers == t.num_layers, s
    assert p.ops == tuple(op.name for op in t.ops), s
    op = t.ops[0]
    assert (p.prob, p.magnitude, p.magnitude_std) == (op.prob, op.magnitude, op.magnitude_std), s
    assert p.magnitude_max == (op.magnitude_max or ra.LEVEL_DENOM), s
  p = ra.parse_policy("rand-m7-n4-mstd0.5-inc1")
  assert (p.magnitude, p.num_layers, p.magnitude_std, p.increasing) == (7, 4, 0.5, True)
  for bad in ("randx-m7", "rand-q7", "rand-m7.5", "rand-tweights", "rand-n-1"):
    with pytest.raises(ValueError):
      ra.parse_policy(bad)


def test_level_to_arg_matches_timm(aa):
  for name in ra.RAND_TRANSFORMS + ra.RAND_INCREASING_TRANSFORMS:
    fn = aa.LEVEL_TO_ARG[name]
    for level in (0.0, 2.3, 5.5, 7.3, 9.9, 10.0):
      for u, sign in ((0.9, -1.0), (0.1, 1.0)):  # timm negates when random() > 0.5
        real = aa.random.random
        aa.random.random = lambda: u
        try:
          want = fn(level, {})[0] if fn is not None else 0.0
        finally:
          aa.random.random = real
        got = float(ra.level_to_arg(name, level, sign))
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=f"{name} {level}")


# (op, argument): the drawn argument ranges of m7 +- a few sigma, both signs.
OPS = [("AutoContrast", 0), ("Equalize", 0), ("Invert", 0), ("Posterize", 2), ("Posterize", 1),
       ("Solarize", 179), ("Solarize", 77), ("SolarizeAdd", 77), ("Color", 0.37),
       ("Color", 1.63), ("Contrast", 0.37), ("Contrast", 1.63), ("Brightness", 0.37),
       ("Brightness", 1.63), ("Sharpness", 0.37), ("Sharpness", 1.63), ("Rotate", 21.3),
       ("Rotate", -17.0), ("ShearX", 0.21), ("ShearY", -0.19), ("TranslateXRel", 0.315),
       ("TranslateYRel", -0.3)]
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


def test_each_op_matches_pil(aa, frames):
  """Point and colour ops are exact (AutoContrast: PIL's double-precision table can sit one
  below an exact integer); bilinear warps are off by at most 1 where float32 and PIL's double
  coordinates truncate on either side of an integer."""
  kw = dict(fillcolor=ra.FILL, resample=Image.BILINEAR)
  for name, arg in OPS:
    fn = aa.NAME_TO_OP[name]
    want = np.stack([np.asarray(fn(Image.fromarray(f), *(() if name in (
        "AutoContrast", "Equalize", "Invert") else (arg,)), **kw)) for f in frames])
    got = np.asarray(apply_op(jnp.asarray(frames), name=name, arg=arg))
    assert got.dtype == np.uint8 and got.shape == frames.shape
    d = np.abs(got.astype(int) - want.astype(int))
    assert (want != frames).mean() > 0.02, name  # the op did something
    if name in GEOMETRIC:
      assert d.max() <= 1 and d.mean() < 0.05, (name, d.max(), d.mean())
    elif name == "AutoContrast":
      assert d.max() <= 1 and (d > 0).mean() < 1e-3, (name, d.max(), (d > 0).mean())
    else:
      assert d.max() == 0, (name, d.max())


def test_equalize_and_autocontrast_edge_cases(aa):
  """A flat frame, a two-level frame and a frame whose top bin holds most pixels."""
  f = np.zeros((3, 8, 8, 3), np.uint8)
  f[0] = 77
  f[1, :, :4] = 10
  f[1, :, 4:] = 200
  f[2] = 250
  f[2, 0, :3] = (3, 90, 180)
  for name in ("Equalize", "AutoContrast"):
    want = np.stack([np.asarray(aa.NAME_TO_OP[name](Image.fromarray(x))) for x in f])
    np.testing.assert_array_equal(np.asarray(apply_op(jnp.asarray(f), name=name, arg=0)), want,
                                  name)


def test_posterize_zero_bits_is_black():
  # PosterizeIncreasing at magnitude 10 keeps 0 bits: black, as PIL before Pillow 10 (newer
  # Pillow raises on it).
  assert float(ra.level_to_arg("PosterizeIncreasing", 10.0)) == 0
  x = jnp.full((3, 8, 8, 3), 200, jnp.uint8)
  assert int(apply_op(x, name="Posterize", arg=0).max()) == 0


@pytest.mark.parametrize("increasing", [True, False])
def test_drawn_op_equals_named_op(frames, increasing):
  """The traced layer (an op index under jit) applies exactly the op it names."""
  policy = ra.Policy(increasing=increasing, num_layers=1)
  run = jax.jit(lambda c, d: ra.apply_draw(c, d, policy))
  clip = jnp.asarray(frames)
  for i, name in enumerate(policy.ops):
    level, sign = (7.3, -1.0) if i % 2 else (3.1, 1.0)
    d = ra.Draw(jnp.array([i]), jnp.array([True]), jnp.array([level]), jnp.array([sign]))
    want = apply_op(clip, name=name, arg=level_to_arg(name=name, level=level, sign=sign))
    np.testing.assert_array_equal(np.asarray(run(clip, d)), np.asarray(want), err_msg=name)
  skipped = ra.Draw(jnp.array([3]), jnp.array([False]), jnp.array([7.0]), jnp.array([1.0]))
  np.testing.assert_array_equal(np.asarray(run(clip, skipped)), np.asarray(clip))


def test_one_draw_for_every_frame(frames):
  policy = "rand-m9-n2-mstd0.5-inc1-p1.0"
  clip = jnp.asarray(frames[:, :48, :64])
  per_clip = jax.jit(lambda c, d: ra.apply_draw(c, d, policy))
  draw = jax.jit(lambda k: ra.draw(k, policy))
  for seed in range(4):
    d = draw(jax.random.key(seed))
    out = np.asarray(per_clip(clip, d))
    assert (out != np.asarray(clip)).mean() > 0.1
    # A clip of distinct frames = each frame augmented alone with the same draw.
    alone = np.concatenate([np.asarray(per_clip(clip[i:i + 1], d)) for i in range(3)])
    np.testing.assert_array_equal(out, alone)
    # A clip of one repeated frame stays one repeated frame.
    same = np.asarray(per_clip(jnp.repeat(clip[:1], 3, axis=0), d))
    assert (same == same[:1]).all()


def test_rand_augment_under_vmap_draws_per_clip(frames):
  policy = "rand-m7-n2-mstd0.5-inc1"
  clips = jnp.asarray(np.repeat(frames[None, :2, :48, :64], 8, axis=0))
  run = jax.jit(jax.vmap(lambda k, c: ra.rand_augment(k, c, policy)))
  keys = jax.random.split(jax.random.key(0), 8)
  out = np.asarray(run(keys, clips))
  assert out.dtype == np.uint8 and out.shape == clips.shape
  distinct = {o.tobytes() for o in out}
  assert len(distinct) >= 6, len(distinct)
  np.testing.assert_array_equal(np.asarray(run(keys, clips)), out)  # deterministic per key


def test_draw_statistics_match_timm_sampling():
  """Ops uniform with replacement, each applied with p, magnitude N(7, 0.5) clipped to [0, 10],
  signs fair (loose bounds over 4000 seeded draws of 4 layers)."""
  p = ra.parse_policy("rand-m7-n4-mstd0.5-inc1")
  d = jax.jit(jax.vmap(lambda k: ra.draw(k, p)))(jax.random.split(jax.random.key(1), 4000))
  ops = np.bincount(np.asarray(d.op).ravel(), minlength=15) / d.op.size
  assert ops.shape == (15,) and np.abs(ops - 1 / 15).max() < 0.015, ops
  assert abs(float(d.applied.mean()) - 0.5) < 0.02
  level = np.asarray(d.level)
  assert abs(level.mean() - 7) < 0.03 and abs(level.std() - 0.5) < 0.03
  assert level.min() >= 0 and level.max() <= 10
  assert abs(float((d.sign < 0).mean()) - 0.5) < 0.02
  u = jax.jit(jax.vmap(lambda k: ra.draw(k, "rand-m6-n2-mstd200")))(
      jax.random.split(jax.random.key(2), 2000))
  assert float(u.level.min()) >= 0 and float(u.level.max()) <= 6
  assert abs(float(u.level.mean()) - 3) < 0.15  # mstd > 100: uniform(0, m)
  # timm's random draws use Python's random; only the distribution can be compared.
  random.seed(0)
  g = np.clip([random.gauss(7, 0.5) for _ in range(4000)], 0, 10)
  assert abs(g.mean() - level.mean()) < 0.05
