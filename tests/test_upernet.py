"""UperNet segmenter: mmseg parameter counts, PyTorch parity, shapes, resampling and the loss."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cim_jax.errors import ConfigError
from cim_jax.models import upernet

torch = pytest.importorskip("torch")
import torch_upernet  # pylint: disable=g-import-not-at-top,wrong-import-position

F = torch.nn.functional


def model_config(variant="Mu/16", dtype="float32", drop_path_rate=0.0):
  return ml_collections.ConfigDict(dict(
      variant=variant, dtype=dtype, drop_path_rate=drop_path_rate, mlp_ratio=4.0,
      pos_embed_grid=14, remat=False, attention_impl="", approximate_gelu=False))


def seg_config(channels=512, aux_channels=256, dropout=0.1, **extra):
  return ml_collections.ConfigDict(dict(channels=channels, pool_scales=(1, 2, 3, 6),
                                        aux_channels=aux_channels, aux_weight=0.4,
                                        dropout=dropout, feature_blocks=(), **extra))


def count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


def abstract_variables(model, size, batch=2):
  images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  return jax.eval_shape(lambda r, x: model.init(r, x, train=False), jax.random.key(0), images)


def test_feature_blocks():
  assert upernet.feature_blocks(12) == (4, 6, 8, 12)
  assert upernet.feature_blocks(24) == (8, 12, 16, 24)
  assert upernet.feature_blocks(32) == (11, 16, 21, 32)
  assert upernet.feature_blocks(2) == (1, 1, 1, 2)
  assert upernet.feature_blocks(12, (3, 5, 7, 11)) == (3, 5, 7, 11)
  with pytest.raises(ConfigError, match="feature_blocks"):
    upernet.feature_blocks(12, (3, 5, 7, 13))


def test_vit_b_parameter_counts_match_mmseg():
  width, channels, classes, aux = 768, 512, 150, 256
  model = upernet.build_segmenter(model_config("B/16"), seg_config(), classes)
  variables = abstract_variables(model, 64, batch=1)
  params = variables["params"]

  # Layer by layer from mmseg's UPerHead / FCNHead configs: ConvModule = conv without bias + BN
  # (2 parameters per channel; running statistics are buffers).
  conv_module = lambda cin, cout, k: k * k * cin * cout + 2 * cout
  decode = (4 * conv_module(width, channels, 1)                      # PPM
            + conv_module(width + 4 * channels, channels, 3)          # bottleneck
            + 3 * conv_module(width, channels, 1)                     # lateral convs
            + 3 * conv_module(channels, channels, 3)                  # fpn convs
            + conv_module(4 * channels, channels, 3)                  # fpn bottleneck
            + channels * classes + classes)                           # conv_seg
  auxiliary = conv_module(width, aux, 3) + aux * classes + classes
  neck = 3 * (4 * width * width + width) + 2 * width                  # 3 deconvs + 1 BN
  # mmsegmentation 1.2.2's own UPerHead / FCNHead built with these arguments (mmcv-lite 2.1.0,
  # counted outside this test suite) hold 32,332,950 and 1,808,534 parameters.
  assert count(params["decode_head"]) == decode == 32_332_950
  assert count(params["auxiliary_head"]) == auxiliary == 1_808_534
  assert count(params["neck"]) == neck
  assert "norm" not in params["backbone"]  # no unused final LayerNorm

  reference = torch_upernet.TorchSegmenter(model)
  torch_count = lambda m: sum(p.numel() for p in m.parameters())
  assert torch_count(reference.decode_head) == decode
  assert torch_count(reference.auxiliary_head) == auxiliary
  assert torch_count(reference.neck) == neck
  assert count(variables["batch_stats"]) == 2 * (
      sum(m.num_features for m in reference.modules() if isinstance(m, torch.nn.BatchNorm2d)))


def test_vit_b_shapes_at_512():
  model = upernet.build_segmenter(model_config("B/16", "bfloat16"), seg_config(), 150)
  images = jax.ShapeDtypeStruct((2, 512, 512, 3), jnp.float32)
  variables = abstract_variables(model, 512)
  logits, intermediates = jax.eval_shape(lambda v, x: model.apply(v, x, train=False),
                                         variables, images)
  assert logits.shape == (2, 128, 128, 150) and logits.dtype == jnp.float32
  aux = intermediates["aux_logits"]
  assert aux.shape == (2, 32, 32, 150) and aux.dtype == jnp.float32
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(variables))


@pytest.mark.parametrize("in_size,out_size", [(7, 16), (16, 7), (13, 5), (6, 24), (5, 5)])
def test_resampling_matches_torch(in_size, out_size):
  x = np.random.default_rng(0).normal(size=(2, in_size, in_size + 3, 4)).astype(np.float32)
  size = (out_size, out_size + 1)
  ours = upernet.resize_bilinear(jnp.asarray(x), size)
  theirs = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=size, mode="bilinear",
                         align_corners=False).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-5)  # float32 summation order
  pooled = upernet.adaptive_avg_pool(jnp.asarray(x), out_size)
  theirs = F.adaptive_avg_pool2d(torch.from_numpy(x).permute(0, 3, 1, 2), out_size)
  np.testing.assert_allclose(pooled, theirs.permute(0, 2, 3, 1).numpy(), atol=1e-6)


@pytest.mark.parametrize("height,width", [(7, 9), (8, 6), (1, 1)])
def test_conv_forms_agree_with_gradients(height, width):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, height, width, 5)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 5, 4)), jnp.float32)
  weights = jnp.asarray(rng.normal(size=(2, height, width, 4)), jnp.float32)
  theirs = F.conv2d(torch.from_numpy(np.array(x)).permute(0, 3, 1, 2),
                    torch.from_numpy(np.array(kernel)).permute(3, 2, 0, 1), padding=1)
  for impl in ("xla", "split_grad", "matmul", "shifted", "winograd", "winograd4", "auto"):
    tol = 5e-5 if impl == "winograd4" else 1e-5  # F(4x4, 3x3) rounds more (see below)
    loss = lambda x, k, impl=impl: jnp.sum(upernet.conv2d_same(x, k, impl) * weights)
    np.testing.assert_allclose(upernet.conv2d_same(x, kernel, impl),
                               theirs.permute(0, 2, 3, 1).numpy(), rtol=tol, atol=tol,
                               err_msg=impl)
    grads = jax.grad(loss, argnums=(0, 1))(x, kernel)
    expected = jax.grad(lambda x, k: jnp.sum(jax.lax.conv_general_dilated(
        x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) * weights),
                        argnums=(0, 1))(x, kernel)
    for ours, reference in zip(grads, expected):
      np.testing.assert_allclose(ours, reference, rtol=tol, atol=tol, err_msg=impl)


def test_winograd_is_exact_enough_at_vit_b_widths():
  # 512 input channels: the transformed-domain sums are long enough to show a wrong transform
  # entry or float32 error growth that 5 channels would hide.
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(1, 11, 10, 512)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 512, 8)) / 48, jnp.float32)
  theirs = F.conv2d(torch.from_numpy(np.array(x)).permute(0, 3, 1, 2),
                    torch.from_numpy(np.array(kernel)).permute(3, 2, 0, 1), padding=1)
  theirs = theirs.permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(upernet.conv2d_same(x, kernel, "winograd"), theirs,
                             rtol=1e-5, atol=1e-5)
  # F(4x4, 3x3)'s points +-2 cost float32 precision: measured 8.5e-6 of the output's largest
  # magnitude here; a wrong transform entry is off by O(1).
  error = np.abs(np.asarray(upernet.conv2d_same(x, kernel, "winograd4")) - theirs).max()
  assert error <= 3e-5 * np.abs(theirs).max()
  # Other kernel sizes fall back to a direct form.
  kernel5 = jnp.asarray(rng.normal(size=(5, 5, 512, 8)) / 80, jnp.float32)
  for impl in ("winograd", "winograd4"):
    np.testing.assert_allclose(upernet.conv2d_same(x, kernel5, impl),
                               upernet.conv2d_same(x, kernel5, "xla"), rtol=1e-5, atol=1e-5)


def test_auto_conv_impl():
  assert upernet.auto_conv_impl(2048, 512, "cpu", 128 * 128) == "winograd4"
  assert upernet.auto_conv_impl(512, 512, "cpu", 64 * 64) == "winograd4"
  assert upernet.auto_conv_impl(512, 512, "cpu", 32 * 32) == "winograd"
  assert upernet.auto_conv_impl(2816, 512, "cpu", 16 * 16) == "matmul"
  assert upernet.auto_conv_impl(768, 256, "cpu", 32 * 32) == "matmul"
  assert upernet.auto_conv_impl(512, 512, "gpu", 128 * 128) == "xla"
  assert upernet.auto_conv_impl(2048, 512, "tpu", 128 * 128) == "xla"
  with pytest.raises(ConfigError, match="conv_impl"):
    upernet.build_segmenter(model_config(), seg_config(conv_impl="fft"), 3)


def random_variables(model, seed=1):
  """Every parameter and running statistic random and off its init (variances positive, norm
  scales near 1); from the abstract shapes, so nothing is compiled for init."""
  rng = np.random.default_rng(seed)
  flat, tree = jax.tree_util.tree_flatten_with_path(abstract_variables(model, 64, batch=1))

  def value(path, leaf):
    noise = 0.1 * rng.normal(size=leaf.shape).astype(np.float32)
    name = jax.tree_util.keystr(path)
    if name.endswith("['var']"):
      return 0.5 + np.abs(noise) * 5
    return 1.0 + noise if name.endswith("['scale']") else noise

  return jax.tree_util.tree_unflatten(tree, [value(p, leaf) for p, leaf in flat])


def tiny_pair(dropout=0.1):
  model = upernet.build_segmenter(model_config(), seg_config(32, 16, dropout), 5)
  variables = random_variables(model)
  reference = torch_upernet.load_flax_variables(torch_upernet.TorchSegmenter(model), variables)
  return model, variables, reference


def relative_error(ours, theirs):
  ours, theirs = np.asarray(ours), theirs.detach().permute(0, 2, 3, 1).numpy()
  return np.abs(ours - theirs).max() / np.abs(theirs).max()


@pytest.mark.parametrize("height,width", [(64, 64), (96, 128)])
def test_eval_forward_matches_torch(height, width):
  model, variables, reference = tiny_pair()
  images = np.random.default_rng(2).normal(size=(2, height, width, 3)).astype(np.float32)
  logits, intermediates = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  with torch.no_grad():
    torch_logits, torch_aux = reference.eval()(torch.from_numpy(images).permute(0, 3, 1, 2))
  assert logits.shape == (2, height // 4, width // 4, 5)
  assert relative_error(logits, torch_logits) <= 1e-5
  assert relative_error(intermediates["aux_logits"], torch_aux) <= 1e-5


def test_train_forward_and_batch_statistics_match_torch():
  model, variables, reference = tiny_pair(dropout=0.0)
  images = np.random.default_rng(3).normal(size=(3, 96, 128, 3)).astype(np.float32)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
  (logits, intermediates), updated = apply(variables, images)
  with torch.no_grad():
    torch_logits, torch_aux = reference.train()(torch.from_numpy(images).permute(0, 3, 1, 2))
  assert relative_error(logits, torch_logits) <= 1e-5
  assert relative_error(intermediates["aux_logits"], torch_aux) <= 1e-5
  torch_state = reference.state_dict()
  flat = jax.tree_util.tree_flatten_with_path(updated["batch_stats"])[0]
  for path, value in flat:
    key = torch_upernet._torch_name(tuple(k.key for k in path))  # pylint: disable=protected-access
    np.testing.assert_allclose(value, torch_state[key].numpy(), rtol=1e-5, atol=1e-6,
                               err_msg=key)
  before = jax.tree_util.tree_leaves(variables["batch_stats"])
  assert all(np.abs(a - b).max() > 0 for a, b in
             zip(before, jax.tree_util.tree_leaves(updated["batch_stats"])))


def test_loss_matches_numpy_with_ignored_pixels():
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(2, 4, 5, 3)).astype(np.float32)
  aux = rng.normal(size=(2, 2, 2, 3)).astype(np.float32)
  labels = rng.integers(0, 3, size=(2, 8, 10)).astype(np.uint8)
  labels[rng.random(labels.shape) < 0.3] = 255
  loss, parts = upernet.segmentation_loss(jnp.asarray(logits), jnp.asarray(aux),
                                          jnp.asarray(labels), aux_weight=0.4)

  def numpy_ce(x):
    rows = upernet.bilinear_matrix(x.shape[1], 8)
    cols = upernet.bilinear_matrix(x.shape[2], 10)
    x = np.einsum("oh,bhwc,pw->bopc", rows, x.astype(np.float64), cols)
    log_probs = x - np.log(np.exp(x).sum(-1, keepdims=True))
    valid = labels != 255
    picked = np.take_along_axis(log_probs, np.where(valid, labels, 0)[..., None].astype(int),
                                -1)[..., 0]
    return -(picked * valid).sum() / labels.size  # all pixels, as mmseg's avg_non_ignore=False

  np.testing.assert_allclose(parts["decode_loss"], numpy_ce(logits), rtol=1e-5)
  np.testing.assert_allclose(parts["aux_loss"], numpy_ce(aux), rtol=1e-5)
  np.testing.assert_allclose(loss, numpy_ce(logits) + 0.4 * numpy_ce(aux), rtol=1e-5)
  torch_loss = torch_upernet.segmentation_loss(
      torch.from_numpy(logits).permute(0, 3, 1, 2), torch.from_numpy(aux).permute(0, 3, 1, 2),
      torch.from_numpy(labels.astype(np.int64)))
  np.testing.assert_allclose(loss, torch_loss.item(), rtol=1e-5)


def test_classifier_drops_whole_channels():
  """mmseg's decode heads use Dropout2d: a dropped channel is zero at every pixel of a sample."""
  channels = 64
  classifier = upernet.Classifier(channels, dropout=0.5)
  variables = {"params": {"conv_seg": {"kernel": np.eye(channels, dtype=np.float32)[None, None],
                                       "bias": np.zeros(channels, np.float32)}}}
  out = classifier.apply(variables, jnp.ones((2, 4, 5, channels)), train=True,
                         rngs={"dropout": jax.random.key(0)})
  per_channel = np.asarray(out).reshape(2, 20, channels)
  assert np.all(per_channel == per_channel[:, :1])  # constant over pixels
  assert set(np.unique(per_channel)) == {0.0, 2.0}
