"""AdamW with masked weight decay, global-norm clipping, a frozen patch projection, accumulation."""

import jax
import ml_collections
import optax

from cim_jax.train import schedules


def build_optimizer(config: ml_collections.ConfigDict, frozen_mask, decay_mask,
                    counts: schedules.StepCounts):
  """Returns (optax transformation, lr schedule over optimizer steps).

  The schedule of optimizer step k is the per-batch warm-up + cosine at batch k * accum_steps
  (`schedules.optimizer_lr_schedule`), as the authors' release sets it.

  `frozen_mask` / `decay_mask` are pytrees of bools shaped like the params (True = frozen /
  decayed). Frozen leaves get a zero gradient before clipping and Adam (so they neither count in
  the global norm nor move Adam's moments), no weight decay, and a zero final update.
  """
  o = config.optim
  if o.grad_clip_norm < 0:
    raise ValueError(f"optim.grad_clip_norm must be >= 0 (0 disables), got {o.grad_clip_norm}")
  lr_schedule = schedules.optimizer_lr_schedule(schedules.peak_learning_rate(config), o.min_lr,
                                               counts)
  # Decay only trainable leaves the model asks to decay.
  decay_trainable = jax.tree.map(lambda d, f: bool(d) and not bool(f), decay_mask, frozen_mask)
  tx = optax.chain(
      optax.masked(optax.set_to_zero(), frozen_mask),
      optax.clip_by_global_norm(o.grad_clip_norm) if o.grad_clip_norm > 0 else optax.identity(),
      optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=1e-8),
      optax.add_decayed_weights(o.weight_decay, mask=decay_trainable),
      optax.scale_by_learning_rate(lr_schedule),
      # Belt and braces: whatever a transformation above does, the frozen leaves stay put.
      optax.masked(optax.set_to_zero(), frozen_mask),
  )
  if counts.accum_steps > 1:
    # Mean of accum_steps micro-batch gradients, one inner (Adam) update per optimizer step.
    tx = optax.MultiSteps(tx, every_k_schedule=counts.accum_steps).gradient_transformation()
  return tx, lr_schedule
