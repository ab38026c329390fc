"""Semantic segmentation data (docs/METHOD.md section 9): sources, mmseg-style geometry."""

import itertools

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
