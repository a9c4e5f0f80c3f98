"""RandAugment on uint8 video clips, on the device.

timm's ``rand_augment_transform`` policy strings ('rand-m7-n4-mstd0.5-inc1') and PIL's op
semantics, with the official VideoMAE twist: one draw of ops, magnitudes and signs per clip,
applied to every frame (its ``rand_augment.py`` maps one ``AugmentOp`` call over the list of
frames). Data-dependent ops (AutoContrast, Equalize, Contrast) use each frame's own statistics,
as PIL does frame by frame.

Every op computes in float32 (or exact integers) and rounds like PIL, and the clip is uint8
between layers, so chained ops see uint8 images as in the reference. Geometric ops resample bilinearly with PIL's conventions
(pixel centres at +0.5, edge clamping, fill where the sample point leaves the image); the
official fine-tuning passes ``--train_interpolation bicubic``, so geometric ops differ from it
by the interpolation kernel. Under ``vmap`` the op choice is a select: every layer evaluates
one lookup-table op, one blend op and one warp, and keeps the drawn one.
"""
from __future__ import annotations

import functools
import math
import re
from typing import NamedTuple

import dm_pix
import jax
import jax.numpy as jnp

# timm's _LEVEL_DENOM: magnitudes are on a 0..10 scale.
LEVEL_DENOM = 10.0
# The official VideoMAE `create_random_augment` passes no `img_mean`, so its AugmentOps fall
# back to timm's _FILL (timm's own ImageNet training passes the mean, (124, 116, 104)).
FILL = (128, 128, 128)

# timm's _RAND_TRANSFORMS / _RAND_INCREASING_TRANSFORMS, in timm's order (the drawn index
# refers to this order).
RAND_TRANSFORMS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
    "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
    "TranslateYRel")
RAND_INCREASING_TRANSFORMS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
    "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
    "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
    "TranslateYRel")

# Op families by base name (the 'Increasing' variants differ only in level -> argument).
_LUT_OPS = ("AutoContrast", "Equalize", "Invert", "Posterize", "Solarize", "SolarizeAdd",
            "Contrast", "Brightness")
_BLEND_OPS = ("Color", "Sharpness")
_WARP_OPS = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


class Policy(NamedTuple):
  """A parsed RandAugment policy string (timm's meaning of each field)."""
  magnitude: float = LEVEL_DENOM
  num_layers: int = 2
  prob: float = 0.5
  magnitude_std: float = 0.0      # 0: fixed; inf: uniform(0, magnitude)
  magnitude_max: float = LEVEL_DENOM
  increasing: bool = False

  @property
  def ops(self) -> tuple[str, ...]:
    return RAND_INCREASING_TRANSFORMS if self.increasing else RAND_TRANSFORMS


@functools.lru_cache(maxsize=None)
def parse_policy(policy: str) -> Policy:
  """Parses 'rand-m9-n2-mstd0.5-inc1-p0.5-mmax10' exactly as timm 1.0's
  ``rand_augment_transform`` does; raises ValueError for what timm rejects and for transform
  sets ('t...') other than the default ones."""
  sections = policy.split("-")
  if sections[0] != "rand":
    raise ValueError(f"RandAugment policy {policy!r} must start with 'rand-'")
  magnitude, num_layers, prob = LEVEL_DENOM, 2, 0.5
  mstd, mmax, increasing = 0.0, None, False
  for c in sections[1:]:
    if c.startswith("t"):
      raise ValueError(f"RandAugment policy {policy!r}: transform set {c[1:]!r} is not "
                       "supported (only the default, uniform op sets)")
    cs = re.split(r"(\d.*)", c)
    if len(cs) < 2:
      continue  # timm skips sections without a number
    key, val = cs[:2]
    try:
      if key == "mstd":
        mstd = float(val)
        if mstd > 100:
          mstd = math.inf
      elif key == "mmax":
        mmax = int(val)
      elif key == "inc":
        increasing = bool(int(val))
      elif key == "m":
        magnitude = int(val)
      elif key == "n":
        num_layers = int(val)
      elif key == "p":
        prob = float(val)
      else:
        raise ValueError(f"unknown section {c!r}")
    except ValueError as e:
      raise ValueError(f"RandAugment policy {policy!r}: {e}") from None
  if num_layers < 0 or mstd < 0:
    raise ValueError(f"RandAugment policy {policy!r}: negative n or mstd")
  # timm: `upper_bound = magnitude_max or _LEVEL_DENOM` (0 falls back to 10).
  return Policy(float(magnitude), num_layers, prob, mstd, float(mmax or LEVEL_DENOM),
                increasing)


# ---------------------------------------------------------------- level -> op argument


def level_to_arg(name: str, level, sign=1.0) -> jax.Array:
  """timm's LEVEL_TO_ARG for ``name`` at magnitude ``level``; ``sign`` (+1 / -1) is the draw
  of ``_randomly_negate`` (ignored by unsigned ops). float32 scalar."""
  level = jnp.asarray(level, jnp.float32)
  sign = jnp.asarray(sign, jnp.float32)
  frac = level / LEVEL_DENOM
  if name in ("AutoContrast", "Equalize", "Invert"):
    return jnp.zeros((), jnp.float32)
  if name == "Rotate":
    return sign * (frac * 30.0)
  if name in ("ShearX", "ShearY"):
    return sign * (frac * 0.3)
  if name in ("TranslateXRel", "TranslateYRel"):
    return sign * (frac * 0.45)
  if name == "Posterize":
    return jnp.floor(frac * 4.0)
  if name == "PosterizeIncreasing":
    return 4.0 - jnp.floor(frac * 4.0)
  if name == "Solarize":
    return jnp.minimum(256.0, jnp.floor(frac * 256.0))
  if name == "SolarizeIncreasing":
    return 256.0 - jnp.minimum(256.0, jnp.floor(frac * 256.0))
  if name == "SolarizeAdd":
    return jnp.minimum(128.0, jnp.floor(frac * 110.0))
  if name in ("Color", "Contrast", "Brightness", "Sharpness"):
    return frac * 1.8 + 0.1
  if name in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
              "SharpnessIncreasing"):
    return jnp.maximum(0.1, 1.0 + sign * (frac * 0.9))
  raise ValueError(f"unknown RandAugment op {name!r}")


def _base(name: str) -> str:
  return name[:-len("Increasing")] if name.endswith("Increasing") else name


# ---------------------------------------------------------------- PIL primitives
# Clips are (T, H, W, 3) float32 holding integers 0..255.


def _gray(x: jax.Array) -> jax.Array:
  """PIL's RGB -> L conversion (ITU-R 601-2 in 16-bit fixed point), int32 (T, H, W)."""
  xi = x.astype(jnp.int32)
  return (xi[..., 0] * 19595 + xi[..., 1] * 38470 + xi[..., 2] * 7471 + 0x8000) >> 16


def _blend(degenerate: jax.Array, x: jax.Array, factor) -> jax.Array:
  """PIL's Image.blend(degenerate, x, factor): float32 interpolation, clipped, truncated."""
  f = jnp.asarray(factor, jnp.float32)
  return jnp.floor(jnp.clip(degenerate + f * (x - degenerate), 0.0, 255.0))


def _smooth(x: jax.Array) -> jax.Array:
  """PIL's ImageFilter.SMOOTH (3x3 [1 1 1; 1 5 1; 1 1 1] / 13, rounded); the 1-pixel border is
  left as it is, as PIL does."""
  t, h, w, c = x.shape
  box = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), "SAME")
  s = jnp.floor(jnp.clip((box + 4.0 * x) / 13.0 + 0.5, 0.0, 255.0))
  rows = jnp.arange(h)[:, None]
  cols = jnp.arange(w)[None, :]
  inner = (rows > 0) & (rows < h - 1) & (cols > 0) & (cols < w - 1)
  return jnp.where(inner[None, :, :, None], s, x)


def _histogram(x: jax.Array) -> jax.Array:
  """Per-frame, per-channel 256-bin histograms, int32 (T, 3, 256)."""
  t, h, w, c = x.shape
  xi = x.astype(jnp.int32)
  bins = xi + 256 * (jnp.arange(c, dtype=jnp.int32) + c * jnp.arange(t, dtype=jnp.int32)[
      :, None, None, None])
  counts = jnp.zeros((t * c * 256,), jnp.int32).at[bins.reshape(-1)].add(1)
  return counts.reshape(t, c, 256)


def _apply_lut(x: jax.Array, lut: jax.Array) -> jax.Array:
  """x (T, H, W, C) -> lut[t, c, x] with lut (T, C, 256)."""
  t, h, w, c = x.shape
  idx = x.astype(jnp.int32) + 256 * (jnp.arange(c, dtype=jnp.int32) + c * jnp.arange(
      t, dtype=jnp.int32)[:, None, None, None])
  return jnp.take(lut.reshape(-1), idx.reshape(-1)).reshape(x.shape)


_V = jnp.arange(256, dtype=jnp.float32)  # the identity table


def _autocontrast_lut(hist: jax.Array) -> jax.Array:
  """ImageOps.autocontrast (cutoff 0) from (T, C, 256) histograms: stretch each channel's
  [lowest, highest] present value to [0, 255]. Exact integer arithmetic (PIL's double
  `int(ix * scale + offset)` can land one below an exact integer)."""
  present = hist > 0
  lo = jnp.argmax(present, axis=-1)[..., None]
  hi = 255 - jnp.argmax(present[..., ::-1], axis=-1)[..., None]
  v = jnp.arange(256, dtype=jnp.int32)
  stretched = jnp.clip((v - lo) * 255 // jnp.maximum(hi - lo, 1), 0, 255)
  return jnp.where(hi > lo, stretched.astype(jnp.float32), _V)


def _equalize_lut(hist: jax.Array) -> jax.Array:
  """ImageOps.equalize from (T, C, 256) histograms: lut[i] = (step // 2 + #pixels below i) //
  step with step = (#pixels - #pixels in the top non-empty bin) // 255; identity when step is
  0 (which includes a single non-empty bin)."""
  total = jnp.sum(hist, axis=-1, keepdims=True)
  last = 255 - jnp.argmax((hist > 0)[..., ::-1], axis=-1)[..., None]
  top = jnp.take_along_axis(hist, last, axis=-1)
  step = (total - top) // 255
  below = jnp.cumsum(hist, axis=-1) - hist
  lut = (step // 2 + below) // jnp.maximum(step, 1)
  # PIL's point() clips table entries to 0..255.
  lut = jnp.clip(lut, 0, 255).astype(jnp.float32)
  return jnp.where(step > 0, lut, _V)


def _posterize_lut(bits) -> jax.Array:
  # bits = 0 keeps nothing (black), as PIL did before Pillow 10 rejected it.
  shift = (8 - jnp.asarray(bits, jnp.float32)).astype(jnp.int32)
  v = jnp.arange(256, dtype=jnp.int32)
  return ((v >> shift) << shift).astype(jnp.float32)


def _solarize_lut(threshold) -> jax.Array:
  # dm_pix.solarize works on [0, 1] images; the division keeps every comparison exact.
  out = dm_pix.solarize(_V / 255.0, jnp.asarray(threshold, jnp.float32) / 255.0)
  return jnp.round(out * 255.0)


def _solarize_add_lut(add) -> jax.Array:
  return jnp.where(_V < 128.0, jnp.minimum(255.0, _V + add), _V)


def _contrast_lut(x: jax.Array, factor) -> jax.Array:
  """ImageEnhance.Contrast: blend with the frame's mean grey level, int(mean + 0.5)."""
  g = _gray(x)
  n = g.shape[1] * g.shape[2]
  mean = (2 * jnp.sum(g, axis=(1, 2)) + n) // (2 * n)  # (T,)
  mean = mean.astype(jnp.float32)[:, None, None]
  return jnp.broadcast_to(_blend(mean, _V, factor), (x.shape[0], x.shape[-1], 256))


def _lut_for(base: str, x: jax.Array, arg, hist: jax.Array | None = None) -> jax.Array:
  """The (T, C, 256) table of a point op (``hist``: the clip's histograms, if computed)."""
  t, c = x.shape[0], x.shape[-1]

  def per_frame(table):
    return jnp.broadcast_to(table, (t, c, 256))

  if base in ("AutoContrast", "Equalize"):
    hist = _histogram(x) if hist is None else hist
    return _autocontrast_lut(hist) if base == "AutoContrast" else _equalize_lut(hist)
  if base == "Invert":
    return per_frame(255.0 - _V)
  if base == "Posterize":
    return per_frame(_posterize_lut(arg))
  if base == "Solarize":
    return per_frame(_solarize_lut(arg))
  if base == "SolarizeAdd":
    return per_frame(_solarize_add_lut(arg))
  if base == "Contrast":
    return _contrast_lut(x, arg)
  if base == "Brightness":
    return per_frame(_blend(0.0, _V, arg))
  raise ValueError(base)


def _affine_coefs(base: str, arg, height: int, width: int) -> jax.Array:
  """PIL's output -> input affine (a, b, c, d, e, f) of each geometric op."""
  arg = jnp.asarray(arg, jnp.float32)
  one, zero = jnp.ones((), jnp.float32), jnp.zeros((), jnp.float32)
  if base == "Rotate":
    # Image.rotate(angle) about (w / 2, h / 2), expand=False.
    theta = -jnp.deg2rad(arg)
    a, b = jnp.cos(theta), jnp.sin(theta)
    d, e = -jnp.sin(theta), jnp.cos(theta)
    cx, cy = width / 2.0, height / 2.0
    c = a * -cx + b * -cy + cx
    f = d * -cx + e * -cy + cy
    return jnp.stack([a, b, c, d, e, f])
  if base == "ShearX":
    return jnp.stack([one, arg, zero, zero, one, zero])
  if base == "ShearY":
    return jnp.stack([one, zero, zero, arg, one, zero])
  if base == "TranslateXRel":
    return jnp.stack([one, zero, arg * width, zero, one, zero])
  if base == "TranslateYRel":
    return jnp.stack([one, zero, zero, zero, one, arg * height])
  raise ValueError(base)


def _warp(x: jax.Array, coefs: jax.Array, fill) -> jax.Array:
  """PIL's Image.transform(AFFINE, BILINEAR, fillcolor=fill) of every frame with one map.

  Output pixel (i, j) samples the input at (a, b, c, d, e, f) . (j + .5, i + .5, 1); outside
  [0, W) x [0, H) it takes ``fill``; inside, bilinear with clamped neighbours, truncated."""
  t, h, w, ch = x.shape
  a, b, c, d, e, f = (coefs[k] for k in range(6))
  u = jnp.arange(w, dtype=jnp.float32)[None, :] + 0.5
  v = jnp.arange(h, dtype=jnp.float32)[:, None] + 0.5
  xin = a * u + b * v + c
  yin = d * u + e * v + f
  inside = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)
  xs, ys = xin - 0.5, yin - 0.5
  x0, y0 = jnp.floor(xs), jnp.floor(ys)
  dx, dy = (xs - x0)[None, :, :, None], (ys - y0)[None, :, :, None]
  x0 = x0.astype(jnp.int32)
  y0 = y0.astype(jnp.int32)
  xa, xb = jnp.clip(x0, 0, w - 1), jnp.clip(x0 + 1, 0, w - 1)
  ya, yb = jnp.clip(y0, 0, h - 1), jnp.clip(y0 + 1, 0, h - 1)
  flat = x.reshape(t, h * w, ch)

  def at(yy, xx):  # gathers in the clip's own dtype (uint8 in RandAugment's layers)
    return jnp.take(flat, (yy * w + xx).reshape(-1), axis=1).reshape(t, h, w, ch).astype(
        jnp.float32)

  p00, p01, p10, p11 = at(ya, xa), at(ya, xb), at(yb, xa), at(yb, xb)
  top = p00 + (p01 - p00) * dx
  bottom = p10 + (p11 - p10) * dx
  out = jnp.floor(top + (bottom - top) * dy)
  fill = jnp.asarray(fill, jnp.float32)
  return jnp.where(inside[None, :, :, None], out, fill)


def apply_op(clip: jax.Array, name: str, arg, *, fill=FILL) -> jax.Array:
  """One named op with argument ``arg`` (as ``level_to_arg`` gives it) on every frame of a
  (T, H, W, 3) uint8 or integer-valued float clip; returns the clip's dtype."""
  x = clip.astype(jnp.float32)
  base = _base(name)
  if base in _LUT_OPS:
    out = _apply_lut(x, _lut_for(base, x, arg))
  elif base == "Color":
    out = _blend(_gray(x).astype(jnp.float32)[..., None], x, arg)
  elif base == "Sharpness":
    out = _blend(_smooth(x), x, arg)
  elif base in _WARP_OPS:
    out = _warp(x, _affine_coefs(base, arg, x.shape[1], x.shape[2]), fill)
  else:
    raise ValueError(f"unknown RandAugment op {name!r}")
  return out.astype(clip.dtype)


# ---------------------------------------------------------------- the random layer


def _layer(x: jax.Array, names: tuple[str, ...], op, level, sign, fill) -> jax.Array:
  """Applies names[op] (a traced index) at ``level``/``sign`` to a uint8 clip: one table op,
  one blend and one warp are evaluated and the drawn family is kept (a select under vmap).
  Gathers read the uint8 clip and every family's result is uint8, to keep traffic low."""
  bases = [_base(n) for n in names]
  arg = jnp.stack([level_to_arg(n, level, sign) for n in names])[op]

  def member(family):
    return jnp.array([b in family for b in bases])[op]

  def position(family):
    return jnp.array([family.index(b) if b in family else 0 for b in bases], jnp.int32)[op]

  # Table ops: every candidate table is tiny ((T, C, 256)); one gather applies the chosen one.
  lut_ops = tuple(b for b in _LUT_OPS if b in bases)
  hist = _histogram(x) if {"AutoContrast", "Equalize"} & set(lut_ops) else None
  tables = jnp.stack([_lut_for(b, x, arg, hist) for b in lut_ops])
  lut_out = _apply_lut(x, tables[position(lut_ops)].astype(jnp.uint8))
  # Blend ops: the degenerate image is the grey image (Color) or the smoothed one (Sharpness).
  xf = x.astype(jnp.float32)
  gray = _gray(x).astype(jnp.float32)[..., None]
  blend_out = _blend(jnp.where(member(("Color",)), gray, _smooth(xf)), xf, arg)
  # Warps: one bilinear resampling with the chosen op's map.
  warp_ops = tuple(b for b in _WARP_OPS if b in bases)
  coefs = jnp.stack([_affine_coefs(b, arg, x.shape[1], x.shape[2]) for b in warp_ops])
  warp_out = _warp(x, coefs[position(warp_ops)], fill)
  return jnp.where(member(_LUT_OPS), lut_out,
                   jnp.where(member(_BLEND_OPS), blend_out.astype(jnp.uint8),
                             warp_out.astype(jnp.uint8)))


class Draw(NamedTuple):
  """One clip's RandAugment draw, one entry per layer."""
  op: jax.Array       # int32 index into Policy.ops
  applied: jax.Array  # bool
  level: jax.Array    # float32 magnitude after noise and clipping
  sign: jax.Array     # float32 +1 / -1


def draw(rng: jax.Array, policy: str | Policy) -> Draw:
  """The random choices of timm's RandAugment for one image (here: one clip): ops with
  replacement, each applied with ``prob``, magnitude ~ N(m, mstd) (uniform(0, m) for inf)
  clipped to [0, mmax], and the sign of signed ops."""
  p = parse_policy(policy) if isinstance(policy, str) else policy
  n = p.num_layers
  k_uniform, k_normal = jax.random.split(rng)
  # One uniform draw for the scalar choices (fewer RNG calls compile faster).
  u_op, u_apply, u_sign, u_mag = jax.random.uniform(k_uniform, (4, n))
  op = jnp.minimum(jnp.floor(u_op * len(p.ops)).astype(jnp.int32), len(p.ops) - 1)
  applied = jnp.ones((n,), bool) if p.prob >= 1.0 else u_apply <= p.prob
  level = jnp.full((n,), p.magnitude, jnp.float32)
  if math.isinf(p.magnitude_std):
    level = u_mag * p.magnitude
  elif p.magnitude_std > 0:
    level = level + p.magnitude_std * jax.random.normal(k_normal, (n,))
  level = jnp.clip(level, 0.0, p.magnitude_max)
  sign = jnp.where(u_sign > 0.5, -1.0, 1.0)
  return Draw(op, applied, level, sign)


def apply_draw(clip_u8: jax.Array, d: Draw, policy: str | Policy, *, fill=FILL) -> jax.Array:
  """Applies a draw's layers in order to every frame of a (T, H, W, 3) uint8 clip."""
  p = parse_policy(policy) if isinstance(policy, str) else policy
  x = clip_u8.astype(jnp.uint8)
  # Layers are unrolled (n is small) so that cost analysis counts each one; between layers the
  # clip is uint8, as PIL's images are.
  for i in range(p.num_layers):
    x = jnp.where(d.applied[i], _layer(x, p.ops, d.op[i], d.level[i], d.sign[i], fill), x)
  return x


def rand_augment(rng: jax.Array, clip_u8: jax.Array, policy: str | Policy, *,
                 fill=FILL) -> jax.Array:
  """timm RandAugment with ``policy`` on a (T, H, W, 3) uint8 clip: the same ops, magnitudes
  and signs on every frame. Returns uint8. Jittable and vmappable (one key per clip)."""
  p = parse_policy(policy) if isinstance(policy, str) else policy
  if p.num_layers == 0:
    return clip_u8
  return apply_draw(clip_u8, draw(rng, p), p, fill=fill)
