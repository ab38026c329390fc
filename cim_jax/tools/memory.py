"""Per-device memory of one CIM train step for a config and mesh, without running a step.

python -m cim_jax.tools.memory --config=configs/cim_vit_base.py [--config.key=value ...]
    [--devices=N] [--json=true]

The trainer's own step is compiled for abstract inputs (shapes and shardings only), and XLA's
`compile().memory_analysis()` gives the step's buffers per device. The state is split into
params, optimizer state and EMA target from the shardings the trainer uses. Run it on the target
accelerator for its numbers; on CPU `--devices=N` lays out N host devices (a pod's mesh) and gives
the CPU compiler's estimate, whose temporaries (activations) can differ from TPU/GPU.
"""

import dataclasses
import json
import os
import sys

import ml_collections

from cim_jax import cli

FLAGS = {"devices": "0", "json": "false"}
GIB = 1024**3


@dataclasses.dataclass
class MemoryReport:
  """Bytes per device; state parts from the shardings, the rest from XLA's memory analysis."""
  devices: int
  mesh: dict
  per_device_batch: int
  num_params: int  # online parameters, whole (encoder + decoder [+ global-loss heads])
  params: int
  optimizer: int
  target: int
  model_state: int
  batch: int
  arguments: int  # XLA: every input buffer (state + batch + rng)
  outputs: int
  aliased: int  # outputs written into donated inputs (the updated state)
  temp: int  # XLA: activations, gradients and other temporaries of the step
  generated_code: int
  peak: int  # XLA's own peak where the backend reports it (CPU's leaves out temporaries)

  @property
  def total(self) -> int:
    """What one device must hold during the step: inputs, new outputs, temporaries, code."""
    return _step_total(self.arguments, self.outputs, self.aliased, self.temp,
                       self.generated_code)


def _step_total(arguments: int, outputs: int, aliased: int, temp: int, generated_code: int
                ) -> int:
  """The one formula for a step's per-device bytes (the report and the trainers' check)."""
  return arguments + outputs - aliased + temp + generated_code


def _per_device_bytes(tree) -> int:
  """Bytes one device holds of a pytree of ShapeDtypeStructs with (Named)shardings."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  total = 0
  for leaf in jax.tree.leaves(tree):
    shard_shape = leaf.sharding.shard_shape(leaf.shape)
    total += int(np.prod(shard_shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
  return total


def _abstract_step(config: ml_collections.ConfigDict):
  """The trainer's jitted step and abstract (shape + sharding) arguments, as loop.train builds them."""
  import jax  # pylint: disable=g-import-not-at-top
  from cim_jax import sharding  # pylint: disable=g-import-not-at-top
  from cim_jax.models import cim  # pylint: disable=g-import-not-at-top
  from cim_jax.train import schedules  # pylint: disable=g-import-not-at-top
  from cim_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top

  mesh = sharding.make_mesh(config.mesh.fsdp)
  model = cim.build_model(config.model, config.data)
  # Schedules change constants, not buffers: any data set size gives the same memory.
  counts = schedules.step_counts(config, num_examples=config.batch_size)
  trainer = step_lib.build_trainer(config, model, mesh, counts)
  state = trainer.abstract_sharded_state()
  batch = abstract_batch(config, trainer.batch_sharding)
  key = jax.eval_shape(lambda: jax.random.PRNGKey(config.seed))
  rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(mesh))
  return trainer.train_step, state, batch, rng, mesh


def compiled_bytes(compiled) -> int | None:
  """Per-device bytes of a compiled step (XLA's memory analysis), None where not reported."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  return _step_total(stats.argument_size_in_bytes, stats.output_size_in_bytes,
                     stats.alias_size_in_bytes, stats.temp_size_in_bytes,
                     stats.generated_code_size_in_bytes)


def _meminfo_available() -> int | None:
  """Host RAM available to a new allocation: /proc/meminfo's MemAvailable, else sysconf."""
  try:
    with open("/proc/meminfo", encoding="ascii") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    return None


def device_memory() -> tuple[int | None, str]:
  """(bytes one local device can use, a description); (None, ...) when nothing says.

  CPU devices share the host's available RAM (split evenly between several host devices);
  GPU / TPU report their allocator's `bytes_limit`.
  """
  import jax  # pylint: disable=g-import-not-at-top
  device = jax.local_devices()[0]
  if device.platform == "cpu":
    available, count = _meminfo_available(), jax.local_device_count()
    if available is None:
      return None, "unknown host RAM"
    if count == 1:
      return available, f"{_size(available)} of available host RAM"
    return available // count, (f"{_size(available // count)} ({_size(available)} of "
                                f"available host RAM shared by {count} CPU devices)")
  try:
    limit = (device.memory_stats() or {}).get("bytes_limit")
  except Exception:  # pylint: disable=broad-except  (some backends raise instead of None)
    limit = None
  if not limit:
    return None, f"unknown {device.platform} memory"
  return int(limit), f"{_size(int(limit))} ({device.device_kind})"


def _size(num_bytes: int) -> str:
  return (f"{num_bytes / GIB:.1f} GiB" if num_bytes >= GIB / 10 else
          f"{num_bytes / 2**20:.1f} MiB")


def largest_batch(total: int, available: int, *, batch_size: int, temp: int, batch_bytes: int,
                  gradient_bytes: int, devices: int) -> int:
  """The largest global batch (a multiple of `devices`) whose step fits in `available` bytes.

  From one compilation: the batch and its activations (temporaries less one gradient-sized
  buffer) grow with the per-device batch, the state and code do not. Estimated, not compiled.
  """
  per_device = max(1, batch_size // devices)
  growing = max(0, temp - gradient_bytes) + batch_bytes
  fixed = total - growing
  if available <= fixed or growing <= 0:
    return 0
  return int((available - fixed) * per_device // growing) * devices


def compile_step_that_fits(step, args: tuple, *, batch_size: int, what: str,
                           memory: tuple[int | None, str] | None = None):
  """Lowers and compiles `step` (a jitted function) for `args` once and returns the compiled
  step, after checking that its memory fits the device: a step that cannot fit raises a
  one-line ConfigError (what it needs, what the device has, the largest batch that fits)
  before anything runs. args = (state with .params, batch, ...); `memory` overrides
  `device_memory()` (tests)."""
  import jax  # pylint: disable=g-import-not-at-top
  compiled = step.lower(*args).compile()
  needed = compiled_bytes(compiled)
  available, described = device_memory() if memory is None else memory
  if needed is None or available is None or needed <= available:
    return compiled
  stats = compiled.memory_analysis()
  fits = largest_batch(
      needed, available, batch_size=batch_size, temp=stats.temp_size_in_bytes,
      batch_bytes=_per_device_bytes(args[1]), gradient_bytes=_per_device_bytes(args[0].params),
      devices=jax.device_count())
  hint = (f"the largest batch that fits is about {fits} (--config.batch_size={fits})" if fits
          else "no batch fits: the state alone is too large for this device (shard it: "
          "--config.mesh.fsdp, or a smaller model.variant)")
  raise cli.config_validation.ConfigError(
      f"batch_size={batch_size} does not fit: the {what} step needs {_size(needed)} per "
      f"device (XLA's memory analysis) but the {jax.local_devices()[0].platform} device has "
      f"{described}; {hint}")


def abstract_batch(config: ml_collections.ConfigDict, batch_sharding):
  """The pre-training step's global batch as shapes, dtypes and its sharding (no data)."""
  import jax  # pylint: disable=g-import-not-at-top
  from cim_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  return {k: jax.ShapeDtypeStruct((config.batch_size,) + v.shape[1:], v.dtype,
                                  sharding=batch_sharding)
          for k, v in state_lib.dummy_batch(config.data, batch_size=1).items()}


def measure(config: ml_collections.ConfigDict) -> MemoryReport:
  """Compiles (does not run) the train step for `config` on the current devices."""
  import jax  # pylint: disable=g-import-not-at-top
  train_step, state, batch, rng, mesh = _abstract_step(config)
  stats = train_step.lower(state, batch, rng).compile().memory_analysis()
  if stats is None:
    raise RuntimeError(f"the {jax.default_backend()} backend reports no memory analysis")
  return MemoryReport(
      devices=jax.device_count(), mesh=dict(mesh.shape),
      per_device_batch=config.batch_size // jax.device_count(),
      num_params=sum(int(x.size) for x in jax.tree.leaves(state.params)),
      params=_per_device_bytes(state.params), optimizer=_per_device_bytes(state.opt_state),
      target=_per_device_bytes(state.target_params),
      model_state=_per_device_bytes(state.model_state), batch=_per_device_bytes(batch),
      arguments=stats.argument_size_in_bytes, outputs=stats.output_size_in_bytes,
      aliased=stats.alias_size_in_bytes, temp=stats.temp_size_in_bytes,
      generated_code=stats.generated_code_size_in_bytes,
      peak=int(getattr(stats, "peak_memory_in_bytes", 0) or 0))


def format_report(report: MemoryReport, config: ml_collections.ConfigDict, backend: str) -> str:
  """A small table in GiB per device."""
  mesh = " x ".join(f"{k}={v}" for k, v in report.mesh.items())
  rows = [
      ("params (online)", report.params),
      ("optimizer state", report.optimizer),
      ("EMA target", report.target),
      ("model state (BatchNorm)", report.model_state),
      ("input batch", report.batch),
      ("activations / temporaries", report.temp),
      ("new state not written in place", report.outputs - report.aliased),
      ("total during the step", report.total),
  ]
  lines = [f"{config.model.variant}  batch {config.batch_size} ({report.per_device_batch} per "
           f"device)  dtype {config.model.dtype}  remat {config.model.remat}  accum "
           f"{config.optim.accum_steps}  ({report.num_params / 1e6:.1f}M online parameters)",
           f"{report.devices} {backend} devices, mesh {mesh}; per device:"]
  lines += [f"  {name:<32}{value / GIB:9.3f} GiB" for name, value in rows]
  if report.peak and backend != "cpu":
    lines.append(f"  {'XLA-reported peak':<32}{report.peak / GIB:9.3f} GiB")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  config, flags = cli.parse_or_exit(argv, default_config="configs/cim_vit_base.py", flags=FLAGS,
                                    validate=False, prog="cim_jax.tools.memory")
  try:
    devices = int(flags["devices"])
  except ValueError:
    devices = -1
  if devices < 0:
    cli.exit_on_config_error(_fail, f"--devices={flags['devices']} must be a number >= 0")
  if flags["json"] not in ("true", "false"):
    cli.exit_on_config_error(_fail, f"--json={flags['json']} must be true or false")
  import jax  # pylint: disable=g-import-not-at-top
  if devices:  # must precede the first use of the CPU backend
    jax.config.update("jax_num_cpu_devices", devices)
    if jax.default_backend() != "cpu":
      cli.exit_on_config_error(_fail, "--devices only applies to CPU; on an accelerator the "
                               "mesh is the devices present")
  cli.exit_on_config_error(cli.config_validation.validate, config)
  report = measure(config)
  if flags["json"] == "true":
    print(json.dumps(dict(dataclasses.asdict(report), total=report.total)))
  else:
    print(format_report(report, config, jax.default_backend()))


def _fail(message: str):
  raise cli.config_validation.ConfigError(message)


if __name__ == "__main__":
  main()
