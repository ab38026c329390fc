"""Warm start and evaluation loading: weights from a work dir, an authors' .pth or a weights file.

Pre-training (`init_from`), fine-tuning and the evaluation tools all read pre-trained weights here;
`check_warm_start_path` runs before anything is compiled.
"""

import contextlib
import logging
import os
import shutil
import tempfile

import jax
import ml_collections
import numpy as np
from etils import epath

from cim_jax import interop
from cim_jax import sharding
from cim_jax.errors import ConfigError
from cim_jax.models import cim
from cim_jax.models import vit
from cim_jax.train import checkpoint as checkpoint_lib


WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".safetensors", ".msgpack")


def check_warm_start_path(path: str, key: str = "init_from") -> None:
  """Fails fast (before any compilation) when `path` names nothing usable: it must be a work dir
  (or its checkpoints/ folder) holding a finished checkpoint, or a weights file."""
  if not path:
    return
  where = epath.Path(path)
  if not where.exists():
    raise ConfigError(f"{key}={path!r}: no such work dir or checkpoint file")
  if not where.is_dir():
    if not path.endswith(WEIGHT_FILE_SUFFIXES):
      raise ConfigError(
          f"{key}={path!r}: not a work dir or a weights file "
          f"({', '.join(WEIGHT_FILE_SUFFIXES)})")
    return
  directory = where / checkpoint_lib.CHECKPOINT_DIR if (where / checkpoint_lib.CHECKPOINT_DIR).is_dir() else where
  if not any(d.name.isdigit() and (d / "_CHECKPOINT_METADATA").exists()
             for d in directory.iterdir()):
    raise ConfigError(
        f"{key}={path!r}: no finished checkpoint in {directory} (expected the work dir of a "
        f"run, holding {checkpoint_lib.CHECKPOINT_DIR}/<step>/, or a weights file)")


@contextlib.contextmanager
def _local_copy(path: epath.Path):
  """`path` itself when local, else a temporary local copy (torch / msgpack readers need one)."""
  if checkpoint_lib.is_local(path):
    yield os.fspath(path)
    return
  with tempfile.TemporaryDirectory(prefix="cim_warm_start_") as tmp:
    local = os.path.join(tmp, path.name)
    with path.open("rb") as src, open(local, "wb") as dst:
      shutil.copyfileobj(src, dst, length=16 << 20)
    yield local


def load_warm_start(path: str, model, sharding):
  """params and target_params (host trees) from a run's work dir, an authors' .pth, a timm ViT
  state dict (.pth / .safetensors: the encoder only) or a .msgpack.

  Any of them may be local or on gs:// (a .pth / .msgpack there is copied to a temp file first).
  """
  path = os.fspath(path)
  if path.endswith(WEIGHT_FILE_SUFFIXES):
    file = epath.Path(path)
    if not file.is_file():
      raise ConfigError(f"init_from={path!r}: no such file")
    with _local_copy(file) as local:
      if path.endswith(".msgpack"):
        return interop.load_params(local)
      state_dict = interop.load_torch_state_dict(local)
    if interop.is_timm_state_dict(state_dict):  # an encoder alone: it stands for both copies
      encoder = interop.encoder_from_timm(state_dict, model.encoder, blocks_only=True)
      return {"params": {"encoder": encoder}, "target_params": {"encoder": encoder}}
    params, target_params, _ = interop.import_authors_state_dict(state_dict, model)
    return {"params": params, "target_params": target_params}
  directory = epath.Path(path)
  if (directory / checkpoint_lib.CHECKPOINT_DIR).exists():
    directory = directory / checkpoint_lib.CHECKPOINT_DIR
  if not directory.exists():
    raise ConfigError(f"init_from={path!r}: no such work dir or checkpoint file")
  step, state = checkpoint_lib.restore_state_anywhere(directory, sharding)
  if step is None:
    raise ConfigError(f"init_from={path!r}: no finished checkpoint in {directory}")
  logging.info("warm start from %s step %d", directory, step)
  return {"params": state["params"], "target_params": state["target_params"]}


def place(current, new, source: str, name: str = "", keep: tuple[str, ...] = ()):
  """The leaves of `new` in `current`'s tree, shapes checked, each in its current sharding;
  leaves under a top-level key in `keep` (a fresh head) may be missing from `new`."""
  new_flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(new)[0]}
  leaves, treedef = jax.tree_util.tree_flatten_with_path(current)
  placed = []
  for path, leaf in leaves:
    key = jax.tree_util.keystr(path)
    if key not in new_flat:
      if getattr(path[0], "key", None) in keep:
        placed.append(leaf)
        continue
      raise ConfigError(f"init_from={source!r}: {name}{key} missing from the checkpoint")
    value = new_flat[key]
    if not isinstance(value, jax.Array):
      value = np.asarray(value)
    if value.shape != leaf.shape:
      raise ConfigError(f"init_from={source!r}: {name}{key} has shape {value.shape}, the model "
                        f"expects {leaf.shape}")
    placed.append(jax.device_put(value.astype(leaf.dtype), leaf.sharding))
  return jax.tree_util.tree_unflatten(treedef, placed)


def apply_warm_start(train_state, loaded, source: str):
  """Replaces params / target params with `loaded`, checking shapes and keeping shardings."""
  return train_state.replace(
      params=place(train_state.params, loaded["params"], source, "params"),
      target_params=place(train_state.target_params, loaded["target_params"], source,
                          "target_params"))


def load_checkpoint(config, checkpoint: str | None = None, model=None) -> dict:
  """{'params', 'target_params'} of a work dir of this project or an authors' .pth file.

  Raises a one-line error when the checkpoint's encoder is not `config.model.variant`.
  """
  checkpoint = checkpoint or config.init_from
  if not checkpoint:
    raise ConfigError("no checkpoint given (set --config.init_from=WORKDIR_OR_PTH)")
  check_warm_start_path(checkpoint, "config.init_from")  # a work dir or weights file
  if model is None:
    # Fine-tuning and evaluation configs have no pair settings; the CIM model only needs them
    # for shapes: the release's 10x10 context and 4x4 exemplar token grids.
    patch = vit.decode_variant(config.model.variant)["patch_size"]
    data_cfg = config.data if "context_size" in config.data else ml_collections.ConfigDict(
        dict(context_size=10 * patch, exemplar_size=4 * patch, num_exemplars=1))
    model = cim.build_model(config.model, data_cfg)
  loaded = load_warm_start(checkpoint, model, sharding.replicated(sharding.local_data_mesh()))
  check_encoder_params(loaded["params"]["encoder"], config.model, checkpoint)
  return loaded


def load_encoder_params(config, checkpoint: str | None = None):
  """Online-encoder parameters of a checkpoint (see `load_checkpoint`)."""
  return load_checkpoint(config, checkpoint)["params"]["encoder"]


def check_encoder_params(encoder_params, model_cfg, where: str = "checkpoint"):
  """Raises a one-line error when parameters come from a different ViT variant than the config."""
  spec = vit.decode_variant(model_cfg.variant)
  depth = sum(1 for k in encoder_params if k.startswith("blocks_"))
  kernel_shape = np.shape(encoder_params["patch_embed"]["kernel"])  # (p, p, 3, width)
  found = dict(depth=depth, width=int(kernel_shape[-1]), patch_size=int(kernel_shape[0]))
  wanted = {k: spec[k] for k in found}
  if found != wanted:
    raise ConfigError(f"{where} holds a ViT with {_describe(found)}, but model.variant="
                     f"{model_cfg.variant!r} needs {_describe(wanted)}")
  return encoder_params


def _describe(sizes: dict) -> str:
  return ", ".join(f"{k} {v}" for k, v in sizes.items())
