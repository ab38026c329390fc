"""Work dirs on object stores: the loop's logs, warm starts and the report through gs:// paths.

No network: an in-memory fsspec file system is registered for the gs:// protocol, the one epath
(and so the code) reaches gs:// through. Like GCS it has no directories and refuses appends.
"""

import importlib
import io
import json
import os

import numpy as np
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from PIL import Image

from train_fixtures import tiny_config

from cim_jax.train import warm_start
from cim_jax import sharding
from cim_jax.evaluate import report, visualize
from cim_jax.train import metrics as metrics_lib

BUCKET = "gs://cim-test-bucket"


@pytest.fixture
def fake_gcs(monkeypatch, tmp_path):
  """Routes gs:// through a fresh in-memory file system; the cwd is an empty temp dir."""
  pytest.importorskip("fsspec")
  from fsspec.implementations.memory import MemoryFileSystem  # pylint: disable=g-import-not-at-top

  class FakeGcs(MemoryFileSystem):
    protocol = ("gs", "gcs")
    store, pseudo_dirs = {}, [""]

    @classmethod
    def _strip_protocol(cls, path):
      path = os.fspath(path)
      for prefix in ("gs://", "gcs://"):
        if path.startswith(prefix):
          path = path[len(prefix):]
      return super()._strip_protocol(path)

    def __init__(self, *args, finalize_on_close=False, **kwargs):
      del finalize_on_close  # a gcsfs option epath passes
      super().__init__(*args, **kwargs)

    def _open(self, path, mode="rb", **kwargs):
      if "a" in mode:
        raise NotImplementedError("GCS objects cannot be appended to")
      return super()._open(path, mode, **kwargs)

  registry = importlib.import_module("fsspec.registry")  # `fsspec.registry` is a mapping
  for protocol in FakeGcs.protocol:  # undone at teardown
    monkeypatch.setitem(registry._registry, protocol, FakeGcs)  # pylint: disable=protected-access
  FakeGcs.clear_instance_cache()
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  monkeypatch.chdir(tmp_path)  # anything written locally by mistake would land here
  yield FakeGcs
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  FakeGcs.clear_instance_cache()
  assert not os.listdir(tmp_path), f"wrote locally instead of to gs://: {os.listdir(tmp_path)}"


def _records(path):
  return [json.loads(line) for line in epath.Path(path).read_text().splitlines()]


def test_fake_gcs_behaves_like_an_object_store(fake_gcs):
  path = epath.Path(BUCKET) / "a.txt"
  path.write_text("x")
  assert path.exists() and path.read_text() == "x"
  with pytest.raises(NotImplementedError):
    path.open("a")


def test_metrics_writer_logs_to_gcs_and_keeps_lines_of_earlier_runs(fake_gcs, tensorboard_to_epath):
  workdir = epath.Path(BUCKET) / "run"
  workdir.mkdir(parents=True, exist_ok=True)
  first = metrics_lib.MetricsWriter(workdir)
  first.write(1, {"loss": 2.0})
  assert _records(workdir / "metrics.jsonl") == [{"step": 1, "loss": 2.0}]  # visible at once
  first.write(2, {"loss": 1.5})
  first.close()
  resumed = metrics_lib.MetricsWriter(workdir)
  resumed.write(3, {"loss": 1.0})
  resumed.close()
  assert _records(workdir / "metrics.jsonl") == [
      {"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 3, "loss": 1.0}]
  events = list((workdir / "tensorboard").iterdir())
  assert events and all(e.name.startswith("events.out.tfevents") for e in events)
  assert all(e.stat().length > 0 for e in events)


def test_metrics_writer_local_and_gcs_write_the_same_file(fake_gcs, tensorboard_to_epath,
                                                          tmp_path_factory):
  local = epath.Path(tmp_path_factory.mktemp("local_run"))
  remote = epath.Path(BUCKET) / "same"
  for workdir in (local, remote):
    for steps in ((1, 2), (3,)):  # a resume in between
      writer = metrics_lib.MetricsWriter(workdir)
      for step in steps:
        writer.write(step, {"loss": 1.0 / step, "lr": 0.1 * step})
      writer.close()
  assert (remote / "metrics.jsonl").read_text() == (local / "metrics.jsonl").read_text()
  assert len(_records(local / "metrics.jsonl")) == 3


def test_training_curves_and_pngs_read_and_write_gcs(fake_gcs):
  metrics = epath.Path(BUCKET) / "run" / "metrics.jsonl"
  metrics.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)))
  png = visualize.plot_training_curves(os.fspath(metrics), f"{BUCKET}/run/curves.png")
  assert png == f"{BUCKET}/run/curves.png"
  image = Image.open(io.BytesIO(epath.Path(png).read_bytes()))
  assert image.format == "PNG" and image.size == (720, 220)  # one panel: loss


def test_warm_start_from_gcs_msgpack(fake_gcs, tmp_path_factory):
  from cim_jax import interop  # pylint: disable=g-import-not-at-top
  params = {"encoder": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}}
  target = {"encoder": {"w": np.ones((2, 3), np.float32)}}
  local = os.path.join(tmp_path_factory.mktemp("msgpack"), "p.msgpack")
  interop.save(local, params, target, {})
  remote = epath.Path(BUCKET) / "init" / "p.msgpack"
  remote.write_bytes(epath.Path(local).read_bytes())
  warm_start.check_warm_start_path(os.fspath(remote))  # exists: no error
  loaded = warm_start.load_warm_start(os.fspath(remote), model=None, sharding=None)
  np.testing.assert_array_equal(loaded["params"]["encoder"]["w"], params["encoder"]["w"])
  np.testing.assert_array_equal(loaded["target_params"]["encoder"]["w"], target["encoder"]["w"])
  with pytest.raises(ValueError, match="no such work dir or checkpoint file"):
    warm_start.check_warm_start_path(f"{BUCKET}/missing")
  with pytest.raises(ValueError, match="no such file"):
    warm_start.load_warm_start(f"{BUCKET}/missing.pth", model=None, sharding=None)


def test_report_writes_pngs_and_json_to_gcs(fake_gcs):
  from cim_jax.evaluate import pretext  # pylint: disable=g-import-not-at-top
  from cim_jax.models import cim  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  config.eval.pretext_iou = config.eval.visualize = True
  config.eval.num_heldout_pairs = 4
  workdir = f"{BUCKET}/report_run"
  epath.Path(workdir, "metrics.jsonl").write_text(
      json.dumps({"step": 1, "loss": 3.0}) + "\n" + json.dumps({"step": 2, "loss": 2.0}) + "\n")
  model = cim.build_model(config.model, config.data)
  params, target_params, model_state = pretext.random_init_params(model, seed=1)
  result = report.run(config, workdir, params=params, target_params=target_params,
                      model_state=model_state, model=model)
  written = json.loads(epath.Path(workdir, "report.json").read_text())
  assert written == pytest.approx(result)
  for key in ("png/correlation_before", "png/correlation_after", "png/training_curves"):
    assert result[key].startswith(workdir + "/")
    assert Image.open(io.BytesIO(epath.Path(result[key]).read_bytes())).format == "PNG"


# ------------------------------------------------------------------ multi-host detection


class _FakeCluster:
  """Stands in for one of JAX's ClusterEnv detectors."""

  def __init__(self, present, processes):
    self.present, self.processes, self.__name__ = present, processes, f"Fake{processes}"

  def is_env_present(self):
    return self.present

  def get_process_count(self):
    if isinstance(self.processes, Exception):
      raise self.processes
    return self.processes


@pytest.fixture
def no_launcher_env(monkeypatch):
  for key in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
              "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(key, raising=False)
  calls = []
  monkeypatch.setattr(sharding.jax.distributed, "initialize", lambda **kw: calls.append(kw))
  return calls


@pytest.mark.parametrize("clusters, initialises", [
    ([_FakeCluster(False, 4), _FakeCluster(True, 4)], True),  # e.g. a GCE TPU slice (metadata)
    ([_FakeCluster(True, 1), _FakeCluster(True, 4)], False),  # the first present one decides
    ([_FakeCluster(False, 4)], False),
    ([_FakeCluster(True, RuntimeError("metadata server unreachable"))], False),
])
def test_initialises_when_jax_detects_a_multiprocess_cluster(monkeypatch, no_launcher_env,
                                                             clusters, initialises):
  monkeypatch.setattr(sharding, "_cluster_types", lambda: clusters)
  assert sharding.maybe_initialize_distributed() is initialises
  assert no_launcher_env == ([{}] if initialises else [])  # no arguments: JAX detects them


def test_no_cluster_detected_on_this_machine(no_launcher_env):
  assert sharding._detected_multiprocess_cluster() is None  # pylint: disable=protected-access
  assert not sharding.maybe_initialize_distributed() and not no_launcher_env
