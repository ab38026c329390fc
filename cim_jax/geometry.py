"""Exemplar geometry shared by the data pipeline and the model: quadrilaterals -> pixel masks.

Pixel convention (docs/METHOD.md section 1): pixel (row r, col c) covers [c, c + 1) x [r, r + 1)
and has its centre at (x, y) = (c + 0.5, r + 0.5).
"""

import numpy as np


def masks_from_corners(corners, size: int, xp=np):
  """Rasterises (..., 4, 2) convex quadrilaterals (x, y) into (..., size, size) bool masks.

  A pixel is inside when its centre (c + 0.5, r + 0.5) is inside or on the boundary: the same
  float32 half-plane test in numpy and jax.numpy (xp=jnp), with static shapes (jit-friendly).
  Either winding order works; a degenerate (zero-area) quadrilateral gives an empty mask.
  """
  corners = xp.asarray(corners, dtype=xp.float32)
  end = xp.concatenate([corners[..., 1:, :], corners[..., :1, :]], axis=-2)
  x0, y0 = corners[..., 0], corners[..., 1]
  # Winding from the sign of twice the signed area; multiplying by +-1 below is exact.
  orientation = xp.sign(xp.sum(x0 * end[..., 1] - end[..., 0] * y0, axis=-1))[..., None]
  dx, dy = (end[..., 0] - x0) * orientation, (end[..., 1] - y0) * orientation  # (..., 4)
  centres = xp.arange(size, dtype=xp.float32) + 0.5
  # Inside edge k iff dx * (y - y0) >= dy * (x - x0): separable into row and column products.
  # Comparing the two products (rather than testing their difference) leaves a compiler no
  # multiply-add to fuse, so every backend rounds exactly as numpy does.
  row_term = dx[..., None] * (centres - y0[..., None])  # (..., 4, size) over rows
  col_term = dy[..., None] * (centres - x0[..., None])  # (..., 4, size) over columns
  # AND of the 4 edge tests written out (not xp.all over an axis of 4): purely elementwise, so
  # under jit it fuses into the per-pixel loss instead of being a separate reduction kernel.
  inside = row_term[..., 0, :, None] >= col_term[..., 0, None, :]
  for edge in range(1, 4):
    inside = inside & (row_term[..., edge, :, None] >= col_term[..., edge, None, :])
  return inside & (orientation[..., 0] != 0)[..., None, None]
