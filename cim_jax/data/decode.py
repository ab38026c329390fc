"""Robust image decoding to RGB uint8, shared by every source and benchmark."""

import io

import numpy as np
from PIL import Image, ImageOps


class UndecodableImage(ValueError):
  """The bytes are not an image PIL can decode correctly (corrupt, truncated, empty, ...)."""


def to_rgb_array(image: Image.Image) -> np.ndarray:
  """Converts any PIL mode to an (H, W, 3) uint8 RGB array, honouring EXIF orientation."""
  image = ImageOps.exif_transpose(image)
  if image.mode in ("I;16", "I;16B", "I;16L", "I"):
    # 16/32-bit grey: scale the used range to 8 bits instead of clipping at 255.
    grey = np.asarray(image, dtype=np.float64)
    hi = grey.max()
    grey = grey * (255.0 / hi) if hi > 255 else grey
    return np.repeat(np.clip(grey + 0.5, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
  if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
    # Composite on white so transparent regions do not become arbitrary colours.
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    image = Image.alpha_composite(background, rgba)
  return np.asarray(image.convert("RGB"), dtype=np.uint8)


def decode_image(data: bytes) -> np.ndarray:
  """Decodes encoded image bytes (JPEG, PNG, ...) to an (H, W, 3) uint8 RGB array.

  Raises UndecodableImage for empty, corrupt or truncated data; never returns a partial image.
  """
  if not data:
    raise UndecodableImage("empty file")
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()  # forces a full decode so truncation is detected here, not later
      array = to_rgb_array(image)
  except Image.UnidentifiedImageError:
    # PIL's message ends with the repr of our BytesIO ("<_io.BytesIO object at 0x...>"), noise
    # in a skip log that already names the file.
    raise UndecodableImage("UnidentifiedImageError: cannot identify image file (not an image "
                           "format PIL reads)") from None
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise UndecodableImage(f"{type(e).__name__}: {e}") from None
  if array.ndim != 3 or array.shape[0] < 1 or array.shape[1] < 1:
    raise UndecodableImage(f"unexpected decoded shape {array.shape}")
  return array
