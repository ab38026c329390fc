"""Labelled images for kNN, the linear probe and fine-tuning: in-memory sets and streamed records.

The small embedded sets ('digits', 'lfw') are `Labelled` arrays; ImageFolder and TFDS splits are
`LabelledRecords` that read one image per record, so a grain pipeline over them streams any size.
"""

import dataclasses
import os
from typing import Any

import grain
import numpy as np
from PIL import Image

from cim_jax.data import augment
from cim_jax.data import decode
from cim_jax.data import sources
from cim_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Labelled:
  """A labelled image set: uint8 RGB images (n, H, W, 3) and int labels in [0, num_classes)."""
  images: np.ndarray
  labels: np.ndarray
  num_classes: int
  class_names: tuple[str, ...] = ()

  def __post_init__(self):
    if self.images.shape[0] != self.labels.shape[0]:
      raise ValueError(f"{self.images.shape[0]} images but {self.labels.shape[0]} labels")
    if self.labels.size and (self.labels.min() < 0 or self.labels.max() >= self.num_classes):
      raise ValueError(f"labels span [{self.labels.min()}, {self.labels.max()}], outside the "
                       f"{self.num_classes} classes")

  def subset(self, index: np.ndarray) -> "Labelled":
    """The examples at `index` (same classes)."""
    return dataclasses.replace(self, images=self.images[index], labels=self.labels[index])

  def __len__(self) -> int:
    return self.labels.shape[0]

  def labelled(self, index: int):
    """(ImageRecord of the image array, label): the interface of the labelled file sources."""
    index = int(index)
    return sources.ImageRecord(f"array[{index}]", self.images[index]), int(self.labels[index])


def to_uint8_rgb(images: np.ndarray) -> np.ndarray:
  """Grey (n, H, W) / (n, H, W, 1) or float images -> uint8 (n, H, W, 3)."""
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"images must be (n, H, W[, 1 or 3]), got shape {images.shape}")
  if images.dtype != np.uint8:
    # Floats are scaled by their own maximum (e.g. sklearn digits use 0..16) to fill 0..255.
    hi = float(images.max()) or 1.0
    scale = 255.0 if hi <= 1.0 else 255.0 / hi
    images = np.clip(images.astype(np.float64) * scale + 0.5, 0, 255).astype(np.uint8)
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  return images


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
  """Host-side bicubic resize of a whole set to (n, size, size, 3) uint8."""
  images = to_uint8_rgb(images)
  if images.shape[1:3] == (size, size):
    return images
  return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC))
                   for im in images])


def stratified_split(data: Labelled, test_fraction: float, seed: int
                     ) -> tuple[Labelled, Labelled]:
  """Splits every class by `test_fraction` (seeded), so both halves see all classes."""
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
  rng = np.random.default_rng(seed)
  train_idx, test_idx = [], []
  for label in range(data.num_classes):
    members = rng.permutation(np.flatnonzero(data.labels == label))
    num_test = int(round(len(members) * test_fraction))
    test_idx.append(members[:num_test])
    train_idx.append(members[num_test:])
  return (data.subset(np.sort(np.concatenate(train_idx))),
          data.subset(np.sort(np.concatenate(test_idx))))


def as_labelled(source: Any) -> Labelled:
  """Adapts what `data.sources.embedded_labelled` returns (an object or a tuple) to `Labelled`."""
  if isinstance(source, Labelled):
    return source
  if isinstance(source, tuple):
    images, labels = source[:2]
  else:
    images, labels = source.images, source.labels
  labels = np.asarray(labels).astype(np.int32)
  names = tuple(getattr(source, "class_names", ()) or ())
  num_classes = int(getattr(source, "num_classes", 0) or len(names) or labels.max() + 1)
  return Labelled(to_uint8_rgb(images), labels, num_classes, names)


# ----------------------------------------------------------------------------------------------
# Streamed labelled sources (ImageFolder, TFDS, or arrays) for kNN, linear probe and fine-tuning.

EMBEDDED_LABELLED = ("digits", "lfw")
LABELLED_SOURCES = EMBEDDED_LABELLED + ("imagefolder", "tfds")


class LabelledRecords:
  """Random-access {'image': uint8 (H, W, 3), 'label': int32} records, decoded one at a time.

  Wraps anything with `__len__` and `labelled(index) -> (ImageRecord, label)`: a `Labelled`
  array set, a `sources.ImageFolderSource` or a `sources.TfdsLabelledSource`. Reading a record
  reads one image, so a grain pipeline over it streams a split of any size.
  """

  def __init__(self, source, num_classes: int = 0, class_names: tuple[str, ...] = (),
               description: str = ""):
    self.source, self.num_classes = source, int(num_classes)
    self.class_names, self.description = tuple(class_names), description or repr(source)

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record, label = self.source.labelled(index)
    try:
      image = sources.load_image(record)
    except decode.UndecodableImage as e:
      # Evaluation cannot skip a labelled image (accuracies would not be comparable): name it.
      raise decode.UndecodableImage(f"cannot decode evaluation image {record.name}: {e}"
                                    ) from None
    return {"image": image, "label": np.int32(label)}

  def __repr__(self) -> str:
    return f"LabelledRecords({self.description})"


def imagefolder_splits(train_root: str, eval_root: str, keys: tuple[str, str]
                       ) -> tuple[LabelledRecords, LabelledRecords]:
  """Train / eval ImageFolders (root/<class>/<image>) with the same class folders.

  `keys` name the config keys of the two roots in errors.
  """
  for root, key in zip((train_root, eval_root), keys):
    if not root:
      raise ConfigError(f"{key} must name an ImageFolder directory (root/<class>/<image>)")
    if not os.path.isdir(root):
      raise FileNotFoundError(f"{key}={root!r} does not exist or is not a directory")
  folders = [sources.ImageFolderSource(root) for root in (train_root, eval_root)]
  if folders[0].classes != folders[1].classes:
    raise ConfigError(f"class folders differ: {len(folders[0].classes)} under {train_root!r}, "
                     f"{len(folders[1].classes)} under {eval_root!r}")
  classes = tuple(folders[0].classes)
  return tuple(LabelledRecords(f, len(classes), classes, f"imagefolder {f.root}")
               for f in folders)


def tfds_splits(name: str, train_split: str, eval_split: str, data_dir: str = "",
                image_key: str = "image", label_key: str = "label"
                ) -> tuple[LabelledRecords, LabelledRecords]:
  """Train / eval splits of a TFDS dataset prepared as array_record, read without TensorFlow."""
  if not name:
    raise ConfigError("no TFDS dataset name given")
  splits = [sources.TfdsLabelledSource(name, split, data_dir, image_key, label_key)
            for split in (train_split, eval_split)]
  return tuple(LabelledRecords(s, s.num_classes, tuple(s.classes), f"tfds {name}/{s.split}")
               for s in splits)


def splits(d, prefix: str = "config.data") -> tuple[Any, Any]:
  """The train / eval sets of a labelled data group (`config_defaults.labelled_source`).

  'digits' and 'lfw' come as in-memory `Labelled` arrays at `d.image_size`; 'imagefolder' and
  'tfds' as streamed `LabelledRecords` (see `eval_batches`). `prefix` names the group in errors.
  """
  if d.source in EMBEDDED_LABELLED:
    train, test = (as_labelled(sources.embedded_labelled(d.source, split,
                                                         image_size=int(d.image_size)))
                   for split in ("train", "test"))
    num_classes = max(train.num_classes, test.num_classes)
    return (dataclasses.replace(train, num_classes=num_classes),
            dataclasses.replace(test, num_classes=num_classes))
  if d.source == "imagefolder":
    return imagefolder_splits(d.root, d.eval_root, (f"{prefix}.root", f"{prefix}.eval_root"))
  if d.source == "tfds":
    return tfds_splits(d.tfds_name, d.tfds_split, d.tfds_eval_split, d.tfds_data_dir,
                       d.tfds_image_key, d.tfds_label_key)
  raise ConfigError(f"{prefix}.source={d.source!r} must be one of {', '.join(LABELLED_SOURCES)}")


class EvalCrop:
  """grain map: the evaluation transform (shorter side to size / crop_pct, centre crop)."""

  def __init__(self, size: int, crop_pct: float):
    if not 0.0 < crop_pct <= 1.0:
      raise ConfigError(f"crop_pct must be in (0, 1], got {crop_pct}")
    self.size, self.crop_pct = int(size), float(crop_pct)

  def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
    return {"image": augment.eval_transform(record["image"], self.size, self.crop_pct),
            "label": record["label"]}


def eval_batches(records, image_size: int, batch_size: int, crop_pct: float = 0.95,
                 read_threads: int = 8):
  """Deterministic (unshuffled) batches {'image' (b, size, size, 3) uint8, 'label' (b,)}.

  A grain pipeline: records are read, decoded and centre-cropped by `read_threads` threads up
  to two batches ahead, so only those are in memory; the last batch may be smaller.
  """
  if len(records) == 0:
    raise ConfigError(f"no labelled images in {records!r}")
  ds = grain.MapDataset.source(records).map(EvalCrop(image_size, crop_pct))
  # Threads read single records (the prefetch buffer counts records), then batch in order.
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, int(read_threads)),
                                            prefetch_buffer_size=2 * int(batch_size)))
  return ds.batch(int(batch_size), drop_remainder=False)


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, ks=(1, 5)) -> dict[str, float]:
  """Percentage of rows whose label is among the `k` highest scores, for each k <= classes."""
  order = np.argsort(-scores, axis=-1, kind="stable")
  # top-k is trivially 100% once k reaches the class count
  return {f"top{k}": float(100.0 * (order[:, :k] == np.asarray(labels)[:, None]).any(-1).mean())
          for k in ks if k == 1 or k < scores.shape[-1]}
