"""Image sources (embedded, ImageFolder, TFDS fixture) and decoding of every image mode."""

import io
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from cim_jax.data import decode
from cim_jax.data import sources
from train_fixtures import recipe

FIXTURE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "tfds")


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, fmt, **kwargs)
  return buffer.getvalue()


def _data(**overrides) -> ml_collections.ConfigDict:
  data = recipe().data
  data.update(overrides)
  return data


# ---- embedded ----

def test_embedded_splits_are_disjoint_rgb_photos():
  train, heldout = sources.EmbeddedSource("train"), sources.EmbeddedSource("heldout")
  assert len(train) >= 15 and 2 <= len(heldout) <= 3
  assert not set(train.names) & set(heldout.names)
  for source in (train, heldout):
    for i in range(len(source)):
      record = source[i]
      assert record.data.dtype == np.uint8 and record.data.ndim == 3, record.name
      assert record.data.shape[2] == 3 and min(record.data.shape[:2]) >= 64, record.name
  # Distinct photos, not one image repeated.
  means = {round(float(train[i].data.mean()), 3) for i in range(len(train))}
  assert len(means) == len(train)


def test_embedded_source_pickles_without_its_cache():
  import pickle  # pylint: disable=g-import-not-at-top
  source = sources.EmbeddedSource("heldout")
  first = source[0].data
  copy = pickle.loads(pickle.dumps(source))
  assert not copy._cache  # pylint: disable=protected-access
  np.testing.assert_array_equal(copy[0].data, first)


@pytest.mark.parametrize("name, num_classes", [("digits", 10), ("lfw", 2)])
def test_embedded_labelled_split_is_fixed_and_disjoint(name, num_classes):
  train_x, train_y = sources.embedded_labelled(name, "train", image_size=32)
  test_x, test_y = sources.embedded_labelled(name, "test", image_size=32)
  assert train_x.shape[1:] == (32, 32, 3) and train_x.dtype == np.uint8
  total = len(train_x) + len(test_x)
  assert total == {"digits": 1797, "lfw": 200}[name]
  assert len(test_x) == len(range(4, total, 5))  # record i is a test record when i % 5 == 4
  assert set(np.unique(train_y)) == set(np.unique(test_y)) == set(range(num_classes))
  assert np.array_equal(train_x[..., 0], train_x[..., 2])  # grey replicated to RGB
  again_x, again_y = sources.embedded_labelled(name, "test", image_size=32)
  np.testing.assert_array_equal(again_x, test_x)
  np.testing.assert_array_equal(again_y, test_y)


def test_embedded_labelled_rejects_unknown_names():
  with pytest.raises(ValueError, match="'cifar'"):
    sources.embedded_labelled("cifar")


# ---- ImageFolder ----

def _write_folder(root, layout):
  for rel, colour in layout.items():
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (40, 30), colour).save(path)


def test_imagefolder_lists_sorted_with_class_labels(tmp_path):
  _write_folder(tmp_path, {"dog/b.png": (1, 2, 3), "cat/z.jpg": (9, 9, 9), "cat/a.png": (4, 5, 6),
                           "dog/sub/c.PNG": (7, 8, 9)})
  (tmp_path / "cat" / "notes.txt").write_text("not an image")
  source = sources.ImageFolderSource(str(tmp_path))
  rel = [os.path.relpath(p, tmp_path) for p in source.paths]
  assert rel == ["cat/a.png", "cat/z.jpg", "dog/b.png", "dog/sub/c.PNG"]
  assert source.classes == ["cat", "dog"] and source.labels.tolist() == [0, 0, 1, 1]
  image = sources.load_image(source[2])
  assert image.shape == (30, 40, 3) and tuple(image[0, 0]) == (1, 2, 3)


def test_imagefolder_without_images_fails_naming_the_path(tmp_path):
  (tmp_path / "cls").mkdir()
  (tmp_path / "cls" / "readme.txt").write_text("x")
  with pytest.raises(ValueError, match=f"no image files .* found under '{tmp_path}'"):
    sources.ImageFolderSource(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="missing"):
    sources.ImageFolderSource(str(tmp_path / "missing"))


def test_make_source_dispatches_and_checks(tmp_path):
  _write_folder(tmp_path / "train", {"a/x.png": (1, 1, 1)})
  assert isinstance(sources.make_source(_data(), "train"), sources.EmbeddedSource)
  assert sources.make_source(_data(), "heldout").split == "heldout"
  folder = sources.make_source(_data(source="imagefolder", root=str(tmp_path / "train"),
                                     eval_root=str(tmp_path / "train")))
  assert len(folder) == 1
  with pytest.raises(ValueError, match="config.data.eval_root"):
    sources.make_source(_data(source="imagefolder", root=str(tmp_path)), "heldout")
  with pytest.raises(ValueError, match="'webdataset'"):
    sources.make_source(_data(source="webdataset"))
  with pytest.raises(ValueError, match="'test'"):
    sources.make_source(_data(), "test")


# ---- TFDS (committed fixture, read without TensorFlow) ----

def test_tfds_fixture_reads_encoded_images():
  data = _data(source="tfds", tfds_name="cim_tiny_photos", tfds_data_dir=FIXTURE_DIR)
  train, heldout = sources.make_source(data, "train"), sources.make_source(data, "heldout")
  assert (len(train), len(heldout)) == (6, 2)
  record = train[1]
  assert isinstance(record.data, bytes) and record.data[:2] == b"\xff\xd8"  # raw JPEG bytes
  assert record.name == "tfds:cim_tiny_photos/train[1]"
  shapes = [sources.load_image(train[i]).shape for i in range(len(train))]
  assert sorted(set(shapes)) == [(48, 64, 3), (64, 48, 3)]  # TFDS stores them shuffled
  # Photos, not blank images.
  assert sources.load_image(heldout[0]).std() > 10


def test_tfds_missing_dataset_error_names_it(tmp_path):
  with pytest.raises(FileNotFoundError, match="'no_such_dataset'"):
    sources.TfdsSource("no_such_dataset", "train", str(tmp_path))


# ---- decoding: every mode to correct RGB, bad bytes rejected ----

def _exif_rotated_jpeg() -> bytes:
  # Stored 40 wide x 20 high, left half red; orientation 6 = displayed rotated 90 deg clockwise.
  image = Image.new("RGB", (40, 20), (0, 0, 255))
  image.paste((255, 0, 0), (0, 0, 20, 20))
  exif = Image.Exif()
  exif[0x0112] = 6
  return _encode(image, "JPEG", quality=95, exif=exif)


def test_decode_converts_modes_correctly():
  grey = Image.new("L", (8, 6), 77)
  assert tuple(decode.decode_image(_encode(grey, "PNG"))[0, 0]) == (77, 77, 77)
  palette = Image.new("RGB", (8, 6), (200, 10, 30)).convert("P", palette=Image.Palette.ADAPTIVE)
  assert tuple(decode.decode_image(_encode(palette, "PNG"))[0, 0]) == (200, 10, 30)
  # Fully transparent pixels become white, opaque ones keep their colour.
  rgba = Image.new("RGBA", (8, 6), (10, 20, 30, 0))
  rgba.putpixel((0, 0), (10, 20, 30, 255))
  out = decode.decode_image(_encode(rgba, "PNG"))
  assert tuple(out[0, 0]) == (10, 20, 30) and tuple(out[1, 1]) == (255, 255, 255)
  la = Image.new("LA", (8, 6), (50, 255))
  assert tuple(decode.decode_image(_encode(la, "PNG"))[0, 0]) == (50, 50, 50)
  cmyk = Image.new("CMYK", (8, 6), (0, 255, 255, 0))  # pure red in CMYK
  red = decode.decode_image(_encode(cmyk, "JPEG", quality=100))[3, 3]
  assert red[0] > 240 and red[1] < 20 and red[2] < 20
  deep = Image.fromarray(np.full((6, 8), 4000, np.uint16)).convert("I;16")
  deep.putpixel((0, 0), 65535)
  out = decode.decode_image(_encode(deep, "PNG"))
  assert out.dtype == np.uint8 and tuple(out[0, 0]) == (255, 255, 255) and 10 < out[3, 3, 0] < 20


def test_decode_honours_exif_orientation():
  out = decode.decode_image(_exif_rotated_jpeg())
  assert out.shape == (40, 20, 3)  # displayed portrait
  assert out[5, 10, 0] > 200 and out[35, 10, 2] > 200  # red now on top, blue at the bottom


@pytest.mark.parametrize("payload, reason", [
    (b"", "empty"),
    (b"this is a text file, not a picture\n" * 10, "cannot identify"),
    ("truncated", "truncated"),
])
def test_decode_rejects_bad_bytes(payload, reason):
  if payload == "truncated":
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)
    payload = _encode(Image.fromarray(noise), "JPEG")[:-600]
  with pytest.raises(decode.UndecodableImage, match=reason):
    decode.decode_image(payload)


def test_load_image_of_a_vanished_file_is_undecodable(tmp_path):
  with pytest.raises(decode.UndecodableImage, match="cannot read file"):
    sources.load_image(sources.ImageRecord("gone", str(tmp_path / "gone.jpg")))
