"""The training loop under faults: SIGKILL + resume (bit-exact), SIGTERM, logging."""

import os
import signal
import time

import jax
import numpy as np

from train_fixtures import committed, read_checkpoint, read_metrics, start_run


def _wait_for(predicate, proc, timeout=240, what="condition"):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return
    if proc.poll() is not None:
      raise AssertionError(f"run ended (rc={proc.returncode}) before {what}:\n"
                           f"{proc.stdout.read()[-3000:]}")
    time.sleep(0.05)
  proc.kill()
  raise AssertionError(f"timed out waiting for {what}")


def _finish(proc, timeout=240):
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, out[-3000:]
  return out


RUN = ["num_train_steps=40", "checkpoint_every_steps=10", "log_every_steps=1"]


def test_sigkill_then_restart_continues_bit_exactly(tmp_path):
  reference, interrupted = str(tmp_path / "reference"), str(tmp_path / "interrupted")
  _finish(start_run(reference, RUN))
  proc = start_run(interrupted, RUN)
  _wait_for(lambda: committed(interrupted, 10), proc, what="checkpoint 10")
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  killed_at = max(read_metrics(interrupted))
  assert killed_at < 40, "the run finished before it was killed; the test proves nothing"
  resumed_from = max(s for s in (10, 20, 30) if committed(interrupted, s))
  out = _finish(start_run(interrupted, RUN))
  assert "TRAINING DONE" in out
  ref, got = read_metrics(reference), read_metrics(interrupted)
  for step in range(resumed_from + 1, 41):
    for key in ("loss", "grad_norm", "lr", "momentum", "param_norm"):
      assert got[step][key] == ref[step][key], (step, key, got[step][key], ref[step][key])
  assert any(f.startswith("events.out.tfevents") for f in
             os.listdir(os.path.join(reference, "tensorboard")))
  final_ref, final_got = read_checkpoint(reference, 40), read_checkpoint(interrupted, 40)
  for a, b in zip(jax.tree.leaves(final_ref), jax.tree.leaves(final_got)):
    np.testing.assert_array_equal(a, b)


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(tmp_path):
  workdir = str(tmp_path / "run")
  proc = start_run(workdir, ["num_train_steps=100000", "checkpoint_every_steps=100000"])
  metrics = os.path.join(workdir, "metrics.jsonl")
  _wait_for(lambda: os.path.exists(metrics) and len(open(metrics).readlines()) >= 3, proc,
            what="three logged steps")
  proc.send_signal(signal.SIGTERM)
  out = _finish(proc, timeout=120)
  assert '"preempted": true' in out
  last = max(read_metrics(workdir))
  assert committed(workdir, last), f"no checkpoint at the preemption step {last}"
  assert int(read_checkpoint(workdir, last)["step"]) == last
