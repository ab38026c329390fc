"""Every augmentation op at every level and image size: no crash, and RandAugment's ops equal
timm's (installed) at every level, posterize at level 10 included."""

import itertools
import random
import types

import numpy as np
import pytest
from PIL import Image, ImageOps
from timm.data import auto_augment as timm_aa

from cim_jax.data import labelled
from cim_jax.data import photometric
from cim_jax.data import augment

LEVELS = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0.3, 2.5, 4.99, 7.5, 9.2, 9.75, 9.999]
SIZES = [(1, 1), (3, 900), (900, 3), (64, 48), (1, 5), (2, 2)]  # (height, width)
TIMM_HPARAMS = dict(img_mean=augment._FILL, interpolation=Image.BICUBIC)  # pylint: disable=protected-access


class _Draw:
  """An rng whose random() is fixed: picks the sign of the signed ops deterministically."""

  def __init__(self, value):
    self.value = value

  def random(self):
    return self.value


def _image(rng, height, width):
  """What the pipeline feeds RandAugment: an (H, W, 3) uint8 RGB array."""
  return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _pillow10_posterize(image, bits):
  """ImageOps.posterize as Pillow < 11 had it (no 1..8 check): what timm's op ran on."""
  mask = ~(2 ** (8 - bits) - 1)
  return ImageOps._lut(image, [i & mask for i in range(256)])  # pylint: disable=protected-access


def _timm_op(name, image, level, negate, monkeypatch):
  """timm's op `name` at `level`; `negate` fixes its random sign (timm negates if random() > .5)."""
  monkeypatch.setattr(random, "random", lambda: 0.9 if negate else 0.1)
  args = timm_aa.LEVEL_TO_ARG[name](level, TIMM_HPARAMS) if timm_aa.LEVEL_TO_ARG[name] else ()
  return timm_aa.NAME_TO_OP[name](image, *args, fillcolor=augment._FILL,  # pylint: disable=protected-access
                                  resample=Image.BICUBIC)


def test_the_op_set_is_timms_increasing_set():
  assert list(augment.RAND_INCREASING_OPS) == list(timm_aa._RAND_INCREASING_TRANSFORMS)  # pylint: disable=protected-access


@pytest.mark.parametrize("name", list(augment.RAND_INCREASING_OPS))
def test_every_op_at_every_level_and_size_matches_timm(name, monkeypatch):
  rng = np.random.default_rng(0)
  op = augment.RAND_INCREASING_OPS[name]
  for (height, width), level, negate in itertools.product(SIZES, LEVELS, (False, True)):
    image = _image(rng, height, width)
    ours = np.asarray(op(image.copy(), level, _Draw(0.1 if negate else 0.9)))
    assert ours.shape == (height, width, 3) and ours.dtype == np.uint8, (name, level)
    with monkeypatch.context() as patch:
      if name == "PosterizeIncreasing" and augment.posterize_bits(level) == 0:
        patch.setattr(ImageOps, "posterize", _pillow10_posterize)  # see the next test
      theirs = np.asarray(_timm_op(name, image.copy(), level, negate, patch))
    np.testing.assert_array_equal(ours, theirs, err_msg=f"{name} level {level} {height}x{width}")


def test_posterize_at_level_10_drops_every_bit_as_timm_does(monkeypatch):
  """timm asks for 0 bits at level 10; Pillow >= 11 refuses 0 bits, Pillow < 11 gave black."""
  image = _image(np.random.default_rng(1), 64, 48)
  ours = np.asarray(augment.RAND_INCREASING_OPS["PosterizeIncreasing"](image, 10.0, _Draw(0.5)))
  assert not ours.any()  # every bit dropped: black
  try:
    theirs = np.asarray(_timm_op("PosterizeIncreasing", image, 10.0, False, monkeypatch))
  except ValueError as e:  # this Pillow refuses 0 bits: timm's op as it ran on Pillow < 11
    assert "bits must be" in str(e)
    monkeypatch.setattr(ImageOps, "posterize", _pillow10_posterize)
    theirs = np.asarray(_timm_op("PosterizeIncreasing", image, 10.0, False, monkeypatch))
  np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("height,width", SIZES)
def test_train_augment_at_the_largest_magnitude_never_fails(height, width):
  """The whole fine-tuning transform, RandAugment at magnitude 10 (every op, many draws)."""
  rng = np.random.default_rng(2)
  image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
  for magnitude, std in ((10.0, 0.0), (9.0, 0.5), (10.0, 5.0)):
    transform = augment.TrainAugment(size=32, randaug_num_ops=4, randaug_magnitude=magnitude,
                                     randaug_magnitude_std=std)
    for _ in range(20):
      out = transform(image, rng)
      assert out.shape == (32, 32, 3) and out.dtype == np.uint8


@pytest.mark.parametrize("height,width", [(1, 1), (1, 9), (9, 1), (1, 300), (300, 1), (16, 16)])
def test_exemplar_photometric_ops_over_their_whole_ranges(height, width):
  """Colour jitter at zero / default / extreme strengths and both ends of each factor range,
  hue up to +-0.5, blur sigma at its bounds, every op on: uint8 out, same shape, no error."""
  rng = np.random.default_rng(3)
  image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
  for brightness, contrast, saturation, hue, sigma in itertools.product(
      (0.0, 0.4, 1.0, 5.0), (0.0, 0.4, 1.0, 5.0), (0.0, 0.2, 1.0, 5.0), (0.0, 0.1, 0.5),
      ((0.0, 0.0), (0.1, 2.0), (0.0, 50.0))):
    spec = types.SimpleNamespace(
        color_jitter_prob=1.0, brightness=brightness, contrast=contrast, saturation=saturation,
        hue=hue, grayscale_prob=1.0, blur_prob=1.0, blur_sigma=sigma, solarize_prob=1.0,
        exemplar_flip_prob=1.0)
    for end in (0.0, 0.5, 1.0 - 1e-9):
      u = [0.0] * photometric.NUM_UNIFORMS
      for column in (photometric.BRIGHTNESS, photometric.CONTRAST, photometric.SATURATION,
                     photometric.HUE, photometric.BLUR_SIGMA):
        u[column] = end
      u[photometric.ORDER] = rng.random(4).tolist()
      for grayscale in (0.0, 1.0):  # with and without the greyscale op
        u[photometric.GRAYSCALE] = grayscale
        out = photometric.augment_exemplar(image.copy(), u, spec)
        assert out.shape == image.shape and out.dtype == np.uint8, (spec, u)
  for op, arg in ((photometric.adjust_brightness, 0.0), (photometric.adjust_contrast, 0.0),
                  (photometric.adjust_saturation, 0.0), (photometric.adjust_hue, -0.5),
                  (photometric.adjust_hue, 0.5), (photometric.gaussian_blur, 0.0)):
    out = op(image.copy(), arg)
    assert out.shape == image.shape and out.dtype == np.uint8, (op.__name__, arg)


@pytest.mark.slow  # a fine-tuning run with grain workers: ~22 s warm, more cold
def test_a_crash_inside_the_finetuning_pipeline_is_internal_not_a_config_error(
    monkeypatch, capsys, tmp_path):
  """An op failing inside the grain pipeline: `internal error: <type>: <message> (raised at
  <file>:<line> ...)` and exit 1, not the `error: ...` / exit 2 of a user's mistake."""
  from cim_jax import finetune  # pylint: disable=g-import-not-at-top
  from cim_jax.train import finetuning  # pylint: disable=g-import-not-at-top

  def broken(image, level, rng):
    raise ValueError("bits must be between or equal to 1 and 8")

  monkeypatch.setattr(augment, "RAND_INCREASING_OPS",
                      {name: broken for name in augment.RAND_INCREASING_OPS})
  images = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
  source = labelled.LabelledRecords(labelled.Labelled(images, np.arange(8) % 2, 2))
  monkeypatch.setattr(finetuning, "labelled_sources", lambda config: (source, source, 2))
  monkeypatch.setattr("sys.argv", [
      "finetune", "--config=configs/cim_finetune.py:Ti/16", f"--workdir={tmp_path}",
      "--config.batch_size=8", "--config.num_train_steps=1", "--config.data.image_size=16",
      "--config.data.randaug_num_ops=2", "--config.progress_bar=false"])
  with pytest.raises(SystemExit) as exit_info:
    finetune.main()
  assert exit_info.value.code == 1
  first = capsys.readouterr().err.splitlines()[0]
  assert first.startswith("internal error: ValueError: bits must be between or equal to 1 and 8"
                          " (raised at "), first
  assert f"{__file__}:" in first and "in broken" in first, first
