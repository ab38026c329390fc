"""Linear probe: sanity on raw pixels, bad labels, and the encoder path."""

import jax.numpy as jnp
import numpy as np
import pytest

from cim_jax.evaluate import linear_probe
from train_fixtures import recipe
from tests.test_knn import digits_raw_pixels


def raw_features(data):
  return data.images.reshape(len(data.labels), -1).astype(np.float32)


@pytest.mark.parametrize("optimizer,base_lr", [("sgd", 0.1), ("adamw", 0.05)])
def test_probe_on_raw_pixels_beats_chance(optimizer, base_lr):
  train, test = digits_raw_pixels([0, 1, 6, 7])
  recipe = linear_probe.ProbeRecipe(optimizer=optimizer, base_lr=base_lr, epochs=30,
                                    warmup_epochs=3, batch_size=128)
  result = linear_probe.linear_probe(raw_features(train), train.labels, raw_features(test),
                                     test.labels, num_classes=4, recipe=recipe)
  assert result["top1"] > 90.0, result  # chance is 25%
  assert "top5" not in result


def test_probe_reports_top5_with_many_classes():
  train, test = digits_raw_pixels(list(range(10)))
  recipe = linear_probe.ProbeRecipe(epochs=10, warmup_epochs=1)
  result = linear_probe.linear_probe(raw_features(train), train.labels, raw_features(test),
                                     test.labels, num_classes=10, recipe=recipe)
  assert result["top5"] >= result["top1"] > 50.0  # chance is 10%


def test_probe_rejects_labels_outside_head():
  feats = np.ones((4, 3), np.float32)
  with pytest.raises(ValueError, match=r"labels span \[0, 5\], outside the 3 classes"):
    linear_probe.linear_probe(feats, np.array([0, 1, 2, 5]), feats, np.zeros(4, int),
                              num_classes=3)
  with pytest.raises(ValueError, match=r"test labels span \[0, 7\]"):
    linear_probe.linear_probe(feats, np.array([0, 1, 2, 1]), feats, np.array([0, 7, 0, 0]),
                              num_classes=3)
  with pytest.raises(ValueError, match="optimizer must be"):
    linear_probe.make_optimizer(linear_probe.ProbeRecipe(optimizer="rmsprop"), 10, 1, 8)


def test_probe_of_an_encoder_runs_and_is_seeded():
  model_cfg = recipe().model
  train, test = digits_raw_pixels([0, 1])
  kwargs = dict(recipe=linear_probe.ProbeRecipe(epochs=3, warmup_epochs=1, batch_size=64),
                image_size=16, encoder_overrides=dict(depth=1), seed=1)
  first = linear_probe.linear_probe_accuracy(None, model_cfg, train, test, **kwargs)
  again = linear_probe.linear_probe_accuracy(None, model_cfg, train, test, **kwargs)
  assert first == again and set(first) == {"top1", "train_top1"}


def test_lars_exempts_bias_from_trust_ratio():
  recipe = linear_probe.ProbeRecipe(optimizer="lars", momentum=0.0)
  tx = linear_probe.make_optimizer(recipe, steps=100, warmup=0, batch_size=256)  # lr 0.1
  params = {"kernel": jnp.full((2, 2), 3.0), "bias": jnp.zeros((2,))}
  grads = {"kernel": jnp.full((2, 2), 0.5), "bias": jnp.full((2,), 0.5)}
  _, state = tx.update(grads, tx.init(params), params)  # step 0 of the warm-up has lr 0
  updates, _ = tx.update(grads, state, params)
  # kernel: lr * 1e-3 * |w| / |g| * g = 0.1 * 1e-3 * 6 / 1 * 0.5; bias: plain lr * g.
  np.testing.assert_allclose(updates["kernel"], -0.1 * 1e-3 * 6.0 * 0.5, rtol=1e-5)
  np.testing.assert_allclose(updates["bias"], -0.1 * 0.5, rtol=1e-5)
