"""Vision Transformer encoder (timm / MAE layout) with fixed, resampled 2-D sin-cos positions."""

import functools
import re
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# (width, depth, num_heads) of the standard ViT sizes; the patch size comes from the variant string.
# "Mu" is a 2-block, 64-wide ViT that compiles in seconds: tests and CPU smoke runs.
_SIZES = {
    "Mu": (64, 2, 2),
    "Ti": (192, 12, 3),
    "T": (192, 12, 3),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "H": (1280, 32, 16),
}

LAYERNORM_EPSILON = 1e-6


def decode_variant(variant: str) -> dict:
  """'B/16' -> dict(width=768, depth=12, num_heads=12, patch_size=16)."""
  match = re.fullmatch(r"([A-Za-z]+)/(\d+)", str(variant).strip())
  if not match or match.group(1) not in _SIZES or int(match.group(2)) <= 0:
    raise ValueError(
        f"unknown ViT variant {variant!r}; expected '<size>/<patch>' with size in {sorted(_SIZES)}")
  width, depth, num_heads = _SIZES[match.group(1)]
  return dict(width=width, depth=depth, num_heads=num_heads, patch_size=int(match.group(2)))


# ----------------------------------------------------------------------------------------------
# Fixed position tables, computed in numpy at trace time (constants, never parameters).


def _sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
  omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
  omega = 1.0 / 10000**omega
  angles = np.einsum("m,d->md", positions.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_pos_embed(dim: int, grid_size: int, cls_slot: bool = True) -> np.ndarray:
  """MAE / MoCo-v3 2-D sin-cos table (1 [+1], grid*grid, dim); the cls slot is zeros."""
  if dim % 4:
    raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
  coords = np.arange(grid_size, dtype=np.float64)
  # As in the authors' code: meshgrid(w, h), and the first half of the channels encodes grid[0]
  # (the column coordinate), the second half grid[1] (the row coordinate).
  grid = np.stack(np.meshgrid(coords, coords), axis=0)
  table = np.concatenate([_sincos_1d(dim // 2, grid[0]), _sincos_1d(dim // 2, grid[1])], axis=1)
  if cls_slot:
    table = np.concatenate([np.zeros((1, dim)), table], axis=0)
  return table[None].astype(np.float32)


def _cubic_weight(x: np.ndarray, a: float = -0.75) -> np.ndarray:
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def torch_bicubic_matrix(in_size: int, out_size: int, scale_factor: float) -> np.ndarray:
  """(out, in) matrix of torch's bicubic resize (a=-0.75, align_corners=False) given a scale factor.

  torch maps output index i to source (i + 0.5) / scale_factor - 0.5 and clamps the 4 taps at the
  border (edge replication), which this matrix reproduces.
  """
  # torch computes the source coordinate in float32 from a float32 1/scale.
  inv_scale = np.float32(1.0 / scale_factor)
  src = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * inv_scale - np.float32(0.5)
  src = src.astype(np.float64)
  base = np.floor(src)
  frac = src - base
  matrix = np.zeros((out_size, in_size), np.float64)
  for tap in range(-1, 3):
    weight = _cubic_weight(frac - tap)
    index = np.clip(base + tap, 0, in_size - 1).astype(int)
    np.add.at(matrix, (np.arange(out_size), index), weight)
  return matrix


def resampled_pos_embed(dim: int, grid_hw: tuple[int, int], table_grid: int = 14) -> np.ndarray:
  """The table_grid x table_grid sin-cos table resampled to grid_hw exactly as the authors do.

  The authors (after DINO) call torch bicubic interpolation with scale factor (g + 0.1) / table_grid
  and keep the table untouched when the grid already matches.
  """
  table = sincos_pos_embed(dim, table_grid, cls_slot=True)[0]
  grid_h, grid_w = grid_hw
  if (grid_h, grid_w) == (table_grid, table_grid):
    return table[None]
  patches = table[1:].reshape(table_grid, table_grid, dim).astype(np.float64)
  rows = torch_bicubic_matrix(table_grid, grid_h, (grid_h + 0.1) / table_grid)
  cols = torch_bicubic_matrix(table_grid, grid_w, (grid_w + 0.1) / table_grid)
  patches = np.einsum("yi,ijc,xj->yxc", rows, patches, cols).reshape(grid_h * grid_w, dim)
  return np.concatenate([table[:1], patches], axis=0)[None].astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Modules.

# Weight init of the authors' model: xavier-uniform Linear layers with zero bias.
dense_init = nn.initializers.xavier_uniform()


@jax.custom_vjp
def exact_gelu(x):
  """The exact (erf) GELU, `jax.nn.gelu(x, approximate=False)`, whose backward pass keeps only x.

  Autodiff of the erf form keeps a second full-size tensor from the forward pass for the
  backward (the erfc term); here the derivative Phi(x) + x phi(x) is recomputed from x, which the
  backward pass reads anyway. On the 4x-wide MLP hidden layer that is one activation-sized tensor
  fewer written and read per MLP. Forward values are exactly `jax.nn.gelu`'s; the derivative is
  evaluated in float32 (as PyTorch's GELU backward does for bfloat16 inputs).
  """
  return jax.nn.gelu(x, approximate=False)


def _exact_gelu_forward(x):
  return exact_gelu(x), x


def _exact_gelu_backward(x, grad):
  x32 = x.astype(jnp.float32)
  cdf = 0.5 * jax.lax.erfc(-x32 * np.float32(np.sqrt(0.5)))
  pdf = jnp.exp(-0.5 * x32 * x32) * np.float32(1.0 / np.sqrt(2.0 * np.pi))
  return ((grad.astype(jnp.float32) * (cdf + x32 * pdf)).astype(grad.dtype),)


exact_gelu.defvjp(_exact_gelu_forward, _exact_gelu_backward)


class Mlp(nn.Module):
  """fc1 -> GELU -> fc2 (timm `Mlp`)."""
  hidden_dim: int
  dtype: Any = jnp.float32
  # False: exact erf GELU, as timm's nn.GELU and the authors. True: the tanh form, not the recipe;
  # GPU compilers fuse it into fc1's matmul epilogue, but with `exact_gelu`'s lighter backward the
  # CIM step is estimated no faster with it (docs/BENCHMARKS.md).
  approximate_gelu: bool = False

  @nn.compact
  def __call__(self, x):
    out_dim = x.shape[-1]
    x = nn.Dense(self.hidden_dim, dtype=self.dtype, kernel_init=dense_init, name="fc1")(x)
    x = nn.gelu(x, approximate=True) if self.approximate_gelu else exact_gelu(x)
    return nn.Dense(out_dim, dtype=self.dtype, kernel_init=dense_init, name="fc2")(x)


def multi_head_attention(q, k, v, implementation: Optional[str] = None,
                         num_keys: Optional[int] = None):
  """(B, T, H, d) queries against (B, S, H, d) keys/values through the fused-kernel entry point.

  implementation None: `head_by_head_attention` on XLA:CPU for long sequences (`long_on_cpu`),
  else JAX's choice (XLA today); 'xla' always XLA's; 'cudnn' asks for cuDNN's fused kernel on
  NVIDIA GPUs (bfloat16 / float16 only), with odd lengths padded (see `even_length_attention`).
  num_keys: only the first num_keys keys are real, the rest is padding (masked).
  """
  if implementation == "cudnn":
    return even_length_attention(q, k, v, implementation, num_keys)
  if implementation is None and _key_lengths(k, num_keys) is None and long_on_cpu(q, k):
    return head_by_head_attention(q, k, v)
  return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=_key_lengths(k, num_keys),
                                      implementation=implementation)


# Below this many query x key pairs per head, XLA:CPU's batched attention is the faster form.
HEAD_BY_HEAD_MIN_PAIRS = 256 * 256


def long_on_cpu(q, k) -> bool:
  """True where JAX's choice of attention is `head_by_head_attention`: XLA:CPU, long sequences."""
  return jax.default_backend() == "cpu" and q.shape[1] * k.shape[1] >= HEAD_BY_HEAD_MIN_PAIRS


def _one_head_forward(q, k, v):
  """softmax(q k^T / sqrt(d)) v of one head, (B, T, d) on (B, S, d); and each score row's
  log-sum-exp (B, T)."""
  scores = jnp.einsum("btd,bsd->bts", q, k, preferred_element_type=jnp.float32)
  scores = scores / np.sqrt(q.shape[-1])
  row_max = jnp.max(scores, axis=-1, keepdims=True)
  weights = jnp.exp(scores - row_max)
  row_sum = jnp.sum(weights, axis=-1, keepdims=True)
  out = jnp.einsum("bts,bsd->btd", (weights / row_sum).astype(v.dtype), v)
  return out, (row_max + jnp.log(row_sum))[..., 0]


def _one_head_backward(q, k, v, out, log_sum_exp, grad):
  """The gradients of `_one_head_forward`'s output with respect to q, k and v."""
  scale = 1.0 / np.sqrt(q.shape[-1])
  # The probabilities again, from the saved log-sum-exp: nothing T x S is kept between passes.
  probs = jnp.exp(jnp.einsum("btd,bsd->bts", q, k, preferred_element_type=jnp.float32) * scale
                  - log_sum_exp[..., None])
  grad_v = jnp.einsum("bts,btd->bsd", probs.astype(grad.dtype), grad)
  grad_probs = jnp.einsum("btd,bsd->bts", grad, v, preferred_element_type=jnp.float32)
  row_dot = jnp.sum(grad.astype(jnp.float32) * out.astype(jnp.float32), -1, keepdims=True)
  grad_scores = (probs * (grad_probs - row_dot) * scale).astype(q.dtype)
  return (jnp.einsum("bts,bsd->btd", grad_scores, k),
          jnp.einsum("bts,btd->bsd", grad_scores, q), grad_v)


# Heads lead: (H, B, T, d). The loop runs over heads, never over the batch, so a batch sharded
# over devices stays sharded inside it.
@jax.custom_vjp
def _head_by_head(q, k, v):
  return _head_by_head_forward(q, k, v)[0]


def _head_by_head_forward(q, k, v):
  out, log_sum_exp = jax.lax.map(lambda args: _one_head_forward(*args), (q, k, v))
  return out, (q, k, v, out, log_sum_exp)


def _head_by_head_backward(residuals, grad_out):
  return jax.lax.map(lambda args: _one_head_backward(*args), (*residuals, grad_out))


_head_by_head.defvjp(_head_by_head_forward, _head_by_head_backward)


def head_by_head_attention(q, k, v):
  """Unmasked softmax attention of (B, T, H, d) queries on (B, S, H, d) keys/values, one head at
  a time (a loop over the H heads), forward and backward written out as in FlashAttention.

  Equal to `jax.nn.dot_product_attention` up to float32 rounding. Why: at ViT-B's 1,025 tokens
  (512 x 512 segmentation crops) XLA:CPU's batched form runs each step (scores, softmax,
  weighted sum) over all heads' T x S scores in turn, 100 MB round trips through memory; one
  head's 8 MB (batch 2) stays in cache. Forward + backward on the 2-core CPU, 12 heads of 64:
  0.19-0.25 s vs 0.52-0.64 s at batch 2 x 1,025 tokens, 0.08-0.10 vs 0.12 s at batch 8 x 257
  (bench/bench_attention.py). The backward recomputes the probabilities from the saved
  log-sum-exp instead of storing them.
  """
  heads_first = lambda x: jnp.moveaxis(x, 2, 0)
  return jnp.moveaxis(_head_by_head(heads_first(q), heads_first(k), heads_first(v)), 0, 2)


def _key_lengths(k, num_keys: Optional[int]):
  """key_value_seq_lengths masking the keys beyond num_keys (None: all keys are real)."""
  if num_keys is None or num_keys == k.shape[1]:
    return None
  return jnp.full((k.shape[0],), num_keys, jnp.int32)


def even_length_attention(q, k, v, implementation: Optional[str] = None,
                          num_keys: Optional[int] = None):
  """`jax.nn.dot_product_attention` on even sequence lengths, exactly equal to the unpadded one.

  cuDNN's fused kernel has no backward pass for odd lengths, and CIM's are odd (1 cls + a square
  grid: 17 exemplar, 101 context tokens). An odd query gets one zero row, sliced off the output
  (so it receives no gradient); odd keys/values get one zero key that the kernel's own padding
  mask (key_value_seq_lengths) hides, so every real query attends to exactly its real keys.
  Inputs already padded by the caller (see `even_padding`) pass num_keys, the real key count.
  """
  queries = q.shape[1]
  num_keys = k.shape[1] if num_keys is None else num_keys
  q = pad_tokens(q, q.shape[1] % 2, axis=1)
  k, v = (pad_tokens(t, k.shape[1] % 2, axis=1) for t in (k, v))
  out = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=_key_lengths(k, num_keys),
                                     implementation=implementation)
  return out[:, :queries]


def even_padding(tokens: int, implementation: Optional[str]) -> int:
  """Rows to append to a `tokens`-long sequence before its attention projections: 1 where the
  kernel needs even lengths (cuDNN) and `tokens` is odd, else 0.

  Padding the projections' input, not q, k and v, lets them leave their matmuls already padded
  (padding each afterwards is a copy); the extra key is masked, the extra output row dropped.
  """
  return tokens % 2 if implementation == "cudnn" else 0


def pad_tokens(x, count: int, axis: int = -2):
  """x with `count` zero rows appended along `axis` (the token axis)."""
  if not count:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, count)
  return jnp.pad(x, widths)


class SplitDense(nn.Module):
  """nn.Dense(parts * features) computed as `parts` matmuls, one per block of output columns.

  The parameters are nn.Dense's (names, shapes, init), so checkpoints and timm interop see one
  packed layer (timm's `qkv`); the outputs are `parts` separate (..., features) arrays. Each
  leaves its own matmul contiguous, where slicing one packed output copies it forward and
  concatenates the gradients backward: fewer bytes moved per step (docs/BENCHMARKS.md).
  """
  features: int
  parts: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", dense_init, (x.shape[-1], self.parts * self.features),
                        jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.parts * self.features,), jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    contract_last = (((x.ndim - 1,), (0,)), ((), ()))
    return [jax.lax.dot_general(x, w, contract_last) + b
            for w, b in zip(jnp.split(kernel, self.parts, axis=1), jnp.split(bias, self.parts))]


class SelfAttention(nn.Module):
  """timm `Attention`: one qkv projection (rows [q; k; v], heads contiguous), output proj."""
  num_heads: int
  dtype: Any = jnp.float32
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(self, x):
    batch, tokens, width = x.shape
    x = pad_tokens(x, even_padding(tokens, self.attention_impl))
    heads = lambda t: t.reshape(batch, t.shape[1], self.num_heads, width // self.num_heads)
    q, k, v = (heads(t) for t in SplitDense(width, 3, self.dtype, name="qkv")(x))
    out = multi_head_attention(q, k, v, self.attention_impl, num_keys=tokens)
    out = nn.Dense(width, dtype=self.dtype, kernel_init=dense_init, name="proj")(
        out.reshape(batch, -1, width))
    return out[:, :tokens]


class DropPath(nn.Module):
  """Per-sample stochastic depth (timm `DropPath`), using the 'dropout' rng."""
  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


class Block(nn.Module):
  """Pre-norm transformer block (timm `Block`)."""
  num_heads: int
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  attention_impl: Optional[str] = None
  approximate_gelu: bool = False

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    norm = functools.partial(nn.LayerNorm, epsilon=LAYERNORM_EPSILON, dtype=self.dtype)
    drop_path = DropPath(self.drop_path_rate)
    y = SelfAttention(self.num_heads, self.dtype, self.attention_impl, name="attn")(
        norm(name="norm1")(x))
    x = x + drop_path(y, deterministic)
    y = Mlp(int(x.shape[-1] * self.mlp_ratio), dtype=self.dtype,
            approximate_gelu=self.approximate_gelu, name="mlp")(norm(name="norm2")(x))
    return x + drop_path(y, deterministic)


class PatchEmbed(nn.Module):
  """Non-overlapping p x p patches -> width: nn.Conv's parameters and init, computed as one matmul.

  A stride-p convolution is a matmul over flattened (row, col, channel) patches; written as one,
  GPUs run it as a plain GEMM instead of a generic 3-channel cuDNN convolution kernel.
  """
  width: int
  patch_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    """images (B, H, W, C) -> (B, H/p, W/p, width)."""
    p = self.patch_size
    if images.ndim != 4 or images.shape[1] % p or images.shape[2] % p:
      raise ValueError(f"patch embedding needs (B, H, W, C) with H, W multiples of {p}, got "
                       f"shape {images.shape}")
    batch, height, width_px, channels = images.shape
    # Xavier-uniform over (C*p*p -> width) as a Linear, like the authors' frozen projection.
    kernel_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2),
                                                   out_axis=3)
    # Same names, shapes and creation order as nn.Conv: identical init, checkpoints and interop.
    kernel = self.param("kernel", kernel_init, (p, p, channels, self.width), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.width,), jnp.float32)
    grid_h, grid_w = height // p, width_px // p
    patches = images.astype(self.dtype).reshape(batch, grid_h, p, grid_w, p, channels)
    patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(batch, grid_h, grid_w, p * p * channels)
    out = jnp.dot(patches, kernel.astype(self.dtype).reshape(p * p * channels, self.width))
    return out + bias.astype(self.dtype)


class VisionTransformer(nn.Module):
  """ViT encoder; parameter names mirror timm's `VisionTransformer` (see cim_jax.interop)."""
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  patch_size: int = 16
  mlp_ratio: float = 4.0
  pos_embed_grid: int = 14
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  remat: bool = False
  pool: str = "none"  # 'none': all tokens; 'tok': cls token; 'gap': mean patch token + fc_norm
  num_classes: int = 0  # 0 = no classification head
  attention_impl: Optional[str] = None  # None: JAX's choice (XLA); 'cudnn': fused GPU kernel
  keep_block_outputs: bool = False  # intermediates['blocks']: every block's output tokens
  approximate_gelu: bool = False  # tanh GELU (not the recipe, see Mlp); False: exact, as timm
  # False: no final LayerNorm ('norm') on the tokens (pool 'none' / 'tok'), e.g. a segmentation
  # backbone that reads block outputs only, so it holds no parameter without a gradient.
  final_norm: bool = True

  @nn.compact
  def __call__(self, images, *, cls_token=None, train: bool = False):
    """images (B, H, W, 3) normalised -> (output, intermediates)."""
    if self.pool not in ("none", "tok", "gap"):
      raise ValueError(f"pool must be 'none', 'tok' or 'gap', got {self.pool!r}")
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be (B, H, W, 3), got shape {images.shape}")
    height, width_px = images.shape[1:3]
    if height % self.patch_size or width_px % self.patch_size:
      raise ValueError(
          f"image size {height}x{width_px} is not a multiple of patch {self.patch_size}")
    grid = (height // self.patch_size, width_px // self.patch_size)
    intermediates = {}

    x = PatchEmbed(self.width, self.patch_size, self.dtype, name="patch_embed")(images)
    x = x.reshape(x.shape[0], grid[0] * grid[1], self.width)

    own_cls = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, self.width), jnp.float32)
    cls = own_cls if cls_token is None else jnp.asarray(cls_token).reshape(1, 1, self.width)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, self.width)), x], 1)
    pos = resampled_pos_embed(self.width, grid, self.pos_embed_grid)
    x = x + jnp.asarray(pos, x.dtype)

    block_cls = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
    drop_rates = np.linspace(0.0, self.drop_path_rate, self.depth)  # timm's stochastic-depth rule
    block_outputs = []
    for i in range(self.depth):
      x = block_cls(self.num_heads, self.mlp_ratio, float(drop_rates[i]), self.dtype,
                    self.attention_impl, self.approximate_gelu, name=f"blocks_{i}")(x, not train)
      block_outputs.append(x)
    if self.keep_block_outputs:
      intermediates["blocks"] = block_outputs

    norm = functools.partial(nn.LayerNorm, epsilon=LAYERNORM_EPSILON, dtype=self.dtype)
    if self.pool == "gap":
      # timm with global_pool='avg': no final norm, LayerNorm (fc_norm) after pooling patch tokens.
      intermediates["tokens"] = x
      out = norm(name="fc_norm")(x[:, 1:].mean(axis=1))
    else:
      x = norm(name="norm")(x) if self.final_norm else x
      intermediates["tokens"] = x
      out = x[:, 0] if self.pool == "tok" else x
    intermediates["pre_logits"] = out
    if self.num_classes:
      out = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                     name="head")(out).astype(jnp.float32)  # float32 logits for the loss
    return out, intermediates


def encoder_from_config(model_config, *, pool: str = "none", num_classes: int = 0,
                        **overrides) -> VisionTransformer:
  """The VisionTransformer a `config.model` describes."""
  fields = decode_variant(model_config.variant)
  fields.update(mlp_ratio=float(model_config.mlp_ratio),
                pos_embed_grid=int(model_config.pos_embed_grid),
                drop_path_rate=float(model_config.drop_path_rate),
                dtype=compute_dtype(model_config.dtype), remat=bool(model_config.remat),
                pool=pool, num_classes=num_classes,
                attention_impl=attention_impl(model_config),
                approximate_gelu=bool(model_config.get("approximate_gelu", False)))
  fields.update(overrides)
  return VisionTransformer(**fields)


def attention_impl(model_config) -> Optional[str]:
  """config.model.attention_impl: '' (JAX's choice) or 'xla' / 'cudnn'."""
  name = str(model_config.get("attention_impl", "") or "")
  if name not in ("", "xla", "cudnn"):
    raise ValueError(f"model.attention_impl must be '', 'xla' or 'cudnn', got {name!r}")
  return name or None


def compute_dtype(name: str):
  """'float32' | 'bfloat16' -> the jnp dtype."""
  dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
  if str(name) not in dtypes:
    raise ValueError(f"model.dtype must be one of {sorted(dtypes)}, got {name!r}")
  return dtypes[str(name)]


def init_encoder_params(encoder, image_size: int, seed: int):
  """Randomly initialised encoder parameters (the 'before pre-training' reference)."""
  dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  # jit: eager initialisation dispatches op by op and is many times slower on CPU.
  return jax.jit(lambda rng: encoder.init(rng, dummy, train=False))(jax.random.key(seed))["params"]
