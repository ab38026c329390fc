"""The optional global InfoNCE loss: hand computation, heads, and the cross-device gather."""

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np

from cim_jax.models import cim, heads
from train_fixtures import recipe


def _hand_info_nce(q, k, temperature):
  """numpy: sum over exemplars n of mean_b CE(normalize(q[n,b]) . normalize(k).T / T, b) * 2T."""
  q = q / np.linalg.norm(q, axis=-1, keepdims=True)
  k = k / np.linalg.norm(k, axis=-1, keepdims=True)
  total = 0.0
  for n in range(q.shape[0]):
    logits = q[n] @ k.T / temperature
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    total += -np.mean(np.diag(log_probs)) * 2 * temperature
  return total


def test_info_nce_equals_hand_computation():
  rng = np.random.default_rng(0)
  q, k = rng.normal(size=(3, 5, 8)), rng.normal(size=(5, 8))
  ours = heads.info_nce_loss(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32), 0.2)
  np.testing.assert_allclose(ours, _hand_info_nce(q, k, 0.2), rtol=1e-5)


def test_group_batch_norm_uses_per_group_statistics():
  x = np.random.default_rng(0).normal(2.0, 3.0, size=(3, 6, 4)).astype(np.float32)
  bn = heads.GroupBatchNorm(use_affine=False)
  variables = bn.init(jax.random.key(0), x, train=False)
  out, updates = bn.apply(variables, x, train=True, mutable=["batch_stats"])
  expected = (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + 1e-5)
  np.testing.assert_allclose(out, expected, atol=1e-5)
  stats = updates["batch_stats"]
  np.testing.assert_allclose(stats["mean"], 0.1 * x.mean(1).mean(0), atol=1e-6)
  np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * x.var(1, ddof=1).mean(0), atol=1e-5)
  evaluation = bn.apply({"batch_stats": stats}, x, train=False)
  np.testing.assert_allclose(evaluation, (x - stats["mean"]) / np.sqrt(stats["var"] + 1e-5),
                             atol=1e-5)


def _model(weight=0.5):
  config = recipe()
  config.model.update(decoder_dim=32, decoder_heads=4, projector_hidden_dim=16, projector_dim=8,
                      global_loss_weight=weight)
  config.data.update(context_size=32, exemplar_size=32, num_exemplars=2)
  return cim.build_model(config.model, config.data, width=32, depth=1, num_heads=2)


def _batch(batch=4, seed=0):
  rng = np.random.default_rng(seed)
  corners = np.tile(np.array([[4, 4], [20, 4], [20, 20], [4, 20]], np.float32), (batch, 2, 1, 1))
  return {"context": rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8),
          "exemplars": rng.integers(0, 256, (batch, 2, 32, 32, 3), dtype=np.uint8),
          "corners": corners}


def test_global_loss_in_model():
  model, batch = _model(), _batch()
  params, state = jax.jit(model.init_variables)(jax.random.key(0))
  assert set(params) == {"encoder", "decoder", "projector", "predictor"}
  assert set(state) == {"projector", "predictor", "target_projector"}
  target = model.target_params_from(params)
  assert set(target) == {"encoder", "projector"}

  def loss_fn(p, t):
    return model.apply(p, t, state, batch, train=True)

  (loss, aux), (grads, target_grads) = jax.jit(
      jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))(params, target)
  metrics = aux["metrics"]
  np.testing.assert_allclose(loss, metrics["corr_loss"] + 0.5 * metrics["global_loss"], rtol=1e-6)
  assert metrics["global_loss"] > 0
  # Hand computation from the pieces: online cls -> projector -> predictor per exemplar.
  run = lambda m, p, s, x: m.apply({"params": p, "batch_stats": s}, x, train=True,
                                   mutable=["batch_stats"])[0]

  @jax.jit
  def pieces(params, target):
    exemplars = cim.normalize_images(batch["exemplars"]).reshape(8, 32, 32, 3)
    online_cls = model.encoder.apply({"params": params["encoder"]}, exemplars)[0][:, 0]
    online_cls = online_cls.reshape(4, 2, -1).swapaxes(0, 1)
    context = cim.normalize_images(batch["context"])
    target_cls = model.encoder.apply({"params": target["encoder"]}, context,
                                     cls_token=params["encoder"]["cls_token"])[0][None, :, 0]
    q = run(model.predictor, params["predictor"], state["predictor"],
            run(model.projector, params["projector"], state["projector"], online_cls))
    k = run(model.projector, target["projector"], state["target_projector"], target_cls)[0]
    return q, k

  q, k = pieces(params, target)
  np.testing.assert_allclose(metrics["global_loss"],
                             _hand_info_nce(np.asarray(q), np.asarray(k), 0.2), rtol=1e-4)
  # Statistics move in training; nothing flows into the target; the heads do learn.
  for name in ("projector", "predictor", "target_projector"):
    assert not np.allclose(aux["model_state"][name]["bn0"]["var"], state[name]["bn0"]["var"])
  assert all(not np.any(g) for g in jax.tree.leaves(target_grads))
  assert np.any(grads["predictor"]["fc0"]["kernel"]) and np.any(grads["projector"]["fc0"]["kernel"])
  _, eval_aux = jax.jit(functools.partial(model.apply, train=False))(params, target, state, batch)
  assert jax.tree.all(jax.tree.map(np.array_equal, eval_aux["model_state"], state))


_MULTI_DEVICE_SCRIPT = textwrap.dedent("""
    import functools, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    sys.path.insert(0, "tests")
    import test_global_loss as t
    from cim_jax.models import heads

    assert jax.device_count() == 4, jax.devices()
    # Auto axes, as cim_jax.sharding.make_mesh builds (jax.make_mesh defaults to Explicit axes).
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    model, batch = t._model(), t._batch(batch=8)
    params, state = jax.jit(model.init_variables)(jax.random.key(0))
    target = model.target_params_from(params)
    apply = jax.jit(functools.partial(model.apply, train=True))
    single, _ = apply(params, target, state, batch)
    sharded_batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
    sharded, aux = apply(params, target, state, sharded_batch)
    # The global view: targets of all 4 devices are in the denominator, as with all_gather.
    np.testing.assert_allclose(sharded, single, rtol=1e-5)

    # Explicit named axis: all_gather over 'data' inside shard_map == the global-view loss.
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 8, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(8, 8)), jnp.float32)
    per_device = jax.shard_map(
        lambda q, k: heads.info_nce_loss(q, k, 0.2, axis_name="data")[None],
        mesh=mesh, in_specs=(P(None, "data"), P("data")), out_specs=P("data"))(q, k)
    assert per_device.shape == (4,)
    np.testing.assert_allclose(per_device.mean(), heads.info_nce_loss(q, k, 0.2), rtol=1e-5)
    local_only = np.mean([heads.info_nce_loss(q[:, i:i + 2], k[i:i + 2], 0.2)
                          for i in range(0, 8, 2)])
    assert abs(local_only - per_device.mean()) > 1e-3  # the gather matters
    print("MULTI_DEVICE_OK", float(sharded), float(single))
""")


def test_global_loss_across_four_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, "-c", _MULTI_DEVICE_SCRIPT], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "MULTI_DEVICE_OK" in result.stdout
