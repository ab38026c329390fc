"""The pretext task's metrics: correlation predictions on held-out pairs and their mask IoU."""

import functools
from typing import Any

import jax
import numpy as np

from cim_jax import geometry
from cim_jax import sharding


def true_masks(corners: np.ndarray, size: int) -> np.ndarray:
  """Ground-truth masks (B, N, size, size) from exemplar corners, rasterised on the host."""
  return np.asarray(geometry.masks_from_corners(np.asarray(corners), size, xp=np)) != 0


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
      chunk = {k: sharding.pad_rows(v, batch_size) for k, v in chunk.items()}
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


def random_init_params(model, seed: int = 0):
  """(params, target_params, model_state) of a freshly initialised model: the 'before' point."""
  params, model_state = jax.jit(model.init_variables)(jax.random.key(seed))  # eager is slow
  return params, model.target_params_from(params), model_state


def predicted_masks(predicted: np.ndarray) -> np.ndarray:
  """Boolean masks from (..., 2) correlation logits (argmax) or from masks / probabilities."""
  predicted = np.asarray(predicted)
  if predicted.ndim >= 1 and predicted.shape[-1] == 2:
    return predicted[..., 1] > predicted[..., 0]  # argmax; a tie counts as background
  if predicted.dtype == bool:
    return predicted
  if np.issubdtype(predicted.dtype, np.floating):
    return predicted > 0.5  # foreground probabilities
  return predicted != 0


def mask_iou(predicted: np.ndarray, true_masks: np.ndarray) -> np.ndarray:
  """IoU per map over the last two (pixel) axes; two empty masks agree perfectly (IoU 1)."""
  predicted, true_masks = np.asarray(predicted, bool), np.asarray(true_masks) != 0
  intersection = np.logical_and(predicted, true_masks).sum(axis=(-2, -1))
  union = np.logical_or(predicted, true_masks).sum(axis=(-2, -1))
  return np.where(union > 0, intersection / np.maximum(union, 1), 1.0)


def pretext_iou(predicted_logits_or_masks: np.ndarray, true_masks: np.ndarray) -> float:
  """Mean IoU of predicted (argmax of logits (B, N, C, C, 2), or masks (B, N, C, C)) vs truth."""
  predicted = predicted_masks(predicted_logits_or_masks)
  if predicted.shape != np.shape(true_masks):
    raise ValueError(f"pretext_iou: predicted masks {predicted.shape} and true masks "
                     f"{np.shape(true_masks)} differ in shape")
  return float(mask_iou(predicted, true_masks).mean())


def correlation_probs(correlation_logits: np.ndarray) -> np.ndarray:
  """(…, 2) logits -> foreground probability (…) by a two-class softmax."""
  logits = np.asarray(correlation_logits, np.float64)
  return 1.0 / (1.0 + np.exp(logits[..., 0] - logits[..., 1]))
