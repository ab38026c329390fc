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

from cim_jax.errors import ConfigError
from cim_jax.models import vit


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """Runs `get_config()` of a python config file (big_vision style)."""
  if not os.path.isfile(path):
    raise ConfigError(f"config file not found: {path}")
  spec = importlib.util.spec_from_file_location(
      "cim_config_" + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path} defines no get_config()")
  return module.get_config()


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


def _check_range(config, key: str, lo_min: float, hi_max: float) -> None:
  value = config
  for part in key.split("."):
    value = value[part]
  lo, hi = value
  _check(lo_min <= lo <= hi <= hi_max,
         f"config.{key}={tuple(value)} must satisfy {lo_min} <= low <= high <= {hi_max}")


def validate(config: ml_collections.ConfigDict, *, device_count: int | None = None) -> None:
  """Checks values that no compilation could survive; `device_count` defaults to jax's."""

  m, d, o = config.model, config.data, config.optim
  try:
    sizes = vit.decode_variant(m.variant)
  except (KeyError, ValueError) as e:
    raise ConfigError(f"config.model.variant={m.variant!r}: {e}") from None
  patch = sizes["patch_size"]
  _check(config.batch_size > 0, f"config.batch_size={config.batch_size} must be positive")
  if device_count is None:
    device_count = jax.device_count()
  _check(config.batch_size % device_count == 0,
         f"config.batch_size={config.batch_size} is not divisible by the {device_count} devices")
  _check(config.mesh.fsdp >= 1 and device_count % config.mesh.fsdp == 0,
         f"config.mesh.fsdp={config.mesh.fsdp} does not divide the {device_count} devices")
  _check(o.accum_steps >= 1 and (config.batch_size // device_count) % o.accum_steps == 0,
         f"config.optim.accum_steps={o.accum_steps} must divide the per-device batch "
         f"{config.batch_size // device_count}")
  _check(o.base_lr >= 0 and math.isfinite(o.base_lr),
         f"config.optim.base_lr={o.base_lr} must be a finite number >= 0")
  _check(o.min_lr >= 0, f"config.optim.min_lr={o.min_lr} must be >= 0")
  _check(o.weight_decay >= 0, f"config.optim.weight_decay={o.weight_decay} must be >= 0")
  _check(o.grad_clip_norm >= 0, f"config.optim.grad_clip_norm={o.grad_clip_norm} must be >= 0")
  _check(o.wd_exempt in ("1d", "1d+tokens"),
         f"config.optim.wd_exempt={o.wd_exempt!r} must be '1d' or '1d+tokens'")
  _check(config.num_train_steps > 0 or config.num_epochs > 0,
         "config.num_epochs or config.num_train_steps must be positive")
  _check(0.0 <= config.ema.momentum_start <= config.ema.momentum_end <= 1.0,
         "config.ema.momentum_start <= config.ema.momentum_end must lie in [0, 1]")
  _check(m.dtype in ("float32", "bfloat16"),
         f"config.model.dtype={m.dtype!r} must be 'float32' or 'bfloat16'")
  _check(d.source in ("embedded", "imagefolder", "tfds"),
         f"config.data.source={d.source!r} must be 'embedded', 'imagefolder' or 'tfds'")
  _check(d.source != "imagefolder" or bool(d.root),
         "config.data.root must name the ImageFolder directory when config.data.source='imagefolder'")
  _check(d.num_exemplars >= 1, f"config.data.num_exemplars={d.num_exemplars} must be >= 1")
  _check(d.context_size <= d.search_size,
         f"config.data.context_size={d.context_size} is larger than config.data.search_size={d.search_size}")
  _check(d.exemplar_size <= d.context_size,
         f"config.data.exemplar_size={d.exemplar_size} is larger than the context "
         f"(config.data.context_size={d.context_size})")
  for key in ("context_size", "exemplar_size"):
    _check(d[key] > 0 and d[key] % patch == 0,
           f"config.data.{key}={d[key]} must be a positive multiple of the patch size {patch}")
  _check_range(config, "data.search_scale", 1e-6, 1.0)
  _check_range(config, "data.exemplar_scale", 1e-6, 1.0)
  _check_range(config, "data.search_ratio", 1e-6, math.inf)
  _check_range(config, "data.exemplar_ratio", 1e-6, math.inf)
  _check_range(config, "data.blur_sigma", 0.0, math.inf)
  _check(0.0 <= d.exemplar_rotation <= 90.0,
         f"config.data.exemplar_rotation={d.exemplar_rotation} must lie in [0, 90] degrees")
  _check(d.exemplar_geometry in ("release", "drawn_box"),
         f"config.data.exemplar_geometry={d.exemplar_geometry!r} must be 'release' or 'drawn_box'")
  _check(d.exemplar_geometry != "release"
         or (d.exemplar_rotation % 1 == 0 and d.exemplar_rotation <= 45.0),
         f"config.data.exemplar_rotation={d.exemplar_rotation} must be a whole number of degrees "
         f"in [0, 45] with config.data.exemplar_geometry='release'")
  for key in ("search_flip_prob", "color_jitter_prob", "grayscale_prob", "blur_prob",
              "solarize_prob", "exemplar_flip_prob"):
    _check(0.0 <= d[key] <= 1.0, f"config.data.{key}={d[key]} must be a probability in [0, 1]")
  _check(d.min_image_size >= 1, f"config.data.min_image_size={d.min_image_size} must be >= 1")
  _check(d.num_workers >= 0, f"config.data.num_workers={d.num_workers} must be >= 0")
  _check(m.decoder_dim % m.decoder_heads == 0,
         f"config.model.decoder_dim={m.decoder_dim} is not divisible by config.model.decoder_heads="
         f"{m.decoder_heads}")


def validate_pretraining(config: ml_collections.ConfigDict) -> None:
  """`validate` plus what the end-of-run report of a pre-training run needs.

  (An ImageFolder run without config.data.heldout_root holds a few of its images out for the
  pretext IoU instead: see `sources.heldout_count`.)
  """
  validate(config)
