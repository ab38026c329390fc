"""Segmentation evaluation: metrics against per-class loops, the separable sliding-window stitch
against mmseg's step-by-step inference, sharded / multi-process evaluation, the example PNG."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from cim_jax import sharding
from cim_jax.models import upernet
from cim_jax.train import segmentation_eval as seg_eval

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRIDE_K, NUM_CLASSES = 4, 5  # the fake model's output stride and class count
_WEIGHTS = np.random.default_rng(7).normal(size=(3, NUM_CLASSES)).astype(np.float32)


def fake_forward(images):
  """uint8 (N, h, w, 3) -> (N, h/4, w/4, C): a fixed per-pixel map, then 4 x 4 average pooling."""
  x = jnp.sin(3.0 * (jnp.asarray(images, jnp.float32) / 255.0) @ _WEIGHTS)
  n, h, w, c = x.shape
  return x.reshape(n, h // STRIDE_K, STRIDE_K, w // STRIDE_K, STRIDE_K, c).mean(axis=(2, 4))


def random_image(shape, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (*shape, 3), np.uint8)


# ----------------------------------------------------------------------------------------------
# Metric.


def loop_scores(prediction, label, num_classes, ignore=255):
  """Per-class loops over pixel masks: IoU, Acc, aAcc (percent), NaN for absent classes."""
  valid = label != ignore
  iou, acc = [], []
  for c in range(num_classes):
    truth, guess = (label == c) & valid, (prediction == c) & valid
    union, hits = np.sum(truth | guess), np.sum(truth & guess)
    iou.append(100.0 * hits / union if union else np.nan)
    acc.append(100.0 * hits / truth.sum() if truth.sum() else np.nan)
  all_acc = 100.0 * np.sum((prediction == label) & valid) / valid.sum()
  return np.array(iou), np.array(acc), all_acc


def test_scores_equal_per_class_loops():
  rng = np.random.default_rng(0)
  label = rng.integers(0, 4, (37, 53)).astype(np.uint8)  # classes 4, 5 never in the truth
  label[rng.random(label.shape) < 0.2] = 255
  prediction = rng.integers(0, 5, label.shape)  # class 4 only predicted, class 5 nowhere
  confusion = seg_eval.confusion_matrix(prediction, label, 6)
  assert confusion.dtype == np.int64 and confusion.sum() == np.sum(label != 255)
  scores = seg_eval.segmentation_scores(confusion)
  iou, acc, all_acc = loop_scores(prediction, label, 6)
  np.testing.assert_allclose(scores["IoU"], iou, rtol=1e-12)  # NaN where NaN
  np.testing.assert_allclose(scores["Acc"], acc, rtol=1e-12)
  assert np.isnan(scores["IoU"][5]) and scores["IoU"][4] == 0 and np.isnan(scores["Acc"][4])
  assert scores["mIoU"] == pytest.approx(np.nanmean(iou), rel=1e-12)
  assert scores["mAcc"] == pytest.approx(np.nanmean(acc), rel=1e-12)
  assert scores["aAcc"] == pytest.approx(all_acc, rel=1e-12)
  # Summed over images, as evaluate accumulates it.
  halves = (seg_eval.confusion_matrix(prediction[:20], label[:20], 6)
            + seg_eval.confusion_matrix(prediction[20:], label[20:], 6))
  np.testing.assert_array_equal(halves, confusion)
  table = seg_eval.class_table(scores, [f"class{c}" for c in range(6)])
  assert "class5" in table and "nan" in table and f"{scores['mIoU']:.2f}" in table


def test_labels_outside_the_classes_are_named():
  with pytest.raises(ValueError, match=r"label values span \[0, 7\], outside the 6 classes"):
    seg_eval.confusion_matrix(np.zeros(3), np.array([0, 7, 255]), 6)


# ----------------------------------------------------------------------------------------------
# Resizing and stitching.


@pytest.mark.parametrize("in_size,out_size", [(5, 12), (12, 5), (7, 7), (16, 64), (33, 8),
                                              (1, 4), (4, 1), (128, 512), (683, 512)])
def test_bilinear_matrix_equals_torch(in_size, out_size):
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(1).normal(size=(in_size, 3, 2))  # (h, w, C), resized along h
  expected = torch.nn.functional.interpolate(
      torch.from_numpy(x).permute(2, 0, 1)[None], size=(out_size, 3), mode="bilinear",
      align_corners=False)[0].permute(1, 2, 0).numpy()
  matrix = upernet.bilinear_matrix(in_size, out_size)
  np.testing.assert_allclose(np.einsum("oi,iwc->owc", matrix, x), expected, atol=1e-6)
  # The reference inference's resize (jax.image.resize, no antialiasing) is torch's too.
  np.testing.assert_allclose(seg_eval._resize_bilinear(x.astype(np.float32), out_size, 3),
                             expected, atol=1e-5)


@pytest.mark.parametrize("shape,out_size", [
    ((24, 16), None), ((32, 32), None), ((32, 32), (41, 27)), ((45, 70), None),
    ((45, 70), (30, 47)), ((17, 50), (23, 61)), ((33, 33), (33, 33)), ((75, 31), None)])
def test_separable_stitch_equals_reference_slide_inference(shape, out_size):
  image = random_image(shape, seed=sum(shape))
  kwargs = dict(out_size=out_size, patch_multiple=8)
  fast = seg_eval.slide_inference(fake_forward, image, 32, 21, **kwargs)
  reference = seg_eval.slide_inference_reference(fake_forward, image, 32, 21, **kwargs)
  assert fast.shape == reference.shape == (*(out_size or shape), NUM_CLASSES)
  np.testing.assert_allclose(fast, reference, atol=2e-5)


@pytest.mark.parametrize("shape", [(32, 32), (24, 16)])  # the window; smaller, patch multiples
def test_one_window_equals_the_whole_image_forward(shape):
  image, out_size = random_image(shape, seed=3), (37, 29)
  whole = np.asarray(fake_forward(image[None]))[0]
  expected = seg_eval._resize_bilinear(seg_eval._resize_bilinear(whole, *shape), *out_size)
  fast = seg_eval.slide_inference(fake_forward, image, 32, 21, out_size=out_size,
                                  patch_multiple=8)
  np.testing.assert_allclose(fast, expected, atol=2e-6)


def test_windows_smaller_than_the_crop_are_padded_with_the_mean_colour():
  windows = seg_eval.window_inputs(random_image((20, 50)), 32, 21, patch_multiple=16)
  assert windows.shape == (2, 32, 32, 3)  # height 20 -> 32; width 50 -> 2 windows of 32
  np.testing.assert_array_equal(windows[:, 20:], np.broadcast_to(
      np.array(seg_eval.MEAN_RGB_UINT8, np.uint8), (2, 12, 32, 3)))


# ----------------------------------------------------------------------------------------------
# Sharded evaluation.


class Records:
  """A list of segmentation records with the attributes evaluate reads."""

  def __init__(self, records, num_classes):
    self.records, self.num_classes = records, num_classes
    self.class_names = [f"c{i}" for i in range(num_classes)]

  def __len__(self):
    return len(self.records)

  def __getitem__(self, index):
    return self.records[index]


# Original sizes, rescaled to scale (96, 48): (48, 72), (12, 96), (48, 48), (96, 21), (74, 48),
# (8, 96), (48, 48): larger than the 32 window and, along one side, smaller (odd sides
# included), so windows of 32 x 32, 16 x 32 (padded to multiples of 8), 32 x 24 and 8 x 32 are
# batched.
SIZES = [(40, 60), (10, 80), (64, 64), (90, 20), (20, 13), (8, 100), (16, 16)]


def make_records():
  rng = np.random.default_rng(5)
  records = []
  for i, size in enumerate(SIZES):
    label = rng.integers(0, NUM_CLASSES, size).astype(np.uint8)
    label[rng.random(size) < 0.1] = 255
    records.append({"image": random_image(size, seed=10 + i), "label": label})
  return Records(records, NUM_CLASSES)


def make_config(**overrides):
  return ml_collections.ConfigDict({"data": dict(
      dict(scale=(96, 48), crop_size=32, eval_stride=21, eval_batch_size=3, num_eval_images=0),
      **overrides)})


def run_evaluate(records, config, num_examples=0):
  batch_sharding = sharding.batch_sharding(sharding.make_mesh())
  forward = jax.jit(fake_forward, out_shardings=batch_sharding)
  return seg_eval.evaluate(forward, records, config, batch_sharding, num_examples=num_examples,
                           patch_multiple=8)


def loop_evaluate(records, d):
  """Image by image: rescale, reference slide inference, confusion."""
  confusion = 0
  for record in records.records:
    rescaled = seg_eval.rescale_image(record["image"], d.scale)
    logits = seg_eval.slide_inference_reference(fake_forward, rescaled, d.crop_size,
                                                d.eval_stride, out_size=record["label"].shape,
                                                patch_multiple=8)
    confusion = confusion + seg_eval.confusion_matrix(logits.argmax(-1), record["label"],
                                                      records.num_classes)
  return seg_eval.segmentation_scores(confusion)


def assert_same_scores(a, b):
  assert set(a) == set(b)
  for key in a:
    np.testing.assert_allclose(a[key], b[key], rtol=1e-12, err_msg=key)


def test_evaluate_equals_image_by_image_reference():
  records, config = make_records(), make_config()
  scores, examples = run_evaluate(records, config, num_examples=2)
  assert_same_scores(scores, loop_evaluate(records, config.data))
  assert len(examples) == 2
  image, label, prediction = examples[1]
  np.testing.assert_array_equal(image, records[1]["image"])
  assert label.shape == prediction.shape == SIZES[1]
  # data.num_eval_images: the first N records.
  first = run_evaluate(records, make_config(num_eval_images=4))[0]
  assert_same_scores(first, loop_evaluate(Records(records.records[:4], NUM_CLASSES),
                                          config.data))


_FOUR_DEVICES = """
import json, jax, numpy as np
import test_segmentation_eval as t
assert jax.device_count() == 4, jax.devices()
scores, _ = t.run_evaluate(t.make_records(), t.make_config())
print("SCORES" + json.dumps({k: np.asarray(v).tolist() for k, v in scores.items()}))
"""


def test_evaluate_on_four_devices_equals_one_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]))
  out = subprocess.run([sys.executable, "-c", _FOUR_DEVICES], env=env, capture_output=True,
                       text=True, timeout=240, cwd=REPO)
  assert out.returncode == 0, out.stderr[-3000:]
  line = next(l for l in out.stdout.splitlines() if l.startswith("SCORES"))
  sharded = {k: np.asarray(v, np.float64) for k, v in json.loads(line[len("SCORES"):]).items()}
  assert_same_scores(sharded, run_evaluate(make_records(), make_config())[0])


def test_three_processes_agree_on_batches_and_sum_to_one_process(monkeypatch):
  """3 (faked) processes: each evaluates records[p::3] with one row per global batch; they run
  the same sequence of batch shapes, and the summed confusion gives one process's scores."""
  records, config = make_records(), make_config()
  whole, _ = run_evaluate(records, config)
  batch_sharding = sharding.batch_sharding(sharding.make_mesh())

  def as_process(index, gather):
    shapes = []

    def forward(images):
      shapes.append(images.shape)
      return fake_forward(images)

    monkeypatch.setattr(jax, "process_index", lambda: index)
    monkeypatch.setattr(jax, "process_count", lambda: 3)
    monkeypatch.setattr(seg_eval.multihost_utils, "process_allgather", gather)
    scores, _ = seg_eval.evaluate(forward, records, config, batch_sharding, patch_multiple=8)
    return scores, shapes

  sent = {p: [] for p in range(3)}  # what each process hands to the gathers, in order
  for p in range(3):
    as_process(p, lambda x, p=p: sent[p].append(np.asarray(x)) or np.stack([x] * 3))
  assert len({len(calls) for calls in sent.values()}) == 1
  batch_shapes = []
  for p in range(3):
    calls = iter(range(len(sent[p])))

    def gather(x, p=p):
      call = next(calls)
      np.testing.assert_array_equal(x, sent[p][call])
      return np.stack([sent[q][call] for q in range(3)])

    scores, shapes = as_process(p, gather)
    assert_same_scores(scores, whole)
    batch_shapes.append(shapes)
  assert batch_shapes[0] == batch_shapes[1] == batch_shapes[2]
  assert all(shape[0] == 1 for shape in batch_shapes[0])  # 3 windows a batch = 1 per process
  assert {shape[1:3] for shape in batch_shapes[0]} == {(32, 32), (16, 32), (32, 24), (8, 32)}


def test_a_stride_longer_than_the_crop_is_named():
  with pytest.raises(seg_eval.ConfigError, match=r"data.eval_stride=40 must be in \[1, "):
    run_evaluate(make_records(), make_config(eval_stride=40))


# ----------------------------------------------------------------------------------------------
# Pictures.


def test_save_examples_writes_a_row_per_image(tmp_path):
  label = np.full((40, 60), 255, np.uint8)
  label[:, :30] = 2
  examples = [(random_image((40, 60)), label, np.zeros((40, 60), np.int64)),
              (random_image((30, 30)), np.ones((30, 30), np.uint8), np.ones((30, 30)))]
  path = seg_eval.save_examples(tmp_path / "dir" / "examples.png", examples, NUM_CLASSES,
                                height=64, gap=4)
  picture = np.asarray(Image.open(path))
  assert picture.shape == (2 * 64 + 4, 3 * 96 + 2 * 4, 3)
  palette = seg_eval.label_palette(NUM_CLASSES)
  np.testing.assert_array_equal(picture[10, 96 + 4 + 5], palette[2])  # ground truth, class 2
  np.testing.assert_array_equal(picture[10, 96 + 4 + 90], [0, 0, 0])  # ignore: black
  np.testing.assert_array_equal(picture[10, 2 * (96 + 4) + 5], palette[0])
  assert len({tuple(c) for c in palette[:NUM_CLASSES]} | {(0, 0, 0)}) == NUM_CLASSES + 1

