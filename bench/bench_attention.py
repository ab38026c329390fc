"""Attention forward + backward on the CPU: XLA's batched form vs ours head by head vs PyTorch.

  python bench/bench_attention.py                       # ViT-B heads at several lengths
  python bench/bench_attention.py --shapes=2x1025x12x64 --rounds=5

Times jax.nn.dot_product_attention (implementation='xla'), `vit.head_by_head_attention` (what
model.attention_impl='' runs on a CPU for sequences of >= 256 tokens) and torch's
scaled_dot_product_attention on the same (batch, tokens, heads, head dim) inputs, each side
jitted / warmed once, best of --rounds, rounds alternating. Prints the largest gradient
difference of ours against XLA's, relative to the gradient's scale. --threads pins the process
to that many cores (XLA sizes its thread pool by them) and sets torch's.
"""

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from cim_jax.models import vit  # pylint: disable=g-import-not-at-top,wrong-import-position


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", default="2x1025x12x64,4x577x12x64,8x257x12x64,32x197x3x64",
                      help="comma-separated BxTxHxD")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--no_torch", action="store_true")
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  available = sorted(os.sched_getaffinity(0))
  if args.threads < len(available):
    os.sched_setaffinity(0, available[:args.threads])
  torch = None
  if not args.no_torch:
    import torch  # pylint: disable=g-import-not-at-top,redefined-outer-name
    torch.set_num_threads(args.threads)
  print(f"{args.threads} threads, {jax.devices()[0].device_kind}; seconds per forward + backward",
        flush=True)
  for spec in args.shapes.split(","):
    shape = tuple(int(n) for n in spec.split("x"))
    rng = np.random.default_rng(0)
    q, k, v, cotangent = (rng.normal(size=shape).astype(np.float32) for _ in range(4))
    cotangent_j = jnp.asarray(cotangent)

    def step(attention):
      loss = lambda q, k, v: jnp.sum(attention(q, k, v) * cotangent_j)
      return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    xla = step(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla"))
    ours = step(vit.head_by_head_attention)
    inputs = tuple(jnp.asarray(x) for x in (q, k, v))
    error = max(float(jnp.abs(a - b).max() / jnp.abs(b).max())
                for a, b in zip(ours(*inputs), xla(*inputs)))
    sides = {"xla": lambda: jax.block_until_ready(xla(*inputs)),
             "head_by_head": lambda: jax.block_until_ready(ours(*inputs))}
    if torch is not None:
      # torch's layout is (B, H, T, D).
      tq, tk, tv = (torch.from_numpy(x).permute(0, 2, 1, 3).contiguous().requires_grad_()
                    for x in (q, k, v))
      tg = torch.from_numpy(cotangent).permute(0, 2, 1, 3).contiguous()

      def torch_step():
        for t in (tq, tk, tv):
          t.grad = None
        (torch.nn.functional.scaled_dot_product_attention(tq, tk, tv) * tg).sum().backward()

      sides["torch_sdpa"] = torch_step
    for run in sides.values():
      run()
    best = {name: float("inf") for name in sides}
    for _ in range(args.rounds):
      for name, run in sides.items():
        start = time.perf_counter()
        run()
        best[name] = min(best[name], time.perf_counter() - start)
    line = "  ".join(f"{name} {seconds:.3f}" for name, seconds in best.items())
    print(f"{spec}: {line}  head_by_head/xla {best['head_by_head'] / best['xla']:.2f}"
          + (f"  head_by_head/torch {best['head_by_head'] / best['torch_sdpa']:.2f}"
             if "torch_sdpa" in best else "")
          + f"  grad difference {error:.1e}", flush=True)


if __name__ == "__main__":
  main()
