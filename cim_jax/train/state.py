"""The train state: online params, EMA target params, optimizer state, model state, step."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the data iterator (a pytree; sharded as a whole)."""
  step: jax.Array  # batches consumed (train steps); optimizer steps = step // accum_steps
  params: Any  # online: {'encoder', 'decoder', ['projector', 'predictor']}
  target_params: Any  # EMA copies: {'encoder', ['projector']}
  opt_state: Any
  model_state: Any  # BatchNorm statistics of the optional global-loss heads ({} when off)


def init_variables(model, rng: jax.Array, batch):
  """(params, model_state) from CIMModel.init_variables, or a bare `init` returning params."""
  if hasattr(model, "init_variables"):
    return model.init_variables(rng, batch)
  return model.init(rng, batch), {}


def init_train_state(model, tx, rng: jax.Array, batch) -> TrainState:
  """Initialises params, the exact-copy target, optimizer state (pure; jit it with shardings)."""
  params, model_state = init_variables(model, rng, batch)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    target_params=model.target_params_from(params),
                    opt_state=tx.init(params), model_state=model_state)


def dummy_batch(data_config, batch_size: int = 2):
  """A zero host batch with the pipeline's shapes and dtypes (for init / shape inference)."""
  c, n, e = data_config.context_size, data_config.num_exemplars, data_config.exemplar_size
  return {
      "context": np.zeros((batch_size, c, c, 3), np.uint8),
      "exemplars": np.zeros((batch_size, n, e, e, 3), np.uint8),
      "corners": np.zeros((batch_size, n, 4, 2), np.float32),
  }


def online_like(params, target_params):
  """The online leaves at the target tree's paths (target = {'encoder', ['projector']})."""
  if isinstance(target_params, dict):
    return {k: online_like(params[k], v) for k, v in target_params.items()}
  return params
