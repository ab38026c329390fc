"""The pretext task on held-out pairs: correlation predictions, mean IoU and the PNG of them."""

import functools
import os
from typing import Any

import jax
import numpy as np
from etils import epath

from cim_jax.evaluate import visualize


def true_masks(corners: np.ndarray, size: int) -> np.ndarray:
  """Ground-truth masks (B, N, size, size) from exemplar corners, rasterised on the host."""
  from cim_jax.data import pairs
  return np.asarray(pairs.masks_from_corners(np.asarray(corners), size, xp=np)) != 0


def predict_correlation(model, params, target_params, model_state, batch: dict[str, Any], *,
                        batch_size: int = 16) -> np.ndarray:
  """Correlation logits (B, N, C, C, 2) of the model in eval mode, `batch_size` pairs at a time."""
  apply = _jitted_apply(model)
  chunks = []
  num = batch["context"].shape[0]
  for start in range(0, num, batch_size):
    chunk = {k: np.asarray(v[start:start + batch_size]) for k, v in batch.items()
             if k in ("context", "exemplars", "corners")}
    valid = chunk["context"].shape[0]
    if valid < batch_size and num > batch_size:  # pad so one compilation serves every chunk
      chunk = {k: np.concatenate([v, np.repeat(v[-1:], batch_size - valid, axis=0)])
               for k, v in chunk.items()}
    logits = apply(params, target_params, model_state or {}, chunk)
    chunks.append(np.asarray(logits)[:valid])
  return np.concatenate(chunks)


@functools.lru_cache(maxsize=8)
def _jitted_apply(model):
  """One jitted eval-mode forward per model object."""

  @jax.jit
  def apply(params, target_params, model_state, batch):
    _, aux = model.apply(params, target_params, model_state, batch, train=False)
    return aux["correlation_logits"]

  return apply


def evaluate_pretext(model, params, target_params, model_state, pairs: dict[str, Any], *,
                     png: str | None = None, title: str = "", max_samples: int = 4,
                     batch_size: int = 16) -> dict[str, Any]:
  """Mean pretext IoU of the model on `pairs` (a held-out batch); optionally writes the PNG.

  Returns {'pretext_iou': float, 'png': path or None}.
  """
  logits = predict_correlation(model, params, target_params, model_state, pairs,
                               batch_size=batch_size)
  masks = true_masks(pairs["corners"], logits.shape[2])
  iou = visualize.pretext_iou(logits, masks)
  if png:
    caption = f"{title + ' - ' if title else ''}mean pretext IoU {iou:.3f} over {masks.shape[0]} pairs"
    visualize.save_correlation_png(png, pairs["context"], pairs["exemplars"], masks,
                                   visualize.correlation_probs(logits), max_samples=max_samples,
                                   title=caption)
  return {"pretext_iou": iou, "png": png}


def random_init_params(model, seed: int = 0):
  """(params, target_params, model_state) of a freshly initialised model: the 'before' point."""
  params, model_state = jax.jit(model.init_variables)(jax.random.key(seed))  # eager is slow
  return params, model.target_params_from(params), model_state


def main(config, output_dir: str = "", metrics: str = ""):
  """Entry point: held-out pretext IoU + correlation PNG of a checkpoint (and of random init)."""
  from cim_jax.data import pipeline
  from cim_jax.models import cim
  from cim_jax.evaluate import common
  output_dir = output_dir or config.eval.output_dir or (
      config.checkpoint if config.checkpoint and epath.Path(config.checkpoint).is_dir() else ".")
  out = epath.Path(output_dir)
  model = cim.build_model(config.model, config.data)
  pairs = pipeline.heldout_pairs(config)
  runs = {"random_init": random_init_params(model, config.seed)}
  if config.checkpoint:
    loaded = common.load_checkpoint(config, model=model)
    runs["checkpoint"] = (loaded["params"], loaded["target_params"], runs["random_init"][2])
  for name, (params, target_params, model_state) in runs.items():
    result = evaluate_pretext(model, params, target_params, model_state, pairs,
                              png=os.fspath(out / f"correlation_{name}.png"), title=name)
    print(f"{name:12s} pretext_iou={result['pretext_iou']:.4f} png={result['png']}")
  if metrics:
    png = visualize.plot_training_curves(metrics, os.fspath(out / "training_curves.png"))
    print(f"training curves: {png}")
