"""Learning-rate and EMA-momentum schedules, and the step counts they are built from.

Both schedules run over train steps (batches, the authors' micro-batch iterations), as in the
authors' release (docs/METHOD.md): the learning rate of optimizer step k is the warm-up + cosine
schedule at batch k * accum_steps (the release sets it on the first micro-batch of each
accumulation cycle), and the EMA momentum of optimizer step k is BYOL's cosine at its last batch,
(k + 1) * accum_steps - 1, over the run's train_steps batches. With accum_steps = 1 both reduce
to plain per-step schedules.
"""

import dataclasses
import math

import jax.numpy as jnp
import ml_collections


@dataclasses.dataclass(frozen=True)
class StepCounts:
  """How long a run is, in batches (train steps) and in optimizer steps."""
  train_steps: int  # batches consumed; one jitted train step each
  accum_steps: int  # batches per optimizer step
  optimizer_steps: int  # train_steps // accum_steps
  warmup_steps: int  # linear warm-up length in batches (train steps), <= train_steps
  steps_per_epoch: int


def step_counts(config: ml_collections.ConfigDict, num_examples: int | None) -> StepCounts:
  """Resolves num_train_steps / num_epochs / steps_per_epoch / warm-up into step counts.

  `num_examples` is the size of the training source (None when unknown, e.g. a stream); it is only
  needed when neither `num_train_steps` nor `steps_per_epoch` is given.
  """
  accum = int(config.optim.accum_steps)
  if accum < 1:
    raise ValueError(f"optim.accum_steps must be >= 1, got {accum}")
  if config.steps_per_epoch > 0:
    steps_per_epoch = int(config.steps_per_epoch)
  elif num_examples:
    steps_per_epoch = max(1, num_examples // config.batch_size)
  else:
    steps_per_epoch = 0
  if config.num_train_steps > 0:
    train_steps = int(config.num_train_steps)
  elif steps_per_epoch:
    train_steps = int(round(config.num_epochs * steps_per_epoch))
  else:
    raise ValueError("cannot derive the run length: set num_train_steps or steps_per_epoch "
                     "(the data source does not report its size)")
  if train_steps < accum:
    raise ValueError(f"num_train_steps ({train_steps}) is smaller than optim.accum_steps ({accum})")
  # Warm-up given in batches (warmup_steps) or epochs; kept in batches (the release's
  # fractional-epoch schedule is exact in batches, whatever accum_steps is).
  if config.optim.warmup_steps >= 0:
    warmup_batches = int(config.optim.warmup_steps)
  else:
    warmup_batches = int(round(config.optim.warmup_epochs * steps_per_epoch))
  optimizer_steps = train_steps // accum
  return StepCounts(train_steps=train_steps, accum_steps=accum, optimizer_steps=optimizer_steps,
                    warmup_steps=min(warmup_batches, train_steps),
                    steps_per_epoch=steps_per_epoch)


def peak_learning_rate(config: ml_collections.ConfigDict) -> float:
  """optim.lr when a recipe gives it as is (segmentation); else base_lr * effective batch / 256,
  effective batch = global batch x accumulation (MAE rule)."""
  if "lr" in config.optim:
    return float(config.optim.lr)
  return config.optim.base_lr * config.batch_size * config.optim.accum_steps / 256.0


def warmup_cosine(peak: float, end: float, warmup_steps: int, total_steps: int):
  """Per-step linear warm-up from 0 to `peak`, then a half-cycle cosine from `peak` to `end`."""
  warmup_steps = int(warmup_steps)
  decay_steps = max(1, int(total_steps) - warmup_steps)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * step / max(warmup_steps, 1)
    progress = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
    cosine = end + (peak - end) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
    return jnp.where(step < warmup_steps, warm, cosine)

  return schedule


def warmup_poly(peak: float, end: float, warmup_steps: int, total_steps: int, power: float = 1.0,
                warmup_ratio: float = 1e-6):
  """mmcv's 'poly' policy with linear warm-up (mmseg's ADE20K recipes): the polynomial decay
  (peak - end) (1 - step / total) ** power + end, scaled during the warm-up by
  1 - (1 - step / warmup) (1 - warmup_ratio), as mmcv scales the decayed (not the peak) rate."""
  warmup_steps, total_steps = int(warmup_steps), max(1, int(total_steps))

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    # Both factors in forms that keep float32 precision near their ends (1e-6, the last steps).
    decayed = (peak - end) * (jnp.clip(total_steps - step, 0.0) / total_steps) ** power + end
    warm = warmup_ratio + (1.0 - warmup_ratio) * step / max(warmup_steps, 1)
    return jnp.where(step < warmup_steps, decayed * warm, decayed)

  return schedule


def optimizer_lr_schedule(peak: float, end: float, counts: StepCounts, kind: str = "cosine",
                          power: float = 1.0):
  """lr of optimizer step k: warm-up + cosine (or `kind` 'poly': `warmup_poly`) over batches,
  evaluated at batch k * accum_steps."""
  if kind not in ("cosine", "poly"):
    raise ValueError(f"optim.schedule must be 'cosine' or 'poly', got {kind!r}")
  if kind == "poly":
    per_batch = warmup_poly(peak, end, counts.warmup_steps, counts.train_steps, power)
  else:
    per_batch = warmup_cosine(peak, end, counts.warmup_steps, counts.train_steps)
  accum = counts.accum_steps

  def schedule(optimizer_step):
    return per_batch(jnp.asarray(optimizer_step, jnp.int32) * accum)

  return schedule


def ema_momentum(start: float, end: float, total_steps: int):
  """BYOL's cosine momentum: m(k) = end - (end - start) * (cos(pi k / K) + 1) / 2.

  Pre-training evaluates it at the batch index of each optimizer step's last batch over
  K = train_steps batches (the authors' iter_update); see `last_batch_of_cycle`.
  """
  total_steps = max(1, int(total_steps))

  def schedule(step):
    progress = jnp.clip(jnp.asarray(step, jnp.float32) / total_steps, 0.0, 1.0)
    return end - (end - start) * (jnp.cos(math.pi * progress) + 1.0) / 2.0

  return schedule


def last_batch_of_cycle(step, accum_steps: int):
  """0-based index of the last batch of the accumulation cycle that batch `step` belongs to."""
  return (step // accum_steps + 1) * accum_steps - 1
