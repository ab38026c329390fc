"""Fast default-suite checks of paths the slow tests also cover, and kNN pooling.

- the grain pipeline with 1 worker process gives the batches of 0 workers and resumes exactly;
- a fine-tuning run stopped after 2 steps and resumed for 2 more equals 4 straight steps;
- kNN features with pool="gap" are the mean of the patch tokens, and knn_accuracy uses them.
(`interop export --workdir` of a tiny run is in test_learning.py, which shares its run.)
"""

import jax
import numpy as np
import pytest

from cim_jax.models import vit
from cim_jax.train import metrics as metrics_lib
from cim_jax.train import finetuning
from cim_jax.data import labelled
from cim_jax.data import pipeline
from cim_jax.evaluate import knn
from cim_jax.models import cim
from train_fixtures import committed, read_checkpoint, recipe
from train_fixtures import tiny_config as tiny_pretrain_config
from test_finetune import tiny_config as tiny_finetune_config
from test_finetune import logged, tiny_labelled_subset

pytestmark = pytest.mark.usefixtures("compilation_cache")


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_one_grain_worker_gives_identical_batches_and_resumes():
  config = recipe()
  config.batch_size = 3
  config.data.update(context_size=32, exemplar_size=16, search_size=48, num_images=8)
  plain = _take(pipeline.make_iterator(config, process_index=0, process_count=1), 4)
  config.data.num_workers = 1
  iterator = pipeline.make_iterator(config, process_index=0, process_count=1)
  try:
    first = _take(iterator, 2)
    state = iterator.get_state()
    rest = _take(iterator, 2)
  finally:
    iterator.close()
  _assert_same_batches(first + rest, plain)
  resumed = pipeline.make_iterator(config, process_index=0, process_count=1)
  try:
    resumed.set_state(state)
    _assert_same_batches(_take(resumed, 2), plain[2:])
  finally:
    resumed.close()


class _Crash(Exception):
  pass


# pylint: disable-next=redefined-outer-name
def test_finetune_resume_is_exact(tmp_path, monkeypatch, tiny_classifier):
  """2 + 2 steps (crashed after a checkpoint, restarted on the same work dir) == 4 straight
  steps, with the random augmentations on: same state, metrics and accuracy."""
  del tiny_classifier
  tiny_labelled_subset(monkeypatch)
  config = tiny_finetune_config(steps=4)
  config.checkpoint_every_steps = 2
  config.eval_every_steps = 4
  config.log_every_steps = 1
  config.mixup.prob = 1.0  # the random parts must replay too
  config.data.random_erase_prob = 0.25
  config.data.flip_prob = 0.5
  straight = finetuning.finetune(config, str(tmp_path / "a"))
  # The same run crashes in step 3, after the checkpoint of step 2, then restarts on its work
  # dir: one configuration, so one compilation serves all three runs.
  write = metrics_lib.MetricsWriter.write

  def crash_at_three(self, step, scalars):
    if step == 3:
      raise _Crash()
    write(self, step, scalars)

  with monkeypatch.context() as mp:
    mp.setattr(metrics_lib.MetricsWriter, "write", crash_at_three)
    with pytest.raises(_Crash):
      finetuning.finetune(config, str(tmp_path / "b"))
  assert committed(str(tmp_path / "b"), 2) and not committed(str(tmp_path / "b"), 4)
  resumed = finetuning.finetune(config, str(tmp_path / "b"))
  assert resumed == straight
  # Steps 1-4: losses, lr, the step-4 accuracy.
  assert logged(tmp_path / "a") == logged(tmp_path / "b") and len(logged(tmp_path / "a")) == 4
  a, b = read_checkpoint(str(tmp_path / "a")), read_checkpoint(str(tmp_path / "b"))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_knn_gap_pool_is_the_mean_of_patch_tokens(monkeypatch):
  config = tiny_pretrain_config()
  encoder = vit.encoder_from_config(config.model)
  params = vit.init_encoder_params(encoder, 32, seed=0)
  images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), np.uint8)
  tokens, _ = encoder.apply({"params": params}, cim.normalize_images(images), train=False)
  tokens = np.asarray(tokens)
  assert tokens.shape[1] == 1 + 4
  mean = np.asarray(knn.encoder_feature_fn(encoder, params, pool="gap")(images))
  np.testing.assert_allclose(mean, tokens[:, 1:].mean(axis=1), rtol=1e-5, atol=1e-6)
  cls = np.asarray(knn.encoder_feature_fn(encoder, params, pool="tok")(images))
  np.testing.assert_allclose(cls, tokens[:, 0], rtol=1e-5, atol=1e-6)
  assert np.abs(mean - cls).max() > 1e-2
  # knn_accuracy extracts its features with the pool it is given, and the kNN tool gives it
  # config.eval.feature_pool.
  seen = []
  real = knn.encoder_feature_fn

  def spy(encoder, encoder_params, **kwargs):
    seen.append(kwargs.get("pool", "tok"))
    return real(encoder, encoder_params, **kwargs)

  monkeypatch.setattr(knn, "encoder_feature_fn", spy)
  labels = np.array([0, 1, 0, 1, 0], np.int32)
  data = labelled.Labelled(images, labels, 2)
  result = knn.knn_accuracy(params, config.model, data, data, ks=(1,), pool="gap",
                            image_size=32, batch_size=8)
  assert seen == ["gap"]
  assert 0.0 <= result["k1/top1"] <= 100.0
  tool_config = recipe("cim_eval.py:Ti/16")
  tool_config.eval.feature_pool = "gap"
  monkeypatch.setattr(knn.labelled, "splits", lambda d: (data, data))
  monkeypatch.setattr(knn, "knn_accuracy",
                      lambda *args, **kwargs: seen.append(kwargs["pool"]) or {})
  knn.main(tool_config)
  assert seen == ["gap", "gap"]
