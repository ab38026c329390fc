"""Exemplar-only photometric augmentation on uint8 RGB images (docs/METHOD.md §1 step 5).

Semantics follow torchvision on PIL images, as in the authors' release: ColorJitter (the four
ops in a random order, each a blend computed in 8 bits), RandomGrayscale (ITU-R 601 luma copied
to 3 channels), Gaussian blur with sigma ~ U(lo, hi) (edges replicated, as PIL does), solarize
(values >= 128 inverted) and a final horizontal flip. Intermediate results are rounded to the
nearest level, where PIL truncates (a difference of at most one level per op).

Every random number comes from one row of uniforms drawn by the caller, always the same count
whatever the probabilities, so switching one op off leaves every other draw unchanged.
"""

from typing import Protocol, Sequence

import cv2
import numpy as np

# Columns of the per-exemplar row of uniforms.
JITTER_APPLY, BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3, 4
ORDER = slice(5, 9)  # argsort of four uniforms = a uniformly random permutation of the ops
GRAYSCALE, BLUR_APPLY, BLUR_SIGMA, SOLARIZE, FLIP = 9, 10, 11, 12, 13
NUM_UNIFORMS = 14

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's convert("L") and cv2
_GREY_MATRIX = np.array([_LUMA] * 3)  # RGB -> (luma, luma, luma)
_LEVELS = np.arange(256)
_SOLARIZE_LUT = np.where(_LEVELS >= 128, 255 - _LEVELS, _LEVELS).astype(np.uint8)


class PhotometricSpec(Protocol):
  """The PairSpec fields this module reads."""
  color_jitter_prob: float
  brightness: float
  contrast: float
  saturation: float
  hue: float
  grayscale_prob: float
  blur_prob: float
  blur_sigma: tuple[float, float]
  solarize_prob: float
  exemplar_flip_prob: float


def adjust_brightness(image: np.ndarray, factor: float) -> np.ndarray:
  """Blends with black: x * factor, rounded and saturated (factor >= 0, so abs is a no-op)."""
  return cv2.convertScaleAbs(image, alpha=factor)


def adjust_contrast(image: np.ndarray, factor: float) -> np.ndarray:
  """Blends with the mean grey level (rounded to an integer, as PIL's ImageEnhance.Contrast)."""
  red, green, blue, _ = cv2.mean(image)
  mean = int(0.299 * red + 0.587 * green + 0.114 * blue + 0.5)  # mean luma = luma of the means
  return cv2.addWeighted(image, factor, image, 0.0, mean * (1.0 - factor))


def adjust_saturation(image: np.ndarray, factor: float) -> np.ndarray:
  """Blends with the image's own greyscale version: one 3x3 colour matrix."""
  r, g, b = ((1.0 - factor) * w for w in _LUMA)
  matrix = np.array([[r + factor, g, b], [r, g + factor, b], [r, g, b + factor]])
  return cv2.transform(image, matrix)


def adjust_hue(image: np.ndarray, shift: float) -> np.ndarray:
  """Rotates the 8-bit HSV hue by shift (a fraction of the circle), wrapping as PIL does."""
  hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV_FULL)  # hue in 0..255 for the full circle
  hue = hsv[..., 0]
  hue += np.uint8(int(round(shift * 256)) % 256)  # uint8 arithmetic wraps around the circle
  return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


def grayscale(image: np.ndarray) -> np.ndarray:
  """ITU-R 601-2 luma in all three channels."""
  return cv2.transform(image, _GREY_MATRIX)


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
  """Separable Gaussian, kernel size as cv2.GaussianBlur's 8-bit default (2 * 3 sigma + 1)."""
  # sepFilter2D with our own kernel: cv2.GaussianBlur's bit-exact 8-bit path is slower.
  kernel = cv2.getGaussianKernel(int(round(sigma * 6 + 1)) | 1, sigma)
  return cv2.sepFilter2D(image, -1, kernel, kernel, borderType=cv2.BORDER_REPLICATE)


def solarize(image: np.ndarray) -> np.ndarray:
  return cv2.LUT(image, _SOLARIZE_LUT)


def _factor(u: float, strength: float) -> float:
  """torchvision's ColorJitter factor range [max(0, 1 - s), 1 + s]."""
  lo = max(0.0, 1.0 - strength)
  return lo + u * (1.0 + strength - lo)


def color_jitter(image: np.ndarray, u: Sequence[float], spec: PhotometricSpec) -> np.ndarray:
  """Brightness, contrast, saturation and hue in the random order given by u[ORDER]."""
  for op in sorted(range(4), key=u[ORDER].__getitem__):
    if op == 0 and spec.brightness > 0:
      image = adjust_brightness(image, _factor(u[BRIGHTNESS], spec.brightness))
    elif op == 1 and spec.contrast > 0:
      image = adjust_contrast(image, _factor(u[CONTRAST], spec.contrast))
    elif op == 2 and spec.saturation > 0:
      image = adjust_saturation(image, _factor(u[SATURATION], spec.saturation))
    elif op == 3 and spec.hue > 0:
      image = adjust_hue(image, (2.0 * u[HUE] - 1.0) * spec.hue)
  return image


def augment_exemplar(image: np.ndarray, u: Sequence[float], spec: PhotometricSpec) -> np.ndarray:
  """Applies the exemplar pipeline to one (E, E, 3) uint8 image given NUM_UNIFORMS uniforms.

  u is best a list of python floats: cheaper to index and compare than numpy scalars.
  """
  if u[JITTER_APPLY] < spec.color_jitter_prob:
    image = color_jitter(image, u, spec)
  if u[GRAYSCALE] < spec.grayscale_prob:
    image = grayscale(image)
  if u[BLUR_APPLY] < spec.blur_prob:
    lo, hi = spec.blur_sigma
    image = gaussian_blur(image, lo + u[BLUR_SIGMA] * (hi - lo))
  if u[SOLARIZE] < spec.solarize_prob:
    image = solarize(image)
  if u[FLIP] < spec.exemplar_flip_prob:
    image = cv2.flip(image, 1)  # the label (corners) stays: the model must match a mirror
  return image
