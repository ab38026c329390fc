"""Semantic segmentation evaluation (docs/METHOD.md section 9): mmseg's sliding-window inference,
sharded over devices and processes, and mIoU / aAcc / mAcc from a confusion matrix."""

import io
from typing import Callable, Sequence

import cv2
import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from PIL import Image

from cim_jax import sharding
from cim_jax.data import segmentation
from cim_jax.data.segmentation import IGNORE_INDEX, MEAN_RGB_UINT8
from cim_jax.errors import ConfigError
from cim_jax.models.upernet import bilinear_matrix

# Images of one process read, windowed and run per chunk, in batches of its rows: 4 batches'
# worth of images bounds the host memory (windows, low-resolution logits) and the padded rows
# a chunk's last, short batch costs.
_CHUNK_BATCHES = 4


# ----------------------------------------------------------------------------------------------
# Metric.


def confusion_matrix(prediction: np.ndarray, label: np.ndarray, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> np.ndarray:
  """int64 (C, C) pixel counts: rows ground truth, columns prediction; ignored pixels skipped."""
  label = np.asarray(label).ravel().astype(np.int64)
  prediction = np.asarray(prediction).ravel().astype(np.int64)
  if label.shape != prediction.shape:
    raise ValueError(f"confusion_matrix: {prediction.size} predicted pixels but {label.size} "
                     "labelled ones")
  keep = label != ignore_index
  label, prediction = label[keep], prediction[keep]
  # A label outside the classes would land in another class's cell: a data bug, not a score.
  for name, values in (("label", label), ("prediction", prediction)):
    if values.size and (values.min() < 0 or values.max() >= num_classes):
      raise ValueError(f"confusion_matrix: {name} values span [{values.min()}, {values.max()}],"
                       f" outside the {num_classes} classes (ignore index {ignore_index})")
  counts = np.bincount(label * num_classes + prediction, minlength=num_classes * num_classes)
  return counts.reshape(num_classes, num_classes).astype(np.int64)


def segmentation_scores(confusion: np.ndarray) -> dict:
  """mmseg's metrics in percent: 'mIoU', 'aAcc', 'mAcc' (floats), per class 'IoU', 'Acc'.

  A class absent from both prediction and ground truth (union 0) has NaN IoU, one absent from
  the ground truth NaN Acc; the means skip NaNs (mmseg's nanmean).
  """
  confusion = np.asarray(confusion, np.float64)
  intersect = np.diag(confusion)
  label_area, predicted_area = confusion.sum(axis=1), confusion.sum(axis=0)
  union = label_area + predicted_area - intersect
  with np.errstate(divide="ignore", invalid="ignore"):
    iou = 100.0 * intersect / union
    acc = 100.0 * intersect / label_area
    all_acc = 100.0 * intersect.sum() / label_area.sum()
  return {"mIoU": _nanmean(iou), "aAcc": float(all_acc), "mAcc": _nanmean(acc),
          "IoU": iou, "Acc": acc}


def _nanmean(values: np.ndarray) -> float:
  """Mean over the non-NaN entries; NaN (without a warning) when there are none."""
  finite = values[~np.isnan(values)]
  return float(finite.mean()) if finite.size else float("nan")


def class_table(scores: dict, class_names: Sequence[str]) -> str:
  """The per-class IoU / Acc table (percent; NaN: absent class) and the summary, for the log."""
  width = max([len("class"), *(len(name) for name in class_names)])
  lines = [f"{'class':<{width}}  {'IoU':>6}  {'Acc':>6}"]
  for name, iou, acc in zip(class_names, scores["IoU"], scores["Acc"]):
    lines.append(f"{name:<{width}}  {iou:6.2f}  {acc:6.2f}")
  lines.append(f"{'mean':<{width}}  {scores['mIoU']:6.2f}  {scores['mAcc']:6.2f}"
               f"  (aAcc {scores['aAcc']:.2f})")
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Sliding-window inference.


def rescale_image(image: np.ndarray, scale: Sequence[int]) -> np.ndarray:
  """mmseg's test-time Resize (keep_ratio) to `scale` = (long, short): cv2 INTER_LINEAR."""
  height, width = segmentation.rescale_size(*image.shape[:2], tuple(scale))
  if (height, width) == image.shape[:2]:
    return image
  return cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)


def padded_length(length: int, multiple: int) -> int:
  """`length` rounded up to a multiple of `multiple`."""
  return -(-length // multiple) * multiple


def pad_window(window: np.ndarray, multiple: int) -> np.ndarray:
  """`window` padded bottom / right with the mean colour to sides that are multiples of
  `multiple`.

  Deviation from mmseg, which runs the model on a window smaller than the crop as it is: the
  ViT needs sides that are multiples of its patch size; the logits of the padding are cropped
  off again (`window_matrix`).
  """
  height, width = window.shape[:2]
  pad = ((0, padded_length(height, multiple) - height), (0, padded_length(width, multiple) - width))
  if not any(p for _, p in pad):
    return window
  out = np.empty((height + pad[0][1], width + pad[1][1], 3), np.uint8)
  out[...] = np.asarray(MEAN_RGB_UINT8, np.uint8)
  out[:height, :width] = window
  return out


def window_inputs(image: np.ndarray, crop: int, stride: int,
                  patch_multiple: int = 16) -> np.ndarray:
  """uint8 (num_windows, h, w, 3): the (padded) windows of `window_grid`, rows outer; an image's
  windows all have one shape (an axis shorter than the crop has one window spanning it)."""
  windows = [pad_window(image[y0:y1, x0:x1], patch_multiple)
             for y0, y1, x0, x1 in segmentation.window_grid(*image.shape[:2], crop, stride)]
  return np.stack(windows)


def window_matrix(spans: Sequence[tuple[int, int]], length: int, out_length: int,
                  logit_length: int, patch_multiple: int) -> list[np.ndarray]:
  """Per window span, the (out_length, logit_length) map of its logits onto the output axis.

  The product of: upsampling the logits to the (padded) window input, cropping the padding,
  placing it on the canvas, dividing by the number of windows covering each position (the count
  map is the outer product of the axes' counts), resizing the canvas to the output size.
  """
  counts = np.zeros(length)
  for start, end in spans:
    counts[start:end] += 1
  to_output = bilinear_matrix(length, out_length)
  matrices = []
  for start, end in spans:
    padded = padded_length(end - start, patch_multiple)
    upsample = bilinear_matrix(logit_length, padded)[:end - start]
    matrices.append(to_output[:, start:end] @ (upsample / counts[start:end, None]))
  return matrices


def _support(matrix: np.ndarray) -> tuple[int, np.ndarray]:
  """(first row, float32 rows) of `matrix` between its first and last row with a weight: the
  output positions one window reaches."""
  reached = np.flatnonzero(np.abs(matrix).sum(axis=1))
  return int(reached[0]), matrix[reached[0]:reached[-1] + 1].astype(np.float32)


def stitch_windows(window_logits: Sequence[np.ndarray], height: int, width: int, crop: int,
                   stride: int, out_size: tuple[int, int] | None = None,
                   patch_multiple: int = 16) -> np.ndarray:
  """float32 (H0, W0, C) logits of an image from its windows' low-resolution logits.

  `window_logits[i]` (h / k, w / k, C) belongs to window i of `window_grid(height, width, ...)`;
  every mmseg step (upsample each window, sum on the canvas, divide by the count, resize to
  `out_size`) is linear and separable, so the result is sum_windows A_row L A_col^T: no canvas
  of (C, H, W) per window is ever built.
  """
  out_height, out_width = out_size or (height, width)
  row_spans = segmentation.window_spans(height, crop, stride)
  col_spans = segmentation.window_spans(width, crop, stride)
  if len(window_logits) != len(row_spans) * len(col_spans):
    raise ValueError(f"stitch_windows: {len(window_logits)} window logits for "
                     f"{len(row_spans)} x {len(col_spans)} windows")
  logit_height, logit_width, num_classes = np.shape(window_logits[0])
  rows = [_support(m) for m in window_matrix(row_spans, height, out_height, logit_height,
                                             patch_multiple)]
  cols = [_support(m) for m in window_matrix(col_spans, width, out_width, logit_width,
                                             patch_multiple)]
  out = np.zeros((out_height, out_width * num_classes), np.float32)
  for r, (row_start, row) in enumerate(rows):
    # Columns first: (h/k, w/k, C) -> (h/k, W0, C), summed over the row's windows; one GEMM
    # per window over the output columns it reaches.
    partial = np.zeros((logit_height, out_width, num_classes), np.float32)
    for c, (col_start, col) in enumerate(cols):
      logits = np.asarray(window_logits[r * len(cols) + c], np.float32)
      moved = col @ logits.transpose(1, 0, 2).reshape(logit_width, -1)
      partial[:, col_start:col_start + len(col)] += moved.reshape(
          len(col), logit_height, num_classes).transpose(1, 0, 2)
    out[row_start:row_start + len(row)] += row @ partial.reshape(logit_height, -1)
  return out.reshape(out_height, out_width, num_classes)


def slide_inference(forward_fn: Callable, image: np.ndarray, crop: int, stride: int, *,
                    out_size: tuple[int, int] | None = None,
                    patch_multiple: int = 16) -> np.ndarray:
  """float32 (H0, W0, C) logits of one (already rescaled) uint8 image: its windows through
  `forward_fn` (uint8 (N, h, w, 3) -> (N, h/k, w/k, C)) in one batch, then `stitch_windows`."""
  logits = np.asarray(forward_fn(window_inputs(image, crop, stride, patch_multiple)))
  return stitch_windows(list(logits), *image.shape[:2], crop, stride, out_size, patch_multiple)


def _resize_bilinear(array: np.ndarray, height: int, width: int) -> np.ndarray:
  """(h, w, C) -> (height, width, C), bilinear, half-pixel centres, no antialiasing: torch's
  F.interpolate(mode='bilinear', align_corners=False), as mmseg's `resize`."""
  shape = (height, width, array.shape[-1])
  return np.asarray(jax.image.resize(array, shape, "bilinear", antialias=False))


def slide_inference_reference(forward_fn: Callable, image: np.ndarray, crop: int, stride: int, *,
                              out_size: tuple[int, int] | None = None,
                              patch_multiple: int = 16) -> np.ndarray:
  """mmseg's slide_inference step by step (for the tests): a canvas and a count map."""
  height, width = image.shape[:2]
  canvas, count = None, np.zeros((height, width, 1), np.float32)
  for y0, y1, x0, x1 in segmentation.window_grid(height, width, crop, stride):
    window = pad_window(image[y0:y1, x0:x1], patch_multiple)
    logits = np.asarray(forward_fn(window[None]), np.float32)[0]
    logits = _resize_bilinear(logits, *window.shape[:2])[:y1 - y0, :x1 - x0]
    if canvas is None:
      canvas = np.zeros((height, width, logits.shape[-1]), np.float32)
    canvas[y0:y1, x0:x1] += logits
    count[y0:y1, x0:x1] += 1
  return _resize_bilinear(canvas / count, *(out_size or (height, width)))


# ----------------------------------------------------------------------------------------------
# Sharded evaluation.


_SHAPE_BASE = 1 << 15  # window sides below it; a code fits the int32 the gather carries


def _shape_code(shape: tuple[int, ...]) -> int:
  """A window shape (h, w, ...) as one positive int (0 = no image), for the count gather."""
  return int(shape[0]) * _SHAPE_BASE + int(shape[1])


def _local_rows(array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in global row order."""
  if array.is_fully_addressable:
    return np.asarray(array)
  shards = {shard.index[0].start or 0: shard for shard in array.addressable_shards}
  return np.concatenate([np.asarray(shards[start].data) for start in sorted(shards)])


def _gather_sum(confusion: np.ndarray) -> np.ndarray:
  """The int64 confusion matrices of all processes, summed (gathered as two int32 halves: JAX
  without x64 would truncate int64)."""
  if jax.process_count() == 1:
    return confusion
  halves = np.stack([confusion >> 31, confusion & 0x7FFFFFFF]).astype(np.int32)
  gathered = np.asarray(multihost_utils.process_allgather(halves)).astype(np.int64)
  return (gathered[:, 0] << 31 | gathered[:, 1]).sum(axis=0)


class _Image:
  """One evaluated image: its record, the windows of its rescaled copy, their logits."""

  def __init__(self, record, d, patch_multiple: int):
    self.image, self.label = np.asarray(record["image"]), np.asarray(record["label"])
    rescaled = rescale_image(self.image, d.scale)
    self.size = rescaled.shape[:2]
    self.windows = window_inputs(rescaled, d.crop_size, d.eval_stride, patch_multiple)
    self.logits = [None] * len(self.windows)


def _run_windows(forward, images: Sequence[_Image], slots: int, rows: int,
                 batch_sharding) -> None:
  """Fills `item.logits` of this process's `images` (one chunk), batch by batch.

  Every process sends (shape code, window count) of each of its `slots` images (zeros for none)
  to one gather; from it each computes the same (shape, batch count) sequence: shapes in
  increasing code, as many batches as the process with most windows of the shape needs. A
  process out of windows of a shape feeds padding rows.
  """
  summary = np.zeros((slots, 2), np.int32)
  for slot, item in enumerate(images):
    summary[slot] = _shape_code(item.windows.shape[1:]), len(item.windows)
  everyone = (np.asarray(multihost_utils.process_allgather(summary)) if jax.process_count() > 1
              else summary[None])
  for code in sorted(set(everyone[..., 0].ravel().tolist()) - {0}):
    most = np.where(everyone[..., 0] == code, everyone[..., 1], 0).sum(axis=1).max()
    owned = [(item, w) for item in images if _shape_code(item.windows.shape[1:]) == code
             for w in range(len(item.windows))]
    for batch in range(-(-int(most) // rows)):
      part = owned[batch * rows:(batch + 1) * rows]
      if part:
        local = sharding.pad_rows(np.stack([item.windows[w] for item, w in part]), rows)
      else:  # this process has no more windows of the shape: its rows are padding
        local = np.broadcast_to(np.asarray(MEAN_RGB_UINT8, np.uint8),
                                (rows, *divmod(code, _SHAPE_BASE), 3))
      logits = _local_rows(forward(sharding.global_batch(local, batch_sharding)))
      for (item, w), window_logits in zip(part, logits):
        item.logits[w] = np.asarray(window_logits, np.float32)


def evaluate(forward, records, config, batch_sharding, *, num_examples: int = 0,
             patch_multiple: int = 16) -> tuple[dict, list]:
  """(scores, examples) of mmseg's sliding-window evaluation over all devices and processes.

  Each process takes records[process_index::process_count] (of the first data.num_eval_images;
  0 = all) and, chunk by chunk, batches the windows of one shape across its images into its
  rows of global batches of data.eval_batch_size windows; the processes agree on the sequence
  of (shape, batch count) through one small gather per chunk. `forward` (jitted, a global uint8
  batch sharded by `batch_sharding` -> logits (N, h/k, w/k, C)) runs once per batch. The
  confusion matrices are summed over processes: every process returns the same scores.
  examples: (image, label, prediction) of process 0's first `num_examples` images.
  """
  d = config.data
  if not 0 < d.eval_stride <= d.crop_size:
    raise ConfigError(f"data.eval_stride={d.eval_stride} must be in [1, data.crop_size="
                      f"{d.crop_size}]: windows would leave pixels out")
  num_classes = records.num_classes
  total = min(d.num_eval_images, len(records)) if d.num_eval_images > 0 else len(records)
  index, count = jax.process_index(), jax.process_count()
  global_rows = -(-d.eval_batch_size // jax.device_count()) * jax.device_count()
  rows = global_rows // count
  mine = range(index, total, count)
  per_chunk = _CHUNK_BATCHES * rows
  num_chunks = -(-len(range(0, total, count)) // per_chunk)  # process 0 has the most images
  confusion = np.zeros((num_classes, num_classes), np.int64)
  examples = []
  for chunk in range(num_chunks):
    images = [_Image(records[i], d, patch_multiple)
              for i in mine[chunk * per_chunk:(chunk + 1) * per_chunk]]
    _run_windows(forward, images, per_chunk, rows, batch_sharding)
    for item in images:
      logits = stitch_windows(item.logits, *item.size, d.crop_size, d.eval_stride,
                              item.image.shape[:2], patch_multiple)
      prediction = logits.argmax(axis=-1).astype(np.int32)
      confusion += confusion_matrix(prediction, item.label, num_classes)
      if index == 0 and len(examples) < num_examples:
        examples.append((item.image, item.label, prediction))
  return segmentation_scores(_gather_sum(confusion)), examples


# ----------------------------------------------------------------------------------------------
# Pictures.


def label_palette(num_classes: int) -> np.ndarray:
  """uint8 (256, 3) colours of the labels: PASCAL VOC's bit-interleaved palette shifted by one
  (so no class is black) for classes, black for the ignore index and anything above."""
  palette = np.zeros((256, 3), np.uint8)
  for label in range(min(num_classes, IGNORE_INDEX)):
    code, colour = label + 1, [0, 0, 0]
    for bit in range(8):
      for channel in range(3):
        colour[channel] |= ((code >> channel) & 1) << (7 - bit)
      code >>= 3
    palette[label] = colour
  return palette


def save_examples(path, examples: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
                  num_classes: int, *, height: int = 256, gap: int = 4) -> str:
  """One PNG (local or gs://), a row per example: image | ground truth | prediction, each
  scaled to `height` pixels (labels nearest), labels coloured by `label_palette`."""
  palette = label_palette(num_classes)
  rows = []
  for image, label, prediction in examples:
    width = max(1, round(image.shape[1] * height / image.shape[0]))
    tiles = [Image.fromarray(np.asarray(image, np.uint8)).resize((width, height),
                                                                  Image.BILINEAR)]
    tiles += [Image.fromarray(palette[np.asarray(x).astype(np.int64).clip(0, 255)]).resize(
        (width, height), Image.NEAREST) for x in (label, prediction)]
    rows.append(tiles)
  canvas_width = max([3 * tiles[0].size[0] + 2 * gap for tiles in rows] or [1])
  canvas = Image.new("RGB", (canvas_width, max(1, len(rows) * (height + gap) - gap)),
                     (255, 255, 255))
  for r, tiles in enumerate(rows):
    for t, tile in enumerate(tiles):
      canvas.paste(tile, (t * (tile.size[0] + gap), r * (height + gap)))
  # PIL cannot write to object-store paths: encode in memory, write through epath (the picture
  # writer of cim_jax.evaluate.visualize sits a layer above this module).
  target = epath.Path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  buffer = io.BytesIO()
  canvas.save(buffer, format="PNG")
  target.write_bytes(buffer.getvalue())
  return str(path)
