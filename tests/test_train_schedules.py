"""Learning-rate / EMA-momentum schedules and run-length arithmetic."""

import math

import numpy as np
import pytest

from cim_jax.train import schedules
from train_fixtures import tiny_config


def test_warmup_is_linear_from_zero_then_cosine_to_min():
  lr = schedules.warmup_cosine(peak=2.0, end=0.1, warmup_steps=10, total_steps=110)
  np.testing.assert_allclose([float(lr(s)) for s in (0, 5, 10)], [0.0, 1.0, 2.0], rtol=1e-6)
  # Half-way through the cosine: the mean of peak and end; the last step approaches end.
  np.testing.assert_allclose(float(lr(60)), (2.0 + 0.1) / 2, rtol=1e-6)
  expected = 0.1 + 1.9 * 0.5 * (1 + math.cos(math.pi * 37 / 100))
  np.testing.assert_allclose(float(lr(47)), expected, rtol=1e-5)
  np.testing.assert_allclose(float(lr(110)), 0.1, rtol=1e-6)
  np.testing.assert_allclose(float(lr(500)), 0.1, rtol=1e-6)  # clamps past the end


def test_no_warmup_starts_at_peak():
  lr = schedules.warmup_cosine(peak=1.0, end=0.0, warmup_steps=0, total_steps=4)
  np.testing.assert_allclose([float(lr(s)) for s in range(5)],
                             [1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5,
                              0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0], atol=1e-6)


def test_ema_momentum_is_byol_cosine():
  m = schedules.ema_momentum(0.99, 1.0, total_steps=100)
  for k in (0, 13, 50, 99, 100):
    byol = 1 - (1 - 0.99) * (math.cos(math.pi * k / 100) + 1) / 2
    np.testing.assert_allclose(float(m(k)), byol, rtol=0, atol=1e-7)
  assert float(m(0)) == pytest.approx(0.99) and float(m(100)) == pytest.approx(1.0)
  assert all(float(m(k)) <= float(m(k + 1)) for k in range(100))


def test_peak_lr_scales_with_effective_batch():
  c = tiny_config(batch_size=512)
  c.optim.base_lr = 1.5e-4
  assert schedules.peak_learning_rate(c) == pytest.approx(3e-4)
  c.optim.accum_steps = 4
  assert schedules.peak_learning_rate(c) == pytest.approx(12e-4)


def test_step_counts_from_epochs_and_source_size():
  c = tiny_config(batch_size=10, num_train_steps=-1, num_epochs=3.0)
  c.optim.warmup_steps = -1
  c.optim.warmup_epochs = 1.0
  c.optim.accum_steps = 2
  counts = schedules.step_counts(c, num_examples=105)
  # The warm-up stays in batches (10), not optimizer steps: the schedules run over batches.
  assert (counts.steps_per_epoch, counts.train_steps, counts.optimizer_steps,
          counts.warmup_steps) == (10, 30, 15, 10)
  c.steps_per_epoch = 7  # explicit value wins over the source size
  assert schedules.step_counts(c, num_examples=105).train_steps == 21
  c.num_train_steps = 8  # and num_train_steps over epochs
  assert schedules.step_counts(c, num_examples=105).train_steps == 8


def test_step_counts_errors_are_clear():
  c = tiny_config(num_train_steps=-1, steps_per_epoch=-1)
  with pytest.raises(ValueError, match="num_train_steps or steps_per_epoch"):
    schedules.step_counts(c, num_examples=None)
  c = tiny_config(num_train_steps=3)
  c.optim.accum_steps = 4
  with pytest.raises(ValueError, match="smaller than optim.accum_steps"):
    schedules.step_counts(c, num_examples=16)


def _counts(train_steps, accum, warmup):
  return schedules.StepCounts(train_steps=train_steps, accum_steps=accum,
                              optimizer_steps=train_steps // accum, warmup_steps=warmup,
                              steps_per_epoch=train_steps)


def _release_lr(batch, peak, end, warmup, total):
  """MAE's util/lr_sched.py in fractional epochs (one epoch of `total` batches)."""
  epoch, warmup_epochs = batch / total, warmup / total
  if epoch < warmup_epochs:
    return peak * epoch / warmup_epochs
  return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * (epoch - warmup_epochs)
                                                  / (1 - warmup_epochs)))


@pytest.mark.parametrize("accum, warmup", [(1, 3), (2, 3), (4, 6), (3, 0)])
def test_optimizer_lr_is_the_release_per_batch_schedule(accum, warmup):
  """Optimizer step k uses the schedule at batch k * accum (set on a cycle's first batch), with
  warm-up and total in batches: exact even when the warm-up is not a multiple of accum."""
  total = 24
  lr = schedules.optimizer_lr_schedule(2.0, 0.1, _counts(total, accum, warmup))
  for k in range(total // accum):
    np.testing.assert_allclose(float(lr(k)), _release_lr(k * accum, 2.0, 0.1, warmup, total),
                               rtol=1e-6, atol=1e-7)
  if accum == 1:  # identical to the plain per-step schedule
    plain = schedules.warmup_cosine(2.0, 0.1, warmup, total)
    assert all(float(lr(k)) == float(plain(k)) for k in range(total))


@pytest.mark.parametrize("accum", [1, 2, 3])
def test_ema_momentum_at_the_last_batch_of_each_cycle(accum):
  """The authors' iter_update: optimizer step k's momentum is the cosine at batch (k+1)*accum-1
  of all train steps (with accum 1: at step k over the optimizer steps, as before)."""
  total = 12
  m = schedules.ema_momentum(0.99, 1.0, total_steps=total)
  for batch in range(total):
    last = schedules.last_batch_of_cycle(batch, accum)
    assert last == (batch // accum + 1) * accum - 1 and batch <= last < batch + accum
  for k in range(total // accum):
    iteration = (k + 1) * accum - 1
    release = 1.0 - (1.0 - 0.99) * (math.cos(math.pi * iteration / total) + 1) / 2
    np.testing.assert_allclose(float(m(schedules.last_batch_of_cycle(k * accum, accum))),
                               release, rtol=0, atol=1e-7)


def _mmcv_poly_with_linear_warmup(i, base, min_lr, total, warmup, ratio=1e-6, power=1.0):
  """mmcv's PolyLrUpdaterHook.get_lr, then LrUpdaterHook.get_warmup_lr('linear') on it."""
  regular = (base - min_lr) * (1 - i / total) ** power + min_lr
  if i >= warmup:
    return regular
  k = (1 - i / warmup) * (1 - ratio)
  return regular * (1 - k)


def test_poly_schedule_is_mmcv_poly_with_linear_warmup():
  lr = schedules.warmup_poly(peak=1e-4, end=0.0, warmup_steps=1500, total_steps=160_000)
  for i in (0, 1, 700, 1499, 1500, 1501, 80_000, 159_999, 160_000):
    np.testing.assert_allclose(float(lr(i)), _mmcv_poly_with_linear_warmup(
        i, 1e-4, 0.0, 160_000, 1500), rtol=1e-5, atol=1e-12)
  assert float(lr(0)) == pytest.approx(1e-10, rel=1e-3)  # warmup_ratio x peak, not zero
  power2 = schedules.warmup_poly(peak=2.0, end=0.5, warmup_steps=0, total_steps=10, power=2.0)
  np.testing.assert_allclose([float(power2(i)) for i in (0, 5, 10, 20)],
                             [2.0, 0.5 + 1.5 * 0.25, 0.5, 0.5], rtol=1e-6)


def test_optimizer_schedule_kind_and_absolute_lr():
  config = tiny_config()
  config.optim.lr = 3e-4  # as is: not scaled by the batch size
  config.optim.schedule = "poly"
  config.optim.warmup_steps = 0
  counts = schedules.step_counts(config, None)
  assert schedules.peak_learning_rate(config) == 3e-4
  lr = schedules.optimizer_lr_schedule(3e-4, 0.0, counts, "poly")
  half = counts.train_steps // 2
  np.testing.assert_allclose(float(lr(half)), 3e-4 * (1 - half / counts.train_steps), rtol=1e-5)
  with pytest.raises(ValueError, match="'step'"):
    schedules.optimizer_lr_schedule(3e-4, 0.0, counts, "step")
