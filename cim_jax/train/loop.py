"""The training loop of both tasks (`run`): restore or start, one compilation, the steps, logging,
periodic evaluation and checkpoints, faults and preemption; pre-training's task (`train`)."""

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
from cim_jax.train import warm_start


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


def _progress_bar(config, desc: str, total: int, initial: int):
  if not (config.progress_bar and jax.process_index() == 0):
    return None
  return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)


@dataclasses.dataclass
class Task:
  """What one kind of training gives the loop: its state, jitted step, data and evaluation."""
  name: str  # "pre-training" / "fine-tuning": messages and the progress bar
  trainer: step_lib.Trainer
  init_state: Callable[[], Any]  # a fresh state in its shardings, warm start applied
  abstract_batch: Any  # the global batch as ShapeDtypeStructs (the step is compiled for it)
  data: Any  # this process's batch iterator; its (grain) state is checkpointed
  counts: schedules.StepCounts
  saved_config: ml_collections.ConfigDict  # saved with every checkpoint; a restore checks it
  rng: jax.Array  # the step folds in the step number
  warm_start_keys: tuple[str, ...] | None = ("params", "target_params")
  # state -> (state, scalars to log), every eval_every_steps and after the last step.
  evaluate: Callable[[Any], tuple[Any, dict]] | None = None
  eval_every_steps: int = 0


def run(task: Task, config: ml_collections.ConfigDict, workdir: str, *,
        restore_only: bool = False) -> tuple[Any, dict, dict]:
  """Resumes `task` from workdir's newest checkpoint (or starts it) and trains it to the end.

  Returns (state, summary of the last logged interval with 'step' and 'preempted', the last
  evaluation's scalars). `restore_only`: the restored state, untrained (a ConfigError when
  there is no checkpoint).
  """
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)  # a local path or gs://... alike
  checkpointer = checkpoint_lib.Checkpointer(workdir, config.keep_checkpoints)
  writer = bar = preemption = None
  summary, evaluation, preempted = {}, {}, False
  try:
    restored = checkpointer.restore_latest(task.trainer.abstract_sharded_state(), task.data,
                                           task.saved_config,
                                           warm_start_keys=task.warm_start_keys)
    if restored is not None:
      logging.info("resuming from %s step %d", checkpointer.directory, restored[0])
      state = restored[1]
    elif restore_only:
      raise errors.ConfigError(f"no {task.name} checkpoint in {workdir}")
    else:
      state = task.init_state()
    if restore_only:
      return state, {}, {}
    train_step = memory.compile_step_that_fits(  # compiled once; too big: one line, exit 2
        task.trainer.train_step, (state, task.abstract_batch, task.rng),
        batch_size=config.batch_size, what=task.name)
    start, total = int(jax.device_get(state.step)), task.counts.train_steps
    writer = metrics_lib.MetricsWriter(workdir)
    bar = _progress_bar(config, task.name, total, start)
    preemption = _Preemption()
    interval, previous = [], None
    data_wait, tick, tick_step = 0.0, time.perf_counter(), start
    for step in range(start, total):
      t0 = time.perf_counter()
      host_batch = next(task.data)
      data_wait += time.perf_counter() - t0
      state, metrics = train_step(state, sharding.global_batch(host_batch,
                                                               task.trainer.batch_sharding),
                                  task.rng)
      done = step + 1
      # Check the previous step while this one runs: one step of lag keeps dispatch async.
      if previous is not None:
        _check_finite(jax.device_get(previous), done - 1, checkpointer)
      previous = metrics
      interval.append(metrics)
      preempted = preemption.reached(done)
      record = {}
      if done % config.log_every_steps == 0 or done == total or preempted:
        host = jax.device_get(interval)
        for offset, m in enumerate(host):
          _check_finite(m, done - len(host) + 1 + offset, checkpointer)
        summary = _summarise(host)
        summary.update(
            samples_per_second=(done - tick_step) * config.batch_size / (
                time.perf_counter() - tick),
            data_wait_seconds=data_wait, epoch=done / max(task.counts.steps_per_epoch, 1))
        record.update(summary)
        if bar is not None:
          bar.set_postfix(loss=f"{summary['loss']:.4f}",
                          samples_s=f"{summary['samples_per_second']:.1f}")
        interval, data_wait, tick, tick_step = [], 0.0, time.perf_counter(), done
      if task.evaluate is not None and (done % task.eval_every_steps == 0 or done == total):
        state, evaluation = task.evaluate(state)
        record.update(evaluation)
      if record:
        writer.write(done, record)  # process 0 only
      if done % config.checkpoint_every_steps == 0 or done == total or preempted:
        _check_finite(jax.device_get(metrics), done, checkpointer)
        checkpointer.save(done, state, task.data, task.saved_config)
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
    for closing in (preemption, writer, bar):
      if closing is not None:
        closing.close()
    _close_checkpointer(checkpointer)
  summary = dict(summary, step=int(jax.device_get(state.step)), preempted=preempted)
  if preemption.signal is not None:
    summary["signal"] = int(preemption.signal)
  return state, summary, evaluation


def _train_data(config):
  """This process's training iterator (its state is checkpointed) and the source's size."""
  source = sources.make_source(config.data, "train")
  size = len(source) if config.data.num_images <= 0 else min(config.data.num_images, len(source))
  return iter(pipeline.make_dataset(config, "train", source=source)), size


def train(config: ml_collections.ConfigDict, workdir: str) -> TrainResult:
  """Pre-trains (resuming from workdir when it holds a checkpoint); returns the final state."""
  warm_start.check_warm_start_path(config.init_from)
  mesh = sharding.make_mesh(config.mesh.fsdp)
  model = cim.build_model(config.model, config.data)
  sharding.process_batch_size(config.batch_size)  # clear error when the batch does not split
  data, num_examples = _train_data(config)
  counts = schedules.step_counts(config, num_examples)
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  trainer = step_lib.build_trainer(config, model, mesh, counts)

  def init_state():
    state = trainer.init_state(init_rng, state_lib.dummy_batch(config.data))
    if config.init_from:
      loaded = warm_start.load_warm_start(config.init_from, model, sharding.replicated(mesh))
      state = warm_start.apply_warm_start(state, loaded, config.init_from)
    return state

  task = Task("pre-training", trainer, init_state,
              memory.abstract_batch(config, trainer.batch_sharding), data, counts, config,
              train_rng)
  state, summary, _ = run(task, config, workdir)
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
