"""AdamW for both tasks: masked weight decay, layer-wise lr decay, clipping, frozen leaves,
accumulation."""

import jax
import ml_collections
import optax
from flax import traverse_util

from cim_jax.train import schedules


def frozen_mask(params, freeze_patch_embed: bool):
  """True for the leaves that never train: the patch projection when freeze_patch_embed."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({p: freeze_patch_embed and "patch_embed" in p for p in flat})


def weight_decay_mask(params, exempt: str = "1d"):
  """True = decayed. '1d' exempts biases and norm params (the authors' set, which decays the cls
  token); '1d+tokens' also exempts the cls token. Works on arrays or ShapeDtypeStructs."""
  if exempt not in ("1d", "1d+tokens"):
    raise ValueError(f"weight-decay exemption must be '1d' or '1d+tokens', got {exempt!r}")
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict(
      {p: len(x.shape) > 1 and not (exempt == "1d+tokens" and p[-1] == "cls_token")
       for p, x in flat.items()})


# Where a model keeps its ViT: at the top (classifier) or under 'backbone' (segmenter).
ENCODER_ROOTS = ("backbone",)


def _encoder_tree(params):
  return next((params[k] for k in ENCODER_ROOTS if k in params), params)


def layer_id(path: tuple[str, ...], depth: int) -> int:
  """BEiT / MAE layer index: embeddings 0, block i -> i + 1, everything after (final norm, the
  classifier, a segmentation neck and heads) -> depth + 1."""
  name = path[1] if path[0] in ENCODER_ROOTS and len(path) > 1 else path[0]
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


def trainable_norm(grads, frozen):
  """Global norm of the gradients that train (what clipping sees; frozen leaves excluded)."""
  return optax.global_norm(jax.tree.map(lambda g, f: 0.0 if f else g, grads, frozen))


def build_optimizer(config: ml_collections.ConfigDict, params, counts: schedules.StepCounts,
                    layer_decay: float = 1.0):
  """Returns (optax transformation, lr schedule over optimizer steps, frozen mask).

  The schedule of optimizer step k is the per-batch warm-up + cosine at batch k * accum_steps
  (`schedules.optimizer_lr_schedule`), as the authors' release sets it. `params` (arrays or
  shapes) give the masks. Frozen leaves get a zero gradient before anything else, so they
  count in no norm, keep zero Adam moments and are never decayed: their update is exactly 0.
  `layer_decay` < 1 scales each leaf's step by `layerwise_lr_scales` (fine-tuning).
  """
  o = config.optim
  if o.grad_clip_norm < 0:
    raise ValueError(f"optim.grad_clip_norm must be >= 0 (0 disables), got {o.grad_clip_norm}")
  lr_schedule = schedules.optimizer_lr_schedule(schedules.peak_learning_rate(config), o.min_lr,
                                               counts, o.get("schedule", "cosine"),
                                               o.get("poly_power", 1.0))
  frozen = frozen_mask(params, bool(config.model.freeze_patch_embed))
  decay = weight_decay_mask(params, o.wd_exempt)
  parts = [
      optax.masked(optax.set_to_zero(), frozen),
      optax.clip_by_global_norm(o.grad_clip_norm) if o.grad_clip_norm > 0 else optax.identity(),
      optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=1e-8),
      optax.add_decayed_weights(o.weight_decay,
                                mask=jax.tree.map(lambda d, f: d and not f, decay, frozen)),
      optax.scale_by_learning_rate(lr_schedule),
  ]
  if layer_decay != 1.0:
    # After the lr: the per-layer factor scales both the Adam step and the decoupled decay,
    # as a per-layer learning rate does in the PyTorch recipe.
    depth = sum(1 for k in _encoder_tree(params) if k.startswith("blocks_"))
    scales = layerwise_lr_scales(params, depth, layer_decay)
    parts.append(optax.stateless(lambda updates, _: jax.tree.map(lambda u, s: u * s, updates,
                                                                 scales)))
  tx = optax.chain(*parts)
  if counts.accum_steps > 1:
    # Mean of accum_steps micro-batch gradients, one inner (Adam) update per optimizer step.
    tx = optax.MultiSteps(tx, every_k_schedule=counts.accum_steps).gradient_transformation()
  return tx, lr_schedule, frozen
