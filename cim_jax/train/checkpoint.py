"""Orbax checkpoints: one composite item (train state + grain iterator state + config) per step."""

import json
import logging
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

import grain.checkpoint as grain_checkpoint

from cim_jax import errors

CHECKPOINT_DIR = "checkpoints"

# Config keys known to shape the saved train state or data-iterator state. Whether a checkpoint
# can be resumed is NOT decided from this list: it is decided by comparing the saved array
# shapes (and the saved data-iterator state's layout) with those the requested config builds.
# The list only orders the explanation: of the changed keys, these are named as the cause.
STATE_SHAPING_KEYS = (
    "model.variant", "model.mlp_ratio", "model.decoder_dim", "model.decoder_heads",
    "model.decoder_mlp_ratio", "model.global_loss_weight", "model.projector_hidden_dim",
    "model.projector_dim", "model.pos_embed_grid", "data.context_size", "data.exemplar_size",
    "data.search_size", "data.num_exemplars", "data.num_workers", "data.image_size",
    "optim.accum_steps", "optim.grad_clip_norm", "mesh.fsdp", "num_classes",
)


class IncompatibleCheckpointError(errors.ConfigError):
  """The work dir's checkpoint holds a train state this config cannot resume (exit status 2)."""


class CheckpointWriteError(errors.RunStopped):
  """A checkpoint could not be written (disk full, I/O error, ...): the run stops (exit 1)."""

  def __init__(self, step, error: BaseException, last_good):
    reason = (error.strerror if isinstance(error, OSError) and error.strerror
              else _first_line(error) or type(error).__name__)
    last = (f"the last good checkpoint is step {last_good}" if last_good is not None
            else "no checkpoint was written before it")
    super().__init__(f"checkpoint of step {step} could not be written: {reason}; {last}")
    self.step, self.last_good = step, last_good


class Checkpointer:
  """Saves every N steps (async) and at the end, keeps the last K, restores the newest good one."""

  def __init__(self, workdir: str, keep: int, *, async_save: bool = True):
    self.directory = absolute(workdir) / CHECKPOINT_DIR
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save),
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "data": grain_checkpoint.CheckpointHandler(),
            "config": ocp.JsonCheckpointHandler(),
        })
    self._pending = None  # the step of the save in flight, until it is confirmed written

  def save(self, step: int, train_state, data_iterator, config) -> None:
    """Starts an async save; a step only becomes visible (restorable) once fully written.

    A save that fails (ENOSPC, EIO, ...) raises CheckpointWriteError naming its step and the
    last good one, here (for a part written synchronously) or at the next save / wait / close
    (for the part written in the background).
    """
    self.wait()  # the previous save: finished and written, or CheckpointWriteError
    items = dict(state=ocp.args.StandardSave(train_state),
                 config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())))
    if data_iterator is not None:
      items["data"] = grain_checkpoint.CheckpointSave(data_iterator)
    self._pending = step
    try:
      self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # pylint: disable=broad-except
      self._failed(e)

  def finished_steps(self) -> list[int]:
    """The fully written steps on disk (orbax's view of the directory, not its cache)."""
    return sorted(int(p.name) for p in ocp.path.step.checkpoint_steps_paths(self.directory)
                  if p.name.isdigit())

  def latest_good_step(self):
    steps = [s for s in self.finished_steps() if s != self._pending]
    return steps[-1] if steps else None

  def _failed(self, error: BaseException):
    step, self._pending = self._pending, None
    steps = [s for s in self.finished_steps() if s != step]
    raise CheckpointWriteError(step, error, steps[-1] if steps else None) from error

  def wait(self) -> None:
    """Waits for the save in flight; raises CheckpointWriteError when it was not written."""
    if self._pending is None:
      self.manager.wait_until_finished()
      return
    try:
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      self._failed(e)
    if self._pending not in self.finished_steps():
      # orbax logs some background failures instead of raising them
      self._failed(RuntimeError("the save did not complete (see the log above)"))
    self._pending = None

  def close(self) -> None:
    """Waits for the save in flight and closes orbax's manager (also after a failed save)."""
    try:
      self.wait()
    finally:
      try:
        self.manager.close()
      except Exception:  # pylint: disable=broad-except  (its error was raised by wait())
        logging.debug("orbax manager close failed after a failed save", exc_info=True)

  def restore_latest(self, abstract_state, data_iterator, config=None, *,
                     warm_start_keys=("params", "target_params")):
    """Restores the newest readable checkpoint into `abstract_state`'s shardings.

    Returns (step, state) or None when there is none. An unreadable checkpoint is moved aside to
    `corrupt_<step>` with a warning naming it and the step fallen back to.

    Before any array is read, the saved config and array shapes are compared with `config` (the
    config a save would store) and `abstract_state`: a checkpoint this config cannot resume
    raises IncompatibleCheckpointError (a ConfigError: one line, exit 2) and touches nothing;
    compatible changes (learning rate, run length, logging, ...) are listed in one warning.
    `warm_start_keys`: the state entries `--config.init_from` copies (None: do not suggest it).
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    for i, step in enumerate(steps):
      # Restoring is collective: a step one process cannot read must be skipped by all of them,
      # so the cheap per-process checks are agreed on first.
      problem = self._agreed_problem(step, with_data=data_iterator is not None)
      if problem is None:
        # Deterministic from shared files and the (identical) config: every process agrees.
        self._check_compatible(step, abstract_state, data_iterator, config, warm_start_keys)
        items = dict(state=ocp.args.StandardRestore(abstract_state))
        if data_iterator is not None:
          items["data"] = grain_checkpoint.CheckpointRestore(data_iterator)
        try:
          restored = self.manager.restore(step, args=ocp.args.Composite(**items))
          return step, restored["state"]
        except Exception as e:  # pylint: disable=broad-except  (any failure means unreadable)
          if jax.process_count() > 1:
            # The other processes may have read their part: falling back alone would desync.
            raise RuntimeError(
                f"checkpoint step {step} in {self.directory} failed to restore on process "
                f"{jax.process_index()} ({type(e).__name__}: {_first_line(e)}); rename it to "
                f"corrupt_{step} to resume from the step before") from e
          problem = f"{type(e).__name__}: {_first_line(e)}"
      fallback = steps[i + 1] if i + 1 < len(steps) else None
      logging.warning(
          "checkpoint step %d in %s is unreadable (%s); falling back to %s", step,
          self.directory, problem,
          f"step {fallback}" if fallback is not None else "a fresh start (no older checkpoint)")
      self._quarantine(step)
    return None

  def _agreed_problem(self, step: int, with_data: bool):
    """What makes `step` unreadable on this or any other process (None: nothing found)."""
    problem = self._local_problem(step, with_data)
    if jax.process_count() == 1:
      return problem
    failed = np.asarray(multihost_utils.process_allgather(np.int32(problem is not None)))
    if problem is None and failed.any():
      problem = f"unreadable on process(es) {np.flatnonzero(failed).tolist()}"
    return problem

  def _local_problem(self, step: int, with_data: bool):
    """This process's share of `step` that can be checked without a collective: the JSON
    metadata every process reads and this process's data-iterator state."""
    root = self.directory / str(step)
    files = [root / "_CHECKPOINT_METADATA", root / "state" / "_METADATA",
             root / "config" / "metadata"]
    if with_data:
      data = _data_file(root)
      if data.exists() or not _data_process_counts(root):
        files.append(data)
      # else: written by another number of processes, which _check_compatible reports.
    for path in files:
      try:
        json.loads(path.read_text())
      except Exception as e:  # pylint: disable=broad-except  (missing or garbled alike)
        return f"{path.name}: {type(e).__name__}: {_first_line(e)}"
    return None

  def _check_compatible(self, step, abstract_state, data_iterator, config, warm_start_keys):
    """Raises IncompatibleCheckpointError when `step` cannot be resumed by this config; logs
    one warning listing the compatible config changes. Reads metadata only, never arrays."""
    root = self.directory / str(step)
    changes = []
    if config is not None:
      saved = json.loads((root / "config" / "metadata").read_text())
      changes = config_changes(saved, json.loads(config.to_json_best_effort()))
    reasons = []
    try:
      metadata = self.manager.item_metadata(step)["state"]
      saved_arrays = leaf_table(getattr(metadata, "tree", metadata))
    except Exception:  # pylint: disable=broad-except  (unreadable: the restore attempt decides)
      saved_arrays = None
    wanted = leaf_table(abstract_state)
    if saved_arrays is not None:
      difference = describe_difference(saved_arrays, wanted)
      if difference:
        reasons.append(f"train state: {difference}")
    if data_iterator is not None:
      counts = _data_process_counts(root)
      if not _data_file(root).exists() and counts:
        reasons.append(f"it was written by {'/'.join(map(str, sorted(counts)))} process(es), "
                       f"this run has {jax.process_count()}")
      else:
        saved_data = json.loads(_data_file(root).read_text())
        if _layout(saved_data) != _layout(data_iterator.get_state()):
          reasons.append("its data-iterator state has another layout")
    listed = "; ".join(f"{k}: {_show(old)} -> {_show(new)}" for k, old, new in changes)
    if not reasons:
      if changes:
        logging.warning("resuming %s step %d with a changed config (compatible with its train "
                        "state): %s", self.directory, step, listed)
      return
    workdir = self.directory.parent
    causes = [c for c in changes if c[0] in STATE_SHAPING_KEYS] or changes
    others = [c for c in changes if c not in causes]
    named = ("; ".join(f"{k}: {_show(old)} -> {_show(new)}" for k, old, new in causes)
             if causes else "no config key differs")
    hint = "train into a new --workdir"
    if warm_start_keys and saved_arrays is not None and _fits(saved_arrays, wanted,
                                                              warm_start_keys):
      hint += f", or warm-start from its weights with --config.init_from={workdir}"
    message = (f"{workdir} holds a checkpoint (step {step}) that this config cannot resume: "
               f"{named} ({'; '.join(reasons)})")
    if others:
      message += f"; also changed: {', '.join(k for k, _, _ in others)}"
    raise IncompatibleCheckpointError(f"{message}. Nothing was changed there; {hint}")

  def _quarantine(self, step: int) -> None:
    """Moves a bad step out of orbax's view so later saves of that step number do not collide."""
    if jax.process_index() == 0:
      src = self.directory / str(step)
      dst = self.directory / f"corrupt_{step}"
      if dst.exists():
        dst.rmtree()
      if src.exists():
        src.rename(dst)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"quarantine_{step}")
    self.manager.reload()


def _data_file(root):
  return root / "data" / f"process_{jax.process_index()}-of-{jax.process_count()}.json"


def _data_process_counts(root) -> set[int]:
  """The process counts of the data-iterator states saved in checkpoint `root`."""
  data = root / "data"
  if not data.exists():
    return set()
  return {int(p.name.rsplit("-of-", 1)[1][:-len(".json")]) for p in data.glob("process_*-of-*.json")}


def _layout(tree):
  """The shape of a JSON tree (dict keys, list lengths), its scalar values left out."""
  if isinstance(tree, dict):
    return {k: _layout(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [_layout(v) for v in tree]
  return None


def _flat_config(tree, prefix=""):
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      flat.update(_flat_config(value, f"{prefix}{key}."))
    else:
      flat[prefix + key] = value
  return flat


_ABSENT = object()


def config_changes(saved: dict, wanted: dict) -> list[tuple[str, object, object]]:
  """(dotted key, saved value, wanted value) for every key whose value differs (JSON trees)."""
  old, new = _flat_config(saved), _flat_config(wanted)
  return [(k, old.get(k, _ABSENT), new.get(k, _ABSENT)) for k in sorted(old.keys() | new.keys())
          if old.get(k, _ABSENT) != new.get(k, _ABSENT)]


def _show(value) -> str:
  return "(absent)" if value is _ABSENT else json.dumps(value)


def _key_name(entry) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def leaf_table(tree) -> dict[str, tuple[tuple[int, ...], str]]:
  """{'params/encoder/...': (shape, dtype)} of a state, abstract state or orbax metadata tree."""
  return {"/".join(_key_name(e) for e in path): (tuple(leaf.shape), str(np.dtype(leaf.dtype)))
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def describe_difference(saved: dict, wanted: dict) -> str:
  """'' when both tables hold the same arrays, else a short account with one example."""
  order = lambda k: (not k.startswith("params/"), k)  # examples from the parameters first
  missing = sorted(wanted.keys() - saved.keys(), key=order)
  extra = sorted(saved.keys() - wanted.keys(), key=order)
  reshaped = sorted((k for k in wanted.keys() & saved.keys() if wanted[k] != saved[k]), key=order)
  parts = []
  if reshaped:
    k = reshaped[0]
    parts.append(f"{len(reshaped)} array(s) of another shape or dtype, e.g. {k} "
                 f"{_shape(saved[k])} -> {_shape(wanted[k])}")
  if missing:
    parts.append(f"{len(missing)} array(s) not in the checkpoint, e.g. {missing[0]}")
  if extra:
    parts.append(f"{len(extra)} saved array(s) this config has no place for, e.g. {extra[0]}")
  return ", ".join(parts)


def _shape(entry) -> str:
  shape, dtype = entry
  return f"{dtype}{list(shape)}"


def _fits(saved: dict, wanted: dict, keys) -> bool:
  """Whether every wanted array under the top-level `keys` is saved with the same shape."""
  chosen = [k for k in wanted if k.split("/", 1)[0] in keys]
  return bool(chosen) and all(saved.get(k, (None,))[0] == wanted[k][0] for k in chosen)


def _first_line(error: Exception) -> str:
  return str(error).splitlines()[0] if str(error) else ""


def restore_state_anywhere(directory, sharding, step=None):
  """(step, saved train state as a dict tree) with every leaf placed in `sharding`.

  Works whatever mesh / device count wrote the checkpoint (a warm start on another topology);
  (None, None) when the directory holds no finished checkpoint.
  """
  # Handlers for every item a run saves, so orbax does not warn about the ones not restored.
  with ocp.CheckpointManager(absolute(directory), item_handlers={
      "state": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler(),
      "data": grain_checkpoint.CheckpointHandler()}) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      return None, None
    metadata = manager.item_metadata(step)["state"]
    metadata = getattr(metadata, "tree", metadata)
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                          metadata)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))
  return step, restored["state"]


def is_local(path) -> bool:
  """True for a path on this machine's file system (no gs://, s3://, ... scheme)."""
  return "://" not in os.fspath(path)


def absolute(path) -> epath.Path:
  """The path, made absolute when local: orbax's tensorstore writer rejects relative paths."""
  return epath.Path(os.path.abspath(os.fspath(path)) if is_local(path) else path)
