"""Correlation-map pictures, pretext IoU and training curves, drawn with numpy + PIL only.

python -m cim_jax.evaluate.visualize --config=configs/demo.py --config.init_from=WORKDIR
    [--output_dir=DIR] [--metrics=WORKDIR/metrics.jsonl]

The config is the run's pre-training config: the held-out pairs are drawn by its recipe.
"""

import io
import json
import math
import os
from typing import Any, Sequence

import numpy as np
from etils import epath
from PIL import Image, ImageDraw, ImageFont

from cim_jax import cli
from cim_jax.data import pipeline
from cim_jax.evaluate import pretext
from cim_jax.models import cim
from cim_jax.train import warm_start

# Anchor colours of matplotlib's 'inferno' map (dark = no match, bright = match).
_HEAT_ANCHORS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9],
                          [252, 255, 164]], np.float64)
_MASK_COLOUR = np.array([46, 204, 64], np.float64)  # ground truth: green tint + outline


# ----------------------------------------------------------------------------------------------
# Drawing.


def heat_colours(values: np.ndarray) -> np.ndarray:
  """Values in [0, 1] -> (…, 3) float RGB of the 'inferno' colour map."""
  position = np.clip(values, 0.0, 1.0) * (len(_HEAT_ANCHORS) - 1)
  low = np.minimum(np.floor(position).astype(int), len(_HEAT_ANCHORS) - 2)
  frac = (position - low)[..., None]
  return _HEAT_ANCHORS[low] * (1 - frac) + _HEAT_ANCHORS[low + 1] * frac


def mask_outline(mask: np.ndarray) -> np.ndarray:
  """Pixels of `mask` with a 4-neighbour outside it (a one-pixel boundary)."""
  padded = np.pad(mask, 1)
  interior = (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
  return mask & ~interior


def overlay_mask(image: np.ndarray, mask: np.ndarray, alpha: float = 0.45) -> np.ndarray:
  """Tints the mask's pixels and draws its outline: ground truth over the context."""
  out = image.astype(np.float64)
  mask = np.asarray(mask) != 0
  out[mask] = (1 - alpha) * out[mask] + alpha * _MASK_COLOUR
  out[mask_outline(mask)] = _MASK_COLOUR
  return out.astype(np.uint8)


def overlay_heat(image: np.ndarray, probs: np.ndarray, true_mask: np.ndarray | None = None,
                 alpha: float = 0.6) -> np.ndarray:
  """Heat map of the predicted probabilities over the context, ground-truth outline in white."""
  out = (1 - alpha) * image.astype(np.float64) + alpha * heat_colours(probs)
  if true_mask is not None:
    out[mask_outline(np.asarray(true_mask) != 0)] = 255.0
  return out.astype(np.uint8)


def _font(size: int):
  return ImageFont.load_default(size=size)


def _tile(image: np.ndarray, size: int) -> Image.Image:
  """An RGB tile of `size` x `size` (nearest for small crops so their pixels stay visible)."""
  tile = Image.fromarray(np.asarray(image, np.uint8))
  if tile.size != (size, size):
    tile = tile.resize((size, size), Image.NEAREST if tile.size[0] < size else Image.BILINEAR)
  return tile


def save_correlation_png(path: str, context: np.ndarray, exemplars: np.ndarray,
                         true_masks: np.ndarray, predicted_probs: np.ndarray, *,
                         max_samples: int = 4, tile: int = 128, title: str = "") -> str:
  """One PNG for a batch: per sample, rows of exemplars / ground truth / predicted heat maps.

  context uint8 (B, C, C, 3), exemplars uint8 (B, N, E, E, 3), true_masks (B, N, C, C),
  predicted_probs float (B, N, C, C) foreground probabilities. Each prediction tile is captioned
  with its IoU (argmax vs truth). Returns `path`.
  """
  context, exemplars = np.asarray(context), np.asarray(exemplars)
  true_masks, predicted_probs = np.asarray(true_masks), np.asarray(predicted_probs)
  batch, num_exemplars = exemplars.shape[:2]
  if true_masks.shape != predicted_probs.shape or true_masks.shape[:2] != (batch, num_exemplars):
    raise ValueError(f"save_correlation_png: exemplars {exemplars.shape[:2]}, true masks "
                     f"{true_masks.shape} and predictions {predicted_probs.shape} disagree")
  ious = pretext.mask_iou(predicted_probs > 0.5, true_masks)
  samples = min(batch, max_samples)
  margin, caption, gap, header = 92, 16, 4, 30 if title else 6
  cell = tile + caption
  width = margin + (1 + num_exemplars) * (tile + gap)
  height = header + samples * (3 * cell + 2 * gap)
  canvas = Image.new("RGB", (width, height), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  small = _font(12)
  if title:
    draw.text((margin, 6), title, fill=(0, 0, 0), font=_font(15))
  row_names = ("exemplars", "ground truth", "prediction")
  for b in range(samples):
    top = header + b * (3 * cell + 2 * gap)
    ctx = context[b]
    for row, name in enumerate(row_names):
      draw.text((4, top + row * cell + tile // 2 - 6), name if row else f"sample {b}",
                fill=(0, 0, 0), font=small)
    canvas.paste(_tile(ctx, tile), (margin, top))
    draw.text((margin, top + tile + 1), "context", fill=(0, 0, 0), font=small)
    for n in range(num_exemplars):
      x = margin + (1 + n) * (tile + gap)
      canvas.paste(_tile(exemplars[b, n], tile), (x, top))
      draw.text((x, top + tile + 1), f"exemplar {n}", fill=(0, 0, 0), font=small)
      canvas.paste(_tile(overlay_mask(ctx, true_masks[b, n]), tile), (x, top + cell))
      draw.text((x, top + cell + tile + 1), f"area {true_masks[b, n].mean():.0%}",
                fill=(0, 0, 0), font=small)
      heat = overlay_heat(ctx, predicted_probs[b, n], true_masks[b, n])
      canvas.paste(_tile(heat, tile), (x, top + 2 * cell))
      draw.text((x, top + 2 * cell + tile + 1), f"IoU {ious[b, n]:.2f}", fill=(0, 0, 0),
                font=small)
    # A colour bar in the context column of the prediction row explains the heat scale.
    bar = heat_colours(np.linspace(1, 0, tile)[:, None].repeat(12, axis=1)).astype(np.uint8)
    canvas.paste(Image.fromarray(bar), (margin, top + 2 * cell))
    draw.text((margin + 16, top + 2 * cell), "p = 1", fill=(0, 0, 0), font=small)
    draw.text((margin + 16, top + 2 * cell + tile - 14), "p = 0", fill=(0, 0, 0), font=small)
  return save_png(canvas, path)


def save_png(image: Image.Image, path) -> str:
  """Writes `image` as PNG to a local or gs:// path (parents created); returns the path."""
  target = epath.Path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  buffer = io.BytesIO()  # encode in memory: PIL cannot write to object-store paths
  image.save(buffer, format="PNG")
  target.write_bytes(buffer.getvalue())
  return os.fspath(path)


# ----------------------------------------------------------------------------------------------
# Training curves.


def read_metrics(metrics_jsonl: str) -> list[dict]:
  """The records of a JSONL metrics log (one JSON object a line; blank lines skipped)."""
  records = []
  with epath.Path(metrics_jsonl).open("r", encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if line.strip():
        try:
          records.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise ValueError(f"{metrics_jsonl}:{number} is not JSON: {e}") from None
  return records


def _default_curve_keys(records: list[dict]) -> list[str]:
  """Every numeric loss key, then the learning rate."""
  keys = []
  for record in records:
    for key, value in record.items():
      if key not in keys and isinstance(value, (int, float)) and not isinstance(value, bool):
        keys.append(key)
  losses = sorted((k for k in keys if "loss" in k.lower()), key=lambda k: k != "loss")
  rates = [k for k in keys if k.lower() in ("lr", "learning_rate") or k.lower().endswith(
      ("/lr", "learning_rate"))]
  # A component equal to the total (e.g. corr_loss == loss when it is the only loss) adds nothing.
  series, unique = {}, []
  for key in losses + rates:
    values = tuple(r.get(key) for r in records)
    if values not in series.values():
      series[key] = values
      unique.append(key)
  return unique


def _nice_ticks(lo: float, hi: float, count: int = 5) -> np.ndarray:
  """Round tick positions covering [lo, hi]."""
  if hi <= lo:
    hi = lo + (abs(lo) or 1.0)
  raw = (hi - lo) / count
  magnitude = 10 ** math.floor(math.log10(raw))
  step = min((m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw))
  return np.arange(math.ceil(lo / step) * step, hi + step * 1e-9, step)


def _draw_panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], steps: np.ndarray,
                values: np.ndarray, name: str, colour=(31, 119, 180)) -> None:
  """A line plot of values against steps inside box = (left, top, right, bottom)."""
  left, top, right, bottom = box
  font = _font(12)
  x0, y0, x1, y1 = left + 62, top + 22, right - 12, bottom - 24
  draw.text((x0, top + 3), f"{name}   (last {values[-1]:.4g}, min {values.min():.4g})",
            fill=(0, 0, 0), font=font)
  s_lo, s_hi = float(steps.min()), float(steps.max())
  v_lo, v_hi = float(values.min()), float(values.max())
  pad = 0.05 * ((v_hi - v_lo) or abs(v_hi) or 1.0)
  v_lo, v_hi = v_lo - pad, v_hi + pad
  s_hi = s_hi if s_hi > s_lo else s_lo + 1

  def to_xy(s, v):
    return (x0 + (s - s_lo) / (s_hi - s_lo) * (x1 - x0), y1 - (v - v_lo) / (v_hi - v_lo) * (y1 - y0))

  for v in _nice_ticks(v_lo, v_hi):
    y = to_xy(s_lo, v)[1]
    draw.line([(x0, y), (x1, y)], fill=(225, 225, 225))
    draw.text((left + 2, y - 7), f"{v:.3g}", fill=(60, 60, 60), font=font)
  for s in _nice_ticks(s_lo, s_hi):
    x = to_xy(s, v_lo)[0]
    draw.line([(x, y1), (x, y1 + 4)], fill=(0, 0, 0))
    draw.text((x - 10, y1 + 6), f"{s:g}", fill=(60, 60, 60), font=font)
  draw.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
  draw.text((x1 - 28, top + 3), "step", fill=(60, 60, 60), font=font)
  points = [to_xy(s, v) for s, v in zip(steps, values)]
  if len(points) == 1:
    x, y = points[0]
    draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
  else:
    draw.line(points, fill=colour, width=2)


def plot_training_curves(metrics_jsonl: str, png: str, keys: Sequence[str] | None = None, *,
                         step_key: str = "step", width: int = 720, panel_height: int = 220
                         ) -> str:
  """One panel per metric (default: the losses and the learning rate) against the step."""
  records = [r for r in read_metrics(metrics_jsonl) if step_key in r]
  if not records:
    raise ValueError(f"{metrics_jsonl} holds no records with a {step_key!r} field")
  keys = list(keys or _default_curve_keys(records))
  keys = [k for k in keys if k != step_key]
  if not keys:
    raise ValueError(f"{metrics_jsonl}: no loss or learning-rate fields to plot")
  canvas = Image.new("RGB", (width, panel_height * len(keys)), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  for i, key in enumerate(keys):
    rows = [(r[step_key], r[key]) for r in records
            if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    if not rows:
      raise ValueError(f"{metrics_jsonl}: no finite values for {key!r}")
    steps, values = (np.asarray(c, np.float64) for c in zip(*rows))
    _draw_panel(draw, (0, i * panel_height, width, (i + 1) * panel_height), steps, values, key)
  return save_png(canvas, png)


# ----------------------------------------------------------------------------------------------
# The pretext evaluation: predictions, IoU and their picture.


def evaluate_pretext(model, params, target_params, model_state, pairs: dict[str, Any], *,
                     png: str | None = None, title: str = "", max_samples: int = 4,
                     batch_size: int = 16) -> dict[str, Any]:
  """Mean pretext IoU of the model on `pairs` (a held-out batch); optionally writes the PNG.

  Returns {'pretext_iou': float, 'png': path or None}.
  """
  logits = pretext.predict_correlation(model, params, target_params, model_state, pairs,
                                       batch_size=batch_size)
  masks = pretext.true_masks(pairs["corners"], logits.shape[2])
  iou = pretext.pretext_iou(logits, masks)
  if png:
    caption = (f"{title + ' - ' if title else ''}mean pretext IoU {iou:.3f} over "
               f"{masks.shape[0]} pairs")
    save_correlation_png(png, pairs["context"], pairs["exemplars"], masks,
                         pretext.correlation_probs(logits), max_samples=max_samples, title=caption)
  return {"pretext_iou": iou, "png": png}


def main(config, output_dir: str = "", metrics: str = ""):
  """Entry point: held-out pretext IoU + correlation PNG of a checkpoint (and of random init)."""
  checkpoint = config.init_from
  output_dir = output_dir or (
      checkpoint if checkpoint and epath.Path(checkpoint).is_dir() else ".")
  out = epath.Path(output_dir)
  model = cim.build_model(config.model, config.data)
  pairs = pipeline.heldout_pairs(config)
  runs = {"random_init": pretext.random_init_params(model, config.seed)}
  if checkpoint:
    loaded = warm_start.load_checkpoint(config, checkpoint, model=model)
    runs["checkpoint"] = (loaded["params"], loaded["target_params"], runs["random_init"][2])
  for name, (params, target_params, model_state) in runs.items():
    result = evaluate_pretext(model, params, target_params, model_state, pairs,
                              png=os.fspath(out / f"correlation_{name}.png"), title=name)
    print(f"{name:12s} pretext_iou={result['pretext_iou']:.4f} png={result['png']}")
  if metrics:
    png = plot_training_curves(metrics, os.fspath(out / "training_curves.png"))
    print(f"training curves: {png}")


if __name__ == "__main__":
  cli.run_tool(main, prog="cim_jax.evaluate.visualize", default_config="configs/demo.py",
               flags={"output_dir": "", "metrics": ""}, kind="pretraining")
