"""Correlation decoder: context queries attend to exemplar tokens -> per-pixel 2-class logits."""

import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from cim_jax.models.vit import LAYERNORM_EPSILON, Mlp, SplitDense, dense_init, even_padding
from cim_jax.models.vit import multi_head_attention, pad_tokens, sincos_pos_embed


def align_corners_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) bilinear interpolation matrix with torch's align_corners=True semantics.

  Output index i samples source i * (in - 1) / (out - 1), so the corner pixels of input and output
  coincide (jax.image.resize is half-pixel, i.e. align_corners=False, hence this matrix).
  """
  if out_size == 1:
    src = np.zeros(1)
  else:
    src = np.arange(out_size, dtype=np.float64) * (in_size - 1) / (out_size - 1)
  low = np.clip(np.floor(src).astype(int), 0, in_size - 1)
  high = np.minimum(low + 1, in_size - 1)
  frac = src - low
  matrix = np.zeros((out_size, in_size), np.float64)
  np.add.at(matrix, (np.arange(out_size), low), 1.0 - frac)
  np.add.at(matrix, (np.arange(out_size), high), frac)
  return matrix


def upsample_align_corners(maps, size: int):
  """(..., h, w, c) -> (..., size, size, c), bilinear with align_corners=True, float32."""
  rows = jnp.asarray(align_corners_matrix(maps.shape[-3], size), jnp.float32)
  cols = jnp.asarray(align_corners_matrix(maps.shape[-2], size), jnp.float32)
  return jnp.einsum("yi,...ijc,xj->...yxc", rows, maps.astype(jnp.float32), cols,
                    precision="highest")


def upsample_plane_align_corners(plane, size: int):
  """(..., h, w) -> (..., size, size): one channel of `upsample_align_corners`, float32."""
  rows = jnp.asarray(align_corners_matrix(plane.shape[-2], size), jnp.float32)
  cols = jnp.asarray(align_corners_matrix(plane.shape[-1], size), jnp.float32)
  return jnp.einsum("yi,...ij,xj->...yx", rows, plane.astype(jnp.float32), cols,
                    precision="highest")


class CrossAttention(nn.Module):
  """Authors' `CrossAttention`: q from the context, kv (k rows first, then v) from exemplars."""
  num_heads: int
  dtype: Any = jnp.float32
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(self, context, exemplars):
    """context (B, Tq, D), exemplars (B, N, Tk, D) -> (B, N, Tq, D)."""
    batch, num_exemplars, exemplar_tokens, dim = exemplars.shape
    context_tokens = context.shape[1]
    head_dim = dim // self.num_heads
    context = pad_tokens(context, even_padding(context_tokens, self.attention_impl))
    exemplars = pad_tokens(exemplars, even_padding(exemplar_tokens, self.attention_impl))
    dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=dense_init)
    # The query projection depends only on the context, so it is computed once per context and
    # broadcast over its N exemplars.
    q = dense(dim, name="q")(context).reshape(batch, 1, -1, self.num_heads, head_dim)
    q = jnp.broadcast_to(q, (batch, num_exemplars) + q.shape[2:])
    k, v = (t.reshape(batch * num_exemplars, -1, self.num_heads, head_dim)
            for t in SplitDense(dim, 2, self.dtype, name="kv")(exemplars))
    out = multi_head_attention(q.reshape((batch * num_exemplars,) + q.shape[2:]), k, v,
                               self.attention_impl, num_keys=exemplar_tokens)
    out = out.reshape(batch, num_exemplars, -1, dim)
    return dense(dim, name="proj")(out)[:, :, :context_tokens]


class CrossBlock(nn.Module):
  """Pre-norm cross-attention block; the same norm1 normalises queries and keys/values."""
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32
  attention_impl: Optional[str] = None
  approximate_gelu: bool = False  # see vit.Mlp

  @nn.compact
  def __call__(self, context, exemplars):
    norm = functools.partial(nn.LayerNorm, epsilon=LAYERNORM_EPSILON, dtype=self.dtype)
    norm1 = norm(name="norm1")
    y = CrossAttention(self.num_heads, self.dtype, self.attention_impl, name="attn")(
        norm1(context), norm1(exemplars))
    x = context[:, None] + y
    hidden = int(x.shape[-1] * self.mlp_ratio)
    return x + Mlp(hidden, dtype=self.dtype, approximate_gelu=self.approximate_gelu,
                   name="mlp")(norm(name="norm2")(x))


class CorrelationDecoder(nn.Module):
  """Context tokens x exemplar tokens -> correlation logits at context size (docs/METHOD.md §2)."""
  dim: int = 512
  num_heads: int = 16
  mlp_ratio: float = 4.0
  output_size: int = 160  # context size in pixels
  dtype: Any = jnp.float32
  attention_impl: Optional[str] = None  # None: JAX's choice (XLA); 'cudnn': fused GPU kernel
  approximate_gelu: bool = False  # see vit.Mlp

  @nn.compact
  def __call__(self, context_tokens, exemplar_tokens, upsample: bool = True):
    """context_tokens (B, 1+Lc, D), exemplar_tokens (B, N, 1+Le, D) -> (B, N, C, C, 2) float32.

    upsample=False returns the logits at patch-grid resolution (B, N, g, g, 2), float32; the
    training loss upsamples only their difference (see cim.CIMModel.apply).
    """
    if context_tokens.ndim != 3 or exemplar_tokens.ndim != 4:
      raise ValueError(f"expected context (B, 1+Lc, D) and exemplars (B, N, 1+Le, D), got "
                       f"{context_tokens.shape} and {exemplar_tokens.shape}")
    grid = math.isqrt(context_tokens.shape[1] - 1)
    if grid * grid != context_tokens.shape[1] - 1:
      raise ValueError(f"context has {context_tokens.shape[1] - 1} patch tokens, not a square grid")
    embed = nn.Dense(self.dim, dtype=self.dtype, kernel_init=dense_init, name="decoder_embed")
    context = embed(context_tokens)
    context = context + jnp.asarray(sincos_pos_embed(self.dim, grid, cls_slot=True), context.dtype)
    exemplars = embed(exemplar_tokens)
    x = CrossBlock(self.num_heads, self.mlp_ratio, self.dtype, self.attention_impl,
                   self.approximate_gelu, name="decoder_corr_block")(
        context, exemplars)
    x = nn.LayerNorm(epsilon=LAYERNORM_EPSILON, dtype=self.dtype, name="decoder_norm")(x)
    x = x[:, :, 1:].reshape(x.shape[:2] + (grid, grid, self.dim))
    # 1x1 convolution == a Dense over channels; the authors init it N(0, 2 / (1*1*2)).
    logits = nn.Dense(2, dtype=self.dtype, kernel_init=nn.initializers.normal(1.0),
                      name="decoder_pred_mask")(x)
    if not upsample:
      return logits.astype(jnp.float32)
    return upsample_align_corners(logits, self.output_size)
