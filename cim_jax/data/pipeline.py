"""The grain input pipeline: source -> seed -> shuffle -> repeat -> pair -> batch.

A batch is a dict of numpy arrays, the only thing that crosses to the device:
  context (b, C, C, 3) uint8, exemplars (b, N, E, E, 3) uint8, corners (b, N, 4, 2) float32.

Determinism: every random choice of sample i comes from grain's `random_map` generator, which
depends only on (seed, i), so batches do not depend on the worker count, and the iterator
state (`get_state()` / `set_state()`, JSON) resumes exactly. Checkpoint it with
`grain.checkpoint.CheckpointSave(iterator)` / `CheckpointRestore(iterator)` inside an orbax
`args.Composite` (one JSON file per process).

Bad records (undecodable, unreadable, smaller than `data.min_image_size`) are replaced inside
the sample function by another record of the same shard, chosen by the sample's own
generator: the batch keeps its size, the result stays a function of (seed, i), and no
many-to-one `filter` is needed (grain warns that a filter before `mp_prefetch` makes output
depend on the worker count). The main process counts and logs the replacements.
"""

import logging
from typing import Any

from absl import flags
import grain
import ml_collections
import numpy as np

from cim_jax import errors
from cim_jax.data import decode
from cim_jax.data import pairs
from cim_jax.data import sources

log = logging.getLogger(__name__)

# After this many bad records in a row for one sample the data set is broken, not noisy.
MAX_ATTEMPTS = 32
# How many bad record names the log shows in full.
LOGGED_NAMES = 5
BATCH_KEYS = ("context", "exemplars", "corners")


class UnreadableDataError(errors.RunStopped, RuntimeError):
  """Nearly every record of the data set is bad: the user's data, so `error: ...`, exit 2."""
  exit_status = 2


class PairTransform(grain.transforms.RandomMap):
  """Record -> one CIM sample, replacing bad records deterministically from the same shard."""

  def __init__(self, source, shard: range, spec: pairs.PairSpec, min_image_size: int):
    self.source, self.shard, self.spec, self.min_image_size = source, shard, spec, min_image_size

  def _image(self, record: sources.ImageRecord) -> np.ndarray:
    image = sources.load_image(record)
    if min(image.shape[:2]) < self.min_image_size:
      raise decode.UndecodableImage(
          f"image {image.shape[1]}x{image.shape[0]} is smaller than min_image_size="
          f"{self.min_image_size}")
    return image

  def random_map(self, record: sources.ImageRecord, rng: np.random.Generator) -> dict[str, Any]:
    first_bad, num_bad = "", 0
    while True:
      try:
        image = self._image(record)
        break
      except decode.UndecodableImage as e:
        first_bad = first_bad or f"{record.name} ({e})"
        num_bad += 1
        if num_bad >= MAX_ATTEMPTS:
          raise UnreadableDataError(f"{MAX_ATTEMPTS} bad records in a row (first: {first_bad}); the "
                             "data set looks mostly unreadable") from None
        record = self.source[self.shard[int(rng.integers(len(self.shard)))]]
    sample = dict(pairs.make_pair(image, rng, self.spec))
    sample["num_bad_records"] = np.int32(num_bad)
    sample["first_bad_record"] = first_bad
    return sample


class _SkipLog:
  """Per-process totals of replaced records (the accounting runs in the main process)."""
  total = 0
  names: list[str] = []


def num_skipped() -> int:
  """Bad records replaced so far by the pipelines of this process."""
  return _SkipLog.total


class AccountSkips(grain.transforms.Map):
  """Removes the bad-record fields from a batch, counting them and logging the first names."""

  def map(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
    count = int(np.sum(batch.pop("num_bad_records")))
    names = [str(n) for n in batch.pop("first_bad_record") if n]
    if count:
      before = _SkipLog.total
      _SkipLog.total += count
      for name in names[:max(0, LOGGED_NAMES - len(_SkipLog.names))]:
        _SkipLog.names.append(name)
        log.warning("skipped bad record %s", name)
      # Log the running count at powers of two: visible, but bounded on a noisy data set.
      if (_SkipLog.total).bit_length() > before.bit_length():
        log.warning("%d bad records skipped so far (each replaced by another record)",
                    _SkipLog.total)
    # Arrays from worker processes live in grain's shared memory, which is unlinked and reused
    # after the batch or its iterator is released; a plain copy is safe to keep (about 1% of
    # the time it took to make the batch).
    return {k: v if type(v) is np.ndarray else np.array(v) for k, v in batch.items()}


def _process_seed(seed: int, process_index: int) -> int:
  """Distinct, reproducible seeds per process, so shards do not share crop parameters."""
  return int(np.random.SeedSequence([seed, process_index]).generate_state(1)[0])


def pair_dataset(source, data: ml_collections.ConfigDict, *, seed: int, batch_size: int,
                 process_index: int = 0, process_count: int = 1, shuffle: bool = True,
                 repeat: bool = True) -> grain.MapDataset:
  """This process's batched MapDataset of CIM samples (infinite when repeat)."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must lie in [0, {process_count})")
  ds = grain.MapDataset.source(source)
  num_records = len(source) if data.num_images <= 0 else min(data.num_images, len(source))
  # Per-process shard: records process_index, process_index + count, ... (disjoint, covering).
  shard = range(process_index, num_records, process_count)
  if not shard:
    raise ValueError(f"process {process_index} of {process_count} gets no records from "
                     f"{source!r} ({num_records} records)")
  ds = ds[shard.start:shard.stop:shard.step].seed(_process_seed(seed, process_index))
  if shuffle:
    ds = ds.shuffle()
  if repeat:
    ds = ds.repeat()
  ds = ds.random_map(PairTransform(source, shard, pairs.PairSpec.from_config(data),
                                   data.min_image_size))
  return ds.batch(batch_size, drop_remainder=True)


def _process_index_and_count(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index, process_count = jax.process_index(), jax.process_count()
  return process_index, process_count


def _init_worker(worker_index: int, worker_count: int) -> None:
  """One OpenCV thread per worker: parallelism comes from the workers, not W x cores threads."""
  del worker_index, worker_count
  import cv2  # pylint: disable=g-import-not-at-top
  cv2.setNumThreads(1)


def make_dataset(config: ml_collections.ConfigDict, split: str = "train", *,
                 process_index: int | None = None, process_count: int | None = None,
                 source=None) -> grain.IterDataset:
  """The per-process IterDataset of training batches (size config.batch_size / processes)."""
  process_index, process_count = _process_index_and_count(process_index, process_count)
  if config.batch_size % process_count:
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the "
                     f"{process_count} processes")
  data = config.data
  source = sources.make_source(data, split) if source is None else source
  ds = pair_dataset(source, data, seed=config.seed,
                    batch_size=config.batch_size // process_count,
                    process_index=process_index, process_count=process_count,
                    shuffle=data.shuffle)
  # One thread per process keeps the prefetch buffer (whole batches) small; parallelism
  # comes from worker processes.
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
  return in_workers(ds, data).map(AccountSkips())


def in_workers(ds: grain.IterDataset, data: ml_collections.ConfigDict) -> grain.IterDataset:
  """`ds` run in data.num_workers grain worker processes (0: as it is, in this process)."""
  if data.num_workers <= 0:
    return ds
  # grain's worker start-up reads its absl flags; our entry points parse flags themselves
  # (cim_jax.cli), so absl's defaults are declared final here.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return ds.mp_prefetch(grain.MultiprocessingOptions(
      num_workers=data.num_workers, per_worker_buffer_size=data.worker_buffer_size),
      worker_init_fn=_init_worker)


def make_iterator(config: ml_collections.ConfigDict, split: str = "train",
                  **kwargs) -> grain.DatasetIterator:
  """Iterator over `make_dataset` batches; its state goes into the checkpoint."""
  return iter(make_dataset(config, split, **kwargs))


def heldout_pairs(config: ml_collections.ConfigDict, num_pairs: int | None = None, *,
                  seed: int = 0, source=None) -> dict[str, np.ndarray]:
  """A fixed list of held-out samples (the same for every run with this data config)."""
  num_pairs = config.eval.num_heldout_pairs if num_pairs is None else num_pairs
  source = sources.make_source(config.data, "heldout") if source is None else source
  data = ml_collections.ConfigDict(config.data.to_dict())
  data.num_images = 0
  ds = pair_dataset(source, data, seed=seed, batch_size=num_pairs, shuffle=False)
  return AccountSkips().map(ds[0])
