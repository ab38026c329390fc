"""The grain pipeline: batch contract, determinism, resumable state, shards, bad input."""

import io
import logging
import os

import grain
import numpy as np
import pytest
from PIL import Image

from cim_jax import geometry
from cim_jax.data import pipeline
from cim_jax.data import sources
from train_fixtures import recipe

FIXTURE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "tfds")


def _config(batch_size=4, **data):
  config = recipe()
  config.batch_size = batch_size
  config.data.update(data)
  return config


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _colour(i):
  return (20 * i + 10, 245 - 20 * i, 128)


def _png(colour, size=(96, 80), mode="RGB"):
  buffer = io.BytesIO()
  Image.new(mode, size, colour).save(buffer, "PNG")
  return buffer.getvalue()


def _colour_source(n):
  """n uniform images; a sample's record is recovered from its context colour."""
  return sources.EncodedSource([_png(_colour(i)) for i in range(n)])


def _record_of(context):
  r = int(np.rint(np.median(context[..., 0])))
  return (r - 10) // 20


def test_batches_follow_the_contract():
  config = _config()
  batch = next(pipeline.make_iterator(config, process_index=0, process_count=1))
  d = config.data
  assert sorted(batch) == sorted(pipeline.BATCH_KEYS)
  assert batch["context"].shape == (4, d.context_size, d.context_size, 3)
  assert batch["exemplars"].shape == (4, d.num_exemplars, d.exemplar_size, d.exemplar_size, 3)
  assert batch["corners"].shape == (4, d.num_exemplars, 4, 2)
  assert batch["context"].dtype == batch["exemplars"].dtype == np.uint8
  assert batch["corners"].dtype == np.float32
  assert np.all(batch["corners"] >= -1e-3) and np.all(batch["corners"] <= d.context_size + 1e-3)
  assert batch["context"].std() > 10  # photos, not blank images


def test_same_seed_same_batches_other_seed_different():
  first = _take(pipeline.make_iterator(_config(), process_index=0, process_count=1), 3)
  again = _take(pipeline.make_iterator(_config(), process_index=0, process_count=1), 3)
  _assert_same(first, again)
  other = _config()
  other.seed = 1
  changed = _take(pipeline.make_iterator(other, process_index=0, process_count=1), 1)[0]
  assert not np.array_equal(changed["corners"], first[0]["corners"])


def test_iterator_state_restores_the_exact_continuation(tmp_path):
  config = _config(batch_size=2, num_images=5)  # 5 images: the resume crosses an epoch
  iterator = pipeline.make_iterator(config, process_index=0, process_count=1)
  _take(iterator, 3)
  # The path the training loop uses: grain's orbax CheckpointHandler, one JSON per process.
  handler = grain.checkpoint.CheckpointHandler()
  handler.save(tmp_path, args=grain.checkpoint.CheckpointSave(iterator))
  expected = _take(iterator, 3)
  fresh = pipeline.make_iterator(config, process_index=0, process_count=1)
  restored = handler.restore(tmp_path, args=grain.checkpoint.CheckpointRestore(fresh))
  _assert_same(_take(restored, 3), expected)


def test_shards_are_disjoint_and_cover_the_source():
  num_records, count = 10, 3
  source = _colour_source(num_records)
  config = _config()
  seen = []
  for index in range(count):
    ds = pipeline.pair_dataset(source, config.data, seed=0, batch_size=1, process_index=index,
                               process_count=count, repeat=False)
    records = [_record_of(ds[i]["context"][0]) for i in range(len(ds))]
    assert len(records) == len(set(records))  # one epoch sees each shard record once
    seen.append(set(records))
  assert sum(len(s) for s in seen) == num_records
  assert set.union(*seen) == set(range(num_records))
  # Processes use different random crops for their records, not a shared stream.
  configs = [pipeline.pair_dataset(source, config.data, seed=0, batch_size=1, process_index=i,
                                   process_count=2)[0]["corners"] for i in range(2)]
  assert not np.array_equal(*configs)


def test_num_images_limits_the_records():
  config = _config(batch_size=8, num_images=3)
  ds = pipeline.pair_dataset(_colour_source(10), config.data, seed=0, batch_size=8)
  records = {_record_of(c) for i in range(3) for c in ds[i]["context"]}
  assert records == {0, 1, 2}


def test_batch_size_must_split_over_processes():
  with pytest.raises(ValueError, match="batch_size=4 is not divisible by the 3 processes"):
    pipeline.make_dataset(_config(), process_index=0, process_count=3)


def _write_bad_files(folder):
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "zero.jpg").write_bytes(b"")
  (folder / "text.png").write_text("not an image\n" * 20)
  noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(noise).save(buffer, "JPEG")
  (folder / "truncated.jpg").write_bytes(buffer.getvalue()[:-700])
  (folder / "tiny.png").write_bytes(_png((1, 2, 3), size=(4, 4)))
  return ["zero.jpg", "text.png", "truncated.jpg", "tiny.png"]


def test_bad_records_are_replaced_counted_and_logged(tmp_path, caplog):
  for i in range(3):
    (tmp_path / "good").mkdir(parents=True, exist_ok=True)
    (tmp_path / "good" / f"g{i}.png").write_bytes(_png(_colour(i)))
  bad_names = _write_bad_files(tmp_path / "bad")
  config = _config(batch_size=8, source="imagefolder", root=str(tmp_path))
  before = pipeline.num_skipped()
  with caplog.at_level(logging.WARNING, logger=pipeline.__name__):
    batches = _take(pipeline.make_iterator(config, process_index=0, process_count=1), 4)
  # Every sample is a full, real sample from a good image; 4 of 7 records are bad.
  for batch in batches:
    assert batch["context"].shape[0] == 8
    assert {_record_of(c) for c in batch["context"]} <= {0, 1, 2}
  skipped = pipeline.num_skipped() - before
  assert skipped >= 8  # 32 samples from 7 records of which 4 are bad
  logged = " ".join(r.getMessage() for r in caplog.records)
  assert any(name in logged for name in bad_names)
  assert "bad records skipped so far" in logged
  again = _take(pipeline.make_iterator(config, process_index=0, process_count=1), 4)
  _assert_same(batches, again)  # the replacement is deterministic


def test_convertible_images_are_used_not_skipped(tmp_path):
  folder = tmp_path / "c"
  folder.mkdir()
  Image.new("L", (70, 90), 80).save(folder / "grey.png")
  Image.new("RGB", (90, 70), (9, 99, 199)).convert("P", palette=Image.Palette.ADAPTIVE).save(
      folder / "palette.png")
  Image.new("RGBA", (90, 70), (200, 0, 0, 128)).save(folder / "rgba.png")
  Image.new("CMYK", (90, 70), (0, 255, 0, 0)).save(folder / "cmyk.jpg")
  Image.fromarray(np.full((70, 90), 3000, np.uint16)).save(folder / "deep.png")
  exif = Image.Exif()
  exif[0x0112] = 6
  Image.new("RGB", (90, 70), (30, 60, 90)).save(folder / "rotated.jpg", exif=exif)
  config = _config(batch_size=6, source="imagefolder", root=str(tmp_path), shuffle=False)
  before = pipeline.num_skipped()
  batch = next(pipeline.make_iterator(config, process_index=0, process_count=1))
  assert pipeline.num_skipped() == before
  assert batch["context"].shape[0] == 6


def test_a_mostly_unreadable_data_set_fails_with_a_clear_error(tmp_path):
  _write_bad_files(tmp_path / "bad")
  config = _config(batch_size=2, source="imagefolder", root=str(tmp_path))
  with pytest.raises(RuntimeError, match="bad records in a row"):
    next(pipeline.make_iterator(config, process_index=0, process_count=1))


def test_tfds_fixture_feeds_the_pipeline():
  config = _config(batch_size=3, source="tfds", tfds_name="cim_tiny_photos",
                   tfds_data_dir=FIXTURE_DIR)
  batch = next(pipeline.make_iterator(config, process_index=0, process_count=1))
  assert batch["context"].shape == (3, 160, 160, 3) and batch["context"].std() > 10


def test_heldout_pairs_are_fixed():
  config = _config()
  first = pipeline.heldout_pairs(config, 5)
  _assert_same([first], [pipeline.heldout_pairs(config, 5)])
  assert first["exemplars"].shape[:2] == (5, config.data.num_exemplars)
  # Different from the training stream's images: the held-out photos are not in training.
  train_means = {round(float(sources.EmbeddedSource("train")[i].data.mean()), 3)
                 for i in range(len(sources.EmbeddedSource("train")))}
  heldout = sources.EmbeddedSource("heldout")
  assert not {round(float(heldout[i].data.mean()), 3) for i in range(len(heldout))} & train_means


@pytest.mark.slow
def test_worker_counts_give_identical_batches_and_state():
  batches = {}
  for workers in (0, 1, 2):
    config = _config(batch_size=3, num_workers=workers)
    iterator = pipeline.make_iterator(config, process_index=0, process_count=1)
    batches[workers] = _take(iterator, 4)
    if workers == 2:
      state = iterator.get_state()
      expected = _take(iterator, 2)
      iterator.close()
      resumed = pipeline.make_iterator(config, process_index=0, process_count=1)
      resumed.set_state(state)
      _assert_same(_take(resumed, 2), expected)
      resumed.close()
    elif workers:
      iterator.close()
  _assert_same(batches[0], batches[1])
  _assert_same(batches[0], batches[2])


def test_pair_grid_draws_each_label_on_the_context():
  from cim_jax.tools import show_pairs  # pylint: disable=g-import-not-at-top
  batch = pipeline.heldout_pairs(_config(), 2)
  grid = show_pairs.pair_grid(batch)
  size, n = 160, batch["exemplars"].shape[1]
  assert grid.shape == (2 * 2 * size, (1 + n) * size, 3) and grid.dtype == np.uint8
  masks = geometry.masks_from_corners(batch["corners"], size)
  context = batch["context"][1]
  for k in range(n):
    cell = grid[3 * size:4 * size, (1 + k) * size:(2 + k) * size]  # sample 1, bottom row
    edge = show_pairs._edges(masks[1, k])  # pylint: disable=protected-access
    assert edge.any()
    assert np.all(cell[edge] == show_pairs.PALETTE[k])
    outside = ~masks[1, k]
    np.testing.assert_array_equal(cell[outside], context[outside])
    assert not np.array_equal(cell[masks[1, k] & ~edge], context[masks[1, k] & ~edge])


def test_show_pairs_command_reads_an_image_folder(tmp_path, capsys):
  from cim_jax.tools import show_pairs  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  (tmp_path / "imgs" / "a").mkdir(parents=True)
  for i in range(2):
    (tmp_path / "imgs" / "a" / f"{i}.png").write_bytes(_png(_colour(i), size=(200, 150)))
  out = tmp_path / "pairs.png"
  args = [f"--config={root}/configs/demo.py", f"--out={out}", "--num=2",
          "--config.data.source=imagefolder", f"--config.data.root={tmp_path / 'imgs'}"]
  show_pairs.main(args)
  grid = np.asarray(Image.open(out))
  assert grid.shape == (2 * 2 * 160, 7 * 160, 3)
  assert {_record_of(grid[:160, :160]), _record_of(grid[320:480, :160])} <= {0, 1}
  (tmp_path / "empty").mkdir()
  with pytest.raises(SystemExit) as exit_info:
    show_pairs.main(args[:-1] + [f"--config.data.root={tmp_path / 'empty'}"])
  assert exit_info.value.code == 2
  assert "no image files" in capsys.readouterr().err
