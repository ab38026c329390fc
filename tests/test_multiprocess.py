"""Two processes on 127.0.0.1 (jax.distributed + gloo) run the real trainer and agree."""

import json
import os
import signal
import socket
import time

import numpy as np
import pytest

from train_fixtures import committed, read_metrics, start_run


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start_two(workdir, overrides):
  """Two processes of one run (one CPU device each), joined through a fresh coordinator port."""
  port = _free_port()
  return [start_run(workdir, overrides, devices=1, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                    JAX_NUM_PROCESSES=2, JAX_PROCESS_ID=i) for i in range(2)]


def _finish(procs):
  """Waits for every process; each must exit 0. Returns their outputs."""
  outs = [p.communicate(timeout=400)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  return outs


def _reports(workdir, name):
  """The `name`_process<i>.json each process wrote."""
  reports = []
  for i in range(2):
    with open(os.path.join(workdir, f"{name}_process{i}.json")) as f:
      reports.append(json.load(f))
  return reports


def test_two_processes_agree_on_loss_and_params(tmp_path):
  workdir = str(tmp_path / "run")
  _finish(_start_two(workdir, ["num_train_steps=4", "checkpoint_every_steps=2"]))
  reports = _reports(workdir, "final")
  assert [r["processes"] for r in reports] == [2, 2]
  assert [r["devices"] for r in reports] == [2, 2]
  assert reports[0]["loss"] == reports[1]["loss"]
  assert len(read_metrics(workdir)) == 4  # process 0 logs every step
  params = [np.load(os.path.join(workdir, f"params_process{i}.npz")) for i in range(2)]
  assert sorted(params[0].files) == sorted(params[1].files)
  for key in params[0].files:
    np.testing.assert_array_equal(params[0][key], params[1][key], err_msg=key)
  # Both processes wrote their own data-iterator state into the shared checkpoint.
  data_dir = os.path.join(workdir, "checkpoints", "4", "data")
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(data_dir))


@pytest.mark.slow  # two processes, training and evaluation: ~25 s warm
def test_two_processes_with_parameters_sharded_across_them_train_and_evaluate(tmp_path):
  """fsdp over both processes: training agrees, and the end-of-run report (pretext IoU, kNN),
  which needs whole parameters, gathers them on every process and agrees too."""
  workdir = str(tmp_path / "run")
  _finish(_start_two(workdir, ["num_train_steps=2", "checkpoint_every_steps=2", "mesh.fsdp=2",
                               "eval.pretext_iou=True", "eval.knn=True",
                               "eval.num_heldout_pairs=4", "--evaluate"]))
  reports, evaluations = _reports(workdir, "final"), _reports(workdir, "evaluation")
  assert all(r["sharded_leaves"] > 0 for r in reports)  # parameters really span both processes
  assert reports[0]["loss"] == reports[1]["loss"]
  assert evaluations[0] == evaluations[1]
  assert {"pretext_iou/before", "pretext_iou/after", "knn/pretrained/k20/top1"} <= set(
      evaluations[0])
  with open(os.path.join(workdir, "report.json")) as f:  # written once, by process 0
    assert json.load(f) == evaluations[0]


@pytest.mark.slow
def test_two_processes_killed_then_restarted_continue_bit_exactly(tmp_path):
  """SIGKILL of both processes of an fsdp-across-hosts run, restart: the state restored into
  shardings that span both processes continues exactly as an unbroken run."""
  run = ["num_train_steps=40", "checkpoint_every_steps=10", "log_every_steps=1", "mesh.fsdp=2"]
  reference, interrupted = str(tmp_path / "reference"), str(tmp_path / "interrupted")
  _finish(_start_two(reference, run))
  procs = _start_two(interrupted, run)
  deadline = time.time() + 300
  while not committed(interrupted, 10):
    assert all(p.poll() is None for p in procs), "a process ended before checkpoint 10"
    assert time.time() < deadline, "timed out waiting for checkpoint 10"
    time.sleep(0.05)
  for p in procs:
    p.send_signal(signal.SIGKILL)
  for p in procs:
    p.wait()
  assert max(read_metrics(interrupted)) < 40, "the run finished before it was killed"
  resumed_from = max(s for s in (10, 20, 30) if committed(interrupted, s))
  _finish(_start_two(interrupted, run))
  ref, got = read_metrics(reference), read_metrics(interrupted)
  for step in range(resumed_from + 1, 41):
    for key in ("loss", "grad_norm", "param_norm"):
      assert got[step][key] == ref[step][key], (step, key, got[step][key], ref[step][key])


@pytest.mark.slow  # two processes, two runs each: ~28 s
def test_a_checkpoint_one_process_cannot_read_is_skipped_by_both(tmp_path):
  """Process 1's data-iterator state in the latest checkpoint is garbled: both processes agree
  to fall back to the step before (one falling back alone would leave them out of step)."""
  workdir = str(tmp_path / "run")
  run = ["num_train_steps=6", "checkpoint_every_steps=2", "mesh.fsdp=2"]
  _finish(_start_two(workdir, run))
  original = read_metrics(workdir)
  final = [dict(np.load(os.path.join(workdir, f"params_process{i}.npz"))) for i in range(2)]
  with open(os.path.join(workdir, "checkpoints", "6", "data", "process_1-of-2.json"), "w") as f:
    f.write('{"next_index": ')  # cut off mid-write
  outs = _finish(_start_two(workdir, run))
  for out in outs:
    assert "checkpoint step 6" in out and "falling back to step 4" in out, out[-3000:]
  assert "unreadable on process(es) [1]" in outs[0]
  redone = read_metrics(workdir)
  # The state restored into shardings that span both processes continues exactly (the fast
  # form of the slow kill-and-restart test): metrics of steps 5-6 and both processes' params.
  for step in (5, 6):
    for key in ("loss", "grad_norm", "param_norm"):
      assert redone[step][key] == original[step][key], (step, key)
  for i in range(2):
    again = np.load(os.path.join(workdir, f"params_process{i}.npz"))
    assert sorted(again.files) == sorted(final[i])
    for name in again.files:
      np.testing.assert_array_equal(again[name], final[i][name], err_msg=name)
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "corrupt_6"))


@pytest.mark.slow  # two processes started and stopped: ~22 s
def test_an_incompatible_config_stops_both_processes_in_one_line(tmp_path):
  """A changed accumulation (another optimizer state) or process count: every process stops
  with the same one-line error (exit 2) before reading an array; the checkpoint is untouched."""
  from test_resume import snapshot  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  _finish(_start_two(workdir, ["num_train_steps=2", "checkpoint_every_steps=2"]))
  before = snapshot(workdir)
  procs = _start_two(workdir, ["num_train_steps=4", "optim.accum_steps=2"])
  outs = [p.communicate(timeout=400)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 2, out[-3000:]
    assert "optim.accum_steps: 1 -> 2" in out and "Traceback" not in out, out[-3000:]
  alone = start_run(workdir, ["num_train_steps=4"])  # one process where two wrote it
  out = alone.communicate(timeout=400)[0]
  assert alone.returncode == 2, out[-3000:]
  assert "written by 2 process(es), this run has 1" in out, out[-3000:]
  assert snapshot(workdir) == before
