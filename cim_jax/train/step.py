"""The pure pre-training step, and the jitted, sharded step of either task (`Trainer`)."""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from cim_jax import sharding
from cim_jax.train import optimizer as optimizer_lib
from cim_jax.train import schedules
from cim_jax.train import state as state_lib


def ema_update(online, target, momentum):
  """target <- momentum * target + (1 - momentum) * online (BYOL / optax.incremental_update)."""
  return optax.incremental_update(online, target, step_size=1.0 - momentum)


def make_train_step(model, tx, lr_schedule, momentum_schedule, accum_steps: int, frozen):
  """Builds `train_step(state, batch, rng) -> (state, metrics)`; pure, so jit it once.

  `lr_schedule` is over optimizer steps (reported in the metrics; `tx` applies it),
  `momentum_schedule` over train steps (batches), evaluated at each cycle's last batch.
  """

  def train_step(state: state_lib.TrainState, batch, rng):
    # Randomness depends only on (seed, step): a resumed run draws what an unbroken run would.
    step_rng = jax.random.fold_in(rng, state.step)
    target_params = jax.lax.stop_gradient(state.target_params)

    def loss_fn(params):
      return model.apply(params, target_params, state.model_state, batch, train=True,
                         rng=step_rng)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    step = state.step + 1
    # The release's iter_update: after the last batch of each accumulation cycle, the EMA uses
    # the momentum of that batch's 0-based index (over all train steps); the optimizer step of
    # the cycle is state.step // accum_steps.
    last_batch = schedules.last_batch_of_cycle(state.step, accum_steps)
    momentum = momentum_schedule(last_batch)
    new_target = ema_update(state_lib.online_like(params, state.target_params),
                            state.target_params, momentum)
    if accum_steps > 1:
      # Params only move on the last micro-batch of each accumulation cycle; so does the EMA.
      is_update = state.step == last_batch
      new_target = jax.tree.map(lambda n, o: jnp.where(is_update, n, o), new_target,
                                state.target_params)

    grad_norm = optimizer_lib.trainable_norm(grads, frozen)
    metrics = dict(aux.get("metrics", {}))
    metrics.update(
        loss=loss, grad_norm=grad_norm, momentum=momentum,
        lr=lr_schedule(state.step // accum_steps),
        param_norm=optax.global_norm(params),
        finite=jnp.isfinite(loss) & jnp.isfinite(grad_norm))
    new_state = state.replace(step=step, params=params, target_params=new_target,
                              opt_state=opt_state,
                              model_state=aux.get("model_state", state.model_state))
    return new_state, metrics

  return train_step


@dataclasses.dataclass
class Trainer:
  """A model, its optimizer and schedules, the state's shardings and the jitted step."""
  model: Any
  tx: optax.GradientTransformation
  lr_schedule: Callable
  init_fn: Callable  # (rng, *example) -> state
  abstract_state: Any
  state_shardings: Any
  batch_sharding: jax.sharding.NamedSharding
  train_step: Callable  # jitted (state, global batch, rng) -> (state, metrics); state donated
  momentum_schedule: Callable | None = None  # pre-training's EMA
  eval_step: Callable | None = None  # fine-tuning: jitted (params, global images) -> logits

  def init_state(self, rng, *example):
    """A freshly initialised state, created directly in its shardings."""
    if not hasattr(self, "_jitted_init"):
      self._jitted_init = jax.jit(self.init_fn, out_shardings=self.state_shardings)
    return self._jitted_init(rng, *example)

  def abstract_sharded_state(self):
    """ShapeDtypeStructs carrying the shardings (restore targets)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        self.abstract_state, self.state_shardings)


def sharded_trainer(mesh, init_fn, example: tuple, step: Callable, **fields) -> Trainer:
  """Shards the state `init_fn(rng, *example)` builds over the mesh and jits `step` once with
  explicit in/out shardings (the state donated: updated in place)."""
  abstract_state = jax.eval_shape(init_fn, jax.random.PRNGKey(0), *example)
  state_shardings = sharding.state_shardings(mesh, abstract_state)
  batch_sharding, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  train_step = jax.jit(step, in_shardings=(state_shardings, batch_sharding, replicated),
                       out_shardings=(state_shardings, replicated), donate_argnums=(0,))
  return Trainer(init_fn=init_fn, abstract_state=abstract_state, state_shardings=state_shardings,
                 batch_sharding=batch_sharding, train_step=train_step, **fields)


def build_trainer(config, model, mesh, counts) -> Trainer:
  """Everything between a pre-training config and its jitted step (the loop, tests, bench)."""
  example = state_lib.dummy_batch(config.data)
  abstract_params, _ = jax.eval_shape(
      lambda r, b: state_lib.init_variables(model, r, b), jax.random.PRNGKey(0), example)
  tx, lr_schedule, frozen = optimizer_lib.build_optimizer(config, abstract_params, counts)
  # Over batches, as the release's iter_update (max_iter = epochs * batches per epoch).
  momentum_schedule = schedules.ema_momentum(config.ema.momentum_start, config.ema.momentum_end,
                                             counts.train_steps)
  step = make_train_step(model, tx, lr_schedule, momentum_schedule, counts.accum_steps, frozen)
  return sharded_trainer(
      mesh, lambda rng, batch: state_lib.init_train_state(model, tx, rng, batch), (example,),
      step, model=model, tx=tx, lr_schedule=lr_schedule, momentum_schedule=momentum_schedule)
