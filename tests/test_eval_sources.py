"""kNN, linear probe and fine-tuning data on streamed ImageFolder and TFDS labelled sources."""

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cim_jax.data import labelled
from cim_jax.data import sources
from cim_jax.data import augment
from cim_jax import sharding
from cim_jax.evaluate import knn, linear_probe
from cim_jax.train import finetuning
from train_fixtures import recipe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TFDS_DIR = os.path.join(REPO, "tests", "fixtures", "tfds")
CLASSES = (0, 1, 6, 7)  # chance is 25%
SIZE = 16  # data.image_size of these tests (one 16x16 patch of the Mu/16 encoder)
CROP_PCT = 0.95


def flatten_pixels(images):
  return images.reshape(images.shape[0], -1).astype(jnp.float32)


@pytest.fixture(scope="module")
def digit_folders(tmp_path_factory):
  """root/{train,test}/<digit>/<n>.png: 30 train + 12 test 24x24 digits per class."""
  from sklearn.datasets import load_digits
  digits = load_digits()
  root = tmp_path_factory.mktemp("digits")
  for label in CLASSES:
    members = np.flatnonzero(digits.target == label)
    for split, index in (("train", members[:30]), ("test", members[30:42])):
      folder = root / split / f"digit_{label}"
      folder.mkdir(parents=True)
      for i in index:
        grey = np.kron(digits.images[i] * 15.9, np.ones((3, 3))).astype(np.uint8)
        Image.fromarray(grey).convert("RGB").save(folder / f"{i:04d}.png")
  return str(root / "train"), str(root / "test")


def in_memory(records: labelled.LabelledRecords) -> labelled.Labelled:
  """The same images read one by one and given the evaluation transform, as one array."""
  items = [records[i] for i in range(len(records))]
  images = np.stack([augment.eval_transform(item["image"], SIZE, CROP_PCT) for item in items])
  labels = np.array([item["label"] for item in items], np.int32)
  return labelled.Labelled(images, labels, records.num_classes)


def eval_config(probe=(), **data_overrides):
  """configs/cim_eval.py with the tiny Mu/16 encoder; `probe`: config.eval overrides."""
  config = recipe("cim_eval.py:Ti/16")
  config.model.variant = "Mu/16"
  config.progress_bar = False
  config.data.update(dict(image_size=SIZE, batch_size=32, crop_pct=CROP_PCT, read_threads=2))
  config.data.update(data_overrides)
  config.eval.update(dict(probe))
  return config


def test_streamed_imagefolder_matches_in_memory_arrays(digit_folders):
  train, test = labelled.imagefolder_splits(*digit_folders, ("train_root", "eval_root"))
  assert train.num_classes == 4 and train.class_names == ("digit_0", "digit_1", "digit_6",
                                                          "digit_7")
  train_arrays, test_arrays = in_memory(train), in_memory(test)
  # 120 train images in batches of 32: the last batch is padded.
  streamed, labels = knn.labelled_features(flatten_pixels, train, image_size=SIZE,
                                           batch_size=32, crop_pct=CROP_PCT, read_threads=2)
  arrays, array_labels = knn.labelled_features(flatten_pixels, train_arrays, image_size=SIZE,
                                               batch_size=32)
  assert streamed.shape == (120, SIZE * SIZE * 3)
  np.testing.assert_array_equal(labels, array_labels)
  np.testing.assert_allclose(streamed, arrays, rtol=1e-6)
  np.testing.assert_array_equal(labels, np.repeat(np.arange(4), 30))  # sorted class folders

  test_streamed, test_labels = knn.labelled_features(flatten_pixels, test, image_size=SIZE,
                                                     batch_size=32, crop_pct=CROP_PCT)
  streamed_acc = knn.knn_sweep(streamed, labels, test_streamed, test_labels, ks=(10,),
                               temperature=0.07, num_classes=4)
  test_feats = knn.extract_features(flatten_pixels, test_arrays.images, 32)
  array_acc = knn.knn_sweep(arrays, array_labels, test_feats, test_arrays.labels, ks=(10,),
                            temperature=0.07, num_classes=4)
  assert streamed_acc == array_acc
  assert streamed_acc["k10/top1"] > 80.0, streamed_acc  # raw pixels; chance is 25%


def test_knn_and_probe_of_an_encoder_on_imagefolder(digit_folders):
  config = eval_config(source="imagefolder", root=digit_folders[0], eval_root=digit_folders[1],
                       probe=dict(probe_epochs=5, probe_warmup_epochs=1, probe_batch_size=32))
  train, test = labelled.splits(config.data)
  assert isinstance(train, labelled.LabelledRecords) and len(test) == 48
  kwargs = dict(knn.feature_kwargs(config.data), ks=(10,))
  streamed = knn.knn_accuracy(None, config.model, train, test, **kwargs)
  arrays = knn.knn_accuracy(None, config.model, in_memory(train), in_memory(test), **kwargs)
  assert streamed == arrays and set(streamed) == {"k10/top1"}

  recipe = linear_probe.recipe_from_config(config)
  probe_kwargs = dict(knn.feature_kwargs(config.data), recipe=recipe)
  probe = linear_probe.linear_probe_accuracy(None, config.model, train, test, **probe_kwargs)
  probe_arrays = linear_probe.linear_probe_accuracy(None, config.model, in_memory(train),
                                                    in_memory(test), **probe_kwargs)
  assert probe == pytest.approx(probe_arrays)
  assert set(probe) == {"top1", "train_top1"}
  results = linear_probe.main(config)  # the entry point reads the same sources
  assert results["random_init"] == pytest.approx(probe)


def test_labelled_tfds_fixture_reads_through_the_same_path():
  config = eval_config(source="tfds", tfds_name="cim_tiny_photos", tfds_split="train",
                       tfds_eval_split="validation", tfds_data_dir=TFDS_DIR)
  train, test = labelled.splits(config.data)
  assert (len(train), len(test), train.num_classes) == (6, 2, 2)
  feats, labels = knn.labelled_features(flatten_pixels, train, image_size=SIZE, batch_size=4,
                                        crop_pct=CROP_PCT)
  # The fixture gives label 1 to its landscape (64x48) images and 0 to the portrait ones.
  originals = [sources.load_image(train.source[i]) for i in range(len(train))]
  np.testing.assert_array_equal(labels, [int(im.shape[1] > im.shape[0]) for im in originals])
  assert sorted(labels) == [0, 0, 0, 1, 1, 1]
  expected, _ = knn.labelled_features(flatten_pixels, in_memory(train), image_size=SIZE,
                                      batch_size=4)
  np.testing.assert_allclose(feats, expected, rtol=1e-6)
  results = knn.main(config)  # random-init encoder, k up to 200 capped at the 6 train images
  assert 0.0 <= results["random_init"]["k20/top1"] <= 100.0


def test_finetune_data_reads_tfds_and_imagefolder(digit_folders):
  config = finetune_config(source="tfds", tfds_name="cim_tiny_photos", tfds_data_dir=TFDS_DIR)
  train, test, num_classes = finetuning.labelled_sources(config)
  assert (len(train), len(test), num_classes) == (6, 2, 2)
  batch = next(iter(finetuning.train_dataset(config, train)))
  assert batch["image"].shape == (4, SIZE, SIZE, 3) and batch["image"].dtype == np.uint8
  assert set(batch["label"].tolist()) <= {0, 1}
  always_class_0 = lambda params, images: np.tile([1.0, 0.0], (len(images), 1))
  batches = sharding.batch_sharding(sharding.make_mesh(1))
  assert finetuning.evaluate(always_class_0, None, test, config, batches) == {"top1": 50.0}

  config = finetune_config(source="imagefolder", root=digit_folders[0],
                           eval_root=digit_folders[1])
  train, test, num_classes = finetuning.labelled_sources(config)
  assert (len(train), len(test), num_classes) == (120, 48, 4)
  assert finetuning.evaluate(always_class_0, None, test, config, batches)["top1"] == 25.0

  config = finetune_config(source="tfds", tfds_name="cim_tiny_photos", tfds_data_dir=TFDS_DIR,
                           num_classes=3)
  with pytest.raises(ValueError, match=r"has 2 classes but the head has .*num_classes=3"):
    finetuning.labelled_sources(config)


def finetune_config(**data_overrides):
  config = recipe("cim_finetune.py:Ti/16")
  config.batch_size = 4
  config.data.image_size = SIZE
  config.data.eval_batch_size = 4
  config.data.randaug_num_ops = 0
  for key, value in data_overrides.items():
    setattr(config.data, key, value)
  return config


@pytest.mark.parametrize("overrides,error,message", [
    (dict(source="cifar10"), ValueError,
     r"config.data.source='cifar10' must be one of digits, lfw, imagefolder, tfds"),
    (dict(source="imagefolder", eval_root="/x"), ValueError,
     r"config.data.root must name an ImageFolder directory"),
    (dict(source="imagefolder", root="/no/such/dir", eval_root="/x"),
     FileNotFoundError, r"config.data.root='/no/such/dir' does not exist"),
    (dict(source="tfds", tfds_name="cim_tiny_photos", tfds_data_dir=TFDS_DIR,
          tfds_eval_split="validation", tfds_label_key="species"), ValueError,
     r"has no label feature 'species'; features: \['image', 'label'\]"),
    (dict(source="tfds", tfds_name="no_such_dataset", tfds_data_dir=TFDS_DIR),
     FileNotFoundError, r"TFDS dataset 'no_such_dataset' not found"),
])
def test_bad_eval_source_config_is_named(overrides, error, message):
  with pytest.raises(error, match=message):
    labelled.splits(eval_config(**overrides).data)


def test_imagefolder_class_folders_must_agree(tmp_path, digit_folders):
  other = tmp_path / "other" / "cats"
  other.mkdir(parents=True)
  Image.new("RGB", (8, 8)).save(other / "a.png")
  with pytest.raises(ValueError, match="class folders differ: 4 under .*, 1 under"):
    labelled.imagefolder_splits(digit_folders[0], str(tmp_path / "other"), ("a", "b"))
  with pytest.raises(ValueError, match="source='csv' must be one of digits, lfw, imagefolder, tfds"):
    finetuning.labelled_sources(finetune_config(source="csv"))


@pytest.mark.parametrize("args, message", [
    (["--config=configs/cim_eval.py:Ti/16", "--config.data.source=imagefolder",
      "--config.data.root=/no/such/dir", "--config.data.eval_root=/no/such/dir"],
     "config.data.root='/no/such/dir' does not exist or is not a directory"),
    (["--config=configs/demo.py", "--config.init_from=workdirs/demo"],
     "expected a config for evaluation (configs/cim_eval.py:VARIANT), got one for pretraining"),
])
def test_cli_reports_a_bad_source_or_config_in_one_line(args, message):
  out = subprocess.run([sys.executable, "-m", "cim_jax.evaluate.knn", *args], cwd=REPO,
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr.strip() == f"error: {message}"


def test_undecodable_evaluation_image_is_named(tmp_path):
  for split in ("train", "test"):
    (tmp_path / split / "cats").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / split / "cats" / "good.png")
  (tmp_path / "test" / "cats" / "broken.png").write_bytes(b"not a png")
  _, test = labelled.imagefolder_splits(str(tmp_path / "train"), str(tmp_path / "test"),
                                      ("a", "b"))
  with pytest.raises(ValueError, match=r"cannot decode evaluation image .*broken\.png"):
    knn.labelled_features(flatten_pixels, test, image_size=8, batch_size=2)
