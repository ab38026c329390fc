"""Config loading, `--config.key=value` overrides and value checks, all before any compilation.

Every problem becomes a `ConfigError` with a one-line message naming the key; entry points
print it and exit with status 2 (see `cim_jax.cli`).
"""

import ast
import difflib
import importlib.util
import math
import os

import jax
import ml_collections

from cim_jax.data import labelled
from cim_jax.data import pairs
from cim_jax.errors import ConfigError
from cim_jax.models import vit


# Config files that were replaced: their name -> the file and argument that replace them.
REPLACED_FILES = {
    f"{old}_vit_{size}.py": f"{new}.py:{variant}"
    for size, variant in (("tiny", "Ti/16"), ("small", "S/16"), ("base", "B/16"),
                          ("large", "L/16"), ("huge", "H/14"))
    for old, new in (("cim", "cim_pretrain"), ("finetune", "cim_finetune"))}

# Renamed keys -> their new names; the first one the config at hand has is named. Settings of
# the evaluation tools moved from the pre-training config to the evaluation config.
_EVAL_DATA = ("tfds_name", "tfds_eval_split", "tfds_data_dir", "tfds_image_key",
              "tfds_label_key", "image_size", "batch_size", "crop_pct", "read_threads")
_EVAL_ONLY = ("feature_pool", "probe_optimizer", "probe_base_lr", "probe_epochs",
              "probe_warmup_epochs", "probe_batch_size", "probe_weight_decay")
RENAMED = {
    "data.heldout_root": ("data.eval_root",),
    "data.tfds_heldout_split": ("data.tfds_eval_split",),
    "data.labelled_source": ("data.source",),
    "model.gelu_approximate": ("model.approximate_gelu",),
    "checkpoint": ("init_from",),
    "eval.labelled_source": ("eval.data.source", "data.source"),
    "eval.train_root": ("eval.data.root", "data.root"),
    "eval.eval_root": ("eval.data.eval_root", "data.eval_root"),
    "eval.tfds_train_split": ("eval.data.tfds_split", "data.tfds_split"),
    **{f"eval.{key}": (f"eval.data.{key}", f"data.{key}") for key in _EVAL_DATA},
    **{f"eval.{key}": (f"eval.{key}",) for key in _EVAL_ONLY},  # moved, same name
    "eval.output_dir": "the --output_dir flag of cim_jax.evaluate.visualize",
}

# The recipe file that makes each kind of config (see `kind_of`).
RECIPES = {"pretraining": "configs/cim_pretrain.py", "finetuning": "configs/cim_finetune.py",
           "evaluation": "configs/cim_eval.py", "segmentation": "configs/cim_segment.py"}
SEGMENTATION_SOURCES = ("ade20k", "tfds", "synthetic")


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """Runs `get_config()` of a python config file (big_vision style); `FILE.py:ARG` passes ARG."""
  path, sep, arg = path.partition(".py:")
  path += ".py" if sep else ""
  name = os.path.basename(path)
  if name in REPLACED_FILES and not os.path.isfile(path):
    raise ConfigError(f"{path} was replaced by "
                      f"{os.path.join(os.path.dirname(path), REPLACED_FILES[name])}")
  if not os.path.isfile(path):
    raise ConfigError(f"config file not found: {path}")
  spec = importlib.util.spec_from_file_location(
      "cim_config_" + os.path.splitext(name)[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path} defines no get_config()")
  if not arg:
    return module.get_config()
  try:
    return module.get_config(arg)
  except (KeyError, TypeError):
    raise ConfigError(f"config file {path} has no argument {arg!r}") from None


def _renamed(key: str, valid: list[str]) -> str:
  """The message for a renamed key: its new name in this config or in the evaluation config."""
  if isinstance(RENAMED[key], str):
    return f"config.{key} was replaced by {RENAMED[key]}"
  new = next((k for k in RENAMED[key] if k in valid), None)
  if new:
    return f"config.{key} was renamed to config.{new}"
  new = RENAMED[key][-1]
  return (f"config.{key} moved to {'' if new == key else f'config.{new} of '}the evaluation "
          f"config ({RECIPES['evaluation']})")


def _all_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  keys = []
  for key, value in config.items():
    keys.append(prefix + key)
    if isinstance(value, ml_collections.ConfigDict):
      keys.extend(_all_keys(value, prefix + key + "."))
  return keys


def _parse_value(key: str, text: str, default):
  """Parses an override string into the type of the value it replaces."""
  def bad(expected):
    return ConfigError(f"config.{key}: expected {expected}, got {text!r}")

  if isinstance(default, bool):
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes"):
      return True
    if lowered in ("false", "0", "no"):
      return False
    raise bad("a bool (true/false)")
  if isinstance(default, int):
    try:
      return int(text)
    except ValueError:
      raise bad("an int") from None
  if isinstance(default, float):
    try:
      return float(text)
    except ValueError:
      raise bad("a float") from None
  if isinstance(default, str):
    return text
  if isinstance(default, (tuple, list)):
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      raise bad(f"a tuple of {len(default)} numbers like (0.5, 1.0)") from None
    if (not isinstance(value, (tuple, list)) or len(value) != len(default)
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
      raise bad(f"a tuple of {len(default)} numbers like (0.5, 1.0)")
    return type(default)(float(v) if isinstance(d, float) else v for v, d in zip(value, default))
  raise bad(type(default).__name__)


def apply_override(config: ml_collections.ConfigDict, key: str, text: str) -> None:
  """Sets `config.<key>` from its command-line text, naming the nearest keys on a misspelling."""
  node = config
  parts = key.split(".")
  for i, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      valid = _all_keys(config)
      if key in RENAMED:
        raise ConfigError(_renamed(key, valid))
      close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
      hint = f"; did you mean {', '.join('config.' + c for c in close)}?" if close else ""
      raise ConfigError(f"unknown config key config.{key}{hint}")
    if i < len(parts) - 1:
      node = node[part]
  default = node[parts[-1]]
  if isinstance(default, ml_collections.ConfigDict):
    raise ConfigError(f"config.{key} is a group; set one of its keys instead")
  node[parts[-1]] = _parse_value(key, text, default)


def _check(condition: bool, message: str) -> None:
  if not condition:
    raise ConfigError(message)


def kind_of(config: ml_collections.ConfigDict) -> str:
  """'pretraining', 'finetuning', 'segmentation' or 'evaluation' (no optimizer): what a config
  was made for."""
  if "segmentation" in config:
    return "segmentation"
  if "mixup" in config:
    return "finetuning"
  return "pretraining" if "optim" in config else "evaluation"


def validate(config: ml_collections.ConfigDict, *, kind: str | None = None,
             device_count: int | None = None) -> None:
  """Checks values that no compilation could survive; `device_count` defaults to jax's.

  `kind`: the kind of config the caller reads (see `kind_of`); another kind is an error.
  """
  valid = _all_keys(config)
  for key, new in RENAMED.items():  # a config file may set an old key without an override
    if key in valid and key not in new:
      raise ConfigError(_renamed(key, valid))
  found = kind_of(config)
  if kind and found != kind:
    raise ConfigError(f"expected a config for {kind} ({RECIPES[kind]}:VARIANT), got one for "
                      f"{found}")
  patch = _check_model(config.model)
  if found == "evaluation":
    _check_labelled(config.data, "config.data", patch)
    pool = config.eval.feature_pool
    _check(pool not in ("cls", "mean"), f"config.eval.feature_pool={pool!r} was renamed to "
           f"{dict(cls='tok', mean='gap').get(pool)!r}")
    _check(pool in ("tok", "gap"), f"config.eval.feature_pool={pool!r} must be 'tok' or 'gap'")
    _check(config.eval.probe_optimizer in ("sgd", "lars", "adamw"),
           f"config.eval.probe_optimizer={config.eval.probe_optimizer!r} must be 'sgd', 'lars' "
           "or 'adamw'")
    return
  _check_training(config, jax.device_count() if device_count is None else device_count)
  if found in ("finetuning", "segmentation"):
    _check(0.0 < config.optim.layer_decay <= 1.0,
           f"config.optim.layer_decay={config.optim.layer_decay} must lie in (0, 1]")
  if found == "finetuning":
    _check_labelled(config.data, "config.data", patch)
    return
  if found == "segmentation":
    _check_segmentation(config, patch)
    return
  _check_pairs(config.data, config.model, patch)
  if config.eval.knn:
    _check_labelled(config.eval.data, "config.eval.data", patch)


def _check_model(m) -> int:
  """Checks config.model; returns the patch size."""
  try:
    sizes = vit.decode_variant(m.variant)
  except (KeyError, ValueError) as e:
    raise ConfigError(f"config.model.variant={m.variant!r}: {e}") from None
  _check(m.dtype in ("float32", "bfloat16"),
         f"config.model.dtype={m.dtype!r} must be 'float32' or 'bfloat16'")
  return sizes["patch_size"]


def _check_training(config, device_count: int) -> None:
  """Batch, mesh, optimizer and run length of a pre-training or fine-tuning config."""
  o = config.optim
  _check(config.batch_size > 0, f"config.batch_size={config.batch_size} must be positive")
  _check(config.batch_size % device_count == 0,
         f"config.batch_size={config.batch_size} is not divisible by the {device_count} devices")
  _check(config.mesh.fsdp >= 1 and device_count % config.mesh.fsdp == 0,
         f"config.mesh.fsdp={config.mesh.fsdp} does not divide the {device_count} devices")
  accum = o.get("accum_steps", 1)
  _check(accum >= 1 and (config.batch_size // device_count) % accum == 0,
         f"config.optim.accum_steps={accum} must divide the per-device batch "
         f"{config.batch_size // device_count}")
  lr_key = "lr" if "lr" in o else "base_lr"
  _check(o[lr_key] >= 0 and math.isfinite(o[lr_key]),
         f"config.optim.{lr_key}={o[lr_key]} must be a finite number >= 0")
  _check(o.get("schedule", "cosine") in ("cosine", "poly"),
         f"config.optim.schedule={o.get('schedule')!r} must be 'cosine' or 'poly'")
  _check(o.min_lr >= 0, f"config.optim.min_lr={o.min_lr} must be >= 0")
  _check(o.weight_decay >= 0, f"config.optim.weight_decay={o.weight_decay} must be >= 0")
  _check(o.grad_clip_norm >= 0, f"config.optim.grad_clip_norm={o.grad_clip_norm} must be >= 0")
  _check(o.wd_exempt in ("1d", "1d+tokens"),
         f"config.optim.wd_exempt={o.wd_exempt!r} must be '1d' or '1d+tokens'")
  _check(config.num_train_steps > 0 or config.num_epochs > 0,
         "config.num_epochs or config.num_train_steps must be positive")


def _check_labelled(d, prefix: str, patch: int) -> None:
  """A labelled data group (`config_defaults.labelled_source` and what reads it)."""
  _check(d.source != "embedded", f"{prefix}.source='embedded' was renamed to the embedded set's "
         "name: 'digits' or 'lfw'")
  _check(d.source in labelled.LABELLED_SOURCES, f"{prefix}.source={d.source!r} must be one of "
         f"{', '.join(labelled.LABELLED_SOURCES)}")
  _check(d.image_size > 0 and d.image_size % patch == 0,
         f"{prefix}.image_size={d.image_size} must be a positive multiple of the patch size "
         f"{patch}")


def _check_pairs(d, m, patch: int) -> None:
  """Pair generation (docs/METHOD.md section 1) and the decoder of a pre-training config."""
  try:
    pairs.PairSpec.from_config(d)
  except ValueError as e:
    raise ConfigError(f"config.{e}") from None
  _check(d.source in ("embedded", "imagefolder", "tfds"),
         f"config.data.source={d.source!r} must be 'embedded', 'imagefolder' or 'tfds'")
  _check(d.source != "imagefolder" or bool(d.root), "config.data.root must name the ImageFolder "
         "directory when config.data.source='imagefolder'")
  _check(d.context_size <= d.search_size, f"config.data.context_size={d.context_size} is larger "
         f"than config.data.search_size={d.search_size}")
  _check(d.exemplar_size <= d.context_size,
         f"config.data.exemplar_size={d.exemplar_size} is larger than the context "
         f"(config.data.context_size={d.context_size})")
  for key in ("context_size", "exemplar_size"):
    _check(d[key] % patch == 0,
           f"config.data.{key}={d[key]} must be a positive multiple of the patch size {patch}")
  _check(d.min_image_size >= 1, f"config.data.min_image_size={d.min_image_size} must be >= 1")
  _check(d.num_workers >= 0, f"config.data.num_workers={d.num_workers} must be >= 0")
  _check(m.decoder_dim % m.decoder_heads == 0,
         f"config.model.decoder_dim={m.decoder_dim} is not divisible by config.model.decoder_heads="
         f"{m.decoder_heads}")


def _check_segmentation(config, patch: int) -> None:
  """Data, evaluation windows and heads of a segmentation config (configs/cim_segment.py)."""
  d, s = config.data, config.segmentation
  _check(d.source in SEGMENTATION_SOURCES, f"config.data.source={d.source!r} must be one of "
         f"{', '.join(SEGMENTATION_SOURCES)}")
  _check(d.crop_size > 0 and d.crop_size % patch == 0,
         f"config.data.crop_size={d.crop_size} must be a positive multiple of the patch size "
         f"{patch}")
  _check(0 < d.eval_stride <= d.crop_size,
         f"config.data.eval_stride={d.eval_stride} must lie in [1, crop_size={d.crop_size}]")
  _check(0 < min(d.ratio_range) and d.ratio_range[0] <= d.ratio_range[1],
         f"config.data.ratio_range={tuple(d.ratio_range)} must be (low, high) with 0 < low <= high")
  _check(min(d.scale) > 0, f"config.data.scale={tuple(d.scale)} must be positive")
  _check(0.0 < d.cat_max_ratio <= 1.0,
         f"config.data.cat_max_ratio={d.cat_max_ratio} must lie in (0, 1]")
  _check(d.eval_batch_size > 0, f"config.data.eval_batch_size={d.eval_batch_size} must be > 0")
  _check(d.num_classes > 0, f"config.data.num_classes={d.num_classes} must be > 0")
  _check(d.num_workers >= 0, f"config.data.num_workers={d.num_workers} must be >= 0")
  _check(0.0 <= s.dropout < 1.0, f"config.segmentation.dropout={s.dropout} must lie in [0, 1)")
  _check(s.channels > 0 and s.aux_channels > 0,
         "config.segmentation.channels and aux_channels must be positive")
  depth = vit.decode_variant(config.model.variant)["depth"]
  _check(all(1 <= b <= depth for b in s.feature_blocks) and len(s.feature_blocks) == 4,
         f"config.segmentation.feature_blocks={tuple(s.feature_blocks)} must be four 1-based "
         f"block numbers of the {depth}-block encoder")
