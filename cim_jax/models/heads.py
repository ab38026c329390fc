"""Global-loss heads (BatchNorm MLP projector / predictor), InfoNCE loss (docs/METHOD.md §3)."""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from cim_jax.models.vit import dense_init


class GroupBatchNorm(nn.Module):
  """torch BatchNorm1d over axis -2 of (G, B, D), statistics computed separately per group G.

  The authors run the online heads once per exemplar, so each exemplar index has its own batch
  statistics; G carries that index. Running statistics follow torch (momentum 0.1, unbiased
  variance), averaged over the groups. Under a global `jax.jit` the batch axis spans all devices,
  i.e. these are synchronised (SyncBatchNorm-style) statistics.
  """
  use_affine: bool = True
  momentum: float = 0.1
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, train: bool):
    dim = x.shape[-1]
    running_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((dim,), jnp.float32))
    running_var = self.variable("batch_stats", "var", lambda: jnp.ones((dim,), jnp.float32))
    x = x.astype(jnp.float32)
    if train:
      mean = x.mean(axis=-2, keepdims=True)
      var = jnp.square(x - mean).mean(axis=-2, keepdims=True)
      if not self.is_initializing():
        count = x.shape[-2]
        group_axes = tuple(range(x.ndim - 1))
        unbiased = var * count / max(count - 1, 1)
        running_mean.value = ((1 - self.momentum) * running_mean.value
                              + self.momentum * mean.mean(axis=group_axes))
        running_var.value = ((1 - self.momentum) * running_var.value
                             + self.momentum * unbiased.mean(axis=group_axes))
    else:
      mean, var = running_mean.value, running_var.value
    y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
    if self.use_affine:
      y = y * self.param("scale", nn.initializers.ones, (dim,), jnp.float32)
      y = y + self.param("bias", nn.initializers.zeros, (dim,), jnp.float32)
    return y


class MLPHead(nn.Module):
  """The authors' `build_mlp`: [Linear(no bias) -> BN -> ReLU] * (L-1) -> Linear -> BN(no affine).

  Layer l is named fc{l} / bn{l}; in the authors' nn.Sequential they sit at index 3l / 3l+1.
  """
  num_layers: int
  hidden_dim: int = 4096
  output_dim: int = 256
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    """x (G, B, D) -> (G, B, output_dim) float32."""
    for layer in range(self.num_layers):
      last = layer == self.num_layers - 1
      features = self.output_dim if last else self.hidden_dim
      x = nn.Dense(features, use_bias=False, dtype=self.dtype, kernel_init=dense_init,
                   name=f"fc{layer}")(x)
      x = GroupBatchNorm(use_affine=not last, name=f"bn{layer}")(x, train)
      if not last:
        x = nn.relu(x).astype(self.dtype)
    return x


def l2_normalize(x, eps: float = 1e-12):
  """torch.nn.functional.normalize: x / max(||x||, eps) per row (zero rows stay zero)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def info_nce_loss(online_predictions, target_projections, temperature: float,
                  axis_name: Optional[str] = None):
  """Authors' contrastive loss, summed over exemplars: CE(q_n . k_all / T, own index) * 2T.

  online_predictions (N, B, P), target_projections (B, P). With `axis_name` (inside shard_map /
  a named-axis map) the targets are all-gathered over that axis and the positives offset by the
  device index, as the authors' concat_all_gather does; under a global jit (axis_name=None) the
  arrays already span every device and XLA inserts the gather. Gradients reach only the online
  predictions (the gathered targets carry none, as in the authors' code).
  """
  q = l2_normalize(online_predictions.astype(jnp.float32))
  k = jax.lax.stop_gradient(l2_normalize(target_projections.astype(jnp.float32)))
  batch = q.shape[1]
  offset = 0
  if axis_name is not None:
    k = jax.lax.all_gather(k, axis_name, tiled=True)
    offset = jax.lax.axis_index(axis_name) * batch
  logits = jnp.einsum("nbc,mc->nbm", q, k, precision="highest") / temperature
  labels = offset + jnp.arange(batch)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  positive = jnp.take_along_axis(log_probs, labels[None, :, None], axis=-1)[..., 0]
  # With axis_name this is the device's own loss (as per GPU in the authors' DDP run); its mean
  # over the axis equals the global-view loss.
  return -positive.mean(axis=1).sum(axis=0) * (2 * temperature)
