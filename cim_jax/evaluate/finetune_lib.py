"""Fine-tuning pieces: classifier model, layer-wise lr decay, optimizer, mixup / cutmix, steps."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from cim_jax.models import cim
from cim_jax.models import vit


@flax.struct.dataclass
class FinetuneState:
  """Everything a resumed fine-tuning run needs besides the data iterator."""
  step: jax.Array
  params: Any
  opt_state: Any
  best_top1: jax.Array  # best evaluation top-1 so far (kept across restarts)


def build_classifier(config, num_classes: int):
  """ViT with mean pooling + fc_norm + linear head (drop path: config.model.drop_path_rate)."""
  return vit.encoder_from_config(config.model, pool="gap", num_classes=num_classes)


def layer_id(path: tuple[str, ...], depth: int) -> int:
  """BEiT / MAE layer index: embeddings 0, block i -> i + 1, everything after -> depth + 1."""
  name = path[0]
  if name in ("patch_embed", "cls_token", "pos_embed"):
    return 0
  if name.startswith("blocks_"):
    return int(name.split("_")[1]) + 1
  return depth + 1


def layerwise_lr_scales(params, depth: int, decay: float):
  """Tree of lr multipliers decay ** (depth + 1 - layer_id) (the head gets 1)."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict(
      {path: float(decay ** (depth + 1 - layer_id(path, depth))) for path in flat})


def weight_decay_mask(params, exempt: str = "1d"):
  """True = decayed: the pre-training rule (1-D leaves exempt; '1d+tokens' also the cls token)."""
  # CIMModel.weight_decay_mask applies the same rule to the pre-training tree.
  return cim.CIMModel.weight_decay_mask(None, params, exempt)


def scale_by_tree(scales) -> optax.GradientTransformation:
  """Multiplies each update by its leaf of `scales` (per-parameter lr multipliers)."""
  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, s: u * s, updates, scales), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def build_optimizer(config, params, lr_schedule):
  """AdamW (decoupled, masked weight decay) with layer-wise lr decay and optional clipping."""
  o = config.optim
  depth = sum(1 for k in params if k.startswith("blocks_"))
  scales = layerwise_lr_scales(params, depth, float(o.layer_decay))
  return optax.chain(
      optax.clip_by_global_norm(o.grad_clip_norm) if o.grad_clip_norm > 0 else optax.identity(),
      optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=1e-8),
      optax.add_decayed_weights(o.weight_decay, mask=weight_decay_mask(params, o.wd_exempt)),
      optax.scale_by_learning_rate(lr_schedule),
      # After the lr: the per-layer factor scales both the Adam step and the decoupled decay,
      # as a per-layer learning rate does in the PyTorch recipe.
      scale_by_tree(scales),
  )


def merge_pretrained(params, encoder_params, where: str = "checkpoint"):
  """Classifier params with the pre-trained encoder's leaves (fc_norm and head stay fresh)."""
  flat = traverse_util.flatten_dict(flax.core.unfreeze(params))
  loaded = traverse_util.flatten_dict(flax.core.unfreeze(encoder_params))
  merged = {}
  for path, leaf in flat.items():
    if path in loaded:
      value = np.asarray(loaded[path])
      if value.shape != leaf.shape:
        raise ValueError(f"{where}: encoder parameter {'/'.join(path)} has shape {value.shape}, "
                         f"the classifier expects {leaf.shape}")
      merged[path] = jnp.asarray(value, leaf.dtype)
    elif path[0] in ("fc_norm", "head"):
      merged[path] = leaf
    else:
      raise ValueError(f"{where}: encoder parameter {'/'.join(path)} is missing")
  return traverse_util.unflatten_dict(merged)


# ----------------------------------------------------------------------------------------------
# Mixup / cutmix / random erasing (timm semantics, batch-wise, on device).


def smooth_one_hot(labels, num_classes: int, smoothing: float):
  """timm's label smoothing: off-value smoothing / K, on-value 1 - smoothing + off-value."""
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def mixup_cutmix(rng, images, labels, num_classes: int, m) -> tuple[jax.Array, jax.Array]:
  """timm Mixup (mode 'batch'): with prob m.prob, cutmix (switch_prob) or mixup; mixes with the
  flipped batch; cutmix's lambda is corrected to the pasted box's area. Returns soft targets."""
  targets = smooth_one_hot(labels, num_classes, m.label_smoothing)
  if m.prob <= 0 or (m.mixup_alpha <= 0 and m.cutmix_alpha <= 0):
    return images, targets
  apply_rng, switch_rng, mix_rng, cut_rng, box_rng = jax.random.split(rng, 5)
  use_cutmix = (m.cutmix_alpha > 0) & (
      (m.mixup_alpha <= 0) | (jax.random.uniform(switch_rng) < m.switch_prob))
  lam_mix = jax.random.beta(mix_rng, max(m.mixup_alpha, 1e-6), max(m.mixup_alpha, 1e-6))
  lam_cut = jax.random.beta(cut_rng, max(m.cutmix_alpha, 1e-6), max(m.cutmix_alpha, 1e-6))
  height, width = images.shape[1:3]
  # timm rand_bbox: a box of sides sqrt(1 - lam) * (H, W) centred uniformly, clipped.
  cut = jnp.sqrt(1.0 - lam_cut)
  cy, cx = jax.random.randint(box_rng, (2,), 0, jnp.array([height, width]))
  half_h, half_w = (cut * height / 2).astype(jnp.int32), (cut * width / 2).astype(jnp.int32)
  y0, y1 = jnp.clip(cy - half_h, 0, height), jnp.clip(cy + half_h, 0, height)
  x0, x1 = jnp.clip(cx - half_w, 0, width), jnp.clip(cx + half_w, 0, width)
  rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
  lam_box = 1.0 - box.mean()
  flipped = images[::-1]
  cutmixed = jnp.where(box[None, :, :, None], flipped, images)
  mixed = lam_mix * images + (1.0 - lam_mix) * flipped
  apply = jax.random.uniform(apply_rng) < m.prob
  lam = jnp.where(apply, jnp.where(use_cutmix, lam_box, lam_mix), 1.0)
  out = jnp.where(apply, jnp.where(use_cutmix, cutmixed, mixed), images)
  return out, lam * targets + (1.0 - lam) * targets[::-1]


def random_erasing(rng, images, prob: float, scale=(0.02, 1 / 3), log_ratio=(np.log(0.3),
                   np.log(1 / 0.3))):
  """timm RandomErasing(mode='pixel', count 1): a box of per-pixel N(0, 1) noise, probability
  `prob` per image, on normalised images (up to 10 tries for a box that fits, as timm)."""
  if prob <= 0:
    return images
  batch, height, width, _ = images.shape
  keys = jax.random.split(rng, 5)
  tries = 10
  area = height * width * jax.random.uniform(keys[0], (batch, tries), minval=scale[0],
                                             maxval=scale[1])
  aspect = jnp.exp(jax.random.uniform(keys[1], (batch, tries), minval=log_ratio[0],
                                      maxval=log_ratio[1]))
  h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
  w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
  fits = (h < height) & (w < width)
  first = jnp.argmax(fits, axis=1)  # the first try that fits; none fits -> no erasing
  pick = lambda x: jnp.take_along_axis(x, first[:, None], axis=1)[:, 0]
  h, w, found = pick(h), pick(w), fits.any(axis=1)
  top = (jax.random.uniform(keys[2], (batch,)) * (height - h + 1)).astype(jnp.int32)
  left = (jax.random.uniform(keys[3], (batch,)) * (width - w + 1)).astype(jnp.int32)
  erase = found & (jax.random.uniform(keys[4], (batch,)) < prob)
  rows, cols = jnp.arange(height)[None, :, None], jnp.arange(width)[None, None, :]
  box = ((rows >= top[:, None, None]) & (rows < (top + h)[:, None, None]) &
         (cols >= left[:, None, None]) & (cols < (left + w)[:, None, None]) &
         erase[:, None, None])
  noise = jax.random.normal(jax.random.fold_in(rng, 1), images.shape, images.dtype)
  return jnp.where(box[..., None], noise, images)


# ----------------------------------------------------------------------------------------------
# Steps.


def make_train_step(model, tx, config, num_classes: int):
  """Pure (state, batch{'image' uint8, 'label'}, rng) -> (state, metrics)."""
  m = config.mixup

  def train_step(state: FinetuneState, batch, rng):
    rng = jax.random.fold_in(rng, state.step)  # the same per-step randomness after a resume
    erase_rng, mix_rng, drop_rng = jax.random.split(rng, 3)
    images = cim.normalize_images(batch["image"])
    images = random_erasing(erase_rng, images, config.data.random_erase_prob)
    images, targets = mixup_cutmix(mix_rng, images, batch["label"], num_classes, m)

    def loss_fn(params):
      logits, _ = model.apply({"params": params}, images, train=True, rngs={"dropout": drop_rng})
      loss = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()
      return loss, logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    accuracy = (logits.argmax(-1) == batch["label"]).mean()
    metrics = {"loss": loss, "train_top1": 100.0 * accuracy, "grad_norm": optax.global_norm(grads)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(model):
  """(params, images uint8) -> logits, eval mode (no drop path)."""
  def eval_step(params, images):
    logits, _ = model.apply({"params": params}, cim.normalize_images(images), train=False)
    return logits.astype(jnp.float32)
  return eval_step
