"""The correlation decoder (cim_jax.models.decoder): upsampling as torch, exemplar batching."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cim_jax.models import decoder as decoder_lib
from train_fixtures import randomize


@pytest.mark.parametrize("in_size,out_size", [(10, 160), (4, 64), (3, 7)])
def test_upsample_matches_torch_align_corners(in_size, out_size):
  torch = pytest.importorskip("torch")
  maps = np.random.default_rng(0).normal(size=(2, 3, in_size, in_size, 2)).astype(np.float32)
  ours = decoder_lib.upsample_align_corners(jnp.asarray(maps), out_size)
  x = torch.from_numpy(maps).reshape(6, in_size, in_size, 2).permute(0, 3, 1, 2)
  expected = torch.nn.functional.interpolate(x, size=(out_size, out_size), mode="bilinear",
                                             align_corners=True)
  expected = expected.permute(0, 2, 3, 1).reshape(2, 3, out_size, out_size, 2).numpy()
  np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_plane_upsampling_equals_channel_upsampling():
  maps = np.random.default_rng(1).normal(size=(2, 3, 5, 5)).astype(np.float32)
  plane = decoder_lib.upsample_plane_align_corners(jnp.asarray(maps), 40)
  channel = decoder_lib.upsample_align_corners(jnp.asarray(maps)[..., None], 40)[..., 0]
  assert plane.shape == (2, 3, 40, 40)
  np.testing.assert_allclose(plane, channel, atol=1e-6)


def test_decoder_batches_exemplars_like_separate_calls():
  dec = decoder_lib.CorrelationDecoder(dim=32, num_heads=4, output_size=64)
  rng = np.random.default_rng(0)
  context = rng.normal(size=(2, 1 + 16, 24)).astype(np.float32)
  exemplars = rng.normal(size=(2, 3, 1 + 4, 24)).astype(np.float32)
  params = randomize(jax.jit(dec.init)(jax.random.key(0), context, exemplars)["params"])
  apply = jax.jit(dec.apply)
  logits = apply({"params": params}, context, exemplars)
  assert logits.shape == (2, 3, 64, 64, 2) and logits.dtype == jnp.float32
  for n in range(3):
    single = apply({"params": params}, context, exemplars[:, n:n + 1])
    np.testing.assert_allclose(logits[:, n:n + 1], single, atol=1e-5)
  # Each exemplar must matter.
  assert not np.allclose(logits[:, 0], logits[:, 1])


def test_decoder_rejects_non_square_context():
  dec = decoder_lib.CorrelationDecoder(dim=32, num_heads=4, output_size=64)
  with pytest.raises(ValueError, match="square"):
    dec.init(jax.random.key(0), jnp.zeros((1, 1 + 12, 8)), jnp.zeros((1, 1, 5, 8)))
