"""What the trainer imports: a synthetic-data run needs no video decoders and no TensorFlow."""
import subprocess
import sys
import textwrap

from tests import trainer_harness as h

HEAVY = ("cv2", "av", "decord", "tensorflow", "tensorflow_datasets")

# Hides the video and TensorFlow packages from every finder, as if only the `train` extra
# were installed: importing them raises ModuleNotFoundError, find_spec() returns None.
BLOCKER = textwrap.dedent(f"""
    import sys
    HEAVY = {HEAVY!r}
    class Hide:
      def __init__(self, finder):
        self.finder = finder
      def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY:
          return None
        return self.finder.find_spec(name, path, target)
      def __getattr__(self, attr):
        return getattr(self.finder, attr)
    sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
    try:
      import cv2
      raise AssertionError("the blocker does not hide cv2")
    except ModuleNotFoundError:
      pass
""")


def _python(code, tmp_path, timeout=300):
  return subprocess.run([sys.executable, "-c", code], cwd=h.REPO, env=h.env(),
                        capture_output=True, text=True, timeout=timeout)


def test_config_and_launcher_import_without_decoders_or_tensorflow(tmp_path):
  code = BLOCKER + textwrap.dedent("""
      import videomae_jax.train.config, videomae_jax.train.synthetic, videomae_jax.data
      from videomae_jax.train import checkpointing, metrics, optim, sharding, step
      from videomae_jax.data import default_data_config, BadDataStats
      import launch.pretrain
      print("ok")
  """)
  proc = _python(code, tmp_path)
  assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_synthetic_run_imports_no_decoders_or_tensorflow(tmp_path):
  work = tmp_path / "synthetic"
  code = textwrap.dedent(f"""
      import runpy, sys
      sys.argv = ["pretrain", "--config={h.TINY}", "--workdir={work}",
                  "--config.total_steps=2"]
      try:
        runpy.run_module("launch.pretrain", run_name="__main__", alter_sys=True)
      except SystemExit as e:
        assert not e.code, e.code
      heavy = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
      assert not heavy, heavy
      print("ok")
  """)
  proc = _python(code, tmp_path)
  assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
  assert (work / "metrics.jsonl").exists() and any((work / "tensorboard").iterdir())


def test_augment_import_leaves_opencv_threads_alone(tmp_path):
  code = textwrap.dedent("""
      import cv2, numpy as np
      cv2.setNumThreads(3)
      from videomae_jax.data import augment
      assert cv2.getNumThreads() == 3, cv2.getNumThreads()
      frames = np.zeros((2, 40, 60, 3), np.uint8)
      augment.crop_resize(frames, augment.CropBox(0, 0, 40, 40), (60, 40), 20)
      # The decoding workers render one clip each: OpenCV's own pool is off once they run.
      assert cv2.getNumThreads() == 1, cv2.getNumThreads()
      print("ok")
  """)
  proc = _python(code, tmp_path, timeout=120)
  assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
