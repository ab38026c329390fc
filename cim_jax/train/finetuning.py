"""Supervised fine-tuning (docs/METHOD.md §5) on the shared loop: classifier, labelled data,
mixup / cutmix / random erasing, the step, top-1 evaluation with the sharded params."""

import json
from typing import Any

import flax
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from cim_jax import sharding
from cim_jax.data import augment
from cim_jax.data import labelled
from cim_jax.data import pipeline
from cim_jax.errors import ConfigError
from cim_jax.models import cim
from cim_jax.models import vit
from cim_jax.train import checkpoint as checkpoint_lib
from cim_jax.train import loop
from cim_jax.train import optimizer as optimizer_lib
from cim_jax.train import schedules
from cim_jax.train import step as step_lib
from cim_jax.train import warm_start


@flax.struct.dataclass
class FinetuneState:
  """Everything a resumed fine-tuning run needs besides the data iterator."""
  step: jax.Array
  params: Any
  opt_state: Any
  best_top1: jax.Array  # best evaluation top-1 so far (kept across restarts)


def build_classifier(config, num_classes: int):
  """ViT with mean pooling + fc_norm + linear head (drop path: config.model.drop_path_rate)."""
  return vit.encoder_from_config(config.model, pool="gap", num_classes=num_classes)


def labelled_sources(config) -> tuple[labelled.LabelledRecords, labelled.LabelledRecords, int]:
  """(train, eval, num_classes) of `config.data.source`; checks the head's class count."""
  d = config.data
  train, test = labelled.splits(d)
  if isinstance(train, labelled.Labelled):  # in-memory sets, read record by record as the others
    train, test = (labelled.LabelledRecords(split, split.num_classes,
                                            description=f"{d.source}/{name}")
                   for split, name in ((train, "train"), (test, "test")))
  found = max(train.num_classes, test.num_classes)
  if not found and not d.num_classes:  # a plain integer label: the count is not declared
    raise ConfigError(f"the label feature {d.tfds_label_key!r} declares no class count; set "
                      "config.data.num_classes")
  if d.num_classes and found and d.num_classes != found:
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
  ds = ds.batch(sharding.process_batch_size(config.batch_size), drop_remainder=True)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
  return pipeline.in_workers(ds, d)


def evaluate(eval_step, params, source: labelled.LabelledRecords, config,
             batch_sharding) -> dict[str, float]:
  """Top-1 / top-5 (percent) over the whole evaluation set, centre-cropped.

  Every process reads the same batches (padded to one shape) and feeds its devices' rows: the
  step runs on the training mesh, with the params as they are sharded for training.
  """
  d, devices = config.data, jax.device_count()
  size = -(-d.eval_batch_size // devices) * devices  # the batch axis spans every device
  scores, labels = [], []
  for batch in labelled.eval_batches(source, d.image_size, size, d.eval_crop_pct,
                                     read_threads=max(1, d.num_workers)):
    padded = sharding.pad_rows(batch["image"], size)
    images = jax.make_array_from_callback(padded.shape, batch_sharding, lambda i: padded[i])
    scores.append(sharding.to_host(eval_step(params, images))[:len(batch["label"])])
    labels.append(batch["label"])
  return labelled.topk_accuracy(np.concatenate(scores), np.concatenate(labels))


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


# ----------------------------------------------------------------------------------------------
# Mixup / cutmix / random erasing (timm semantics, batch-wise, on device).


def smooth_one_hot(labels, num_classes: int, smoothing: float):
  """timm's label smoothing: off-value smoothing / K, on-value 1 - smoothing + off-value."""
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def mixup_cutmix(rng, images, labels, num_classes: int, m) -> tuple[jax.Array, jax.Array]:
  """timm Mixup (mode 'batch'): with prob m.prob, cutmix (switch_prob) or mixup; mixes with the
  flipped batch; cutmix's lambda is corrected to the pasted box's area. Returns soft targets."""
  targets = smooth_one_hot(labels, num_classes, m.label_smoothing)
  if m.prob <= 0 or (m.mixup_alpha <= 0 and m.cutmix_alpha <= 0):
    return images, targets
  apply_rng, switch_rng, mix_rng, cut_rng, box_rng = jax.random.split(rng, 5)
  use_cutmix = (m.cutmix_alpha > 0) & (
      (m.mixup_alpha <= 0) | (jax.random.uniform(switch_rng) < m.switch_prob))
  lam_mix = jax.random.beta(mix_rng, max(m.mixup_alpha, 1e-6), max(m.mixup_alpha, 1e-6))
  lam_cut = jax.random.beta(cut_rng, max(m.cutmix_alpha, 1e-6), max(m.cutmix_alpha, 1e-6))
  height, width = images.shape[1:3]
  # timm rand_bbox: a box of sides sqrt(1 - lam) * (H, W) centred uniformly, clipped.
  cut = jnp.sqrt(1.0 - lam_cut)
  cy, cx = jax.random.randint(box_rng, (2,), 0, jnp.array([height, width]))
  half_h, half_w = (cut * height / 2).astype(jnp.int32), (cut * width / 2).astype(jnp.int32)
  y0, y1 = jnp.clip(cy - half_h, 0, height), jnp.clip(cy + half_h, 0, height)
  x0, x1 = jnp.clip(cx - half_w, 0, width), jnp.clip(cx + half_w, 0, width)
  rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
  lam_box = 1.0 - box.mean()
  flipped = images[::-1]
  cutmixed = jnp.where(box[None, :, :, None], flipped, images)
  mixed = lam_mix * images + (1.0 - lam_mix) * flipped
  apply = jax.random.uniform(apply_rng) < m.prob
  lam = jnp.where(apply, jnp.where(use_cutmix, lam_box, lam_mix), 1.0)
  out = jnp.where(apply, jnp.where(use_cutmix, cutmixed, mixed), images)
  return out, lam * targets + (1.0 - lam) * targets[::-1]


def random_erasing(rng, images, prob: float, scale=(0.02, 1 / 3), log_ratio=(np.log(0.3),
                   np.log(1 / 0.3))):
  """timm RandomErasing(mode='pixel', count 1): a box of per-pixel N(0, 1) noise, probability
  `prob` per image, on normalised images (up to 10 tries for a box that fits, as timm)."""
  if prob <= 0:
    return images
  batch, height, width, _ = images.shape
  keys = jax.random.split(rng, 5)
  tries = 10
  area = height * width * jax.random.uniform(keys[0], (batch, tries), minval=scale[0],
                                             maxval=scale[1])
  aspect = jnp.exp(jax.random.uniform(keys[1], (batch, tries), minval=log_ratio[0],
                                      maxval=log_ratio[1]))
  h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
  w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
  fits = (h < height) & (w < width)
  first = jnp.argmax(fits, axis=1)  # the first try that fits; none fits -> no erasing
  pick = lambda x: jnp.take_along_axis(x, first[:, None], axis=1)[:, 0]
  h, w, found = pick(h), pick(w), fits.any(axis=1)
  top = (jax.random.uniform(keys[2], (batch,)) * (height - h + 1)).astype(jnp.int32)
  left = (jax.random.uniform(keys[3], (batch,)) * (width - w + 1)).astype(jnp.int32)
  erase = found & (jax.random.uniform(keys[4], (batch,)) < prob)
  rows, cols = jnp.arange(height)[None, :, None], jnp.arange(width)[None, None, :]
  box = ((rows >= top[:, None, None]) & (rows < (top + h)[:, None, None]) &
         (cols >= left[:, None, None]) & (cols < (left + w)[:, None, None]) &
         erase[:, None, None])
  noise = jax.random.normal(jax.random.fold_in(rng, 1), images.shape, images.dtype)
  return jnp.where(box[..., None], noise, images)


# ----------------------------------------------------------------------------------------------
# Steps, trainer, run.


def make_train_step(model, tx, lr_schedule, frozen, config, num_classes: int):
  """Pure (state, batch{'image' uint8, 'label'}, rng) -> (state, metrics)."""
  m, accum_steps = config.mixup, config.optim.accum_steps

  def train_step(state: FinetuneState, batch, rng):
    rng = jax.random.fold_in(rng, state.step)  # the same per-step randomness after a resume
    erase_rng, mix_rng, drop_rng = jax.random.split(rng, 3)
    images = cim.normalize_images(batch["image"])
    images = random_erasing(erase_rng, images, config.data.random_erase_prob)
    images, targets = mixup_cutmix(mix_rng, images, batch["label"], num_classes, m)

    def loss_fn(params):
      logits, _ = model.apply({"params": params}, images, train=True, rngs={"dropout": drop_rng})
      loss = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()
      return loss, logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optimizer_lib.trainable_norm(grads, frozen)
    metrics = dict(loss=loss, grad_norm=grad_norm, lr=lr_schedule(state.step // accum_steps),
                   train_top1=100.0 * (logits.argmax(-1) == batch["label"]).mean(),
                   finite=jnp.isfinite(loss) & jnp.isfinite(grad_norm))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(model):
  """(params, images uint8) -> logits, eval mode (no drop path)."""
  def eval_step(params, images):
    logits, _ = model.apply({"params": params}, cim.normalize_images(images), train=False)
    return logits.astype(jnp.float32)
  return eval_step


def build_trainer(config, num_classes: int, mesh, counts) -> step_lib.Trainer:
  """The classifier, AdamW with layer-wise lr decay, the state sharded over the mesh (fsdp
  included) and the jitted train and evaluation steps."""
  model = build_classifier(config, num_classes)
  size = config.data.image_size
  init_params = lambda rng: model.init(rng, jnp.zeros((1, size, size, 3)), train=False)["params"]
  tx, lr_schedule, frozen = optimizer_lib.build_optimizer(
      config, jax.eval_shape(init_params, jax.random.PRNGKey(0)), counts,
      layer_decay=float(config.optim.layer_decay))

  def init_fn(rng):
    params = init_params(rng)
    return FinetuneState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                         best_top1=jnp.zeros((), jnp.float32))

  trainer = step_lib.sharded_trainer(
      mesh, init_fn, (), make_train_step(model, tx, lr_schedule, frozen, config, num_classes),
      model=model, tx=tx, lr_schedule=lr_schedule)
  trainer.eval_step = jax.jit(make_eval_step(model),
                              in_shardings=(trainer.state_shardings.params,
                                            trainer.batch_sharding),
                              out_shardings=trainer.batch_sharding)
  return trainer


def abstract_batch(config, batch_sharding) -> dict:
  """The fine-tuning step's global batch as shapes, dtypes and its sharding (no data)."""
  size = config.data.image_size
  return {"image": jax.ShapeDtypeStruct((config.batch_size, size, size, 3), np.uint8,
                                        sharding=batch_sharding),
          "label": jax.ShapeDtypeStruct((config.batch_size,), np.int32, sharding=batch_sharding)}


def finetune(config, workdir: str, *, eval_only: bool = False) -> dict[str, Any]:
  """Fine-tunes (resuming from workdir) and returns {'last_top1', 'best_top1', ..., 'step'};
  `eval_only`: {'step', 'top1', ...} of the work dir's latest checkpoint."""
  warm_start.check_warm_start_path(config.init_from)
  train_source, eval_source, num_classes = labelled_sources(config)
  check_checkpoint_matches(workdir, config, num_classes)
  mesh = sharding.make_mesh(config.mesh.fsdp)
  counts = schedules.step_counts(config, len(train_source))
  trainer = build_trainer(config, num_classes, mesh, counts)
  saved_config = config.copy_and_resolve_references()
  with saved_config.unlocked():
    saved_config.num_classes = num_classes  # lets a restore check the head's class count

  def init_state():
    state = trainer.init_state(jax.random.key(config.seed))
    if not config.init_from:
      return state
    # Host copies: each process places its shards of every leaf (fsdp across hosts alike).
    encoder = jax.device_get(warm_start.load_encoder_params(config, config.init_from))
    return state.replace(params=warm_start.place(state.params, encoder, config.init_from,
                                                 "encoder", keep=("fc_norm", "head")))

  def evaluate_state(state):
    accuracy = evaluate(trainer.eval_step, state.params, eval_source, config,
                        trainer.batch_sharding)
    best = max(float(state.best_top1), accuracy["top1"])
    state = state.replace(best_top1=jax.device_put(np.float32(best), state.best_top1.sharding))
    return state, {"eval_top1": accuracy.pop("top1"), "best_top1": best,
                   **{f"eval_{k}": v for k, v in accuracy.items()}}

  task = loop.Task(
      "fine-tuning", trainer, init_state, abstract_batch(config, trainer.batch_sharding), iter(train_dataset(config, train_source)),
      counts, saved_config, jax.random.key(config.seed + 1), warm_start_keys=None,
      evaluate=evaluate_state,
      eval_every_steps=config.eval_every_steps if config.eval_every_steps > 0
      else counts.steps_per_epoch)
  state, summary, evaluation = loop.run(task, config, workdir, restore_only=eval_only)
  if eval_only:
    return {"step": int(state.step), **evaluate(trainer.eval_step, state.params, eval_source,
                                                config, trainer.batch_sharding)}
  result = {k.replace("eval_", "last_"): v for k, v in evaluation.items()}
  result.update(best_top1=float(state.best_top1), step=summary["step"])
  return dict(result, **{k: summary[k] for k in ("signal",) if k in summary})
