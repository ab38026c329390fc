"""Compile the train step for an NVIDIA GPU this machine does not have, and read the program.

  JAX_PLATFORMS=cpu python bench/gpu_aot.py --cases=B/16:512 --attention_impl=xla,cudnn
  JAX_PLATFORMS=cpu python bench/gpu_aot.py --gpu=H200 --largest_batch --cases=B/16:512
  JAX_PLATFORMS=cpu python bench/gpu_aot.py --cases=B/16:512 --dtype=bfloat16 \
      --attention_impl=cudnn --config.model.approximate_gelu=true --top=20

Needs JAX's CUDA plugin for the installed jax (no GPU, no driver): in a separate virtualenv,
`pip install jax-cuda13-plugin==$JAXVER jax-cuda13-pjrt==$JAXVER --no-deps` next to the project's
test requirements and the NVIDIA wheels their torch pulls (cuBLAS / cuDNN), see
docs/BENCHMARKS.md.
JAX_PLATFORMS=cpu keeps the plugin from looking for a device; the step is then compiled
"deviceless" for a described target (`--gpu`: compute capability, SMs, memory, bandwidth).

What it prints per case, all read off the program XLA compiled for that GPU:
- the device memory the step needs (arguments + temporaries) against the card's, so the largest
  batch that fits is known before a GPU is lent (`--largest_batch` doubles until it does not);
- the kernels the step launches, by kind (cuBLAS GEMMs, cuDNN attention, XLA's loop / reduction
  fusions, copies), with the bytes each moves and the GEMMs' FLOPs;
- a roofline estimate of the step time: each kernel takes max(FLOPs / (peak x --gemm_efficiency),
  bytes / (bandwidth x --bandwidth_efficiency)) + --launch_us, summed (no overlap), and the MFU
  that time would give with bench_step.py's FLOP count. It is an estimate, not a measurement: it ignores caches, autotuning
  (GEMMs are compiled without it, so all go to cuBLAS; Triton GEMM tiling needs autotuning) and
  kernel overlap. Against the one lent H100 (XLA attention, ViT-B/16 bf16, the code of 247926d):
  0.1317 s estimated vs 0.1387 s measured at batch 512, 0.2584 vs 0.2820 at 1024 (5-9% under).
Only one device (the MFU target is per GPU). The case/config flags are those of bench_step.py.
"""

import argparse
import collections
import dataclasses
import os
import re
import sys
import time

if __name__ == "__main__":  # before jax is imported (not when a test imports the helpers)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the CUDA plugin must not look for a device
  # Without autotuning (no device to time on), XLA cannot pick Triton GEMM tiles: use cuBLAS.
  if "xla_gpu_enable_triton_gemm" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_gpu_enable_triton_gemm=false").strip()

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from jax.sharding import Mesh  # pylint: disable=wrong-import-position

import bench_step  # pylint: disable=wrong-import-position
from cim_jax import sharding  # pylint: disable=wrong-import-position
from cim_jax.models import cim  # pylint: disable=wrong-import-position
from cim_jax.train import schedules, state as state_lib, step as step_lib  # pylint: disable=wrong-import-position


@dataclasses.dataclass(frozen=True)
class Gpu:
  """A GPU to compile for: XLA's target description plus the datasheet figures of the estimate."""
  name: str
  sms: int
  memory_bytes: int
  bandwidth: float  # bytes/s (datasheet)
  peak_flops: float  # dense bf16 FLOP/s (datasheet)
  cc_major: int = 9
  cc_minor: int = 0
  clock_ghz: float = 1.98
  cudnn: tuple = (9, 19)  # the lent machines' cuDNN

  def target_config(self) -> str:
    """XLA's GpuTargetConfigProto (text format) for deviceless compilation."""
    return f"""
gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: {self.sms}
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(self.bandwidth)}
  l2_cache_size: 52428800
  clock_rate_ghz: {self.clock_ghz}
  device_memory_size: {self.memory_bytes}
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: {self.cc_major} minor: {self.cc_minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: {self.cudnn[0]} minor: {self.cudnn[1]} }}
device_description_str: "NVIDIA {self.name}"
"""


GPUS = {
    "H100": Gpu("H100 80GB HBM3", sms=132, memory_bytes=84_929_347_584, bandwidth=3.35e12,
                peak_flops=989e12),
    "H200": Gpu("H200", sms=132, memory_bytes=150_754_820_096, bandwidth=4.8e12,
                peak_flops=989e12),
}

# ----------------------------------------------------------------------------------------------
# Reading the compiled program (HLO text): the top-level instructions of the entry computation
# are the kernels the step launches.

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4,
          "f64": 8, "s64": 8, "u64": 8, "f8e4m3fn": 1, "f8e5m2": 1}
_ARRAY = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\]")
# Instructions that launch nothing (views, tuples, parameters).
_FREE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all",
         "partition-id", "replica-id", "opt-barrier"}


def shape_bytes(hlo_type: str) -> int:
  """Bytes of an HLO type: an array 'bf16[8,16]{1,0}' or a tuple of them."""
  return sum(_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
             for dtype, dims in _ARRAY.findall(hlo_type))


def _dims(hlo_type: str) -> list:
  dims = _ARRAY.search(hlo_type).group(2)
  return [int(d) for d in dims.split(",") if d]


def _closing(text: str, start: int) -> int:
  """Index of the parenthesis closing the one at `start`."""
  depth = 0
  for i in range(start, len(text)):
    depth += {"(": 1, ")": -1}.get(text[i], 0)
    if depth == 0:
      return i
  raise ValueError(f"unbalanced parentheses in HLO line: {text[:120]}")


def entry_instructions(hlo_text: str) -> list:
  """[(name, type, opcode, operand names, attributes)] of the ENTRY computation."""
  lines = hlo_text.split("\n")
  try:
    start = next(i for i, line in enumerate(lines) if line.startswith("ENTRY"))
  except StopIteration:
    raise ValueError("no ENTRY computation in the HLO text") from None
  out = []
  for line in lines[start + 1:]:
    if line.startswith("}"):
      break
    line = line.strip().removeprefix("ROOT ")
    if not line.startswith("%") or " = " not in line:
      continue
    name, rest = line.split(" = ", 1)
    if rest.startswith("("):  # a tuple type
      end = _closing(rest, 0)
      hlo_type, rest = rest[:end + 1], rest[end + 2:]
    else:
      hlo_type, rest = rest.split(" ", 1)
    opcode = re.match(r"[\w-]+", rest).group(0)
    end = _closing(rest, len(opcode))
    operands = re.findall(r"%([\w.\-]+)", rest[len(opcode):end])
    out.append((name[1:], hlo_type, opcode, operands, rest[end + 1:]))
  return out


@dataclasses.dataclass
class Kernel:
  name: str
  kind: str  # 'gemm', 'attention', 'fusion:<XLA fusion kind>', 'copy', ...
  op_name: str  # the JAX op it came from (metadata), '' if none
  bytes: int  # operands read + results written
  flops: float  # GEMMs only


def kernels(hlo_text: str) -> list:
  """The kernels of a compiled GPU program, with bytes moved and (GEMM) FLOPs."""
  instructions = entry_instructions(hlo_text)
  types = {name: hlo_type for name, hlo_type, *_ in instructions}
  out = []
  for name, hlo_type, opcode, operands, attrs in instructions:
    if opcode in _FREE:
      continue
    written = shape_bytes(hlo_type)
    flops = 0.0
    kind = opcode
    if opcode == "custom-call":
      target = re.search(r'custom_call_target="([^"]+)"', attrs).group(1)
      kind = "custom-call:" + target
      if "gemm" in target or "matmul" in target:  # __cublas$gemm, __cublas$lt$matmul
        kind = "gemm"
        written = shape_bytes(_ARRAY.search(hlo_type).group(0))  # not the workspace
        contracting = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', attrs).group(1)
        lhs = _dims(types[operands[0]])
        depth = np.prod([lhs[int(d)] for d in re.findall(r"\d+", contracting)] or [1])
        flops = 2.0 * float(np.prod(_dims(hlo_type))) * float(depth)
      elif "fmha" in target:
        kind = "attention"
    elif opcode == "fusion":
      kind = "fusion:" + re.search(r"kind=(\w+)", attrs).group(1)
    op_name = re.search(r'op_name="([^"]*)"', attrs)
    read = sum(shape_bytes(types.get(operand, "")) for operand in operands)
    out.append(Kernel(name, kind, op_name.group(1) if op_name else "", read + written, flops))
  return out


def estimate_seconds(kernel: Kernel, gpu: Gpu, gemm_efficiency: float, bandwidth: float,
                     launch: float) -> float:
  """Roofline time of one kernel: the slower of its math and its memory traffic, plus launch."""
  return max(kernel.flops / (gpu.peak_flops * gemm_efficiency), kernel.bytes / bandwidth) + launch


# ----------------------------------------------------------------------------------------------
# Compiling a case.


def compile_case(config, gpu: Gpu):
  """(compiled, seconds, FLOPs): the jitted train step compiled for `gpu`, and its FLOPs by XLA's
  count (bench_step's: the same step lowered for the CPU, with XLA attention)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    topology = topologies.get_topology_desc(platform="cuda", target_config=gpu.target_config(),
                                            topology="1x1x1")
  except Exception as e:  # pylint: disable=broad-except
    raise SystemExit(f"gpu_aot: cannot describe a CUDA target ({type(e).__name__}: {e}); install "
                     f"jax-cuda13-plugin / jax-cuda13-pjrt =={jax.__version__} and run with "
                     f"JAX_PLATFORMS=cpu") from None
  gpu_mesh = Mesh(np.asarray(topology.devices).reshape(1, 1), ("data", "fsdp"))
  cpu_mesh = Mesh(np.asarray(jax.devices("cpu")[:1]).reshape(1, 1), ("data", "fsdp"))

  def lowered_step(cfg, mesh):
    counts = schedules.step_counts(cfg, num_examples=None)
    trainer = step_lib.build_trainer(cfg, cim.build_model(cfg.model, cfg.data), mesh, counts)
    batch = {key: jax.ShapeDtypeStruct((cfg.batch_size,) + x.shape[1:], x.dtype,
                                       sharding=trainer.batch_sharding)
             for key, x in state_lib.dummy_batch(cfg.data, batch_size=1).items()}
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=sharding.replicated(mesh))
    return trainer.train_step.trace(trainer.abstract_sharded_state(), batch, rng).lower()

  start = time.perf_counter()
  compiled = lowered_step(config, gpu_mesh).compile()
  seconds = time.perf_counter() - start
  xla = config.copy_and_resolve_references()
  xla.model.attention_impl = "xla"  # the FLOPs of the model itself (see bench_step)
  return compiled, seconds, bench_step.xla_flops(lowered_step(xla, cpu_mesh))


def memory_needed(compiled) -> int:
  """Device bytes of one step: arguments, results not aliased to (donated) arguments, temporaries."""
  stats = compiled.memory_analysis()
  return (stats.argument_size_in_bytes + stats.output_size_in_bytes
          - stats.alias_size_in_bytes + stats.temp_size_in_bytes)


def _op_group(op_name: str) -> str:
  """'jit(train_step)/transpose(jvp(VisionTransformer))/blocks_7/mlp/mul' -> one row for all
  blocks: '.../blocks_N/mlp/mul' without the jit prefix."""
  return re.sub(r"blocks_\d+", "blocks_N", op_name).removeprefix("jit(train_step)/")


def report(label, config, gpu, args):
  """Compile one case and print its memory, kernels and estimate; returns the memory needed."""
  compiled, seconds, flops = compile_case(config, gpu)
  needed = memory_needed(compiled)
  fits = "fits" if needed <= gpu.memory_bytes else "does NOT fit"
  found = kernels(compiled.as_text())
  bandwidth = gpu.bandwidth * args.bandwidth_efficiency
  times = [estimate_seconds(k, gpu, args.gemm_efficiency, bandwidth, args.launch_us * 1e-6)
           for k in found]
  step = sum(times)
  print(f"\n{label}: compiled for {gpu.name} in {seconds:.1f} s; device memory "
        f"{needed / 2**30:.1f} GiB of {gpu.memory_bytes / 2**30:.1f} ({fits})")
  print(f"  {len(found)} kernels, {sum(k.flops for k in found) / 1e12:.2f} TFLOP in GEMMs, "
        f"{sum(k.bytes for k in found) / 1e9:.1f} GB moved; estimated {step * 1e3:.1f} ms/step, "
        f"{config.batch_size / step:.0f} samples/s, MFU {flops / step / gpu.peak_flops:.1%} "
        f"({flops / 1e12:.1f} TFLOP/step by XLA's count)")
  by_kind = collections.defaultdict(lambda: [0, 0, 0.0, 0.0])
  for kernel, seconds_ in zip(found, times):
    row = by_kind[kernel.kind]
    row[0] += 1
    row[1] += kernel.bytes
    row[2] += kernel.flops
    row[3] += seconds_
  print(f"  {'kind':<36}{'kernels':>8}{'GB':>9}{'TFLOP':>8}{'est. ms':>9}")
  for kind, (count, moved, kind_flops, kind_seconds) in sorted(by_kind.items(),
                                                                key=lambda kv: -kv[1][3]):
    print(f"  {kind:<36}{count:>8}{moved / 1e9:>9.2f}{kind_flops / 1e12:>8.2f}"
          f"{kind_seconds * 1e3:>9.2f}")
  if args.top:
    by_op = collections.defaultdict(lambda: [0, 0, 0.0])
    for kernel, seconds_ in zip(found, times):
      if kernel.kind != "gemm":
        row = by_op[_op_group(kernel.op_name) or kernel.kind]
        row[0] += 1
        row[1] += kernel.bytes
        row[2] += seconds_
    print(f"  non-GEMM kernels by JAX op (blocks merged), top {args.top}:")
    for op, (count, moved, op_seconds) in sorted(by_op.items(), key=lambda kv: -kv[1][2])[
        :args.top]:
      print(f"  {op_seconds * 1e3:7.2f} ms {count:5d} x {moved / 1e9:7.2f} GB  {op[-100:]}")
  sys.stdout.flush()
  return needed


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--gpu", default="H100", choices=sorted(GPUS))
  bench_step.add_case_arguments(parser, "B/16:512", "bfloat16")
  parser.add_argument("--attention_impl", default="xla",
                      help="comma-separated attention kernels, one case each: xla, cudnn")
  parser.add_argument("--remat", action=argparse.BooleanOptionalAction, default=None)
  parser.add_argument("--largest_batch", action="store_true",
                      help="double each case's batch until the step no longer fits in memory")
  parser.add_argument("--top", type=int, default=0,
                      help="also list the N costliest non-GEMM kernel groups")
  parser.add_argument("--gemm_efficiency", type=float, default=0.7,
                      help="fraction of the bf16 peak the GEMMs reach in the estimate")
  parser.add_argument("--bandwidth_efficiency", type=float, default=0.9,
                      help="fraction of the datasheet memory bandwidth in the estimate")
  parser.add_argument("--launch_us", type=float, default=2.0, help="per-kernel overhead, us")
  args, _ = bench_step.parse_case_arguments(parser, argv, default_cases="B/16:512",
                                            default_dtype="bfloat16")
  args.fsdp, args.workers = None, None  # one device; no input pipeline here
  gpu = GPUS[args.gpu]
  print(f"jax {jax.__version__}; compiling for {gpu.name} (no device needed), XLA_FLAGS="
        f"{os.environ.get('XLA_FLAGS', '')!r}; estimate: GEMMs at {args.gemm_efficiency:.0%} of "
        f"{gpu.peak_flops / 1e12:.0f} TFLOP/s, memory at {args.bandwidth_efficiency:.0%} of "
        f"{gpu.bandwidth / 1e12:.2f} TB/s, {args.launch_us:g} us per kernel, no overlap")
  try:
    cases = bench_step.parse_cases(args.cases)
  except ValueError as e:
    parser.error(str(e))
  for variant, batch in cases:
    for impl in args.attention_impl.split(","):
      if impl not in ("xla", "cudnn"):
        parser.error(f"--attention_impl: unknown kernel {impl!r}; expected xla or cudnn")
      config = bench_step.bench_config(variant, batch, args, impl)
      while True:
        label = f"{bench_step.case_label(config, with_attention=True)} {config.model.dtype}"
        needed = report(label, config, GPUS[args.gpu], args)
        if not args.largest_batch or needed > gpu.memory_bytes:
          break
        config.batch_size *= 2


if __name__ == "__main__":
  main()
