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
  assert (counts.steps_per_epoch, counts.train_steps, counts.optimizer_steps,
          counts.warmup_optimizer_steps) == (10, 30, 15, 5)
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
