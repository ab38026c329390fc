"""Host-side fine-tuning augmentation in the grain pipeline: RandomResizedCrop, flip, RandAugment.

RandAugment follows timm's 'rand-m9-mstd0.5-inc1' (2 ops from the 'increasing' set, each applied
with p=0.5, magnitude ~ N(9, 0.5) clipped to [0, 10]); the image operations are Pillow's
(ImageOps / ImageEnhance / affine transforms), the library timm itself uses for them, so the
behaviour matches without a torch dependency. Random erasing and mixup / cutmix work on whole
normalised batches and run on the device (see finetune_lib).
"""

import dataclasses
import math

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from cim_jax.data import pairs

_FILL = (124, 116, 104)  # timm's fill colour for geometric ops: the ImageNet mean in uint8
_MAX_LEVEL = 10.0


def _signed(value: float, rng: np.random.Generator) -> float:
  return -value if rng.random() < 0.5 else value


# MAE / CIM fine-tuning builds timm's transform with interpolation='bicubic', which RandAugment's
# geometric ops then use too (timm picks bilinear or bicubic at random only without it).
_RESAMPLE = Image.BICUBIC


def _affine(image: Image.Image, matrix, rng) -> Image.Image:
  del rng
  return image.transform(image.size, Image.AFFINE, matrix, resample=_RESAMPLE, fillcolor=_FILL)


def _rotate(image, level, rng):
  return image.rotate(_signed(level / _MAX_LEVEL * 30.0, rng), resample=_RESAMPLE, fillcolor=_FILL)


def _shear_x(image, level, rng):
  return _affine(image, (1, _signed(level / _MAX_LEVEL * 0.3, rng), 0, 0, 1, 0), rng)


def _shear_y(image, level, rng):
  return _affine(image, (1, 0, 0, _signed(level / _MAX_LEVEL * 0.3, rng), 1, 0), rng)


def _translate_x(image, level, rng):
  pixels = _signed(level / _MAX_LEVEL * 0.45, rng) * image.size[0]
  return _affine(image, (1, 0, pixels, 0, 1, 0), rng)


def _translate_y(image, level, rng):
  pixels = _signed(level / _MAX_LEVEL * 0.45, rng) * image.size[1]
  return _affine(image, (1, 0, 0, 0, 1, pixels), rng)


def _enhance(enhancer):
  def op(image, level, rng):  # 'increasing': a larger magnitude moves further from identity
    return enhancer(image).enhance(max(0.1, 1.0 + _signed(level / _MAX_LEVEL * 0.9, rng)))
  return op


def posterize_bits(level: float) -> int:
  """timm's _posterize_increasing_level_to_arg: 4 bits kept at level 0 down to 0 at level 10."""
  return 4 - int(level / _MAX_LEVEL * 4)


def _posterize(image, level, rng):
  """timm's posterize: identity for >= 8 bits, else keep the top `bits` bits of every channel.

  At level 10 timm asks for 0 bits, which Pillow < 11 served as ImageOps.posterize's mask
  ~(2**8 - 1): every bit dropped, a black image. Pillow >= 11 rejects 0 bits ("bits must be
  between or equal to 1 and 8"), so the same look-up table is applied here directly.
  """
  bits = posterize_bits(level)
  if bits >= 8:
    return image
  mask = ~(2 ** (8 - bits) - 1)
  return image.point([i & mask for i in range(256)] * len(image.getbands()))


def _solarize(image, level, rng):
  return ImageOps.solarize(image, 256 - min(256, int(level / _MAX_LEVEL * 256)))


def _solarize_add(image, level, rng):
  """timm's solarize_add: values below 128 raised by up to 110, saturating (L / RGB only)."""
  add = min(128, int(level / _MAX_LEVEL * 110))
  if image.mode not in ("L", "RGB"):
    return image
  lut = [min(255, i + add) if i < 128 else i for i in range(256)]
  return image.point(lut * len(image.getbands()))


# timm's _RAND_INCREASING_TRANSFORMS, in its order.
RAND_INCREASING_OPS = {
    "AutoContrast": lambda im, level, rng: ImageOps.autocontrast(im),
    "Equalize": lambda im, level, rng: ImageOps.equalize(im),
    "Invert": lambda im, level, rng: ImageOps.invert(im),
    "Rotate": _rotate,
    "PosterizeIncreasing": _posterize,
    "SolarizeIncreasing": _solarize,
    "SolarizeAdd": _solarize_add,
    "ColorIncreasing": _enhance(ImageEnhance.Color),
    "ContrastIncreasing": _enhance(ImageEnhance.Contrast),
    "BrightnessIncreasing": _enhance(ImageEnhance.Brightness),
    "SharpnessIncreasing": _enhance(ImageEnhance.Sharpness),
    "ShearX": _shear_x,
    "ShearY": _shear_y,
    "TranslateXRel": _translate_x,
    "TranslateYRel": _translate_y,
}


def rand_augment(image: np.ndarray, rng: np.random.Generator, *, num_ops: int = 2,
                 magnitude: float = 9.0, magnitude_std: float = 0.5, prob: float = 0.5
                 ) -> np.ndarray:
  """timm RandAugment (increasing ops) on an (H, W, 3) uint8 image."""
  names = list(RAND_INCREASING_OPS)
  pil = Image.fromarray(image)
  for name in rng.choice(names, num_ops, replace=True):
    if rng.random() > prob:
      continue
    level = magnitude + (rng.normal() * magnitude_std if magnitude_std > 0 else 0.0)
    level = min(max(level, 0.0), _MAX_LEVEL)
    pil = RAND_INCREASING_OPS[name](pil, level, rng)
  return np.asarray(pil, np.uint8)


@dataclasses.dataclass(frozen=True)
class TrainAugment:
  """The fine-tuning train transform: RandomResizedCrop (bicubic) + flip + RandAugment."""
  size: int = 224
  scale: tuple[float, float] = (0.08, 1.0)
  ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
  flip_prob: float = 0.5
  randaug_num_ops: int = 2
  randaug_magnitude: float = 9.0
  randaug_magnitude_std: float = 0.5

  def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    crop = pairs.sample_crop(image.shape[0], image.shape[1], rng.random(22), self.scale,
                             self.ratio)
    image = pairs.search_image(image, crop, self.size, bool(rng.random() < self.flip_prob))
    if self.randaug_num_ops > 0:
      image = rand_augment(image, rng, num_ops=self.randaug_num_ops,
                           magnitude=self.randaug_magnitude,
                           magnitude_std=self.randaug_magnitude_std)
    return image


def eval_transform(image: np.ndarray, size: int = 224, crop_pct: float = 0.95) -> np.ndarray:
  """Resize the shorter side to size / crop_pct (bicubic), then take the centre size x size."""
  height, width = image.shape[:2]
  short = int(math.floor(size / crop_pct))  # timm: scale_size = floor(img_size / crop_pct)
  if height <= width:  # torchvision Resize(int): the long side is truncated, not rounded
    new_h, new_w = short, int(short * width / height)
  else:
    new_h, new_w = int(short * height / width), short
  resized = pairs.resize(image, new_w, new_h)
  top, left = (new_h - size) // 2, (new_w - size) // 2
  return np.ascontiguousarray(resized[top:top + size, left:left + size])
