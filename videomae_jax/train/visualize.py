"""Original / masked / reconstructed frame grids for watching pre-training."""
from __future__ import annotations

from typing import Any

import numpy as np

from videomae_jax import masking
from videomae_jax.losses import patchify, resolve_geometry


def _unpatchify(tokens: np.ndarray, grid, tubelet: int, p: int) -> np.ndarray:
  """(N, tubelet*p*p, 3) -> (T, H, W, 3)."""
  t, h, w = grid
  x = tokens.reshape(t, h, w, tubelet, p, p, 3).transpose(0, 3, 1, 4, 2, 5, 6)
  return x.reshape(t * tubelet, h * p, w * p, 3)


def _one_row(m, name: str) -> tuple[np.ndarray, tuple | None]:
  """(N,) bool and the grid of a Mask (its first row), a (1, N) or an (N,) bool array."""
  if isinstance(m, masking.Mask):
    return np.asarray(m.masked)[0], m.grid
  a = np.asarray(m)
  if a.dtype != np.bool_ or a.ndim not in (1, 2) or (a.ndim == 2 and a.shape[0] != 1):
    raise ValueError(f"{name} must be a masking.Mask or a bool (N,) array, got {a.dtype} "
                     f"{a.shape}")
  return a.reshape(-1), None


def reconstruction_grid(video_u8: np.ndarray, pred: np.ndarray, mask, norm_pix: bool = True, *,
                        decoder_mask=None, model: Any = None, tubelet_size: int | None = None,
                        patch_size: int | None = None, max_frames: int = 8) -> np.ndarray:
  """A uint8 image: rows original, masked input, reconstruction (visible patches pasted back).

  With norm-pix targets a prediction carries no absolute colour. The third row un-normalises
  it with the per-channel mean and std of the *visible* tubelets of the same temporal slot
  only, so that row never borrows statistics from the pixels it is meant to reconstruct. A
  fourth row draws it as the reference's ``run_videomae_vis.py`` does: each masked tubelet
  un-normalised with its own mean and std (unbiased), i.e. the predicted shape within the
  tubelet at the true brightness and contrast.

  The geometry comes from ``mask``'s grid when it is a :class:`~videomae_jax.masking.Mask`, from
  ``model`` or ``tubelet_size``/``patch_size``, or from the shapes when only one fits.

  Args:
    video_u8: (T, H, W, 3) uint8 clip.
    pred: (N_pred, tubelet*p*p*3) predictions in ascending token order: of the masked tokens,
      or with ``decoder_mask`` of the decoder's kept tokens.
    mask: a Mask (its first row is drawn) or a bool (N,), True = masked.
    decoder_mask: the VideoMAE V2 decoder mask (same forms, True = dropped by the decoder). The
      reconstruction then shows what the model predicts: masked tokens the decoder keeps get
      their predictions, masked tokens it drops stay grey.
  """
  masked, grid = _one_row(mask, "mask")
  kept = None
  if decoder_mask is not None:
    dropped, dgrid = _one_row(decoder_mask, "decoder_mask")
    if dropped.shape != masked.shape:
      raise ValueError(f"decoder_mask has {dropped.size} tokens, the mask {masked.size}")
    grid = grid or dgrid
    kept = ~dropped
  predicted = masked if kept is None else kept
  pred = np.asarray(pred, np.float32)
  if pred.ndim != 2 or pred.shape[0] != predicted.sum():
    raise ValueError(f"pred has shape {pred.shape}, expected ({int(predicted.sum())}, values "
                     "per token)")
  tubelet, patch = resolve_geometry(video_u8.shape, model=model, tubelet_size=tubelet_size,
                                    patch_size=patch_size, grid=grid, patch_dim=pred.shape[1],
                                    num_tokens=masked.size)
  x = video_u8.astype(np.float32) / 255.0
  tokens = np.asarray(patchify(x[None], tubelet, patch))[0]  # (N, tubelet*p*p, 3)
  t, h, w = grid = (x.shape[0] // tubelet, x.shape[1] // patch, x.shape[2] // patch)
  if tokens.shape[0] != masked.size or pred.shape[1] != tokens.shape[1] * 3:
    raise ValueError(f"mask ({masked.size} tokens) and pred ({pred.shape}) do not fit the clip "
                     f"{video_u8.shape} in tubelets of {tubelet}x{patch}x{patch}")
  # Predictions of the masked tokens that have one (all of them without a decoder mask).
  pred_tokens = np.zeros_like(tokens)
  pred_tokens[predicted] = pred.reshape(-1, tubelet * patch * patch, 3)
  shown = masked & predicted
  masked_in = tokens.copy()
  masked_in[masked] = 0.5
  rec = masked_in.copy()
  rec[shown] = pred_tokens[shown]
  if norm_pix:
    # Per temporal slot: the visible tubelets' mean channel mean and std.
    slot = np.arange(len(masked)) // (h * w)
    for s in range(t):
      v = tokens[(slot == s) & ~masked]  # (n_vis, tubelet*p*p, 3)
      if not len(v):  # a random mask can hide a whole slot: the clip's visible tubelets
        v = tokens[~masked]
      mean = v.mean(axis=1).mean(axis=0)
      std = v.std(axis=1, ddof=1).mean(axis=0)
      sel = (slot == s) & shown
      rec[sel] = rec[sel] * (std + 1e-6) + mean
  rows = [x, _unpatchify(masked_in, grid, tubelet, patch), _unpatchify(rec, grid, tubelet, patch)]
  if norm_pix:
    own = masked_in.copy()
    target = tokens[shown]
    own[shown] = (pred_tokens[shown] * (target.std(axis=1, ddof=1, keepdims=True) + 1e-6)
                  + target.mean(axis=1, keepdims=True))
    rows.append(_unpatchify(own, grid, tubelet, patch))
  step = max(1, x.shape[0] // max_frames)
  img = np.concatenate([np.concatenate(list(r[::step][:max_frames]), axis=1) for r in rows], axis=0)
  return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
