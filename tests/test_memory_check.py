"""Memory before work: a step that cannot fit the device stops with one line (exit 2) before
any step runs, from the compilation the trainers need anyway; a fitting one runs.

A fake, small device memory is injected (memory.device_memory), so nothing large is allocated.
"""

import os

import jax
import pytest

from test_finetune import tiny_config, tiny_labelled_subset
from train_fixtures import committed
from train_fixtures import tiny_config as tiny_pretrain_config

from cim_jax import cli
from cim_jax.errors import ConfigError
from cim_jax.evaluate import finetune
from cim_jax.train import memory
from cim_jax.train import loop
from cim_jax.train import step as step_lib

TINY = (1 << 20, "1.0 GiB (fake)")  # 1 MiB, whatever the description says


def fake_memory(monkeypatch, available):
  monkeypatch.setattr(memory, "device_memory", lambda: available)


def counted_compiles(monkeypatch):
  """Counts lowered -> compiled compilations (the trainers' explicit ones)."""
  calls = []
  compile_ = jax.stages.Lowered.compile

  def counting(self, *args, **kwargs):
    calls.append(1)
    return compile_(self, *args, **kwargs)

  monkeypatch.setattr(jax.stages.Lowered, "compile", counting)
  return calls


def test_pretraining_that_cannot_fit_stops_with_one_line_and_exit_2(tmp_path, monkeypatch,
                                                                     capsys):
  fake_memory(monkeypatch, TINY)
  workdir = str(tmp_path / "run")
  with pytest.raises(SystemExit) as exit_:
    cli.run_or_exit(loop.train, tiny_pretrain_config(), workdir)
  assert exit_.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  assert err[0].startswith("error: batch_size=8 does not fit: the pre-training step needs ")
  assert "per device (XLA" in err[0] and "has 1.0 GiB (fake)" in err[0]
  assert "no batch fits" in err[0] or "largest batch that fits is about" in err[0]
  # Before any step: nothing logged, no checkpoint.
  assert not os.path.exists(os.path.join(workdir, "metrics.jsonl"))
  assert not committed(workdir, 2)


def test_pretraining_that_fits_compiles_its_step_once(tmp_path, monkeypatch):
  fake_memory(monkeypatch, (64 << 30, "64 GiB (fake)"))
  compiles = counted_compiles(monkeypatch)
  trainers = []
  build = step_lib.build_trainer
  monkeypatch.setattr(step_lib, "build_trainer",
                      lambda *a, **k: trainers.append(build(*a, **k)) or trainers[-1])
  result = loop.train(tiny_pretrain_config(num_train_steps=2), str(tmp_path))
  assert result.metrics["step"] == 2
  assert len(compiles) == 1  # the checked compilation is the one that runs ...
  assert trainers[0].train_step._cache_size() == 0  # ... the jitted function never compiled


def test_finetuning_that_cannot_fit_stops_before_a_step(tmp_path, monkeypatch, tiny_classifier):
  tiny_labelled_subset(monkeypatch)
  fake_memory(monkeypatch, TINY)
  with pytest.raises(ConfigError, match=r"^batch_size=16 does not fit: the fine-tuning step "
                                        r"needs .* per device .* but the cpu device has "
                                        r"1.0 GiB \(fake\); "):
    finetune.finetune(tiny_config(steps=2), str(tmp_path))
  log = tmp_path / "metrics.jsonl"
  assert not log.exists() or not log.read_text()  # no step logged
  assert not (tmp_path / "checkpoints" / "1").exists()


def test_finetuning_largest_batch_estimate_fits(tmp_path, monkeypatch, tiny_classifier):
  """The suggested batch, compiled, fits the memory the message was computed for."""
  tiny_labelled_subset(monkeypatch)
  needed = {}
  compile_step = memory.compile_step_that_fits

  def measuring(step, args, **kwargs):
    compiled = compile_step(step, args, **kwargs)
    needed[kwargs["batch_size"]] = memory.compiled_bytes(compiled)
    return compiled

  monkeypatch.setattr(memory, "compile_step_that_fits", measuring)
  compiles = counted_compiles(monkeypatch)
  finetune.finetune(tiny_config(steps=1), str(tmp_path / "fits"))
  assert len(compiles) == 1 and set(needed) == {16}
  budget = needed[16] - 1  # just too small: the estimate must step down and still fit
  fake_memory(monkeypatch, (budget, "fake"))
  with pytest.raises(ConfigError, match="largest batch that fits is about") as error:
    finetune.finetune(tiny_config(steps=1), str(tmp_path / "too_big"))
  suggested = int(str(error.value).rsplit("--config.batch_size=", 1)[1].rstrip(")"))
  assert 0 < suggested < 16
  config = tiny_config(steps=1)
  config.batch_size = suggested
  config.data.eval_batch_size = suggested
  finetune.finetune(config, str(tmp_path / "suggested"))  # runs: no error
  assert needed[suggested] <= budget
