"""VideoMAE models."""
from videomae_jax.models.presets import PRESET_NAMES, preset
from videomae_jax.models.videomae import Decoder, Encoder, VideoMAEClassifier, VideoMAEPretrain

__all__ = ["VideoMAEPretrain", "VideoMAEClassifier", "Encoder", "Decoder", "preset",
           "PRESET_NAMES"]
