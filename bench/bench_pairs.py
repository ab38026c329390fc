"""CIM pair generation vs plain RandomResizedCrop, single process, one thread (issue 3).

(a) decode + make_pair (context, N exemplars with all photometric augmentation, corners)
(b) decode + RandomResizedCrop(224) + flip, with the same decoder and the same resize helper.
(c) for reference, when torchvision is installed: PIL decode + torchvision's RandomResizedCrop.
All run interleaved in one process on the same embedded photos encoded as JPEG (quality 90),
so machine load affects them alike, in two malloc regimes (see main). Prints samples/s per core
(CPU time of this single-threaded process) and per wall second, the ratio (a)/(b) (target
>= 0.7), the per-stage cost of (a), and the image quality of (a)'s resampling.

  python bench/bench_pairs.py [--rounds 7] [--samples 150] [--exemplar_geometry release]
      [--compare_geometry]  (adds (d): (a) with the other exemplar geometry, interleaved)
"""

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
  os.environ[_var] = "1"  # before numpy / cv2 load, so "per core" is honest

import argparse
import dataclasses
import io
import statistics
import sys
import time

import cv2
import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from cim_jax import config_validation  # noqa: E402
from cim_jax.data import pairs  # noqa: E402
from cim_jax.data.decode import decode_image  # noqa: E402

RECIPE = os.path.join(REPO, "configs", "cim_pretrain.py:Ti/16")


def embedded_jpegs() -> list[bytes]:
  """The photos shipped with scikit-image and scikit-learn, JPEG-encoded at quality 90."""
  import skimage.data
  from sklearn.datasets import load_sample_images
  images = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(),
            skimage.data.rocket(), *load_sample_images().images]
  encoded = []
  for image in images:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    encoded.append(buffer.getvalue())
  return encoded


def plain_rrc(data: bytes, rng: np.random.Generator, spec: pairs.PairSpec) -> np.ndarray:
  """(b): decode + RandomResizedCrop + flip, the same helpers make_pair uses for its search."""
  image = decode_image(data)
  u = rng.random(2 * 10 + 3)
  crop = pairs.sample_crop(image.shape[0], image.shape[1], u, spec.search_scale,
                           spec.search_ratio)
  return pairs.search_image(image, crop, spec.search_size, bool(u[-1] < spec.search_flip_prob))


def torchvision_rrc():
  """(c), for reference only: PIL decode + torchvision RandomResizedCrop + flip, if installed."""
  try:
    import torch
    from torchvision import transforms
  except ImportError:
    return None
  torch.set_num_threads(1)
  transform = transforms.Compose([
      transforms.RandomResizedCrop(224, scale=(0.5, 1.0),
                                   interpolation=transforms.InterpolationMode.BICUBIC),
      transforms.RandomHorizontalFlip()])

  def run(data: bytes, rng, spec) -> Image.Image:
    del rng, spec  # torchvision draws from torch's global generator
    with Image.open(io.BytesIO(data)) as image:
      return transform(image.convert("RGB"))
  return run


def cim_pair(data: bytes, rng: np.random.Generator, spec: pairs.PairSpec) -> dict:
  """(a): decode + the full CIM sample."""
  return pairs.make_pair(decode_image(data), rng, spec)


def other_geometry(spec: pairs.PairSpec):
  """(d): (a) with the other data.exemplar_geometry."""
  other, = (g for g in pairs.EXEMPLAR_GEOMETRIES if g != spec.exemplar_geometry)
  other_spec = dataclasses.replace(spec, exemplar_geometry=other)

  def run(data: bytes, rng: np.random.Generator, spec: pairs.PairSpec) -> dict:
    del spec  # (a)'s
    return pairs.make_pair(decode_image(data), rng, other_spec)
  return run


def staged_pair(data: bytes, rng: np.random.Generator, spec: pairs.PairSpec,
                clock: dict) -> dict:
  """(a) with the CPU time of each stage added to clock."""
  last = [time.process_time()]

  def lap(stage: str) -> None:
    now = time.process_time()
    clock[stage] = clock.get(stage, 0.0) + now - last[0]
    last[0] = now

  image = decode_image(data)
  lap("decode")
  return pairs._generate(image, rng, spec, lap)[0]


def rate(fn, jpegs, rng, spec, samples: int) -> tuple[float, float]:
  """(samples per CPU second of this process, samples per wall second)."""
  cpu, wall = time.process_time(), time.perf_counter()
  for k in range(samples):
    fn(jpegs[k % len(jpegs)], rng, spec)
  return samples / (time.process_time() - cpu), samples / (time.perf_counter() - wall)


def _warp(image: np.ndarray, dst_to_src: np.ndarray, size: int, supersample: int = 1):
  """Bilinear warp (edge-coordinate dst -> src affine), optionally supersampled + box filtered."""
  fine = dst_to_src.copy()
  fine[:, :2] /= supersample
  fine[:, 2] += fine[:, :2].sum(1) * 0.5 - 0.5  # cv2 pixel-index convention
  out = cv2.warpAffine(image, fine, (size * supersample,) * 2,
                       flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                       borderMode=cv2.BORDER_REPLICATE)
  return cv2.resize(out, (size, size), interpolation=cv2.INTER_AREA) if supersample > 1 else out


def _compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
  return np.concatenate([outer[:, :2] @ inner[:, :2],
                         outer[:, :2] @ inner[:, 2:] + outer[:, 2:]], 1)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
  mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
  return 10 * np.log10(255.0**2 / max(mse, 1e-10))


def quality(jpegs, spec: pairs.PairSpec, samples: int) -> None:
  """PSNR against an alias-free reference (16x supersampled warp of the original).

  Compares make_pair (2x box-filter halvings + mip levels) with the naive alternative of one
  bilinear cv2.warpAffine per output straight from the original (no prefilter), and the time
  each needs for the same geometry (photometric off, no decode; ours includes its sampling).
  """
  spec = spec.without_photometric()
  s, c, e = spec.search_size, spec.context_size, spec.exemplar_size
  scores = {"ours": [], "naive": []}
  times = {"ours": 0.0, "naive": 0.0}
  images = [decode_image(j) for j in jpegs]
  for k in range(samples):
    image = images[k % len(images)]
    clock = {}
    pair = staged_pair(jpegs[k % len(jpegs)], np.random.default_rng(k), spec, clock)
    _, geometry = pairs.make_pair_and_geometry(image, np.random.default_rng(k), spec)
    times["ours"] += clock["crop + context"] + clock["exemplar boxes + warps + corners"]
    start = time.process_time()
    to_original = geometry.search_to_original
    context_affine = _compose(to_original, np.array([[s / c, 0, 0], [0, s / c, 0]]))
    exemplar_affines = [_compose(to_original, a) for a in geometry.exemplar_to_search]
    naive = [_warp(image, context_affine, c)] + [_warp(image, a, e) for a in exemplar_affines]
    times["naive"] += time.process_time() - start
    ours = [pair["context"], *pair["exemplars"]]
    reference = [_warp(image, context_affine, c, 16)] + [
        _warp(image, a, e, 16) for a in exemplar_affines]
    scores["ours"].append([_psnr(x, r) for x, r in zip(ours, reference)])
    scores["naive"].append([_psnr(x, r) for x, r in zip(naive, reference)])
  print(f"quality vs a 16x supersampled reference, PSNR dB (higher is better), {samples} pairs:")
  for name, label in (("ours", "make_pair (halvings + mip levels)"),
                      ("naive", "one bilinear warpAffine from the original")):
    values = np.array(scores[name])
    print(f"  {label:42s} context {values[:, 0].mean():5.1f}  exemplars "
          f"{values[:, 1:].mean():5.1f}   {times[name] / samples * 1e6:5.0f} us/pair CPU")


def retain_heap() -> None:
  """Keeps freed memory in the heap (no trimming, no per-buffer mmap) via glibc's mallopt."""
  import ctypes
  libc = ctypes.CDLL("libc.so.6")
  m_trim_threshold, m_mmap_threshold = -1, -3
  libc.mallopt(m_mmap_threshold, 64 << 20)
  libc.mallopt(m_trim_threshold, 256 << 20)


NAMES = {"a": "(a) decode + CIM pair (context, exemplars, photometric, corners)",
         "b": "(b) decode + RandomResizedCrop + flip (same decoder and resize)",
         "c": "(c) reference: PIL decode + torchvision RandomResizedCrop + flip",
         "d": "(d) (a) with the other data.exemplar_geometry"}


def measure(runners: dict, jpegs, rng, spec, args, regime: str) -> None:
  """Interleaved rounds of every runner, then the per-stage CPU cost of (a)."""
  load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
  for fn in runners.values():  # warm-up
    rate(fn, jpegs, rng, spec, 20)
  rates = {key: [] for key in runners}
  for _ in range(args.rounds):  # interleaved so all see the same load
    for key, fn in runners.items():
      rates[key].append(rate(fn, jpegs, rng, spec, args.samples))
  print(f"\n== {regime}; load average {load}")
  for clock_name, column in (("CPU time (per core)", 0), ("wall time", 1)):
    print(f"{clock_name}:")
    for key in rates:
      values = [r[column] for r in rates[key]]
      print(f"  {NAMES[key]:66s} {statistics.median(values):6.1f} samples/s "
            f"(min {min(values):.1f}, max {max(values):.1f})")
    ratios = [a[column] / b[column] for a, b in zip(rates["a"], rates["b"])]
    print(f"  ratio (a)/(b): median {statistics.median(ratios):.3f} "
          f"(per round {', '.join(f'{r:.2f}' for r in ratios)}); target >= 0.7")
    for other in ("c", "d"):
      if other in rates:
        ratios = [a[column] / o[column] for a, o in zip(rates["a"], rates[other])]
        print(f"  ratio (a)/({other}): median {statistics.median(ratios):.3f}")
  clock = {}
  count = args.samples * 2
  for k in range(count):
    staged_pair(jpegs[k % len(jpegs)], rng, spec, clock)
  total = sum(clock.values())
  print(f"(a) CPU breakdown over {count} samples (us/sample):")
  for name, seconds in clock.items():
    print(f"  {name:34s} {seconds / count * 1e6:8.1f}  ({seconds / total:5.1%})")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--samples", type=int, default=150, help="samples per block")
  parser.add_argument("--quality_samples", type=int, default=60, help="0 skips the PSNR check")
  parser.add_argument("--compare_geometry", action="store_true",
                      help="also run (d): (a) with the other exemplar geometry, interleaved")
  parser.add_argument("--exemplar_geometry", choices=pairs.EXEMPLAR_GEOMETRIES,
                      default=config_validation.load_config_file(RECIPE).data.exemplar_geometry,
                      help="data.exemplar_geometry of (a) (default: the config default)")
  args = parser.parse_args()
  cv2.setNumThreads(1)
  spec = pairs.PairSpec(exemplar_geometry=args.exemplar_geometry)
  jpegs = embedded_jpegs()
  rng = np.random.default_rng(0)

  sizes = sorted({decode_image(j).shape for j in jpegs})
  print(f"images: {len(jpegs)} JPEGs q90, shapes {sizes}; 1 thread; {args.rounds} rounds x "
        f"{args.samples} samples per runner, interleaved; exemplar_geometry "
        f"{spec.exemplar_geometry!r}")
  # glibc's default malloc returns the decoder's ~1 MB buffers to the OS and faults them back
  # in on every image; importing grain (as the pipeline does) or torch keeps them instead, and
  # decoding gets ~2x faster. Both regimes, the default one first (before torch is imported).
  runners = {"a": cim_pair, "b": plain_rrc}
  if args.compare_geometry:
    runners["d"] = other_geometry(spec)
  measure(dict(runners), jpegs, rng, spec, args,
          "glibc malloc defaults (decode buffers page-faulted in per image)")
  retain_heap()
  if torchvision_rrc() is not None:
    runners["c"] = torchvision_rrc()
  measure(runners, jpegs, rng, spec, args,
          "heap retained (mallopt; as in a process that imported grain or torch)")

  if args.quality_samples:
    quality(jpegs, spec, args.quality_samples)


if __name__ == "__main__":
  main()
