"""Checkpoints: corrupt-latest fallback, non-finite stop, warm start (in-process)."""

import logging
import os

import jax
import numpy as np
import pytest

from cim_jax.train import loop
from train_fixtures import copy_run, read_checkpoint, read_metrics, tiny_config

pytestmark = pytest.mark.usefixtures("compilation_cache")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished 6-step run with checkpoints at steps 2, 4 and 6."""
  workdir = str(tmp_path_factory.mktemp("trained"))
  loop.train(tiny_config(), workdir)
  return workdir


def _steps(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


# A failed orbax restore leaves an asyncio callback behind (library noise, not our state).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damaged", ["every file", "array data only"])
def test_corrupt_latest_checkpoint_falls_back_to_previous(trained, tmp_path, caplog, damaged):
  workdir = copy_run(trained, tmp_path)
  assert _steps(workdir) == [2, 4, 6]
  truncated = 0
  for root, _, files in os.walk(os.path.join(workdir, "checkpoints", "6", "state")):
    for name in files:  # truncate the latest state's files: a half-written copy
      if damaged == "array data only" and os.path.basename(root) != "d":
        continue  # metadata intact: the damage shows only when the arrays are read
      path = os.path.join(root, name)
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
      truncated += 1
  assert truncated
  with caplog.at_level(logging.WARNING):
    result = loop.train(tiny_config(), workdir)
  warning = " ".join(r.getMessage() for r in caplog.records if "unreadable" in r.getMessage())
  assert "step 6" in warning and "falling back to step 4" in warning, caplog.text
  assert result.metrics["step"] == 6
  # Steps 5-6 were redone from step 4 and match the original run exactly.
  original, redone = read_metrics(trained), read_metrics(workdir)
  for step in (5, 6):
    assert redone[step]["loss"] == original[step]["loss"]
  assert _steps(workdir) == [2, 4, 6]
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "corrupt_6"))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(trained, tmp_path):
  workdir = copy_run(trained, tmp_path)
  config = tiny_config(num_train_steps=12)
  config.optim.base_lr = 1e30  # diverges within a step or two of resuming from step 6
  with pytest.raises(loop.NonFiniteError) as error:
    loop.train(config, workdir)
  message = str(error.value)
  assert "non-finite loss or gradient at step" in message
  bad_step = int(message.split("at step ")[1].split(" ")[0])
  assert 6 < bad_step <= 12
  assert f"Last good checkpoint: step 6 in {workdir}" in message
  assert _steps(workdir) == [2, 4, 6]  # nothing after the last good step became a checkpoint
  restored = read_checkpoint(workdir, 6)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored["params"]))


def test_init_from_another_run_copies_params_and_target(trained, tmp_path):
  config = tiny_config(num_train_steps=2, init_from=trained)
  config.optim.base_lr = 0.0  # nothing moves: the warm-started values reach the checkpoint
  config.ema.momentum_start = 1.0
  loop.train(config, str(tmp_path / "warm"))
  source, warm = read_checkpoint(trained, 6), read_checkpoint(str(tmp_path / "warm"), 2)
  for key in ("params", "target_params"):
    for a, b in zip(jax.tree.leaves(source[key]), jax.tree.leaves(warm[key])):
      np.testing.assert_array_equal(a, b)
  assert int(warm["step"]) == 2  # a warm start is a new run, not a resume


def test_init_from_missing_path_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="no such work dir"):
    loop.train(tiny_config(init_from=str(tmp_path / "nope")), str(tmp_path / "run"))
