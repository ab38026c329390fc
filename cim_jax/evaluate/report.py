"""End-of-run report of a pre-training run: pretext IoU before / after, kNN, PNGs (config.eval)."""

import json
import logging
import os
from typing import Any

import jax
from etils import epath

from cim_jax import sharding
from cim_jax.data import labelled
from cim_jax.data import pipeline
from cim_jax.evaluate import knn
from cim_jax.evaluate import pretext
from cim_jax.evaluate import visualize
from cim_jax.models import cim
from cim_jax.train import warm_start


def evaluate_run(result) -> dict[str, Any]:
  """`evaluate` callback of `loop.train_and_evaluate`: report on a `TrainResult`.

  Every process evaluates the same whole (host) copy of the state and process 0 writes the
  report: parameters sharded across hosts (fsdp) are gathered first.
  """
  state = sharding.to_host({"params": result.state.params,
                            "target_params": result.state.target_params,
                            "model_state": result.state.model_state})
  return run(result.config, result.workdir, model=result.model, **state)


def run(config, workdir: str, *, params=None, target_params=None, model_state=None,
        model=None) -> dict[str, Any]:
  """Pretext IoU, correlation PNGs, training curves and kNN as `config.eval` asks.

  The trained state comes from the arguments, or else the work dir's latest checkpoint.
  Writes `workdir/report.json` and returns the same dict.
  """
  model = model or cim.build_model(config.model, config.data)
  if params is None:
    loaded = warm_start.load_checkpoint(config, workdir, model=model)
    params, target_params = loaded["params"], loaded["target_params"]
  before = pretext.random_init_params(model, config.seed)
  model_state = before[2] if model_state is None else model_state
  report: dict[str, Any] = {}
  out = epath.Path(workdir)  # a local path or gs://... alike

  # Every process computes the same report; only process 0 writes files.
  write_files = jax.process_index() == 0
  if config.eval.pretext_iou or config.eval.visualize:
    pairs = pipeline.heldout_pairs(config)
    for name, (p, t, s) in (("before", before), ("after", (params, target_params, model_state))):
      png = (os.fspath(out / f"correlation_{name}.png") if config.eval.visualize and write_files
             else None)
      outcome = visualize.evaluate_pretext(model, p, t, s, pairs, png=png,
                                         title=f"{name} pre-training")
      report[f"pretext_iou/{name}"] = outcome["pretext_iou"]
      if png:
        report[f"png/correlation_{name}"] = png
  if config.eval.visualize and write_files:
    metrics_log = out / "metrics.jsonl"
    if metrics_log.exists():
      report["png/training_curves"] = visualize.plot_training_curves(
          os.fspath(metrics_log), os.fspath(out / "training_curves.png"))

  if config.eval.knn:
    train, test = labelled.splits(config.eval.data, "config.eval.data")
    kwargs = dict(knn.feature_kwargs(config.eval.data), ks=(int(config.eval.knn_k),),
                  temperature=config.eval.knn_temperature, seed=config.seed)
    encoder_params = jax.device_get(params["encoder"])
    for name, encoder in (("pretrained", encoder_params), ("random_init", None)):
      for key, value in knn.knn_accuracy(encoder, config.model, train, test, **kwargs).items():
        report[f"knn/{name}/{key}"] = value

  if write_files:
    path = out / "report.json"
    path.write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(format_report(report, config))
    logging.info("report written to %s", path)
  return report


def format_report(report: dict[str, Any], config) -> str:
  """The report as a small side-by-side table (before | after, random | pretrained)."""
  lines = ["", "=== CIM pre-training report ==="]
  if "pretext_iou/before" in report:
    lines.append(f"{'':42}{'before':>10}{'after':>10}")
    lines.append(f"{'pretext mean IoU (held-out pairs)':42}"
                 f"{report['pretext_iou/before']:10.4f}{report['pretext_iou/after']:10.4f}")
  knn_keys = sorted({k.split("/", 2)[2] for k in report if k.startswith("knn/")})
  if knn_keys:
    lines.append(f"{'':42}{'random':>10}{'pretrained':>12}")
    for key in knn_keys:
      label = f"kNN {config.eval.data.source} {key} (%)"
      lines.append(f"{label:42}{report[f'knn/random_init/{key}']:10.2f}"
                   f"{report[f'knn/pretrained/{key}']:12.2f}")
  lines += [f"{k.split('/', 1)[1]}: {v}" for k, v in report.items() if k.startswith("png/")]
  return "\n".join(lines)
