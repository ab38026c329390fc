"""Linear probe: a BatchNorm-free linear classifier on frozen encoder features.

python -m cim_jax.evaluate.linear_probe --config=configs/cim_eval.py:B/16 \
    --config.init_from=WORKDIR_OR_PTH [--config.data.source=imagefolder|tfds ...]

Features are extracted once (the cls token by default), standardised with the training set's mean
and std (a fixed affine map, so the result does not depend on batch statistics), then a linear
layer is trained with SGD + momentum (default), LARS (MAE's large-batch recipe) or AdamW, with
linear warm-up + cosine.
"""

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cim_jax import cli
from cim_jax.data import labelled
from cim_jax.errors import ConfigError
from cim_jax.evaluate import knn
from cim_jax.models import vit
from cim_jax.train import warm_start


@dataclasses.dataclass(frozen=True)
class ProbeRecipe:
  """Linear-probe hyper-parameters; lr = base_lr * batch_size / 256."""
  optimizer: str = "sgd"  # "sgd" | "lars" (MAE, batch 16384) | "adamw"
  base_lr: float = 0.1
  epochs: int = 90
  warmup_epochs: int = 10
  batch_size: int = 256  # capped at the training-set size
  weight_decay: float = 0.0
  momentum: float = 0.9
  seed: int = 0


def make_optimizer(recipe: ProbeRecipe, steps: int, warmup: int, batch_size: int):
  """The probe's optax optimizer with warm-up + cosine learning rate."""
  peak = recipe.base_lr * batch_size / 256
  schedule = optax.warmup_cosine_decay_schedule(0.0, peak, max(warmup, 1), max(steps, 2), 0.0)
  if recipe.optimizer == "lars":
    # As MAE's LARS: the bias is excluded from the trust ratio and from weight decay.
    kernel_only = lambda params: {"kernel": True, "bias": False}
    return optax.lars(schedule, weight_decay=recipe.weight_decay,
                      weight_decay_mask=kernel_only, trust_ratio_mask=kernel_only,
                      momentum=recipe.momentum)
  if recipe.optimizer == "sgd":
    return optax.chain(optax.add_decayed_weights(recipe.weight_decay),
                       optax.sgd(schedule, momentum=recipe.momentum))
  if recipe.optimizer == "adamw":
    return optax.adamw(schedule, weight_decay=recipe.weight_decay)
  raise ConfigError(f"probe optimizer must be 'lars', 'sgd' or 'adamw', got {recipe.optimizer!r}")


def train_linear_probe(train_feats: np.ndarray, train_labels: np.ndarray, num_classes: int,
                       recipe: ProbeRecipe = ProbeRecipe()) -> dict[str, Any]:
  """Trains the classifier; returns {'kernel', 'bias', 'mean', 'std'} (numpy)."""
  train_feats = np.asarray(train_feats, np.float32)
  train_labels = np.asarray(train_labels, np.int32)
  if train_feats.shape[0] != train_labels.shape[0]:
    raise ValueError(f"linear probe: {train_feats.shape[0]} features but "
                     f"{train_labels.shape[0]} labels")
  if train_labels.min() < 0 or train_labels.max() >= num_classes:
    raise ValueError(f"linear probe: labels span [{train_labels.min()}, {train_labels.max()}], "
                     f"outside the {num_classes} classes of the head")
  num, dim = train_feats.shape
  mean, std = train_feats.mean(0), train_feats.std(0) + 1e-6
  batch_size = min(recipe.batch_size, num)
  steps_per_epoch = num // batch_size
  total = steps_per_epoch * recipe.epochs
  tx = make_optimizer(recipe, total, steps_per_epoch * recipe.warmup_epochs, batch_size)
  # MAE's probe head init: N(0, 0.01) weights (LARS's trust ratio is 0 for an all-zero kernel).
  kernel = 0.01 * jax.random.normal(jax.random.key(recipe.seed), (dim, num_classes))
  params = {"kernel": kernel, "bias": jnp.zeros((num_classes,))}
  opt_state = tx.init(params)
  feats = jnp.asarray((train_feats - mean) / std)
  labels = jnp.asarray(train_labels)

  @jax.jit
  def step(params, opt_state, index):
    def loss_fn(p):
      logits = feats[index] @ p["kernel"] + p["bias"]
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels[index]).mean()
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  rng = np.random.default_rng(recipe.seed)
  for _ in range(recipe.epochs):
    order = rng.permutation(num)
    for i in range(steps_per_epoch):
      params, opt_state = step(params, opt_state,
                               jnp.asarray(order[i * batch_size:(i + 1) * batch_size]))
  return {"kernel": np.asarray(params["kernel"]), "bias": np.asarray(params["bias"]),
          "mean": mean, "std": std}


def probe_scores(probe: Mapping[str, np.ndarray], feats: np.ndarray) -> np.ndarray:
  """Class logits of the trained probe."""
  return ((np.asarray(feats) - probe["mean"]) / probe["std"]) @ probe["kernel"] + probe["bias"]


def linear_probe(train_feats, train_labels, test_feats, test_labels, *, num_classes: int,
                 recipe: ProbeRecipe = ProbeRecipe()) -> dict[str, float]:
  """Train on frozen train features, report top-1 (and top-5 when classes > 5) on the test set."""
  test_labels = np.asarray(test_labels)
  if test_labels.size and (test_labels.min() < 0 or test_labels.max() >= num_classes):
    raise ValueError(f"linear probe: test labels span [{test_labels.min()}, "
                     f"{test_labels.max()}], outside the {num_classes} classes of the head")
  probe = train_linear_probe(train_feats, train_labels, num_classes, recipe)
  result = labelled.topk_accuracy(probe_scores(probe, test_feats), test_labels)
  train_top1 = labelled.topk_accuracy(probe_scores(probe, train_feats), train_labels, ks=(1,))
  result["train_top1"] = train_top1["top1"]
  return result


def linear_probe_accuracy(encoder_params: Mapping[str, Any] | None, model_cfg, train, test, *,
                          recipe: ProbeRecipe = ProbeRecipe(), pool: str = "tok",
                          image_size: int = 64, batch_size: int = 256, seed: int = 0,
                          crop_pct: float = 0.95, read_threads: int = 8,
                          progress: bool = False,
                          encoder_overrides: Mapping[str, Any] | None = None
                          ) -> dict[str, float]:
  """Linear-probe accuracy of an encoder (`None` params: randomly initialised).

  `train` / `test` as for `knn.knn_accuracy`: arrays, or streamed ImageFolder / TFDS records
  whose features are extracted once; the probe then trains on the feature arrays.
  """
  encoder = vit.encoder_from_config(model_cfg, **dict(encoder_overrides or {}))
  if encoder_params is None:
    encoder_params = vit.init_encoder_params(encoder, image_size, seed)
  apply_fn = knn.encoder_feature_fn(encoder, encoder_params, pool=pool)
  # Unnormalised features: the probe standardises them itself.
  (train_feats, train_labels), (test_feats, test_labels) = (
      knn.labelled_features(apply_fn, data, image_size=image_size, batch_size=batch_size,
                            crop_pct=crop_pct, read_threads=read_threads, normalize=False,
                            progress=progress, desc=f"{name} features")
      for name, data in (("train", train), ("test", test)))
  num_classes = knn.num_classes_of(train, test, train_labels, test_labels)
  return linear_probe(train_feats, train_labels, test_feats, test_labels,
                      num_classes=num_classes, recipe=recipe)


def recipe_from_config(config) -> ProbeRecipe:
  """The probe recipe of `config.eval.probe_*`."""
  e = config.eval
  return ProbeRecipe(optimizer=e.probe_optimizer, base_lr=e.probe_base_lr, epochs=e.probe_epochs,
                     warmup_epochs=e.probe_warmup_epochs, batch_size=e.probe_batch_size,
                     weight_decay=e.probe_weight_decay, seed=config.seed)


def main(config):
  """Entry point: linear probe of a checkpoint's encoder and of a random one."""
  train, test = labelled.splits(config.data)
  kwargs = dict(knn.feature_kwargs(config.data), recipe=recipe_from_config(config),
                pool=config.eval.feature_pool, seed=config.seed, progress=config.progress_bar)
  results = {}
  if config.init_from:
    results["checkpoint"] = linear_probe_accuracy(
        warm_start.load_encoder_params(config, config.init_from), config.model, train, test,
        **kwargs)
  results["random_init"] = linear_probe_accuracy(None, config.model, train, test, **kwargs)
  for name, metrics in results.items():
    print(f"{name:12s}", " ".join(f"{k}={v:.2f}" for k, v in metrics.items()))
  return results


if __name__ == "__main__":
  cli.run_tool(main, prog="cim_jax.evaluate.linear_probe", default_config="configs/cim_eval.py",
               kind="evaluation")
