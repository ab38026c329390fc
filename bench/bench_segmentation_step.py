"""UperNet segmentation train-step speed: ours (jitted, donated) vs the same model in PyTorch.

  python bench/bench_segmentation_step.py                      # ViT-B/16, 512x512, batch 2, CPU
  python bench/bench_segmentation_step.py --variant=Mu/16 --size=128 --steps=2

Both sides start from the same weights (ours copied into tests/torch_upernet.py's restatement),
train with dropout and drop path on, and take one AdamW step per batch on the decode + 0.4 x
auxiliary cross-entropy. Rounds alternate ours / PyTorch so that load from other processes on a
shared machine hits both; compare the ratio within one run. --threads pins the process to that
many cores (XLA sizes its thread pool by them) and sets torch.set_num_threads. --onednn (default
on the CPU) adds --xla_cpu_experimental_onednn_custom_call=true to XLA_FLAGS: XLA:CPU then runs
the matmuls of conv_impl 'split_grad' (the CPU default) through oneDNN, as PyTorch does; measured
on a 2-core shared CPU the 3x3 2048->512 conv at 64x64 (forward + backward) went from 1.6x
PyTorch's time to 1.0x with it. It slows conv_impl 'xla' down.
"""

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

# The CPU client (and its thread pool) starts at the first computation, after --threads pins us.
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import ml_collections  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import optax  # pylint: disable=g-import-not-at-top,wrong-import-position

from cim_jax.models import cim, upernet  # pylint: disable=g-import-not-at-top,wrong-import-position


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
  parser.add_argument("--onednn", action=argparse.BooleanOptionalAction, default=True,
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


def configs(args):
  model = ml_collections.ConfigDict(dict(
      variant=args.variant, dtype="float32", drop_path_rate=0.1, mlp_ratio=4.0, pos_embed_grid=14,
      remat=False, attention_impl="", approximate_gelu=False))
  seg = ml_collections.ConfigDict(dict(channels=512, pool_scales=(1, 2, 3, 6), aux_channels=256,
                                       aux_weight=0.4, dropout=0.1, feature_blocks=(),
                                       conv_impl=args.conv_impl))
  return model, seg


def make_jax_step(model, optimizer, aux_weight: float = 0.4):
  """Jitted (params, batch_stats, opt_state, batch, rng) -> (params, batch_stats, opt_state,
  loss), state donated; batch = {'image': uint8 (B, S, S, 3), 'label': uint8 (B, S, S)}."""
  def step(params, batch_stats, opt_state, batch, rng):
    def loss_fn(params):
      images = cim.normalize_images(batch["image"])
      (logits, intermediates), updates = model.apply(
          {"params": params, "batch_stats": batch_stats}, images, train=True,
          rngs={"dropout": rng}, mutable=["batch_stats"])
      loss, _ = upernet.segmentation_loss(logits, intermediates["aux_logits"], batch["label"],
                                          aux_weight=aux_weight)
      return loss, updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1, 2))


def main(argv=None):
  args = parse_args(argv)
  pin_threads(args.threads)
  set_xla_flags(args.onednn)

  model_config, seg_config = configs(args)
  model = upernet.build_segmenter(model_config, seg_config, args.classes)
  size, batch_size = args.size, args.batch
  print(f"{args.variant} UperNet {size}x{size} batch {batch_size}, {args.classes} classes, "
        f"{args.threads} threads, conv_impl {model.conv_impl}, XLA_FLAGS "
        f"{os.environ.get('XLA_FLAGS', '')!r}; {jax.devices()[0].device_kind}. "
        "Shared machine: compare the ratio within one run.", flush=True)
  variables = jax.jit(lambda r: model.init(r, jnp.zeros((1, size, size, 3)), train=False))(
      jax.random.key(0))
  variables = jax.device_get(variables)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
  labels = rng.integers(0, args.classes, (batch_size, size, size)).astype(np.uint8)
  labels[rng.random(labels.shape) < 0.1] = upernet.IGNORE_INDEX

  optimizer = optax.adamw(1e-4, weight_decay=0.05)
  step = make_jax_step(model, optimizer, float(seg_config.aux_weight))
  params = jax.tree_util.tree_map(jnp.array, variables["params"])
  state = [params, jax.tree_util.tree_map(jnp.array, variables["batch_stats"]),
           optimizer.init(params)]
  batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
  key = jax.random.key(1)

  def run_jax(steps):
    start = time.perf_counter()
    for i in range(steps):
      *state[:], loss = step(*state, batch, jax.random.fold_in(key, i))  # donated: replace
    loss.block_until_ready()
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
