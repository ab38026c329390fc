"""The pure train step: EMA target, accumulation, frozen patch projection, weight decay."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from cim_jax import sharding
from cim_jax.models import cim
from cim_jax.train import optimizer as optimizer_lib
from cim_jax.train import schedules
from cim_jax.train import state as state_lib
from cim_jax.train import step as step_lib
from train_fixtures import key_bias_mask, tiny_config

pytestmark = pytest.mark.usefixtures("compilation_cache")


def _batch(config, seed):
  rng = np.random.default_rng(seed)
  d, b = config.data, config.batch_size
  c, n, e = d.context_size, d.num_exemplars, d.exemplar_size
  centre = rng.uniform(8, c - 8, (b, n, 1, 2))
  square = np.array([[-6, -6], [6, -6], [6, 6], [-6, 6]], np.float32)
  return {"context": rng.integers(0, 256, (b, c, c, 3), dtype=np.uint8),
          "exemplars": rng.integers(0, 256, (b, n, e, e, 3), dtype=np.uint8),
          "corners": (centre + square).astype(np.float32)}


def _config(batch_size, accum_steps):
  config = tiny_config(num_train_steps=8 * accum_steps, batch_size=batch_size)
  config.optim.accum_steps = accum_steps
  config.optim.warmup_steps = 0  # lr(0) > 0: every optimizer step moves the params
  return config


def _build(config):
  counts = schedules.step_counts(config, num_examples=None)
  return step_lib.build_trainer(config, cim.build_model(config.model, config.data),
                                sharding.make_mesh(1), counts)


# One compiled trainer per configuration, shared by the tests (compiling dominates their time).
@pytest.fixture(scope="module")
def plain():
  config = _config(batch_size=8, accum_steps=1)
  return config, _build(config)


@pytest.fixture(scope="module")
def accumulating():
  config = _config(batch_size=4, accum_steps=2)
  return config, _build(config)


def _fresh(trainer, config):
  return trainer.init_state(jax.random.PRNGKey(0), state_lib.dummy_batch(config.data))


def _run(trainer, state, config, steps, seed0=0):
  history = []
  for i in range(steps):
    before = jax.device_get(state)
    batch = sharding.global_batch(_batch(config, seed0 + i), trainer.batch_sharding)
    state, metrics = trainer.train_step(state, batch, jax.random.PRNGKey(1))
    history.append((before, jax.device_get(state), jax.device_get(metrics)))
  return state, history


def _flat(tree):
  return traverse_util.flatten_dict(tree)


def test_ema_target_update_and_frozen_projection(plain):
  config, trainer = plain
  _, history = _run(trainer, _fresh(trainer, config), config, steps=3)
  for k, (before, after, metrics) in enumerate(history):
    m = float(trainer.momentum_schedule(k))  # accum 1: batch k is optimizer step k
    assert float(metrics["momentum"]) == pytest.approx(m)
    online, target_before, target_after = (_flat(after.params["encoder"]),
                                           _flat(before.target_params["encoder"]),
                                           _flat(after.target_params["encoder"]))
    for path, t in target_after.items():
      np.testing.assert_allclose(t, m * target_before[path] + (1 - m) * online[path],
                                 rtol=1e-6, atol=1e-7)
    # The frozen patch projection never moves, online or target; everything else trains.
    for name, tree in (("online", after.params), ("target", after.target_params)):
      old = before.params if name == "online" else before.target_params
      np.testing.assert_array_equal(tree["encoder"]["patch_embed"]["kernel"],
                                    old["encoder"]["patch_embed"]["kernel"])
    moved = [not np.array_equal(a, b) for (p, a), b in zip(
        _flat(after.params).items(), _flat(before.params).values()) if "patch_embed" not in p]
    assert all(moved), "some trainable parameter did not move"
  assert float(history[0][2]["momentum"]) == pytest.approx(0.99)


def test_accumulation_updates_params_and_ema_once_per_optimizer_step(accumulating):
  config, trainer = accumulating
  _, history = _run(trainer, _fresh(trainer, config), config, steps=4)
  for i, (before, after, metrics) in enumerate(history):
    same_params = all(np.array_equal(a, b) for a, b in
                      zip(jax.tree.leaves(after.params), jax.tree.leaves(before.params)))
    same_target = all(np.array_equal(a, b) for a, b in
                      zip(jax.tree.leaves(after.target_params),
                          jax.tree.leaves(before.target_params)))
    if i % 2 == 0:  # first micro-batch of a cycle: nothing moves
      assert same_params and same_target
    else:
      # The momentum of batch i, the last of its cycle, over all batches (the release's
      # iter_update), not of optimizer step i // 2 over the optimizer steps.
      m = float(trainer.momentum_schedule(i))
      assert m != pytest.approx(float(schedules.ema_momentum(0.99, 1.0, 8)(i // 2)), abs=1e-7)
      assert not same_params and not same_target
      assert float(metrics["momentum"]) == pytest.approx(m)
      online = _flat(after.params["encoder"])
      for path, t in _flat(after.target_params["encoder"]).items():
        expected = m * _flat(before.target_params["encoder"])[path] + (1 - m) * online[path]
        np.testing.assert_allclose(t, expected, rtol=1e-6, atol=1e-7)
  # The momentum schedule runs over batches (16 of them), not optimizer steps.
  assert float(trainer.momentum_schedule(8)) < 1.0 - 1e-3
  assert float(trainer.momentum_schedule(16)) == pytest.approx(1.0)


def test_accumulated_step_equals_one_big_batch_step(plain, accumulating):
  """Two micro-batches of 4 + accumulation == one batch of 8 (mean gradient), up to float error."""
  (big, trainer_big), (small, trainer_small) = plain, accumulating
  assert schedules.peak_learning_rate(big) == schedules.peak_learning_rate(small)
  state_big, state_small = _fresh(trainer_big, big), _fresh(trainer_small, small)
  batch = _batch(big, 0)
  halves = [jax.tree.map(lambda x, i=i: x[4 * i:4 * (i + 1)], batch) for i in range(2)]
  state_big, _ = trainer_big.train_step(
      state_big, sharding.global_batch(batch, trainer_big.batch_sharding), jax.random.PRNGKey(1))
  for h in halves:
    state_small, _ = trainer_small.train_step(
        state_small, sharding.global_batch(h, trainer_small.batch_sharding),
        jax.random.PRNGKey(1))
  # Without clipping (the release's recipe) the key biases' exactly-zero gradients are float
  # noise that Adam turns into steps of up to +-lr, differently for the two batch splits: those
  # entries are left out here (see key_bias_mask); everything else agrees.
  keys = jax.tree.leaves(key_bias_mask(jax.device_get(state_big.params)))
  assert sum(int(k.sum()) for k in keys) > 0
  for a, b, k in zip(jax.tree.leaves(state_big.params), jax.tree.leaves(state_small.params), keys):
    np.testing.assert_allclose(np.asarray(a)[~k], np.asarray(b)[~k], rtol=2e-4, atol=2e-6)
    np.testing.assert_array_less(np.abs(np.asarray(a) - np.asarray(b))[k],
                                 2 * float(trainer_big.lr_schedule(0)) + 1e-12)


_PARAMS = {}


def _init_params(config):
  """Initialised once per test module (both exemption sets use the same parameters)."""
  if "params" not in _PARAMS:
    model = cim.build_model(config.model, config.data)
    _PARAMS["params"] = jax.jit(model.init)(jax.random.PRNGKey(0),
                                            state_lib.dummy_batch(config.data))
  return _PARAMS["params"]


@pytest.mark.parametrize("exempt", ["1d", "1d+tokens"])
def test_weight_decay_touches_only_decayed_trainable_leaves(exempt):
  """Zero gradients: Adam's step is 0, so each leaf moves only by its decay, -lr * wd * p."""
  config = tiny_config(num_train_steps=10)
  config.optim.wd_exempt = exempt
  config.optim.warmup_steps = 0
  config.optim.weight_decay = 0.5
  model = cim.build_model(config.model, config.data)
  params = _init_params(config)
  frozen = jax.tree.map(bool, model.frozen_mask(params))
  decay = jax.tree.map(bool, model.weight_decay_mask(params, exempt))
  counts = schedules.step_counts(config, num_examples=None)
  tx, lr = optimizer_lib.build_optimizer(config, frozen, decay, counts)
  # A large gradient on the frozen leaf must not move it either.
  grads = jax.tree.map(jnp.zeros_like, params)
  grads["encoder"]["patch_embed"]["kernel"] = jnp.ones_like(
      grads["encoder"]["patch_embed"]["kernel"])
  updates, _ = jax.jit(tx.update)(grads, jax.jit(tx.init)(params), params)
  new = jax.tree.map(lambda p, u: p + u, params, updates)
  factor = 1 - float(lr(0)) * 0.5
  flat_new, flat_old = _flat(new), _flat(params)
  flat_decay, flat_frozen = _flat(decay), _flat(frozen)
  assert any(flat_frozen.values())
  for path, old in flat_old.items():
    if flat_frozen[path] or not flat_decay[path]:
      np.testing.assert_array_equal(flat_new[path], old, err_msg=str(path))
    else:
      np.testing.assert_allclose(flat_new[path], old * factor, rtol=1e-6, err_msg=str(path))
  cls_decayed = flat_decay[("encoder", "cls_token")]
  assert cls_decayed == (exempt == "1d")
  assert not any(v for p, v in flat_decay.items() if p[-1] in ("bias", "scale"))
