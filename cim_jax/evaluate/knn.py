"""Weighted k-nearest-neighbour evaluation of frozen encoder features (the DINO protocol).

python -m cim_jax.evaluate.knn --config=configs/cim_eval.py:B/16 \
    --config.init_from=WORKDIR_OR_PTH [--config.data.source=imagefolder --config.data.root=DIR/train
    --config.data.eval_root=DIR/val | --config.data.source=tfds --config.data.tfds_name=imagenet2012
    --config.data.tfds_data_dir=DIR]
"""

import functools
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cim_jax import cli
from cim_jax import sharding
from cim_jax.data import labelled
from cim_jax.errors import ConfigError
from cim_jax.models import cim
from cim_jax.models import heads
from cim_jax.models import vit
from cim_jax.train import metrics as metrics_lib
from cim_jax.train import warm_start

KNN_KS = (10, 20, 100, 200)


def extract_features(apply_fn: Callable[[jax.Array], jax.Array],
                     images: np.ndarray | Iterable[np.ndarray], batch_size: int, *,
                     mesh: Mesh | None = None, normalize: bool = True, progress: bool = False,
                     desc: str = "features", total: int | None = None) -> np.ndarray:
  """Runs `apply_fn` (batch of images -> (b, D) features) over images in jit-compiled batches.

  `images` is an array (n, H, W, 3), cut into batches here, or an iterable of image batches of
  at most `batch_size` (a streamed source; `total` batches for the progress bar). The batch is
  split over the mesh's data axis (batch size rounded up to a multiple of it); short batches
  are padded so one compilation serves all. Returns float32 (n, D), L2-normalised by default.
  """
  mesh = mesh or sharding.local_data_mesh()
  num_shards = mesh.shape["data"]
  batch_size = sharded_batch_size(batch_size, num_shards)
  if isinstance(images, np.ndarray):
    if images.shape[0] == 0:
      raise ValueError("extract_features: no images given")
    batch_size = min(batch_size, sharded_batch_size(images.shape[0], num_shards))
    total = -(-images.shape[0] // batch_size)
    array = images
    images = (array[start:start + batch_size] for start in range(0, len(array), batch_size))
  data_sharding = NamedSharding(mesh, PartitionSpec("data"))

  @functools.partial(jax.jit, in_shardings=data_sharding, out_shardings=data_sharding)
  def features_of(batch):
    feats = apply_fn(batch).astype(jnp.float32)
    return heads.l2_normalize(feats) if normalize else feats

  outputs = []
  for batch in metrics_lib.progress(images, enabled=progress, desc=desc, total=total):
    batch = np.asarray(batch)
    valid = batch.shape[0]
    if valid > batch_size:
      raise ValueError(f"extract_features: a batch of {valid} images exceeds the batch size "
                       f"{batch_size}")
    if valid < batch_size:  # pad with copies of the last image; the padded rows are dropped
      batch = sharding.pad_rows(batch, batch_size)
    feats = features_of(jax.device_put(batch, data_sharding))
    outputs.append(np.asarray(feats)[:valid])
  if not outputs:
    raise ValueError("extract_features: no images given")
  return np.concatenate(outputs)


def sharded_batch_size(batch_size: int, num_shards: int) -> int:
  """`batch_size` rounded up to a multiple of the data-axis size (at least one per shard)."""
  return -(-max(1, int(batch_size)) // num_shards) * num_shards


def labelled_features(apply_fn: Callable, data, *, image_size: int, batch_size: int,
                      crop_pct: float = 0.95, read_threads: int = 8, normalize: bool = True,
                      progress: bool = False, desc: str = "features"
                      ) -> tuple[np.ndarray, np.ndarray]:
  """(features (n, D), labels (n,)) of a labelled set, through `extract_features`.

  Each process extracts the features of its share of the records (`process_share`); the shares
  are gathered, so every process returns all n rows, as one process alone would.
  `labelled.LabelledRecords` (ImageFolder, TFDS) are streamed: decoded and centre-cropped by
  `labelled.eval_batches`, never held whole. In-memory sets (`labelled.Labelled` or (images,
  labels)) are resized to `image_size` (the small embedded sets).
  """
  if not isinstance(data, labelled.LabelledRecords):
    data = labelled.as_labelled(data)
  n, count = len(data), jax.process_count()
  share = process_share(n, jax.process_index(), count)
  if isinstance(data, labelled.Labelled):
    mine = data.subset(share)
    feats = extract_features(apply_fn, labelled.resize_images(mine.images, image_size),
                             batch_size, normalize=normalize, progress=progress, desc=desc)
    return gather_shares(feats, n, count), gather_shares(mine.labels, n, count)
  batch_size = sharded_batch_size(batch_size, sharding.local_data_mesh().shape["data"])
  labels = []

  def images_of(batches):
    for batch in batches:  # labels are kept as the batches go by; images go to the encoder
      labels.append(np.asarray(batch["label"], np.int32))
      yield batch["image"]

  batches = labelled.eval_batches(_Share(data, share), image_size, batch_size, crop_pct,
                                  read_threads)
  feats = extract_features(apply_fn, images_of(batches), batch_size, normalize=normalize,
                           progress=progress, desc=desc, total=-(-len(share) // batch_size))
  return gather_shares(feats, n, count), gather_shares(np.concatenate(labels), n, count)


def process_share(n: int, index: int, count: int) -> np.ndarray:
  """Indices of the records process `index` of `count` reads: blocks of ceil(n / count), the
  last one topped up from the start, so every share has the one shape the gather needs."""
  per = -(-n // count)
  return np.arange(index * per, (index + 1) * per) % n


def gather_shares(local: np.ndarray, n: int, count: int) -> np.ndarray:
  """The `process_share` rows of every process, gathered in record order: the first n."""
  if count > 1:
    local = np.asarray(multihost_utils.process_allgather(local)).reshape(-1, *local.shape[1:])
  return local[:n]


class _Share:
  """The records at `indices` of `records`, as a sequence (one process's share)."""

  def __init__(self, records, indices: np.ndarray):
    self.records, self.indices = records, indices

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int):
    return self.records[int(self.indices[index])]


def num_classes_of(train, test, train_labels: np.ndarray, test_labels: np.ndarray) -> int:
  """The declared class count of the sets, else one more than the largest label seen."""
  declared = max(getattr(train, "num_classes", 0) or 0, getattr(test, "num_classes", 0) or 0)
  return declared or int(max(train_labels.max(), test_labels.max())) + 1


def encoder_feature_fn(encoder, encoder_params, *, pool: str = "tok") -> Callable:
  """Builds `apply_fn(uint8 images) -> (b, D)` from a `VisionTransformer` with pool 'none'.

  pool 'tok' takes the (final-normed) cls token, 'gap' the mean of the patch tokens (the
  VisionTransformer's names).
  """
  if pool not in ("tok", "gap"):
    raise ConfigError(f"feature pool must be 'tok' or 'gap', got {pool!r}")

  def apply_fn(images):
    tokens, _ = encoder.apply({"params": encoder_params}, cim.normalize_images(images),
                              train=False)
    return tokens[:, 0] if pool == "tok" else tokens[:, 1:].mean(axis=1)

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


def knn_classify(train_feats: np.ndarray, train_labels: np.ndarray, test_feats: np.ndarray,
                 test_labels: np.ndarray, *, k: int = 20, temperature: float = 0.07,
                 num_classes: int | None = None) -> dict[str, float]:
  """Weighted kNN top-1 (and top-5 when there are more than 5 classes) accuracy in percent."""
  num_classes = num_classes or int(max(np.max(train_labels), np.max(test_labels))) + 1
  scores = knn_scores(train_feats, train_labels, test_feats, k=k, temperature=temperature,
                      num_classes=num_classes)
  return labelled.topk_accuracy(scores, test_labels)


def knn_accuracy(encoder_params: Mapping[str, Any] | None, model_cfg, train, test, *,
                 ks: Sequence[int] = (20,), temperature: float = 0.07, pool: str = "tok",
                 image_size: int = 64, batch_size: int = 256, seed: int = 0,
                 progress: bool = False, crop_pct: float = 0.95, read_threads: int = 8,
                 encoder_overrides: Mapping[str, Any] | None = None) -> dict[str, float]:
  """kNN accuracy of an encoder (`None` params: a randomly initialised one, seeded by `seed`).

  `train` / `test` are `labelled.Labelled` sets (or (images, labels) tuples), or streamed
  `labelled.LabelledRecords` (see `labelled_features`). Returns {'k20/top1': ..., 'k20/top5': ...}
  for each k in `ks`.
  """
  encoder = vit.encoder_from_config(model_cfg, **dict(encoder_overrides or {}))
  if encoder_params is None:
    encoder_params = vit.init_encoder_params(encoder, image_size, seed)
  apply_fn = encoder_feature_fn(encoder, encoder_params, pool=pool)
  extract = functools.partial(labelled_features, apply_fn, image_size=image_size,
                              batch_size=batch_size, crop_pct=crop_pct,
                              read_threads=read_threads, progress=progress)
  train_feats, train_labels = extract(train, desc="train features")
  test_feats, test_labels = extract(test, desc="test features")
  return knn_sweep(train_feats, train_labels, test_feats, test_labels, ks=ks,
                   temperature=temperature,
                   num_classes=num_classes_of(train, test, train_labels, test_labels))


def knn_sweep(train_feats, train_labels, test_feats, test_labels, *, ks: Sequence[int],
              temperature: float, num_classes: int | None) -> dict[str, float]:
  """`knn_classify` for each k, keyed 'k{k}/top1' / 'k{k}/top5'."""
  results = {}
  for k in ks:
    for name, value in knn_classify(train_feats, train_labels, test_feats, test_labels, k=k,
                                    temperature=temperature, num_classes=num_classes).items():
      results[f"k{k}/{name}"] = value
  return results


def feature_kwargs(d) -> dict[str, Any]:
  """How the sets of a labelled data group (`config_defaults.labelled_features`) are read."""
  return dict(image_size=d.image_size, batch_size=d.batch_size, crop_pct=d.crop_pct,
              read_threads=d.read_threads)


def main(config):
  """Entry point: kNN of a checkpoint's encoder, and of a randomly initialised one for reference."""
  train, test = labelled.splits(config.data)
  e = config.eval
  ks = tuple(sorted({int(e.knn_k), *KNN_KS}))
  kwargs = dict(feature_kwargs(config.data), ks=ks, temperature=e.knn_temperature,
                pool=e.feature_pool, seed=config.seed, progress=config.progress_bar)
  results = {}
  if config.init_from:
    encoder_params = warm_start.load_encoder_params(config, config.init_from)
    results["checkpoint"] = knn_accuracy(encoder_params, config.model, train, test, **kwargs)
  results["random_init"] = knn_accuracy(None, config.model, train, test, **kwargs)
  print(f"kNN on {config.data.source}: {len(train)} train / {len(test)} test images, "
        f"T={e.knn_temperature}")
  for name, metrics in results.items():
    print(f"{name:12s}", " ".join(f"{key}={value:.2f}" for key, value in metrics.items()))
  return results


if __name__ == "__main__":
  cli.run_tool(main, prog="cim_jax.evaluate.knn", default_config="configs/cim_eval.py",
               kind="evaluation")
