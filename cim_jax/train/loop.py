"""train_and_evaluate: mesh, model, state, data, the jitted step, logging, checkpoints, faults."""

import dataclasses
import logging
import signal
import sys
import threading
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from tqdm import tqdm

from cim_jax.train import warm_start
from cim_jax import errors
from cim_jax import sharding
from cim_jax.data import pipeline
from cim_jax.data import sources
from cim_jax.models import cim
from cim_jax.train import checkpoint as checkpoint_lib
from cim_jax.train import memory
from cim_jax.train import metrics as metrics_lib
from cim_jax.train import schedules
from cim_jax.train import state as state_lib
from cim_jax.train import step as step_lib


class NonFiniteError(errors.RunStopped, FloatingPointError):
  """Training produced a non-finite loss or gradient (the run stops: `error: ...`, exit 1)."""


@dataclasses.dataclass
class TrainResult:
  """What evaluation needs after training: the final state and the objects that interpret it."""
  state: state_lib.TrainState
  metrics: dict
  model: Any
  mesh: jax.sharding.Mesh
  config: ml_collections.ConfigDict
  workdir: str


class _Preemption:
  """SIGTERM / SIGINT (single process) or JAX's multi-host preemption notice -> checkpoint at
  the current step, then stop. A second SIGINT stops at once (KeyboardInterrupt)."""

  def __init__(self):
    self.requested = False
    self.signal = None  # the signal that asked to stop (None: none, or the multi-host notice)
    self._previous = {}
    self._multihost = jax.process_count() > 1
    if not self._multihost and threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._handle)

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.signal == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
    name = signal.Signals(signum).name
    logging.warning("%s received: will checkpoint and stop after the current step%s", name,
                    " (press Ctrl-C again to stop at once)" if signum == signal.SIGINT else "")
    self.requested = True
    self.signal = signum

  def reached(self, step: int) -> bool:
    if self._multihost:
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # no preemption service in this cluster
        return False
    return self.requested

  def close(self):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}


def _check_finite(host_metrics: dict, step: int, checkpointer) -> None:
  if bool(host_metrics["finite"]):
    return
  checkpointer.wait()  # earlier (verified) saves finish; nothing after them is ever written
  last = checkpointer.latest_good_step()
  where = (f"step {last} in {checkpointer.directory} (kept; nothing after it was saved)"
           if last is not None else "none (no checkpoint was written yet)")
  raise NonFiniteError(
      f"non-finite loss or gradient at step {step} (loss={float(host_metrics['loss'])}, "
      f"grad_norm={float(host_metrics['grad_norm'])}); training stopped. Last good checkpoint: "
      f"{where}")


def _summarise(host_metrics: list) -> dict:
  """Mean of every scalar over the logging interval (the boolean 'finite' flag excluded)."""
  keys = [k for k in host_metrics[0] if k != "finite"]
  return {k: float(np.mean([np.asarray(m[k], np.float64) for m in host_metrics])) for k in keys}


def _progress_bar(config, total: int, initial: int):
  if not (config.progress_bar and jax.process_index() == 0):
    return None
  return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


def _train_data(config):
  """This process's training iterator (its state is checkpointed) and the source's size."""
  source = sources.make_source(config.data, "train")
  size = len(source) if config.data.num_images <= 0 else min(config.data.num_images, len(source))
  return iter(pipeline.make_dataset(config, "train", source=source)), size


def train(config: ml_collections.ConfigDict, workdir: str) -> TrainResult:
  """Trains (resuming from workdir when it holds a checkpoint) and returns the final state."""
  warm_start.check_warm_start_path(config.init_from)
  workdir_path = epath.Path(workdir)  # a local path or gs://... alike
  workdir_path.mkdir(parents=True, exist_ok=True)
  mesh = sharding.make_mesh(config.mesh.fsdp)
  model = cim.build_model(config.model, config.data)
  sharding.process_batch_size(config.batch_size)  # clear error when the batch does not split
  data_iterator, num_examples = _train_data(config)
  counts = schedules.step_counts(config, num_examples)

  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  trainer = step_lib.build_trainer(config, model, mesh, counts)
  checkpointer = checkpoint_lib.Checkpointer(workdir, config.keep_checkpoints)
  try:  # an incompatible checkpoint stops here: close orbax's manager before leaving
    restored = checkpointer.restore_latest(trainer.abstract_sharded_state(), data_iterator,
                                           config)
  except BaseException:
    checkpointer.close()
    raise
  if restored is not None:
    logging.info("resuming from %s step %d", checkpointer.directory, restored[0])
    state = restored[1]
  else:
    state = trainer.init_state(init_rng, state_lib.dummy_batch(config.data))
    if config.init_from:
      loaded = warm_start.load_warm_start(config.init_from, model, sharding.replicated(mesh))
      state = warm_start.apply_warm_start(state, loaded, config.init_from)
  train_step, batch_sharding = trainer.train_step, trainer.batch_sharding
  train_step = memory.compile_step_that_fits(  # compiled once; too big: one line, exit 2
      train_step, (state, memory.abstract_batch(config, batch_sharding), train_rng),
      batch_size=config.batch_size, what="pre-training")

  start = int(jax.device_get(state.step))
  total = counts.train_steps
  writer = metrics_lib.MetricsWriter(workdir_path)
  bar = _progress_bar(config, total, start)
  preemption = _Preemption()
  interval, previous, summary, preempted = [], None, {}, False
  data_wait, tick, tick_step = 0.0, time.perf_counter(), start
  try:
    for step in range(start, total):
      t0 = time.perf_counter()
      host_batch = next(data_iterator)
      data_wait += time.perf_counter() - t0
      state, metrics = train_step(state, sharding.global_batch(host_batch, batch_sharding),
                                  train_rng)
      done = step + 1
      # Check the previous step while this one runs: one step of lag keeps dispatch async.
      if previous is not None:
        _check_finite(jax.device_get(previous), done - 1, checkpointer)
      previous = metrics
      interval.append(metrics)
      preempted = preemption.reached(done)
      save = done % config.checkpoint_every_steps == 0 or done == total or preempted
      if done % config.log_every_steps == 0 or done == total or preempted:
        host = jax.device_get(interval)
        for offset, m in enumerate(host):
          _check_finite(m, done - len(host) + 1 + offset, checkpointer)
        elapsed = time.perf_counter() - tick
        summary = _summarise(host)
        summary.update(samples_per_second=(done - tick_step) * config.batch_size / elapsed,
                       data_wait_seconds=data_wait, epoch=done / max(counts.steps_per_epoch, 1))
        writer.write(done, summary)
        if bar is not None:
          bar.set_postfix(loss=f"{summary['loss']:.4f}",
                          samples_s=f"{summary['samples_per_second']:.1f}")
        interval, data_wait, tick, tick_step = [], 0.0, time.perf_counter(), done
      if save:
        _check_finite(jax.device_get(metrics), done, checkpointer)
        checkpointer.save(done, state, data_iterator, config)
      if bar is not None:
        bar.update(1)
      if preempted:
        checkpointer.wait()  # written, or CheckpointWriteError
        logging.warning("%s: checkpoint written at step %d in %s; stopping",
                        "preempted" if preemption.signal is None else
                        f"stopped by {signal.Signals(preemption.signal).name}", done,
                        checkpointer.directory)
        break
  finally:
    preemption.close()
    writer.close()
    if bar is not None:
      bar.close()
    _close_checkpointer(checkpointer)
  summary = dict(summary, step=int(jax.device_get(state.step)), preempted=preempted)
  if preemption.signal is not None:
    summary["signal"] = int(preemption.signal)
  return TrainResult(state=state, metrics=summary, model=model, mesh=mesh, config=config,
                     workdir=workdir)


def _close_checkpointer(checkpointer) -> None:
  """Closes the checkpointer in a `finally`: a save that failed is raised (CheckpointWriteError)
  unless another exception is already on its way out, which then stays the one reported."""
  if sys.exc_info()[0] is None:
    checkpointer.close()
    return
  try:
    checkpointer.close()
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("while stopping: %s", e)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       evaluate: Callable[[TrainResult], dict] | None = None) -> dict:
  """Trains, then (unless preempted) runs `evaluate(result)` and merges its metrics."""
  result = train(config, workdir)
  metrics = dict(result.metrics)
  if evaluate is not None and not result.metrics["preempted"]:
    metrics.update(evaluate(result))
  return metrics
