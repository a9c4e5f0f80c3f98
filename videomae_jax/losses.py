"""Reconstruction targets and the masked MSE loss of VideoMAE.

The token geometry (tubelet size t, patch size p) is never assumed. It comes from, in this
order of preference: ``model=`` (anything with ``tubelet_size`` and ``patch_size``), explicit
``tubelet_size``/``patch_size``, the ``grid`` a :class:`~videomae_jax.masking.Mask` carries
(t = T / T', p = H / H'), and last from the shapes alone (the ``(t, p)`` with
``C * t * p * p`` = the predictions' last axis that divide the clip); an ambiguous or
contradictory case is an error naming the candidates.

What a video's values mean is explicit too (``video_space``): uint8 clips are pixels in
[0, 255]; float clips are ImageNet-normalised unless ``video_space="pixels"`` says they are
[0, 255] pixels. A concrete (not traced) float clip that cannot be normalised, e.g. float
[0, 255] pixels passed as normalised, is an error; under jit nothing is checked (no host round
trip), so pass uint8 clips there, as the train step does.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from videomae_jax import masking as masking_lib
from videomae_jax.normalization import IMAGENET_MEAN, IMAGENET_STD, unnormalize

VIDEO_SPACES = ("auto", "pixels", "normalized")


def patchify(video: jax.Array, tubelet_size: int, patch_size: int) -> jax.Array:
  """(B, T, H, W, C) -> (B, N, tubelet*p*p, C), tokens t-major, pixels (dt, dy, dx) within."""
  b, t, h, w, c = video.shape
  kt, p = tubelet_size, patch_size
  if t % kt or h % p or w % p:
    raise ValueError(f"video {video.shape[1:4]} is not divisible into tubelets of "
                     f"{kt}x{p}x{p}")
  x = video.reshape(b, t // kt, kt, h // p, p, w // p, p, c)
  x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
  return x.reshape(b, (t // kt) * (h // p) * (w // p), kt * p * p, c)


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def resolve_geometry(video_shape, *, model: Any = None, tubelet_size: int | None = None,
                     patch_size: int | None = None, grid=None, patch_dim: int | None = None,
                     num_tokens: int | None = None) -> tuple[int, int]:
  """(tubelet_size, patch_size) of clips ``(..., T, H, W, C)``.

  ``model``, ``tubelet_size``/``patch_size`` and ``grid`` (T', H', W') pin the geometry and
  must agree with each other; only when they leave a choice do ``patch_dim`` (the predictions'
  last axis, C*t*p*p) and ``num_tokens`` decide. Raises ValueError when no candidate or more
  than one is left.
  """
  t_len, h, w, c = (int(x) for x in video_shape[-4:])
  given = []
  if model is not None:
    try:
      mt, mp = int(model.tubelet_size), int(model.patch_size)
    except AttributeError:
      raise TypeError(f"model= must have tubelet_size and patch_size, got "
                      f"{type(model).__name__}") from None
    for name, mine, theirs in (("tubelet_size", tubelet_size, mt), ("patch_size", patch_size, mp)):
      if mine is not None and int(mine) != theirs:
        raise ValueError(f"{name}={mine} contradicts the model's {name}={theirs}")
    tubelet_size, patch_size = mt, mp
    given.append(f"the model's tubelet_size={mt}, patch_size={mp}")
  if tubelet_size is not None and patch_size is not None:
    if t_len % tubelet_size or h % patch_size or w % patch_size:
      raise ValueError(f"video {(t_len, h, w)} is not divisible into tubelets of "
                       f"{tubelet_size}x{patch_size}x{patch_size}")
  cands = [(t, p) for t in _divisors(t_len) for p in _divisors(h) if w % p == 0]
  if tubelet_size is not None:
    cands = [(t, p) for t, p in cands if t == int(tubelet_size)]
    if model is None:
      given.append(f"tubelet_size={tubelet_size}")
  if patch_size is not None:
    cands = [(t, p) for t, p in cands if p == int(patch_size)]
    if model is None:
      given.append(f"patch_size={patch_size}")
  if grid is not None:
    g = tuple(int(x) for x in grid)
    cands = [(t, p) for t, p in cands if (t_len // t, h // p, w // p) == g]
    given.append(f"the mask's grid {g}")
  if not cands:
    raise ValueError(f"no tubelet/patch size fits video (T, H, W) = {(t_len, h, w)} with "
                     f"{' and '.join(given)}")
  inferred = []
  if len(cands) > 1 and patch_dim is not None:
    cands = [(t, p) for t, p in cands if c * t * p * p == int(patch_dim)]
    inferred.append(f"predictions of {patch_dim} values per token")
  if len(cands) > 1 and num_tokens is not None:
    cands = [(t, p) for t, p in cands if (t_len // t) * (h // p) * (w // p) == int(num_tokens)]
    inferred.append(f"a mask of {num_tokens} tokens")
  if len(cands) == 1:
    return cands[0]
  what = ", ".join([f"video (T, H, W, C) = {(t_len, h, w, c)}"] + given + inferred)
  how = ("pass model= (anything with tubelet_size and patch_size), tubelet_size= and "
         "patch_size=, or a masking.Mask with its grid (masking.mask_from_bool(masked, grid=))")
  if not cands:
    raise ValueError(f"no tubelet/patch size fits {what}; {how}")
  names = "; ".join(f"tubelet_size={t}, patch_size={p}" for t, p in cands)
  raise ValueError(f"the token geometry is ambiguous for {what}: {names} all fit; {how}")


# ImageNet-normalised pixels lie per channel in [(0 - mean) / std, (1 - mean) / std], about
# [-2.12, 2.64]. Clip means outside that interval, or values far outside it, are not normalised
# pixels (float [0, 255] pixels almost always are); inputs drawn from N(0, 1) pass.
_NORM_LO = (0.0 - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
_NORM_HI = (1.0 - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
_FAR = 16.0


def _check_normalized(video) -> None:
  """Host-side check of a concrete float clip; skipped for traced or multi-host arrays."""
  if isinstance(video, jax.core.Tracer) or getattr(video, "ndim", 5) != 5:
    return
  if isinstance(video, jax.Array):
    if not video.is_fully_addressable:
      return
    # Two reductions on the device, not a copy of the clip; evaluated now even when the
    # caller is tracing a function that closes over the clip.
    with jax.ensure_compile_time_eval():
      v = video.astype(jnp.float32)
      mean = np.asarray(jnp.mean(v, axis=(0, 1, 2, 3)))
      peak = float(jnp.max(jnp.abs(v)))
  else:
    v = np.asarray(video, np.float32)
    mean, peak = v.mean(axis=(0, 1, 2, 3)), float(np.abs(v).max())
  if mean.shape != _NORM_LO.shape:
    return
  if peak > _FAR or (mean < _NORM_LO - 1e-3).any() or (mean > _NORM_HI + 1e-3).any():
    raise ValueError(
        f"the float video is not ImageNet-normalised (channel means {np.round(mean, 3).tolist()}, "
        f"max |value| {peak:.4g}; normalised pixels lie in about [-2.12, 2.64]): pass uint8 "
        "pixels, normalize(video), or video_space='pixels' for float pixels in [0, 255]")


def _to_unit_pixels(tokens: jax.Array, video_space: str) -> jax.Array:
  """Pixels of any video space to the reference's [0, 1] values, float32."""
  if video_space == "pixels" or tokens.dtype == jnp.uint8:
    return tokens.astype(jnp.float32) / 255.0
  return unnormalize(tokens)


def _video_space(video, video_space: str) -> str:
  if video_space not in VIDEO_SPACES:
    raise ValueError(f"video_space={video_space!r}: use one of {VIDEO_SPACES}")
  if np.dtype(video.dtype) == np.uint8:
    if video_space == "normalized":
      raise ValueError("video_space='normalized' but the video is uint8 (pixels in [0, 255])")
    return "pixels"
  if video_space == "auto":
    _check_normalized(video)
    return "normalized"
  return video_space


def _tokens_to_targets(tokens: jax.Array, norm_pix: bool, eps: float,
                       video_space: str) -> jax.Array:
  """(B, K, tubelet*p*p, C) pixels -> (B, K, tubelet*p*p*C) targets."""
  x = _to_unit_pixels(tokens, video_space)
  if norm_pix:
    mean = x.mean(axis=-2, keepdims=True)
    var = x.var(axis=-2, ddof=1, keepdims=True)
    x = (x - mean) / (jnp.sqrt(var) + eps)
  return x.reshape(x.shape[0], x.shape[1], -1)


def targets(video: jax.Array, *, model: Any = None, tubelet_size: int | None = None,
            patch_size: int | None = None, grid=None, norm_pix: bool = True, eps: float = 1e-6,
            video_space: str = "auto") -> jax.Array:
  """Per-token reconstruction targets (B, N, tubelet*p*p*C).

  Pixels are taken to [0, 1]; with ``norm_pix`` every colour channel of a tubelet is
  standardised over its tubelet*p*p pixels with the unbiased std, eps added to the std. The
  result is flattened channel-last: ((dt*p + dy)*p + dx)*C + c.

  Args:
    video: (B, T, H, W, C) uint8 pixels, or floats as ``video_space`` says.
    model, tubelet_size, patch_size, grid: the token geometry (one of them is needed).
    video_space: "auto" (uint8 = pixels in [0, 255], float = ImageNet-normalised, checked when
      concrete), "pixels" ([0, 255] of any dtype) or "normalized".
  """
  if model is None and tubelet_size is None and patch_size is None and grid is None:
    raise ValueError("targets needs the token geometry: pass model=, tubelet_size= and "
                     "patch_size=, or grid=")
  space = _video_space(video, video_space)
  kt, p = resolve_geometry(video.shape, model=model, tubelet_size=tubelet_size,
                           patch_size=patch_size, grid=grid)
  return _tokens_to_targets(patchify(video, kt, p), norm_pix, eps, space)


def reconstruction_loss(video: jax.Array, pred: jax.Array, mask, norm_pix: bool = True, *,
                        model: Any = None, tubelet_size: int | None = None,
                        patch_size: int | None = None, decoder_mask=None,
                        video_space: str = "auto") -> jax.Array:
  """MSE between predictions and targets over the masked tokens, in float32.

  Targets are built for the predicted tokens only (gathered before they are normalised). The
  geometry needs no arguments when ``mask`` (or ``decoder_mask``) is a Mask from this library
  (it carries its grid) or when the shapes allow only one; see the module docs.

  Args:
    video: (B, T, H, W, 3) uint8 clip, or the ImageNet-normalised input fed to the model.
    pred: (B, N_pred, 3*tubelet*p*p) model output, in ascending token order.
    mask: encoder mask, a :class:`~videomae_jax.masking.Mask` or a concrete bool (B, N).
    norm_pix: per-tubelet normalised targets (the reference default).
    model, tubelet_size, patch_size: the token geometry, when the mask does not carry it.
    decoder_mask: VideoMAE V2 decoder mask (a Mask or a concrete bool (B, N), True = dropped);
      predictions then cover its kept tokens and the loss averages over those that are also
      encoder-masked.
    video_space: "auto", "pixels" or "normalized" (see :func:`targets`).
  """
  space = _video_space(video, video_space)
  mask = masking_lib.mask_from_bool(mask)
  if decoder_mask is not None:
    decoder_mask = masking_lib.mask_from_bool(decoder_mask, mask.grid, name="decoder_mask")
    if decoder_mask.num_tokens != mask.num_tokens:
      raise ValueError(f"decoder_mask has {decoder_mask.num_tokens} tokens, the mask "
                       f"{mask.num_tokens}")
  grid = mask.grid if mask.grid is not None else (
      decoder_mask.grid if decoder_mask is not None else None)
  kt, p = resolve_geometry(video.shape, model=model, tubelet_size=tubelet_size,
                           patch_size=patch_size, grid=grid, patch_dim=pred.shape[-1],
                           num_tokens=mask.num_tokens)
  tokens = patchify(video, kt, p)
  if tokens.shape[1] != mask.num_tokens:
    raise ValueError(f"mask covers {mask.num_tokens} tokens but the video has "
                     f"{tokens.shape[1]} tubelets of {kt}x{p}x{p}")
  idx = mask.masked_idx if decoder_mask is None else decoder_mask.visible_idx
  expected = (tokens.shape[0], idx.shape[1], tokens.shape[2] * tokens.shape[3])
  if pred.shape != expected:
    raise ValueError(f"pred has shape {pred.shape}, expected {expected}")
  tgt = _tokens_to_targets(jnp.take_along_axis(tokens, idx[..., None, None], axis=1), norm_pix,
                           1e-6, space)
  per_token = jnp.mean(jnp.square(pred.astype(jnp.float32) - tgt), axis=-1)
  if decoder_mask is None:
    return per_token.mean()
  weight = jnp.take_along_axis(mask.masked, idx, axis=1).astype(jnp.float32)
  return (per_token * weight).sum() / jnp.maximum(weight.sum(), 1.0)
