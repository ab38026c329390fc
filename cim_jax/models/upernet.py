"""ViT backbone + feature pyramid + UperNet decode head + FCN auxiliary head (docs/METHOD.md §7).

mmsegmentation semantics throughout: ConvModule = conv without bias + BatchNorm (torch's
eps 1e-5, momentum 0.1) + ReLU; every resize is bilinear with align_corners=False; the decode
heads end in channel dropout (Dropout2d) and a 1x1 classifier with bias.
"""

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cim_jax.errors import ConfigError
from cim_jax.models import vit

# mmseg's ignore label; the same value as cim_jax.data.segmentation.IGNORE_INDEX (models and data
# never import each other).
IGNORE_INDEX = 255

# The conv forms of `conv2d_same`. 'xla': lax.conv_general_dilated differentiated by JAX, the
# backends' own kernels. 'split_grad': the same forward; the input gradient as a forward conv with
# the flipped kernel and the kernel gradient as one matmul per tap over shifted input views: on
# XLA:CPU the autodiff forms of both ran at about half the forward's FLOP rate, and with them the
# head's 3x3 convs took ~1.4x PyTorch's time (bench/bench_segmentation_step.py). 'matmul': one
# matmul to k*k*out channels and a sum of shifted slices forward, the backward as two matmuls
# with the gradient's k*k shifted copies: faster on XLA:CPU where out < in (2048 -> 512), slower
# where out = in. 'shifted': the forward as one matmul per tap. 'winograd': Winograd F(2x2, 3x3)
# (below), 4/9 of the direct conv's matmul FLOPs; on XLA:CPU (2 cores, oneDNN, batch 2,
# forward + backward) 2048->512 at 128x128 took 11.9 s vs 'matmul' 15.5 s, 512->512 at 128, 64,
# 32 took 3.3 / 0.58 / 0.15 s vs 'split_grad' 4.5 / 0.98 / 0.24 s; 2816->512 at 16x16 and
# 768->256 at 32x32 tied with 'matmul'. 'winograd4': F(4x4, 3x3), 1/4 of the direct FLOPs;
# without oneDNN (the trainer's default), batch 2, forward + backward: 2048->512 at 128x128
# 3.3 s vs 'winograd' 4.7 s, 512->512 at 128 / 64 0.95 / 0.20 s vs 1.19 / 0.29 s, tied at 32.
# 'auto': on the CPU 'winograd4' on maps of >= 64x64 pixels, else 'winograd' where out >= in,
# else 'matmul'; 'xla' on other backends.
CONV_IMPLS = ("auto", "xla", "split_grad", "matmul", "shifted", "winograd", "winograd4")

# mmcv's ConvModule init: kaiming normal, fan_out, ReLU gain; conv_seg: normal(0.01), zero bias.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
classifier_init = nn.initializers.normal(0.01)


def feature_blocks(depth: int, configured: Sequence[int] = ()) -> tuple[int, ...]:
  """1-based blocks whose outputs feed the pyramid: `configured`, else depth/3, /2, 2/3, depth.

  12 -> (4, 6, 8, 12) as BEiT/MAE's ViT-B; 24 -> (8, 12, 16, 24); tiny depths clamp to >= 1.
  """
  if configured:
    blocks = tuple(int(b) for b in configured)
    if len(blocks) != 4 or not all(1 <= b <= depth for b in blocks):
      raise ConfigError(f"segmentation.feature_blocks must be 4 block numbers in 1..{depth}, "
                        f"got {tuple(configured)}")
    return blocks
  # Half-up rounding (Python's round() would send 4.5 to 4).
  return tuple(max(1, int(math.floor(depth * f + 0.5))) for f in (1 / 3, 1 / 2, 2 / 3)) + (depth,)


# ----------------------------------------------------------------------------------------------
# Resampling as small constant matrices: exact torch semantics, and plain matmuls on every backend.


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) matrix of torch's F.interpolate(mode='bilinear', align_corners=False) on one axis."""
  # torch (CPU, float32): scale = in / out, source = scale * (i + 0.5) - 0.5 clamped at 0, the
  # upper tap clamped at the last pixel.
  scale = np.float32(in_size) / np.float32(out_size)
  src = np.maximum(scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5))
                   - np.float32(0.5), np.float32(0.0))
  low = np.minimum(np.floor(src).astype(int), in_size - 1)
  high = np.minimum(low + 1, in_size - 1)
  frac = (src - low).astype(np.float64)
  matrix = np.zeros((out_size, in_size), np.float64)
  np.add.at(matrix, (np.arange(out_size), low), 1.0 - frac)
  np.add.at(matrix, (np.arange(out_size), high), frac)
  return matrix.astype(np.float32)


def adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) matrix of torch's AdaptiveAvgPool on one axis: bin i averages
  [floor(i * in / out), ceil((i + 1) * in / out)), bins overlapping where out does not divide in."""
  matrix = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    start, end = (i * in_size) // out_size, -((-(i + 1) * in_size) // out_size)
    matrix[i, start:end] = 1.0 / (end - start)
  return matrix.astype(np.float32)


def resample(x, rows: np.ndarray, cols: np.ndarray):
  """(B, H, W, C) -> (B, h, w, C) with (h, H) row and (w, W) column matrices."""
  x = jnp.einsum("oh,bhwc->bowc", jnp.asarray(rows, x.dtype), x)
  return jnp.einsum("pw,bowc->bopc", jnp.asarray(cols, x.dtype), x)


def resize_bilinear(x, size: Sequence[int]):
  """(B, H, W, C) -> (B, *size, C), torch bilinear with align_corners=False (mmseg's `resize`)."""
  height, width = x.shape[1:3]
  if (height, width) == tuple(size):
    return x
  return resample(x, bilinear_matrix(height, size[0]), bilinear_matrix(width, size[1]))


def adaptive_avg_pool(x, scale: int):
  """(B, H, W, C) -> (B, scale, scale, C), torch's F.adaptive_avg_pool2d."""
  return resample(x, adaptive_pool_matrix(x.shape[1], scale),
                  adaptive_pool_matrix(x.shape[2], scale))


# ----------------------------------------------------------------------------------------------
# Layers.


def _xla_conv(x, kernel):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _shifted_views(x, size: int):
  """The k*k (B, H, W, C) windows of x zero-padded by k // 2, tap (i, j) at index i * k + j."""
  pad = size // 2
  height, width = x.shape[1:3]
  padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  return [padded[:, i:i + height, j:j + width] for i in range(size) for j in range(size)]


@jax.custom_vjp
def _split_grad_conv(x, kernel):
  return _xla_conv(x, kernel)


def _split_grad_forward(x, kernel):
  return _xla_conv(x, kernel), (x, kernel)


def _split_grad_backward(residuals, grad):
  x, kernel = residuals
  size = kernel.shape[0]
  # d/dx of a 'same' stride-1 conv: the conv of grad with the flipped, in/out-swapped kernel.
  grad_x = _xla_conv(grad, jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2))
  contract_pixels = (((0, 1, 2), (0, 1, 2)), ((), ()))
  grad_kernel = jnp.stack([jax.lax.dot_general(view, grad, contract_pixels)
                           for view in _shifted_views(x, size)])
  return grad_x, grad_kernel.reshape(kernel.shape).astype(kernel.dtype)


_split_grad_conv.defvjp(_split_grad_forward, _split_grad_backward)


def _shifted_gradient(grad, size: int):
  """(B, H, W, k*k*O): tap (i, j) holds grad shifted so that the tap's kernel slice pairs it with
  the input pixel it touched (the transpose of `_shifted_views`)."""
  pad = size // 2
  height, width = grad.shape[1:3]
  padded = jnp.pad(grad, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  start = 2 * pad
  return jnp.concatenate([padded[:, start - i:start - i + height, start - j:start - j + width]
                          for i in range(size) for j in range(size)], axis=-1)


def _matmul_conv_forward(x, kernel):
  size, _, channels, features = kernel.shape
  pad = size // 2
  batch, height, width, _ = x.shape
  # Every tap's contribution at the input pixel, then summed where it lands: out[h, w] =
  # sum_ij x[h + i - pad, w + j - pad] @ kernel[i, j].
  taps = jnp.dot(x, kernel.transpose(2, 0, 1, 3).reshape(channels, size * size * features))
  taps = jnp.pad(taps.reshape(batch, height, width, size * size, features),
                 ((0, 0), (pad, pad), (pad, pad), (0, 0), (0, 0)))
  out = [taps[:, i:i + height, j:j + width, i * size + j] for i in range(size) for j in range(size)]
  return sum(out[1:], out[0]), (x, kernel)


def _matmul_conv_backward(residuals, grad):
  x, kernel = residuals
  size, _, channels, features = kernel.shape
  shifted = _shifted_gradient(grad, size)
  grad_x = jnp.dot(shifted, kernel.transpose(0, 1, 3, 2).reshape(size * size * features, channels))
  grad_kernel = jax.lax.dot_general(x, shifted, (((0, 1, 2), (0, 1, 2)), ((), ())))
  grad_kernel = grad_kernel.reshape(channels, size, size, features).transpose(1, 2, 0, 3)
  return grad_x, grad_kernel.astype(kernel.dtype)


@jax.custom_vjp
def _matmul_conv(x, kernel):
  return _matmul_conv_forward(x, kernel)[0]


_matmul_conv.defvjp(_matmul_conv_forward, _matmul_conv_backward)


# Winograd F(m x m, 3x3) (Lavin & Gray 2015, "Fast Algorithms for Convolutional Neural Networks",
# eq. 7-10): Y = A^T [(G g G^T) * (B^T d B)] A for an (m + 2)^2 input tile d, a 3x3 kernel g and
# an m x m output tile Y. F(2x2): 16 products per 4 outputs instead of 36 (4/9 of the direct
# conv's matmul work); F(4x4): 36 per 16 instead of 144 (1/4), at a larger float32 rounding error
# (about 2e-5 of the output's scale against 1e-6; the interpolation points 0, +-1, +-2). B^T, G and
# A^T are applied as sums of slices scaled by their entries (below), which keeps them cheap.
WINOGRAD = {
    2: dict(input=((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
            kernel=((1, 0, 0), (1 / 2, 1 / 2, 1 / 2), (1 / 2, -1 / 2, 1 / 2), (0, 0, 1)),
            output=((1, 1, 1, 0), (0, 1, -1, -1))),
    4: dict(input=((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
                   (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1)),
            kernel=((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
                    (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1)),
            output=((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0),
                    (0, 1, -1, 8, -8, 1))),
}


def _combine(parts, row):
  """sum_k row[k] * parts[k], skipping zero entries and multiplying only where |entry| != 1."""
  terms = [p if c == 1 else -p if c == -1 else c * p for c, p in zip(row, parts) if c]
  return sum(terms[1:], terms[0])


def _winograd_input_rows(d, axis: int, tiles: int, tile: int):
  """B^T along `axis` on every (tile + 2)-long window at stride `tile`: tile + 2 arrays of
  `tiles` each."""
  parts = [jax.lax.slice_in_dim(d, k, k + tile * (tiles - 1) + 1, tile, axis)
           for k in range(tile + 2)]
  return [_combine(parts, row) for row in WINOGRAD[tile]["input"]]


def _overlap_add(parts, axis: int, tile: int):
  """The transpose of windowing: parts[k] holds element k of each (tile + 2)-long window at stride
  `tile` along `axis`; returns their sum at the positions they came from (length tile * tiles + 2).
  Dense reshapes and two shifted adds, where autodiff's transpose of the strided slices pads and
  sums tile + 2 full-size arrays per axis (measured: the slowest fusions of the step's backward)."""
  tiles = parts[0].shape[axis]
  merged = lambda t: t.reshape(t.shape[:axis] + (tiles * tile,) + t.shape[axis + 2:])
  widths = lambda before, after, ndim, at: [(before, after) if i == at else (0, 0)
                                            for i in range(ndim)]
  head = merged(jnp.stack(parts[:tile], axis + 1))  # window elements 0..tile-1: one tile each
  # Elements tile, tile + 1 land on the next tile's first two positions.
  tail = jnp.stack(parts[tile:], axis + 1)
  tail = merged(jnp.pad(tail, widths(0, tile - 2, tail.ndim, axis + 1)))
  return (jnp.pad(head, widths(0, 2, head.ndim, axis))
          + jnp.pad(tail, widths(tile, 0, tail.ndim, axis))[
              (slice(None),) * axis + (slice(0, tiles * tile + 2),)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _winograd_input(padded, tile: int, tiles_h: int, tiles_w: int):
  """V = B^T d B of every input tile: (tile + 2)^2 arrays (B, tiles_h, tiles_w, C) stacked, index
  (tile + 2) * row + column; rows then columns."""
  return jnp.stack([c for r in _winograd_input_rows(padded, 1, tiles_h, tile)
                    for c in _winograd_input_rows(r, 2, tiles_w, tile)])


def _winograd_input_forward(padded, tile, tiles_h, tiles_w):
  return _winograd_input(padded, tile, tiles_h, tiles_w), None


def _winograd_input_backward(tile, tiles_h, tiles_w, _, grad):
  span = tile + 2
  b_t = WINOGRAD[tile]["input"]
  grad = grad.reshape(span, span, *grad.shape[1:])
  # B applied to the gradient (the transpose of B^T), columns then rows, each followed by the
  # overlap-add of the windows.
  untransform = lambda parts: [_combine(parts, [b_t[j][k] for j in range(span)])
                               for k in range(span)]
  rows = [_overlap_add(untransform([grad[r, j] for j in range(span)]), 2, tile)
          for r in range(span)]
  return (_overlap_add(untransform(rows), 1, tile),)


_winograd_input.defvjp(_winograd_input_forward, _winograd_input_backward)


def _winograd_conv(x, kernel, tile: int = 2):
  """Stride-1 'same' 3x3 conv as Winograd F(tile x tile, 3x3) in jnp: autodiff's backward stays in
  the Winograd domain too (the transforms are linear, the matmuls' transposes matmuls); the input
  transform has its transpose written out (`_overlap_add`)."""
  transforms = WINOGRAD[tile]
  span = tile + 2  # input tile side
  batch, height, width, channels = x.shape
  features = kernel.shape[3]
  tiles_h, tiles_w = -(-height // tile), -(-width // tile)
  # 'same' padding 1, then up to tile * tiles + 2 so that every input tile is in range.
  padded = jnp.pad(x, ((0, 0), (1, tile * tiles_h + 1 - height),
                       (1, tile * tiles_w + 1 - width), (0, 0)))

  def kernel_rows(g, axis):
    parts = [jax.lax.index_in_dim(g, k, axis, keepdims=False) for k in range(3)]
    return [_combine(parts, row) for row in transforms["kernel"]]

  def output_rows(m, axis):
    parts = [jax.lax.index_in_dim(m, k, axis, keepdims=False) for k in range(span)]
    return jnp.stack([_combine(parts, row) for row in transforms["output"]], axis)

  v = _winograd_input(padded, tile, tiles_h, tiles_w)
  v = v.reshape(span * span, batch * tiles_h * tiles_w, channels)
  # U = G g G^T: rows then columns, as sums (an einsum with G made 2816->512 at 16x16 1.7x slower).
  u = jnp.stack(kernel_rows(jnp.stack(kernel_rows(kernel, 0)), 1), 1)
  u = u.reshape(span * span, channels, features)
  m = jax.lax.dot_general(v, u, (((2,), (1,)), ((0,), (0,))))  # (span^2, tiles, O)
  m = m.reshape(span, span, batch, tiles_h, tiles_w, features)
  y = output_rows(output_rows(m, 0), 1)  # (tile, tile, B, th, tw, O)
  y = y.transpose(2, 3, 0, 4, 1, 5).reshape(batch, tile * tiles_h, tile * tiles_w, features)
  return y[:, :height, :width]


def check_conv_impl(impl: str) -> str:
  """impl if it names a conv form (CONV_IMPLS), else a ConfigError."""
  if impl not in CONV_IMPLS:
    raise ConfigError(f"segmentation.conv_impl must be one of {CONV_IMPLS}, got {impl!r}")
  return impl


def auto_conv_impl(in_channels: int, out_channels: int, backend: str, pixels: int) -> str:
  """The form 'auto' picks for a 3x3 layer over `pixels` = H * W (measured on XLA:CPU, see
  CONV_IMPLS)."""
  if backend != "cpu":
    return "xla"
  if pixels >= 64 * 64:
    return "winograd4"
  return "winograd" if out_channels >= in_channels else "matmul"


def conv2d_same(x, kernel, impl: str = "xla"):
  """Stride-1 convolution of (B, H, W, C) with an odd (k, k, C, O) kernel, zero 'same' padding."""
  impl = check_conv_impl(impl)
  if kernel.shape[0] == 1:
    return jnp.dot(x, kernel[0, 0])
  if impl == "auto":
    impl = auto_conv_impl(kernel.shape[2], kernel.shape[3], jax.default_backend(),
                          x.shape[1] * x.shape[2])
  if impl == "xla":
    return _xla_conv(x, kernel)
  if impl == "split_grad":
    return _split_grad_conv(x, kernel)
  if impl == "matmul":
    return _matmul_conv(x, kernel)
  if impl in ("winograd", "winograd4"):
    # Winograd's F(m x m, 3x3) is for 3x3 kernels only; other sizes take another CPU form.
    if kernel.shape[0] != 3:
      return _split_grad_conv(x, kernel)
    return _winograd_conv(x, kernel, tile=4 if impl == "winograd4" else 2)
  taps = [jnp.dot(view, tap) for view, tap in zip(_shifted_views(x, kernel.shape[0]),
                                                  kernel.reshape(-1, *kernel.shape[2:]))]
  return sum(taps[1:], taps[0])


class Conv(nn.Module):
  """Stride-1 'same' k x k convolution (torch Conv2d(k, padding=k // 2)); kernel (k, k, in, out)."""
  features: int
  kernel_size: int = 1
  use_bias: bool = False
  dtype: Any = jnp.float32
  impl: str = "xla"
  kernel_init: Any = conv_init

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features),
                        jnp.float32)
    y = conv2d_same(x.astype(self.dtype), kernel.astype(self.dtype), self.impl)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32
                         ).astype(self.dtype)
    return y


class BatchNorm(nn.Module):
  """torch BatchNorm2d over (B, H, W, C): statistics in float32, over every axis but channels.

  Training normalises with the biased batch variance and tracks the unbiased one, as torch does
  (flax's nn.BatchNorm tracks the biased one). In a jitted step over globally sharded arrays the
  batch mean is the global one: mmseg's SyncBN.
  """
  momentum: float = 0.9  # flax convention: torch momentum 0.1
  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    running_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
    x32 = x.astype(jnp.float32)
    if train:
      axes = tuple(range(x.ndim - 1))
      mean = x32.mean(axes)
      var = jnp.square(x32 - mean).mean(axes)
      if not self.is_initializing():
        count = x.size // features
        unbiased = var * (count / max(count - 1, 1))
        running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
        running_var.value = self.momentum * running_var.value + (1 - self.momentum) * unbiased
    else:
      mean, var = running_mean.value, running_var.value
    multiplier = scale * jax.lax.rsqrt(var + self.epsilon)
    return (x32 * multiplier + (bias - mean * multiplier)).astype(self.dtype)


class ConvModule(nn.Module):
  """mmcv ConvModule: conv without bias -> BatchNorm -> ReLU."""
  features: int
  kernel_size: int = 1
  dtype: Any = jnp.float32
  conv_impl: str = "xla"

  @nn.compact
  def __call__(self, x, train: bool):
    x = Conv(self.features, self.kernel_size, dtype=self.dtype, impl=self.conv_impl,
             name="conv")(x)
    return nn.relu(BatchNorm(dtype=self.dtype, name="bn")(x, train))


class Deconv2x2(nn.Module):
  """torch ConvTranspose2d(kernel 2, stride 2) as one matmul to 4 x out channels and a pixel
  shuffle; kernel (2, 2, in, out) = torch weight.permute(2, 3, 0, 1)."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    # torch's default init: uniform(+-1 / sqrt(fan_in)), fan_in = out channels x 2 x 2 here.
    bound = 1.0 / math.sqrt(4 * self.features)
    init = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)
    kernel = self.param("kernel", init, (2, 2, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", init, (self.features,), jnp.float32)
    batch, height, width, _ = x.shape
    y = jnp.einsum("bhwc,ijco->bhiwjo", x.astype(self.dtype), kernel.astype(self.dtype))
    return y.reshape(batch, 2 * height, 2 * width, self.features) + bias.astype(self.dtype)


class Pyramid(nn.Module):
  """BEiT/MAE segmentation neck: four same-size maps -> strides 4, 8, 16, 32 (x4, x2, x1, /2)."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, maps, train: bool):
    width = maps[0].shape[-1]
    x = Deconv2x2(width, self.dtype, name="fpn1_0")(maps[0])
    x = vit.exact_gelu(BatchNorm(dtype=self.dtype, name="fpn1_1")(x, train))
    level0 = Deconv2x2(width, self.dtype, name="fpn1_3")(x)
    level1 = Deconv2x2(width, self.dtype, name="fpn2_0")(maps[1])
    level3 = nn.max_pool(maps[3].astype(self.dtype), (2, 2), strides=(2, 2))
    return [level0, level1, maps[2].astype(self.dtype), level3]


class Classifier(nn.Module):
  """mmseg BaseDecodeHead.cls_seg: Dropout2d (whole channels) -> 1x1 conv with bias, float32."""
  num_classes: int
  dropout: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dropout(self.dropout, broadcast_dims=(1, 2), deterministic=not train)(x)
    logits = Conv(self.num_classes, 1, use_bias=True, dtype=self.dtype,
                  kernel_init=classifier_init, name="conv_seg")(x)
    return logits.astype(jnp.float32)


class UperHead(nn.Module):
  """mmseg UPerHead: pyramid pooling on the last level, FPN top-down, fused at the first level."""
  num_classes: int
  channels: int = 512
  pool_scales: tuple[int, ...] = (1, 2, 3, 6)
  dropout: float = 0.1
  dtype: Any = jnp.float32
  conv_impl: str = "xla"

  @nn.compact
  def __call__(self, levels, train: bool):
    conv = lambda k, name: ConvModule(self.channels, k, self.dtype, self.conv_impl, name=name)
    top = levels[-1]
    pooled = [resize_bilinear(conv(1, f"psp_modules_{i}")(adaptive_avg_pool(top, scale), train),
                              top.shape[1:3])
              for i, scale in enumerate(self.pool_scales)]
    psp = conv(3, "bottleneck")(jnp.concatenate([top] + pooled, axis=-1), train)
    laterals = [conv(1, f"lateral_convs_{i}")(x, train) for i, x in enumerate(levels[:-1])]
    laterals.append(psp)
    for i in range(len(laterals) - 1, 0, -1):
      laterals[i - 1] = laterals[i - 1] + resize_bilinear(laterals[i], laterals[i - 1].shape[1:3])
    outs = [conv(3, f"fpn_convs_{i}")(x, train) for i, x in enumerate(laterals[:-1])]
    outs.append(laterals[-1])
    size = outs[0].shape[1:3]
    fused = jnp.concatenate([resize_bilinear(x, size) for x in outs], axis=-1)
    features = conv(3, "fpn_bottleneck")(fused, train)
    return Classifier(self.num_classes, self.dropout, self.dtype, name="cls")(features, train)


class FCNHead(nn.Module):
  """mmseg FCNHead(num_convs=1, concat_input=False): 3x3 ConvModule -> classifier."""
  num_classes: int
  channels: int = 256
  dropout: float = 0.1
  dtype: Any = jnp.float32
  conv_impl: str = "xla"

  @nn.compact
  def __call__(self, x, train: bool):
    x = ConvModule(self.channels, 3, self.dtype, self.conv_impl, name="convs_0")(x, train)
    return Classifier(self.num_classes, self.dropout, self.dtype, name="cls")(x, train)


class Segmenter(nn.Module):
  """ViT -> pyramid -> UperNet logits at stride 4 and FCN auxiliary logits at stride 16."""
  backbone: vit.VisionTransformer
  num_classes: int
  blocks: tuple[int, ...] = (4, 6, 8, 12)  # 1-based, see `feature_blocks`
  channels: int = 512
  pool_scales: tuple[int, ...] = (1, 2, 3, 6)
  aux_channels: int = 256
  dropout: float = 0.1
  conv_impl: str = "xla"  # see CONV_IMPLS

  @nn.compact
  def __call__(self, images, *, train: bool):
    """Normalised images (B, H, W, 3) -> (logits (B, H/4, W/4, C) float32, intermediates)."""
    _, backbone_out = self.backbone(images, train=train)
    patch = self.backbone.patch_size
    batch, height, width = images.shape[:3]
    grid = (height // patch, width // patch)
    maps = [backbone_out["blocks"][b - 1][:, 1:].reshape(batch, *grid, -1) for b in self.blocks]
    dtype = self.backbone.dtype
    levels = Pyramid(dtype, name="neck")(maps, train)
    logits = UperHead(self.num_classes, self.channels, tuple(self.pool_scales), self.dropout,
                      dtype, self.conv_impl, name="decode_head")(levels, train)
    aux_logits = FCNHead(self.num_classes, self.aux_channels, self.dropout, dtype,
                         self.conv_impl, name="auxiliary_head")(levels[2], train)
    return logits, {"aux_logits": aux_logits}


def build_segmenter(model_config, seg_config, num_classes: int) -> Segmenter:
  """The Segmenter of `config.model` (the pre-training encoder) and `config.segmentation`."""
  backbone = vit.encoder_from_config(model_config, pool="none", keep_block_outputs=True,
                                     final_norm=False)
  conv_impl = check_conv_impl(str(seg_config.get("conv_impl", "auto")))
  return Segmenter(
      backbone=backbone, num_classes=int(num_classes),
      blocks=feature_blocks(backbone.depth, tuple(seg_config.get("feature_blocks", ()) or ())),
      channels=int(seg_config.channels), pool_scales=tuple(int(s) for s in seg_config.pool_scales),
      aux_channels=int(seg_config.aux_channels), dropout=float(seg_config.dropout),
      conv_impl=conv_impl)


# ----------------------------------------------------------------------------------------------
# Loss.


def pixel_cross_entropy(logits, labels, ignore_index: int = IGNORE_INDEX):
  """Softmax CE of logits (B, h, w, C) resized bilinearly to labels (B, H, W); pixels labelled
  ignore_index add 0, and the sum is divided by ALL B*H*W pixels (mmseg's default
  avg_non_ignore=False), not by the valid ones."""
  labels = labels.astype(jnp.int32)
  logits = resize_bilinear(logits.astype(jnp.float32), labels.shape[1:3])
  valid = labels != ignore_index
  target = jnp.take_along_axis(logits, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
  nll = jax.nn.logsumexp(logits, axis=-1) - target
  return jnp.sum(jnp.where(valid, nll, 0.0)) / labels.size


def segmentation_loss(logits, aux_logits, labels, *, aux_weight: float = 0.4,
                      ignore_index: int = IGNORE_INDEX):
  """decode CE + aux_weight * auxiliary CE -> (loss, {'decode_loss', 'aux_loss'})."""
  decode = pixel_cross_entropy(logits, labels, ignore_index)
  aux = pixel_cross_entropy(aux_logits, labels, ignore_index)
  return decode + aux_weight * aux, {"decode_loss": decode, "aux_loss": aux}
