"""Weighted k-nearest-neighbour evaluation of frozen encoder features (the DINO protocol).

python -m cim_jax.evaluate.knn --config=configs/cim_vit_tiny.py --config.checkpoint=WORKDIR_OR_PTH
"""

import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cim_jax.evaluate import common

KNN_KS = (10, 20, 100, 200)


data_mesh = common.data_mesh


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Scales each row to unit L2 norm (zero rows stay zero instead of becoming NaN)."""
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / jnp.maximum(norm, eps)


def extract_features(apply_fn: Callable[[jax.Array], jax.Array], images: np.ndarray,
                     batch_size: int, *, mesh: Mesh | None = None, normalize: bool = True,
                     progress: bool = False, desc: str = "features") -> np.ndarray:
  """Runs `apply_fn` (batch of images -> (b, D) features) over `images` in jit-compiled batches.

  The batch is split over the mesh's data axis (batch size rounded up to a multiple of it); the
  last batch is padded so one compilation serves all. Returns float32 (n, D), L2-normalised.
  """
  images = np.asarray(images)
  if images.shape[0] == 0:
    raise ValueError("extract_features: no images given")
  mesh = mesh or data_mesh()
  num_shards = mesh.shape["data"]
  batch_size = -(-max(1, batch_size) // num_shards) * num_shards
  batch_size = min(batch_size, -(-images.shape[0] // num_shards) * num_shards)
  sharding = NamedSharding(mesh, PartitionSpec("data"))

  @functools.partial(jax.jit, in_shardings=sharding, out_shardings=sharding)
  def features_of(batch):
    feats = apply_fn(batch).astype(jnp.float32)
    return l2_normalize(feats) if normalize else feats

  outputs = []
  starts = range(0, images.shape[0], batch_size)
  for start in common.progress(starts, enabled=progress, desc=desc):
    batch = images[start:start + batch_size]
    valid = batch.shape[0]
    if valid < batch_size:  # pad with copies of the last image; the padded rows are dropped
      batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - valid, axis=0)])
    feats = features_of(jax.device_put(batch, sharding))
    outputs.append(np.asarray(feats)[:valid])
  return np.concatenate(outputs)


def encoder_feature_fn(encoder, encoder_params, *, pool: str = "cls") -> Callable:
  """Builds `apply_fn(uint8 images) -> (b, D)` from a `VisionTransformer` with pool 'none'.

  pool 'cls' takes the (final-normed) cls token, 'mean' the mean of the patch tokens.
  """
  if pool not in ("cls", "mean"):
    raise ValueError(f"feature pool must be 'cls' or 'mean', got {pool!r}")
  from cim_jax.models import cim  # deferred: the raw-pixel path must not need the model code

  def apply_fn(images):
    tokens, _ = encoder.apply({"params": encoder_params}, cim.normalize_images(images),
                              train=False)
    return tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(axis=1)

  return apply_fn


@functools.partial(jax.jit, static_argnames=("k", "num_classes"))
def _knn_votes(train_feats, train_labels, test_feats, temperature, *, k, num_classes):
  """Class scores of a chunk of test features: sum of exp(sim / T) over the k nearest."""
  similarity = test_feats @ train_feats.T  # cosine similarity of L2-normalised features
  top_sim, top_idx = jax.lax.top_k(similarity, k)
  weights = jnp.exp(top_sim / temperature)
  neighbour_labels = jax.nn.one_hot(train_labels[top_idx], num_classes, dtype=weights.dtype)
  return jnp.einsum("tk,tkc->tc", weights, neighbour_labels)


def knn_scores(train_feats: np.ndarray, train_labels: np.ndarray, test_feats: np.ndarray, *,
               k: int, temperature: float = 0.07, num_classes: int | None = None,
               chunk_size: int = 1024) -> np.ndarray:
  """DINO weighted-kNN class scores (num_test, num_classes) of L2-normalised features."""
  train_labels = np.asarray(train_labels).astype(np.int32)
  if train_feats.shape[0] != train_labels.shape[0]:
    raise ValueError(f"kNN: {train_feats.shape[0]} train features but {train_labels.shape[0]} "
                     "train labels")
  if train_feats.shape[1:] != test_feats.shape[1:]:
    raise ValueError(f"kNN: train feature shape {train_feats.shape[1:]} differs from test "
                     f"feature shape {test_feats.shape[1:]}")
  num_classes = num_classes or int(train_labels.max()) + 1
  if train_labels.min() < 0 or train_labels.max() >= num_classes:
    raise ValueError(f"kNN: train labels span [{train_labels.min()}, {train_labels.max()}], "
                     f"outside the {num_classes} classes")
  k = min(k, train_feats.shape[0])  # a small support set cannot give more neighbours
  train_feats = jnp.asarray(train_feats, jnp.float32)
  train_labels = jnp.asarray(train_labels)
  chunks = []
  for start in range(0, test_feats.shape[0], chunk_size):
    chunk = jnp.asarray(test_feats[start:start + chunk_size], jnp.float32)
    chunks.append(np.asarray(_knn_votes(train_feats, train_labels, chunk, temperature,
                                        k=k, num_classes=num_classes)))
  return np.concatenate(chunks)


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)
                  ) -> dict[str, float]:
  """Percentage of rows whose label is among the `k` highest scores, for each k <= classes."""
  labels = np.asarray(labels)
  order = np.argsort(-scores, axis=-1, kind="stable")
  result = {}
  for k in ks:
    if k == 1 or k < scores.shape[-1]:  # top-k is trivially 100% once k reaches the classes
      hit = (order[:, :k] == labels[:, None]).any(axis=-1)
      result[f"top{k}"] = float(100.0 * hit.mean())
  return result


def knn_classify(train_feats: np.ndarray, train_labels: np.ndarray, test_feats: np.ndarray,
                 test_labels: np.ndarray, *, k: int = 20, temperature: float = 0.07,
                 num_classes: int | None = None) -> dict[str, float]:
  """Weighted kNN top-1 (and top-5 when there are more than 5 classes) accuracy in percent."""
  num_classes = num_classes or int(max(np.max(train_labels), np.max(test_labels))) + 1
  scores = knn_scores(train_feats, train_labels, test_feats, k=k, temperature=temperature,
                      num_classes=num_classes)
  return topk_accuracy(scores, test_labels)


def knn_accuracy(encoder_params: Mapping[str, Any] | None, model_cfg, train: common.Labelled,
                 test: common.Labelled, *, ks: Sequence[int] = (20,), temperature: float = 0.07,
                 pool: str = "cls", image_size: int = 64, batch_size: int = 256,
                 seed: int = 0, progress: bool = False,
                 encoder_overrides: Mapping[str, Any] | None = None) -> dict[str, float]:
  """kNN accuracy of an encoder (`None` params: a randomly initialised one, seeded by `seed`).

  `train` / `test` are `common.Labelled` sets (or (images, labels) tuples). Returns
  {'k20/top1': ..., 'k20/top5': ...} for each k in `ks`.
  """
  train, test = common.as_labelled(train), common.as_labelled(test)
  encoder = common.build_encoder(model_cfg, **dict(encoder_overrides or {}))
  train_images = common.resize_images(train.images, image_size)
  test_images = common.resize_images(test.images, image_size)
  if encoder_params is None:
    encoder_params = common.init_encoder_params(encoder, image_size, seed)
  apply_fn = encoder_feature_fn(encoder, encoder_params, pool=pool)
  train_feats = extract_features(apply_fn, train_images, batch_size, progress=progress,
                                 desc="train features")
  test_feats = extract_features(apply_fn, test_images, batch_size, progress=progress,
                                desc="test features")
  return knn_sweep(train_feats, train.labels, test_feats, test.labels, ks=ks,
                   temperature=temperature,
                   num_classes=max(train.num_classes, test.num_classes))


def knn_sweep(train_feats, train_labels, test_feats, test_labels, *, ks: Sequence[int],
              temperature: float, num_classes: int | None) -> dict[str, float]:
  """`knn_classify` for each k, keyed 'k{k}/top1' / 'k{k}/top5'."""
  results = {}
  for k in ks:
    for name, value in knn_classify(train_feats, train_labels, test_feats, test_labels, k=k,
                                    temperature=temperature, num_classes=num_classes).items():
      results[f"k{k}/{name}"] = value
  return results


def main(config):
  """Entry point: kNN of a checkpoint's encoder, and of a randomly initialised one for reference."""
  train, test = common.labelled_splits(config)
  ks = tuple(sorted({int(config.eval.knn_k), *KNN_KS}))
  kwargs = dict(ks=ks, temperature=config.eval.knn_temperature, pool=config.eval.feature_pool,
                image_size=config.eval.image_size, batch_size=config.eval.batch_size,
                seed=config.seed, progress=config.progress_bar)
  results = {}
  if config.checkpoint:
    encoder_params = common.load_encoder_params(config)
    results["checkpoint"] = knn_accuracy(encoder_params, config.model, train, test, **kwargs)
  results["random_init"] = knn_accuracy(None, config.model, train, test, **kwargs)
  print(f"kNN on {config.eval.labelled_source}: {len(train.labels)} train / "
        f"{len(test.labels)} test images, {train.num_classes} classes, T={config.eval.knn_temperature}")
  for name, metrics in results.items():
    print(f"{name:12s}", " ".join(f"{key}={value:.2f}" for key, value in metrics.items()))
  return results


if __name__ == "__main__":
  common.run(main, prog="cim_jax.evaluate.knn")
