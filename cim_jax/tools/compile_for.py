"""Compile the real train step for a TPU slice or GPUs this machine does not have (or for its own).

python -m cim_jax.tools.compile_for --target=v5p-64 --config=configs/cim_pretrain.py:B/16 \
    [--config.key=value ...] [--task=pretrain|finetune] [--largest_batch=true] [--json=true]
python -m cim_jax.tools.compile_for [--target=local] [--devices=8] --config=...  # this machine

Targets: Cloud TPU slices by accelerator type (v4-32, v5p-64, v5e-64 / v5litepod-64, v6e-64) or
topology (v5p:2x2x2), compiled by libtpu on this CPU host (`pip install jax[tpu]` at the runtime
jax version; no TPU and no credentials needed); NVIDIA GPUs (H100, 8xH100, H200), compiled
deviceless by JAX's CUDA plugin (jax-cuda13-plugin / -pjrt at the jax version); `local`, the
devices present (on CPU, `--devices=N` lays out N host devices).

The step is the trainer's own (`train.step.build_trainer`, or the fine-tuning trainer) over the
trainer's mesh (data x fsdp, fsdp as the config says; across hosts when the slice has several),
lowered for abstract inputs and compiled. Per device it prints: state bytes (params, optimizer,
EMA target) from the shardings, XLA's activations / temporaries, the total against the device's
memory; FLOPs per step (XLA's cost analysis of the compiled program); the collectives in that
program; and a roofline ESTIMATE of the step time and MFU from the chip's published peak bf16
FLOP/s and memory bandwidth (max of FLOPs / peak and bytes accessed / bandwidth: a lower bound on
the time, an upper bound on MFU; collectives and kernel overheads are not included).
"""

import collections
import dataclasses
import json
import os
import re
import sys
import time

import jax
import ml_collections
import numpy as np
from jax.experimental import topologies

from cim_jax import cli
from cim_jax import config_validation
from cim_jax import sharding
from cim_jax.errors import ConfigError
from cim_jax.models import cim
from cim_jax.train import finetuning
from cim_jax.train import memory
from cim_jax.train import schedules
from cim_jax.train import step as step_lib

FLAGS = {"target": "local", "devices": "0", "task": "pretrain", "largest_batch": "false",
         "json": "false", "headroom": "0.1"}
GIB = memory.GIB
TASKS = {"pretrain": "pretraining", "finetune": "finetuning"}  # --task: the config kind
IMAGENET_CLASSES = 1000  # the head of a fine-tuning config that names no class count


@dataclasses.dataclass(frozen=True)
class Chip:
  """Published per-chip figures (Cloud TPU / NVIDIA datasheets) and how libtpu names the part."""
  name: str
  hbm_bytes: int
  peak_bf16_flops: float
  hbm_bandwidth: float  # bytes/s
  devices_per_chip: int = 1  # libtpu describes a v4 chip as its two TensorCores
  cores_in_type: int = 1  # "v4-32" / "v5p-64" count TensorCores (2 per chip), v5e / v6e chips
  dims: int = 2  # the slice's torus: 3-D (v4, v5p) or 2-D (v5e, v6e)


CHIPS = {
    "v4": Chip("TPU v4", 32 * GIB, 275e12, 1.228e12, devices_per_chip=2, cores_in_type=2, dims=3),
    "v5p": Chip("TPU v5p", 95 * GIB, 459e12, 2.765e12, cores_in_type=2, dims=3),
    "v5e": Chip("TPU v5e", 16 * GIB, 197e12, 0.819e12),
    "v6e": Chip("TPU v6e", 32 * GIB, 918e12, 1.64e12),
    "H100": Chip("NVIDIA H100 SXM", 84_929_347_584, 989e12, 3.35e12),
    "H200": Chip("NVIDIA H200", 150_754_820_096, 989e12, 4.8e12),
}
# Slice shapes of the accelerator types, by chip count (Cloud TPU documentation).
_TORUS = {3: {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
              256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"},
          2: {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
              256: "16x16"}}
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_HLO_ARRAY = re.compile(r"\b(pred|[subf]\d+|bf16|f8e\w+)\[([\d,]*)\]")
_OOM = re.compile(r"total memory required[^(]*\(([\d.]+)([KMGT]?)\)")
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_HLO_COLLECTIVE = re.compile(r"=\s*(.*?)\s(" + "|".join(_COLLECTIVES) + r")(-start)?\(")


@dataclasses.dataclass(frozen=True)
class Target:
  """Where to compile: the devices and what one of them can hold and do."""
  label: str
  devices: tuple
  chip: Chip | None  # None: the local devices (their memory from the allocator / host RAM)

  @property
  def memory_per_device(self) -> int | None:
    if self.chip is None:
      return memory.device_memory()[0]
    return self.chip.hbm_bytes // self.chip.devices_per_chip

  @property
  def hosts(self) -> int:
    return len({d.process_index for d in self.devices})


def _quiet_libtpu() -> None:
  """libtpu looks for the TPU VM's metadata it does not need to compile: say there is none."""
  for key, value in (("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"), ("TPU_ACCELERATOR_TYPE", "v5p-8"),
                     ("TPU_WORKER_HOSTNAMES", "localhost"), ("TPU_WORKER_ID", "0"),
                     ("TPU_SKIP_MDS_QUERY", "1"),
                     ("TPU_STDERR_LOG_LEVEL", "3"), ("TPU_MIN_LOG_LEVEL", "3")):
    os.environ.setdefault(key, value)


def tpu_topology(target: str) -> tuple[str, str]:
  """('v5p', '2x4x4') from an accelerator type ('v5p-64', 'v5litepod-64') or 'v5p:2x4x4'."""
  match = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)(?:-(\d+)|:(\d+(?:x\d+)+))", target)
  if not match:
    raise ConfigError(f"--target={target}: expected a TPU type (v4-32, v5p-64, v5e-64, v6e-64), "
                      "a topology (v5p:2x2x2), a GPU (H100, 8xH100, H200) or local")
  generation = "v5e" if match.group(1) == "v5litepod" else match.group(1)
  chip = CHIPS[generation]
  if match.group(3):
    shape = match.group(3)
    if shape.count("x") + 1 != chip.dims:
      raise ConfigError(f"--target={target}: a {generation} slice is {chip.dims}-D")
    return generation, shape
  count = int(match.group(2))
  chips = count // chip.cores_in_type
  if count % chip.cores_in_type or chips not in _TORUS[chip.dims]:
    sizes = [f"{generation}-{n * chip.cores_in_type}" for n in sorted(_TORUS[chip.dims])[:5]]
    raise ConfigError(f"--target={target}: no {generation} slice of {count} "
                      f"{'TensorCores' if chip.cores_in_type > 1 else 'chips'}; try "
                      f"{', '.join(sizes)}, ...")
  return generation, _TORUS[chip.dims][chips]


def resolve_target(target: str) -> Target:
  """The devices of `target`, described (not present): TPU via libtpu, GPU via the CUDA plugin."""
  if target == "local":
    return Target(f"{jax.device_count()} {jax.default_backend()} devices",
                  tuple(jax.devices()), None)
  gpu = re.fullmatch(r"(?:(\d+)x)?(H100|H200)", target)
  if gpu:
    count, chip = int(gpu.group(1) or 1), CHIPS[gpu.group(2)]
    try:
      desc = topologies.get_topology_desc(platform="cuda", target_config=_gpu_target_config(
          chip), topology=f"1x1x{count}")
    except Exception as e:  # pylint: disable=broad-except
      raise ConfigError(f"--target={target}: cannot describe a CUDA target ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); install jax-cuda13-plugin "
                        f"and jax-cuda13-pjrt=={jax.__version__} and run with JAX_PLATFORMS=cpu"
                        ) from None
    return Target(f"{count} x {chip.name}", tuple(desc.devices), chip)
  generation, shape = tpu_topology(target)
  _quiet_libtpu()
  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=f"{generation}:{shape}")
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f"--target={target}: libtpu cannot describe {generation}:{shape} "
                      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                      f"install jax[tpu]=={jax.__version__}") from None
  return Target(f"{target} ({generation}:{shape})", tuple(desc.devices), CHIPS[generation])


def _gpu_target_config(chip: Chip) -> str:
  """XLA's GpuTargetConfigProto (text) for a Hopper GPU: what deviceless compilation needs."""
  return f"""
gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: {int(chip.hbm_bandwidth)} l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: {chip.hbm_bytes}
  shared_memory_per_block_optin: 232448 cuda_compute_capability {{ major: 9 minor: 0 }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 19 }}
device_description_str: "{chip.name}"
"""


def collectives(hlo_text: str) -> dict[str, tuple[int, int]]:
  """{kind: (count, bytes)} of the collectives in a compiled program (bytes of their results)."""
  found = collections.defaultdict(lambda: [0, 0])
  for line in hlo_text.splitlines():
    match = _HLO_COLLECTIVE.search(line)
    if not match:
      continue
    arrays = [int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64)) *
              _itemsize(dtype) for dtype, dims in _HLO_ARRAY.findall(match.group(1))]
    # An async start's result is (operand, result[, context]): the largest is the data moved.
    found[match.group(2)][0] += 1
    found[match.group(2)][1] += max(arrays) if match.group(3) else sum(arrays)
  return {kind: tuple(v) for kind, v in sorted(found.items())}


def _itemsize(dtype: str) -> int:
  if dtype == "pred":
    return 1
  return max(1, int(re.sub(r"\D", "", dtype.split("e")[0]) or 8) // 8)


@dataclasses.dataclass
class Compiled:
  """What one compilation says per device."""
  batch_size: int
  compile_seconds: float
  num_params: int  # online parameters, whole
  params: int
  optimizer: int
  target_params: int
  model_state: int
  batch: int
  arguments: int  # XLA: every input buffer (state + batch + rng)
  outputs: int
  aliased: int  # outputs written into donated inputs (the updated state)
  temp: int  # XLA: activations, gradients and other temporaries
  generated_code: int
  total: int
  flops: float
  bytes_accessed: float
  collectives: dict


def abstract_step(config: ml_collections.ConfigDict, devices, task: str = "pretrain"):
  """(jitted step, abstract state, abstract batch, abstract rng) over the trainer's mesh."""
  mesh = sharding.make_mesh(config.mesh.fsdp, devices=devices)
  counts = schedules.step_counts(config, num_examples=config.batch_size)  # constants only
  if task == "pretrain":
    trainer = step_lib.build_trainer(config, cim.build_model(config.model, config.data), mesh,
                                     counts)
    batch = memory.abstract_batch(config, trainer.batch_sharding)
  elif task == "finetune":
    trainer = finetuning.build_trainer(config, config.data.num_classes or IMAGENET_CLASSES, mesh,
                                       counts)
    batch = finetuning.abstract_batch(config, trainer.batch_sharding)
  else:
    raise ConfigError(f"--task={task} must be 'pretrain' or 'finetune'")
  key = jax.eval_shape(lambda: jax.random.PRNGKey(config.seed))
  rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(mesh))
  return trainer.train_step, trainer.abstract_sharded_state(), batch, rng


def compile_step(config: ml_collections.ConfigDict, target: Target, task: str) -> Compiled:
  """Lowers and compiles the step for `target` and reads XLA's analyses of the program."""
  step, state, batch, rng = abstract_step(config, target.devices, task)
  start = time.perf_counter()
  parts = dict(
      batch_size=config.batch_size, num_params=sum(int(x.size) for x in jax.tree.leaves(
          state.params)), params=memory.per_device_bytes(state.params),
      optimizer=memory.per_device_bytes(state.opt_state),
      target_params=memory.per_device_bytes(getattr(state, "target_params", {})),
      model_state=memory.per_device_bytes(getattr(state, "model_state", {})),
      batch=memory.per_device_bytes(batch))
  try:
    compiled = step.lower(state, batch, rng).compile()
  except jax.errors.JaxRuntimeError as e:
    # The TPU compiler refuses a program that cannot fit its HBM, naming what it needs.
    needed = _OOM.search(str(e))
    if "RESOURCE_EXHAUSTED" not in str(e) or not needed:
      raise
    total = int(float(needed.group(1)) * _UNITS[needed.group(2)])
    return Compiled(compile_seconds=time.perf_counter() - start, arguments=0, outputs=0,
                    aliased=0, temp=total, generated_code=0, total=total, flops=0.0,
                    bytes_accessed=0.0, collectives={}, **parts)
  seconds = time.perf_counter() - start
  stats = compiled.memory_analysis()
  cost = compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return Compiled(
      compile_seconds=seconds, arguments=stats.argument_size_in_bytes,
      outputs=stats.output_size_in_bytes, aliased=stats.alias_size_in_bytes,
      temp=stats.temp_size_in_bytes, generated_code=stats.generated_code_size_in_bytes,
      total=memory.compiled_bytes(compiled), flops=float(cost.get("flops", 0.0)),
      bytes_accessed=float(cost.get("bytes accessed", 0.0)),
      collectives=collectives(compiled.as_text()), **parts)


def fits(result: Compiled, target: Target, headroom: float) -> bool:
  available = target.memory_per_device
  return available is None or result.total <= available * (1.0 - headroom)


def largest_batch(config, target: Target, task: str, headroom: float, first: Compiled) -> int:
  """The largest global batch (a multiple of the device count) whose step fits, by compiling:
  doubling up from a batch that fits, or bisecting down from one that does not."""
  devices = len(target.devices)
  budget = target.memory_per_device * (1.0 - headroom)
  if first.params * 2 + first.optimizer + first.target_params > budget:
    return 0  # the state and one gradient alone do not fit
  config = config.copy_and_resolve_references()

  def fits_at(batch_size: int) -> bool:
    config.batch_size = batch_size
    return fits(compile_step(config, target, task), target, headroom)

  good, bad = (first.batch_size, None) if fits(first, target, headroom) else (0, first.batch_size)
  while bad is None and good < 2**20:
    good, bad = (good * 2, None) if fits_at(good * 2) else (good, good * 2)
  while bad is not None and bad - good > devices:
    middle = (good + bad) // 2 // devices * devices
    good, bad = (middle, bad) if fits_at(middle) else (good, middle)
  return good


def estimate(result: Compiled, target: Target) -> dict | None:
  """Roofline step time (s), samples/s and MFU of one device's program; None without a chip."""
  if target.chip is None:
    return None
  peak = target.chip.peak_bf16_flops / target.chip.devices_per_chip
  bandwidth = target.chip.hbm_bandwidth / target.chip.devices_per_chip
  seconds = max(result.flops / peak, result.bytes_accessed / bandwidth)
  if seconds <= 0:
    return None
  return {"step_seconds": seconds, "samples_per_second": result.batch_size / seconds,
          "mfu": result.flops / seconds / peak}


def report(config, target: Target, result: Compiled, headroom: float,
           largest: int | None) -> dict:
  """The figures as one dict (the --json output and the table's source)."""
  available = target.memory_per_device
  return {
      "target": target.label, "devices": len(target.devices), "hosts": target.hosts,
      "variant": config.model.variant, "dtype": config.model.dtype,
      "mesh": {"data": len(target.devices) // config.mesh.fsdp, "fsdp": config.mesh.fsdp},
      "batch_size": result.batch_size, "num_params": result.num_params,
      "per_device_batch": result.batch_size / len(target.devices),
      "compile_seconds": result.compile_seconds,
      "bytes_per_device": {"params": result.params, "optimizer": result.optimizer,
                           "ema_target": result.target_params, "model_state": result.model_state,
                           "batch": result.batch, "activations_and_temporaries": result.temp,
                           "arguments": result.arguments, "outputs": result.outputs,
                           "aliased": result.aliased, "generated_code": result.generated_code,
                           "total": result.total, "available": available},
      "fits": fits(result, target, headroom), "headroom": headroom,
      "flops_per_device_step": result.flops, "bytes_accessed_per_device_step":
          result.bytes_accessed,
      "collectives": {k: {"count": c, "bytes": b} for k, (c, b) in result.collectives.items()},
      "estimate": estimate(result, target), "largest_batch": largest,
  }


def format_report(r: dict) -> str:
  b = r["bytes_per_device"]
  gib = lambda n: f"{n / GIB:8.2f} GiB"
  lines = [f"{r['variant']} {r['dtype']} ({r['num_params'] / 1e6:.1f}M parameters), global batch "
           f"{r['batch_size']} ({r['per_device_batch']:g} per device) on {r['target']}, "
           f"{r['hosts']} host{'s' if r['hosts'] > 1 else ''}, mesh data={r['mesh']['data']} x "
           f"fsdp={r['mesh']['fsdp']}; compiled in {r['compile_seconds']:.1f} s",
           "per device (compiled, not measured):"]
  for name, key in (("params (online)", "params"), ("optimizer state", "optimizer"),
                    ("EMA target", "ema_target"), ("model state (BatchNorm)", "model_state"),
                    ("input batch", "batch"),
                    ("activations / temporaries", "activations_and_temporaries"),
                    ("total during the step", "total")):
    lines.append(f"  {name:<28}{gib(b[key])}")
  if b["available"]:
    verdict = ("fits" if r["fits"] else "does not fit") + (
        f" (needs {b['total'] / b['available']:.0%} of {b['available'] / GIB:.1f} GiB; "
        f"{r['headroom']:.0%} kept free)")
    lines.append(f"  {'memory':<28}{verdict}")
  lines.append(f"  {'FLOPs per step':<28}{r['flops_per_device_step'] / 1e12:8.3f} TFLOP "
               "(XLA cost analysis of the compiled program)")
  for kind, c in r["collectives"].items():
    lines.append(f"  {kind:<28}{c['count']:5d} ops, {c['bytes'] / 2**20:10.1f} MiB")
  if not r["collectives"]:
    lines.append(f"  {'collectives':<28}none")
  if r["estimate"]:
    e = r["estimate"]
    lines.append(f"  ESTIMATE (roofline: max(FLOPs / peak, bytes / bandwidth)): "
                 f"{e['step_seconds'] * 1e3:.1f} ms/step, {e['samples_per_second']:.0f} samples/s,"
                 f" MFU <= {e['mfu']:.0%}")
  if r["largest_batch"] is not None:
    lines.append(f"  largest global batch that fits: {r['largest_batch']}")
  return "\n".join(lines)


def run(config, flags: dict) -> dict:
  """Compiles for flags['target'] and returns the report (raises ConfigError on bad input)."""
  headroom = float(flags["headroom"])
  target = resolve_target(flags["target"])
  if flags["task"] not in TASKS:
    raise ConfigError(f"--task={flags['task']} must be one of {', '.join(TASKS)}")
  config_validation.validate(config, kind=TASKS[flags["task"]], device_count=len(target.devices))
  result = compile_step(config, target, flags["task"])
  largest = None
  if flags["largest_batch"] == "true" and target.memory_per_device:
    largest = largest_batch(config, target, flags["task"], headroom, result)
  return report(config, target, result, headroom, largest)


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  config, flags = cli.parse_or_exit(argv, default_config="configs/cim_pretrain.py:B/16",
                                    flags=FLAGS, validate=False, prog="cim_jax.tools.compile_for")
  for key in ("largest_batch", "json"):
    if flags[key] not in ("true", "false"):
      cli.exit_on_config_error(_fail, f"--{key}={flags[key]} must be true or false")
  if not flags["devices"].isdigit():
    cli.exit_on_config_error(_fail, f"--devices={flags['devices']} must be a number >= 0")
  if int(flags["devices"]):
    if flags["target"] != "local":
      cli.exit_on_config_error(_fail, "--devices applies to --target=local only")
    jax.config.update("jax_num_cpu_devices", int(flags["devices"]))
    if jax.default_backend() != "cpu":
      cli.exit_on_config_error(_fail, "--devices lays out CPU devices; on an accelerator the "
                               "mesh is the devices present")
  result = cli.exit_on_config_error(run, config, flags)
  print(json.dumps(result) if flags["json"] == "true" else format_report(result))
  if not result["fits"]:
    largest = result["largest_batch"]
    hint = (f"the largest global batch that fits is {largest}" if largest else
            "rerun with --largest_batch=true for the largest batch that fits" if largest is None
            else "no batch fits: shard the state (--config.mesh.fsdp) or pick a smaller variant")
    print(f"error: {result['variant']} at global batch {result['batch_size']} does not fit "
          f"{result['target']}: {result['bytes_per_device']['total'] / GIB:.1f} GiB per device "
          f"needed, {result['bytes_per_device']['available'] / GIB:.1f} GiB there "
          f"({result['headroom']:.0%} kept free); {hint}", file=sys.stderr)
    sys.exit(2)


def _fail(message: str):
  raise ConfigError(message)


if __name__ == "__main__":
  main()
