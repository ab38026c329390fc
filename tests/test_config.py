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
VARIANTS = ("Ti/16", "S/16", "B/16", "L/16", "H/14")


def _shipped_configs():
  """Every configs/*.py, once per argument (the ViT variants) when its get_config takes one."""
  specs = []
  for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))):
    name = os.path.relpath(path, ROOT)
    with open(path, encoding="utf-8") as f:
      takes_arg = "def get_config(arg" in f.read()
    specs += [name] + ([f"{name}:{v}" for v in VARIANTS] if takes_arg else [])
  return specs


def _parse(*args, config="configs/demo.py", device_count=1):
  config, _ = parse([f"--config={os.path.join(ROOT, config)}", *args],
                    default_config="", flags={"workdir": ""}, validate=False)
  config_validation.validate(config, device_count=device_count)
  return config


@pytest.mark.parametrize("spec", _shipped_configs())
def test_shipped_configs_load_and_validate(spec):
  config = _parse(config=spec, device_count=8)
  variant = spec.partition(".py:")[2]
  if variant:
    assert config.model.variant == variant


def test_config_argument_picks_the_variant():
  assert _parse(config="configs/cim_pretrain.py").model.variant == "B/16"  # get_config's default
  large = _parse(config="configs/cim_pretrain.py:L/16", device_count=8)
  assert (large.model.variant, large.mesh.fsdp, large.model.remat) == ("L/16", 8, True)
  huge = _parse(config="configs/cim_pretrain.py:H/14", device_count=8)
  assert (huge.data.search_size, huge.data.context_size, huge.data.exemplar_size) == (196, 140, 56)
  tiny_eval = _parse(config="configs/cim_eval.py:Ti/16")
  assert tiny_eval.model == _parse(config="configs/cim_pretrain.py:Ti/16").model
  for spec, message in (("configs/cim_pretrain.py:X/16", "has no argument 'X/16'"),
                        ("configs/demo.py:Ti/16", "configs/demo.py has no argument 'Ti/16'")):
    with pytest.raises(errors.ConfigError, match=message):
      _parse(config=spec)


@pytest.mark.parametrize("old, new", [
    ("cim_vit_tiny.py", "cim_pretrain.py:Ti/16"), ("cim_vit_base.py", "cim_pretrain.py:B/16"),
    ("cim_vit_huge.py", "cim_pretrain.py:H/14"), ("finetune_vit_small.py", "cim_finetune.py:S/16"),
    ("finetune_vit_large.py", "cim_finetune.py:L/16"),
])
def test_a_replaced_config_file_names_its_replacement(old, new):
  with pytest.raises(errors.ConfigError) as e:
    parse([f"--config=configs/{old}"], default_config="", validate=False)
  assert str(e.value) == f"configs/{old} was replaced by configs/{new}"


def test_recipe_values_follow_design():
  config = _parse(config="configs/cim_pretrain.py:B/16")
  assert config.model.variant == "B/16"
  assert (config.optim.b1, config.optim.b2, config.optim.weight_decay) == (0.9, 0.95, 0.05)
  assert config.optim.base_lr == 1.5e-4 and config.batch_size == 4096
  assert (config.num_epochs, config.optim.warmup_epochs) == (300, 40)
  assert (config.ema.momentum_start, config.ema.momentum_end) == (0.99, 1.0)
  assert (config.data.context_size, config.data.exemplar_size, config.data.num_exemplars) == (160, 64, 6)
  # The released run: fp32 and no clipping (--clip_grad only acts in the AMP branch); timm's
  # add_weight_decay set (biases and norms exempt, the cls token decayed).
  assert config.optim.grad_clip_norm == 0.0 and config.optim.wd_exempt == "1d"
  assert config.model.dtype == "float32" and not config.model.approximate_gelu


@pytest.mark.parametrize("variant, epochs, fsdp", [
    ("Ti/16", 200, 1), ("S/16", 200, 1), ("B/16", 100, 1), ("L/16", 50, 8), ("H/14", 50, 8)])
def test_finetune_recipe_follows_the_release(variant, epochs, fsdp):
  config = _parse(config=f"configs/cim_finetune.py:{variant}", device_count=8)
  # The release's fine-tuning script: --layer_decay 0.8 for every size, AdamW (0.9, 0.999),
  # wd 0.05 with the cls token exempt (timm no_weight_decay), blr 1.2e-3, min_lr 1e-6, no
  # clipping, drop path 0.1, label smoothing 0.1.
  assert (config.num_epochs, config.mesh.fsdp) == (epochs, fsdp)
  assert config.optim.layer_decay == 0.8
  assert (config.optim.b1, config.optim.b2, config.optim.weight_decay) == (0.9, 0.999, 0.05)
  assert config.optim.wd_exempt == "1d+tokens" and config.optim.grad_clip_norm == 0.0
  assert (config.optim.base_lr, config.optim.min_lr) == (1.2e-3, 1e-6)
  assert config.model.drop_path_rate == 0.1 and config.mixup.label_smoothing == 0.1
  assert config.data.source == "digits" and "labelled_source" not in config.data
  assert config.model.freeze_patch_embed is False and config.optim.accum_steps == 1


PRETRAIN, FINETUNE, EVALUATE = ("configs/demo.py", "configs/cim_finetune.py:Ti/16",
                                "configs/cim_eval.py:Ti/16")


@pytest.mark.parametrize("config, key, message", [
    (PRETRAIN, "data.heldout_root", "config.data.heldout_root was renamed to config.data.eval_root"),
    (PRETRAIN, "data.tfds_heldout_split",
     "config.data.tfds_heldout_split was renamed to config.data.tfds_eval_split"),
    (PRETRAIN, "model.gelu_approximate",
     "config.model.gelu_approximate was renamed to config.model.approximate_gelu"),
    (FINETUNE, "data.labelled_source", "config.data.labelled_source was renamed to config.data.source"),
    (EVALUATE, "checkpoint", "config.checkpoint was renamed to config.init_from"),
    (PRETRAIN, "checkpoint", "config.checkpoint was renamed to config.init_from"),
    (EVALUATE, "eval.labelled_source", "config.eval.labelled_source was renamed to config.data.source"),
    (PRETRAIN, "eval.labelled_source",
     "config.eval.labelled_source was renamed to config.eval.data.source"),
    (EVALUATE, "eval.train_root", "config.eval.train_root was renamed to config.data.root"),
    (EVALUATE, "eval.eval_root", "config.eval.eval_root was renamed to config.data.eval_root"),
    (EVALUATE, "eval.tfds_train_split",
     "config.eval.tfds_train_split was renamed to config.data.tfds_split"),
    (PRETRAIN, "eval.image_size", "config.eval.image_size was renamed to config.eval.data.image_size"),
    (PRETRAIN, "eval.feature_pool",
     "config.eval.feature_pool moved to the evaluation config (configs/cim_eval.py)"),
    (PRETRAIN, "eval.probe_base_lr",
     "config.eval.probe_base_lr moved to the evaluation config (configs/cim_eval.py)"),
    (PRETRAIN, "eval.output_dir",
     "config.eval.output_dir was replaced by the --output_dir flag of cim_jax.evaluate.visualize"),
])
def test_a_renamed_key_names_its_replacement(config, key, message):
  with pytest.raises(errors.ConfigError) as e:
    _parse(f"--config.{key}=1", config=config)
  assert str(e.value) == message


@pytest.mark.parametrize("config", [PRETRAIN, FINETUNE, EVALUATE])
def test_every_renamed_key_gives_one_line_naming_it(config):
  keys = set()
  def walk(node, prefix=""):
    for name, value in node.items():
      keys.add(prefix + name)
      if hasattr(value, "items"):
        walk(value, prefix + name + ".")
  walk(_parse(config=config))
  for key in set(config_validation.RENAMED) - keys:  # moved keys live on in their new config
    with pytest.raises(errors.ConfigError) as e:
      _parse(f"--config.{key}=1", config=config)
    assert str(e.value).startswith(f"config.{key} ") and "\n" not in str(e.value)
    assert "unknown" not in str(e.value)


@pytest.mark.parametrize("config, key, value, message", [
    (EVALUATE, "eval.feature_pool", "cls", "config.eval.feature_pool='cls' was renamed to 'tok'"),
    (EVALUATE, "eval.feature_pool", "mean", "config.eval.feature_pool='mean' was renamed to 'gap'"),
    (EVALUATE, "data.source", "embedded", "config.data.source='embedded' was renamed to the "
     "embedded set's name: 'digits' or 'lfw'"),
    (FINETUNE, "data.source", "embedded", "config.data.source='embedded' was renamed to the "
     "embedded set's name: 'digits' or 'lfw'"),
])
def test_a_renamed_value_names_its_replacement(config, key, value, message):
  with pytest.raises(errors.ConfigError) as e:
    _parse(f"--config.{key}={value}", config=config)
  assert str(e.value) == message


def test_an_old_key_set_by_a_config_file_is_named(tmp_path):
  config_file = tmp_path / "mine.py"
  config_file.write_text(
      "from cim_jax import config_validation\n\n\ndef get_config():\n"
      f"  c = config_validation.load_config_file({os.path.join(ROOT, 'configs', 'demo.py')!r})\n"
      "  c.data.heldout_root = '/data/val'\n  return c\n")
  with pytest.raises(errors.ConfigError,
                     match="config.data.heldout_root was renamed to config.data.eval_root"):
    _parse(config=str(config_file))


def test_a_config_of_another_kind_is_named():
  config = _parse(config=FINETUNE)
  with pytest.raises(errors.ConfigError, match=r"expected a config for pretraining \(configs/"
                     r"cim_pretrain.py:VARIANT\), got one for finetuning"):
    config_validation.validate(config, kind="pretraining", device_count=1)


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
    (["--config.data.blur_prob=1.5"], "config.data.blur_prob must be a probability, got 1.5"),
    (["--config.data.exemplar_scale=(0.5, 0.1)"], "config.data.exemplar_scale"),
    (["--config.data.exemplar_geometry=rotated"],
     "config.data.exemplar_geometry must be 'release' or 'drawn_box', got 'rotated'"),
    (["--config.data.exemplar_rotation=30.5"],
     "config.data.exemplar_rotation must be a whole number of degrees in [0, 45]"),
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
    (["--config=configs/cim_vit_base.py"],
     "configs/cim_vit_base.py was replaced by configs/cim_pretrain.py:B/16"),
    (["--config.data.heldout_root=/data/val"],
     "config.data.heldout_root was renamed to config.data.eval_root"),
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
