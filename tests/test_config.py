"""Config files, overrides and value checks: bad configs fail early with one clear line."""

import glob
import os
import subprocess
import sys

import pytest

from cim_jax import errors
from cim_jax import config_validation
from cim_jax.cli import parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "cim_vit_*.py")))


def _parse(*args, config="configs/demo.py", device_count=1):
  config, _ = parse([f"--config={os.path.join(ROOT, config)}", *args],
                    default_config="", flags={"workdir": ""}, validate=False)
  config_validation.validate(config, device_count=device_count)
  return config


@pytest.mark.parametrize("path", PRETRAIN_CONFIGS + [os.path.join(ROOT, "configs", "demo.py")])
def test_shipped_configs_are_valid(path):
  _parse(config=os.path.relpath(path, ROOT), device_count=8)


def test_recipe_values_follow_design():
  config = _parse(config="configs/cim_vit_base.py")
  assert config.model.variant == "B/16"
  assert (config.optim.b1, config.optim.b2, config.optim.weight_decay) == (0.9, 0.95, 0.05)
  assert config.optim.base_lr == 1.5e-4 and config.batch_size == 4096
  assert (config.num_epochs, config.optim.warmup_epochs) == (300, 40)
  assert (config.ema.momentum_start, config.ema.momentum_end) == (0.99, 1.0)
  assert (config.data.context_size, config.data.exemplar_size, config.data.num_exemplars) == (160, 64, 6)
  # The released run: fp32 and no clipping (--clip_grad only acts in the AMP branch); timm's
  # add_weight_decay set (biases and norms exempt, the cls token decayed).
  assert config.optim.grad_clip_norm == 0.0 and config.optim.wd_exempt == "1d"


@pytest.mark.parametrize("preset", ["tiny", "small", "base", "large", "huge"])
def test_finetune_recipe_follows_the_release(preset):
  from cim_jax import config_defaults
  config = config_defaults.finetune_config(preset)
  # The release's fine-tuning script: --layer_decay 0.8 for every size, AdamW (0.9, 0.999),
  # wd 0.05 with the cls token exempt (timm no_weight_decay), blr 1.2e-3, min_lr 1e-6, no
  # clipping, drop path 0.1, label smoothing 0.1.
  assert config.optim.layer_decay == 0.8
  assert (config.optim.b1, config.optim.b2, config.optim.weight_decay) == (0.9, 0.999, 0.05)
  assert config.optim.wd_exempt == "1d+tokens" and config.optim.grad_clip_norm == 0.0
  assert (config.optim.base_lr, config.optim.min_lr) == (1.2e-3, 1e-6)
  assert config.model.drop_path_rate == 0.1 and config.mixup.label_smoothing == 0.1


def test_overrides_are_typed():
  config = _parse("--config.batch_size=8", "--config.optim.base_lr=1e-3",
                  "--config.data.exemplar_scale=(0.1, 0.3)", "--config.model.remat=true",
                  "--config.model.variant=S/16")
  assert config.batch_size == 8 and isinstance(config.batch_size, int)
  assert config.optim.base_lr == 1e-3
  assert config.data.exemplar_scale == (0.1, 0.3)
  assert config.model.remat is True and config.model.variant == "S/16"


@pytest.mark.parametrize("args, message", [
    (["--config.batchsize=8"], "unknown config key config.batchsize; did you mean config.batch_size"),
    (["--config.optim.base_rl=1"], "did you mean config.optim.base_lr"),
    (["--config.batch_size=abc"], "config.batch_size: expected an int, got 'abc'"),
    (["--config.model.remat=maybe"], "config.model.remat: expected a bool"),
    (["--config.data.exemplar_scale=0.3"], "config.data.exemplar_scale: expected a tuple of 2"),
    (["--config.optim.base_lr=-1"], "config.optim.base_lr=-1.0 must be a finite number >= 0"),
    (["--config.batch_size=12"], "config.batch_size=12 is not divisible by the 8 devices"),
    (["--config.data.exemplar_size=192"], "config.data.exemplar_size=192 is larger than the context"),
    (["--config.data.blur_prob=1.5"], "config.data.blur_prob=1.5 must be a probability"),
    (["--config.data.exemplar_scale=(0.5, 0.1)"], "config.data.exemplar_scale"),
    (["--config.data.exemplar_geometry=rotated"],
     "config.data.exemplar_geometry='rotated' must be 'release' or 'drawn_box'"),
    (["--config.data.exemplar_rotation=30.5"],
     "config.data.exemplar_rotation=30.5 must be a whole number of degrees in [0, 45]"),
    (["--config.model.variant=Q/16"], "config.model.variant='Q/16'"),
    (["--config.data.context_size=150"], "config.data.context_size=150 must be a positive multiple"),
])
def test_bad_values_name_the_key(args, message):
  with pytest.raises(errors.ConfigError, match=None) as e:
    _parse(*args, device_count=8)
  assert message in str(e.value)
  assert "\n" not in str(e.value)


def test_unknown_flag_and_missing_file():
  with pytest.raises(errors.ConfigError, match="unknown flag --wokdir"):
    parse(["--wokdir=x"], default_config=os.path.join(ROOT, "configs/demo.py"),
          flags={"workdir": ""}, validate=False)
  with pytest.raises(errors.ConfigError, match="config file not found"):
    parse(["--config=configs/nope.py"], default_config="", validate=False)


@pytest.mark.parametrize("args, message", [
    (["--config.batchsize=8"], "did you mean config.batch_size"),
    (["--config.optim.base_lr=-0.5"], "config.optim.base_lr=-0.5"),
])
def test_pretrain_cli_exits_2_with_one_line(tmp_path, args, message):
  """The real entry point: exit status 2, one line on stderr, no traceback, before compiling."""
  proc = subprocess.run(
      [sys.executable, "-m", "cim_jax.pretrain", "--config=configs/demo.py",
       f"--workdir={tmp_path}", *args],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
  assert "Traceback" not in proc.stderr
  assert not os.listdir(tmp_path)  # nothing written
