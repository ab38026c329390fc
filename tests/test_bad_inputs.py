"""Bad and odd image files of every kind, through the real decode path (an ImageFolder record,
read from disk by `sources.load_image`) and through the pre-training pipeline over an
ImageFolder that holds them next to good images: undecodable files are skipped and counted
(each sample that met one is made from another record of the shard), convertible ones are
decoded to RGB uint8 and trained on. docs/RELIABILITY.md lists the behaviour per kind."""

import io
import logging
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from cim_jax import cli
from cim_jax import config_validation
from cim_jax import errors
from cim_jax.data import decode
from cim_jax.data import pipeline
from cim_jax.data import sources
from test_exits import assert_clean, command, error_lines, run
from train_fixtures import REPO, recipe, subprocess_env

CLASS = "odd"


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, fmt, **kwargs)
  return buffer.getvalue()


def _noise(size=64):
  return Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), np.uint8))


def _bomb_png(width=20000, height=20000) -> bytes:
  """A 1x1 PNG whose header declares width x height (> 2 x PIL's MAX_IMAGE_PIXELS): a few
  dozen bytes on disk; PIL refuses it at open, before allocating anything."""
  png = bytearray(_encode(Image.new("L", (1, 1)), "PNG"))
  ihdr = bytearray(png[16:29])  # IHDR data: width, height, depth, colour type, ...
  ihdr[0:8] = struct.pack(">II", width, height)
  png[16:29] = ihdr
  png[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
  return bytes(png)


def _palette_with_transparency() -> bytes:
  """Left half palette index 0 (declared transparent), right half index 1 (opaque blue)."""
  image = Image.new("P", (40, 30), 0)
  image.putpalette([255, 0, 0, 0, 0, 255])
  image.paste(1, (20, 0, 40, 30))
  return _encode(image, "PNG", transparency=0)


def _animated_gif() -> bytes:
  frames = [Image.new("RGB", (40, 30), c) for c in [(200, 30, 40), (10, 20, 230)]]
  return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)


def _deep_png() -> bytes:
  grey = np.full((30, 40), 4000, np.uint16)
  grey[0, 0] = 65535  # the used range is scaled to 8 bits: 4000 -> 4000 * 255 / 65535 = 15.6
  return _encode(Image.fromarray(grey), "PNG")


# name -> (file name, bytes) ; what decoding does is in DECODED and UNDECODABLE below.
BAD_FILES = {
    "empty": ("empty.jpg", lambda: b""),
    "text": ("notes.jpg", lambda: b"this is a text file, not a picture\n" * 10),
    "truncated_jpeg": ("cut.jpg", lambda: _encode(_noise(), "JPEG")[:-600]),
    "truncated_png": ("cut.png", lambda: _encode(_noise(), "PNG")[:-600]),
    "bomb": ("bomb.png", _bomb_png),
    "cmyk": ("cmyk.jpg", lambda: _encode(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG",
                                          quality=100)),
    "deep": ("deep.png", _deep_png),
    "rgba": ("rgba.png", lambda: _encode(Image.new("RGBA", (40, 30), (200, 0, 0, 128)), "PNG")),
    "palette_transparent": ("palette.png", _palette_with_transparency),
    "one_pixel": ("dot.png", lambda: _encode(Image.new("RGB", (1, 1), (90, 90, 10)), "PNG")),
    "sliver": ("sliver.png", lambda: _encode(Image.new("RGB", (3, 900), (10, 90, 90)), "PNG")),
    "gif": ("anim.gif", _animated_gif),
    "webp": ("photo.webp", lambda: _encode(Image.new("RGB", (40, 30), (40, 160, 90)), "WEBP")),
}

# Decoded to (H, W, 3) uint8: kind -> (source mode, shape, colour at (row, col) -> RGB, tol).
DECODED = {
    "cmyk": ("CMYK", (30, 40), {(15, 20): (255, 0, 0)}, 12),
    "deep": ("I;16", (30, 40), {(0, 0): (255, 255, 255), (15, 20): (16, 16, 16)}, 0),
    "rgba": ("RGBA", (30, 40), {(15, 20): (227, 127, 127)}, 1),  # 50% red over white
    "palette_transparent": ("P", (30, 40), {(15, 5): (255, 255, 255), (15, 35): (0, 0, 255)}, 0),
    "one_pixel": ("RGB", (1, 1), {(0, 0): (90, 90, 10)}, 0),
    "sliver": ("RGB", (900, 3), {(450, 1): (10, 90, 90)}, 0),
    "gif": ("P", (30, 40), {(15, 20): (200, 30, 40)}, 0),  # the first frame, not the second
    "webp": ("RGB", (30, 40), {(15, 20): (40, 160, 90)}, 4),  # lossy
}
# Undecodable: kind -> the reason `decode` gives (what the skip log shows after the path).
UNDECODABLE = {
    "empty": "empty file",
    "text": "UnidentifiedImageError: cannot identify image file",
    "truncated_jpeg": "OSError: image file is truncated",
    "truncated_png": "OSError: image file is truncated",
    "bomb": "DecompressionBombError: Image size (400000000 pixels) exceeds limit of 178956970 "
            "pixels",
}
# Decodable but smaller than data.min_image_size (16 by default): skipped by the pipeline.
TOO_SMALL = {"one_pixel": "image 1x1 is smaller than min_image_size=16",
             "sliver": "image 3x900 is smaller than min_image_size=16"}
assert set(DECODED) | set(UNDECODABLE) == set(BAD_FILES)
# Every record the pipeline skips: kind -> the start of its reason.
SKIPPED = {**UNDECODABLE, **TOO_SMALL, "dangling_link": "cannot read file: No such file"}


def write_folder(root, kinds=tuple(BAD_FILES), good=3) -> dict[str, str]:
  """root/good/g<i>.png (distinct colours) + root/odd/<bad files> + an empty directory named
  root/odd/cat.jpg/ + a dangling symlink root/odd/gone.jpg; returns kind -> path."""
  paths = {}
  os.makedirs(os.path.join(root, "good"), exist_ok=True)
  for i in range(good):
    paths[f"good{i}"] = os.path.join(root, "good", f"g{i}.png")
    Image.new("RGB", (64, 48), (60 * i + 10, 100, 200 - 50 * i)).save(paths[f"good{i}"])
  os.makedirs(os.path.join(root, CLASS, "cat.jpg"), exist_ok=True)
  for kind in kinds:
    name, make = BAD_FILES[kind]
    paths[kind] = os.path.join(root, CLASS, name)
    with open(paths[kind], "wb") as f:
      f.write(make())
  paths["dangling_link"] = os.path.join(root, CLASS, "gone.jpg")
  os.symlink(os.path.join(root, "nowhere.jpg"), paths["dangling_link"])
  return paths


def _record(source, path):
  return source[source.paths.index(path)]


# ---- the decode path: one file at a time, read from an ImageFolder ----

@pytest.mark.parametrize("kind", sorted(DECODED))
def test_odd_images_decode_to_rgb_uint8(tmp_path, kind):
  paths = write_folder(tmp_path, kinds=[kind], good=0)
  with Image.open(paths[kind]) as image:
    assert image.mode == DECODED[kind][0]
  array = sources.load_image(_record(sources.ImageFolderSource(str(tmp_path)), paths[kind]))
  _, shape, pixels, tolerance = DECODED[kind]
  assert array.dtype == np.uint8 and array.shape == (*shape, 3)
  for (row, col), rgb in pixels.items():
    np.testing.assert_allclose(array[row, col].astype(int), rgb, atol=tolerance,
                               err_msg=f"{kind} at {(row, col)}")


@pytest.mark.parametrize("kind", sorted(UNDECODABLE))
def test_undecodable_files_raise_one_line_reasons(tmp_path, kind):
  paths = write_folder(tmp_path, kinds=[kind], good=0)
  record = _record(sources.ImageFolderSource(str(tmp_path)), paths[kind])
  with pytest.raises(decode.UndecodableImage) as error:
    sources.load_image(record)
  message = str(error.value)
  assert message.startswith(UNDECODABLE[kind]), message
  assert "\n" not in message and " object at 0x" not in message, message


def test_dangling_symlink_is_listed_then_unreadable_and_directory_named_jpg_is_not_listed(
    tmp_path):
  paths = write_folder(tmp_path, kinds=[], good=1)
  source = sources.ImageFolderSource(str(tmp_path))
  assert source.paths == sorted([paths["good0"], paths["dangling_link"]])  # no cat.jpg/
  with pytest.raises(decode.UndecodableImage,
                     match=r"^cannot read file: No such file or directory$"):
    sources.load_image(_record(source, paths["dangling_link"]))
  # A folder holding only a directory named like an image holds no image files.
  os.makedirs(tmp_path / "only" / "cls" / "cat.jpg")
  with pytest.raises(sources.ConfigError, match="no image files"):
    sources.ImageFolderSource(str(tmp_path / "only"))


def test_a_decompression_bomb_is_refused_without_allocating(tmp_path):
  """The bomb is refused at `Image.open` from its header; with a lower limit a small but real
  image over twice the limit is refused the same way; one just over the limit is decoded with
PIL's DecompressionBombWarning."""
  assert len(_bomb_png()) < 100
  with pytest.raises(decode.UndecodableImage, match="DecompressionBombError"):
    decode.decode_image(_bomb_png())
  limit = Image.MAX_IMAGE_PIXELS
  try:
    Image.MAX_IMAGE_PIXELS = 500
    with pytest.raises(decode.UndecodableImage, match=r"\(1200 pixels\) exceeds limit of 1000"):
      decode.decode_image(_encode(Image.new("RGB", (40, 30)), "PNG"))
    # Between the limit and twice it PIL only warns: the image is decoded.
    Image.MAX_IMAGE_PIXELS = 1000
    with pytest.warns(Image.DecompressionBombWarning):
      assert decode.decode_image(_encode(Image.new("RGB", (40, 30)), "PNG")).shape == (30, 40, 3)
  finally:
    Image.MAX_IMAGE_PIXELS = limit


# ---- the pre-training pipeline over an ImageFolder holding every kind ----

def _config(batch_size, **data):
  config = recipe()
  config.batch_size = batch_size
  config.data.update(dict(source="imagefolder", shuffle=False, context_size=32,
                          exemplar_size=16, search_size=48, num_exemplars=2))
  config.data.update(data)
  return config


def _first_pass(root, **data):
  """Sample i of the unshuffled stream starts from record i: one batch = one pass."""
  source = sources.ImageFolderSource(str(root))
  config = _config(len(source), **data)
  batch = pipeline.pair_dataset(source, config.data, seed=0, batch_size=len(source),
                                shuffle=False)[0]
  return source, batch


def _bad(batch, source, path):
  i = source.paths.index(path)
  return int(batch["num_bad_records"][i]), str(batch["first_bad_record"][i])


def test_pipeline_skips_and_counts_the_undecodable_and_trains_on_the_rest(tmp_path):
  paths = write_folder(tmp_path)
  source, batch = _first_pass(tmp_path)
  assert len(source) == 3 + len(BAD_FILES) + 1  # + the dangling link; cat.jpg/ is not listed
  for kind, path in paths.items():
    num_bad, first = _bad(batch, source, path)
    if kind in SKIPPED:
      assert num_bad >= 1 and first.startswith(f"{path} ({SKIPPED[kind]}"), (kind, first)
    else:
      assert (num_bad, first) == (0, ""), (kind, first)
  # Every sample is whole, whichever record it came from.
  assert batch["context"].shape == (len(source), 32, 32, 3)
  assert np.isfinite(batch["corners"]).all()
  # The uniform odd images are what their samples show (decoded colours, not replacements).
  for kind in ("cmyk", "rgba", "gif", "webp"):
    context = batch["context"][source.paths.index(paths[kind])]
    (rgb,) = DECODED[kind][2].values()
    np.testing.assert_allclose(np.median(context.reshape(-1, 3), axis=0), rgb,
                               atol=DECODED[kind][3] + 1, err_msg=kind)


def test_tiny_and_extreme_images_are_trained_on_when_min_image_size_allows(tmp_path):
  paths = write_folder(tmp_path, kinds=["one_pixel", "sliver"], good=1)
  source, batch = _first_pass(tmp_path, min_image_size=1)
  for kind, colour in (("one_pixel", (90, 90, 10)), ("sliver", (10, 90, 90))):
    i = source.paths.index(paths[kind])
    assert _bad(batch, source, paths[kind]) == (0, ""), kind
    assert (batch["context"][i] == colour).all(), kind  # uniform image -> uniform context
    assert np.isfinite(batch["corners"][i]).all(), kind
    assert batch["corners"][i].min() >= -1e-3 and batch["corners"][i].max() <= 32 + 1e-3


def test_training_iterator_counts_and_logs_the_skips(tmp_path, caplog, monkeypatch):
  # The skip log is per process (its first LOGGED_NAMES names): leave it as other tests find it.
  monkeypatch.setattr(pipeline._SkipLog, "names", [])  # pylint: disable=protected-access
  monkeypatch.setattr(pipeline._SkipLog, "total", 0)  # pylint: disable=protected-access
  paths = write_folder(tmp_path)
  source = sources.ImageFolderSource(str(tmp_path))
  config = _config(8, root=str(tmp_path))
  before = pipeline.num_skipped()
  with caplog.at_level(logging.WARNING, logger=pipeline.__name__):
    iterator = pipeline.make_iterator(config, "train", process_index=0, process_count=1)
    batches = [next(iterator) for _ in range(4)]  # 32 samples: about 2 passes over 17 records
  train = sources.make_source(config.data, "train")
  num_bad = sum(paths[kind] in train.paths for kind in SKIPPED)
  assert len(train) == len(source) - 1  # one image held out for the pretext IoU
  assert pipeline.num_skipped() - before >= num_bad  # every bad record met at least once
  assert all(set(b) == set(pipeline.BATCH_KEYS) and b["context"].shape[0] == 8 for b in batches)
  assert "bad records skipped so far (each replaced by another record)" in caplog.text
  assert "skipped bad record " + os.path.join(str(tmp_path), CLASS) in caplog.text


def test_a_folder_of_only_undecodable_files_stops_the_run_in_one_line(tmp_path):
  """Run as a user runs it: 32 bad records in a row for one sample is broken data, exit 2."""
  write_folder(tmp_path / "imgs", kinds=list(UNDECODABLE), good=0)
  out = run(command(tmp_path, tmp_path / "w", "--config.data.source=imagefolder",
                    f"--config.data.root={tmp_path / 'imgs'}", "--config.eval.pretext_iou=false",
                    "--config.eval.knn=false", "--config.eval.visualize=false"))
  assert out.returncode == 2, out.stderr[-3000:]
  assert_clean(out.stderr)
  (line,) = error_lines(out.stderr)
  assert line.startswith(f"error: {pipeline.MAX_ATTEMPTS} bad records in a row (first: "
                         f"{tmp_path / 'imgs' / CLASS}/"), line
  assert line.endswith("the data set looks mostly unreadable"), line


def test_pretrain_without_a_workdir_is_one_line():
  """The entry point's own flag check (no other test runs it): exit 2, one line, nothing run."""
  out = subprocess.run([sys.executable, "-m", "cim_jax.pretrain", "--config=configs/demo.py"],
                       cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 2, out.stderr[-3000:]
  assert out.stderr.strip() == ("error: --workdir=DIR is required (checkpoints, logs and the "
                                "report go there)")


@pytest.mark.parametrize("override, message", [
    ("--config.batch_size=0", "config.batch_size=0 must be positive"),
    ("--config.data.min_image_size=0", "config.data.min_image_size=0 must be >= 1"),
])
def test_impossible_values_quoted_in_the_fault_matrix(override, message):
  config, _ = cli.parse([f"--config={os.path.join(REPO, 'configs', 'demo.py')}", override],
                        default_config="", flags={"workdir": ""}, validate=False)
  with pytest.raises(errors.ConfigError) as error:
    config_validation.validate(config, device_count=1)
  assert str(error.value) == message


def test_a_second_ctrl_c_stops_at_once_without_a_checkpoint(tmp_path):
  """Ctrl-C during the first step (its compilation) asks for a checkpoint after the step; a
  second one stops at once: exit 130, one error line, no checkpoint written."""
  workdir = tmp_path / "w"
  proc = subprocess.Popen(
      command(tmp_path, workdir, "--config.eval.pretext_iou=false", "--config.eval.knn=false",
              "--config.eval.visualize=false", "--config.num_train_steps=100000"),
      cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  lines = []
  reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
  reader.start()
  deadline = time.time() + 240
  # metrics.jsonl is opened just before the signal handlers go in and the first step compiles.
  while not (workdir / "metrics.jsonl").exists():
    assert proc.poll() is None and time.time() < deadline, "".join(lines)[-3000:]
    time.sleep(0.02)
  time.sleep(0.2)
  proc.send_signal(signal.SIGINT)
  while not any("SIGINT received" in line for line in lines):
    assert proc.poll() is None and time.time() < deadline, "".join(lines)[-3000:]
    time.sleep(0.02)
  proc.send_signal(signal.SIGINT)
  proc.wait(timeout=120)
  reader.join(timeout=10)
  stderr = "".join(lines)
  assert proc.returncode == 130, stderr[-3000:]
  assert_clean(stderr)
  assert error_lines(stderr) == [f"error: interrupted; {workdir} keeps its last finished "
                                 "checkpoint"], stderr[-3000:]
  assert not (workdir / "checkpoints").exists() or not [
      d for d in os.listdir(workdir / "checkpoints") if d.isdigit()]
