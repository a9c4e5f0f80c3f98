"""VideoMAE pre-training model and fine-tuning classifier (Flax Linen)."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from videomae_jax import masking as masking_lib
from videomae_jax.models import layers

Dtype = Any


class _VideoViTFields(nn.Module):
  """Fields shared by the pre-training model and the classifier (defaults: ViT-B/16, 16x224)."""

  img_size: int | tuple[int, int] = 224
  patch_size: int = 16
  num_frames: int = 16
  tubelet_size: int = 2
  in_chans: int = 3
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  layer_norm_eps: float = 1e-6
  init_values: float = 0.0
  drop_path_rate: float = 0.0
  # Compute dtype (e.g. "bfloat16"); parameters are kept in param_dtype.
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  remat_policy: str = "nothing_saveable"
  scan: bool = False
  # None = the best for the platform being compiled, chosen at lowering time
  # (models.attention.dot_product_attention), or one of models.attention.ATTENTION_IMPLS.
  attention_impl: str | None = None
  # Recompute attention probabilities in the backward pass of the einsum path: "none",
  # "decoder" (the decoder attends over all N tokens; its B*heads*N^2 probabilities dominate
  # the step's memory) or "all".
  attention_remat: str = "decoder"
  # Matmul layers: None = per platform at lowering time (the XLA:CPU custom-VJP forms of
  # models/cpu on a CPU, plain Linen layers elsewhere), "plain" or "cpu" to force one.
  # remat_policy sees the plain layers only.
  layers_impl: str | None = None

  @property
  def image_hw(self) -> tuple[int, int]:
    s = self.img_size
    return (s, s) if isinstance(s, int) else (int(s[0]), int(s[1]))

  @property
  def grid(self) -> tuple[int, int, int]:
    """Token grid (T', H', W')."""
    h, w = self.image_hw
    return (self.num_frames // self.tubelet_size, h // self.patch_size, w // self.patch_size)

  @property
  def num_tokens(self) -> int:
    t, h, w = self.grid
    return t * h * w

  @property
  def patch_dim(self) -> int:
    """Values a token reconstructs: in_chans * tubelet * p * p."""
    return self.in_chans * self.tubelet_size * self.patch_size**2

  def _check_fields(self):
    h, w = self.image_hw
    if h % self.patch_size or w % self.patch_size:
      raise ValueError(f"img_size {self.img_size} is not divisible by patch_size "
                       f"{self.patch_size}")
    if self.num_frames % self.tubelet_size:
      raise ValueError(f"num_frames {self.num_frames} is not divisible by tubelet_size "
                       f"{self.tubelet_size}")
    if self.embed_dim % self.num_heads:
      raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads "
                       f"{self.num_heads}")
    layers.check_layers_impl(self.layers_impl)
    layers.remat_policy(self.remat_policy)
    if self.attention_remat not in ("none", "decoder", "all"):
      raise ValueError(f"attention_remat={self.attention_remat!r}: use 'none', 'decoder' or "
                       "'all'")

  def example_inputs(self, batch: int = 1) -> tuple:
    """Zero inputs with the shapes ``init`` needs (param shapes do not depend on their values)."""
    return (jnp.zeros((batch, self.num_frames, *self.image_hw, self.in_chans), jnp.float32),)

  def _check_video(self, video: jax.Array):
    expected = (self.num_frames, *self.image_hw, self.in_chans)
    if video.ndim != 5 or tuple(video.shape[1:]) != expected:
      raise ValueError(f"video must have shape (B, {', '.join(map(str, expected))}) "
                       f"(B, T, H, W, C channels-last), got {tuple(video.shape)}")

  def _blocks(self, depth: int, num_heads: int, width: int, **kw) -> layers.BlockStack:
    """A BlockStack with this model's knobs, unbound: the Encoder/Decoder adopting it as its
    ``blocks`` field names it, so params live under ``.../blocks``."""
    return layers.BlockStack(
        depth=depth, num_heads=num_heads, mlp_dim=int(width * self.mlp_ratio),
        layer_norm_eps=self.layer_norm_eps, dtype=jnp.dtype(self.dtype),
        param_dtype=jnp.dtype(self.param_dtype), attention_impl=self.attention_impl,
        remat=self.remat, remat_policy=self.remat_policy, scan=self.scan,
        layers_impl=self.layers_impl, parent=None, **kw)

  def _encoder(self, use_final_norm: bool,
               pos_embed_from: tuple[int, int, int] | None = None,
               kernel_init=layers.xavier_uniform) -> "Encoder":
    blocks = self._blocks(self.depth, self.num_heads, self.embed_dim,
                          init_values=self.init_values, drop_path_rate=self.drop_path_rate,
                          attention_remat=self.attention_remat == "all", kernel_init=kernel_init)
    return Encoder(patch_size=self.patch_size, tubelet_size=self.tubelet_size,
                   embed_dim=self.embed_dim, blocks=blocks, layer_norm_eps=self.layer_norm_eps,
                   use_final_norm=use_final_norm, dtype=jnp.dtype(self.dtype),
                   param_dtype=jnp.dtype(self.param_dtype), layers_impl=self.layers_impl,
                   pos_embed_from=pos_embed_from, name="encoder")


class Encoder(nn.Module):
  """Cube embedding + fixed sin/cos positions + transformer on the visible tokens only."""

  patch_size: int
  tubelet_size: int
  embed_dim: int
  blocks: layers.BlockStack
  layer_norm_eps: float = 1e-6
  use_final_norm: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  layers_impl: str | None = None
  # Token grid (T', H', W') whose table is interpolated to this one (VideoMAE V2 fine-tuning
  # at another geometry); None = the table of this grid (the reference, and pre-training).
  pos_embed_from: tuple[int, int, int] | None = None

  def pos_table(self, grid: tuple[int, int, int]) -> np.ndarray:
    """The fixed position table (T*H*W, D) added to the tokens of ``grid``."""
    t, h, w = grid
    if self.pos_embed_from is None:
      return layers.sincos_table(t * h * w, self.embed_dim)
    return layers.interpolated_sincos_table(tuple(self.pos_embed_from), grid, self.embed_dim)

  @nn.compact
  def __call__(self, video: jax.Array, visible_idx: jax.Array | None = None, *,
               deterministic: bool = True) -> jax.Array:
    x = layers.CubeEmbed(self.embed_dim, self.patch_size, self.tubelet_size, self.dtype,
                         self.param_dtype, self.layers_impl, name="patch_embed")(video, visible_idx)
    # Each token gets its own position, as when the reference adds the table before dropping
    # masked tokens; only the visible ones are ever embedded.
    t, h, w = (video.shape[1] // self.tubelet_size, video.shape[2] // self.patch_size,
               video.shape[3] // self.patch_size)
    pos = jnp.asarray(self.pos_table((t, h, w)))
    x = x.astype(jnp.float32) + (pos if visible_idx is None else pos[visible_idx])
    x = layers.with_logical_constraint(x, ("batch", None, None))
    x = self.blocks(x, deterministic)
    if self.use_final_norm:
      x = layers.layer_norm(self.layer_norm_eps, "norm")(x)
    return x


class Decoder(nn.Module):
  """Lightweight decoder: blocks, then norm and head on the last ``num_return`` tokens."""

  blocks: layers.BlockStack
  out_dim: int
  final_norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  layers_impl: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, num_return: int) -> jax.Array:
    x = layers.with_logical_constraint(x, ("batch", None, None))
    x = self.blocks(x, True)
    x = x[:, -num_return:]
    x = layers.layer_norm(self.final_norm_eps, "norm")(x)
    return layers.Dense(self.out_dim, kernel_init=layers.xavier_uniform, dtype=self.dtype,
                        param_dtype=self.param_dtype, impl=self.layers_impl, name="head")(x)


class VideoMAEPretrain(_VideoViTFields):
  """VideoMAE masked autoencoder.

  ``apply({'params': p}, video, mask)`` takes an ImageNet-normalised float video
  (B, T, H, W, 3) and a mask (``masking.Mask`` or concrete bool (B, N), True = masked) and
  returns float32 predictions (B, N_masked, 3*tubelet*p*p) in ascending masked-token order.
  With ``decoder_mask`` (VideoMAE V2 dual masking; a Mask or a concrete bool (B, N), True =
  dropped by the decoder) the predictions cover the decoder's kept tokens instead.
  """

  decoder_embed_dim: int = 384
  decoder_depth: int = 4
  decoder_num_heads: int = 6
  # The reference uses layer_norm_eps everywhere; HF transformers uses 1e-5 for the decoder's
  # final norm. None = layer_norm_eps.
  decoder_norm_eps: float | None = None

  def _as_mask(self, value, video: jax.Array, name: str) -> masking_lib.Mask:
    """Encoder and decoder masks alike: a Mask or a concrete bool (B, N), on this grid."""
    m = masking_lib.mask_from_bool(value, name=name)
    if m.num_tokens != self.num_tokens:
      raise ValueError(f"{name} has {m.num_tokens} tokens per sample; the model's grid "
                       f"{self.grid} has {self.num_tokens}")
    if m.masked.shape[0] != video.shape[0]:
      raise ValueError(f"{name} batch {m.masked.shape[0]} != video batch {video.shape[0]}")
    return masking_lib.mask_from_bool(m, self.grid, name=name)

  def example_inputs(self, batch: int = 1) -> tuple:
    (video,) = super().example_inputs(batch)
    return video, masking_lib.tube_mask(jax.random.key(0), batch, self.grid, 0.5)

  @nn.compact
  def __call__(self, video: jax.Array, mask, decoder_mask=None, *,
               train: bool = False) -> jax.Array:
    self._check_fields()
    self._check_video(video)
    mask = self._as_mask(mask, video, "mask")
    if decoder_mask is not None:
      decoder_mask = self._as_mask(decoder_mask, video, "decoder_mask")
    dtype = jnp.dtype(self.dtype)
    d = self.decoder_embed_dim

    x = self._encoder(use_final_norm=True)(video.astype(dtype), mask.visible_idx,
                                           deterministic=not train)
    x = layers.Dense(d, use_bias=False, kernel_init=layers.torch_default_kernel_init, dtype=dtype,
                     param_dtype=self.param_dtype, impl=self.layers_impl,
                     name="encoder_to_decoder")(x)
    mask_token = self.param("mask_token", layers.trunc_normal_init(0.02), (1, 1, d),
                            self.param_dtype)

    pos = jnp.asarray(layers.sincos_table(self.num_tokens, d))
    target_idx = mask.masked_idx if decoder_mask is None else decoder_mask.visible_idx
    x_full = jnp.concatenate([
        x.astype(jnp.float32) + pos[mask.visible_idx],
        mask_token.astype(jnp.float32) + pos[target_idx],
    ], axis=1)
    blocks = self._blocks(self.decoder_depth, self.decoder_num_heads, d,
                          attention_remat=self.attention_remat in ("decoder", "all"))
    pred = Decoder(
        blocks=blocks, out_dim=self.patch_dim,
        final_norm_eps=(self.layer_norm_eps if self.decoder_norm_eps is None
                        else self.decoder_norm_eps),
        dtype=dtype, param_dtype=jnp.dtype(self.param_dtype), layers_impl=self.layers_impl,
        name="decoder")(x_full, target_idx.shape[1])
    return pred.astype(jnp.float32)


class VideoMAEClassifier(_VideoViTFields):
  """Fine-tuning model: encoder on all tokens, mean pool, fc_norm, dropout, linear head.

  ``apply({'params': p}, video, train=False)`` returns float32 logits (B, num_classes);
  ``apply(..., method=VideoMAEClassifier.encode)`` the pooled features the head sees.
  """

  num_classes: int = 400
  fc_drop_rate: float = 0.0
  init_scale: float = 0.001
  # (T', H', W') token grid of the pre-training position table to interpolate to this model's
  # grid (VideoMAE V2); None = recompute the sin/cos table for this grid (VideoMAE v1).
  pos_embed_from: tuple[int, int, int] | None = None
  # No gradient into the encoder (linear probe): its backward pass is not computed.
  stop_encoder_grad: bool = False

  def setup(self):
    self._check_fields()
    if self.pos_embed_from is not None and len(tuple(self.pos_embed_from)) != 3:
      raise ValueError(f"pos_embed_from={self.pos_embed_from!r}: give the (T', H', W') token "
                       "grid of the source table")
    pos_from = None if self.pos_embed_from is None else tuple(map(int, self.pos_embed_from))
    # The reference's fine-tuning init: every Linear trunc_normal(0.02) (timm's, cut at +-2).
    self.encoder = self._encoder(use_final_norm=False, pos_embed_from=pos_from,
                                 kernel_init=layers.normal_init(0.02))
    self.fc_norm = layers.layer_norm(self.layer_norm_eps, "fc_norm")
    # "Dropout_0", the name of an inline Dropout: a given rng keeps giving the same masks.
    self.fc_dropout = nn.Dropout(self.fc_drop_rate, name="Dropout_0")
    scale = self.init_scale

    def head_init(key, shape, dtype=jnp.float32):
      return layers.normal_init(0.02)(key, shape, dtype) * scale

    self.head = layers.Dense(self.num_classes, kernel_init=head_init, dtype=jnp.dtype(self.dtype),
                             param_dtype=self.param_dtype, impl=self.layers_impl, name="head")

  def encode(self, video: jax.Array, *, train: bool = False, pool: str = "fc_norm") -> jax.Array:
    """Pooled float32 features (B, embed_dim): ``'mean'`` of the encoder's tokens, or
    ``'fc_norm'`` of that mean (what the head sees, before dropout)."""
    if pool not in ("fc_norm", "mean"):
      raise ValueError(f"pool={pool!r}: use 'fc_norm' or 'mean'")
    self._check_video(video)
    x = self.encoder(video.astype(jnp.dtype(self.dtype)), None, deterministic=not train)
    x = x.mean(axis=1)
    if self.stop_encoder_grad:
      x = jax.lax.stop_gradient(x)
    return x if pool == "mean" else self.fc_norm(x)

  def __call__(self, video: jax.Array, *, train: bool = False) -> jax.Array:
    x = self.encode(video, train=train, pool="fc_norm")
    x = self.fc_dropout(x, deterministic=not train)
    return self.head(x).astype(jnp.float32)
