"""Fine-tuning: layer-wise lr decay, mixup / erasing, overfitting, save / restore, bad input."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cim_jax.data import labelled
from cim_jax.data import sources
from cim_jax.data import augment
from cim_jax.evaluate import finetune, finetune_lib
from train_fixtures import recipe

DEPTH = 2  # of the classifier the tiny_classifier fixture builds (conftest.py)


def tiny_config(steps: int = 40):
  config = recipe("cim_finetune.py:Ti/16")
  config.batch_size = 16
  config.num_train_steps = steps
  config.data.image_size = 16
  config.data.eval_crop_pct = 1.0
  config.data.eval_batch_size = 16
  config.data.randaug_num_ops = 0  # memorising needs the images unchanged
  config.data.random_erase_prob = 0.0
  config.data.crop_scale = (1.0, 1.0)
  config.data.crop_ratio = (1.0, 1.0)
  config.data.flip_prob = 0.0
  config.mixup.prob = 0.0
  config.mixup.label_smoothing = 0.0
  config.model.drop_path_rate = 0.0
  config.optim.base_lr = 2e-2
  config.optim.warmup_steps = 3
  config.optim.layer_decay = 1.0
  config.log_every_steps = 10
  config.eval_every_steps = 20
  config.checkpoint_every_steps = 20
  config.progress_bar = False
  return config


def tiny_labelled_subset(monkeypatch, num=16):
  """The same 16 digits (4 classes) for training and evaluation: a memorisation check."""
  from sklearn.datasets import load_digits
  digits = load_digits()
  keep = np.flatnonzero(digits.target < 4)[:num]
  images = np.repeat((digits.images[keep] * 15.9).astype(np.uint8)[..., None], 3, axis=-1)
  images = np.stack([np.kron(im, np.ones((2, 2, 1), np.uint8)) for im in images])  # 16x16
  source = labelled.LabelledRecords(labelled.Labelled(images, digits.target[keep].astype(np.int32), 4))
  monkeypatch.setattr(finetune, "labelled_sources", lambda config: (source, source, 4))
  return source


def init_params(model):
  return jax.jit(lambda rng: model.init(rng, jnp.zeros((1, 16, 16, 3)))["params"])(
      jax.random.key(0))


def test_layerwise_lr_scales_per_layer(tiny_classifier):
  config = tiny_config()
  model = finetune_lib.build_classifier(config, 4)
  params = init_params(model)
  decay = 0.5
  scales = finetune_lib.layerwise_lr_scales(params, DEPTH, decay)
  assert scales["patch_embed"]["kernel"] == decay ** 3
  assert scales["cls_token"] == decay ** 3
  assert scales["blocks_0"]["attn"]["qkv"]["kernel"] == decay ** 2
  assert scales["blocks_1"]["mlp"]["fc2"]["bias"] == decay ** 1
  assert scales["fc_norm"]["scale"] == 1.0 and scales["head"]["kernel"] == 1.0


def test_optimizer_applies_layer_scales(tiny_classifier):
  config = tiny_config()
  config.optim.layer_decay = 0.5
  config.optim.weight_decay = 0.0
  model = finetune_lib.build_classifier(config, 4)
  params = init_params(model)
  tx = finetune_lib.build_optimizer(config, params, lambda step: 0.1)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  # Adam's first step with a unit gradient is -lr per element; the layer factor multiplies it.
  expected = {"patch_embed": 0.125, "blocks_0": 0.25, "blocks_1": 0.5, "head": 1.0}
  for name, factor in expected.items():
    leaf = jax.tree.leaves(updates[name])[0]
    np.testing.assert_allclose(leaf, -0.1 * factor, rtol=1e-5)


def test_weight_decay_mask_matches_pretraining_rule(tiny_classifier):
  model = finetune_lib.build_classifier(tiny_config(), 4)
  params = init_params(model)
  mask = finetune_lib.weight_decay_mask(params, "1d")
  assert mask["head"]["kernel"] and mask["blocks_0"]["attn"]["qkv"]["kernel"]
  assert not mask["head"]["bias"] and not mask["fc_norm"]["scale"]
  assert mask["cls_token"]  # "1d": the pre-training set, which decays the cls token
  assert not finetune_lib.weight_decay_mask(params, "1d+tokens")["cls_token"]
  # The fine-tuning default exempts it, as the release (timm's no_weight_decay list).
  default = finetune_lib.weight_decay_mask(params, tiny_config().optim.wd_exempt)
  assert not default["cls_token"] and default["head"]["kernel"]
  with pytest.raises(ValueError, match="must be '1d' or '1d\\+tokens'"):
    finetune_lib.weight_decay_mask(params, "tokens")


def test_mixup_cutmix_targets_follow_pixels():
  m = ml_collections.ConfigDict(dict(mixup_alpha=0.0, cutmix_alpha=1.0, prob=1.0,
                                     switch_prob=0.5, label_smoothing=0.0))
  images = jnp.concatenate([jnp.zeros((1, 8, 8, 3)), jnp.ones((1, 8, 8, 3))])
  mix = jax.jit(lambda rng, x, y: finetune_lib.mixup_cutmix(rng, x, y, 2, m))
  mixed, targets = mix(jax.random.key(1), images, jnp.array([0, 1]))
  pasted = float(mixed[0, ..., 0].mean())  # sample 0 is zeros; the pasted box comes from ones
  np.testing.assert_allclose(targets[0], [1 - pasted, pasted], atol=1e-6)
  np.testing.assert_allclose(targets.sum(-1), 1.0, atol=1e-6)
  m.mixup_alpha, m.cutmix_alpha = 0.8, 0.0
  mix = jax.jit(lambda rng, x, y: finetune_lib.mixup_cutmix(rng, x, y, 2, m))
  mixed, targets = mix(jax.random.key(2), images, jnp.array([0, 1]))
  np.testing.assert_allclose(targets[0, 1], mixed[0, 0, 0, 0], atol=1e-6)


def test_label_smoothing_follows_timm():
  targets = finetune_lib.smooth_one_hot(jnp.array([2]), 4, 0.1)
  np.testing.assert_allclose(targets, [[0.025, 0.025, 0.925, 0.025]], atol=1e-7)


def test_random_erasing_probability():
  images = jnp.full((64, 16, 16, 3), 7.0)
  assert (finetune_lib.random_erasing(jax.random.key(0), images, 0.0) == 7.0).all()
  erase = jax.jit(finetune_lib.random_erasing, static_argnums=2)
  erased = erase(jax.random.key(0), images, 0.25)
  touched = (erased != 7.0).any(axis=(1, 2, 3)).mean()
  assert 0.05 < touched < 0.5


def test_eval_transform_resizes_by_crop_pct():
  image = np.zeros((100, 200, 3), np.uint8)
  image[:, 100:] = 255  # right half white
  out = augment.eval_transform(image, size=32, crop_pct=0.5)  # resize to 64 x 128, crop centre
  assert out.shape == (32, 32, 3)
  assert out[:, :14].max() < 30 and out[:, 18:].min() > 225


def test_rand_augment_is_seeded_and_changes_images():
  image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
  a = augment.rand_augment(image, np.random.default_rng(5), prob=1.0)
  b = augment.rand_augment(image, np.random.default_rng(5), prob=1.0)
  assert a.shape == image.shape and a.dtype == np.uint8 and (a == b).all()
  assert any((augment.rand_augment(image, np.random.default_rng(s), prob=1.0) != image).any()
             for s in range(3))


def test_overfits_tiny_subset_and_restores_same_accuracy(tmp_path, monkeypatch,
                                                         tiny_classifier):
  tiny_labelled_subset(monkeypatch)
  config = tiny_config(steps=40)
  result = finetune.finetune(config, str(tmp_path))
  assert result["last_top1"] >= 93.75, result  # at most 1 of 16 wrong; chance is 25%
  assert result["best_top1"] >= result["last_top1"]
  restored = finetune.finetune(config, str(tmp_path), eval_only=True)
  assert restored["step"] == 40
  assert restored["top1"] == result["last_top1"]


@pytest.mark.slow  # three fine-tuning runs: ~1 minute on 2 shared cores
def test_resume_is_exact(tmp_path, monkeypatch, tiny_classifier):
  tiny_labelled_subset(monkeypatch)
  config = tiny_config(steps=6)
  config.checkpoint_every_steps = 3
  config.eval_every_steps = 6
  config.log_every_steps = 1
  config.mixup.prob = 1.0  # the random parts must replay too
  config.data.random_erase_prob = 0.25
  config.data.randaug_num_ops = 2
  straight = finetune.finetune(config, str(tmp_path / "a"))
  config.num_train_steps = 3
  finetune.finetune(config, str(tmp_path / "b"))
  config.num_train_steps = 6
  resumed = finetune.finetune(config, str(tmp_path / "b"))
  assert resumed == straight
  losses = [open(tmp_path / d / "metrics.jsonl").read().splitlines()[-1] for d in "ab"]
  assert losses[0] == losses[1]


def test_checkpoint_of_another_variant_or_head(tmp_path, monkeypatch, tiny_classifier):
  tiny_labelled_subset(monkeypatch)
  config = tiny_config(steps=1)
  finetune.finetune(config, str(tmp_path))
  other = tiny_config(steps=1)
  other.model.variant = "S/16"
  with pytest.raises(ValueError, match=r"holds a fine-tuned Ti/16 but model.variant='S/16'"):
    finetune.finetune(other, str(tmp_path))
  monkeypatch.setattr(finetune, "labelled_sources",
                      lambda c: (labelled.LabelledRecords(labelled.Labelled(
                          np.zeros((2, 16, 16, 3), np.uint8), np.array([0, 6]), 7)),) * 2 + (7,))
  with pytest.raises(ValueError, match="head of 4 classes but the labelled data has 7"):
    finetune.finetune(tiny_config(steps=1), str(tmp_path))


def test_pretraining_workdir_is_not_resumed(tmp_path):
  saved = tmp_path / "checkpoints" / "3" / "config"
  saved.mkdir(parents=True)
  (saved / "metadata").write_text('{"model": {"variant": "Ti/16"}}')
  with pytest.raises(ValueError, match="holds a pre-training run, not a fine-tuning one"):
    finetune.check_checkpoint_matches(str(tmp_path), tiny_config(), 4)


def test_label_set_differs_from_configured_head():
  config = tiny_config()
  train, test, num_classes = finetune.labelled_sources(config)  # embedded digits, 80/20
  images, labels = sources.embedded_labelled("digits", "test", image_size=config.data.image_size)
  assert (len(train), len(test), num_classes) == (1438, 359, 10)
  np.testing.assert_array_equal(test[7]["image"], images[7])
  assert test[7]["label"] == labels[7]
  config.data.num_classes = 5
  with pytest.raises(ValueError, match=r"has 10 classes but the head has .*num_classes=5"):
    finetune.labelled_sources(config)


class _FixedDraw:
  """An rng stand-in whose random() returns one value (it decides the sign of every op)."""

  def __init__(self, value):
    self.value = value

  def random(self):
    return self.value


@pytest.mark.parametrize("negative", [False, True])
@pytest.mark.parametrize("name", list(augment.RAND_INCREASING_OPS))
def test_rand_augment_ops_match_timm(name, negative):
  auto_augment = pytest.importorskip("timm.data.auto_augment")
  from PIL import Image
  image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8))
  level = 7.3
  # As timm's create_transform builds them for ImageNet mean and interpolation='bicubic'.
  hparams = dict(auto_augment._HPARAMS_DEFAULT, interpolation=Image.BICUBIC,
                 img_mean=(124, 116, 104))
  op = auto_augment.AugmentOp(name, prob=1.0, magnitude=level, hparams=hparams)
  timm_random = auto_augment.random.random
  auto_augment.random.random = lambda: 0.9 if negative else 0.1  # timm negates above 0.5
  try:
    expected = np.asarray(op(image))
  finally:
    auto_augment.random.random = timm_random
  got = np.asarray(augment.RAND_INCREASING_OPS[name](image, level,
                                                       _FixedDraw(0.1 if negative else 0.9)))
  np.testing.assert_array_equal(got, expected)
