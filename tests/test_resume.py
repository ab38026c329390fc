"""Resuming a work dir under a changed config: an incompatible change stops with one line
(exit 2) and touches nothing; a compatible one resumes with a warning naming the changes."""

import logging
import os
import subprocess
import sys

import pytest

from cim_jax.train import checkpoint as checkpoint_lib
from cim_jax.train import loop
from train_fixtures import REPO, copy_run, read_metrics, subprocess_env, tiny_config
from train_fixtures import tiny_config_file

pytestmark = pytest.mark.usefixtures("compilation_cache")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished 2-step run of the tiny config (checkpoint at step 2)."""
  workdir = str(tmp_path_factory.mktemp("resume") / "run")
  loop.train(tiny_config(num_train_steps=2), workdir)
  return workdir


def snapshot(workdir):
  """Every file and folder under workdir with its size and modification time."""
  entries = {}
  for root, dirs, files in os.walk(workdir):
    for name in dirs + files:
      path = os.path.join(root, name)
      stat = os.stat(path)
      entries[os.path.relpath(path, workdir)] = (stat.st_size if name in files else None,
                                                 stat.st_mtime_ns)
  return entries


def pretrain_command(tmp_path, workdir, *overrides):
  """`python -m cim_jax.pretrain` as a user runs it, on the tiny config of the tests."""
  config_file = tiny_config_file(tmp_path, num_train_steps=2)
  return [sys.executable, "-m", "cim_jax.pretrain", f"--config={config_file}",
          f"--workdir={workdir}", *overrides]


def test_incompatible_change_from_the_command_line_exits_2_in_one_line(trained, tmp_path):
  workdir = copy_run(trained, tmp_path)
  before = snapshot(workdir)
  out = subprocess.run(pretrain_command(tmp_path, workdir, "--config.model.variant=S/16"),
                       cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 2, out.stderr[-3000:]
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert len(lines) == 1, out.stderr[-3000:]
  assert lines[0].startswith("error: ") and 'model.variant: "Mu/16" -> "S/16"' in lines[0]
  assert "new --workdir" in lines[0]
  assert "Traceback" not in out.stderr and "never retrieved" not in out.stderr
  assert snapshot(workdir) == before  # nothing renamed, nothing written


@pytest.mark.parametrize("key,value", [
    ("optim.accum_steps", 2),  # optimizer state gains the accumulated gradients
    ("model.decoder_dim", 64),  # decoder parameters change shape
    ("model.global_loss_weight", 1.0),  # projector / predictor parameters and BN state appear
])
def test_incompatible_change_names_the_key_and_touches_nothing(trained, tmp_path, key, value):
  workdir = copy_run(trained, tmp_path)
  before = snapshot(workdir)
  with pytest.raises(checkpoint_lib.IncompatibleCheckpointError) as error:
    loop.train(tiny_config(num_train_steps=4, **{key: value}), workdir)
  message = str(error.value)
  assert f"{key}: " in message and "\n" not in message, message
  assert "cannot resume" in message and "new --workdir" in message
  # The parameters still fit the accumulation change: a warm start is offered for it alone.
  assert ("--config.init_from=" in message) == (key == "optim.accum_steps"), message
  assert snapshot(workdir) == before


def test_compatible_change_resumes_from_the_saved_step_with_a_warning(trained, tmp_path,
                                                                      caplog):
  workdir = copy_run(trained, tmp_path)
  config = tiny_config(num_train_steps=4, log_every_steps=2)
  config.optim.base_lr = 2e-3
  with caplog.at_level(logging.INFO):
    result = loop.train(config, workdir)
  changed = [r.getMessage() for r in caplog.records if "changed config" in r.getMessage()]
  assert len(changed) == 1, caplog.text
  for text in ("num_train_steps: 2 -> 4", "optim.base_lr: 0.001 -> 0.002",
               "log_every_steps: 1 -> 2"):
    assert text in changed[0], changed[0]
  assert f"resuming from {workdir}/checkpoints step 2" in caplog.text
  assert result.metrics["step"] == 4
  assert sorted(read_metrics(workdir)) == [1, 2, 4]  # steps 1-2 from before, then step 4
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]


def test_finetuning_resume_checks_the_saved_state_too(tmp_path, monkeypatch, caplog):
  """Fine-tuning resumes through the same check: a narrower MLP stops in one line, touching
  nothing; another input size (the sin-cos position table is rebuilt) resumes with a warning."""
  from test_finetune import tiny_config as finetune_config  # pylint: disable=g-import-not-at-top
  from test_finetune import tiny_labelled_subset  # pylint: disable=g-import-not-at-top
  from cim_jax.evaluate import finetune, finetune_lib  # pylint: disable=g-import-not-at-top
  build = finetune_lib.build_classifier
  monkeypatch.setattr(finetune_lib, "build_classifier",
                      lambda config, num_classes: build(config, num_classes).clone(depth=1))
  tiny_labelled_subset(monkeypatch)
  workdir = str(tmp_path / "ft")
  finetune.finetune(finetune_config(steps=1), workdir)
  before = snapshot(workdir)
  other = finetune_config(steps=2)
  other.model.mlp_ratio = 2.0
  with pytest.raises(checkpoint_lib.IncompatibleCheckpointError,
                     match=r"model.mlp_ratio: 4.0 -> 2.0 .*new --workdir") as error:
    finetune.finetune(other, workdir)
  assert "init_from" not in str(error.value)
  assert snapshot(workdir) == before
  resized = finetune_config(steps=2)
  resized.data.image_size = 32
  with caplog.at_level(logging.WARNING):
    assert finetune.finetune(resized, workdir)["step"] == 2
  assert "data.image_size: 16 -> 32" in caplog.text
