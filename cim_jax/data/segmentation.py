"""Semantic segmentation data (docs/METHOD.md section 9): sources, mmseg's train pipeline and
sliding-window geometry.

Records are {"image": uint8 (H, W, 3) RGB, "label": uint8 (H, W)}, labels 0..C-1 or IGNORE_INDEX.
"""

import io
import itertools
import os
from typing import Sequence

import cv2
import grain
import jax
import ml_collections
import numpy as np
from PIL import Image

from cim_jax import sharding
from cim_jax.data import decode
from cim_jax.data import pipeline
from cim_jax.data import sources
from cim_jax.errors import ConfigError

IGNORE_INDEX = 255  # label of pixels no loss or metric sees (ADE20K's "other", padding)
# Padding colour of uint8 crops: mmseg pads after normalising, with 0, i.e. the mean colour.
MEAN_RGB_UINT8 = (124, 116, 104)


def rescale_size(height: int, width: int, scale: tuple[float, float]) -> tuple[int, int]:
  """(new_height, new_width) of mmcv's keep-ratio rescale to `scale` = (long, short) edges.

  The factor is the largest that keeps the long side <= max(scale) and the short side <=
  min(scale); sides are rounded half up, as `mmcv.imrescale`.
  """
  factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
  return int(height * factor + 0.5), int(width * factor + 0.5)


def window_spans(length: int, crop: int, stride: int) -> list[tuple[int, int]]:
  """[(start, end)] of mmseg's sliding windows along one axis: every `stride`, the last one
  moved back to end at the border, all `crop` long (or the whole axis when it is shorter)."""
  count = max(length - crop + stride - 1, 0) // stride + 1
  spans = []
  for i in range(count):
    end = min(i * stride + crop, length)
    spans.append((max(end - crop, 0), end))
  return spans


def window_grid(height: int, width: int, crop: int, stride: int
                ) -> list[tuple[int, int, int, int]]:
  """[(y0, y1, x0, x1)] of mmseg's slide inference, rows outer: the product of both axes' spans."""
  return [(y0, y1, x0, x1) for (y0, y1), (x0, x1) in itertools.product(
      window_spans(height, crop, stride), window_spans(width, crop, stride))]


# ----------------------------------------------------------------------------------------------
# Sources: records {"image": uint8 (H, W, 3) RGB, "label": uint8 (H, W)}, labels 0..C-1 or 255.

# mmseg's ADE20KDataset.CLASSES, in label order (mmseg spells the 8th 'bed ', with a space).
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug",
    "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
    "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track",
    "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer",
    "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag",
    "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave",
    "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate",
    "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)

# label -> label of mmseg's reduce_zero_label: 0 ("other") -> 255, k -> k - 1, 255 stays 255.
_REDUCE_ZERO_LUT = np.array([IGNORE_INDEX] + list(range(254)) + [IGNORE_INDEX], np.uint8)


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
  """mmseg's reduce_zero_label on a uint8 label map: 0 -> 255, k -> k - 1, 255 stays 255."""
  return _REDUCE_ZERO_LUT[label]


def decode_label(data: bytes) -> np.ndarray:
  """Encoded label PNG -> uint8 (H, W) class ids; of an RGB(A) PNG, channel 0 (R) holds them."""
  if not data:
    raise decode.UndecodableImage("empty label file")
  try:
    with Image.open(io.BytesIO(data)) as image:
      label = np.asarray(image)  # palette images give their indices: the ids, as mmseg reads
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise decode.UndecodableImage(f"label: {type(e).__name__}: {e}") from None
  if label.ndim == 3:
    label = label[..., 0]
  if label.ndim != 2 or label.dtype != np.uint8:
    raise decode.UndecodableImage(f"label map of shape {label.shape} and dtype {label.dtype}, "
                                  "not 8-bit class ids")
  return label


def _read_bytes(path: str) -> bytes:
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError as e:  # vanished or unreadable file: a bad record, not a bug
    raise decode.UndecodableImage(f"cannot read {path}: {e.strerror}") from None


class SegmentationRecords:
  """Base of the record sets: the first `len()` of `total` records, labels mapped on reading.

  Subclasses implement `_read(index) -> (image uint8 (H, W, 3), raw label uint8 (H, W))` and
  keep only small state (paths, seeds), so grain workers receive them cheaply.
  """

  num_classes: int
  class_names: list[str]
  description: str
  reduce_zero: bool = False

  def __init__(self, total: int, limit: int = 0):
    self._length = total if limit <= 0 else min(limit, total)

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    if not 0 <= index < self._length:
      raise IndexError(f"record {index} of {self._length}")
    image, label = self._read(index)
    if image.shape[:2] != label.shape:
      raise decode.UndecodableImage(f"record {index}: image {image.shape[:2]} but label "
                                    f"{label.shape}")
    return {"image": image, "label": reduce_zero_label(label) if self.reduce_zero else label}

  def _read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
    raise NotImplementedError

  def __repr__(self) -> str:
    return f"{type(self).__name__}({self.description}, {len(self)} records)"


def _classes(reduce_zero: bool, names: Sequence[str]) -> list[str]:
  """Class names after (or, without, before) reduce_zero_label: "other" is class 0 without."""
  return list(names) if reduce_zero else ["other", *names]


class Ade20kFolder(SegmentationRecords):
  """ADEChallengeData2016: root/images/<split>/*.jpg and root/annotations/<split>/*.png."""

  def __init__(self, root: str, split: str, reduce_zero: bool = True, limit: int = 0):
    if not root or not os.path.isdir(root):
      raise ConfigError(f"config.data.root={root!r} is not a directory (the "
                        "ADEChallengeData2016 folder)")
    image_dir = os.path.join(root, "images", split)
    label_dir = os.path.join(root, "annotations", split)
    if not os.path.isdir(image_dir):
      raise ConfigError(f"ADE20K folder {root!r} has no images/{split} directory")
    stems = sorted(os.path.splitext(f)[0] for f in os.listdir(image_dir)
                   if f.endswith(".jpg") and not f.startswith("."))
    if not stems:
      raise ConfigError(f"no .jpg images in {image_dir!r}")
    for stem in stems:
      if not os.path.isfile(os.path.join(label_dir, stem + ".png")):
        raise ConfigError(f"ADE20K image images/{split}/{stem}.jpg has no annotation "
                          f"annotations/{split}/{stem}.png under {root!r}")
    super().__init__(len(stems), limit)
    self.root, self.split, self.stems, self.reduce_zero = root, split, stems, reduce_zero
    self.num_classes = len(ADE20K_CLASSES) + (0 if reduce_zero else 1)
    self.class_names = _classes(reduce_zero, ADE20K_CLASSES)
    self.description = f"ADE20K folder {root} {split}"

  def _read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
    stem = self.stems[index]
    image = decode.decode_image(_read_bytes(
        os.path.join(self.root, "images", self.split, stem + ".jpg")))
    label = decode_label(_read_bytes(
        os.path.join(self.root, "annotations", self.split, stem + ".png")))
    return image, label


class TfdsSegmentation(SegmentationRecords):
  """A TFDS image/annotation dataset prepared as array_record, read without TensorFlow.

  Both features are read as their stored encoded bytes (`SkipDecoding`) and decoded here, as
  `sources.TfdsSource` does. Caution: TFDS's scene_parse150 1.0.0 packs the Places Challenge
  2017 *instance* annotations (annotations_instance/, R = category id of the instance task),
  not ADEChallengeData2016's 150-class semantic masks: benchmark figures need the "ade20k"
  folder source (docs/METHOD.md section 9).
  """

  def __init__(self, name: str, split: str, data_dir: str = "", image_key: str = "image",
               label_key: str = "annotation", reduce_zero: bool = True, limit: int = 0):
    self.name, self.split, self.data_dir = name, split, data_dir
    self.image_key, self.label_key, self.reduce_zero = image_key, label_key, reduce_zero
    self._source = None
    super().__init__(len(self._open()), limit)
    self.num_classes = len(ADE20K_CLASSES) + (0 if reduce_zero else 1)
    self.class_names = _classes(reduce_zero, ADE20K_CLASSES)
    self.description = f"TFDS {name}/{split} in {data_dir or '(default data_dir)'}"

  def _open(self):
    if self._source is None:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      try:
        builder = tfds.builder(self.name, data_dir=self.data_dir or None)
      except Exception as e:  # tfds raises several types for a missing or unknown dataset
        raise ConfigError(
            f"TFDS dataset {self.name!r} not found in data_dir={self.data_dir or '(default)'}: "
            f"{str(e).splitlines()[0]}") from None
      missing = {self.image_key, self.label_key} - set(builder.info.features)
      if missing:
        raise ConfigError(f"TFDS dataset {self.name!r} has no {sorted(missing)} feature; "
                          f"features: {sorted(builder.info.features)}")
      skip = tfds.decode.SkipDecoding()
      try:
        self._source = builder.as_data_source(
            split=self.split, decoders={self.image_key: skip, self.label_key: skip})
      except (ValueError, KeyError, NotImplementedError, FileNotFoundError) as e:
        raise ConfigError(f"TFDS dataset {self.name!r} split {self.split!r} cannot be read as "
                          f"an array_record data source: {str(e).splitlines()[0]}") from None
    return self._source

  def _read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
    example = self._open()[index]
    return (decode.decode_image(bytes(example[self.image_key])),
            decode_label(bytes(example[self.label_key])))

  def __getstate__(self):
    # Each worker opens its own file handles.
    return {**self.__dict__, "_source": None}


# The synthetic set: class -> (name, embedded photo that textures it).
SYNTHETIC_CLASSES = (("background", "brick"), ("disc", "astronaut"), ("square", "rocket"),
                     ("triangle", "immunohistochemistry"), ("ring", "hubble_deep_field"),
                     ("stripe", "coffee"))
SYNTHETIC_SPLIT_SEEDS = {"train": 0, "eval": 1}  # disjoint record streams per split
SYNTHETIC_SIDES = (64, 160)  # inclusive range of image sides
_PHOTOS: dict[str, np.ndarray] = {}  # per process: records stay cheap to pickle


def _photo(name: str) -> np.ndarray:
  if name not in _PHOTOS:
    split = "train" if name in sources.EMBEDDED_SPLITS["train"] else "heldout"
    source = sources.EmbeddedSource(split)
    _PHOTOS[name] = source[source.names.index(name)].data
  return _PHOTOS[name]


def shape_mask(kind: str, params: tuple[float, ...], height: int, width: int) -> np.ndarray:
  """Exact bool mask of a shape, tested at pixel centres (no anti-aliasing).

  disc (cy, cx, r); square (cy, cx, half side); triangle (y0, x0, y1, x1, y2, x2), borders in;
  ring (cy, cx, inner r, outer r); stripe (cy, cx, angle, half width): a band through the image.
  """
  y, x = np.mgrid[:height, :width] + 0.5
  if kind == "disc":
    cy, cx, r = params
    return (y - cy) ** 2 + (x - cx) ** 2 <= r ** 2
  if kind == "square":
    cy, cx, half = params
    return (np.abs(y - cy) <= half) & (np.abs(x - cx) <= half)
  if kind == "triangle":
    corners = np.reshape(params, (3, 2))
    sides = [(x - corners[i, 1]) * (corners[(i + 1) % 3, 0] - corners[i, 0])
             - (y - corners[i, 0]) * (corners[(i + 1) % 3, 1] - corners[i, 1]) for i in range(3)]
    return ((sides[0] >= 0) & (sides[1] >= 0) & (sides[2] >= 0)) | (
        (sides[0] <= 0) & (sides[1] <= 0) & (sides[2] <= 0))
  if kind == "ring":
    cy, cx, inner, outer = params
    distance2 = (y - cy) ** 2 + (x - cx) ** 2
    return (distance2 >= inner ** 2) & (distance2 <= outer ** 2)
  if kind == "stripe":
    cy, cx, angle, half = params
    return np.abs((x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)) <= half
  raise ValueError(f"unknown shape {kind!r}")


def synthetic_layout(split_seed: int, index: int
                     ) -> tuple[int, int, list[tuple[int, tuple[float, ...]]], tuple[int, ...]]:
  """(height, width, [(class, shape params)] in drawing order, ignore box (y0, y1, x0, x1) or
  ()) of one synthetic record: a pure function of (split_seed, index)."""
  rng = np.random.default_rng([split_seed, index])
  height, width = (int(v) for v in rng.integers(SYNTHETIC_SIDES[0], SYNTHETIC_SIDES[1] + 1, 2))
  side = min(height, width)
  shapes = []
  for cls in 1 + rng.permutation(len(SYNTHETIC_CLASSES) - 1)[:rng.integers(2, 5)]:
    cy, cx = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width
    size = rng.uniform(0.15, 0.35) * side
    kind = SYNTHETIC_CLASSES[cls][0]
    if kind in ("disc", "square"):
      params = (cy, cx, size)
    elif kind == "triangle":
      angles = rng.uniform(0, 2 * np.pi) + np.array([0, 2, 4]) * np.pi / 3
      params = tuple(np.stack([cy + size * np.sin(angles), cx + size * np.cos(angles)],
                              1).ravel())
    elif kind == "ring":
      params = (cy, cx, 0.5 * size, size)
    else:
      params = (cy, cx, rng.uniform(0, np.pi), rng.uniform(0.05, 0.1) * side)
    shapes.append((int(cls), tuple(float(p) for p in params)))
  ignore = ()
  if rng.random() < 0.5:  # a small "other" region in half of the images
    y0, x0 = int(rng.integers(0, height - 8)), int(rng.integers(0, width - 8))
    ignore = (y0, y0 + int(rng.integers(4, 9)), x0, x0 + int(rng.integers(4, 9)))
  return height, width, shapes, ignore


class SyntheticSegmentation(SegmentationRecords):
  """Embedded synthetic scenes, made at run time: textured shapes on a textured background.

  Every class is textured by its own embedded photo (SYNTHETIC_CLASSES), labels come from exact
  geometry (`shape_mask`), later shapes cover earlier ones, and half of the images hold a small
  region of noise labelled IGNORE_INDEX.
  """

  def __init__(self, split: str, num_images: int, limit: int = 0):
    if split not in SYNTHETIC_SPLIT_SEEDS:
      raise ValueError(f"split {split!r} must be one of {sorted(SYNTHETIC_SPLIT_SEEDS)}")
    if num_images <= 0:
      raise ConfigError(f"the synthetic {split} split needs a positive number of images, got "
                        f"{num_images}")
    super().__init__(num_images, limit)
    self.split, self.split_seed = split, SYNTHETIC_SPLIT_SEEDS[split]
    self.num_classes = len(SYNTHETIC_CLASSES)
    self.class_names = [name for name, _ in SYNTHETIC_CLASSES]
    self.description = f"synthetic shapes {split}"

  def _read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
    height, width, shapes, ignore = synthetic_layout(self.split_seed, index)
    rng = np.random.default_rng([self.split_seed, index, 1])  # texture offsets
    label = np.zeros((height, width), np.uint8)
    image = self._texture(0, height, width, rng)
    for cls, params in shapes:
      mask = shape_mask(SYNTHETIC_CLASSES[cls][0], params, height, width)
      label[mask] = cls
      image[mask] = self._texture(cls, height, width, rng)[mask]
    if ignore:
      y0, y1, x0, x1 = ignore
      label[y0:y1, x0:x1] = IGNORE_INDEX
      image[y0:y1, x0:x1] = rng.integers(0, 256, (y1 - y0, x1 - x0, 3), np.uint8)
    return image, label

  @staticmethod
  def _texture(cls: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A random height x width window of the class's photo."""
    photo = _photo(SYNTHETIC_CLASSES[cls][1])
    y0 = int(rng.integers(0, photo.shape[0] - height + 1))
    x0 = int(rng.integers(0, photo.shape[1] - width + 1))
    return photo[y0:y0 + height, x0:x0 + width].copy()


def splits(d: ml_collections.ConfigDict) -> tuple[SegmentationRecords, SegmentationRecords]:
  """(train records, eval records) of config.data `d`: the first num_images / num_eval_images."""
  if d.source == "synthetic":
    # The synthetic set brings its own classes: data.num_classes is not checked against it.
    return (SyntheticSegmentation("train", d.synthetic_train_images, d.num_images),
            SyntheticSegmentation("eval", d.synthetic_eval_images, d.num_eval_images))
  if d.source == "ade20k":
    train = Ade20kFolder(d.root, "training", d.reduce_zero_label, d.num_images)
    evaluation = Ade20kFolder(d.root, "validation", d.reduce_zero_label, d.num_eval_images)
  elif d.source == "tfds":
    kwargs = dict(data_dir=d.tfds_data_dir, image_key=d.tfds_image_key,
                  label_key=d.tfds_label_key, reduce_zero=d.reduce_zero_label)
    train = TfdsSegmentation(d.tfds_name, d.tfds_split, limit=d.num_images, **kwargs)
    evaluation = TfdsSegmentation(d.tfds_name, d.tfds_eval_split, limit=d.num_eval_images,
                                  **kwargs)
  else:
    raise ConfigError(f"config.data.source={d.source!r} must be 'synthetic', 'ade20k' or 'tfds'")
  if d.num_classes != train.num_classes:
    raise ConfigError(f"config.data.num_classes={d.num_classes} but {train.description} has "
                      f"{train.num_classes} classes (reduce_zero_label={d.reduce_zero_label})")
  return train, evaluation


# ----------------------------------------------------------------------------------------------
# mmseg's ADE20K train pipeline: Resize(ratio_range) -> RandomCrop(cat_max_ratio) -> RandomFlip
# -> PhotoMetricDistortion -> Pad, on uint8 RGB (mmseg works on BGR; the ops are per-pixel or
# go through HSV, so RGB with OpenCV's RGB<->HSV is the same computation).

CROP_TRIES = 10  # mmseg RandomCrop's re-draws for cat_max_ratio


def draw_scale(scale: Sequence[int], ratio_range: Sequence[float], rng: np.random.Generator
               ) -> tuple[int, int]:
  """mmseg Resize's random_sample_ratio: `scale` times r ~ U(ratio_range), each side truncated."""
  low, high = ratio_range
  ratio = rng.random() * (high - low) + low
  return int(scale[0] * ratio), int(scale[1] * ratio)


def rescale(image: np.ndarray, label: np.ndarray, scale: Sequence[int]
            ) -> tuple[np.ndarray, np.ndarray]:
  """Keep-ratio rescale to `scale` (`rescale_size`): image bilinear, label nearest."""
  height, width = rescale_size(*label.shape, scale)
  # The label's nearest neighbour is taken at each pixel's centre, where the bilinear image is
  # sampled. mmcv's cv2.INTER_NEAREST takes floor(i * step) instead, which shifts every label
  # edge against the image by up to half a source pixel (docs/METHOD.md section 9).
  return (cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR),
          cv2.resize(label, (width, height), interpolation=cv2.INTER_NEAREST_EXACT))


def crop_box(label: np.ndarray, crop_size: int, cat_max_ratio: float,
             rng: np.random.Generator) -> tuple[int, int, int, int]:
  """(y0, y1, x0, x1) of mmseg's RandomCrop; y1, x1 may pass the border of a smaller image.

  A box is accepted when its non-ignored pixels hold more than one class and the largest class
  has a share below cat_max_ratio; after CROP_TRIES rejected boxes, one more is drawn and kept
  unchecked, as mmseg does.
  """
  height, width = label.shape

  def draw():
    y0 = int(rng.integers(0, max(height - crop_size, 0) + 1))
    x0 = int(rng.integers(0, max(width - crop_size, 0) + 1))
    return y0, y0 + crop_size, x0, x0 + crop_size

  box = draw()
  if cat_max_ratio < 1.0:
    for _ in range(CROP_TRIES):
      y0, y1, x0, x1 = box
      if crop_acceptable(label[y0:y1, x0:x1], cat_max_ratio):
        break
      box = draw()
  return box


def crop_acceptable(label: np.ndarray, cat_max_ratio: float) -> bool:
  """Whether a label crop has > 1 class and its largest class's share of the non-ignored
  pixels is below cat_max_ratio (mmseg RandomCrop)."""
  counts = np.bincount(label.ravel(), minlength=256)[:IGNORE_INDEX]
  counts = counts[counts > 0]
  return len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio


def _affine_uint8(values: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
  """mmseg's PhotoMetricDistortion.convert: float32 values * alpha + beta, clipped, truncated."""
  return np.clip(values.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def shift_brightness(image: np.ndarray, delta: float) -> np.ndarray:
  return _affine_uint8(image, beta=delta)


def scale_contrast(image: np.ndarray, factor: float) -> np.ndarray:
  return _affine_uint8(image, alpha=factor)


def scale_saturation(image: np.ndarray, factor: float) -> np.ndarray:
  """Multiplies OpenCV's 8-bit HSV saturation by `factor`."""
  hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
  hsv[..., 1] = _affine_uint8(hsv[..., 1], alpha=factor)
  return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def shift_hue(image: np.ndarray, delta: int) -> np.ndarray:
  """Adds `delta` to OpenCV's 8-bit hue (0..179, 2 degrees a step), wrapping around."""
  hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
  hsv[..., 0] = (hsv[..., 0].astype(np.int32) + delta) % 180
  return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def photo_metric_distortion(image: np.ndarray, rng: np.random.Generator, *,
                            brightness_delta: int = 32,
                            contrast_range: tuple[float, float] = (0.5, 1.5),
                            saturation_range: tuple[float, float] = (0.5, 1.5),
                            hue_delta: int = 18) -> np.ndarray:
  """mmseg's PhotoMetricDistortion, with its order of random draws.

  Each op applies with probability 0.5; contrast comes second or last (a fair coin). The hue
  delta is numpy's randint(-hue_delta, hue_delta): the upper end excluded, as in mmseg.
  """
  if rng.integers(2):
    image = shift_brightness(image, rng.uniform(-brightness_delta, brightness_delta))
  contrast_first = rng.integers(2)
  if contrast_first and rng.integers(2):
    image = scale_contrast(image, rng.uniform(*contrast_range))
  if rng.integers(2):
    image = scale_saturation(image, rng.uniform(*saturation_range))
  if rng.integers(2):
    image = shift_hue(image, int(rng.integers(-hue_delta, hue_delta)))
  if not contrast_first and rng.integers(2):
    image = scale_contrast(image, rng.uniform(*contrast_range))
  return image


def pad_to(array: np.ndarray, size: int, value) -> np.ndarray:
  """`array` padded at the bottom and right to size x size with `value` (mmseg Pad)."""
  out = np.empty((size, size) + array.shape[2:], np.uint8)
  out[...] = value
  out[:array.shape[0], :array.shape[1]] = array
  return out


class TrainTransform(grain.transforms.RandomMap):
  """A record -> {"image": uint8 (S, S, 3), "label": uint8 (S, S)}, S = crop_size."""

  def __init__(self, crop_size: int, scale: Sequence[int], ratio_range: Sequence[float],
               cat_max_ratio: float, flip_prob: float, photometric: bool):
    self.crop_size, self.scale, self.ratio_range = int(crop_size), tuple(scale), tuple(ratio_range)
    self.cat_max_ratio, self.flip_prob, self.photometric = cat_max_ratio, flip_prob, photometric

  @classmethod
  def from_config(cls, d: ml_collections.ConfigDict) -> "TrainTransform":
    return cls(d.crop_size, d.scale, d.ratio_range, d.cat_max_ratio, d.flip_prob, d.photometric)

  def random_map(self, record, rng: np.random.Generator) -> dict[str, np.ndarray]:
    image, label = rescale(record["image"], record["label"],
                           draw_scale(self.scale, self.ratio_range, rng))
    y0, y1, x0, x1 = crop_box(label, self.crop_size, self.cat_max_ratio, rng)
    image = np.ascontiguousarray(image[y0:y1, x0:x1])
    label = np.ascontiguousarray(label[y0:y1, x0:x1])
    if rng.random() < self.flip_prob:  # drawn always, so flip_prob changes no other draw
      image, label = cv2.flip(image, 1), cv2.flip(label, 1)
    if self.photometric:
      image = photo_metric_distortion(image, rng)
    # mmseg pads the normalised image with 0: the mean colour here, before normalisation.
    return {"image": pad_to(image, self.crop_size, MEAN_RGB_UINT8),
            "label": pad_to(label, self.crop_size, IGNORE_INDEX)}


def train_dataset(config: ml_collections.ConfigDict, records) -> grain.IterDataset:
  """Shuffled, repeated, augmented batches of this process's share of the global batch."""
  d = config.data
  ds = grain.MapDataset.source(records)[jax.process_index()::jax.process_count()]
  ds = ds.seed(config.seed).shuffle().repeat().random_map(TrainTransform.from_config(d))
  ds = ds.batch(sharding.process_batch_size(config.batch_size), drop_remainder=True)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
  return pipeline.in_workers(ds, d)
