"""Sensitive checks of the pre-training optimizer and EMA as pre-training builds them.

Everything here goes through `build_trainer(...)` (its `tx`, schedules and jitted step), the
objects `loop.train` uses, and compares with hand-written NumPy restatements: AdamW over several
steps (b1, b2, eps, decoupled weight decay on a hand-written list of leaves), global-norm
clipping, gradient accumulation (mean of the micro-batch gradients), the EMA update from a target
far from the online weights (a momentum error of 1e-3 shows), the decoder's cross-attention and
the pixel-accuracy metric. bench/mutation_check.py shows which broken copy each test catches.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from cim_jax import sharding
from cim_jax.geometry import masks_from_corners
from cim_jax.models import cim
from cim_jax.models import decoder as decoder_lib
from cim_jax.train import schedules
from cim_jax.train import state as state_lib
from cim_jax.train import step as step_lib
from train_fixtures import learning_config, tiny_config

pytestmark = pytest.mark.usefixtures("compilation_cache")

# The tiny model's decayed leaves, written out by hand (not derived from the mask function):
# every trainable kernel. Biases, norms and the frozen patch projection are never decayed; the
# cls token is decayed under wd_exempt="1d" (the authors' add_weight_decay) only.
_DECODER_BLOCK = "decoder/decoder_corr_block"
DECAYED_KERNELS = {
    f"{_DECODER_BLOCK}/attn/kv/kernel", f"{_DECODER_BLOCK}/attn/proj/kernel",
    f"{_DECODER_BLOCK}/attn/q/kernel", f"{_DECODER_BLOCK}/mlp/fc1/kernel",
    f"{_DECODER_BLOCK}/mlp/fc2/kernel", "decoder/decoder_embed/kernel",
    "decoder/decoder_pred_mask/kernel",
} | {f"encoder/blocks_{i}/{leaf}/kernel" for i in range(2)
     for leaf in ("attn/proj", "attn/qkv", "mlp/fc1", "mlp/fc2")}
DECAYED = {"1d": DECAYED_KERNELS | {"encoder/cls_token"}, "1d+tokens": DECAYED_KERNELS}
FROZEN = {"encoder/patch_embed/kernel", "encoder/patch_embed/bias"}
# Leaves given gradients of ~1e-8, where Adam's eps (1e-8) matters: a changed eps, or a sum of
# micro-batch gradients instead of their mean, moves them visibly.
TINY_GRADIENT = "decoder/decoder_pred_mask"

B1, B2, EPS, WD = 0.8, 0.95, 1e-8, 0.1


def _config(accum_steps=1, clip=0.0, exempt="1d+tokens", steps=12):
  config = tiny_config(num_train_steps=steps)
  config.optim.accum_steps = accum_steps
  config.optim.warmup_steps = 0  # lr(0) > 0: every optimizer step moves the params
  config.optim.base_lr = 0.4  # peak lr = 0.4 * 8 * accum / 256 >= 1.25e-2
  config.optim.b1, config.optim.b2 = B1, B2  # neither is optax's / torch's default
  config.optim.weight_decay = WD
  config.optim.wd_exempt = exempt
  config.optim.grad_clip_norm = clip
  return config


def _build(config):
  counts = schedules.step_counts(config, num_examples=None)
  return step_lib.build_trainer(config, cim.build_model(config.model, config.data),
                                sharding.make_mesh(1), counts)


def _paths(tree):
  return {"/".join(k): np.asarray(v, np.float64) for k, v in
          traverse_util.flatten_dict(jax.device_get(tree)).items()}


_PARAMS = {}


def _params():
  """Initialised parameters plus noise (nonzero biases, non-unit scales), once per module."""
  if "p" not in _PARAMS:
    config = _config()
    model = cim.build_model(config.model, config.data)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), state_lib.dummy_batch(config.data))
    rng = np.random.default_rng(0)
    _PARAMS["p"] = jax.tree.map(
        lambda x: (np.asarray(x) + 0.1 * rng.standard_normal(x.shape)).astype(np.float32), params)
  return _PARAMS["p"]


def _gradients(params, seed, scale=1.0):
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(params)
  out = {}
  for path, leaf in flat.items():
    s = scale * (1e-8 if "/".join(path).startswith(TINY_GRADIENT) else 1.0)
    out[path] = (s * rng.standard_normal(leaf.shape)).astype(np.float32)
  return traverse_util.unflatten_dict(out)


def _numpy_adamw(params, grads, lrs, *, decayed, accum=1, clip=0.0):
  """AdamW as the release's torch.optim.AdamW + clip_grad_norm_, in float64 NumPy.

  `grads` are micro-batch gradients; every `accum` of them are averaged into one optimizer
  step whose lr is lrs[optimizer step]. Frozen leaves get no gradient and never move.
  """
  p = _paths(params)
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  for t in range(len(grads) // accum):
    micro = [_paths(g) for g in grads[t * accum:(t + 1) * accum]]
    g = {k: sum(mg[k] for mg in micro) / accum for k in p}
    g = {k: np.zeros_like(x) if k in FROZEN else x for k, x in g.items()}
    if clip:
      norm = math.sqrt(sum(float((x**2).sum()) for x in g.values()))
      if norm > clip:
        g = {k: x * clip / norm for k, x in g.items()}
    for k in p:
      if k in FROZEN:
        continue
      m[k] = B1 * m[k] + (1 - B1) * g[k]
      v[k] = B2 * v[k] + (1 - B2) * g[k]**2
      m_hat, v_hat = m[k] / (1 - B1**(t + 1)), v[k] / (1 - B2**(t + 1))
      update = m_hat / (np.sqrt(v_hat) + EPS)
      if k in decayed:
        update = update + WD * p[k]
      p[k] = p[k] - lrs[t] * update
  return p


def _run_tx(tx, params, grads):
  """Applies `tx` (as the train step does) to each gradient; -> params after each."""
  # Eager: a few hundred small dispatches cost less than compiling the chain for each config.
  update = tx.update
  state = tx.init(params)
  history = []
  for g in grads:
    updates, state = update(g, state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    history.append(params)
  return history


def _assert_close(ours, expected, rtol=2e-5, atol=1e-7):
  ours = _paths(ours)
  assert ours.keys() == expected.keys()
  for k, x in ours.items():
    np.testing.assert_allclose(x, expected[k], rtol=rtol, atol=atol, err_msg=k)


def test_adamw_matches_numpy_over_steps():
  config = _config()
  trainer = _build(config)
  params = _params()
  grads = [_gradients(params, seed, scale) for seed, scale in ((1, 1.0), (2, 3.0), (3, 0.5))]
  history = _run_tx(trainer.tx, params, grads)
  lrs = [float(trainer.lr_schedule(t)) for t in range(3)]
  assert min(lrs) > 1e-3
  expected = _numpy_adamw(params, grads, lrs, decayed=DECAYED["1d+tokens"])
  _assert_close(history[-1], expected)
  # A float32 step moves every trainable leaf far beyond the tolerance (lr >= 1e-2).
  moved = _paths(history[-1])
  for k, x in _paths(params).items():
    assert (k in FROZEN) == np.array_equal(moved[k], x), k


@pytest.mark.parametrize("exempt", ["1d", "1d+tokens"])
def test_build_trainer_decays_exactly_the_listed_leaves(exempt):
  """Zero gradients: Adam's step is 0, so a leaf moves only by its decay, -lr * wd * p."""
  trainer = _build(_config(exempt=exempt))
  params = _params()
  assert set(_paths(params)) >= DECAYED[exempt] | FROZEN
  zero = jax.tree.map(np.zeros_like, params)
  (new,) = _run_tx(trainer.tx, params, [zero])
  factor = 1.0 - float(trainer.lr_schedule(0)) * WD
  decayed = {k for k, (x, y) in zip(_paths(params), zip(_paths(params).values(),
                                                          _paths(new).values()))
             if not np.array_equal(x, y)}
  assert decayed == DECAYED[exempt]
  for k in decayed:
    np.testing.assert_allclose(_paths(new)[k], _paths(params)[k] * factor, rtol=1e-6, err_msg=k)


def test_clipping_scales_a_large_gradient():
  """optim.grad_clip_norm > 0: the global norm (frozen leaves excluded) is clipped before Adam;
  two steps of very different norms (100 and 5) make the clipping visible through Adam."""
  config = _config(clip=1.0)
  trainer = _build(config)
  params = _params()
  grads = []
  for seed, norm in ((4, 100.0), (5, 5.0)):
    g = _gradients(params, seed)
    g["encoder"]["patch_embed"]["kernel"] = np.full_like(g["encoder"]["patch_embed"]["kernel"],
                                                         1e3)  # frozen: not in the norm
    trainable = [x for k, x in _paths(g).items() if k not in FROZEN]
    scale = norm / math.sqrt(sum(float((x**2).sum()) for x in trainable))
    grads.append(jax.tree.map(lambda x, s=scale: (x * s).astype(np.float32), g))
  history = _run_tx(trainer.tx, params, grads)
  lrs = [float(trainer.lr_schedule(t)) for t in range(2)]
  expected = _numpy_adamw(params, grads, lrs, decayed=DECAYED["1d+tokens"], clip=1.0)
  _assert_close(history[-1], expected)
  unclipped = _numpy_adamw(params, grads, lrs, decayed=DECAYED["1d+tokens"])
  gap = max(np.abs(unclipped[k] - expected[k]).max() for k in expected)
  assert gap > 1e-3  # the check above can tell clipped from unclipped


def test_accumulation_averages_micro_batch_gradients():
  """accum_steps 2 over 2 optimizer steps: each step uses the mean of its two micro-batch
  gradients (a sum differs through eps on the ~1e-8 gradients), params move only on the
  second micro-batch."""
  trainer = _build(_config(accum_steps=2))
  params = _params()
  grads = [_gradients(params, seed, scale) for seed, scale in
           ((6, 1.0), (7, 2.0), (8, 0.5), (9, 1.5))]
  history = _run_tx(trainer.tx, params, grads)
  for first in (0, 2):
    before = params if first == 0 else history[first - 1]
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(history[first])):
      np.testing.assert_array_equal(a, b)
  lrs = [float(trainer.lr_schedule(t)) for t in range(2)]
  assert lrs[0] != lrs[1]
  expected = _numpy_adamw(params, grads, lrs, decayed=DECAYED["1d+tokens"], accum=2)
  _assert_close(history[-1], expected)
  summed = _numpy_adamw(params, [jax.tree.map(lambda x: 2 * x, g) for g in grads], lrs,
                        decayed=DECAYED["1d+tokens"], accum=2)
  gap = max(np.abs(summed[k] - expected[k]).max() for k in expected)
  assert gap > 1e-4  # the check above can tell a mean from a sum


# ----------------------------------------------------------------------------------------------
# EMA.


def test_ema_update_directly():
  rng = np.random.default_rng(0)
  online = {"a": rng.standard_normal((3, 4)).astype(np.float32), "b": np.float32(2.0)}
  target = {"a": rng.standard_normal((3, 4)).astype(np.float32) + 5.0, "b": np.float32(-1.0)}
  for m in (0.9, 0.996):
    new = step_lib.ema_update(online, target, m)
    for k in online:
      np.testing.assert_allclose(new[k], m * np.asarray(target[k]) + (1 - m) * np.asarray(
          online[k]), rtol=1e-6, atol=1e-7)


TOTAL, STEP = 40, 20


def _byol_momentum(k, total, start=0.99, end=1.0):
  return end - (end - start) * (math.cos(math.pi * k / total) + 1.0) / 2.0


def test_ema_from_a_distant_target():
  """From step 20 of 40 with the target 1.0 away from the online weights, the jitted step's new
  target is m(20) * target + (1 - m(20)) * new online, m from BYOL's cosine written out here: a
  constant or mis-indexed momentum (off by >= 1e-4) shows as >= 1e-4 in the target.

  The configuration is test_learning.py's, whose run compiles the same step (shared cache)."""
  config = learning_config(TOTAL)
  trainer = _build(config)
  state = trainer.init_state(jax.random.PRNGKey(0), state_lib.dummy_batch(config.data))
  target = jax.tree.map(lambda x: np.asarray(x) + 1.0, jax.device_get(state.params["encoder"]))
  state = jax.device_put(state.replace(step=jnp.asarray(STEP, jnp.int32),
                                       target_params={"encoder": target}),
                         trainer.state_shardings)
  rng = np.random.default_rng(0)
  d = config.data
  b = config.batch_size
  batch = {"context": rng.integers(0, 256, (b, d.context_size, d.context_size, 3), np.uint8),
           "exemplars": rng.integers(0, 256, (b, d.num_exemplars, d.exemplar_size,
                                              d.exemplar_size, 3), np.uint8),
           "corners": np.tile(np.array([[4, 4], [20, 4], [20, 20], [4, 20]], np.float32),
                              (b, d.num_exemplars, 1, 1))}
  new, metrics = trainer.train_step(state, sharding.global_batch(batch, trainer.batch_sharding),
                                    jax.random.PRNGKey(1))
  m = _byol_momentum(STEP, TOTAL)
  for other in (0, STEP - 1, STEP + 1):  # a constant or an off-by-one momentum
    assert abs(m - _byol_momentum(other, TOTAL)) > 1e-4
  assert float(metrics["momentum"]) == pytest.approx(m, abs=1e-7)
  online, old, got = _paths(new.params["encoder"]), _paths({"e": target}), _paths(
      new.target_params["encoder"])
  for k, t in got.items():
    np.testing.assert_allclose(t, m * old[f"e/{k}"] + (1 - m) * online[k], rtol=0, atol=2e-6,
                               err_msg=k)


# ----------------------------------------------------------------------------------------------
# Decoder attention and the pixel-accuracy metric.


def _softmax(x):
  x = x - x.max(-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(-1, keepdims=True)


def test_decoder_attention_matches_numpy():
  """CrossAttention: q from the context; kv's first half of columns are the keys, the second
  the values (the authors' layout); compared as outputs (key biases do not change them)."""
  dim, heads = 8, 2
  rng = np.random.default_rng(0)
  context = rng.standard_normal((2, 5, dim)).astype(np.float32)
  exemplars = rng.standard_normal((2, 3, 4, dim)).astype(np.float32)
  module = decoder_lib.CrossAttention(num_heads=heads)
  params = module.init(jax.random.PRNGKey(0), context, exemplars)["params"]
  params = jax.tree.map(lambda x: np.asarray(x) + 0.3 * rng.standard_normal(x.shape), params)
  params = jax.tree.map(lambda x: x.astype(np.float32), params)
  got = np.asarray(module.apply({"params": params}, context, exemplars))
  p = {k: np.asarray(v, np.float64) for k, v in _paths(params).items()}
  hd = dim // heads
  q = context @ p["q/kernel"] + p["q/bias"]  # (B, Tq, D)
  kv = exemplars @ p["kv/kernel"] + p["kv/bias"]  # (B, N, Tk, 2D)
  k, v = kv[..., :dim], kv[..., dim:]
  split = lambda x: x.reshape(x.shape[:-1] + (heads, hd))
  qh, kh, vh = split(q), split(k), split(v)  # (B, Tq, H, d), (B, N, Tk, H, d)
  logits = np.einsum("bqhd,bnkhd->bnhqk", qh, kh) / math.sqrt(hd)
  out = np.einsum("bnhqk,bnkhd->bnqhd", _softmax(logits), vh).reshape(2, 3, 5, dim)
  expected = out @ p["proj/kernel"] + p["proj/bias"]
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_pixel_accuracy_metric():
  """pixel_accuracy = share of pixels whose argmax class is the label; corr_loss = the 2-class
  softmax CE of the full-resolution logits (channel 1 = exemplar), both from aux's logits."""
  config = _config()
  model = cim.build_model(config.model, config.data)
  params = _params()
  rng = np.random.default_rng(3)
  d = config.data
  batch = {"context": rng.integers(0, 256, (2, d.context_size, d.context_size, 3), np.uint8),
           "exemplars": rng.integers(0, 256, (2, d.num_exemplars, d.exemplar_size,
                                              d.exemplar_size, 3), np.uint8),
           "corners": np.array([[[3, 2], [25, 6], [22, 28], [1, 24]],
                                [[10, 10], [30, 10], [30, 17], [10, 17]]],
                               np.float32)[:, None].repeat(d.num_exemplars, 1)}
  apply = jax.jit(lambda p, t, b: model.apply(p, t, {}, b, train=False))
  loss, aux = apply(params, model.target_params_from(params), batch)
  logits = np.asarray(aux["correlation_logits"], np.float64)  # (B, N, C, C, 2)
  masks = masks_from_corners(batch["corners"], d.context_size)
  predicted = logits[..., 1] > logits[..., 0]
  accuracy = float((predicted == masks).mean())
  assert 0.05 < accuracy < 0.95 and 0.1 < masks.mean() < 0.9  # neither trivial
  assert float(aux["metrics"]["pixel_accuracy"]) == pytest.approx(accuracy, abs=1e-6)
  log_p = logits - np.logaddexp(logits[..., :1], logits[..., 1:])
  nll = -np.where(masks, log_p[..., 1], log_p[..., 0])
  expected = nll.mean(axis=(0, 2, 3)).sum()
  assert float(aux["metrics"]["corr_loss"]) == pytest.approx(expected, rel=1e-5)
  assert float(loss) == pytest.approx(expected, rel=1e-5)
