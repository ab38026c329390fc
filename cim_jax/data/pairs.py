"""Exemplar-context pairs: CIM's crop-and-correlate sample of one image (docs/METHOD.md §1).

Coordinates are continuous pixel-edge coordinates (x, y): pixel (row r, col c) covers
[c, c + 1) x [r, r + 1) and has its centre at (c + 0.5, r + 0.5). All geometry is defined on
the S x S search square (the RandomResizedCrop output), which is never materialised.

Per image (all randomness from the caller's np.random.Generator, a fixed number of draws):
1. Search square: torchvision RandomResizedCrop box (10 tries, then the central fallback) and a
   horizontal flip. The crop is halved with exact 2x2 box filters while it is >= ~1.41x larger
   than S (antialiasing at ~1/10 of cv2's INTER_AREA cost); this "source" stands for the
   search square. Halvings need even sizes, so the crop is trimmed by at most 2^k - 1 pixels
   (search_to_original gives the exact mapping); labels are exact regardless.
2. Context: the source, halved further while >= ~1.41x larger than C, one bicubic resize to
   C x C (mirrored when the search square is).
3. Exemplars: a rotated box in the search square, one of two geometries (data.exemplar_geometry;
   both draw a fixed 23 uniforms per exemplar).
   "release" (default) follows the authors' PyTorch release (util/datasets.py): an integer
   angle d in [-r, r - 1] (torch.randint(-r, r)); an axis-aligned box by RandomResizedCrop's
   rule on the S x S square (sample_crop: area U(lo, hi) * S^2, aspect log-U(lo, hi), integer
   size and position); the search square rotated counter-clockwise by d with its canvas
   expanded; the exemplar is the box's bounding rectangle in that rotated frame, its corners
   outside the rotated square moved onto its edge by the release's asymmetric revise_box
   rules (different for d > 0 and d <= 0). So it is a box rotated by d, generally larger than
   the drawn one (mean area 0.32 of the square, up to 0.67). Deliberate differences: the
   rectangle is continuous (the release's is pixel-quantised: same mean within 0.001, but
   near-boundary corners can flip a rule, 0.3% of exemplars differ by > 3 px); the label is
   the exact polygon (step 4), not the release's nearest/bicubic raster; the rectangle stays
   inside the square up to rounding (BORDER_REPLICATE in the warp), where the release's pixel
   rectangle can take a few fill pixels. Needs r a whole number <= 45 (above, revise_box
   leaves empty rectangles).
   "drawn_box": a box of area U(lo, hi) * S^2 and aspect ratio log-U(lo, hi), rotated by
   U(-r, r) degrees about its centre. The rotated box must lie inside the search square: as
   torchvision's RandomResizedCrop does for its box, (area, aspect) is redrawn up to 10 times
   for the drawn angle until the rotated box fits (so the angle distribution is exact and
   area/aspect follow their ranges truncated to the boxes that fit at that angle: with the
   defaults 89% of first draws fit, the mean area is 0.245 instead of 0.265); if none fits,
   the first draw is shrunk (aspect kept) until it just fits (2e-5 of boxes). The centre is
   uniform over all positions where the rotated box is inside.
   Either way the exemplar is one bilinear cv2.warpAffine of the box onto an E x E grid from
   the 2x mip level of the source that keeps the geometric-mean downscale <= sqrt(2); an axis
   still downscaled by more than 2 (extreme aspect ratios) is supersampled 2x and box filtered.
4. Label: the box's corners in context coordinates (exemplar grid top-left, top-right,
   bottom-right, bottom-left); geometry.masks_from_corners rasterises them exactly, here or on device.
5. Exemplar-only photometric augmentation and the final flip (cim_jax/data/photometric.py).
"""

import dataclasses
import math
from typing import Any, Callable

import cv2
import numpy as np

from cim_jax.data import photometric

_RRC_TRIES = 10  # torchvision RandomResizedCrop.get_params tries before its central fallback
_BOX_TRIES = 10
# Uniforms per call: search crop (2 per try + top + left + flip); per exemplar: angle, then
# (area, aspect) per try and centre x and y (drawn_box) or sample_crop's 2 * 10 + 2 (release,
# the same count), then the photometric row.
_SEARCH_UNIFORMS = 2 * _RRC_TRIES + 3
_BOX_UNIFORMS = 1 + 2 * _BOX_TRIES + 2
EXEMPLAR_GEOMETRIES = ("release", "drawn_box")
# Per axis, above it an exemplar axis is supersampled 2x. The mip level keeps the geometric
# mean downscale <= sqrt(2), so only extreme aspect ratios get here (~3% of exemplars); a lower
# threshold buys almost no quality for its time (docs/BENCHMARKS.md, input pipeline).
_MAX_WARP_DOWNSCALE = 2.0


def _pair(value: Any, name: str) -> tuple[float, float]:
  lo, hi = (float(v) for v in value)
  if not lo <= hi:
    raise ValueError(f"{name} must be an increasing (low, high) pair, got {tuple(value)}")
  return lo, hi


@dataclasses.dataclass(frozen=True)
class PairSpec:
  """Every pair-generation parameter (defaults: docs/METHOD.md §1)."""
  search_size: int = 224
  search_scale: tuple[float, float] = (0.5, 1.0)
  search_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
  search_flip_prob: float = 0.5
  context_size: int = 160
  num_exemplars: int = 6
  exemplar_size: int = 64
  exemplar_scale: tuple[float, float] = (0.05, 0.48)
  exemplar_ratio: tuple[float, float] = (1.0 / 3.0, 3.0)
  exemplar_rotation: float = 45.0
  exemplar_geometry: str = "release"
  color_jitter_prob: float = 0.8
  brightness: float = 0.4
  contrast: float = 0.4
  saturation: float = 0.2
  hue: float = 0.1
  grayscale_prob: float = 0.2
  blur_prob: float = 0.5
  blur_sigma: tuple[float, float] = (0.1, 2.0)
  solarize_prob: float = 0.2
  exemplar_flip_prob: float = 0.5

  def __post_init__(self):
    for name in ("search_size", "context_size", "num_exemplars", "exemplar_size"):
      if int(getattr(self, name)) != getattr(self, name) or getattr(self, name) < 1:
        raise ValueError(f"data.{name} must be a positive integer, got {getattr(self, name)}")
      object.__setattr__(self, name, int(getattr(self, name)))
    for name in ("search_scale", "search_ratio", "exemplar_scale", "exemplar_ratio",
                 "blur_sigma"):
      object.__setattr__(self, name, _pair(getattr(self, name), f"data.{name}"))
    if not (self.search_scale[0] > 0 and self.search_ratio[0] > 0 and self.exemplar_ratio[0] > 0):
      raise ValueError("data.search_scale, data.search_ratio and data.exemplar_ratio must be > 0")
    if not 0 < self.exemplar_scale[0] <= self.exemplar_scale[1] <= 1:
      raise ValueError(f"data.exemplar_scale must lie in (0, 1], got {self.exemplar_scale}")
    if not 0 <= self.exemplar_rotation <= 90:
      raise ValueError(f"data.exemplar_rotation must be in [0, 90], got {self.exemplar_rotation}")
    if self.exemplar_geometry not in EXEMPLAR_GEOMETRIES:
      raise ValueError(f"data.exemplar_geometry must be 'release' or 'drawn_box', got "
                       f"{self.exemplar_geometry!r}")
    if self.exemplar_geometry == "release" and (self.exemplar_rotation % 1
                                                or self.exemplar_rotation > 45):
      raise ValueError(f"data.exemplar_rotation must be a whole number of degrees in [0, 45] "
                       f"with exemplar_geometry='release', got {self.exemplar_rotation}")
    if self.blur_sigma[0] <= 0:
      raise ValueError(f"data.blur_sigma must be positive, got {self.blur_sigma}")
    for name in ("search_flip_prob", "color_jitter_prob", "grayscale_prob", "blur_prob",
                 "solarize_prob", "exemplar_flip_prob"):
      if not 0 <= getattr(self, name) <= 1:
        raise ValueError(f"data.{name} must be a probability, got {getattr(self, name)}")
    for name in ("brightness", "contrast", "saturation"):
      if getattr(self, name) < 0:
        raise ValueError(f"data.{name} must be >= 0, got {getattr(self, name)}")
    if not 0 <= self.hue <= 0.5:
      raise ValueError(f"data.hue must be in [0, 0.5], got {self.hue}")

  @classmethod
  def from_config(cls, data: Any) -> "PairSpec":
    """Reads the pair keys of config.data (configs/cim_pretrain.py)."""
    return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})

  def without_photometric(self) -> "PairSpec":
    """The same geometry with every exemplar-only photometric op and the final flip off."""
    return dataclasses.replace(self, color_jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0,
                               solarize_prob=0.0, exemplar_flip_prob=0.0)


@dataclasses.dataclass(frozen=True)
class PairGeometry:
  """What make_pair sampled, for tests and pictures (not part of the batch)."""
  crop: tuple[int, int, int, int]  # RandomResizedCrop box (top, left, height, width), original px
  search_flip: bool
  search_to_original: np.ndarray  # (2, 3) affine: search (x, y, 1) -> original image (x, y)
  boxes: np.ndarray  # (N, 5) centre x, centre y, width, height (search px), angle (radians)
  exemplar_to_search: np.ndarray  # (N, 2, 3) affine: exemplar (x, y, 1) -> search (x, y)
  exemplar_flip: np.ndarray  # (N,) bool: exemplar mirrored after the label was fixed


def sample_crop(height: int, width: int, u: np.ndarray, scale: tuple[float, float],
                ratio: tuple[float, float]) -> tuple[int, int, int, int]:
  """torchvision RandomResizedCrop.get_params from 2 * 10 + 2 uniforms -> (top, left, h, w)."""
  area = height * width
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for t in range(_RRC_TRIES):
    target_area = area * (scale[0] + u[2 * t] * (scale[1] - scale[0]))
    aspect = math.exp(log_lo + u[2 * t + 1] * (log_hi - log_lo))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = min(int(u[2 * _RRC_TRIES] * (height - h + 1)), height - h)
      left = min(int(u[2 * _RRC_TRIES + 1] * (width - w + 1)), width - w)
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  w, h = max(1, min(w, width)), max(1, min(h, height))  # degenerate images (1 x 2000)
  return (height - h) // 2, (width - w) // 2, h, w


def _sample_box(u: list[float], spec: PairSpec) -> tuple[float, float, float, float, float]:
  """One rotated box inside the search image: (centre x, centre y, width, height, angle)."""
  # Plain floats: for 6 boxes, numpy's per-call overhead costs more than the arithmetic.
  size = float(spec.search_size)
  angle = math.radians((2.0 * u[0] - 1.0) * spec.exemplar_rotation)
  cos, sin = abs(math.cos(angle)), abs(math.sin(angle))
  lo, hi = spec.exemplar_scale
  log_lo, log_hi = math.log(spec.exemplar_ratio[0]), math.log(spec.exemplar_ratio[1])
  for t in range(_BOX_TRIES):
    area = (lo + u[1 + t] * (hi - lo)) * size * size
    aspect = math.exp(log_lo + u[1 + _BOX_TRIES + t] * (log_hi - log_lo))
    width, height = math.sqrt(area * aspect), math.sqrt(area / aspect)
    # A rotated rectangle lies inside the image iff its axis-aligned bounding box does.
    extent_x, extent_y = width * cos + height * sin, width * sin + height * cos
    if extent_x <= size and extent_y <= size:
      break
    if t == 0:
      first = width, height, extent_x, extent_y
  else:  # nothing fitted: shrink the first draw, aspect kept, until it just fits
    shrink = min(size / first[2], size / first[3])
    width, height, extent_x, extent_y = (v * shrink for v in first)
  centre_x = extent_x / 2 + u[-2] * max(size - extent_x, 0.0)
  centre_y = extent_y / 2 + u[-1] * max(size - extent_y, 0.0)
  return centre_x, centre_y, width, height, angle


def _sample_release_box(u: list[float], spec: PairSpec) -> tuple[float, float, float, float,
                                                                   float]:
  """The authors' exemplar (module docstring, step 3), continuous: (cx, cy, w, h, angle).

  u: 1 uniform for the integer angle, then sample_crop's 2 * 10 + 2 for the drawn box.
  """
  size = spec.search_size
  h = size / 2.0
  r = int(spec.exemplar_rotation)
  degree = min(int(u[0] * 2 * r), 2 * r - 1) - r if r else 0  # torch.randint(-r, r)
  top, left, rows, cols = sample_crop(size, size, u[1:], spec.exemplar_scale,
                                      spec.exemplar_ratio)
  if degree == 0:
    return left + cols / 2.0, top + rows / 2.0, float(cols), float(rows), 0.0
  angle = math.radians(degree)
  c, s = math.cos(angle), math.sin(angle)
  # Frame of the search image rotated counter-clockwise by `degree` (torchvision's rotate with
  # expand=True), centred: (u, v) = M p with M = [[c, s], [-s, c]] for p relative to the search
  # centre (x right, y down), so p = R(angle) (u, v). The drawn box's bounding rectangle there:
  x0, x1, y0, y1 = left - h, left + cols - h, top - h, top + rows - h
  u1, u2 = c * x0 + min(s * y0, s * y1), c * x1 + max(s * y0, s * y1)
  v1, v2 = c * y0 - max(s * x0, s * x1), c * y1 - min(s * x0, s * x1)
  # The rotated search image is |c u - s v| <= S/2 and |s u + c v| <= S/2 (0 < c, s != 0 here).
  # Valid v in column u: [max(c u / s - S / 2|s|, (-S/2 - s u) / c),
  #                       min(c u / s + S / 2|s|, (S/2 - s u) / c)];
  # valid u in row v:    [max((s v - S/2) / c, -c v / s - S / 2|s|),
  #                       min((s v + S/2) / c, -c v / s + S / 2|s|)].
  a = h / abs(s)
  bound = h * (1.0 + 1e-12)  # rounding: a corner on the edge is inside

  def inside(u_: float, v_: float) -> bool:
    return abs(c * u_ - s * v_) <= bound and abs(s * u_ + c * v_) <= bound

  # The release's revise_box: corners of the rectangle outside the rotated image are moved
  # onto its edge, in this order, with these (asymmetric) rules; (row, column) = (v, u).
  if degree > 0:
    v1r = max(c * u1 / s - a, (-h - s * u1) / c) if not inside(u1, v1) else v1
    u2r = min((s * v1r + h) / c, -c * v1r / s + a) if not inside(u2, v1) else u2
    u1r = max((s * v2 - h) / c, -c * v2 / s - a) if not inside(u1, v2) else u1
    v2r = min(c * u2r / s + a, (h - s * u2r) / c) if not inside(u2r, v2) else v2
  else:
    u1r = max((s * v1 - h) / c, -c * v1 / s - a) if not inside(u1, v1) else u1
    v1r = max(c * u2 / s - a, (-h - s * u2) / c) if not inside(u2, v1) else v1
    v2r = min(c * u1r / s + a, (h - s * u1r) / c) if not inside(u1, v2) else v2
    u2r = min((s * v2r + h) / c, -c * v2r / s + a) if not inside(u2, v2r) else u2
  width, height = max(u2r - u1r, 1e-6), max(v2r - v1r, 1e-6)
  cu, cv = (u1r + u2r) / 2.0, (v1r + v2r) / 2.0
  return c * cu - s * cv + h, s * cu + c * cv + h, width, height, angle


_SAMPLERS = {"release": _sample_release_box, "drawn_box": _sample_box}


def sample_boxes(u: np.ndarray, spec: PairSpec) -> np.ndarray:
  """Rotated exemplar boxes in the S x S search image from (N, _BOX_UNIFORMS) uniforms.

  Returns (N, 5): centre x, centre y, width, height (search pixels), angle (radians).
  """
  sampler = _SAMPLERS[spec.exemplar_geometry]
  return np.array([sampler(row, spec) for row in np.asarray(u).tolist()], np.float64)


def _affine(cx: float, cy: float, width: float, height: float, angle: float,
            exemplar_size: int) -> list[list[float]]:
  """Exemplar grid [0, E]^2 -> search: centre + R(angle) ((x, y) * (w, h) / E - (w, h) / 2)."""
  cos, sin = math.cos(angle), math.sin(angle)
  sx, sy = width / exemplar_size, height / exemplar_size
  return [[cos * sx, -sin * sy, cx - (cos * width - sin * height) / 2],
          [sin * sx, cos * sy, cy - (sin * width + cos * height) / 2]]


def exemplar_affines(boxes: np.ndarray, exemplar_size: int) -> np.ndarray:
  """(N, 2, 3) affines mapping exemplar grid coordinates [0, E]^2 onto the boxes (search px)."""
  return np.array([_affine(*box, exemplar_size) for box in np.asarray(boxes).tolist()],
                  np.float64).reshape(-1, 2, 3)


def _halve(image: np.ndarray) -> np.ndarray:
  """Exact 2x2 box filter (cv2's fast INTER_AREA path); an odd last row/column is dropped."""
  h, w = image.shape[0] // 2, image.shape[1] // 2
  return cv2.resize(image[:2 * h, :2 * w], (w, h), interpolation=cv2.INTER_AREA)


def _num_halvings(height: int, width: int, out_height: int, out_width: int) -> int:
  """How many exact 2x halvings resize applies first (geometric-mean downscale >= sqrt(2))."""
  count = 0
  while height * width >= 2.0 * out_height * out_width and min(height, width) >= 2:
    height, width, count = height // 2, width // 2, count + 1
  return count


def resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
  """Bicubic resize after exact 2x box-filter halvings, so the bicubic step downscales < ~1.41x."""
  for _ in range(_num_halvings(image.shape[0], image.shape[1], height, width)):
    image = _halve(image)
  if image.shape[:2] == (height, width):
    return np.ascontiguousarray(image)
  return cv2.resize(image, (width, height), interpolation=cv2.INTER_CUBIC)


def search_image(image: np.ndarray, crop: tuple[int, int, int, int], size: int,
                 flip: bool) -> np.ndarray:
  """A plain RandomResizedCrop output (benchmark baseline, pictures); make_pair skips it."""
  top, left, h, w = crop
  search = resize(image[top:top + h, left:left + w], size, size)
  return cv2.flip(search, 1) if flip else search


def _crop_plan(height: int, width: int, spec: PairSpec) -> tuple[int, int, int, int]:
  """(used height, used width, halvings to the exemplar source, halvings to the context).

  The crop is trimmed to a multiple of 2^context_halvings (at most that many pixels less than
  the box), so every halving below is an exact 2x2 average and the context shows exactly the
  region the labels are defined on.
  """
  search_halvings = _num_halvings(height, width, spec.search_size, spec.search_size)
  context_halvings = max(search_halvings,
                         _num_halvings(height, width, spec.context_size, spec.context_size))
  k = context_halvings
  return (height >> k) << k, (width >> k) << k, search_halvings, context_halvings


def search_to_original(crop: tuple[int, int, int, int], flip: bool,
                       spec: PairSpec) -> np.ndarray:
  """(2, 3) affine: make_pair's search square (x, y, 1) -> original image (x, y), exactly."""
  top, left, h, w = crop
  used_h, used_w, _, _ = _crop_plan(h, w, spec)
  sx, sy = used_w / spec.search_size, used_h / spec.search_size
  if flip:
    return np.array([[-sx, 0.0, left + used_w], [0.0, sy, top]])
  return np.array([[sx, 0.0, left], [0.0, sy, top]])


def warp_exemplars(source: np.ndarray, affines: np.ndarray, exemplar_size: int,
                   search_size: int) -> np.ndarray:
  """(N, E, E, 3) bilinear warps of boxes given in search coordinates.

  source shows the whole (unflipped) search square at its own resolution; each box is warped
  from the 2x mip level of source that suits its scale.
  """
  e = exemplar_size
  levels = [source]
  plans = []  # (mip level, supersampling x, y), then all cv2 matrices built in one array
  matrices = []
  for (a00, a01, a02), (a10, a11, a12) in np.asarray(affines).tolist():
    # Source pixels per exemplar pixel along the exemplar's own x and y axes.
    scale_x = math.hypot(a00, a10) * source.shape[1] / search_size
    scale_y = math.hypot(a01, a11) * source.shape[0] / search_size
    level = max(0, round(math.log2(max(math.sqrt(scale_x * scale_y), 1e-6))))
    while len(levels) <= level and min(levels[-1].shape[:2]) >= 2:
      levels.append(_halve(levels[-1]))
    level = min(level, len(levels) - 1)
    # Level pixel a covers source pixels [2^l a, 2^l (a + 1)): exact even where a halving
    # dropped an odd last column (that thin far-edge strip is then edge-replicated).
    to_x = source.shape[1] / search_size / 2**level
    to_y = source.shape[0] / search_size / 2**level
    scale_x, scale_y = math.hypot(a00, a10) * to_x, math.hypot(a01, a11) * to_y
    # Supersample an axis 2x (then box filter it) where the warp alone would alias badly.
    ss_x = 2 if scale_x > _MAX_WARP_DOWNSCALE else 1
    ss_y = 2 if scale_y > _MAX_WARP_DOWNSCALE else 1
    b00, b01, b10, b11 = a00 * to_x / ss_x, a01 * to_x / ss_y, a10 * to_y / ss_x, a11 * to_y / ss_y
    # Edge coordinates -> cv2's pixel indices: src_index = A (dst_index + 0.5) + t - 0.5.
    matrices.append([[b00, b01, a02 * to_x + (b00 + b01 - 1.0) * 0.5],
                     [b10, b11, a12 * to_y + (b10 + b11 - 1.0) * 0.5]])
    plans.append((level, ss_x, ss_y))
  matrices = np.array(matrices, np.float64).reshape(-1, 2, 3)
  out = np.empty((len(plans), e, e, 3), np.uint8)
  flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
  for n, (level, ss_x, ss_y) in enumerate(plans):
    if ss_x == ss_y == 1:
      cv2.warpAffine(levels[level], matrices[n], (e, e), dst=out[n], flags=flags,
                     borderMode=cv2.BORDER_REPLICATE)
    else:
      fine = cv2.warpAffine(levels[level], matrices[n], (e * ss_x, e * ss_y), flags=flags,
                            borderMode=cv2.BORDER_REPLICATE)
      # At an exact 2x factor bilinear sampling averages pixel pairs: a 2-tap box filter,
      # and several times faster than cv2's INTER_AREA for non-square factors.
      cv2.resize(fine, (e, e), dst=out[n], interpolation=cv2.INTER_LINEAR)
  return out


def _check_image(image: np.ndarray) -> None:
  if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
          and image.shape[2] == 3 and image.shape[0] >= 1 and image.shape[1] >= 1):
    shape = getattr(image, "shape", None)
    dtype = getattr(image, "dtype", type(image).__name__)
    raise ValueError(f"make_pair needs an (H, W, 3) uint8 RGB image, got shape {shape} {dtype}")


def _generate(image: np.ndarray, rng: np.random.Generator, spec: PairSpec,
              lap: Callable[[str], None] | None = None):
  """The sample and the geometry it was made with; lap(stage) marks stage ends (benchmarks)."""
  _check_image(image)
  n, e, c, s = spec.num_exemplars, spec.exemplar_size, spec.context_size, spec.search_size
  # Two fixed-size draws per call: the same Generator state always gives the same sample,
  # and changing a probability changes only the op it governs.
  u_search = rng.random(_SEARCH_UNIFORMS).tolist()
  u_exemplar = rng.random((n, _BOX_UNIFORMS + photometric.NUM_UNIFORMS)).tolist()
  crop = sample_crop(image.shape[0], image.shape[1], u_search, spec.search_scale,
                     spec.search_ratio)
  search_flip = u_search[-1] < spec.search_flip_prob
  top, left, h, w = crop
  # No S x S search image is materialised: the crop, halved while it is >= ~1.41x larger than
  # S, is the source of the exemplar warps and, halved further while >= ~1.41x larger than C,
  # of the context (one bicubic resize). The search flip is folded into both.
  used_h, used_w, search_halvings, context_halvings = _crop_plan(h, w, spec)
  source = image[top:top + used_h, left:left + used_w]
  for _ in range(search_halvings):
    source = _halve(source)
  context = source
  for _ in range(context_halvings - search_halvings):
    context = _halve(context)
  if context.shape[:2] == (c, c):
    context = context.copy()
  else:
    context = cv2.resize(context, (c, c), interpolation=cv2.INTER_CUBIC)
  if search_flip:
    context = cv2.flip(context, 1)
  if lap:
    lap("crop + context")

  sampler = _SAMPLERS[spec.exemplar_geometry]
  boxes = [sampler(row[:_BOX_UNIFORMS], spec) for row in u_exemplar]
  affines = [_affine(*box, e) for box in boxes]  # exemplar -> (possibly mirrored) search
  if search_flip:  # the same boxes in the unflipped image: x -> s - x
    source_affines = [[[-a, -b, s - t], row] for (a, b, t), row in affines]
  else:
    source_affines = affines
  exemplars = warp_exemplars(source, np.array(source_affines), e, s)
  grid = ((0.0, 0.0), (e, 0.0), (e, e), (0.0, e))  # TL, TR, BR, BL
  corners = np.array([[(a * x + b * y + t, d * x + f * y + g) for x, y in grid]
                      for (a, b, t), (d, f, g) in affines], np.float64) * (c / s)
  if lap:
    lap("exemplar boxes + warps + corners")

  for k in range(n):
    augmented = photometric.augment_exemplar(exemplars[k], u_exemplar[k][_BOX_UNIFORMS:], spec)
    if augmented.base is not exemplars:  # else no op applied: it is still the view in place
      exemplars[k] = augmented
  if lap:
    lap("photometric")
  pair = dict(context=context, exemplars=exemplars, corners=corners.astype(np.float32))
  return pair, (crop, search_flip, boxes, affines,
                [row[_BOX_UNIFORMS + photometric.FLIP] for row in u_exemplar])


def make_pair(image: np.ndarray, rng: np.random.Generator,
              spec: PairSpec) -> dict[str, np.ndarray]:
  """One CIM sample: context (C, C, 3) uint8, exemplars (N, E, E, 3) uint8, corners (N, 4, 2).

  corners: float32 (x, y) context pixels of the exemplar grid's TL, TR, BR, BL corners (before
  the exemplar's final flip), i.e. the label region; see geometry.masks_from_corners.
  """
  return _generate(image, rng, spec)[0]


def make_pair_and_geometry(image: np.ndarray, rng: np.random.Generator,
                           spec: PairSpec) -> tuple[dict[str, np.ndarray], PairGeometry]:
  """make_pair (same sample for the same rng state) plus its geometry, for tests and pictures."""
  pair, (crop, search_flip, boxes, affines, u_flip) = _generate(image, rng, spec)
  geometry = PairGeometry(crop=crop, search_flip=search_flip,
                          search_to_original=search_to_original(crop, search_flip, spec),
                          boxes=np.array(boxes), exemplar_to_search=np.array(affines),
                          exemplar_flip=np.array(u_flip) < spec.exemplar_flip_prob)
  return pair, geometry
