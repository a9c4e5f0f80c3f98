import jax
import jax.numpy as jnp
import numpy as np
import pytest

from videomae_jax import masking

GRID = (8, 14, 14)  # 16x224x224 at 2x16x16


def test_tube_mask_counts_and_shared_over_time():
  m = masking.tube_mask(jax.random.key(0), 4, GRID, 0.9)
  masked = np.asarray(m.masked).reshape(4, 8, 196)
  # int(0.9 * 196) = 176 masked per temporal slot, 1408 in all, 160 visible.
  assert (masked.sum(-1) == 176).all()
  assert m.num_masked == 1408 and m.num_visible == 160
  assert (masked == masked[:, :1]).all(), "the spatial mask must repeat over time"
  assert len({masked[b, 0].tobytes() for b in range(4)}) == 4, "samples must differ"


@pytest.mark.parametrize("maker", [masking.tube_mask, masking.random_mask])
def test_indices_are_sorted_and_consistent_with_bool(maker):
  m = maker(jax.random.key(1), 3, (2, 4, 6), 0.75)
  masked = np.asarray(m.masked)
  for b in range(3):
    np.testing.assert_array_equal(np.asarray(m.masked_idx[b]), np.flatnonzero(masked[b]))
    np.testing.assert_array_equal(np.asarray(m.visible_idx[b]), np.flatnonzero(~masked[b]))


def test_random_mask_count_and_not_tube():
  m = masking.random_mask(jax.random.key(2), 2, GRID, 0.9)
  assert (np.asarray(m.masked).sum(-1) == int(0.9 * 1568)).all()
  per_slot = np.asarray(m.masked).reshape(2, 8, 196)
  assert not (per_slot == per_slot[:, :1]).all()


def test_reproducible_from_key_and_different_keys_differ():
  a = masking.tube_mask(jax.random.key(7), 2, GRID, 0.9)
  b = masking.tube_mask(jax.random.key(7), 2, GRID, 0.9)
  c = masking.tube_mask(jax.random.key(8), 2, GRID, 0.9)
  np.testing.assert_array_equal(a.masked, b.masked)
  assert not np.array_equal(a.masked, c.masked)


def test_traceable_under_jit_without_host_sync():
  @jax.jit
  def draw(key, step):
    m = masking.tube_mask(jax.random.fold_in(key, step), 2, GRID, 0.9)
    d = masking.running_cell_mask(jax.random.fold_in(key, step), 2, GRID, 0.5)
    return m, d

  key = jax.device_put(jax.random.key(0))
  step = jax.device_put(jnp.int32(3))
  draw(key, step)  # compile outside the guard
  # Any host<->device transfer during the call would raise under this guard.
  with jax.transfer_guard("disallow"):
    m, d = draw(key, step)
  assert m.masked.shape == (2, 1568) and m.visible_idx.shape == (2, 160)
  assert d.visible_idx.shape == (2, 784)
  lowered = draw.lower(jax.random.key(0), jnp.int32(0)).as_text()
  assert "custom_call_target=\"xla_python_host_callback" not in lowered


def test_running_cell_mask_matches_reference_construction():
  # The reference's Cell: queue [1]*2 + [0]*2, pointer advanced once before every slot.
  t, h, w = 4, 4, 6
  maps = masking.running_cell_maps((t, h, w), 0.5)
  assert maps.shape == (4, t * h * w)
  queue = np.array([1, 1, 0, 0])
  for start in range(4):
    expect = []
    ptr = start
    for _ in range(t):
      ptr += 1
      cell = queue[(np.arange(4) + ptr) % 4].reshape(2, 2)
      expect.append(np.tile(cell, (h // 2, w // 2)))
    np.testing.assert_array_equal(maps[start], np.stack(expect).reshape(-1).astype(bool))
  # Half of every slot dropped; the pattern shifts between consecutive slots.
  per_slot = maps.reshape(4, t, h * w)
  assert (per_slot.sum(-1) == h * w // 2).all()
  assert not (per_slot[:, 0] == per_slot[:, 1]).all()
  d = masking.running_cell_mask(jax.random.key(0), 64, (t, h, w), 0.5)
  chosen = {np.asarray(d.masked[i]).tobytes() for i in range(64)}
  assert chosen <= {m.tobytes() for m in maps} and len(chosen) > 1


def test_mask_from_bool_rejects_uneven_rows_and_traced_input():
  m = np.zeros((2, 8), bool)
  m[0, :3] = True
  m[1, :2] = True
  with pytest.raises(ValueError, match="different numbers of tokens"):
    masking.mask_from_bool(m)
  with pytest.raises(TypeError, match="masking.Mask"):
    jax.jit(lambda x: masking.mask_from_bool(x).masked_idx)(jnp.asarray(m))


def test_bad_arguments():
  with pytest.raises(ValueError, match="ratio"):
    masking.tube_mask(jax.random.key(0), 1, GRID, 1.0)
  with pytest.raises(ValueError, match="grid"):
    masking.tube_mask(jax.random.key(0), 1, (8, 14), 0.9)
  with pytest.raises(ValueError, match="even"):
    masking.running_cell_maps((8, 7, 7), 0.5)
