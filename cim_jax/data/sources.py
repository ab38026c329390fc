"""Random-access image sources (grain `RandomAccessDataSource`): embedded, ImageFolder, TFDS.

Every source returns `ImageRecord(name, data)`; `data` is a decoded RGB uint8 array, encoded
image bytes, or a file path, and `load_image` turns any of them into an (H, W, 3) uint8 array
inside the grain pipeline (so decoding runs in the worker processes). `name` identifies the
record in skip logs.
"""

import hashlib
import logging
import os
from typing import NamedTuple, Sequence

import cv2
import ml_collections
import numpy as np
from PIL import Image

from cim_jax.errors import ConfigError
from cim_jax.data import decode

# The embedded photos (scikit-image 0.26 / scikit-learn 1.9 ship them; nothing is downloaded).
# "train" feeds pre-training; "heldout" feeds the pretext IoU; no image is in both. Grey images
# are replicated to RGB and `logo` (RGBA) is composited on white by `decode.to_rgb_array`.
# Left out: `cat` (the same photo as `chelsea`), synthetic patterns (checkerboard, blobs,
# phantom, horse), and images that need pooch to download (eagle, kidney, lily, skin, ...).
EMBEDDED_SPLITS = {
    "train": (
        "astronaut", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
        "colorwheel", "stereo_motorcycle_left", "stereo_motorcycle_right", "camera", "moon",
        "grass", "gravel", "brick", "coins", "clock", "page", "text", "cell",
        "microaneurysms", "logo", "sklearn_flower",
    ),
    "heldout": ("chelsea", "coffee", "sklearn_china"),
}

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                    ".ppm", ".pgm", ".jfif")


class ImageRecord(NamedTuple):
  """One source record: a printable name and the image as array, encoded bytes or path."""
  name: str
  data: object


def load_image(record: ImageRecord) -> np.ndarray:
  """Returns the record's image as (H, W, 3) uint8 RGB; raises decode.UndecodableImage."""
  data = record.data
  if isinstance(data, np.ndarray):
    return data
  if isinstance(data, (str, os.PathLike)):
    try:
      with open(data, "rb") as f:
        data = f.read()
    except OSError as e:  # vanished or unreadable file: a bad record, not a bug
      raise decode.UndecodableImage(f"cannot read file: {e.strerror}") from None
  return decode.decode_image(bytes(data))


def _load_embedded(name: str) -> np.ndarray:
  """Loads one embedded photo by its name in EMBEDDED_SPLITS as RGB uint8."""
  if name.startswith("sklearn_"):
    from sklearn.datasets import load_sample_image  # pylint: disable=g-import-not-at-top
    array = load_sample_image(name[len("sklearn_"):] + ".jpg")
  else:
    import skimage.data  # pylint: disable=g-import-not-at-top
    if name.startswith("stereo_motorcycle_"):
      array = skimage.data.stereo_motorcycle()[0 if name.endswith("left") else 1]
    else:
      array = getattr(skimage.data, name)()
  return decode.to_rgb_array(Image.fromarray(np.asarray(array)))


class EmbeddedSource:
  """The photos shipped inside scikit-image / scikit-learn, decoded once per process."""

  def __init__(self, split: str = "train"):
    if split not in EMBEDDED_SPLITS:
      raise ConfigError(f"embedded split {split!r} must be one of {sorted(EMBEDDED_SPLITS)}")
    self.split = split
    self.names = EMBEDDED_SPLITS[split]
    self._cache: dict[int, np.ndarray] = {}

  def __len__(self) -> int:
    return len(self.names)

  def __getitem__(self, index: int) -> ImageRecord:
    index = int(index)
    if index not in self._cache:
      self._cache[index] = _load_embedded(self.names[index])
    return ImageRecord(f"embedded:{self.names[index]}", self._cache[index])

  def __getstate__(self):
    # Worker processes decode their own copy instead of receiving the arrays through a pipe.
    return {**self.__dict__, "_cache": {}}

  def __repr__(self) -> str:
    return f"EmbeddedSource(split={self.split!r}, {len(self)} images)"


# Without config.data.eval_root, pre-training holds out this share of its ImageFolder (at
# least 1 image, at most HELDOUT_MAX) for the pretext IoU and trains on the rest.
HELDOUT_FRACTION = 0.02
HELDOUT_MAX = 256


def heldout_count(num_images: int) -> int:
  """How many of `num_images` images `ImageFolderSource(subset=...)` holds out."""
  return min(HELDOUT_MAX, max(1, round(num_images * HELDOUT_FRACTION)))


def _path_hash(root: str, path: str) -> str:
  """A stable (process-, machine- and restart-independent) key of an image's relative path."""
  relative = os.path.relpath(path, root).replace(os.sep, "/")
  return hashlib.sha256(relative.encode("utf-8")).hexdigest()


class ImageFolderSource:
  """root/<class>/<image> (the ImageNet layout), listed once in sorted order; labels by class.

  subset: "all"; or, for a pre-training run without a separate held-out folder, "heldout" (the
  `heldout_count` images whose relative paths hash lowest) or "train" (every other image).
  """

  def __init__(self, root: str, subset: str = "all"):
    if subset not in ("all", "train", "heldout"):
      raise ValueError(f"subset {subset!r} must be 'all', 'train' or 'heldout'")
    if not os.path.isdir(root):
      raise FileNotFoundError(f"image folder {root!r} does not exist or is not a directory")
    paths = []
    for directory, subdirs, files in os.walk(root, followlinks=True):
      subdirs.sort()
      paths.extend(os.path.join(directory, f) for f in sorted(files)
                   if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
    if not paths:
      raise ConfigError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found under {root!r}")
    paths.sort()
    self.num_listed = len(paths)
    if subset != "all":
      if len(paths) < 2:
        raise ConfigError(f"{root!r} holds {len(paths)} image: too few to hold some out for "
                          "the pretext IoU; set config.data.eval_root")
      held = set(sorted(paths, key=lambda p: _path_hash(root, p))[:heldout_count(len(paths))])
      paths = [p for p in paths if (p in held) == (subset == "heldout")]
    self.subset = subset
    self.root = root
    self.paths = paths
    self.classes = sorted({self._class_of(p) for p in paths})
    index = {c: i for i, c in enumerate(self.classes)}
    self.labels = np.array([index[self._class_of(p)] for p in paths], np.int32)

  def _class_of(self, path: str) -> str:
    parts = os.path.relpath(path, self.root).split(os.sep)
    return parts[0] if len(parts) > 1 else ""

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> ImageRecord:
    path = self.paths[int(index)]
    return ImageRecord(path, path)

  def labelled(self, index: int) -> tuple[ImageRecord, int]:
    """The record at `index` and its class index (position of its folder in `classes`)."""
    return self[index], int(self.labels[int(index)])

  def __repr__(self) -> str:
    subset = "" if self.subset == "all" else f", {self.subset} subset"
    return (f"ImageFolderSource({self.root!r}{subset}, {len(self)} images, "
            f"{len(self.classes)} classes)")


class TfdsSource:
  """A TFDS dataset prepared in array_record format, read without TensorFlow.

  The image feature is read as its stored encoded bytes (`SkipDecoding`) and decoded by
  `decode.decode_image`, the same decoder as every other source (EXIF, modes, bad files).
  """

  def __init__(self, name: str, split: str, data_dir: str = "", image_key: str = "image"):
    self.name, self.split, self.data_dir, self.image_key = name, split, data_dir, image_key
    self._source = None
    self._length = len(self._open())

  def _open(self):
    if self._source is None:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      try:
        builder = tfds.builder(self.name, data_dir=self.data_dir or None)
      except Exception as e:  # tfds raises several types for a missing or unknown dataset
        raise FileNotFoundError(
            f"TFDS dataset {self.name!r} not found in data_dir={self.data_dir or '(default)'}: "
            f"{str(e).splitlines()[0]}") from None
      if self.image_key not in builder.info.features:
        raise ConfigError(f"TFDS dataset {self.name!r} has no {self.image_key!r} feature; "
                         f"features: {sorted(builder.info.features)}")
      try:
        self._source = builder.as_data_source(
            split=self.split, decoders={self.image_key: tfds.decode.SkipDecoding()})
      except (ValueError, KeyError, NotImplementedError) as e:
        raise ConfigError(f"TFDS dataset {self.name!r} split {self.split!r} cannot be read as "
                         f"an array_record data source: {str(e).splitlines()[0]}") from None
    return self._source

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> ImageRecord:
    index = int(index)
    example = self._open()[index]
    return ImageRecord(f"tfds:{self.name}/{self.split}[{index}]", example[self.image_key])

  def __getstate__(self):
    # Each worker opens its own file handles.
    return {**self.__dict__, "_source": None}

  def __repr__(self) -> str:
    return f"TfdsSource({self.name!r}, split={self.split!r}, {len(self)} records)"


class TfdsLabelledSource(TfdsSource):
  """A `TfdsSource` whose records also carry the integer `label_key` feature (evaluation sets).

  `classes` / `num_classes` come from the label's `ClassLabel` feature; a plain integer label
  leaves them empty / 0 (unknown until the labels are read).
  """

  def __init__(self, name: str, split: str, data_dir: str = "", image_key: str = "image",
               label_key: str = "label"):
    super().__init__(name, split, data_dir, image_key)
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    features = tfds.builder(name, data_dir=data_dir or None).info.features
    if label_key not in features:
      raise ConfigError(f"TFDS dataset {name!r} has no label feature {label_key!r}; "
                       f"features: {sorted(features)}")
    label = features[label_key]
    self.label_key = label_key
    self.num_classes = int(getattr(label, "num_classes", 0) or 0)
    self.classes = list(getattr(label, "names", ()) or ()) if self.num_classes else []

  def labelled(self, index: int) -> tuple[ImageRecord, int]:
    """The record at `index` and its label, read from one example."""
    index = int(index)
    example = self._open()[index]
    return (ImageRecord(f"tfds:{self.name}/{self.split}[{index}]", example[self.image_key]),
            int(example[self.label_key]))

  def __repr__(self) -> str:
    return (f"TfdsLabelledSource({self.name!r}, split={self.split!r}, {len(self)} records, "
            f"label {self.label_key!r})")


class EncodedSource:
  """In-memory records of encoded image bytes (benchmarks and tests)."""

  def __init__(self, encoded: Sequence[bytes], names: Sequence[str] | None = None):
    self.encoded = list(encoded)
    self.names = list(names) if names is not None else [f"bytes[{i}]" for i in range(len(encoded))]

  def __len__(self) -> int:
    return len(self.encoded)

  def __getitem__(self, index: int) -> ImageRecord:
    return ImageRecord(self.names[int(index)], self.encoded[int(index)])


def make_source(data: ml_collections.ConfigDict, split: str = "train"):
  """The source named by `data.source` for split "train" (pre-training) or "heldout" (eval)."""
  if split not in ("train", "heldout"):
    raise ValueError(f"split {split!r} must be 'train' or 'heldout'")
  if data.source == "embedded":
    return EmbeddedSource(split)
  if data.source == "imagefolder":
    if not data.root:
      raise ConfigError("config.data.root must name an ImageFolder directory for "
                        "config.data.source='imagefolder'")
    if data.eval_root:
      return ImageFolderSource(data.root if split == "train" else data.eval_root)
    # No separate held-out folder: a small, fixed subset of root is held out (see heldout_count).
    source = ImageFolderSource(data.root, subset=split)
    if split == "train":
      held = source.num_listed - len(source)
      logging.info("config.data.eval_root is not set: %d of the %d images under %s (chosen "
                   "by a hash of their paths) are held out for the pretext IoU and not trained "
                   "on", held, source.num_listed, data.root)
    return source
  if data.source == "tfds":
    tfds_split = data.tfds_split if split == "train" else data.tfds_eval_split
    return TfdsSource(data.tfds_name, tfds_split, data.tfds_data_dir)
  raise ConfigError(f"config.data.source={data.source!r} must be 'embedded', 'imagefolder' "
                   "or 'tfds'")


def embedded_labelled(name: str = "digits", split: str = "train",
                      image_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
  """Small labelled sets shipped with scikit-learn / scikit-image, for kNN evaluation.

  name: "digits" (scikit-learn, 1797 8x8 grey digits, 10 classes) or "lfw" (scikit-image
  `lfw_subset`, 200 25x25 grey crops: label 1 = face, 0 = non-face). Images are resized
  (bilinear) to image_size and replicated to RGB. Deterministic split: record i is in
  "test" when i % 5 == 4, else in "train" (80/20; both sets keep every class because digits
  are interleaved and lfw is two blocks of 100).
  Returns (images uint8 (n, image_size, image_size, 3), labels int32 (n,)).
  """
  if name == "digits":
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    digits = load_digits()
    grey, labels = digits.images / 16.0, digits.target
  elif name == "lfw":
    import skimage.data  # pylint: disable=g-import-not-at-top
    grey = skimage.data.lfw_subset()
    labels = np.array([1] * 100 + [0] * 100)  # skimage documents faces first, then non-faces
  else:
    raise ConfigError(f"embedded labelled set {name!r} must be 'digits' or 'lfw'")
  if split not in ("train", "test"):
    raise ValueError(f"split {split!r} must be 'train' or 'test'")
  keep = (np.arange(len(labels)) % 5 == 4) == (split == "test")
  grey = np.clip(np.asarray(grey, np.float32)[keep] * 255.0 + 0.5, 0, 255).astype(np.uint8)
  resized = np.stack([cv2.resize(g, (image_size, image_size), interpolation=cv2.INTER_LINEAR)
                      for g in grey])
  return np.repeat(resized[..., None], 3, axis=-1), labels[keep].astype(np.int32)

