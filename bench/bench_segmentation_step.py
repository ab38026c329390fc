"""UperNet segmentation train-step speed: ours (jitted, donated) vs the same model in PyTorch.

  python bench/bench_segmentation_step.py                      # ViT-B/16, 512x512, batch 2, CPU
  python bench/bench_segmentation_step.py --variant=Mu/16 --size=128 --steps=2

Ours is the trainer's own jitted step (`cim_jax.train.segmentation.build_trainer` on
configs/cim_segment.py: AdamW with layer decay, the poly schedule, BatchNorm statistics). PyTorch
runs the same model (ours copied into tests/torch_upernet.py's restatement) with AdamW. Both
train with dropout and drop path on, one optimizer step per batch on the decode + 0.4 x
auxiliary cross-entropy. Rounds alternate ours / PyTorch so that load from other processes on a
shared machine hits both; compare the ratio within one run. --threads pins the process to that
many cores (XLA sizes its thread pool by them) and sets torch.set_num_threads. By default XLA runs
as the trainer runs it (no XLA_FLAGS of ours). --onednn adds
--xla_cpu_experimental_onednn_custom_call=true to XLA_FLAGS: XLA:CPU then runs the matmuls of
the CPU conv forms (conv_impl 'auto': Winograd or matmul, see models/upernet.py) through oneDNN,
as PyTorch does; export the same XLA_FLAGS to train that way on a CPU.
"""

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

# The CPU client (and its thread pool) starts at the first computation, after --threads pins us.
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

# pylint: disable=g-import-not-at-top,wrong-import-position
from cim_jax import config_validation
from cim_jax import sharding
from cim_jax.models import cim
from cim_jax.models import upernet
from cim_jax.models import vit
from cim_jax.train import schedules
from cim_jax.train import segmentation


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variant", default="B/16")
  parser.add_argument("--size", type=int, default=512, help="square crop size")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--classes", type=int, default=150)
  parser.add_argument("--steps", type=int, default=2, help="timed steps per round and side")
  parser.add_argument("--rounds", type=int, default=2, help="alternating ours / PyTorch rounds")
  parser.add_argument("--threads", type=int, default=2, help="CPU cores for both sides")
  parser.add_argument("--conv_impl", default="auto", help="segmentation.conv_impl of our model")
  parser.add_argument("--onednn", action=argparse.BooleanOptionalAction, default=False,
                      help="XLA:CPU matmuls through oneDNN (no effect on other backends)")
  parser.add_argument("--no_torch", action="store_true", help="time ours only")
  return parser.parse_args(argv)


def set_xla_flags(onednn: bool):
  """Read when the backend starts, so before the first computation."""
  if onednn:
    flag = "--xla_cpu_experimental_onednn_custom_call=true"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()


def pin_threads(threads: int):
  """Both sides use `threads` cores: affinity for XLA's pool (set before jax starts), torch's
  own setting."""
  available = sorted(os.sched_getaffinity(0))
  if threads < len(available):
    os.sched_setaffinity(0, available[:threads])


def trainer_config(args):
  """configs/cim_segment.py's recipe at the bench's size, batch, classes and conv form."""
  config = config_validation.load_config_file(os.path.join(REPO, "configs", "cim_segment.py"))
  config.model.variant = args.variant  # the recipe is ViT-B's; a smaller ViT for quick runs
  config.segmentation.feature_blocks = upernet.feature_blocks(
      vit.decode_variant(args.variant)["depth"])
  config.data.crop_size = args.size
  config.data.num_classes = args.classes
  config.batch_size = args.batch
  config.segmentation.conv_impl = args.conv_impl
  return config


def main(argv=None):
  args = parse_args(argv)
  pin_threads(args.threads)
  set_xla_flags(args.onednn)

  config = trainer_config(args)
  trainer = segmentation.build_trainer(config, args.classes, sharding.make_mesh(1),
                                       schedules.step_counts(config, None))
  model, size, batch_size = trainer.model, args.size, args.batch
  print(f"{args.variant} UperNet {size}x{size} batch {batch_size}, {args.classes} classes, "
        f"{args.threads} threads, conv_impl {args.conv_impl}, XLA_FLAGS "
        f"{os.environ.get('XLA_FLAGS', '')!r}; {jax.devices()[0].device_kind}. "
        "Shared machine: compare the ratio within one run.", flush=True)
  state = trainer.init_state(jax.random.key(0))
  variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
  labels = rng.integers(0, args.classes, (batch_size, size, size)).astype(np.uint8)
  labels[rng.random(labels.shape) < 0.1] = upernet.IGNORE_INDEX
  batch = sharding.global_batch({"image": images, "label": labels}, trainer.batch_sharding)
  key = jax.random.key(1)

  def run_jax(steps):
    """The trainer's own jitted step (state donated), as `python -m cim_jax.segment` runs it."""
    nonlocal state
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = trainer.train_step(state, batch, key)
    metrics["loss"].block_until_ready()
    return (time.perf_counter() - start) / steps

  torch_step = None
  if not args.no_torch:
    import torch  # pylint: disable=g-import-not-at-top
    import torch_upernet  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    reference = torch_upernet.load_flax_variables(torch_upernet.TorchSegmenter(model), variables)
    torch_step = torch_upernet.make_step(reference)
    torch_images = torch.from_numpy(np.array(cim.normalize_images(images))).permute(0, 3, 1, 2)
    torch_images = torch_images.contiguous()
    torch_labels = torch.from_numpy(labels.astype(np.int64))

    def run_torch(steps):
      start = time.perf_counter()
      for _ in range(steps):
        torch_step(torch_images, torch_labels)
      return (time.perf_counter() - start) / steps

  start = time.perf_counter()
  run_jax(1)
  print(f"ours: compile + first step {time.perf_counter() - start:.1f} s", flush=True)
  if torch_step is not None:
    print(f"torch: first step {run_torch(1):.2f} s", flush=True)
  ours_times, torch_times = [], []
  for round_index in range(args.rounds):
    ours_times.append(run_jax(args.steps))
    line = f"round {round_index}: ours {ours_times[-1]:.2f} s/step"
    if torch_step is not None:
      torch_times.append(run_torch(args.steps))
      line += f", torch {torch_times[-1]:.2f} s/step, ratio {ours_times[-1] / torch_times[-1]:.3f}"
    print(line, flush=True)
  best = min(ours_times)
  summary = f"best: ours {best:.2f} s/step"
  if torch_times:
    fastest = min(torch_times)
    summary += f", torch {fastest:.2f} s/step, ratio ours/torch {best / fastest:.3f}"
  print(summary, flush=True)


if __name__ == "__main__":
  main()
