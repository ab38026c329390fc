"""Device mesh, parameter / batch shardings and multi-host start-up (no pmap anywhere)."""

import logging
import os

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cim_jax.errors import ConfigError

DATA_AXES = ("data", "fsdp")  # the batch is split over every device, fsdp devices included


def maybe_initialize_distributed() -> bool:
  """Calls jax.distributed.initialize() when the environment describes a multi-process run.

  Explicit: JAX_COORDINATOR_ADDRESS (+ JAX_NUM_PROCESSES, JAX_PROCESS_ID); auto-detected: a
  multi-task SLURM or Open MPI job, a multi-host Cloud TPU slice (GKE: TPU_WORKER_HOSTNAMES;
  GCE TPU VMs: JAX's metadata-server detection). Must run before any JAX computation. Returns
  True when it initialised.
  """
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    kwargs = {"coordinator_address": env["JAX_COORDINATOR_ADDRESS"]}
    if env.get("JAX_NUM_PROCESSES"):
      kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
    if env.get("JAX_PROCESS_ID"):
      kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
    if env.get("JAX_LOCAL_DEVICE_IDS"):
      kwargs["local_device_ids"] = [int(i) for i in env["JAX_LOCAL_DEVICE_IDS"].split(",")]
    jax.distributed.initialize(**kwargs)
    return True
  multi_task = (int(env.get("SLURM_NTASKS", "1")) > 1
                or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
                or "," in env.get("TPU_WORKER_HOSTNAMES", "")
                or _detected_multiprocess_cluster() is not None)
  if multi_task:
    jax.distributed.initialize()  # no arguments: JAX's own cluster detection fills them in
    return True
  return False


def _cluster_types() -> list:
  """JAX's cluster detectors (GCE / GKE TPU VMs, SLURM, Open MPI, k8s); private API, may move."""
  from jax._src import clusters  # pylint: disable=g-import-not-at-top
  detectors = clusters.ClusterEnv._cluster_types  # pylint: disable=protected-access
  return [c for c in detectors if not c.opt_in_only_method]


def _detected_multiprocess_cluster() -> str | None:
  """Name of the cluster JAX's auto-detection finds when it has > 1 process, else None.

  A GCE TPU VM slice keeps its worker list in the metadata server, not in the environment; JAX
  reads it (only where libtpu found TPU chips, so CPU / GPU machines make no metadata query).
  """
  try:
    for cluster in _cluster_types():
      if cluster.is_env_present():
        processes = cluster.get_process_count()
        return cluster.__name__ if processes > 1 else None
  except Exception as e:  # pylint: disable=broad-except  (detection is best effort)
    logging.warning("JAX cluster detection failed (%s: %s); assuming a single process",
                    type(e).__name__, e)
  return None


def make_mesh(fsdp: int = 1, devices=None) -> Mesh:
  """A ('data', 'fsdp') mesh over all devices of all processes (or `devices`, e.g. a described
  TPU slice); data = devices / fsdp."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if fsdp < 1 or n % fsdp:
    raise ConfigError(f"mesh.fsdp={fsdp} must be >= 1 and divide the device count {n}")
  try:
    grid = mesh_utils.create_device_mesh((n // fsdp, fsdp), devices,
                                         allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices).reshape(n // fsdp, fsdp)
  return Mesh(grid, ("data", "fsdp"))


def local_data_mesh() -> Mesh:
  """A one-axis ('data',) mesh over this process's devices (evaluation: no parameter sharding)."""
  return Mesh(np.asarray(jax.local_devices()), ("data",))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over every device."""
  return NamedSharding(mesh, P(DATA_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape, fsdp: int, min_elements: int = 1024) -> P:
  """big_vision-style rule: shard the largest dimension divisible by fsdp; small leaves replicate."""
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_elements:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  logging.info("fsdp: no dimension of %s divisible by %d; replicating", shape, fsdp)
  return P()


def state_shardings(mesh: Mesh, abstract_tree, min_elements: int = 1024):
  """NamedShardings for every leaf of a (shape-only) pytree: replicated, or fsdp-sharded."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(
      lambda x: NamedSharding(mesh, fsdp_spec(x.shape, fsdp, min_elements)), abstract_tree)


def global_batch(local_batch, sharding: NamedSharding):
  """Process-local numpy batch -> global jax.Array batch (each process holds its own rows)."""
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def to_host(tree):
  """Every leaf as a whole numpy array on every process.

  A leaf sharded over other processes' devices (fsdp across hosts) is all-gathered; this is a
  collective, so every process must call it at the same point.
  """
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  def fetch(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

  return jax.tree.map(fetch, tree)


def process_batch_size(global_batch_size: int) -> int:
  """This process's share of the global batch, with a clear error when it does not split."""
  n_dev, n_proc = jax.device_count(), jax.process_count()
  if global_batch_size % n_dev:
    raise ConfigError(f"batch_size={global_batch_size} must be divisible by the number of "
                      f"devices ({n_dev})")
  return global_batch_size // n_proc


def pad_rows(batch: np.ndarray, size: int) -> np.ndarray:
  """`batch` with copies of its last row appended up to `size` rows (one compiled shape for a
  short last batch; the caller drops the padded rows' outputs)."""
  return np.concatenate([batch, np.repeat(batch[-1:], size - len(batch), axis=0)])
