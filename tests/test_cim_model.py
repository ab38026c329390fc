"""The CIM model (cim_jax.models.cim): losses, metrics, gradients, masks, the cuDNN padding."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cim_jax.models import cim
from cim_jax.train import optimizer as optimizer_lib
from train_fixtures import randomize, recipe


def _tiny_config(**model_overrides):
  config = recipe()
  config.model.update(model_overrides)
  return config


SMALL_ENCODER = dict(width=32, depth=1, num_heads=2)


def _small_model(**overrides):
  config = _tiny_config(decoder_dim=32, decoder_heads=4, projector_hidden_dim=16,
                        projector_dim=8, **overrides)
  config.data.context_size, config.data.exemplar_size, config.data.num_exemplars = 64, 32, 2
  return cim.build_model(config.model, config.data, **SMALL_ENCODER), config


def _small_batch(batch=2, num=2, context=64, exemplar=32, seed=0):
  rng = np.random.default_rng(seed)
  # Axis-aligned 20x12 boxes; corners in (x, y) context pixels, listed around the box.
  x0, y0 = rng.integers(0, context // 2, size=(2, batch, num)).astype(np.float32)
  corners = np.stack([np.stack(c, -1) for c in
                      [(x0, y0), (x0 + 20, y0), (x0 + 20, y0 + 12), (x0, y0 + 12)]], axis=2)
  return {
      "context": rng.integers(0, 256, (batch, context, context, 3), dtype=np.uint8),
      "exemplars": rng.integers(0, 256, (batch, num, exemplar, exemplar, 3), dtype=np.uint8),
      "corners": corners,
  }


@pytest.fixture(scope="module")
def small():
  """(model, batch, params) shared by the CIM tests: one init, one compile per function."""
  model, _ = _small_model()
  batch = _small_batch()
  params = jax.jit(model.init)(jax.random.key(0), batch)
  return model, batch, params


def _box_masks(corners, size):
  """Hand rasterisation of axis-aligned boxes: pixel centres (c + 0.5, r + 0.5) inside or on it."""
  centres = np.arange(size) + 0.5
  x0, y0 = corners[..., 0, 0], corners[..., 0, 1]
  x1, y1 = corners[..., 2, 0], corners[..., 2, 1]
  inside_x = (centres >= x0[..., None]) & (centres <= x1[..., None])
  inside_y = (centres >= y0[..., None]) & (centres <= y1[..., None])
  return inside_y[..., :, None] & inside_x[..., None, :]


def test_correlation_loss_equals_hand_computation():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 5, 5, 2)).astype(np.float32)
  masks = rng.integers(0, 2, size=(2, 3, 5, 5))
  expected = 0.0
  for n in range(3):
    total = 0.0
    for b in range(2):
      for y in range(5):
        for x in range(5):
          z = logits[b, n, y, x]
          total += np.log(np.exp(z).sum()) - z[masks[b, n, y, x]]
    expected += total / (2 * 25)
  np.testing.assert_allclose(cim.correlation_loss(jnp.asarray(logits), jnp.asarray(masks)),
                             expected, rtol=1e-5)


def test_correlation_loss_from_difference_is_stable_softmax_ce():
  logits = np.array([[[[[0.0, 100.0], [100.0, 0.0], [3.0, -2.0]]]]], np.float32)  # (1,1,1,3,2)
  masks = np.array([[[[0, 0, 1]]]])
  # Per-pixel CE: 100, 100 and log(1 + e^5) + ... computed by hand in float64.
  z = logits.astype(np.float64)[0, 0, 0]
  expected = np.mean([np.log(np.exp(z[i]).sum()) - z[i, m] for i, m in enumerate(masks[0, 0, 0])])
  difference = jnp.asarray(logits[..., 1] - logits[..., 0])
  loss = cim.correlation_loss_from_difference(difference, jnp.asarray(masks))
  assert np.isfinite(loss)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  np.testing.assert_allclose(cim.correlation_loss(jnp.asarray(logits), jnp.asarray(masks)),
                             expected, rtol=1e-6)


def test_normalize_images():
  images = np.array([[[[0, 128, 255]]]], np.uint8)
  out = np.asarray(cim.normalize_images(images))
  expected = (np.array([0, 128, 255]) / 255 - np.array(cim.IMAGENET_MEAN)) / np.array(
      cim.IMAGENET_STD)
  np.testing.assert_allclose(out[0, 0, 0], expected, rtol=1e-5)


def test_target_starts_as_exact_copy_in_separate_buffers(small):
  model, _, params = small
  target = model.target_params_from(params)
  assert set(target) == {"encoder"}
  for a, b in zip(jax.tree.leaves(params["encoder"]), jax.tree.leaves(target["encoder"])):
    np.testing.assert_array_equal(a, b)
    assert a.unsafe_buffer_pointer() != b.unsafe_buffer_pointer()  # safe to donate both


def test_optimizer_masks(small):
  _, _, params = small
  frozen = optimizer_lib.frozen_mask(params, True)
  assert frozen["encoder"]["patch_embed"] == {"kernel": True, "bias": True}
  assert sum(jax.tree.leaves(frozen)) == 2
  assert not any(jax.tree.leaves(optimizer_lib.frozen_mask(params, False)))
  decay = optimizer_lib.weight_decay_mask(params, "1d")
  assert decay["encoder"]["cls_token"] and decay["encoder"]["blocks_0"]["attn"]["qkv"]["kernel"]
  assert not decay["encoder"]["blocks_0"]["attn"]["qkv"]["bias"]
  assert not decay["encoder"]["norm"]["scale"] and not decay["decoder"]["decoder_norm"]["bias"]
  assert not optimizer_lib.weight_decay_mask(params, "1d+tokens")["encoder"]["cls_token"]
  with pytest.raises(ValueError, match="exemption"):
    optimizer_lib.weight_decay_mask(params, "all")


def test_apply_loss_and_metrics_match_hand_computation(small):
  model, batch, params = small
  target = model.target_params_from(params)
  loss, aux = jax.jit(functools.partial(model.apply, train=True))(
      params, target, {}, batch, rng=jax.random.key(1))
  logits = np.asarray(aux["correlation_logits"], np.float64)
  assert logits.shape == (2, 2, 64, 64, 2)
  masks = _box_masks(batch["corners"], 64)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.where(masks, log_probs[..., 1], log_probs[..., 0])
  expected = nll.mean(axis=(0, 2, 3)).sum()
  np.testing.assert_allclose(aux["metrics"]["corr_loss"], expected, rtol=1e-5)
  np.testing.assert_allclose(loss, model.corr_loss_weight * expected, rtol=1e-5)
  np.testing.assert_allclose(aux["metrics"]["mask_fraction"], masks.mean(), rtol=1e-6)
  assert set(aux["metrics"]) >= {"loss", "corr_loss", "mask_fraction"}
  assert aux["model_state"] == {}


def test_apply_equals_manual_composition(small):
  """Target = encoder(target_params) on the context with the online cls token prepended."""
  model, batch, params = small
  target = randomize(model.target_params_from(params), seed=5)
  _, aux = jax.jit(functools.partial(model.apply, train=False))(params, target, {}, batch)

  @jax.jit
  def manual(params, target):
    context = cim.normalize_images(batch["context"])
    exemplars = cim.normalize_images(batch["exemplars"])
    target_enc = dict(target["encoder"], cls_token=params["encoder"]["cls_token"])
    context_tokens, _ = model.encoder.apply({"params": target_enc}, context)
    exemplar_tokens, _ = model.encoder.apply({"params": params["encoder"]},
                                             exemplars.reshape(4, 32, 32, 3))
    return model.decoder.apply({"params": params["decoder"]}, context_tokens,
                               exemplar_tokens.reshape(2, 2, 5, -1))

  logits = manual(params, target)
  np.testing.assert_allclose(aux["correlation_logits"], logits, atol=1e-5)


def _largest_float_array(hlo_text: str) -> int:
  sizes = [np.prod([int(d) for d in dims.split(",") if d]) for dims in
           re.findall(r"f32\[([\d,]*)\]", hlo_text)]
  return int(max(sizes))


def test_training_gradient_never_builds_full_resolution_logits(small):
  """Only the one-channel difference map reaches 64x64 when the logits are not returned."""
  model, batch, params = small
  target = model.target_params_from(params)
  loss_fn = lambda p: model.apply(p, target, {}, batch, train=True, rng=jax.random.key(0))[0]
  train_hlo = jax.jit(jax.grad(loss_fn)).lower(params).compile().as_text()
  eval_hlo = jax.jit(lambda p: model.apply(p, target, {}, batch, train=False)[1][
      "correlation_logits"]).lower(params).compile().as_text()
  full_logits = 2 * 2 * 64 * 64 * 2  # (B, N, C, C, 2); no other tensor of the model is as big
  assert _largest_float_array(eval_hlo) == full_logits
  assert _largest_float_array(train_hlo) < full_logits


def test_gradients_skip_the_target(small):
  """The target branch gets no gradient (the frozen patch projection is the optimizer's job:
  test_train_step.py checks that it never moves)."""
  model, batch, params = small
  target = model.target_params_from(params)
  loss_fn = lambda p, t: model.apply(p, t, {}, batch, train=True, rng=jax.random.key(0))[0]
  grads, target_grads = jax.jit(jax.grad(loss_fn, argnums=(0, 1)))(params, target)
  assert all(not np.any(g) for g in jax.tree.leaves(target_grads))
  for path in [("encoder", "cls_token"), ("encoder", "blocks_0", "attn", "qkv", "kernel"),
               ("decoder", "decoder_corr_block", "attn", "q", "kernel")]:
    assert np.any(functools.reduce(lambda t, k: t[k], path, grads)), path


def test_bfloat16_model_gives_float32_loss(small):
  reference, batch, params = small
  model, _ = _small_model(dtype="bfloat16")
  target = model.target_params_from(params)
  loss, aux = jax.jit(functools.partial(model.apply, train=False))(params, target, {}, batch)
  assert loss.dtype == jnp.float32 and aux["correlation_logits"].dtype == jnp.float32
  ref_loss, _ = jax.jit(functools.partial(reference.apply, train=False))(params, target, {}, batch)
  np.testing.assert_allclose(loss, ref_loss, rtol=0.05)


def test_bad_batch_raises(small):
  model, batch, params = small
  bad = dict(batch, corners=batch["corners"][:, :1])
  with pytest.raises(ValueError, match="disagree"):
    model.apply(params, model.target_params_from(params), {}, bad, train=False)
  config = _tiny_config()
  config.data.context_size = 150
  with pytest.raises(ValueError, match="context_size"):
    cim.build_model(config.model, config.data)


@pytest.mark.slow  # compiles the CIM loss and gradients twice: ~32 s
def test_cudnn_path_gives_the_kernel_even_lengths_and_changes_nothing(monkeypatch):
  """model.attention_impl=cudnn pads CIM's odd sequences (here 17 context, 5 exemplar tokens)
  before the attention projections, so the kernel only sees even lengths (cuDNN has no backward
  for odd ones); loss and every gradient equal the unpadded model's. No GPU here: the kernel is
  swapped for XLA's, so what is checked is the padding, the key mask and the slicing."""
  seen = []
  original = jax.nn.dot_product_attention

  def kernel(q, k, v, *args, implementation=None, **kwargs):
    if implementation == "cudnn":
      seen.append((q.shape[1], k.shape[1]))
      implementation = None
    return original(q, k, v, *args, implementation=implementation, **kwargs)

  monkeypatch.setattr(jax.nn, "dot_product_attention", kernel)
  batch = _small_batch()
  xla_model, _ = _small_model(attention_impl="xla")
  cudnn_model, _ = _small_model(attention_impl="cudnn")
  params = randomize(xla_model.init(jax.random.key(0), batch))
  target = randomize(xla_model.target_params_from(params), seed=2)

  def loss_and_grads(model):
    loss = lambda p: model.apply(p, target, {}, batch, train=True, rng=jax.random.key(1))[0]
    return jax.value_and_grad(loss)(params)

  (xla_loss, xla_grads), (cudnn_loss, cudnn_grads) = map(loss_and_grads, (xla_model, cudnn_model))
  assert seen and all(q % 2 == 0 and k % 2 == 0 for q, k in seen), seen
  assert {(18, 18), (6, 6), (18, 6)} <= set(seen)  # context, exemplar, cross attention
  np.testing.assert_allclose(cudnn_loss, xla_loss, rtol=1e-6)
  for path, got in jax.tree_util.tree_leaves_with_path(cudnn_grads):
    want = xla_grads
    for key in path:
      want = want[key.key]
    np.testing.assert_allclose(got, want, atol=1e-6, err_msg=jax.tree_util.keystr(path))
