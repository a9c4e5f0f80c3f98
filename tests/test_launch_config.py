"""Config resolution and validation of launch.pretrain runs."""
import json
import re

import numpy as np
import pytest

from tests import trainer_harness as h
from videomae_jax.train import config as config_lib
from videomae_jax.train.synthetic import SyntheticVideos


def _tiny(**kw):
  import importlib.util
  spec = importlib.util.spec_from_file_location("tiny", f"{h.REPO}/{h.TINY}")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  for k, v in kw.items():
    node, *path = k.split(".")
    target = c
    for p in [node, *path][:-1]:
      target = target[p]
    target[[node, *path][-1]] = v
  return c


def _first_batch(config):
  c = config_lib.resolve(config)
  data = SyntheticVideos(global_batch_size=c.batch_size, num_frames=c.model.num_frames,
                         size=c.model.img_size, seed=c.data.seed)
  return next(iter(data))["video"]


def test_config_seed_drives_the_data_stream_unless_data_seed_is_set():
  assert config_lib.base_config().data.seed is None
  a, b = _tiny(seed=0), _tiny(seed=1)
  assert config_lib.resolve(a).data.seed == 0 and config_lib.resolve(b).data.seed == 1
  assert not np.array_equal(_first_batch(a), _first_batch(b))
  # An explicit data seed wins over config.seed.
  pinned = [_tiny(seed=s, **{"data.seed": 7}) for s in (0, 1)]
  assert [config_lib.resolve(c).data.seed for c in pinned] == [7, 7]
  np.testing.assert_array_equal(_first_batch(pinned[0]), _first_batch(pinned[1]))
  # resolve() leaves the caller's config alone.
  assert a.data.seed is None


def test_trainer_records_the_resolved_data_seed(tmp_path):
  h.run(tmp_path / "s3", "--config.seed=3", "--config.total_steps=1")
  with open(tmp_path / "s3" / "config.json") as f:
    assert json.load(f)["data"]["seed"] == 3


@pytest.mark.parametrize("overrides,message", [
    ({"model.dtype": "float16"}, "config.model.dtype='float16'"),
    ({"log_every_steps": 0}, "config.log_every_steps=0"),
    ({"log_every_steps": -5}, "config.log_every_steps=-5"),
])
def test_validate_refuses(overrides, message):
  with pytest.raises(config_lib.ConfigError, match=re.escape(message)) as e:
    config_lib.validate(_tiny(**overrides), 1)
  if "dtype" in message:
    assert "bfloat16" in str(e.value) and "loss scaling" in str(e.value)
