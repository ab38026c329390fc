"""Supervised fine-tuning (docs/METHOD.md §5) with best / last top-1, checkpoints and resume.

python -m cim_jax.evaluate.finetune --config=configs/finetune_vit_base.py --workdir=DIR \
    --config.init_from=PRETRAIN_WORKDIR_OR_PTH [--config.data.source=imagefolder|tfds ...]

A restart with the same --workdir resumes exactly (state, best top-1 and data iterator).
`--eval_only=true` evaluates the work dir's latest checkpoint.
"""

import json
import logging
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from cim_jax import cli
from cim_jax import sharding
from cim_jax.data import augment
from cim_jax.data import labelled
from cim_jax.data import sources
from cim_jax.errors import ConfigError
from cim_jax.evaluate import finetune_lib
from cim_jax.evaluate import knn
from cim_jax.train import checkpoint as checkpoint_lib
from cim_jax.train import memory
from cim_jax.train import metrics as metrics_lib
from cim_jax.train import schedules
from cim_jax.train import warm_start


def labelled_sources(config) -> tuple[labelled.LabelledRecords, labelled.LabelledRecords, int]:
  """(train, eval, num_classes) of `config.data`; checks the head's class count.

  All three are `labelled.LabelledRecords` (the kNN / linear-probe sources): 'embedded' over
  in-memory arrays, 'imagefolder' and 'tfds' reading one image per record.
  """
  d = config.data
  if d.source == "embedded":
    names = ("train", "test")
    splits = [labelled.as_labelled(sources.embedded_labelled(d.labelled_source, name,
                                                           image_size=d.image_size))
              for name in names]
    found = max(split.num_classes for split in splits)
    train, test = (labelled.LabelledRecords(split, found, description=f"{d.labelled_source}/{name}")
                   for split, name in zip(splits, names))
  elif d.source in ("imagefolder", "tfds"):
    if d.source == "imagefolder":
      train, test = labelled.imagefolder_splits(d.root, d.eval_root,
                                              ("config.data.root", "config.data.eval_root"))
    else:
      train, test = labelled.tfds_splits(d.tfds_name, d.tfds_split, d.tfds_eval_split,
                                       d.tfds_data_dir, d.tfds_image_key, d.tfds_label_key)
    found = max(train.num_classes, test.num_classes)
    if not found and not d.num_classes:  # a plain integer label: the count is not declared
      raise ConfigError(f"the label feature {d.tfds_label_key!r} declares no class count; set "
                       "config.data.num_classes")
    found = found or d.num_classes
  else:
    raise ConfigError(f"config.data.source={d.source!r}: fine-tuning reads 'embedded', "
                     "'imagefolder' or 'tfds'")
  if d.num_classes and d.num_classes != found:
    raise ConfigError(f"the labelled data has {found} classes but the head has "
                     f"config.data.num_classes={d.num_classes}")
  return train, test, d.num_classes or found


class _TrainMap(grain.transforms.RandomMap):
  def __init__(self, augmentation: augment.TrainAugment):
    self.augmentation = augmentation

  def random_map(self, record, rng: np.random.Generator):
    return {"image": self.augmentation(record["image"], rng), "label": record["label"]}


def train_dataset(config, source: labelled.LabelledRecords) -> grain.IterDataset:
  """Shuffled, repeated, augmented batches of this process's share of the global batch."""
  d = config.data
  augmentation = augment.TrainAugment(
      size=d.image_size, scale=tuple(d.crop_scale), ratio=tuple(d.crop_ratio),
      flip_prob=d.flip_prob, randaug_num_ops=d.randaug_num_ops,
      randaug_magnitude=d.randaug_magnitude, randaug_magnitude_std=d.randaug_magnitude_std)
  ds = grain.MapDataset.source(source)[jax.process_index()::jax.process_count()]
  ds = ds.seed(config.seed).shuffle().repeat().random_map(_TrainMap(augmentation))
  ds = ds.batch(config.batch_size // jax.process_count(), drop_remainder=True)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
  if d.num_workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=d.num_workers, per_worker_buffer_size=d.worker_buffer_size))
  return ds


def evaluate(eval_fn, params, source: labelled.LabelledRecords, config) -> dict[str, float]:
  """Top-1 / top-5 (percent) over the whole evaluation set, centre-cropped."""
  d = config.data
  ds = labelled.eval_batches(source, d.image_size, d.eval_batch_size, d.eval_crop_pct,
                           read_threads=max(1, d.num_workers))
  num_shards = jax.local_device_count()
  scores, labels = [], []
  for batch in ds:
    images, valid = batch["image"], len(batch["label"])
    pad = -valid % num_shards  # the data axis needs a multiple of the device count
    if pad:
      images = np.concatenate([images, np.repeat(images[-1:], pad, axis=0)])
    scores.append(np.asarray(eval_fn(params, images))[:valid])
    labels.append(batch["label"])
  return knn.topk_accuracy(np.concatenate(scores), np.concatenate(labels))


def _step_counts(config, num_train: int) -> tuple[int, int, int]:
  """(steps_per_epoch, total steps, warm-up steps)."""
  per_epoch = config.steps_per_epoch if config.steps_per_epoch > 0 else max(
      1, num_train // config.batch_size)
  total = config.num_train_steps if config.num_train_steps > 0 else int(
      round(config.num_epochs * per_epoch))
  warmup = config.optim.warmup_steps if config.optim.warmup_steps >= 0 else int(
      round(config.optim.warmup_epochs * per_epoch))
  return per_epoch, total, warmup


def check_checkpoint_matches(workdir: str, config, num_classes: int) -> None:
  """Before restoring: a work dir saved for another variant or head fails with one line."""
  directory = epath.Path(workdir) / checkpoint_lib.CHECKPOINT_DIR  # local or gs://... alike
  steps = sorted((int(p.name) for p in directory.iterdir() if p.name.isdigit()),
                 reverse=True) if directory.is_dir() else []
  for step in steps:
    path = directory / str(step) / "config" / "metadata"
    if path.exists():
      saved = json.loads(path.read_text(encoding="utf-8"))
      if "num_classes" not in saved:  # restoring would fail and move its checkpoints aside
        raise ConfigError(f"{workdir} holds a pre-training run, not a fine-tuning one; pass it "
                         "as --config.init_from and fine-tune into a new --workdir")
      if saved["model"]["variant"] != config.model.variant:
        raise ConfigError(f"{workdir} holds a fine-tuned {saved['model']['variant']} but "
                         f"model.variant={config.model.variant!r}")
      if saved.get("num_classes", num_classes) != num_classes:
        raise ConfigError(f"{workdir} holds a head of {saved['num_classes']} classes but the "
                         f"labelled data has {num_classes}")
      return


class Finetuner:
  """Model, optimizer, jitted steps and shardings of one fine-tuning config."""

  def __init__(self, config, num_classes: int, num_train: int):
    self.config, self.num_classes = config, num_classes
    self.model = finetune_lib.build_classifier(config, num_classes)
    self.steps_per_epoch, self.total_steps, warmup = _step_counts(config, num_train)
    peak = config.optim.base_lr * config.batch_size / 256.0
    # Per-step warm-up + cosine to min_lr, the release's per-iteration schedule (MAE's
    # lr_sched at fractional epochs; no accumulation here, so step k is iteration k).
    self.lr_schedule = schedules.warmup_cosine(peak, config.optim.min_lr, warmup,
                                               self.total_steps)
    mesh = sharding.local_data_mesh()
    self.batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
    self.replicated = NamedSharding(mesh, PartitionSpec())
    size = config.data.image_size
    self._dummy = jnp.zeros((1, size, size, 3), jnp.float32)
    abstract_params = jax.eval_shape(self._init_params, jax.random.key(0))
    self.tx = finetune_lib.build_optimizer(config, abstract_params, self.lr_schedule)
    self.train_step = jax.jit(
        finetune_lib.make_train_step(self.model, self.tx, config, num_classes),
        in_shardings=(self.replicated, self.batch_sharding, self.replicated),
        out_shardings=(self.replicated, self.replicated), donate_argnums=0)
    self.eval_fn = jax.jit(finetune_lib.make_eval_step(self.model),
                           in_shardings=(self.replicated, self.batch_sharding),
                           out_shardings=self.batch_sharding)

  def _init_params(self, rng):
    return self.model.init(rng, self._dummy, train=False)["params"]

  def init_state(self, rng, encoder_params=None, where: str = "") -> finetune_lib.FinetuneState:
    params = jax.jit(self._init_params)(rng)
    if encoder_params is not None:
      params = finetune_lib.merge_pretrained(params, encoder_params, where)
    state = finetune_lib.FinetuneState(step=jnp.zeros((), jnp.int32), params=params,
                                       opt_state=self.tx.init(params),
                                       best_top1=jnp.zeros((), jnp.float32))
    return jax.device_put(state, self.replicated)

  def abstract_state(self):
    shapes = jax.eval_shape(lambda: self.init_state(jax.random.key(0)))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.replicated),
                        shapes)


def finetune(config, workdir: str, *, eval_only: bool = False) -> dict[str, Any]:
  """Fine-tunes (resuming from workdir) and returns {'best_top1', 'last_top1', ...}."""
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)  # a local path or gs://... alike
  train_source, eval_source, num_classes = labelled_sources(config)
  check_checkpoint_matches(workdir, config, num_classes)
  runner = Finetuner(config, num_classes, len(train_source))
  data_iterator = iter(train_dataset(config, train_source))
  saved_config = config.copy_and_resolve_references()
  with saved_config.unlocked():
    saved_config.num_classes = num_classes  # lets a restore check the head's class count
  checkpointer = checkpoint_lib.Checkpointer(workdir, config.keep_checkpoints)
  try:  # an incompatible checkpoint or a bad init_from: close orbax's manager before leaving
    restored = checkpointer.restore_latest(runner.abstract_state(), data_iterator, saved_config,
                                           warm_start_keys=None)
    if restored is not None:
      state = restored[1]
      logging.info("fine-tuning resumes from step %d", restored[0])
    elif eval_only:
      raise ConfigError(f"--eval_only: no fine-tuning checkpoint in {workdir}")
    else:
      encoder_params = None
      if config.init_from:
        encoder_params = warm_start.load_encoder_params(config, config.init_from)
      state = runner.init_state(jax.random.key(config.seed), encoder_params, config.init_from)
  except BaseException:
    checkpointer.close()
    raise
  if eval_only:
    checkpointer.close()
    return {"step": int(state.step), **evaluate(runner.eval_fn, state.params, eval_source, config)}

  rng = jax.random.key(config.seed + 1)
  eval_every = config.eval_every_steps if config.eval_every_steps > 0 else runner.steps_per_epoch
  result: dict[str, Any] = {}
  writer = metrics_lib.MetricsWriter(workdir, prefix="finetune")
  train_step = None
  try:
    steps = range(int(state.step), runner.total_steps)
    for step in metrics_lib.progress(steps, enabled=config.progress_bar, desc="fine-tuning"):
      host_batch = next(data_iterator)
      batch = {k: jax.make_array_from_process_local_data(runner.batch_sharding, host_batch[k])
               for k in ("image", "label")}
      if train_step is None:  # compiled once, for the real batch; too big: one line, exit 2
        train_step = memory.compile_step_that_fits(
            runner.train_step, (state, batch, rng), batch_size=config.batch_size,
            what="fine-tuning")
      state, metrics = train_step(state, batch, rng)
      done = step + 1
      record = {}
      if done % config.log_every_steps == 0 or done == runner.total_steps:
        record.update({k: float(v) for k, v in jax.device_get(metrics).items()},
                      lr=float(runner.lr_schedule(step)))
      if done % eval_every == 0 or done == runner.total_steps:
        accuracy = evaluate(runner.eval_fn, state.params, eval_source, config)
        state = state.replace(best_top1=jnp.maximum(state.best_top1, accuracy["top1"]))
        record.update({f"eval_{k}": v for k, v in accuracy.items()},
                      best_top1=float(state.best_top1))
        result = {"last_top1": accuracy["top1"], "best_top1": float(state.best_top1),
                  **{f"last_{k}": v for k, v in accuracy.items() if k != "top1"}}
      if record:
        writer.write(done, record)  # process 0 only
      if done % config.checkpoint_every_steps == 0 or done == runner.total_steps:
        checkpointer.save(done, state, data_iterator, saved_config)
  finally:
    checkpointer.close()
    writer.close()
  result["step"] = int(state.step)
  result.setdefault("best_top1", float(state.best_top1))
  return result


def main(config, workdir: str = "", eval_only: str = "false"):
  """Entry point: fine-tune into --workdir (or evaluate its checkpoint with --eval_only=true)."""
  if not workdir:
    raise ConfigError("--workdir=DIR is required (checkpoints and metrics go there)")
  cli.configure_logging()
  result = finetune(config, workdir, eval_only=eval_only.lower() in ("1", "true", "yes"))
  print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                 for k, v in result.items()))
  return result


if __name__ == "__main__":
  cli.run_tool(main, prog="cim_jax.evaluate.finetune",
             default_config="configs/finetune_vit_tiny.py",
             flags={"workdir": "", "eval_only": "false"})
