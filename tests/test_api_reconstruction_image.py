"""The trainer's reconstruction image: one fixed clip whatever step the run starts from, masked
the way the run masks (encoder mask type and ratio, V2 decoder mask)."""
import numpy as np
from PIL import Image

from tests import trainer_harness as h
from videomae_jax.train.synthetic import SyntheticVideos

T, S, P = 4, 32, 8  # tests/configs/tiny.py: 4x32x32 clips, tubelet 2, patch 8


def _tokens_grey(row: np.ndarray) -> np.ndarray:
  """(frames, S/P, S/P) bool: which patches of one image row are the flat 0.5 grey."""
  frames = row.reshape(S, T, S, 3).transpose(1, 0, 2, 3)  # frames side by side
  patches = frames.reshape(T, S // P, P, S // P, P, 3)
  return (patches == 128).all(axis=(2, 4, 5))


def test_resumed_run_draws_the_same_clip_masked_as_the_run_masks(tmp_path):
  work = tmp_path / "w"
  common = ["--config.vis_every_steps=2", "--config.checkpoint.every_steps=2",
            "--config.mask.type=random", "--config.mask.decoder_type=run_cell",
            "--config.mask.decoder_ratio=0.5"]
  h.run(work, "--config.total_steps=2", *common)
  out = h.run(work, "--config.total_steps=4", *common)
  assert "resumed from step 2" in out.stderr
  before = np.asarray(Image.open(work / "images" / "reconstruction_00000002.png"))
  after = np.asarray(Image.open(work / "images" / "reconstruction_00000004.png"))
  assert before.shape == after.shape == (4 * S, T * S, 3)  # norm-pix: two reconstruction rows
  original, masked_in, rec, own = before[:S], before[S:2 * S], before[2 * S:3 * S], before[3 * S:]
  # The same clip after the resume: global example 0 of the stream, not the resumed batch.
  np.testing.assert_array_equal(after[:S], original)
  first = SyntheticVideos(global_batch_size=8, num_frames=T, size=S, seed=0).batch(0)
  np.testing.assert_array_equal(original, np.concatenate(list(first["video"][0]), axis=1))
  # The run's random mask (int(0.75 * 32) tokens), not a tube mask: slots differ.
  grey = _tokens_grey(masked_in)
  assert grey[0::2].sum() == 24
  assert (grey[0] == grey[1]).all() and (grey[2] == grey[3]).all()
  assert not (grey[0] == grey[2]).all(), "the visualisation used a tube mask"
  # V2 decoder masking: masked tokens the decoder drops have no prediction and stay grey.
  rec_grey = _tokens_grey(rec)
  assert not (rec_grey & ~grey).any()
  assert 0 < rec_grey[0::2].sum() < 24
  np.testing.assert_array_equal(_tokens_grey(own), rec_grey)
