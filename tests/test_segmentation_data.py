"""Segmentation data: sources (synthetic, ADE20K folder, TFDS fixture), mmseg's train pipeline."""

import io
import os
import pickle
import sys

import cv2
import ml_collections
import numpy as np
import pytest
from PIL import Image

from cim_jax.data import segmentation as seg

FIXTURE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "tfds")
# Colours of block labels 0..5 in the alignment tests: far apart, none the padding colour.
PALETTE = np.array([(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30),
                    (30, 200, 200), (200, 30, 200)], np.uint8)


def _data(**overrides) -> ml_collections.ConfigDict:
  data = ml_collections.ConfigDict(dict(
      source="synthetic", root="", tfds_name="scene_parse150", tfds_split="train",
      tfds_eval_split="test", tfds_data_dir=FIXTURE_DIR, tfds_image_key="image",
      tfds_label_key="annotation", num_classes=150, reduce_zero_label=True, crop_size=32,
      scale=(128, 32), ratio_range=(0.5, 2.0), cat_max_ratio=0.75, flip_prob=0.5,
      photometric=True, num_workers=0, worker_buffer_size=2, num_images=0, num_eval_images=0,
      synthetic_train_images=8, synthetic_eval_images=4))
  data.update(overrides)
  return data


def _transform(**overrides) -> seg.TrainTransform:
  return seg.TrainTransform.from_config(_data(**overrides))


def _blocks(height: int, width: int, block: int, seed: int = 0) -> np.ndarray:
  """A label map of block x block squares of random labels 0..5."""
  rng = np.random.default_rng(seed)
  cells = rng.integers(0, len(PALETTE), (-(-height // block), -(-width // block)))
  return np.kron(cells, np.ones((block, block), np.int64))[:height, :width].astype(np.uint8)


# ---- train transform ----

@pytest.mark.parametrize("seed", range(12))
def test_transform_keeps_image_and_label_aligned(seed):
  label = _blocks(96, 144, block=24, seed=seed)
  transform = _transform(crop_size=64, scale=(256, 64), photometric=False)
  out = transform.random_map({"image": PALETTE[label], "label": label},
                             np.random.default_rng(seed))
  image, out_label = out["image"], out["label"]
  assert image.shape == (64, 64, 3) and out_label.shape == (64, 64)
  assert image.dtype == out_label.dtype == np.uint8
  # The first draw is the scale: the rescaled size is rescale_size's, cropped to 64.
  scale = seg.draw_scale((256, 64), (0.5, 2.0), np.random.default_rng(seed))
  height, width = (min(64, side) for side in seg.rescale_size(96, 144, scale))
  assert (out_label[:height, :width] != seg.IGNORE_INDEX).all()
  assert (out_label[height:] == seg.IGNORE_INDEX).all()
  assert (out_label[:, width:] == seg.IGNORE_INDEX).all()
  assert (image[height:] == seg.MEAN_RGB_UINT8).all()
  assert (image[:, width:] == seg.MEAN_RGB_UINT8).all()
  # Bilinear blends colours near block edges only: it reads source pixels within 0.5 + 1.5 f
  # output pixels (f = output / input size <= 4/3 here) of the pixel nearest-neighbour takes
  # the label from, so every pixel whose 7 x 7 neighbourhood has one label keeps its colour.
  # Pixels within 3 of the crop's border are not judged: the neighbourhood was cut off.
  valid = out_label[:height, :width]
  kernel = np.ones((7, 7), np.uint8)
  interior = (cv2.erode(valid, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0)
              == cv2.dilate(valid, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=255))
  assert interior.mean() > 0.15
  np.testing.assert_array_equal(image[:height, :width][interior], PALETTE[valid[interior]])


def test_flip_mirrors_image_and_label_alike_and_changes_no_other_draw():
  label = _blocks(160, 240, block=20)
  record = {"image": PALETTE[label], "label": label}
  kept, flipped = (
      _transform(crop_size=48, scale=(1024, 256), flip_prob=prob).random_map(
          record, np.random.default_rng(3)) for prob in (0.0, 1.0))
  assert (kept["label"] != seg.IGNORE_INDEX).all()  # no padding: the whole crop mirrors
  np.testing.assert_array_equal(flipped["label"], kept["label"][:, ::-1])
  # The photometric ops act per pixel, so they commute with the flip when they draw the same
  # numbers; OpenCV's HSV conversion rounds a vectorised row's tail its own way (1 level).
  difference = flipped["image"].astype(int) - kept["image"][:, ::-1]
  assert np.abs(difference).max() <= 1 and np.mean(difference != 0) < 0.1


def test_draw_scale_spans_the_ratio_range_and_rescale_follows_rescale_size():
  rng = np.random.default_rng(0)
  scales = np.array([seg.draw_scale((2048, 512), (0.5, 2.0), rng) for _ in range(2000)])
  assert scales[:, 0].min() >= 1024 and scales[:, 0].max() <= 4096
  assert scales[:, 0].min() < 1100 and scales[:, 0].max() > 3950  # the whole range is drawn
  assert (np.abs(scales[:, 1] - scales[:, 0] / 4) < 1).all()  # one ratio, each side truncated
  label = _blocks(50, 70, block=10) * 40  # far apart: a blend of two labels is no label
  for scale in [(1024, 256), (4000, 1000), (300, 40)]:
    image, resized = seg.rescale(PALETTE[label // 40], label, scale)
    assert resized.shape == seg.rescale_size(50, 70, scale) == image.shape[:2]
    assert set(np.unique(resized)) <= set(np.unique(label))  # nearest: no blended labels


@pytest.mark.parametrize("shape,scale", [((250, 400), (256, 100)), ((96, 64), (512, 160)),
                                         ((171, 333), (2048, 512))])
def test_rescaled_label_is_sampled_at_the_pixel_centres_the_image_is(shape, scale):
  """Label pixel (i, j) of the rescaled map is the source label under that pixel's centre
  ((i + 0.5) * step in source coordinates), where the bilinear image is centred too; sampling
  at floor(i * step) would move every edge by up to half a source pixel against the image."""
  rng = np.random.default_rng(0)
  label = rng.integers(0, 150, shape).astype(np.uint8)
  image = np.zeros(shape + (3,), np.uint8)
  _, rescaled = seg.rescale(image, label, scale)
  height, width = seg.rescale_size(*shape, scale)
  # A centre exactly on a source pixel boundary may take either neighbour (OpenCV: the lower).
  centres = lambda n, m: (np.arange(n) + 0.5) * m / n
  below = lambda c: np.clip(np.ceil(c).astype(int) - 1, 0, None)
  row_c, col_c = centres(height, shape[0]), centres(width, shape[1])
  matches = np.zeros((height, width), bool)
  for rows in (np.floor(row_c).astype(int), below(row_c)):
    for cols in (np.floor(col_c).astype(int), below(col_c)):
      matches |= rescaled == label[rows][:, cols]
  assert matches.all(), f"{(~matches).sum()} label pixels are not the source pixel at the centre"


def test_crop_acceptable_ignores_255_and_needs_two_classes():
  crop = np.full((10, 10), seg.IGNORE_INDEX, np.uint8)
  crop[:, :4] = 0  # 40 pixels of class 0
  crop[:, 4] = 1  # 10 of class 1: class 0 holds 80% of the non-ignored pixels
  assert not seg.crop_acceptable(crop, 0.75)
  assert seg.crop_acceptable(crop, 0.85)
  assert not seg.crop_acceptable(np.zeros((10, 10), np.uint8), 1.0)  # one class never passes


def test_crop_box_retries_for_cat_max_ratio():
  label = np.zeros((128, 128), np.uint8)
  label[:48, :48] = 1  # only crops near the top-left corner hold enough of class 1
  offsets = range(128 - 64 + 1)
  single = np.mean([seg.crop_acceptable(label[y:y + 64, x:x + 64], 0.75)
                    for y in offsets for x in offsets])
  assert 0.05 < single < 0.3

  def accepted_share(cat_max_ratio):
    boxes = [seg.crop_box(label, 64, cat_max_ratio, np.random.default_rng(i)) for i in range(400)]
    return np.mean([seg.crop_acceptable(label[y0:y1, x0:x1], 0.75) for y0, y1, x0, x1 in boxes])

  # Ten checked draws and one last unchecked one: accepted with probability 1 - (1 - p)^11.
  assert abs(accepted_share(0.75) - (1 - (1 - single) ** 11)) < 0.09
  assert abs(accepted_share(1.0) - single) < 0.09  # cat_max_ratio 1: the first box, unchecked


def test_crop_box_of_a_small_image_starts_at_the_origin():
  assert seg.crop_box(np.zeros((20, 30), np.uint8), 64, 0.75, np.random.default_rng(0)) == (
      0, 64, 0, 64)


# ---- photometric distortion ----

def test_brightness_and_contrast_are_mmseg_float_ops_truncated():
  values = np.array([[0, 3, 100, 250]], np.uint8)
  np.testing.assert_array_equal(seg.shift_brightness(values, 10.7), [[10, 13, 110, 255]])
  np.testing.assert_array_equal(seg.shift_brightness(values, -5.5), [[0, 0, 94, 244]])
  np.testing.assert_array_equal(seg.scale_contrast(values, 1.5), [[0, 4, 150, 255]])
  np.testing.assert_array_equal(seg.scale_contrast(values, 0.5), [[0, 1, 50, 125]])


def test_hue_shift_wraps_and_saturation_scales():
  red = np.array([[[255, 0, 0]]], np.uint8)
  np.testing.assert_array_equal(seg.shift_hue(red, 60), [[[0, 255, 0]]])  # 120 degrees
  # OpenCV hue 0 - 18 wraps to 162 (324 degrees): red with blue at (360 - 324) / 60 of full.
  np.testing.assert_allclose(seg.shift_hue(red, -18)[0, 0], [255, 0, 153], atol=1)
  np.testing.assert_allclose(seg.scale_saturation(red, 0.5)[0, 0], [255, 128, 128], atol=1)
  grey = np.full((2, 2, 3), 77, np.uint8)
  np.testing.assert_array_equal(seg.scale_saturation(grey, 1.5), grey)
  np.testing.assert_array_equal(seg.shift_hue(grey, 17), grey)


class _ScriptedRng:
  """Answers integers() / uniform() from scripts, to force each op of the distortion."""

  def __init__(self, integers, uniforms):
    self._integers, self._uniforms = list(integers), list(uniforms)

  def integers(self, *args):
    del args
    return self._integers.pop(0)

  def uniform(self, *args):
    del args
    return self._uniforms.pop(0)


def test_photometric_order_follows_mmseg():
  image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), np.uint8)
  # brightness on (+10), mode 0 (contrast last), saturation on (x0.7), hue on (+5), contrast on.
  rng = _ScriptedRng([1, 0, 1, 1, 5, 1], [10.0, 0.7, 1.4])
  expected = seg.scale_contrast(seg.shift_hue(seg.scale_saturation(
      seg.shift_brightness(image, 10.0), 0.7), 5), 1.4)
  np.testing.assert_array_equal(seg.photo_metric_distortion(image, rng), expected)
  # Mode 1: contrast second; brightness off, saturation off, hue on (-3).
  rng = _ScriptedRng([0, 1, 1, 0, 1, -3], [0.6])
  expected = seg.shift_hue(seg.scale_contrast(image, 0.6), -3)
  np.testing.assert_array_equal(seg.photo_metric_distortion(image, rng), expected)


def test_photometric_brightness_statistics_and_reproducibility():
  grey = np.full((4, 4, 3), 128, np.uint8)  # saturation and hue leave grey as it is
  shifts = np.array([int(seg.photo_metric_distortion(
      grey, np.random.default_rng(i), contrast_range=(1.0, 1.0))[0, 0, 0]) - 128
                     for i in range(400)])
  assert shifts.min() >= -32 and shifts.max() <= 32  # delta ~ U(-32, 32)
  assert 0.4 < np.mean(shifts != 0) < 0.6  # applied with probability 0.5
  assert shifts.min() < -25 and shifts.max() > 25
  image = np.random.default_rng(1).integers(0, 256, (16, 16, 3), np.uint8)
  first = seg.photo_metric_distortion(image, np.random.default_rng(5))
  np.testing.assert_array_equal(first, seg.photo_metric_distortion(image, np.random.default_rng(5)))
  changed = [not np.array_equal(seg.photo_metric_distortion(image, np.random.default_rng(i)),
                                image) for i in range(64)]
  assert 0.8 < np.mean(changed) < 1.0  # all four ops skipped: 1 / 16


# ---- sources ----

def _write_ade(root, split, stems_and_labels):
  for stem, label in stems_and_labels.items():
    os.makedirs(root / "images" / split, exist_ok=True)
    os.makedirs(root / "annotations" / split, exist_ok=True)
    image = PALETTE[label % len(PALETTE)]
    Image.fromarray(image).save(root / "images" / split / f"{stem}.jpg", quality=95)
    Image.fromarray(label, "L").save(root / "annotations" / split / f"{stem}.png")


def test_ade20k_folder_maps_labels_and_names_classes(tmp_path):
  first = np.array([[0, 1, 2], [150, 255, 7]], np.uint8).repeat(4, 0).repeat(4, 1)
  second = np.full((12, 20), 3, np.uint8)
  _write_ade(tmp_path, "training", {"b_0002": second, "a_0001": first})
  _write_ade(tmp_path, "validation", {"v_0001": second[:10]})
  train, evaluation = seg.splits(_data(source="ade20k", root=str(tmp_path)))
  assert (len(train), len(evaluation)) == (2, 1)
  assert train.num_classes == 150 and len(train.class_names) == 150
  assert train.class_names[:3] == ["wall", "building", "sky"] and train.class_names[-1] == "flag"
  record = train[0]  # sorted by name: a_0001
  assert record["image"].shape == (8, 12, 3) and record["label"].dtype == np.uint8
  np.testing.assert_array_equal(
      record["label"][::4, ::4], [[255, 0, 1], [149, 255, 6]])  # 0 and 255 -> 255, k -> k - 1
  assert evaluation[0]["label"].shape == (10, 20) and (evaluation[0]["label"] == 2).all()
  limited, _ = seg.splits(_data(source="ade20k", root=str(tmp_path), num_images=1))
  assert len(limited) == 1
  whole, _ = seg.splits(_data(source="ade20k", root=str(tmp_path), reduce_zero_label=False,
                              num_classes=151))
  assert whole.class_names[0] == "other" and whole[0]["label"][0, 0] == 0


def test_ade20k_folder_errors_are_one_line(tmp_path):
  with pytest.raises(ValueError, match=r"config.data.root='.*missing' is not a directory"):
    seg.splits(_data(source="ade20k", root=str(tmp_path / "missing")))
  with pytest.raises(ValueError, match="has no images/training directory"):
    seg.splits(_data(source="ade20k", root=str(tmp_path)))
  _write_ade(tmp_path, "training", {"a": np.zeros((4, 4), np.uint8)})
  _write_ade(tmp_path, "validation", {"v": np.zeros((4, 4), np.uint8)})
  os.remove(tmp_path / "annotations" / "training" / "a.png")
  with pytest.raises(ValueError, match=r"images/training/a.jpg has no annotation") as error:
    seg.splits(_data(source="ade20k", root=str(tmp_path)))
  assert "\n" not in str(error.value)
  _write_ade(tmp_path, "training", {"a": np.zeros((4, 4), np.uint8)})
  with pytest.raises(ValueError, match="num_classes=19 but .* has 150 classes"):
    seg.splits(_data(source="ade20k", root=str(tmp_path), num_classes=19))
  with pytest.raises(ValueError, match="'cityscapes'"):
    seg.splits(_data(source="cityscapes"))


def test_rgb_label_png_reads_its_red_channel():
  rgb = np.zeros((3, 4, 3), np.uint8)
  rgb[..., 0], rgb[..., 1] = 9, 200  # R: category, G: an instance id to ignore
  buffer = io.BytesIO()
  Image.fromarray(rgb).save(buffer, "PNG")
  np.testing.assert_array_equal(seg.decode_label(buffer.getvalue()), np.full((3, 4), 9))


def test_tfds_fixture_reads_without_tensorflow_and_maps_labels():
  train, evaluation = seg.splits(_data(source="tfds"))
  assert (len(train), len(evaluation)) == (4, 2)
  assert "tensorflow" not in sys.modules
  seen = set()
  for records in (train, evaluation):
    for i in range(len(records)):
      record = records[i]
      assert record["image"].shape[:2] == record["label"].shape
      assert record["image"].std() > 10  # photos, not blank images
      encoded = records._open()[i]["annotation"]  # pylint: disable=protected-access
      red = np.asarray(Image.open(io.BytesIO(encoded)))[..., 0]
      np.testing.assert_array_equal(record["label"], np.where(red == 0, 255, red - 1))
      seen |= set(np.unique(record["label"]).tolist())
  assert seen == {0, 6, 149, 255}
  copy = pickle.loads(pickle.dumps(train))
  np.testing.assert_array_equal(copy[1]["label"], train[1]["label"])


def test_tfds_errors_are_one_line(tmp_path):
  with pytest.raises(ValueError, match="TFDS dataset 'no_such_dataset' not found") as error:
    seg.TfdsSegmentation("no_such_dataset", "train", str(tmp_path))
  assert "\n" not in str(error.value)
  with pytest.raises(ValueError, match=r"has no \['segmentation'\] feature"):
    seg.TfdsSegmentation("scene_parse150", "train", FIXTURE_DIR, label_key="segmentation")
  with pytest.raises(ValueError, match="num_classes=151 but TFDS scene_parse150/train"):
    seg.splits(_data(source="tfds", num_classes=151))


def test_synthetic_is_deterministic_disjoint_and_exact():
  train, evaluation = seg.splits(_data(synthetic_train_images=8, synthetic_eval_images=4,
                                       num_eval_images=3))
  assert (len(train), len(evaluation)) == (8, 3)
  assert train.class_names[:2] == ["background", "disc"] and train.num_classes == 6
  again = seg.SyntheticSegmentation("train", 8)
  labels, shapes = set(), set()
  for i in range(len(train)):
    record = train[i]
    np.testing.assert_array_equal(record["image"], again[i]["image"])
    np.testing.assert_array_equal(record["label"], again[i]["label"])
    labels |= set(np.unique(record["label"]).tolist())
    shapes.add(record["label"].shape)
  assert labels == {0, 1, 2, 3, 4, 5, 255}
  assert len(shapes) == len(train) and any(h > w for h, w in shapes) and any(
      h < w for h, w in shapes)
  assert all(64 <= side <= 160 for shape in shapes for side in shape)
  train_images = [train[i]["image"].tobytes() for i in range(len(train))]
  assert not {evaluation[i]["image"].tobytes() for i in range(len(evaluation))} & set(
      train_images)
  assert len(pickle.dumps(train)) < 2000  # grain workers get no arrays
  # Labels are the shapes' exact masks (`shape_mask`, checked below), later ones on top.
  for i in range(len(train)):
    height, width, layout, ignore = seg.synthetic_layout(seg.SYNTHETIC_SPLIT_SEEDS["train"], i)
    expected = np.zeros((height, width), np.uint8)
    for cls, params in layout:
      expected[seg.shape_mask(seg.SYNTHETIC_CLASSES[cls][0], params, height, width)] = cls
    if ignore:
      y0, y1, x0, x1 = ignore
      expected[y0:y1, x0:x1] = seg.IGNORE_INDEX
    np.testing.assert_array_equal(train[i]["label"], expected)


def test_disc_mask_is_the_analytic_disc_at_pixel_centres():
  on_border = seg.shape_mask("disc", (5.5, 5.5, 3.0), 12, 12)  # pixel centre (8.5, 5.5) at r
  assert on_border[8, 5] and not on_border[9, 5] and on_border.sum() == 29
  cy, cx, r = 10.3, 7.9, 5.2
  mask = seg.shape_mask("disc", (cy, cx, r), 20, 18)
  expected = [[(y + 0.5 - cy) ** 2 + (x + 0.5 - cx) ** 2 <= r * r for x in range(18)]
              for y in range(20)]
  np.testing.assert_array_equal(mask, expected)
  square = seg.shape_mask("square", (5.0, 5.0, 2.0), 10, 10)
  assert square.sum() == 16 and square[3:7, 3:7].all()  # centres 3.5 .. 6.5
  band = seg.shape_mask("stripe", (5.0, 5.0, 0.0, 1.0), 10, 10)  # vertical band |x - 5| <= 1
  assert band[:, 4:6].all() and band.sum() == 20


# ---- the grain dataset ----

def test_train_dataset_batches_are_shaped_and_reproducible():
  config = ml_collections.ConfigDict(dict(seed=3, batch_size=2, data=_data()))
  records, _ = seg.splits(config.data)

  def batches(seed):
    config.seed = seed
    iterator = iter(seg.train_dataset(config, records))
    return [next(iterator) for _ in range(3)]

  first = batches(3)
  for batch in first:
    assert batch["image"].shape == (2, 32, 32, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (2, 32, 32) and batch["label"].dtype == np.uint8
  for a, b in zip(first, batches(3)):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  assert not np.array_equal(first[0]["image"], batches(4)[0]["image"])


def test_train_dataset_in_a_worker_process_matches_in_process():
  config = ml_collections.ConfigDict(dict(seed=1, batch_size=2, data=_data()))
  records, _ = seg.splits(config.data)
  in_process = next(iter(seg.train_dataset(config, records)))
  config.data.num_workers = 1  # records and transform are pickled to the worker
  in_worker = next(iter(seg.train_dataset(config, records)))
  np.testing.assert_array_equal(in_worker["image"], in_process["image"])
  np.testing.assert_array_equal(in_worker["label"], in_process["label"])
