"""kNN protocol: feature extraction, DINO weighted vote against numpy, sanity on raw pixels."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_digits

from cim_jax.train import warm_start
from cim_jax.models import vit
from cim_jax.data import labelled
from cim_jax.evaluate import knn
from train_fixtures import recipe


def brute_force_knn_scores(train_feats, train_labels, test_feats, k, temperature, num_classes):
  """Loop-by-loop reference of the DINO weighted kNN vote."""
  scores = np.zeros((len(test_feats), num_classes))
  for t, query in enumerate(test_feats):
    sims = np.array([query @ x for x in train_feats])
    for i in np.argsort(-sims, kind="stable")[:k]:
      scores[t, train_labels[i]] += np.exp(sims[i] / temperature)
  return scores


def unit_rows(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def digits_raw_pixels(classes):
  digits = load_digits()
  keep = np.isin(digits.target, classes)
  labels = np.searchsorted(np.asarray(classes), digits.target[keep])
  data = labelled.Labelled(labelled.to_uint8_rgb(digits.images[keep]), labels.astype(np.int32),
                         len(classes))
  return labelled.stratified_split(data, 0.3, seed=0)


def flatten_pixels(images):
  return images.reshape(images.shape[0], -1).astype(jnp.float32)


@pytest.mark.parametrize("k", [1, 5, 20])
def test_knn_scores_match_brute_force(k):
  rng = np.random.default_rng(k)
  train_feats = unit_rows(rng.normal(size=(60, 8))).astype(np.float32)
  test_feats = unit_rows(rng.normal(size=(17, 8))).astype(np.float32)
  train_labels = rng.integers(0, 4, size=60)
  expected = brute_force_knn_scores(train_feats, train_labels, test_feats, k, 0.07, 4)
  got = knn.knn_scores(train_feats, train_labels, test_feats, k=k, temperature=0.07,
                       num_classes=4, chunk_size=5)  # several chunks, the last one partial
  np.testing.assert_allclose(got, expected, rtol=2e-4)


def test_topk_accuracy_hand_computed():
  scores = np.array([[0.1, 0.9, 0.0, 0.0, 0.0, 0.0],
                     [0.5, 0.2, 0.3, 0.0, 0.0, 0.0],
                     [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]])
  labels = np.array([1, 2, 0])
  got = labelled.topk_accuracy(scores, labels)
  assert got["top1"] == pytest.approx(100 / 3)  # only the first row's best is right
  assert got["top5"] == pytest.approx(200 / 3)  # row 3's label 0 has the lowest score


def test_top5_left_out_when_classes_too_few():
  assert set(labelled.topk_accuracy(np.eye(3), np.arange(3))) == {"top1"}


def test_extract_features_batches_pads_and_normalises():
  images = np.random.default_rng(0).integers(0, 256, size=(11, 4, 4, 3), dtype=np.uint8)
  feats = knn.extract_features(flatten_pixels, images, batch_size=4)  # 3 batches, last padded
  expected = unit_rows(images.reshape(11, -1).astype(np.float64))
  assert feats.shape == (11, 48)
  np.testing.assert_allclose(feats, expected, rtol=1e-5)


def test_extract_features_rejects_empty_input():
  with pytest.raises(ValueError, match="no images"):
    knn.extract_features(flatten_pixels, np.zeros((0, 4, 4, 3), np.uint8), batch_size=4)


def test_knn_on_raw_pixels_beats_chance():
  train, test = digits_raw_pixels([0, 1, 6, 7])  # four clearly different digit shapes
  train_feats = knn.extract_features(flatten_pixels, train.images, 64)
  test_feats = knn.extract_features(flatten_pixels, test.images, 64)
  for k in knn.KNN_KS:
    result = knn.knn_classify(train_feats, train.labels, test_feats, test.labels, k=k,
                              num_classes=4)
    assert result["top1"] > 90.0, (k, result)  # chance is 25%


def test_knn_rejects_mismatched_labels():
  feats = unit_rows(np.ones((4, 3))).astype(np.float32)
  with pytest.raises(ValueError, match="4 train features but 3 train labels"):
    knn.knn_scores(feats, np.arange(3), feats, k=2)


def test_stratified_split_keeps_every_class():
  train, test = digits_raw_pixels([0, 1, 2])
  assert set(train.labels) == set(test.labels) == {0, 1, 2}
  assert abs(len(test.labels) / (len(train.labels) + len(test.labels)) - 0.3) < 0.01


SHARDED_SCRIPT = """
import numpy as np, jax, jax.numpy as jnp
from cim_jax.evaluate import knn
assert jax.local_device_count() == 2, jax.local_devices()
images = np.random.default_rng(0).integers(0, 256, size=(7, 4, 4, 3), dtype=np.uint8)
flat = lambda x: x.reshape(x.shape[0], -1).astype(jnp.float32)
feats = knn.extract_features(flat, images, batch_size=3)   # rounded up to 4 = 2 per device
ref = images.reshape(7, -1) / np.linalg.norm(images.reshape(7, -1), axis=1, keepdims=True)
np.testing.assert_allclose(feats, ref, rtol=1e-5)
print("OK")
"""


def test_extract_features_sharded_over_two_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], env=env, capture_output=True,
                       text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-2000:]


def _tiny_vit_setup():
  model_cfg = recipe().model
  train, test = digits_raw_pixels([0, 1, 6, 7])
  train = train.subset(np.arange(0, len(train.labels), 4))  # ~120 images keep the test fast
  size = 32
  train = labelled.Labelled(labelled.resize_images(train.images, size), train.labels, 4)
  test = labelled.Labelled(labelled.resize_images(test.images, size), test.labels, 4)
  return model_cfg, train, test, size


def test_knn_accuracy_of_random_and_given_encoder():
  model_cfg, train, test, size = _tiny_vit_setup()
  overrides = dict(depth=1)
  kwargs = dict(ks=(10,), image_size=size, batch_size=64, encoder_overrides=overrides)
  random_result = knn.knn_accuracy(None, model_cfg, train, test, seed=3, **kwargs)
  assert set(random_result) == {"k10/top1"}  # 4 classes: no top-5
  encoder = vit.encoder_from_config(model_cfg, **overrides)
  params = vit.init_encoder_params(encoder, size, seed=3)
  assert knn.knn_accuracy(params, model_cfg, train, test, **kwargs) == random_result
  other = vit.init_encoder_params(encoder, size, seed=4)
  mean_pool = knn.knn_accuracy(other, model_cfg, train, test, pool="gap", **kwargs)
  assert 0.0 <= mean_pool["k10/top1"] <= 100.0


def test_checkpoint_of_another_variant_is_named():
  small = vit.encoder_from_config(recipe("cim_pretrain.py:S/16").model, depth=2)
  params = vit.init_encoder_params(small, 32, seed=0)
  with pytest.raises(ValueError, match=r"depth 2, width 384.*'Ti/16' needs depth 12, width 192"):
    warm_start.check_encoder_params(params, recipe().model, "run_dir")


@pytest.mark.parametrize("streamed", [False, True])
def test_each_process_extracts_its_share_and_the_gather_equals_one_process(monkeypatch,
                                                                           streamed):
  """3 (fake) processes: each extracts ceil(10 / 3) = 4 records' features; gathered, they are
  the rows one process alone computes, on every process."""
  images = np.random.default_rng(0).integers(0, 256, (10, 8, 8, 3), np.uint8)
  data = labelled.Labelled(images, np.arange(10, dtype=np.int32) % 3, 3)
  data = labelled.LabelledRecords(data, 3) if streamed else data
  flat = lambda x: x.reshape(x.shape[0], -1).astype(jnp.float32)
  kwargs = dict(image_size=8, batch_size=3, crop_pct=1.0, read_threads=1)
  whole_feats, whole_labels = knn.labelled_features(flat, data, **kwargs)

  def as_process(index, gather):
    monkeypatch.setattr(jax, "process_index", lambda: index)
    monkeypatch.setattr(jax, "process_count", lambda: 3)
    monkeypatch.setattr(knn.multihost_utils, "process_allgather", gather)
    return knn.labelled_features(flat, data, **kwargs)

  shares = {p: [] for p in range(3)}  # what each process hands to the gather: feats, labels
  for p in range(3):
    as_process(p, lambda x, p=p: shares[p].append(np.asarray(x)) or np.stack([x] * 3))
    assert [len(x) for x in shares[p]] == [4, 4]
  for p in range(3):
    calls = iter(range(2))

    def gather(x, p=p):
      call = next(calls)
      np.testing.assert_array_equal(x, shares[p][call])
      return np.stack([shares[q][call] for q in range(3)])

    feats, labels = as_process(p, gather)
    np.testing.assert_array_equal(labels, whole_labels)
    np.testing.assert_allclose(feats, whole_feats, rtol=1e-6)
