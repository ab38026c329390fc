"""docs/SCALING.md's table: the pre-training step of each ViT compiled for each target.

  JAX_PLATFORMS=cpu python bench/scaling_table.py [--variants=Ti/16,S/16,B/16,L/16,H/14]
      [--targets=v4-32,v5e-64,v5p-64,v6e-64] [--json_out=scaling.jsonl]

Needs libtpu (jax[tpu] at the runtime jax version; the test requirements install it) and, for GPU
targets (8xH100), JAX's CUDA plugin. Every figure is compiled, not measured: memory from XLA's
memory analysis, time from compile_for's roofline estimate. The largest batch per chip is
extrapolated from the recipe batch's compilation (state fixed, activations linear in the batch),
not compiled; `compile_for --largest_batch=true` compiles it for one case.
"""

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "configs")]

import cim_pretrain  # pylint: disable=g-import-not-at-top,wrong-import-position
from cim_jax.tools import compile_for  # pylint: disable=g-import-not-at-top,wrong-import-position
from cim_jax.train import memory  # pylint: disable=g-import-not-at-top,wrong-import-position

IMAGENET_TRAIN = 1_281_167


def case(variant: str, target_name: str) -> dict:
  config = cim_pretrain.get_config(variant)
  config.model.dtype = "bfloat16"
  target = compile_for.resolve_target(target_name)
  flags = dict(compile_for.FLAGS, target=target_name)
  result = compile_for.run(config, flags)
  b, devices = result["bytes_per_device"], len(target.devices)
  budget = int(b["available"] * (1.0 - result["headroom"]))
  result["largest_batch_per_chip"] = memory.largest_batch(
      b["total"], budget, batch_size=config.batch_size, temp=b["activations_and_temporaries"],
      batch_bytes=b["batch"], gradient_bytes=b["params"], devices=devices) // devices * (
          target.chip.devices_per_chip if target.chip else 1)
  return result


def row(r: dict) -> str:
  b, e = r["bytes_per_device"], r["estimate"] or {}
  epoch_minutes = IMAGENET_TRAIN / e["samples_per_second"] / 60 if e else float("nan")
  return (f"| {r['variant']} | {r['target']} | {r['batch_size']} (fsdp {r['mesh']['fsdp']}) | "
          f"{b['total'] / 2**30:.1f} / {b['available'] / 2**30:.0f} GiB "
          f"{'fits' if r['fits'] else '**does not fit**'} | {r['largest_batch_per_chip']} | "
          f"{e.get('step_seconds', float('nan')) * 1e3:.0f} ms | "
          f"{e.get('samples_per_second', float('nan')):,.0f} | {epoch_minutes:.1f} min | "
          f"{r['flops_per_device_step'] / 1e12:.2f} | {e.get('mfu', float('nan')):.0%} | "
          f"{r['compile_seconds']:.0f} s |")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variants", default="Ti/16,S/16,B/16,L/16,H/14")
  parser.add_argument("--targets", default="v4-32,v5e-64,v5p-64,v6e-64")
  parser.add_argument("--json_out", default="")
  parser.add_argument("--from_json", default="", help="print the rows of an earlier --json_out")
  args = parser.parse_args(argv)
  print("| ViT | target | global batch | memory per device (compiled) | largest batch per chip "
        "(extrapolated) | step (estimate) | samples/s (estimate) | ImageNet-1K epoch (estimate) "
        "| TFLOP per device-step (XLA) | MFU bound (estimate) | compile |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  if args.from_json:
    with open(args.from_json, encoding="utf-8") as f:
      for line in f:
        print(row(json.loads(line)))
    return
  for variant in args.variants.split(","):
    for target_name in args.targets.split(","):
      start = time.perf_counter()
      try:
        r = case(variant, target_name)
      except Exception as e:  # pylint: disable=broad-except  (one failed case, not the table)
        print(f"| {variant} | {target_name} | failed: {type(e).__name__}: "
              f"{str(e).splitlines()[0][:120]} |||||||||", flush=True)
        continue
      print(row(r), flush=True)
      if args.json_out:
        with open(args.json_out, "a", encoding="utf-8") as f:
          f.write(json.dumps(dict(r, wall_seconds=time.perf_counter() - start)) + "\n")


if __name__ == "__main__":
  main()
