"""Original / masked / reconstructed frame grids for watching pre-training."""
from __future__ import annotations

import numpy as np

from videomae_jax.losses import patchify



def _unpatchify(tokens: np.ndarray, grid, tubelet: int, p: int) -> np.ndarray:
  """(N, tubelet*p*p, 3) -> (T, H, W, 3)."""
  t, h, w = grid
  x = tokens.reshape(t, h, w, tubelet, p, p, 3).transpose(0, 3, 1, 4, 2, 5, 6)
  return x.reshape(t * tubelet, h * p, w * p, 3)


def reconstruction_grid(video_u8: np.ndarray, pred: np.ndarray, masked: np.ndarray, grid,
                        tubelet: int, patch: int, norm_pix: bool,
                        max_frames: int = 8) -> np.ndarray:
  """A uint8 image: rows original, masked input, reconstruction (visible patches pasted back).

  With norm-pix targets a prediction carries no absolute colour. It is un-normalised with the
  per-channel mean and std of the *visible* tubelets of the same temporal slot only, so the
  picture never borrows statistics from the pixels it is meant to reconstruct.

  Args:
    video_u8: (T, H, W, 3) uint8 clip.
    pred: (N_masked, tubelet*p*p*3) predictions in ascending masked-token order.
    masked: (N,) bool, True = masked.
  """
  x = video_u8.astype(np.float32) / 255.0
  tokens = np.asarray(patchify(x[None], tubelet, patch))[0]  # (N, tubelet*p*p, 3)
  t, h, w = grid
  rec = tokens.copy()
  rec[masked] = np.asarray(pred, np.float32).reshape(-1, tubelet * patch * patch, 3)
  if norm_pix:
    # Per temporal slot: the visible tubelets' mean channel mean and std.
    slot = np.arange(len(masked)) // (h * w)
    for s in range(t):
      v = tokens[(slot == s) & ~masked]  # (n_vis, tubelet*p*p, 3)
      mean = v.mean(axis=1).mean(axis=0)
      std = v.std(axis=1, ddof=1).mean(axis=0)
      sel = (slot == s) & masked
      rec[sel] = rec[sel] * (std + 1e-6) + mean
  masked_in = tokens.copy()
  masked_in[masked] = 0.5
  rows = [x, _unpatchify(masked_in, grid, tubelet, patch), _unpatchify(rec, grid, tubelet, patch)]
  step = max(1, x.shape[0] // max_frames)
  img = np.concatenate([np.concatenate(list(r[::step][:max_frames]), axis=1) for r in rows], axis=0)
  return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


