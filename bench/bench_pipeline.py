"""grain pipeline throughput with 0, 1, 2 worker processes, and bytes per sample (issue 3).

The embedded training photos are JPEG-encoded (quality 90) into an in-memory source, so every
sample decodes for real, then runs the full pipeline (`pipeline.make_dataset`: shuffle,
make_pair with all augmentation, batch). Worker counts are measured in interleaved rounds in
one run, so machine load affects them alike; worker start-up is excluded (warm-up batches).
Also prints the bytes one sample costs on the host -> device path with the label as 4 corners
(what the pipeline ships) vs as a uint8 (N, C, C) mask.

  python bench/bench_pipeline.py [--workers 0,1,2] [--batch 32] [--batches 12] [--rounds 2]
"""

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
  os.environ[_var] = "1"  # before numpy / cv2 load, so "per worker" is honest

import argparse
import io
import statistics
import sys
import time

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from cim_jax import config_validation  # noqa: E402
from cim_jax import geometry  # noqa: E402
from cim_jax.data import pairs, pipeline, sources  # noqa: E402

RECIPE = os.path.join(REPO, "configs", "cim_pretrain.py:Ti/16")


def embedded_jpeg_source() -> sources.EncodedSource:
  """The embedded training photos as JPEG bytes (quality 90)."""
  embedded = sources.EmbeddedSource("train")
  encoded = []
  for i in range(len(embedded)):
    buffer = io.BytesIO()
    Image.fromarray(embedded[i].data).save(buffer, format="JPEG", quality=90)
    encoded.append(buffer.getvalue())
  return sources.EncodedSource(encoded, embedded.names)


def samples_per_second(source, workers: int, batch: int, batches: int, warmup: int) -> float:
  """Throughput of the full pipeline after `warmup` batches (worker start-up excluded)."""
  config = config_validation.load_config_file(RECIPE)
  config.batch_size = batch
  config.data.num_workers = workers
  iterator = pipeline.make_iterator(config, process_index=0, process_count=1, source=source)
  for _ in range(warmup):
    next(iterator)
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  elapsed = time.perf_counter() - start
  if workers:
    iterator.close()
  return batches * batch / elapsed


def bytes_per_sample(source, batch: int) -> tuple[dict, dict]:
  """Bytes of one sample: label as corners (shipped) vs as a uint8 (N, C, C) mask."""
  config = config_validation.load_config_file(RECIPE)
  config.batch_size = batch
  sample = next(pipeline.make_iterator(config, process_index=0, process_count=1, source=source))
  images = (sample["context"].nbytes + sample["exemplars"].nbytes) / batch
  corners = sample["corners"].nbytes / batch
  masks = geometry.masks_from_corners(sample["corners"], config.data.context_size)
  masks = masks.astype(np.uint8).nbytes / batch
  return dict(label=corners, total=images + corners), dict(label=masks, total=images + masks)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workers", default="0,1,2")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--batches", type=int, default=12)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--rounds", type=int, default=2)
  args = parser.parse_args()
  workers = [int(w) for w in args.workers.split(",")]
  source = embedded_jpeg_source()
  print(f"{len(source)} embedded photos as JPEG, mean {np.mean([len(e) for e in source.encoded]) / 1e3:.0f} kB; "
        f"batch {args.batch}, {args.batches} timed batches after {args.warmup} warm-up, "
        f"{args.rounds} interleaved rounds, {os.cpu_count()} CPUs visible")
  rates = {w: [] for w in workers}
  for round_index in range(args.rounds):
    for w in workers:
      rates[w].append(samples_per_second(source, w, args.batch, args.batches, args.warmup))
      print(f"  round {round_index}: {w} workers {rates[w][-1]:7.1f} samples/s", flush=True)
  base = statistics.median(rates[workers[0]])
  print(f"\n{'workers':>8} {'samples/s (median)':>19} {'vs ' + str(workers[0]) + ' workers':>14}")
  for w in workers:
    rate = statistics.median(rates[w])
    print(f"{w:>8} {rate:>19.1f} {rate / base:>13.2f}x")

  shipped, as_mask = bytes_per_sample(source, args.batch)
  print(f"\nbytes per sample   label    whole sample (context + exemplars + label)")
  print(f"corners (shipped) {shipped['label']:>7,.0f}  {shipped['total']:>10,.0f}")
  print(f"uint8 masks       {as_mask['label']:>7,.0f}  {as_mask['total']:>10,.0f}")
  print(f"ratio masks/corners {as_mask['label'] / shipped['label']:.0f}x label, "
        f"{as_mask['total'] / shipped['total']:.2f}x whole sample")


if __name__ == "__main__":
  main()
