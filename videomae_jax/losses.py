"""Reconstruction targets and the masked MSE loss of VideoMAE."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from videomae_jax import masking as masking_lib
from videomae_jax.normalization import unnormalize


def patchify(video: jax.Array, tubelet_size: int = 2, patch_size: int = 16) -> jax.Array:
  """(B, T, H, W, C) -> (B, N, tubelet*p*p, C), tokens t-major, pixels (dt, dy, dx) within."""
  b, t, h, w, c = video.shape
  kt, p = tubelet_size, patch_size
  if t % kt or h % p or w % p:
    raise ValueError(f"video {video.shape[1:4]} is not divisible into tubelets of "
                     f"{kt}x{p}x{p}")
  x = video.reshape(b, t // kt, kt, h // p, p, w // p, p, c)
  x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
  return x.reshape(b, (t // kt) * (h // p) * (w // p), kt * p * p, c)


def _tokens_to_targets(tokens: jax.Array, norm_pix: bool, eps: float) -> jax.Array:
  """(B, K, tubelet*p*p, C) pixels, uint8 or ImageNet-normalised -> (B, K, tubelet*p*p*C)."""
  if tokens.dtype == jnp.uint8:
    x = tokens.astype(jnp.float32) / 255.0  # the reference's [0, 1] pixels
  else:
    x = unnormalize(tokens)
  if norm_pix:
    mean = x.mean(axis=-2, keepdims=True)
    var = x.var(axis=-2, ddof=1, keepdims=True)
    x = (x - mean) / (jnp.sqrt(var) + eps)
  return x.reshape(x.shape[0], x.shape[1], -1)


def targets(video: jax.Array, *, tubelet_size: int = 2, patch_size: int = 16,
            norm_pix: bool = True, eps: float = 1e-6) -> jax.Array:
  """Per-token reconstruction targets (B, N, tubelet*p*p*C) from a uint8 video in [0, 255] or
  an ImageNet-normalised float video.

  Pixels are taken to [0, 1]; with ``norm_pix`` every colour channel of a tubelet is
  standardised over its tubelet*p*p pixels with the unbiased std, eps added to the std. The
  result is flattened channel-last: ((dt*p + dy)*p + dx)*C + c.
  """
  return _tokens_to_targets(patchify(video, tubelet_size, patch_size), norm_pix, eps)


def reconstruction_loss(video: jax.Array, pred: jax.Array, mask, norm_pix: bool = True, *,
                        tubelet_size: int = 2, patch_size: int = 16,
                        decoder_mask: masking_lib.Mask | None = None) -> jax.Array:
  """MSE between predictions and targets over the masked tokens, in float32.

  Targets are built for the predicted tokens only (gathered before they are normalised).

  Args:
    video: (B, T, H, W, 3) uint8 clip, or the ImageNet-normalised input fed to the model.
    pred: (B, N_pred, 3*tubelet*p*p) model output, in ascending token order.
    mask: encoder mask, a :class:`~videomae_jax.masking.Mask` or a concrete bool (B, N).
    norm_pix: per-tubelet normalised targets (the reference default).
    decoder_mask: VideoMAE V2 decoder mask; predictions then cover its kept tokens and the loss
      averages over those that are also encoder-masked.
  """
  mask = masking_lib.mask_from_bool(mask)
  tokens = patchify(video, tubelet_size, patch_size)
  if tokens.shape[1] != mask.num_tokens:
    raise ValueError(f"mask covers {mask.num_tokens} tokens but the video has "
                     f"{tokens.shape[1]} tubelets of {tubelet_size}x{patch_size}x{patch_size}")
  idx = mask.masked_idx if decoder_mask is None else decoder_mask.visible_idx
  expected = (tokens.shape[0], idx.shape[1], tokens.shape[2] * tokens.shape[3])
  if pred.shape != expected:
    raise ValueError(f"pred has shape {pred.shape}, expected {expected}")
  tgt = _tokens_to_targets(jnp.take_along_axis(tokens, idx[..., None, None], axis=1), norm_pix,
                           1e-6)
  per_token = jnp.mean(jnp.square(pred.astype(jnp.float32) - tgt), axis=-1)
  if decoder_mask is None:
    return per_token.mean()
  weight = jnp.take_along_axis(mask.masked, idx, axis=1).astype(jnp.float32)
  return (per_token * weight).sum() / jnp.maximum(weight.sum(), 1.0)
