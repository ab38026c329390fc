"""Per-device memory of one CIM train step for a config and mesh, without running a step.

python -m cim_jax.tools.memory --config=configs/cim_pretrain.py:B/16 [--config.key=value ...]
    [--devices=N] [--json=true]

The trainer's own step is compiled for abstract inputs (shapes and shardings only), and XLA's
`compile().memory_analysis()` gives the step's buffers per device. The state is split into
params, optimizer state and EMA target from the shardings the trainer uses. Run it on the target
accelerator for its numbers; on CPU `--devices=N` lays out N host devices (a pod's mesh) and gives
the CPU compiler's estimate, whose temporaries (activations) can differ from TPU/GPU.
"""

import dataclasses
import json
import sys

import jax
import ml_collections

from cim_jax import cli
from cim_jax import config_validation
from cim_jax import sharding
from cim_jax.errors import ConfigError
from cim_jax.models import cim
from cim_jax.train import memory
from cim_jax.train import schedules
from cim_jax.train import step as step_lib

FLAGS = {"devices": "0", "json": "false"}


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
    return memory.step_total(self.arguments, self.outputs, self.aliased, self.temp,
                       self.generated_code)


def _abstract_step(config: ml_collections.ConfigDict):
  """The trainer's jitted step and abstract (shape + sharding) arguments, as loop.train builds them."""

  mesh = sharding.make_mesh(config.mesh.fsdp)
  model = cim.build_model(config.model, config.data)
  # Schedules change constants, not buffers: any data set size gives the same memory.
  counts = schedules.step_counts(config, num_examples=config.batch_size)
  trainer = step_lib.build_trainer(config, model, mesh, counts)
  state = trainer.abstract_sharded_state()
  batch = memory.abstract_batch(config, trainer.batch_sharding)
  key = jax.eval_shape(lambda: jax.random.PRNGKey(config.seed))
  rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(mesh))
  return trainer.train_step, state, batch, rng, mesh


def measure(config: ml_collections.ConfigDict) -> MemoryReport:
  """Compiles (does not run) the train step for `config` on the current devices."""
  train_step, state, batch, rng, mesh = _abstract_step(config)
  stats = train_step.lower(state, batch, rng).compile().memory_analysis()
  if stats is None:
    raise RuntimeError(f"the {jax.default_backend()} backend reports no memory analysis")
  return MemoryReport(
      devices=jax.device_count(), mesh=dict(mesh.shape),
      per_device_batch=config.batch_size // jax.device_count(),
      num_params=sum(int(x.size) for x in jax.tree.leaves(state.params)),
      params=memory.per_device_bytes(state.params), optimizer=memory.per_device_bytes(state.opt_state),
      target=memory.per_device_bytes(state.target_params),
      model_state=memory.per_device_bytes(state.model_state), batch=memory.per_device_bytes(batch),
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
  lines += [f"  {name:<32}{value / memory.GIB:9.3f} GiB" for name, value in rows]
  if report.peak and backend != "cpu":
    lines.append(f"  {'XLA-reported peak':<32}{report.peak / memory.GIB:9.3f} GiB")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  config, flags = cli.parse_or_exit(argv, default_config="configs/cim_pretrain.py:B/16",
                                    flags=FLAGS, validate=False, prog="cim_jax.tools.memory")
  try:
    devices = int(flags["devices"])
  except ValueError:
    devices = -1
  if devices < 0:
    cli.exit_on_config_error(_fail, f"--devices={flags['devices']} must be a number >= 0")
  if flags["json"] not in ("true", "false"):
    cli.exit_on_config_error(_fail, f"--json={flags['json']} must be true or false")
  if devices:  # must precede the first use of the CPU backend
    jax.config.update("jax_num_cpu_devices", devices)
    if jax.default_backend() != "cpu":
      cli.exit_on_config_error(_fail, "--devices only applies to CPU; on an accelerator the "
                               "mesh is the devices present")
  cli.exit_on_config_error(config_validation.validate, config, kind="pretraining")
  report = measure(config)
  if flags["json"] == "true":
    print(json.dumps(dict(dataclasses.asdict(report), total=report.total)))
  else:
    print(format_report(report, config, jax.default_backend()))


def _fail(message: str):
  raise ConfigError(message)


if __name__ == "__main__":
  main()
