"""The ViT encoder (cim_jax.models.vit): variants, position tables, parity with timm, kernels."""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from cim_jax import interop
from cim_jax.models import cim
from cim_jax.models import vit
from train_fixtures import randomize, recipe

# torch / timm are optional: only the parity tests that run them skip without them
# (pytest.importorskip inside each), everything else here runs on JAX alone.


def _images(batch, size, seed=0):
  return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


def test_decode_variant():
  assert vit.decode_variant("B/16") == dict(width=768, depth=12, num_heads=12, patch_size=16)
  assert vit.decode_variant("T/16") == vit.decode_variant("Ti/16")
  assert vit.decode_variant("H/14") == dict(width=1280, depth=32, num_heads=16, patch_size=14)
  assert vit.decode_variant("L/16")["depth"] == 24
  for bad in ("X/16", "B16", "B/0", ""):
    with pytest.raises(ValueError, match="variant"):
      vit.decode_variant(bad)


@pytest.mark.parametrize("variant,timm_name", [("Ti/16", "vit_tiny_patch16_224"),
                                               ("S/16", "vit_small_patch16_224"),
                                               ("B/16", "vit_base_patch16_224")])
def test_parameter_count_matches_timm(variant, timm_name):
  timm = pytest.importorskip("timm")
  encoder = vit.VisionTransformer(**vit.decode_variant(variant))
  shapes = jax.eval_shape(encoder.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  reference = timm.create_model(timm_name, pretrained=False, num_classes=0)
  # timm stores the position table as a parameter; ours is a constant of the same size.
  total = sum(p.numel() for p in reference.parameters())
  assert ours == total - reference.pos_embed.numel()
  assert interop.timm_model_name(variant) == timm_name
  if variant == "B/16":  # the commonly quoted 85.8M counts timm's (1, 197, 768) table too
    assert ours == 85_647_360 and ours + 197 * 768 == 85_798_656


def test_sincos_table_layout():
  table = vit.sincos_pos_embed(8, 3)
  assert table.shape == (1, 10, 8)
  np.testing.assert_array_equal(table[0, 0], 0.0)  # cls slot
  # Token r*3+c: first half encodes the column c, second half the row r (authors' meshgrid order).
  token = table[0, 1 + 1 * 3 + 2]
  np.testing.assert_allclose(token[:4], [np.sin(2), np.sin(2 / 100), np.cos(2), np.cos(2 / 100)],
                             rtol=1e-6)
  np.testing.assert_allclose(token[4:], [np.sin(1), np.sin(1 / 100), np.cos(1), np.cos(1 / 100)],
                             rtol=1e-6)


@pytest.mark.parametrize("grid", [4, 10, 7, 20])
def test_pos_embed_resampling_matches_torch_bicubic(grid):
  torch = pytest.importorskip("torch")
  dim = 32
  table = vit.sincos_pos_embed(dim, 14)
  patches = torch.from_numpy(table[:, 1:]).reshape(1, 14, 14, dim).permute(0, 3, 1, 2)
  expected = torch.nn.functional.interpolate(
      patches, scale_factor=((grid + 0.1) / 14, (grid + 0.1) / 14), mode="bicubic")
  expected = expected.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).numpy()
  ours = vit.resampled_pos_embed(dim, (grid, grid), 14)
  assert ours.shape == (1, 1 + grid * grid, dim)
  np.testing.assert_array_equal(ours[0, 0], 0.0)
  np.testing.assert_allclose(ours[:, 1:], expected, atol=1e-6)


def test_pos_embed_untouched_on_native_grid():
  np.testing.assert_array_equal(vit.resampled_pos_embed(16, (14, 14)), vit.sincos_pos_embed(16, 14))


# ----------------------------------------------------------------------------------------------
# Numerical parity with timm.

@pytest.mark.parametrize("fields,size,pool", [
    (vit.decode_variant("Ti/16"), 224, "none"),
    (dict(width=64, depth=2, num_heads=4), 64, "none"),
    (dict(width=64, depth=2, num_heads=4), 160, "tok"),
    (dict(width=64, depth=2, num_heads=4, num_classes=7), 160, "gap"),
])
def test_encoder_matches_timm(fields, size, pool):
  torch = pytest.importorskip("torch")
  pytest.importorskip("timm")
  encoder = vit.VisionTransformer(**{"patch_size": 16, "pool": pool, **fields})
  images = _images(2, size)
  params = randomize(jax.jit(encoder.init)(jax.random.key(0), images[:1])["params"])
  ours, intermediates = jax.jit(encoder.apply)({"params": params}, images)
  reference = interop.timm_vision_transformer(encoder, params, img_size=size)
  with torch.no_grad():
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    expected = reference.forward_features(x) if pool == "none" else reference(x)
  np.testing.assert_allclose(np.asarray(ours), expected.numpy(), atol=1e-5, rtol=0)
  assert "tokens" in intermediates and "pre_logits" in intermediates


def test_external_cls_token_replaces_own():
  encoder = vit.VisionTransformer(width=32, depth=1, num_heads=2, patch_size=16)
  images = _images(2, 32)
  params = jax.jit(encoder.init)(jax.random.key(0), images)["params"]
  other = jnp.ones((1, 1, 32))
  apply = jax.jit(lambda p, cls=None: encoder.apply({"params": p}, images, cls_token=cls)[0])
  with_other = apply(params, other)
  expected = apply(dict(params, cls_token=other))
  np.testing.assert_allclose(with_other, expected, atol=1e-6)
  own = apply(params)
  assert not np.allclose(own, with_other)


def test_drop_path_uses_rng_and_remat_is_exact():
  fields = dict(width=32, depth=2, num_heads=2, patch_size=16, drop_path_rate=0.5)
  images = _images(4, 32)
  plain = vit.VisionTransformer(**fields)
  remat = vit.VisionTransformer(remat=True, **fields)
  params = jax.jit(plain.init)(jax.random.key(0), images)["params"]

  def loss(module, p, key, train=True):
    return module.apply({"params": p}, images, train=train, rngs={"dropout": key})[0].sum()

  run = jax.jit(loss, static_argnums=(0, 3))
  a, b = run(plain, params, jax.random.key(1)), run(plain, params, jax.random.key(2))
  evaluation = run(plain, params, jax.random.key(1), False)
  assert not np.allclose(a, b) and not np.allclose(a, evaluation)
  np.testing.assert_allclose(run(remat, params, jax.random.key(1)), a, rtol=1e-6)
  grad = jax.jit(jax.grad(loss, argnums=1), static_argnums=0)
  for g, h in zip(jax.tree.leaves(grad(plain, params, jax.random.key(1))),
                  jax.tree.leaves(grad(remat, params, jax.random.key(1)))):
    np.testing.assert_allclose(g, h, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params():
  encoder = vit.VisionTransformer(width=32, depth=1, num_heads=2, patch_size=16,
                                  dtype=jnp.bfloat16)
  images = _images(2, 32)
  params = jax.jit(encoder.init)(jax.random.key(0), images)["params"]
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  out, _ = jax.jit(encoder.apply)({"params": params}, images)
  assert out.dtype == jnp.bfloat16
  reference, _ = jax.jit(vit.VisionTransformer(width=32, depth=1, num_heads=2,
                                               patch_size=16).apply)({"params": params}, images)
  np.testing.assert_allclose(np.asarray(out, np.float32), reference, atol=0.1)


def test_block_outputs_and_attention_choice():
  images = _images(2, 32)
  encoder = vit.VisionTransformer(width=32, depth=2, num_heads=2, keep_block_outputs=True)
  params = jax.jit(encoder.init)(jax.random.key(0), images)["params"]
  out, intermediates = jax.jit(encoder.apply)({"params": params}, images)
  assert len(intermediates["blocks"]) == 2
  ln = lambda x: (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(out, ln(np.asarray(intermediates["blocks"][-1])), atol=1e-4)
  config = recipe().model
  config.attention_impl = "xla"
  xla = vit.encoder_from_config(config, width=32, depth=2, num_heads=2)
  assert xla.attention_impl == "xla"
  np.testing.assert_allclose(jax.jit(xla.apply)({"params": params}, images)[0], out, atol=1e-6)
  config.attention_impl = "flash"
  with pytest.raises(ValueError, match="attention_impl"):
    vit.encoder_from_config(config)


@pytest.mark.parametrize("queries,keys", [(17, 17), (101, 17), (16, 9), (9, 16)])
def test_even_length_attention_equals_unpadded_with_gradients(queries, keys):
  """The padding that lets cuDNN train CIM's odd lengths changes neither outputs nor gradients
  (checked with the XLA kernel: the padding and its key mask are the same for both kernels)."""
  rng = np.random.default_rng(queries * 100 + keys)
  q, k, v = (jnp.asarray(rng.normal(size=(3, n, 2, 8)), jnp.float32)
             for n in (queries, keys, keys))
  cotangent = jnp.asarray(rng.normal(size=(3, queries, 2, 8)), jnp.float32)

  def loss(attention):
    return lambda q, k, v: (attention(q, k, v) * cotangent).sum()

  plain = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla")
  padded = lambda q, k, v: vit.even_length_attention(q, k, v, "xla")
  out = padded(q, k, v)
  assert out.shape == (3, queries, 2, 8)
  np.testing.assert_allclose(out, plain(q, k, v), atol=1e-5)
  for got, want in zip(jax.grad(loss(padded), argnums=(0, 1, 2))(q, k, v),
                       jax.grad(loss(plain), argnums=(0, 1, 2))(q, k, v)):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("queries,keys,dtype,tol", [
    (300, 300, jnp.float32, 1e-5), (257, 40, jnp.float32, 1e-5), (33, 290, jnp.float32, 1e-5),
    (64, 64, jnp.bfloat16, 3e-2)])
def test_head_by_head_attention_equals_xla_with_gradients(queries, keys, dtype, tol):
  rng = np.random.default_rng(queries + keys)
  # Scores of a few units, so that the softmax is far from uniform and a wrong scale shows.
  q, k, v = (jnp.asarray(2 * rng.normal(size=(2, n, 3, 16)), dtype)
             for n in (queries, keys, keys))
  cotangent = jnp.asarray(rng.normal(size=(2, queries, 3, 16)), dtype)
  loss = lambda attention: lambda q, k, v: (attention(q, k, v).astype(jnp.float32)
                                            * cotangent).sum()
  plain = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla")
  out = jax.jit(vit.head_by_head_attention)(q, k, v)
  assert out.shape == (2, queries, 3, 16) and out.dtype == dtype
  scale = lambda x: float(jnp.abs(x.astype(jnp.float32)).max())
  want_out = plain(q, k, v)
  assert np.abs(np.asarray(out - want_out, np.float32)).max() <= tol * scale(want_out)
  got = jax.jit(jax.grad(loss(vit.head_by_head_attention), argnums=(0, 1, 2)))(q, k, v)
  for mine, want in zip(got, jax.grad(loss(plain), argnums=(0, 1, 2))(q, k, v)):
    assert mine.shape == want.shape and mine.dtype == dtype
    assert np.abs(np.asarray(mine - want, np.float32)).max() <= tol * scale(want)


def test_long_sequences_on_cpu_take_the_head_by_head_form(monkeypatch):
  calls = []
  original = vit.head_by_head_attention
  monkeypatch.setattr(vit, "head_by_head_attention",
                      lambda *args: calls.append(args[0].shape) or original(*args))
  x = jnp.ones((1, 255, 2, 8))
  vit.multi_head_attention(x, x, x)
  assert calls == []  # under 256 x 256 pairs: XLA's batched form
  long = jnp.ones((1, 256, 2, 8))
  vit.multi_head_attention(long, long, long)
  assert calls == [(1, 256, 2, 8)]
  vit.multi_head_attention(long, long, long, "xla")  # an explicit choice is kept
  vit.multi_head_attention(long, long, long, None, num_keys=200)  # masked keys: XLA's form
  assert len(calls) == 1
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  vit.multi_head_attention(long, long, long)
  assert len(calls) == 1


SHARDED_ATTENTION_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from cim_jax.models import vit
mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
rng = np.random.default_rng(0)
q, k, v, g = (rng.normal(size=(4, 260, 3, 8)).astype(np.float32) for _ in range(4))
batch = NamedSharding(mesh, P("data"))
q, k, v, g = (jax.device_put(x, batch) for x in (q, k, v, g))
loss = lambda f: lambda q, k, v: (f(q, k, v) * g).sum()
step = jax.jit(jax.value_and_grad(loss(vit.multi_head_attention), argnums=(0, 1, 2)))
text = step.lower(q, k, v).compile().as_text()
# The loop runs over heads: each device keeps its half of the batch, nothing is gathered.
assert "all-gather" not in text and "all-to-all" not in text and "while" in text
got = step(q, k, v)
plain = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla")
want = jax.value_and_grad(loss(plain), argnums=(0, 1, 2))(q, k, v)
for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
assert got[1][0].sharding.spec == P("data")
print("OK")
"""


def test_head_by_head_attention_keeps_a_sharded_batch_on_its_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", SHARDED_ATTENTION_SCRIPT], env=env,
                       capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-2000:]


def test_gelu_form_is_exact_by_default_and_tanh_on_request():
  """model.approximate_gelu reaches every MLP (encoder and decoder); the default is timm's erf."""
  model_config = recipe().model
  data_config = recipe().data
  data_config.context_size, data_config.exemplar_size, data_config.num_exemplars = 32, 16, 2
  exact = cim.build_model(model_config, data_config, width=32, depth=1, num_heads=2)
  model_config.approximate_gelu = True
  tanh = cim.build_model(model_config, data_config, width=32, depth=1, num_heads=2)
  assert (exact.encoder.approximate_gelu, exact.decoder.approximate_gelu) == (False, False)
  assert (tanh.encoder.approximate_gelu, tanh.decoder.approximate_gelu) == (True, True)
  x = jnp.linspace(-4.0, 4.0, 101).reshape(1, 101, 1) * jnp.ones((1, 1, 8))
  mlp = lambda approximate: vit.Mlp(16, approximate_gelu=approximate)
  params = mlp(False).init(jax.random.key(0), x)
  erf_out, tanh_out = (mlp(a).apply(params, x) for a in (False, True))
  exact_gelu = lambda h: 0.5 * h * (1 + jax.scipy.special.erf(h / np.sqrt(2.0)))
  hidden = x @ params["params"]["fc1"]["kernel"] + params["params"]["fc1"]["bias"]
  np.testing.assert_allclose(
      erf_out, exact_gelu(hidden) @ params["params"]["fc2"]["kernel"], atol=1e-5)
  assert 0 < float(jnp.abs(erf_out - tanh_out).max()) < 1e-2  # different forms, close values


def test_split_dense_has_dense_parameters_and_outputs():
  """SplitDense (q, k, v from separate matmuls) keeps nn.Dense's parameters: same tree, same init
  values from the same rng (checkpoints, timm interop), same outputs split into blocks."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 8)), jnp.float32)
  dense = nn.Dense(3 * 6, kernel_init=vit.dense_init)
  split = vit.SplitDense(6, 3)
  params = dense.init(jax.random.key(4), x)
  split_params = split.init(jax.random.key(4), x)
  assert jax.tree.structure(split_params) == jax.tree.structure(params)
  for got, want in zip(jax.tree.leaves(split_params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(got, want)
  params = randomize(params)  # a non-zero bias too
  parts = split.apply(params, x)
  assert [p.shape for p in parts] == [(2, 5, 6)] * 3
  np.testing.assert_allclose(jnp.concatenate(parts, -1), dense.apply(params, x), atol=1e-6)


@pytest.mark.parametrize("dtype, rtol", [(jnp.float32, 2e-6), (jnp.bfloat16, 1e-2)])
def test_exact_gelu_equals_jax_gelu_with_its_derivative(dtype, rtol):
  """exact_gelu (backward recomputed from x) gives jax.nn.gelu's values bit for bit and the
  derivative Phi(x) + x phi(x), checked against that formula in float64 (scipy); bfloat16 at
  its precision."""
  x = jnp.linspace(-6.0, 6.0, 1201).astype(dtype)
  np.testing.assert_array_equal(vit.exact_gelu(x), jax.nn.gelu(x, approximate=False))
  upstream = jnp.cos(x.astype(jnp.float32) * 3.0).astype(dtype)  # a non-constant cotangent
  _, vjp = jax.vjp(vit.exact_gelu, x)
  (grad,) = vjp(upstream)
  assert grad.dtype == dtype
  x64, up64 = np.asarray(x, np.float64), np.asarray(upstream, np.float64)
  derivative = (0.5 * special.erfc(-x64 / np.sqrt(2.0))
                + x64 * np.exp(-0.5 * x64**2) / np.sqrt(2.0 * np.pi))
  np.testing.assert_allclose(np.asarray(grad, np.float64), up64 * derivative, rtol=rtol,
                             atol=rtol * 0.1)
  # Under jit / grad, as in the MLP: the cotangent is all ones, so the gradient is Phi + x phi.
  total = jax.jit(jax.grad(lambda h: vit.exact_gelu(h).astype(jnp.float32).sum()))(x)
  np.testing.assert_allclose(np.asarray(total, np.float64), derivative, rtol=rtol,
                             atol=rtol * 0.1)


def test_patch_embed_matmul_equals_conv_with_same_params():
  """The matmul patch embedding keeps nn.Conv's parameter tree, init and outputs."""
  images = _images(2, 48)
  conv = nn.Conv(24, (16, 16), strides=(16, 16), padding="VALID", kernel_init=(
      nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=3)))
  embed = vit.PatchEmbed(24, 16)
  conv_params = conv.init(jax.random.key(3), images)["params"]
  params = embed.init(jax.random.key(3), images)["params"]
  assert jax.tree.map(jnp.shape, params) == {"kernel": (16, 16, 3, 24), "bias": (24,)}
  np.testing.assert_array_equal(params["kernel"], conv_params["kernel"])
  params = randomize(params, seed=4)  # a non-zero bias too
  out = embed.apply({"params": params}, images)
  assert out.shape == (2, 3, 3, 24)
  np.testing.assert_allclose(out, conv.apply({"params": params}, images), atol=1e-5)
  with pytest.raises(ValueError, match="multiples of 16"):
    embed.apply({"params": params}, images[:, :40])


def test_bad_inputs_raise_clear_errors():
  encoder = vit.VisionTransformer(width=32, depth=1, num_heads=2, patch_size=16)
  with pytest.raises(ValueError, match="multiple of patch"):
    encoder.init(jax.random.key(0), jnp.zeros((1, 40, 40, 3)))
  with pytest.raises(ValueError, match="pool"):
    vit.VisionTransformer(width=32, depth=1, num_heads=2, pool="max").init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError, match="model.dtype"):
    vit.compute_dtype("float8")
