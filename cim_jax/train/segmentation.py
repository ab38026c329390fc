"""Semantic segmentation transfer (docs/METHOD.md section 9) on the shared loop: the UperNet
segmenter, its state with BatchNorm statistics, the step, sliding-window mIoU evaluation."""

import functools
import logging
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from cim_jax import sharding
from cim_jax.data import segmentation as data_lib
from cim_jax.models import cim
from cim_jax.models import upernet
from cim_jax.models import vit
from cim_jax.train import loop
from cim_jax.train import optimizer as optimizer_lib
from cim_jax.train import schedules
from cim_jax.train import segmentation_eval
from cim_jax.train import step as step_lib
from cim_jax.train import warm_start

EXAMPLES_DIR = "segmentation_examples"  # PNGs of validation images, one per evaluation


@flax.struct.dataclass
class SegmentationState:
  """Everything a resumed segmentation run needs besides the data iterator."""
  step: jax.Array
  params: Any  # {'backbone', pyramid, 'decode_head', 'auxiliary_head'}
  batch_stats: Any  # BatchNorm running statistics of the pyramid and heads
  opt_state: Any
  best_miou: jax.Array  # best evaluation mIoU so far (kept across restarts)


def make_train_step(model, tx, lr_schedule, frozen, config):
  """Pure (state, batch{'image' uint8, 'label' uint8}, rng) -> (state, metrics)."""
  s = config.segmentation

  def train_step(state: SegmentationState, batch, rng):
    rng = jax.random.fold_in(rng, state.step)  # the same per-step randomness after a resume
    images = cim.normalize_images(batch["image"])
    labels = batch["label"].astype(jnp.int32)

    def loss_fn(params):
      (logits, intermediates), updates = model.apply(
          {"params": params, "batch_stats": state.batch_stats}, images, train=True,
          rngs={"dropout": rng}, mutable=["batch_stats"])
      loss, parts = upernet.segmentation_loss(
          logits, intermediates["aux_logits"], labels, aux_weight=s.aux_weight,
          ignore_index=data_lib.IGNORE_INDEX)
      return loss, (parts, updates["batch_stats"])

    (loss, (parts, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optimizer_lib.trainable_norm(grads, frozen)
    metrics = dict(loss=loss, **parts, grad_norm=grad_norm,
                   lr=lr_schedule(state.step // config.optim.accum_steps),
                   finite=jnp.isfinite(loss) & jnp.isfinite(grad_norm))
    return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                         opt_state=opt_state), metrics

  return train_step


def build_trainer(config, num_classes: int, mesh, counts) -> step_lib.Trainer:
  """The segmenter, AdamW with layer-wise lr decay and the poly schedule, the state sharded over
  the mesh, the jitted train step and the evaluation forward (uint8 windows -> logits)."""
  model = upernet.build_segmenter(config.model, config.segmentation, num_classes)
  size = config.data.crop_size
  init_variables = lambda rng: model.init(rng, jnp.zeros((1, size, size, 3)), train=False)
  abstract = jax.eval_shape(init_variables, jax.random.key(0))
  tx, lr_schedule, frozen = optimizer_lib.build_optimizer(
      config, abstract["params"], counts, layer_decay=float(config.optim.layer_decay))

  def init_fn(rng):
    variables = init_variables(rng)
    return SegmentationState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                             batch_stats=variables["batch_stats"],
                             opt_state=tx.init(variables["params"]),
                             best_miou=jnp.zeros((), jnp.float32))

  trainer = step_lib.sharded_trainer(
      mesh, init_fn, (), make_train_step(model, tx, lr_schedule, frozen, config),
      model=model, tx=tx, lr_schedule=lr_schedule)

  def forward(params, batch_stats, images):
    logits, _ = model.apply({"params": params, "batch_stats": batch_stats},
                            cim.normalize_images(images), train=False)
    return logits

  shardings = trainer.state_shardings
  trainer.eval_step = jax.jit(forward, in_shardings=(shardings.params, shardings.batch_stats,
                                                     trainer.batch_sharding),
                              out_shardings=trainer.batch_sharding)
  return trainer


def abstract_batch(config, batch_sharding) -> dict:
  """The segmentation step's global batch as shapes, dtypes and its sharding (no data)."""
  size = config.data.crop_size
  return {"image": jax.ShapeDtypeStruct((config.batch_size, size, size, 3), np.uint8,
                                        sharding=batch_sharding),
          "label": jax.ShapeDtypeStruct((config.batch_size, size, size), np.uint8,
                                        sharding=batch_sharding)}


def load_backbone(config, path: str):
  """The pre-trained encoder's parameters for the backbone: a pre-training work dir, an authors'
  checkpoint, our .msgpack or a timm ViT state dict (final norm and classifier not needed)."""
  return jax.device_get(warm_start.load_encoder_params(config, path))


def evaluate(trainer, state, records, config, workdir: str, patch_size: int) -> dict:
  """mIoU / aAcc / mAcc of `state` on `records` (sliding windows, every process and device);
  logs the per-class table and writes a PNG of the first validation images (process 0)."""
  forward = functools.partial(trainer.eval_step, state.params, state.batch_stats)
  scores, examples = segmentation_eval.evaluate(
      forward, records, config, trainer.batch_sharding, num_examples=config.eval_examples,
      patch_multiple=patch_size)
  step = int(jax.device_get(state.step))
  logging.info("segmentation at step %d: mIoU %.2f aAcc %.2f mAcc %.2f\n%s", step,
               scores["mIoU"], scores["aAcc"], scores["mAcc"],
               segmentation_eval.class_table(scores, records.class_names))
  if examples and jax.process_index() == 0:
    directory = epath.Path(workdir) / EXAMPLES_DIR
    directory.mkdir(parents=True, exist_ok=True)
    segmentation_eval.save_examples(directory / f"step_{step}.png", examples,
                                    records.num_classes)
  return {k: float(scores[k]) for k in ("mIoU", "aAcc", "mAcc")}


def segment(config, workdir: str, *, eval_only: bool = False) -> dict[str, Any]:
  """Trains the segmenter (resuming from workdir) and returns {'last_mIoU', 'best_mIoU', ...,
  'step'}; `eval_only`: {'step', 'mIoU', ...} of the work dir's latest checkpoint."""
  warm_start.check_warm_start_path(config.init_from)
  train_records, eval_records = data_lib.splits(config.data)
  num_classes = eval_records.num_classes
  mesh = sharding.make_mesh(config.mesh.fsdp)
  counts = schedules.step_counts(config, len(train_records))
  trainer = build_trainer(config, num_classes, mesh, counts)
  patch_size = vit.decode_variant(config.model.variant)["patch_size"]

  def init_state():
    state = trainer.init_state(jax.random.key(config.seed))
    if not config.init_from:
      return state
    backbone = warm_start.place(state.params["backbone"], load_backbone(config, config.init_from),
                                config.init_from, "backbone")
    return state.replace(params={**state.params, "backbone": backbone})

  def evaluate_state(state):
    scores = evaluate(trainer, state, eval_records, config, workdir, patch_size)
    best = max(float(state.best_miou), scores["mIoU"])
    state = state.replace(best_miou=jax.device_put(np.float32(best), state.best_miou.sharding))
    return state, {**{f"eval_{k}": v for k, v in scores.items()}, "best_mIoU": best}

  task = loop.Task(
      "segmentation", trainer, init_state, abstract_batch(config, trainer.batch_sharding),
      iter(data_lib.train_dataset(config, train_records)), counts, config,
      jax.random.key(config.seed + 1), warm_start_keys=None, evaluate=evaluate_state,
      eval_every_steps=config.eval_every_steps if config.eval_every_steps > 0
      else counts.train_steps)
  state, summary, evaluation = loop.run(task, config, workdir, restore_only=eval_only)
  if eval_only:
    return {"step": int(state.step), **evaluate(trainer, state, eval_records, config, workdir,
                                                patch_size)}
  result = {k.replace("eval_", "last_"): v for k, v in evaluation.items()}
  result.update(best_mIoU=float(state.best_miou), step=summary["step"])
  return dict(result, **{k: summary[k] for k in ("signal",) if k in summary})
