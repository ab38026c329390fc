"""Will a step fit? Per-device bytes of a compiled step against the device's memory.

Both trainers compile their step once through `compile_step_that_fits`, so a batch that cannot
fit stops with one line (what it needs, what the device has, the largest batch that fits)
before the first step; `cim_jax.tools.compile_for` prints the same figures for any config, mesh
and target.
"""

import os

import jax
import ml_collections
import numpy as np

from cim_jax.errors import ConfigError
from cim_jax.train import state as state_lib

GIB = 1024**3


def step_total(arguments: int, outputs: int, aliased: int, temp: int, generated_code: int
                ) -> int:
  """The one formula for a step's per-device bytes (the report and the trainers' check)."""
  return arguments + outputs - aliased + temp + generated_code


def per_device_bytes(tree) -> int:
  """Bytes one device holds of a pytree of ShapeDtypeStructs with (Named)shardings."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shard_shape = leaf.sharding.shard_shape(leaf.shape)
    total += int(np.prod(shard_shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
  return total


def compiled_bytes(compiled) -> int | None:
  """Per-device bytes of a compiled step (XLA's memory analysis), None where not reported."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  return step_total(stats.argument_size_in_bytes, stats.output_size_in_bytes,
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
  compiled = step.lower(*args).compile()
  needed = compiled_bytes(compiled)
  available, described = device_memory() if memory is None else memory
  if needed is None or available is None or needed <= available:
    return compiled
  stats = compiled.memory_analysis()
  fits = largest_batch(
      needed, available, batch_size=batch_size, temp=stats.temp_size_in_bytes,
      batch_bytes=per_device_bytes(args[1]), gradient_bytes=per_device_bytes(args[0].params),
      devices=jax.device_count())
  hint = (f"the largest batch that fits is about {fits} (--config.batch_size={fits})" if fits
          else "no batch fits: the state alone is too large for this device (shard it: "
          "--config.mesh.fsdp, or a smaller model.variant)")
  raise ConfigError(
      f"batch_size={batch_size} does not fit: the {what} step needs {_size(needed)} per "
      f"device (XLA's memory analysis) but the {jax.local_devices()[0].platform} device has "
      f"{described}; {hint}")


def abstract_batch(config: ml_collections.ConfigDict, batch_sharding):
  """The pre-training step's global batch as shapes, dtypes and its sharding (no data)."""
  return {k: jax.ShapeDtypeStruct((config.batch_size,) + v.shape[1:], v.dtype,
                                  sharding=batch_sharding)
          for k, v in state_lib.dummy_batch(config.data, batch_size=1).items()}
