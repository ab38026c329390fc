"""Exemplar-context pairs: exact labels, sampling ranges, determinism, photometric ops."""

import dataclasses
import functools

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data

from cim_jax.geometry import masks_from_corners
from cim_jax.data import pairs, photometric, sources
from train_fixtures import recipe

SPEC = pairs.PairSpec()
GEOMETRY_ONLY = SPEC.without_photometric()
# Extreme settings: each range pinned to one end (docs/METHOD.md section 1 ranges).
EXTREMES = {
    "smallest": dict(exemplar_scale=(0.05, 0.05)),
    "largest": dict(exemplar_scale=(0.48, 0.48)),
    "aspect_1/3": dict(exemplar_ratio=(1 / 3, 1 / 3)),
    "aspect_3": dict(exemplar_ratio=(3.0, 3.0)),
    "largest_aspect_3": dict(exemplar_scale=(0.48, 0.48), exemplar_ratio=(3.0, 3.0)),
    "search_scale_min": dict(search_scale=(0.5, 0.5), exemplar_scale=(0.05, 0.05)),
    "search_scale_max": dict(search_scale=(1.0, 1.0)),
    "no_rotation": dict(exemplar_rotation=0.0),
}


def smooth_image(height=300, width=400, period=1.0):
  """Low-frequency colours: interpolation is near exact, misregistration is not."""
  y, x = (np.mgrid[0:height, 0:width] + 0.5) / period
  channels = [np.sin(2 * np.pi * x / 150), np.sin(2 * np.pi * y / 170),
              np.sin(2 * np.pi * (x + y) / 200)]
  return np.clip(127.5 + 120 * np.stack(channels, -1), 0, 255).round().astype(np.uint8)


def exemplar_to_context(geometry, spec):
  """(N, 2, 3) affines exemplar grid -> context coordinates."""
  return geometry.exemplar_to_search * (spec.context_size / spec.search_size)


def invert(affine):
  """Inverse of a (2, 3) affine."""
  inverse = np.linalg.inv(affine[:, :2])
  return np.concatenate([inverse, (-inverse @ affine[:, 2])[:, None]], 1)


def warp_from(image, dst_to_src, size):
  """Bilinear cv2 warp given an edge-coordinate dst -> src affine."""
  index = dst_to_src.copy()
  index[:, 2] += dst_to_src[:, :2].sum(1) * 0.5 - 0.5
  flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
  return cv2.warpAffine(image, index, (size, size), flags=flags,
                        borderMode=cv2.BORDER_REPLICATE).astype(np.float64)


def registration_errors(pair, geometry, spec, shift=0.0):
  """Mean |exemplar warped back - context| over each mask's interior (optionally misregistered)."""
  c = spec.context_size
  masks = masks_from_corners(pair["corners"], c)
  errors = []
  for k, affine in enumerate(exemplar_to_context(geometry, spec)):
    affine = affine + np.array([[0, 0, shift], [0, 0, 0]])
    back = warp_from(pair["exemplars"][k], invert(affine), c)  # context -> exemplar grid
    # Interior only: bilinear footprints straddling the edge mix in outside pixels.
    interior = cv2.erode(masks[k].astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    interior[:2] = interior[-2:] = interior[:, :2] = interior[:, -2:] = False
    assert interior.sum() > 20
    errors.append(np.abs(back - pair["context"])[interior].mean())
  return np.array(errors)


@pytest.mark.parametrize("exemplar_geometry", pairs.EXEMPLAR_GEOMETRIES)
@pytest.mark.parametrize("name", ["default", *EXTREMES])
def test_exemplar_warped_back_matches_context_inside_the_mask(name, exemplar_geometry):
  spec = dataclasses.replace(GEOMETRY_ONLY, exemplar_geometry=exemplar_geometry,
                             **EXTREMES.get(name, {}))
  image = smooth_image()
  for seed in range(6):
    pair, geometry = pairs.make_pair_and_geometry(image, np.random.default_rng(seed), spec)
    errors = registration_errors(pair, geometry, spec)
    assert errors.max() < 1.0, (seed, errors)  # interpolation error, in 8-bit levels
    # The test can fail: half a context pixel of misregistration is clearly visible.
    shifted = registration_errors(pair, geometry, spec, shift=0.5)
    assert (shifted > errors + 0.4).all(), (seed, errors, shifted)


@pytest.mark.parametrize("exemplar_geometry", pairs.EXEMPLAR_GEOMETRIES)
def test_label_corners_are_the_exemplar_tl_tr_br_bl(exemplar_geometry):
  """The label alone (corners, documented TL, TR, BR, BL of the exemplar grid) registers the
  exemplar on the context: the affine through corners 0, 1, 3 warps it back onto the context,
  and corner 2 is where that affine puts BR. A different corner order gives the same mask but
  a mirrored or rotated exemplar, which does not register."""
  spec = dataclasses.replace(GEOMETRY_ONLY, exemplar_geometry=exemplar_geometry)
  c, e = spec.context_size, spec.exemplar_size
  image = smooth_image()
  for seed in range(4):
    pair = pairs.make_pair(image, np.random.default_rng(seed), spec)
    masks = masks_from_corners(pair["corners"], c)
    for k, (tl, tr, br, bl) in enumerate(np.asarray(pair["corners"], np.float64)):
      affine = np.stack([(tr - tl) / e, (bl - tl) / e, tl], axis=1)  # exemplar grid -> context
      np.testing.assert_allclose(affine[:, :2] @ [e, e] + tl, br, atol=1e-3)
      back = warp_from(pair["exemplars"][k], invert(affine), c)
      interior = cv2.erode(masks[k].astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
      interior[:2] = interior[-2:] = interior[:, :2] = interior[:, -2:] = False
      assert interior.sum() > 20
      error = np.abs(back - pair["context"])[interior].mean()
      assert error < 1.0, (seed, k, error)


def compose(outer, inner):
  """Affine outer o inner, both (..., 2, 3)."""
  linear = outer[..., :2] @ inner[..., :2]
  return np.concatenate([linear, (outer[..., :2] @ inner[..., 2:] + outer[..., 2:])], -1)


@pytest.mark.parametrize("exemplar_geometry", pairs.EXEMPLAR_GEOMETRIES)
@pytest.mark.parametrize("shape", [(300, 400), (1000, 1300)])
def test_outputs_match_the_original_through_the_composed_affines(shape, exemplar_geometry):
  # The second size goes through 2x halvings; features scale with the image, as in photos.
  image = smooth_image(*shape, period=shape[1] / 400)
  s, c, e = SPEC.search_size, SPEC.context_size, SPEC.exemplar_size
  spec = dataclasses.replace(GEOMETRY_ONLY, exemplar_geometry=exemplar_geometry)
  for seed in range(4):
    pair, geometry = pairs.make_pair_and_geometry(image, np.random.default_rng(seed), spec)
    to_original = geometry.search_to_original
    context_to_search = np.array([[s / c, 0, 0], [0, s / c, 0]])
    reference = warp_from(image, compose(to_original, context_to_search), c)
    error = np.abs(reference - pair["context"])[2:-2, 2:-2].mean()
    assert error < 1.0, (seed, error)
    nudged = to_original + np.array([[0, 0, to_original[0, 0]], [0, 0, 0]])  # one search px
    assert np.abs(warp_from(image, compose(nudged, context_to_search), c)
                  - pair["context"])[2:-2, 2:-2].mean() > error + 0.5
    for k, affine in enumerate(geometry.exemplar_to_search):
      reference = warp_from(image, compose(to_original, affine), e)
      error = np.abs(reference - pair["exemplars"][k])[1:-1, 1:-1].mean()
      assert error < 1.0, (seed, k, error)


@pytest.mark.parametrize("exemplar_geometry", pairs.EXEMPLAR_GEOMETRIES)
@pytest.mark.parametrize("name", ["default", *EXTREMES])
def test_rotated_box_inside_search_and_mask_area_matches(name, exemplar_geometry):
  spec = dataclasses.replace(GEOMETRY_ONLY, exemplar_geometry=exemplar_geometry,
                             **EXTREMES.get(name, {}))
  s, c, e = spec.search_size, spec.context_size, spec.exemplar_size
  lo, hi = spec.exemplar_scale
  image = np.zeros((240, 320, 3), np.uint8)
  for seed in range(25):
    pair, geometry = pairs.make_pair_and_geometry(image, np.random.default_rng(seed), spec)
    search_corners = pair["corners"] * (s / c)
    assert search_corners.min() >= -1e-3 and search_corners.max() <= s + 1e-3
    width, height, angle = geometry.boxes[:, 2], geometry.boxes[:, 3], geometry.boxes[:, 4]
    assert (np.abs(np.rad2deg(angle)) <= spec.exemplar_rotation + 1e-9).all()
    area_fraction = width * height / s**2
    if spec.exemplar_geometry == "drawn_box":
      assert (area_fraction <= hi * (1 + 1e-9)).all()  # shrinking only ever makes it smaller
    else:  # integer degrees; a bounding rectangle, larger than the drawn box
      assert np.allclose(np.rad2deg(angle), np.round(np.rad2deg(angle)))
      assert (area_fraction <= 1 + 1e-9).all()
    area = area_fraction * c**2
    perimeter = 2 * (width + height) * c / s
    mask_area = masks_from_corners(pair["corners"], c).sum(axis=(1, 2))
    assert (np.abs(mask_area - area) <= 0.5 * perimeter + 2).all()
    # Independent rasterisation: pixel centres mapped into the exemplar grid in float64.
    affine = exemplar_to_context(geometry, spec)
    centres = np.stack(np.meshgrid(np.arange(c) + 0.5, np.arange(c) + 0.5), -1)  # (c, c, 2)
    for k in range(spec.num_exemplars):
      grid = np.linalg.solve(affine[k, :, :2], (centres - affine[k, :, 2]).reshape(-1, 2).T).T
      inside = ((grid >= -1e-4) & (grid <= e + 1e-4)).all(1).reshape(c, c)
      sure = ((grid >= 1e-4) & (grid <= e - 1e-4)).all(1).reshape(c, c)
      mask = masks_from_corners(pair["corners"][k], c)
      assert (mask <= inside).all() and (mask >= sure).all()


def test_box_sampling_extremes_fit_and_keep_ranges():
  rows = 400
  u = np.random.default_rng(0).random((rows, pairs._BOX_UNIFORMS))
  u[: rows // 2, 0] = np.where(np.arange(rows // 2) % 2, 1.0, 0.0)  # exactly -45 and +45 degrees
  spec = dataclasses.replace(SPEC, exemplar_geometry="drawn_box")
  boxes = pairs.sample_boxes(u, spec)
  s = SPEC.search_size
  grid = np.array([[0, 64, 64, 0], [0, 0, 64, 64], [1, 1, 1, 1]])  # corners (x, y, 1)
  corners = pairs.exemplar_affines(boxes, 64) @ grid
  assert corners.min() >= -1e-6 and corners.max() <= s + 1e-6
  assert np.allclose(np.abs(np.rad2deg(boxes[: rows // 2, 4])), 45.0)
  aspect = boxes[:, 2] / boxes[:, 3]
  assert (aspect >= 1 / 3 - 1e-9).all() and (aspect <= 3 + 1e-9).all()
  # Without rotation and with boxes that always fit, area is U(lo, hi) and log-aspect uniform.
  spec = dataclasses.replace(spec, exemplar_rotation=0.0, exemplar_scale=(0.05, 0.3),
                             exemplar_ratio=(0.5, 2.0))
  u = np.random.default_rng(1).random((4000, pairs._BOX_UNIFORMS))
  boxes = pairs.sample_boxes(u, spec)
  fraction = boxes[:, 2] * boxes[:, 3] / s**2
  assert abs(fraction.mean() - 0.175) < 0.01 and fraction.min() >= 0.05 and fraction.max() <= 0.3
  assert abs(np.log(boxes[:, 2] / boxes[:, 3]).mean()) < 0.05


def test_release_boxes_use_integer_angles_and_the_drawn_crop():
  rows = 2000
  u = np.random.default_rng(0).random((rows, pairs._BOX_UNIFORMS))
  u[:2, 0] = 0.0, 1.0  # the ends: -45 and 44 degrees (torch.randint(-45, 45))
  boxes = pairs.sample_boxes(u, SPEC)
  degrees = np.rad2deg(boxes[:, 4])
  assert np.allclose(degrees, np.round(degrees)) and degrees[0] == -45 and round(degrees[1]) == 44
  assert set(np.round(degrees).astype(int)) == set(range(-45, 45))
  corners = pairs.exemplar_affines(boxes, 64) @ np.array([[0, 64, 64, 0], [0, 0, 64, 64],
                                                          [1, 1, 1, 1]])
  s = SPEC.search_size
  assert corners.min() >= -1e-6 and corners.max() <= s + 1e-6
  # At 0 degrees the exemplar is the drawn RandomResizedCrop box itself.
  zero = np.round(degrees) == 0
  assert zero.sum() > 5
  for row, box in zip(u[zero], boxes[zero]):
    top, left, h, w = pairs.sample_crop(s, s, row[1:], SPEC.exemplar_scale, SPEC.exemplar_ratio)
    assert np.allclose(box, [left + w / 2, top + h / 2, w, h, 0.0])
  # Otherwise it contains the drawn box's corners that lie inside the rotated search square
  # (it is their bounding rectangle, clipped), so it is mostly larger.
  fraction = boxes[:, 2] * boxes[:, 3] / s**2
  assert 0.30 < fraction.mean() < 0.34 and fraction.max() > 0.5


# An independent restatement of the authors' exemplar sampler (weivision/Correlational-Image-
# Modeling util/datasets.py: CorrlationDataset.__getitem__, get_params, revise_box), pixel for
# pixel: torchvision's rotate(expand=True) of the S x S box mask (nearest neighbour, inverse
# mapping, canvas from _compute_affine_output_size), the bounding rows/columns of the box's
# pixels, revise_box on the valid (rotated image) pixels, an inclusive crop (+1).

RELEASE_SIZE = 224
_NONE = 1 << 30


@functools.lru_cache(maxsize=None)
def _release_frame(degree, size=RELEASE_SIZE):
  """Search image rotated counter-clockwise by `degree` degrees, canvas expanded."""
  angle = np.deg2rad(degree)
  cos, sin = np.cos(angle), np.sin(angle)
  extent = size * (abs(cos) + abs(sin))
  grid = 1e-4  # torchvision truncates the corner coordinates to 1e-4 before ceil / floor
  n = int(np.ceil(np.trunc((size + extent) / 2 / grid) * grid)
          - np.floor(np.trunc((size - extent) / 2 / grid) * grid))
  q = np.arange(n) + 0.5 - n / 2  # canvas pixel centres relative to the canvas centre
  qu, qv = np.meshgrid(q, q)
  # Inverse map to the source, grid_sample's nearest (round half to even) pixel index.
  col = np.rint(cos * qu - sin * qv + size / 2 - 0.5).astype(np.int64)
  row = np.rint(sin * qu + cos * qv + size / 2 - 0.5).astype(np.int64)
  valid = (col >= 0) & (col < size) & (row >= 0) & (row < size)
  # Per source pixel: the extreme canvas rows / columns that show it (none: +-_NONE).
  source = (row * size + col)[valid]
  rr, cc = np.nonzero(valid)
  extremes = {}
  for name, values, reduce, empty in (("min_row", rr, np.minimum, _NONE),
                                      ("max_row", rr, np.maximum, -_NONE),
                                      ("min_col", cc, np.minimum, _NONE),
                                      ("max_col", cc, np.maximum, -_NONE)):
    table = np.full(size * size, empty, np.int64)
    reduce.at(table, source, values)
    extremes[name] = table.reshape(size, size)
  any_row, any_col = valid.any(1), valid.any(0)
  integral = np.zeros((n + 1, n + 1), np.int64)
  integral[1:, 1:] = valid.cumsum(0).cumsum(1)
  return dict(
      row=np.where(valid, row, -1), col=np.where(valid, col, -1), valid=valid,
      integral=integral, **extremes,
      # Valid columns of each canvas row, valid rows of each canvas column.
      row_first=np.where(any_row, valid.argmax(1), _NONE),
      row_last=np.where(any_row, n - 1 - valid[:, ::-1].argmax(1), -_NONE),
      col_first=np.where(any_col, valid.argmax(0), _NONE),
      col_last=np.where(any_col, n - 1 - valid[::-1].argmax(0), -_NONE))


def _box_extreme(table, reduce, top, left, h, w, ring=3):
  """reduce(table) over the box. The box's extreme canvas rows / columns are shown by source
  pixels within ~1.5 pixels of its border, so a 3-pixel ring suffices (checked below)."""
  if h <= 2 * ring or w <= 2 * ring:
    return reduce(table[top:top + h, left:left + w])
  return reduce([reduce(table[top:top + ring, left:left + w]),
                 reduce(table[top + h - ring:top + h, left:left + w]),
                 reduce(table[top:top + h, left:left + ring]),
                 reduce(table[top:top + h, left + w - ring:left + w])])


def _revise_box(frame, x1, x2, y1, y2, degree):
  """revise_box: rows x, columns y; corners outside the rotated image moved onto it."""
  valid = frame["valid"]
  if degree > 0:
    x1r = frame["col_first"][y1] if not valid[x1, y1] else x1
    y2r = frame["row_last"][x1r] if not valid[x1, y2] else y2
    y1r = frame["row_first"][x2] if not valid[x2, y1] else y1
    x2r = frame["col_last"][y2r] if not valid[x2, y2r] else x2
  else:
    y1r = frame["row_first"][x1] if not valid[x1, y1] else y1
    x1r = frame["col_first"][y2] if not valid[x1, y2] else x1
    x2r = frame["col_last"][y1r] if not valid[x2, y1] else x2
    y2r = y2 if valid[x2r, y2] else frame["row_last"][x2r]
  return x1r, x2r, y1r, y2r


def _release_crop(rng, scale, ratio, size=RELEASE_SIZE):
  """get_params (torchvision's RandomResizedCrop rule) on the size x size search image."""
  for _ in range(10):
    area = size * size * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(*np.log(ratio)))
    w, h = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
    if 0 < w <= size and 0 < h <= size:
      return int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1)), h, w
  return 0, 0, size, size  # the central fallback: aspect 1 is in range


def release_rectangle(degree, top, left, h, w):
  """The exemplar's rows x1r..x2r and columns y1r..y2r (inclusive) in the rotated frame."""
  frame = _release_frame(degree)
  x1 = _box_extreme(frame["min_row"], np.min, top, left, h, w)
  x2 = _box_extreme(frame["max_row"], np.max, top, left, h, w)
  y1 = _box_extreme(frame["min_col"], np.min, top, left, h, w)
  y2 = _box_extreme(frame["max_col"], np.max, top, left, h, w)
  return _revise_box(frame, x1, x2, y1, y2, degree)


def release_exemplars(rng, count, rotation=45, scale=(0.05, 0.48), ratio=(1 / 3, 3)):
  """(count, 3): label fraction of the search image, exemplar width and height (pixels)."""
  out = np.empty((count, 3))
  for k in range(count):
    degree = int(rng.integers(-rotation, rotation))
    top, left, h, w = _release_crop(rng, scale, ratio)
    frame = _release_frame(degree)
    x1r, x2r, y1r, y2r = release_rectangle(degree, top, left, h, w)
    # Label: the rectangle's image pixels, rotated back (a rotation keeps pixel counts).
    inside = frame["integral"]
    label = (inside[x2r + 1, y2r + 1] - inside[x1r, y2r + 1] - inside[x2r + 1, y1r]
             + inside[x1r, y1r]) / inside[-1, -1]
    out[k] = label, y2r - y1r + 1, x2r - x1r + 1
  return out


def distribution(label, width, height, size):
  """The statistics compared: label fraction mean and quartiles, exemplar area fraction mean,
  log aspect (w / h) quartiles."""
  log_aspect = np.log(width / height)
  return dict(label_mean=label.mean(), **dict(zip(("label_q1", "label_q2", "label_q3"),
                                                  np.quantile(label, [0.25, 0.5, 0.75]))),
              area_mean=np.mean(width * height) / size**2,
              **dict(zip(("log_aspect_q1", "log_aspect_q2", "log_aspect_q3"),
                         np.quantile(log_aspect, [0.25, 0.5, 0.75]))))


# Two independent samples of ~5,000: the standard deviation of each statistic over 40 samples
# of 5,000 (measured) is 0.0018 for the means, 0.002-0.003 for the label quartiles and
# 0.007-0.011 for the log-aspect quartiles; a difference of two samples has sqrt(2) times that.
# Tolerances are ~4 such standard errors plus the systematic offset of the pixel-quantised
# restatement against the continuous sampler, measured on 30,000 paired draws (the same angle
# and box for both): +0.0004 label and area fraction (from rounding where a revised corner
# lands, and 0.3% of exemplars whose corner sits on the rotated image's edge, where the pixel
# and continuous inside tests can pick different revise_box branches), +0.05 px width/height.
TOLERANCES = dict(label_mean=0.011, label_q1=0.02, label_q2=0.02, label_q3=0.02,
                  area_mean=0.011, log_aspect_q1=0.065, log_aspect_q2=0.045, log_aspect_q3=0.065)


def _mismatches(ours, reference):
  return {k: (round(ours[k], 4), round(reference[k], 4)) for k in TOLERANCES
          if abs(ours[k] - reference[k]) > TOLERANCES[k]}


def test_release_geometry_matches_an_independent_restatement_of_the_authors_sampler():
  spec = GEOMETRY_ONLY  # exemplar_geometry="release", the default
  assert spec.exemplar_geometry == "release" and spec.search_size == RELEASE_SIZE
  s, c = spec.search_size, spec.context_size
  photos = sources.EmbeddedSource("train")
  rng = np.random.default_rng(0)
  corners, boxes = [], []
  for k in range(834):  # 5,004 exemplars (photos only set the search crop, not the boxes)
    pair, geometry = pairs.make_pair_and_geometry(photos[k % len(photos)].data, rng, spec)
    corners.append(pair["corners"])
    boxes.append(geometry.boxes)
  corners, boxes = np.concatenate(corners), np.concatenate(boxes)
  label = np.concatenate([masks_from_corners(part, c).mean(axis=(1, 2))
                          for part in np.array_split(corners, 5)])
  ours = distribution(label, boxes[:, 2], boxes[:, 3], s)

  reference = release_exemplars(np.random.default_rng(12345), 5000)
  restated = distribution(reference[:, 0], reference[:, 1], reference[:, 2], s)
  assert not _mismatches(ours, restated), _mismatches(ours, restated)

  # The test can fail: the drawn_box geometry (smaller exemplars: label mean ~0.245 vs ~0.317,
  # wider aspect spread) is far outside every tolerance of the mean and quartiles.
  drawn = pairs.sample_boxes(rng.random((5000, pairs._BOX_UNIFORMS)),
                             dataclasses.replace(spec, exemplar_geometry="drawn_box"))
  drawn_corners = (pairs.exemplar_affines(drawn, 64)
                   @ np.array([[0, 64, 64, 0], [0, 0, 64, 64], [1, 1, 1, 1]])) * (c / s)
  drawn_label = masks_from_corners(np.swapaxes(drawn_corners, 1, 2), c).mean(axis=(1, 2))
  drawn_stats = distribution(drawn_label, drawn[:, 2], drawn[:, 3], s)
  assert restated["label_mean"] - drawn_stats["label_mean"] > 0.05
  assert {"label_mean", "label_q1", "area_mean", "log_aspect_q1"} <= set(
      _mismatches(drawn_stats, restated))


def test_release_boxes_match_the_restatement_draw_by_draw():
  # The distribution test cannot see a mirrored sampler: a rectangle reflected about the
  # horizontal line through its centre (the same box at -angle) has the same bounding box, so
  # the same size, aspect and label area. Here both get the same angle and drawn box.
  s = RELEASE_SIZE
  u = np.random.default_rng(2).random((2000, pairs._BOX_UNIFORMS))
  boxes = pairs.sample_boxes(u, GEOMETRY_ONLY)
  errors = []
  for row, (cx, cy, width, height, angle) in zip(u, boxes):
    degree = min(int(row[0] * 90), 89) - 45  # torch.randint(-45, 45) from one uniform
    top, left, h, w = pairs.sample_crop(s, s, row[1:], (0.05, 0.48), (1 / 3, 3))
    assert angle == np.deg2rad(degree)
    x1r, x2r, y1r, y2r = release_rectangle(degree, top, left, h, w)
    # Rectangle centre (pixel edges: the last row/column ends at x2r + 1) back to the search
    # image: p = R(angle) q about the centres.
    q = np.array([y1r + y2r + 1, x1r + x2r + 1]) / 2 - _release_frame(degree)["valid"].shape[0] / 2
    cos, sin = np.cos(angle), np.sin(angle)
    centre = np.array([cos * q[0] - sin * q[1], sin * q[0] + cos * q[1]]) + s / 2
    errors.append([*np.abs(centre - (cx, cy)), abs(y2r - y1r + 1 - width),
                   abs(x2r - x1r + 1 - height)])
  errors = np.array(errors)
  # Pixel quantisation: medians 0.2-0.4 px, 99th percentiles ~2 px (measured); a few draws
  # differ more, where a revised corner's inside test differs between the pixel and the
  # continuous rule (0.25% of draws by > 3 px).
  assert (errors.max(1) <= 3.0).mean() > 0.99, np.quantile(errors, [0.5, 0.99], axis=0)
  assert np.median(errors, axis=0).max() <= 0.5, np.median(errors, axis=0)


def test_restatement_box_extremes_match_the_full_box():
  rng = np.random.default_rng(1)
  for _ in range(30):
    degree = int(rng.integers(-45, 45))
    top, left, h, w = _release_crop(rng, (0.05, 0.48), (1 / 3, 3))
    frame = _release_frame(degree)
    box = ((frame["row"] >= top) & (frame["row"] < top + h) & (frame["col"] >= left)
           & (frame["col"] < left + w))
    rows, cols = np.nonzero(box)
    assert [_box_extreme(frame[name], reduce, top, left, h, w) for name, reduce in (
        ("min_row", np.min), ("max_row", np.max), ("min_col", np.min), ("max_col", np.max))
            ] == [rows.min(), rows.max(), cols.min(), cols.max()]


@pytest.mark.parametrize("degree", [-45, -17, -1, 0, 1, 23, 44])
def test_restatement_rotation_matches_torchvision(degree):
  torch = pytest.importorskip("torch")
  functional = pytest.importorskip("torchvision.transforms.functional")
  s = RELEASE_SIZE
  index = torch.arange(1, s * s + 1, dtype=torch.float32).reshape(1, s, s)  # exact in float32
  rotated = functional.rotate(index, degree, expand=True)[0].numpy().astype(np.int64) - 1
  frame = _release_frame(degree)
  ours = np.where(frame["valid"], frame["row"] * s + frame["col"], -1)
  assert rotated.shape == ours.shape
  # Equal up to a few exact ties of the nearest-neighbour rounding (float32 in torch).
  assert (rotated != ours).sum() <= 4


def test_search_crop_follows_torchvision_semantics():
  scale, ratio = SPEC.search_scale, SPEC.search_ratio
  rng = np.random.default_rng(0)
  for _ in range(300):
    top, left, h, w = pairs.sample_crop(375, 500, rng.random(23), scale, ratio)
    assert 0 <= top <= 375 - h and 0 <= left <= 500 - w
    assert 0.5 - 0.01 <= h * w / (375 * 500) <= 1.0 and 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02
  # Every try fails on a 1 x 2000 strip: the central fallback with the ratio clamped.
  assert pairs.sample_crop(1, 2000, rng.random(23), scale, ratio) == (0, 999, 1, 1)
  assert pairs.sample_crop(2000, 10, rng.random(23), scale, ratio) == (993, 0, 13, 10)


def test_shapes_dtypes_and_custom_sizes():
  image = skimage.data.astronaut()
  pair = pairs.make_pair(image, np.random.default_rng(0), SPEC)
  assert pair.keys() == {"context", "exemplars", "corners"}
  assert pair["context"].shape == (160, 160, 3) and pair["context"].dtype == np.uint8
  assert pair["exemplars"].shape == (6, 64, 64, 3) and pair["exemplars"].dtype == np.uint8
  assert pair["corners"].shape == (6, 4, 2) and pair["corners"].dtype == np.float32
  spec = dataclasses.replace(SPEC, search_size=96, context_size=48, num_exemplars=3,
                             exemplar_size=32)
  pair = pairs.make_pair(image, np.random.default_rng(0), spec)
  assert pair["context"].shape == (48, 48, 3) and pair["exemplars"].shape == (3, 32, 32, 3)
  assert pair["corners"].shape == (3, 4, 2) and pair["corners"].max() <= 48 + 1e-3


def test_determinism():
  image = skimage.data.chelsea()
  a = pairs.make_pair(image, np.random.default_rng(7), SPEC)
  b = pairs.make_pair(image, np.random.default_rng(7), SPEC)
  c = pairs.make_pair(image, np.random.default_rng(8), SPEC)
  for key in a:
    assert np.array_equal(a[key], b[key])
  assert not np.array_equal(a["corners"], c["corners"])
  assert not np.array_equal(a["exemplars"], c["exemplars"])


@pytest.mark.parametrize("shape", [(1, 1), (1, 2000), (2000, 1), (3, 5), (7, 3000), (50, 60)])
def test_tiny_and_extreme_aspect_images(shape):
  image = smooth_image(*shape)
  pair, geometry = pairs.make_pair_and_geometry(image, np.random.default_rng(0), GEOMETRY_ONLY)
  assert pair["context"].shape == (160, 160, 3) and pair["exemplars"].shape == (6, 64, 64, 3)
  assert np.isfinite(pair["corners"]).all()
  assert pair["corners"].min() >= -1e-3 and pair["corners"].max() <= 160 + 1e-3
  top, left, h, w = geometry.crop
  assert 0 <= top and top + h <= shape[0] and 0 <= left and left + w <= shape[1]


@pytest.mark.parametrize("image", [np.zeros((0, 5, 3), np.uint8), np.zeros((5, 5), np.uint8),
                                   np.zeros((5, 5, 4), np.uint8), np.zeros((5, 5, 3), np.float32)])
def test_bad_images_are_rejected_clearly(image):
  with pytest.raises(ValueError, match="uint8 RGB"):
    pairs.make_pair(image, np.random.default_rng(0), SPEC)


def test_spec_from_config_and_validation():
  data = recipe().data
  assert pairs.PairSpec.from_config(data) == SPEC
  data.exemplar_rotation = 30.0
  data.exemplar_scale = [0.1, 0.2]  # lists (e.g. from the command line) become tuples
  spec = pairs.PairSpec.from_config(data)
  assert spec.exemplar_rotation == 30.0 and spec.exemplar_scale == (0.1, 0.2)
  with pytest.raises(ValueError, match="exemplar_scale"):
    dataclasses.replace(SPEC, exemplar_scale=(0.5, 0.1))
  with pytest.raises(ValueError, match="grayscale_prob"):
    dataclasses.replace(SPEC, grayscale_prob=1.5)
  assert SPEC.exemplar_geometry == "release"
  data.exemplar_geometry = "drawn_box"
  assert pairs.PairSpec.from_config(data).exemplar_geometry == "drawn_box"
  with pytest.raises(ValueError, match="exemplar_geometry must be 'release' or 'drawn_box'"):
    dataclasses.replace(SPEC, exemplar_geometry="rotated")
  for rotation in (22.5, 60.0):  # the release's rule needs whole degrees in [0, 45]
    with pytest.raises(ValueError, match="exemplar_rotation must be a whole number"):
      dataclasses.replace(SPEC, exemplar_rotation=rotation)
    dataclasses.replace(SPEC, exemplar_rotation=rotation, exemplar_geometry="drawn_box")


def random_quads(rng, count):
  """Convex quadrilaterals of both windings: rotated rectangles and random convex shapes."""
  centre = rng.uniform(0, 32, (count, 1, 2))
  angles = np.sort(rng.uniform(0, 2 * np.pi, (count, 4)), axis=1)
  angles[: count // 2] = rng.uniform(0, 2 * np.pi, (count // 2, 1)) + np.arange(4) * np.pi / 2
  radius = rng.uniform(1, 20, (count, 1))
  quads = centre + radius[..., None] * np.stack([np.cos(angles), np.sin(angles)], -1)
  quads[::3] = quads[::3, ::-1]  # reversed winding
  return quads.astype(np.float32)


def test_masks_numpy_and_jax_agree_exactly():
  rng = np.random.default_rng(0)
  quads = random_quads(rng, 600)
  # Corners on pixel edges and centres, where the boundary rule decides.
  grid = rng.integers(0, 32, (200, 1, 2)) + np.array([[0, 0], [5, 0], [5, 7], [0, 7]])
  quads = np.concatenate([quads, grid.astype(np.float32), grid.astype(np.float32) + 0.5])
  expected = masks_from_corners(quads, 32)
  jitted = jax.jit(lambda q: masks_from_corners(q, 32, xp=jnp))
  assert np.array_equal(np.asarray(jitted(quads)), expected)
  batched = quads[:600].reshape(10, 60, 4, 2)
  assert np.array_equal(np.asarray(jitted(batched)), expected[:600].reshape(10, 60, 32, 32))


def test_masks_boundary_rule_winding_and_degenerate():
  square = np.array([[10.5, 10.5], [20.5, 10.5], [20.5, 20.5], [10.5, 20.5]], np.float32)
  mask = masks_from_corners(square, 32)
  expected = np.zeros((32, 32), bool)
  expected[10:21, 10:21] = True  # centres 10.5 .. 20.5 inclusive: on the boundary counts
  assert np.array_equal(mask, expected)
  assert np.array_equal(masks_from_corners(square[::-1], 32), expected)
  diamond = np.array([[16, 8], [24, 16], [16, 24], [8, 16]], np.float32)  # |x-16|+|y-16| <= 8
  centres = np.arange(32) + 0.5
  l1 = np.abs(centres[None, :] - 16) + np.abs(centres[:, None] - 16)
  assert np.array_equal(masks_from_corners(diamond, 32), l1 <= 8)
  assert not masks_from_corners(np.full((4, 2), 5.0, np.float32), 32).any()


# Photometric: switch one op on with probability 1 against the geometry-only base, same seed.

def photometric_pairs(seed=0, **overrides):
  image = skimage.data.astronaut()
  base = pairs.make_pair(image, np.random.default_rng(seed), GEOMETRY_ONLY)
  spec = dataclasses.replace(GEOMETRY_ONLY, **overrides)
  return base, pairs.make_pair(image, np.random.default_rng(seed), spec)


def test_photometric_never_touches_context_or_labels():
  base, augmented = photometric_pairs(color_jitter_prob=1.0, grayscale_prob=1.0, blur_prob=1.0,
                                      solarize_prob=1.0, exemplar_flip_prob=1.0)
  assert np.array_equal(base["context"], augmented["context"])
  assert np.array_equal(base["corners"], augmented["corners"])
  assert not np.array_equal(base["exemplars"], augmented["exemplars"])


def test_solarize_inverts_from_128():
  base, out = photometric_pairs(solarize_prob=1.0)
  x = base["exemplars"]
  assert np.array_equal(out["exemplars"], np.where(x >= 128, 255 - x, x))


def test_flip_mirrors_after_the_label_is_fixed():
  base, out = photometric_pairs(exemplar_flip_prob=1.0)
  assert np.array_equal(out["exemplars"], base["exemplars"][:, :, ::-1])


def test_grayscale_copies_luma_to_three_channels():
  base, out = photometric_pairs(grayscale_prob=1.0)
  ex = out["exemplars"].astype(int)
  assert (ex[..., 0] == ex[..., 1]).all() and (ex[..., 1] == ex[..., 2]).all()
  luma = base["exemplars"].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
  assert np.abs(ex[..., 0] - luma).max() <= 1.0


def test_blur_smooths():
  base, out = photometric_pairs(blur_prob=1.0, blur_sigma=(1.0, 2.0))
  for before, after in zip(base["exemplars"], out["exemplars"]):
    detail = lambda x: np.abs(cv2.Laplacian(x.astype(np.float32), cv2.CV_32F)).mean()
    assert detail(after) < 0.7 * detail(before)
    assert abs(after.astype(float).mean() - before.astype(float).mean()) < 2.0


def test_brightness_scales_by_one_factor_in_range():
  base, out = photometric_pairs(color_jitter_prob=1.0, contrast=0.0, saturation=0.0, hue=0.0)
  for before, after in zip(base["exemplars"].astype(float), out["exemplars"].astype(float)):
    unclipped = (after < 255) & (before > 20)
    factor = np.median(after[unclipped] / before[unclipped])
    assert 0.6 - 0.02 <= factor <= 1.4 + 0.02
    assert np.abs(np.clip(np.round(before * factor), 0, 255) - after).max() <= 2


def test_hue_and_saturation_keep_grey_pixels_grey():
  grey = np.repeat(np.linspace(0, 255, 64 * 64).reshape(64, 64, 1), 3, -1).astype(np.uint8)
  for op in (lambda x: photometric.adjust_hue(x, 0.3),
             lambda x: photometric.adjust_saturation(x, 1.5)):
    assert np.abs(op(grey).astype(int) - grey).max() <= 1
  colour = skimage.data.astronaut()[::8, ::8]
  shifted = photometric.adjust_hue(colour, 0.5)
  assert np.abs(shifted.astype(int) - colour).mean() > 20  # opposite hue: clearly different
  assert np.abs(shifted.max(-1).astype(int) - colour.max(-1)).max() <= 2  # value kept


def test_probabilities_set_the_rates():
  image = skimage.data.astronaut()
  spec = dataclasses.replace(GEOMETRY_ONLY, grayscale_prob=0.5)
  grey = []
  for seed in range(60):
    ex = pairs.make_pair(image, np.random.default_rng(seed), spec)["exemplars"]
    grey.extend((ex[..., 0] == ex[..., 1]).all(axis=(1, 2)) & (ex[..., 1] == ex[..., 2]).all(
        axis=(1, 2)))
  assert 0.4 < np.mean(grey) < 0.6  # 360 draws: 0.5 +- 5 standard errors


def test_probability_zero_leaves_exemplars_untouched_whatever_the_strengths():
  base, out = photometric_pairs(brightness=0.9, contrast=0.9, saturation=0.9, hue=0.5,
                                blur_sigma=(3.0, 4.0))
  assert np.array_equal(base["exemplars"], out["exemplars"])


def test_contrast_keeps_the_mean_and_scales_the_spread():
  image = np.clip(np.random.default_rng(0).normal(128, 20, (64, 64, 3)), 0, 255).astype(np.uint8)
  for factor in (0.6, 1.4):
    out = photometric.adjust_contrast(image, factor).astype(float)
    assert abs(out.mean() - image.mean()) < 1.0
    assert abs(out.std() / image.std() - factor) < 0.03


def test_search_flip_mirrors_the_context_and_keeps_the_search_frame():
  image = skimage.data.chelsea()
  plain = pairs.make_pair(image, np.random.default_rng(3),
                          dataclasses.replace(GEOMETRY_ONLY, search_flip_prob=0.0))
  mirrored = pairs.make_pair(image, np.random.default_rng(3),
                             dataclasses.replace(GEOMETRY_ONLY, search_flip_prob=1.0))
  assert np.array_equal(mirrored["context"], plain["context"][:, ::-1])
  assert np.array_equal(mirrored["corners"], plain["corners"])  # boxes drawn in the search frame
  assert not np.array_equal(mirrored["exemplars"], plain["exemplars"])
