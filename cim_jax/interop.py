"""The authors' PyTorch CIM checkpoints <-> our parameter trees; encoders <-> timm state dicts.

Key maps, readers and writers only; the command line is `python -m cim_jax.tools.convert`.
torch is needed only here (and in tests); it is imported lazily, and checkpoints are read with
`torch.load(..., weights_only=True)`, which never executes pickled code.
"""

import argparse
import logging
import os
import re

import jax
import numpy as np
from flax import serialization, traverse_util

from cim_jax.errors import ConfigError
from cim_jax.models import vit as vit_lib

# Authors' global-loss heads: nn.Sequential index per Linear / BatchNorm (docs/METHOD.md §6).
_PROJECTOR_LAYERS = 3
_PREDICTOR_LAYERS = 2
_TIMM_NAMES = {"Ti": "tiny", "T": "tiny", "S": "small", "B": "base", "L": "large", "H": "huge"}


def _require_torch():
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("cim_jax.interop needs PyTorch to read/write .pth files: "
                      "pip install torch (or use a .safetensors file)") from e
  return torch


def timm_model_name(variant: str) -> str:
  """'B/16' -> 'vit_base_patch16_224' (the timm model whose keys an exported encoder matches)."""
  patch = vit_lib.decode_variant(variant)["patch_size"]
  size = variant.split("/")[0]
  if size not in _TIMM_NAMES:
    raise ConfigError(f"no named timm model for variant {variant!r}; build "
                     f"timm VisionTransformer(**decode_variant({variant!r})) instead")
  return f"vit_{_TIMM_NAMES[size]}_patch{patch}_224"


# ----------------------------------------------------------------------------------------------
# Key maps: torch key -> (flax path, torch->flax converter, flax->torch converter).

def _linear(prefix, path):
  return {f"{prefix}.weight": (path + ("kernel",), lambda w: w.T, lambda k: k.T),
          f"{prefix}.bias": (path + ("bias",), None, None)}


def _norm(prefix, path):
  return {f"{prefix}.weight": (path + ("scale",), None, None),
          f"{prefix}.bias": (path + ("bias",), None, None)}


def encoder_key_map(depth: int, torch_suffix: str = "", root: tuple = (), *,
                    final_norm: str = "norm", head: bool = False) -> dict:
  """timm / authors' encoder keys (`_c` suffix for the target copy) -> flax paths under `root`.

  final_norm is 'norm' (token output) or 'fc_norm' (pool='gap', timm global_pool='avg').
  """
  s = torch_suffix
  keys = {
      f"patch_embed{s}.proj.weight": (root + ("patch_embed", "kernel"),
                                      lambda w: w.transpose(2, 3, 1, 0),
                                      lambda k: k.transpose(3, 2, 0, 1)),
      f"patch_embed{s}.proj.bias": (root + ("patch_embed", "bias"), None, None),
  }
  for i in range(depth):
    t, f = f"blocks{s}.{i}", root + (f"blocks_{i}",)
    keys.update(_norm(f"{t}.norm1", f + ("norm1",)))
    keys.update(_linear(f"{t}.attn.qkv", f + ("attn", "qkv")))
    keys.update(_linear(f"{t}.attn.proj", f + ("attn", "proj")))
    keys.update(_norm(f"{t}.norm2", f + ("norm2",)))
    keys.update(_linear(f"{t}.mlp.fc1", f + ("mlp", "fc1")))
    keys.update(_linear(f"{t}.mlp.fc2", f + ("mlp", "fc2")))
  keys.update(_norm(f"{final_norm}{s}", root + (final_norm,)))
  if head:
    keys.update(_linear("head", root + ("head",)))
  return keys


def decoder_key_map(root: tuple = ("decoder",)) -> dict:
  """Authors' decoder keys -> flax paths."""
  b, f = "decoder_corr_block.block", root + ("decoder_corr_block",)
  keys = {}
  keys.update(_linear("decoder_embed", root + ("decoder_embed",)))
  keys.update(_norm(f"{b}.norm1", f + ("norm1",)))
  for name in ("q", "kv", "proj"):  # kv rows are [k; v], matching the flax split order
    keys.update(_linear(f"{b}.attn.{name}", f + ("attn", name)))
  keys.update(_norm(f"{b}.norm2", f + ("norm2",)))
  keys.update(_linear(f"{b}.mlp.fc1", f + ("mlp", "fc1")))
  keys.update(_linear(f"{b}.mlp.fc2", f + ("mlp", "fc2")))
  keys.update(_norm("decoder_norm", root + ("decoder_norm",)))
  keys["decoder_pred_mask.0.weight"] = (root + ("decoder_pred_mask", "kernel"),
                                        lambda w: w[:, :, 0, 0].T, lambda k: k.T[:, :, None, None])
  keys["decoder_pred_mask.0.bias"] = (root + ("decoder_pred_mask", "bias"), None, None)
  return keys


def head_key_map(torch_prefix: str, num_layers: int, param_root: tuple, state_root: tuple) -> dict:
  """Authors' `build_mlp` Sequential keys -> flax params (fc{l}, bn{l}) and BatchNorm statistics."""
  keys = {}
  for layer in range(num_layers):
    lin, bn = 3 * layer, 3 * layer + 1
    keys[f"{torch_prefix}.{lin}.weight"] = (param_root + (f"fc{layer}", "kernel"),
                                            lambda w: w.T, lambda k: k.T)
    if layer < num_layers - 1:
      keys.update(_norm(f"{torch_prefix}.{bn}", param_root + (f"bn{layer}",)))
    keys[f"{torch_prefix}.{bn}.running_mean"] = (state_root + (f"bn{layer}", "mean"), None, None)
    keys[f"{torch_prefix}.{bn}.running_var"] = (state_root + (f"bn{layer}", "var"), None, None)
  return keys


# Authors' global-loss heads: torch prefix, layers, flax params root, BatchNorm-statistics root.
_HEADS = (("decoder_g_embed", _PROJECTOR_LAYERS, ("params", "projector"), ("state", "projector")),
          ("decoder_g_embed_c", _PROJECTOR_LAYERS, ("target", "projector"),
           ("state", "target_projector")),
          ("decoder_predictor", _PREDICTOR_LAYERS, ("params", "predictor"), ("state", "predictor")))


def authors_key_map(model) -> dict:
  """Every learned tensor of the authors' checkpoint -> a path in {params, target, state}."""
  depth = model.encoder.depth
  keys = {"cls_token": (("params", "encoder", "cls_token"), None, None)}
  keys.update(encoder_key_map(depth, "", ("params", "encoder")))
  keys.update(encoder_key_map(depth, "_c", ("target", "encoder")))
  keys.update(decoder_key_map(("params", "decoder")))
  if model.use_global_loss:
    for prefix, layers, param_root, state_root in _HEADS:
      keys.update(head_key_map(prefix, layers, param_root, state_root))
  return keys


def _fixed_tables(model) -> dict:
  """The authors' fixed sin-cos buffers (constants here) and BatchNorm step counters."""
  tables = {
      "pos_embed": vit_lib.sincos_pos_embed(model.encoder.width, model.encoder.pos_embed_grid),
      "decoder_pos_embed": vit_lib.sincos_pos_embed(
          model.decoder.dim, model.context_size // model.encoder.patch_size),
  }
  return tables


def _ignorable_keys(model) -> set:
  """Authors' keys with no counterpart here: BN step counters; heads of a model without them."""
  keys = set()
  for prefix, layers, param_root, state_root in _HEADS:
    keys.update(f"{prefix}.{3 * layer + 1}.num_batches_tracked" for layer in range(layers))
    if not model.use_global_loss:
      keys.update(head_key_map(prefix, layers, param_root, state_root))
  return keys


def _expected_shapes(model) -> dict:
  params, state = jax.eval_shape(lambda: model.init_variables(jax.random.key(0)))
  target = jax.eval_shape(model.target_params_from, params)
  tree = traverse_util.flatten_dict({"params": params, "target": target, "state": state})
  return {path: tuple(leaf.shape) for path, leaf in tree.items()}


# ----------------------------------------------------------------------------------------------
# Reading checkpoints.

# The one non-container global a release checkpoint holds (its util/misc.py save_model writes
# {'model', 'optimizer', 'epoch', 'scaler', 'args'}, args being the run's argparse.Namespace). It
# is allowed by name; anything else a pickle asks for is still refused by weights_only loading.
_RELEASE_CHECKPOINT_GLOBALS = (argparse.Namespace,)
# Entries of a release checkpoint beside 'model': resume state of the authors' trainer.
_RELEASE_RESUME_KEYS = ("optimizer", "epoch", "scaler", "args")


def load_torch_state_dict(path: str) -> dict:
  """A .pth/.pt (a release checkpoint, {'model': state_dict} or a bare state dict) or
  .safetensors file -> numpy dict."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint not found: {path}")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    return dict(load_file(path))
  torch = _require_torch()
  # weights_only=True: the restricted unpickler, which refuses to run arbitrary pickled code.
  with torch.serialization.safe_globals(list(_RELEASE_CHECKPOINT_GLOBALS)):
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
  state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
  if not isinstance(state, dict):
    raise ConfigError(f"{path}: expected a state dict or {{'model': state_dict}}")
  ignored = [k for k in _RELEASE_RESUME_KEYS if state is not checkpoint and k in checkpoint]
  if ignored:
    logging.info("%s: using 'model'; ignoring the authors' resume state (%s)", path,
                 ", ".join(ignored))
  if state and all(k.startswith("module.") for k in state):  # saved from a DDP wrapper
    state = {k[len("module."):]: v for k, v in state.items()}
  return {k: v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
          for k, v in state.items()}


def first_line(error: Exception) -> str:
  """One line for a loading error; for a refused pickle, the global it asked for."""
  refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
  if refused:
    return (f"refused to unpickle {refused.group(1)} (only tensors, containers and "
            "argparse.Namespace are loaded; pickled code never runs)")
  return str(error).strip().splitlines()[0]


def _convert_mapped(state_dict, key_map, expected) -> tuple[dict, list[str]]:
  """Torch tensors at key_map's keys -> {flax path: array}, plus the missing / misshapen keys."""
  problems, flat = [], {}
  for key, (path, to_flax, _) in key_map.items():
    if key not in state_dict:
      problems.append(f"missing key {key}")
      continue
    value = np.asarray(state_dict[key], np.float32)
    value = to_flax(value) if to_flax else value
    if value.shape != expected[path]:
      problems.append(f"wrong shape for {key}: {tuple(state_dict[key].shape)} "
                      f"(as flax {value.shape}, expected {expected[path]})")
    flat[path] = value
  return flat, problems


def import_authors_state_dict(state_dict: dict, model) -> tuple:
  """Authors' CIM state dict -> (params, target_params, model_state) for `model` (a CIMModel).

  Every key is accounted for: missing keys, unexpected keys, wrong shapes and position tables
  that differ from this model's sin-cos tables raise one ValueError listing all of them. The
  global-loss heads are imported when the model uses them and skipped otherwise (the authors'
  model always builds them).
  """
  key_map, expected = authors_key_map(model), _expected_shapes(model)
  flat, problems = _convert_mapped(state_dict, key_map, expected)
  for key, table in _fixed_tables(model).items():
    if key not in state_dict:
      problems.append(f"missing key {key}")
    elif (state_dict[key].shape != table.shape
          or not np.allclose(state_dict[key], table, atol=1e-4)):
      problems.append(f"{key} {tuple(state_dict[key].shape)} is not the fixed sin-cos table "
                      f"{table.shape} this model uses")
  known = set(key_map) | set(_fixed_tables(model)) | _ignorable_keys(model)
  problems.extend(f"unexpected key {k}" for k in sorted(set(state_dict) - known))
  if problems:
    raise ConfigError(f"checkpoint does not match the {model.config.variant} CIM model "
                     f"({len(problems)} problems):\n  " + "\n  ".join(problems))
  # The target shares the online cls token; the copy keeps target_params a full encoder tree.
  flat[("target", "encoder", "cls_token")] = flat[("params", "encoder", "cls_token")]
  tree = traverse_util.unflatten_dict(flat)
  return tree["params"], tree["target"], tree.get("state", {})


def export_authors_state_dict(params, target_params, model_state, model) -> dict:
  """The inverse of `import_authors_state_dict`: this project's trees -> the authors' layout."""
  tree = jax.device_get({"params": params, "target": target_params, "state": model_state})
  flat = traverse_util.flatten_dict(tree)
  state = {}
  for key, (path, _, to_torch) in authors_key_map(model).items():
    value = np.asarray(flat[path], np.float32)
    state[key] = np.ascontiguousarray(to_torch(value) if to_torch else value)
  state.update(_fixed_tables(model))
  if model.use_global_loss:
    for key in _ignorable_keys(model):  # BN step counters, unknown here
      state[key] = np.zeros((), np.int64)
  return state


# ----------------------------------------------------------------------------------------------
# Export.

def encoder_to_timm(encoder_params, cls_token=None, pos_embed_grid: int = 14) -> dict:
  """Encoder params -> timm VisionTransformer state dict (numpy), incl. the 14x14 sin-cos table."""
  flat = traverse_util.flatten_dict(jax.device_get(encoder_params))
  depth = sum(1 for key in flat if key[0].startswith("blocks_") and key[1:] == ("norm1", "scale"))
  final_norm = "fc_norm" if ("fc_norm", "scale") in flat else "norm"
  key_map = encoder_key_map(depth, final_norm=final_norm, head=("head", "kernel") in flat)
  state = {}
  for key, (path, _, to_torch) in key_map.items():
    value = np.asarray(flat[path], np.float32)
    state[key] = np.ascontiguousarray(to_torch(value) if to_torch else value)
  cls = flat[("cls_token",)] if cls_token is None else cls_token
  state["cls_token"] = np.asarray(cls, np.float32)
  width = state["cls_token"].shape[-1]
  state["pos_embed"] = vit_lib.sincos_pos_embed(width, pos_embed_grid)
  return state


def is_timm_state_dict(state_dict: dict) -> bool:
  """A timm VisionTransformer's keys (an authors' CIM checkpoint also has the target and decoder)."""
  return "blocks.0.norm1.weight" in state_dict and not any(
      k.startswith(("blocks_c.", "decoder_")) for k in state_dict)


def encoder_from_timm(state_dict: dict, encoder, *, blocks_only: bool = False) -> dict:
  """timm VisionTransformer state dict -> params of `encoder` (a VisionTransformer module).

  timm's pos_embed is not imported (ours is a fixed table); mismatches raise one ValueError.
  `blocks_only`: the final norm and classifier are taken when present and otherwise left out,
  and extra ones are ignored (a backbone that reads block outputs needs neither).
  """
  final_norm = "fc_norm" if encoder.pool == "gap" else "norm"
  key_map = encoder_key_map(encoder.depth, final_norm=final_norm, head=encoder.num_classes > 0)
  key_map["cls_token"] = (("cls_token",), None, None)
  head_keys = ("norm.", "fc_norm.", "head.")
  if blocks_only:
    key_map = {k: v for k, v in key_map.items() if not k.startswith(head_keys) or k in state_dict}
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(head_keys)
                  or k in key_map}
  shapes = jax.eval_shape(encoder.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, encoder.patch_size, encoder.patch_size, 3),
                                               np.float32))["params"]
  expected = {p: tuple(v.shape) for p, v in traverse_util.flatten_dict(shapes).items()}
  flat, problems = _convert_mapped(state_dict, key_map, expected)
  problems.extend(f"unexpected key {k}" for k in sorted(set(state_dict) - set(key_map)
                                                         - {"pos_embed"}))
  if problems:
    raise ConfigError("timm state dict does not match the encoder:\n  " + "\n  ".join(problems))
  return traverse_util.unflatten_dict(flat)


def timm_vision_transformer(encoder, encoder_params, img_size: int = 224):
  """A timm VisionTransformer (torch, eval mode) computing what `encoder` computes at img_size.

  timm's learned pos_embed slot receives this project's sin-cos table resampled to the grid.
  """
  _require_torch()
  import torch  # pylint: disable=import-outside-toplevel
  from timm.models import vision_transformer  # pylint: disable=import-outside-toplevel
  global_pool = {"none": "token", "tok": "token", "gap": "avg"}[encoder.pool]
  model = vision_transformer.VisionTransformer(
      img_size=img_size, patch_size=encoder.patch_size, embed_dim=encoder.width,
      depth=encoder.depth, num_heads=encoder.num_heads, mlp_ratio=encoder.mlp_ratio,
      qkv_bias=True, num_classes=encoder.num_classes, global_pool=global_pool)
  state = encoder_to_timm(encoder_params, pos_embed_grid=encoder.pos_embed_grid)
  grid = img_size // encoder.patch_size
  state["pos_embed"] = vit_lib.resampled_pos_embed(encoder.width, (grid, grid),
                                                   encoder.pos_embed_grid)
  model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True)
  return model.eval()


def save_state_dict(state: dict, path: str):
  """numpy state dict -> .safetensors (no torch needed) or .pth."""
  if path.endswith(".safetensors"):
    from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, path)
  else:
    torch = _require_torch()
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, path)


def save(path: str, params, target_params, model_state):
  """Write {params, target_params, model_state} as a flax msgpack file."""
  tree = {"params": params, "target_params": target_params, "model_state": model_state}
  with open(path, "wb") as f:
    f.write(serialization.msgpack_serialize(jax.device_get(tree)))


def load_params(path: str) -> dict:
  """Read a file written by `save` -> {'params', 'target_params', 'model_state'}."""
  with open(path, "rb") as f:
    return serialization.msgpack_restore(f.read())


if __name__ == "__main__":
  raise SystemExit("error: python -m cim_jax.interop moved to python -m cim_jax.tools.convert "
                   "(same arguments)")
