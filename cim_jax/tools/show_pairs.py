"""Writes a PNG grid of CIM samples from any source: what the model is asked to do.

python -m cim_jax.tools.show_pairs --config=configs/demo.py --out=pairs.png [--num=4]
    [--split=train|heldout] [--config.data.source=imagefolder --config.data.root=DIR ...]

Two rows per sample. Top: the context, then each exemplar (enlarged, framed in its colour).
Bottom: the context with every label's edge drawn, then the context with exemplar k's label
tinted in the same colour: the region the correlation map must find.
"""

import sys

import cv2
import numpy as np
from PIL import Image

from cim_jax import cli
from cim_jax import geometry
from cim_jax.data import pipeline
from cim_jax.data import sources

# Distinct, saturated colours for exemplars 1..N (cycled when N is larger).
PALETTE = np.array([(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200),
                    (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230)], np.uint8)


def _edges(mask: np.ndarray) -> np.ndarray:
  """Pixels of the mask whose 4-neighbourhood leaves it (a 1-pixel inner outline)."""
  mask = mask.astype(np.uint8)
  return (mask > 0) & (cv2.erode(mask, np.ones((3, 3), np.uint8), borderValue=0) == 0)


def _framed(image: np.ndarray, size: int, colour: np.ndarray, width: int = 3) -> np.ndarray:
  out = cv2.resize(image, (size, size), interpolation=cv2.INTER_NEAREST)
  out[:width], out[-width:], out[:, :width], out[:, -width:] = colour, colour, colour, colour
  return out


def pair_grid(batch: dict[str, np.ndarray]) -> np.ndarray:
  """(rows, cols, 3) uint8 picture of a batch (see the module docstring for the layout)."""
  contexts, exemplars, corners = batch["context"], batch["exemplars"], batch["corners"]
  size = contexts.shape[1]
  masks = geometry.masks_from_corners(corners, size)  # (b, N, C, C) bool, exact labels
  rows = []
  for context, sample_exemplars, sample_masks in zip(contexts, exemplars, masks):
    colours = PALETTE[np.arange(len(sample_exemplars)) % len(PALETTE)]
    top = [context] + [_framed(e, size, c) for e, c in zip(sample_exemplars, colours)]
    outlined = context.copy()
    tinted = []
    for mask, colour in zip(sample_masks, colours):
      edge = _edges(mask)
      outlined[edge] = colour
      one = context.copy()
      one[mask] = (0.5 * one[mask] + 0.5 * colour).astype(np.uint8)
      one[edge] = colour
      tinted.append(one)
    rows.append(np.concatenate(top, axis=1))
    rows.append(np.concatenate([outlined] + tinted, axis=1))
  grid = np.concatenate(rows, axis=0)
  # A dark line between samples keeps the row pairs apart.
  grid[2 * size::2 * size] = 0
  return grid


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  config, flags = cli.parse_or_exit(
      argv, default_config="configs/demo.py",
      flags={"out": "pairs.png", "num": "4", "split": "train"}, prog="cim_jax.tools.show_pairs")
  try:
    num = int(flags["num"])
    if num < 1:
      raise ValueError
  except ValueError:
    print(f"error: --num={flags['num']} must be a positive integer", file=sys.stderr)
    sys.exit(2)
  try:
    source = sources.make_source(config.data, flags["split"])
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  ds = pipeline.pair_dataset(source, config.data, seed=config.seed, batch_size=num,
                             shuffle=config.data.shuffle)
  batch = pipeline.AccountSkips().map(ds[0])
  Image.fromarray(pair_grid(batch)).save(flags["out"])
  print(f"wrote {flags['out']}: {num} samples from {source!r}")


if __name__ == "__main__":
  main()
