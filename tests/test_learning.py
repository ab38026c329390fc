"""Pre-training learns, and the end-of-run report evaluates the right parameters.

One tiny run of `loop.train_and_evaluate` (40 steps on 4 training images, the report as the
evaluate callback) is shared by the module:
- the late-window mean loss is well below the early window (catches gradient ascent, optimizer
  wiring, a loss of the wrong sign) and the report's after-IoU beats its before-IoU;
- the report's evaluations are spied on: "after" / "pretrained" received the trained parameters,
  "before" / "random_init" the initial ones (not only plausible numbers);
- `interop export --workdir` turns the run into timm weights (the target encoder).
"""

import json
import os

import jax
import numpy as np
import pytest
from flax import traverse_util

from cim_jax.evaluate import knn, pretext, report, visualize
from cim_jax.tools import convert
from cim_jax.train import loop
from train_fixtures import learning_config, read_checkpoint, read_metrics

pytestmark = pytest.mark.usefixtures("compilation_cache")

STEPS = 40
WINDOW = 10
# Measured: the first 10 steps average ~3.4 (spikes while Adam warms up), the last 10 ~1.4.
LATE_OVER_EARLY = 0.75


def _config():
  config = learning_config(STEPS)  # 4 fixed training images, peak lr 3e-3
  config.log_every_steps = 1
  config.eval.pretext_iou = True
  config.eval.num_heldout_pairs = 16
  config.eval.knn = True  # spied on (the real kNN is tested in test_knn.py)
  config.eval.data.image_size = 16
  return config


def _flat(tree):
  return {"/".join(map(str, k)): np.asarray(v) for k, v in
          traverse_util.flatten_dict(jax.device_get(tree)).items()}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """Trains once; records what the report's pretext / kNN evaluations received."""
  workdir = str(tmp_path_factory.mktemp("learning"))
  config = _config()
  calls = {"pretext": [], "knn": [], "result": []}
  real_pretext = visualize.evaluate_pretext

  def spy_pretext(model, params, target_params, model_state, pairs, **kwargs):
    calls["pretext"].append((kwargs.get("title", ""), _flat(params), _flat(target_params)))
    return real_pretext(model, params, target_params, model_state, pairs, **kwargs)

  def spy_knn(encoder_params, model_cfg, train, test, **kwargs):
    calls["knn"].append(None if encoder_params is None else _flat(encoder_params))
    return {"k20/top1": 50.0}

  def evaluate(result):
    calls["result"].append(result)
    return report.evaluate_run(result)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(visualize, "evaluate_pretext", spy_pretext)
    mp.setattr(knn, "knn_accuracy", spy_knn)
    metrics = loop.train_and_evaluate(config, workdir, evaluate)
  (result,) = calls["result"]
  return dict(config=config, workdir=workdir, metrics=metrics, calls=calls, result=result)


def test_loss_falls_and_pretext_iou_rises(run):
  rows = read_metrics(run["workdir"])
  assert sorted(rows) == list(range(1, STEPS + 1))
  losses = np.array([rows[s]["loss"] for s in range(1, STEPS + 1)])
  assert np.isfinite(losses).all()
  early, late = losses[:WINDOW].mean(), losses[-WINDOW:].mean()
  assert late < LATE_OVER_EARLY * early, (early, late, losses.round(3).tolist())
  metrics = run["metrics"]
  assert metrics["pretext_iou/after"] > metrics["pretext_iou/before"] + 0.02, metrics
  with open(os.path.join(run["workdir"], "report.json"), encoding="utf-8") as f:
    assert json.load(f)["pretext_iou/after"] == metrics["pretext_iou/after"]


def test_report_evaluates_trained_and_initial_parameters(run):
  result, calls = run["result"], run["calls"]
  trained = _flat(result.state.params)
  trained_target = _flat(result.state.target_params)
  init_params, init_target, _ = pretext.random_init_params(result.model, run["config"].seed)
  initial, initial_target = _flat(init_params), _flat(init_target)
  assert any(not np.array_equal(trained[k], initial[k]) for k in trained)

  def same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)

  by_title = {title.split()[0]: (p, t) for title, p, t in calls["pretext"]}
  assert sorted(by_title) == ["after", "before"]
  assert same(by_title["after"][0], trained) and same(by_title["after"][1], trained_target)
  assert same(by_title["before"][0], initial) and same(by_title["before"][1], initial_target)
  # kNN: "pretrained" gets the trained online encoder, "random_init" None (a fresh init).
  assert len(calls["knn"]) == 2
  pretrained, random_init = calls["knn"]
  encoder = {k.split("/", 1)[1]: v for k, v in trained.items() if k.startswith("encoder/")}
  assert random_init is None and pretrained is not None and same(pretrained, encoder)
  assert run["metrics"]["knn/pretrained/k20/top1"] == 50.0
  assert run["metrics"]["knn/random_init/k20/top1"] == 50.0


def test_interop_exports_the_run_workdir(run, tmp_path):
  """`interop export --workdir` (the fast form of test_interop's slow training-run export)."""
  torch = pytest.importorskip("torch")
  del torch
  pytest.importorskip("safetensors")
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  config = run["config"]
  output = str(tmp_path / "target.safetensors")
  convert.main(["export", "--workdir", run["workdir"], "--variant", config.model.variant,
                "--which", "target", "--output", output])
  exported = load_file(output)
  saved = read_checkpoint(run["workdir"])
  target, online = saved["target_params"]["encoder"], saved["params"]["encoder"]
  np.testing.assert_array_equal(exported["norm.weight"], target["norm"]["scale"])
  np.testing.assert_array_equal(exported["blocks.1.mlp.fc2.weight"],
                                np.asarray(target["blocks_1"]["mlp"]["fc2"]["kernel"]).T)
  assert not np.array_equal(exported["norm.weight"], online["norm"]["scale"])
  np.testing.assert_array_equal(exported["cls_token"], online["cls_token"])
  assert int(saved["step"]) == STEPS
