"""The README's main job end to end: `python -m cim_jax.pretrain` on the embedded demo config.

A few steps of the real entry point (ViT-Ti, full pair pipeline, EMA target, correlation decoder)
must leave behind what a user looks at: checkpoints, TensorBoard events, the JSONL metrics log,
the correlation-map PNGs and the report with pretext IoU before/after and kNN pretrained/random.
"""

import json
import math
import os
import subprocess
import sys

import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pretrain(cwd, workdir, *overrides):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run(
      [sys.executable, "-m", "cim_jax.pretrain", f"--config={ROOT}/configs/demo.py",
       f"--workdir={workdir}", "--config.batch_size=4", "--config.num_train_steps=3",
       "--config.optim.warmup_steps=1", "--config.log_every_steps=1",
       "--config.checkpoint_every_steps=2", "--config.progress_bar=false",
       "--config.eval.num_heldout_pairs=4", "--config.eval.data.image_size=32", *overrides],
      cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # the demo command end to end, twice: ~72 s warm
def test_demo_pretraining_writes_checkpoints_logs_pngs_and_report(tmp_path):
  # A relative --workdir, as in the README's default (orbax itself needs absolute paths).
  workdir = tmp_path / "run"
  proc = _pretrain(tmp_path, "run")
  assert proc.returncode == 0, proc.stderr[-3000:]

  steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  assert steps and steps[-1] == 3, steps  # the final step is always checkpointed

  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert [r["step"] for r in records] == [1, 2, 3]
  assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in records)
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir / "tensorboard"))

  report = json.loads(open(workdir / "report.json").read())
  for key in ("pretext_iou/before", "pretext_iou/after"):
    assert 0.0 <= report[key] <= 1.0
  for name in ("pretrained", "random_init"):
    assert 0.0 <= report[f"knn/{name}/k20/top1"] <= 100.0
  for name in ("correlation_before", "correlation_after", "training_curves"):
    with Image.open(os.path.join(tmp_path, report[f"png/{name}"])) as png:
      assert png.format == "PNG" and min(png.size) > 100
  assert "pretext mean IoU" in proc.stdout and "kNN digits k20/top1" in proc.stdout

  # A second start with the same work dir resumes at the last checkpoint: no step is re-run.
  again = _pretrain(tmp_path, "run")
  assert again.returncode == 0, again.stderr[-3000:]
  assert len(open(workdir / "metrics.jsonl").readlines()) == 3
