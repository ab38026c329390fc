"""Every entry point's work dir on an object store: pre-training, its resume and fine-tuning
(warm-started from the remote pre-training run, resumed, evaluated) on gs:// paths.

No network. gs:// is routed (fsspec's registry, which epath uses) to a file system that
behaves like GCS where it matters here (no appends) and keeps its objects under a local
directory outside the current one. What this covers and what it does not:
  * every read and write the project makes itself (work dir creation, metrics.jsonl and
    TensorBoard through the shared metrics writer, fine-tuning's checkpoint check, warm-start
    and init_from existence checks) goes through epath: a local-only call (os.makedirs,
    open(..., "a"), os.listdir) on a gs:// string either fails (appends are refused, the
    directory is missing) or writes below the current directory, which must stay empty;
  * orbax's array writes are not: for a gs:// directory orbax hands tensorstore its own GCS
    driver, which needs the network. `checkpoint.absolute` (the one place the project gives
    orbax its directory) is patched to hand orbax the local directory behind the fake bucket,
    so checkpoints land where epath reads them back (fine-tuning's checkpoint check and the
    warm start from gs:// see them). orbax's and tensorstore's own GCS support is theirs.
"""

import importlib
import os

import pytest
from etils import epath
from etils.epath import backend as epath_backend

from test_finetune import tiny_config as tiny_finetune_config
from test_finetune import tiny_labelled_subset
from train_fixtures import tiny_config

from cim_jax.evaluate import finetune
from cim_jax.train import checkpoint, loop

BUCKET = "gs://cim-remote-bucket"


@pytest.fixture
def fake_gcs_on_disk(monkeypatch, tmp_path_factory):
  """gs://NAME/... -> BACKING/NAME/... (no appends); orbax gets the backing path."""
  from fsspec.implementations.local import LocalFileSystem  # pylint: disable=g-import-not-at-top
  backing = str(tmp_path_factory.mktemp("bucket_objects"))

  class FakeGcs(LocalFileSystem):
    protocol = ("gs", "gcs")

    @classmethod
    def _strip_protocol(cls, path):
      path = os.fspath(path)
      for prefix in ("gs://", "gcs://"):
        if path.startswith(prefix):
          return os.path.join(backing, path[len(prefix):]).rstrip("/")
      return super()._strip_protocol(path)

    def __init__(self, *args, finalize_on_close=False, **kwargs):
      del finalize_on_close  # a gcsfs option epath passes
      super().__init__(*args, auto_mkdir=True, **kwargs)  # objects need no parent directory

    def _open(self, path, mode="rb", **kwargs):
      if "a" in mode:
        raise NotImplementedError("GCS objects cannot be appended to")
      return super()._open(path, mode, **kwargs)

  registry = importlib.import_module("fsspec.registry")
  for protocol in FakeGcs.protocol:  # undone at teardown
    monkeypatch.setitem(registry._registry, protocol, FakeGcs)  # pylint: disable=protected-access
  FakeGcs.clear_instance_cache()
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  absolute = checkpoint.absolute
  monkeypatch.setattr(checkpoint, "absolute", lambda path: absolute(
      FakeGcs._strip_protocol(path) if os.fspath(path).startswith("gs://") else path))  # pylint: disable=protected-access
  cwd = tmp_path_factory.mktemp("cwd")
  monkeypatch.chdir(cwd)  # anything written locally by mistake would land here
  yield backing
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  FakeGcs.clear_instance_cache()
  assert not os.listdir(cwd), f"wrote locally instead of to gs://: {os.listdir(cwd)}"


def _steps(path):
  import json  # pylint: disable=g-import-not-at-top
  return [json.loads(line)["step"] for line in epath.Path(path).read_text().splitlines()]


def finetune_config(steps):
  config = tiny_finetune_config(steps=steps)
  config.model.variant = "Mu/16"  # the pre-training fixture's encoder
  config.log_every_steps = 1
  config.eval_every_steps = 2
  config.checkpoint_every_steps = 2
  return config


def test_pretraining_resume_and_finetuning_on_gcs(fake_gcs_on_disk, tensorboard_to_epath,
                                                  monkeypatch):
  pre = f"{BUCKET}/pretrain"
  loop.train(tiny_config(num_train_steps=2), pre)
  resumed = loop.train(tiny_config(num_train_steps=4), pre)  # resumes at 2
  assert resumed.metrics["step"] == 4
  assert _steps(f"{pre}/metrics.jsonl") == [1, 2, 3, 4]
  assert list(epath.Path(pre, "tensorboard").iterdir())
  assert {p.name for p in epath.Path(pre, "checkpoints").iterdir()} >= {"2", "4"}

  tiny_labelled_subset(monkeypatch)
  ft = f"{BUCKET}/finetune"
  config = finetune_config(steps=2)
  config.init_from = pre
  first = finetune.finetune(config, ft)
  assert first["step"] == 2
  config.num_train_steps = 4
  second = finetune.finetune(config, ft)  # checks the gs:// checkpoint, then resumes at 2
  assert second["step"] == 4
  assert _steps(f"{ft}/metrics.jsonl") == [1, 2, 3, 4]
  assert list(epath.Path(ft, "tensorboard").iterdir())
  evaluated = finetune.finetune(config, ft, eval_only=True)
  assert evaluated["step"] == 4 and evaluated["top1"] == second["last_top1"]
  other = finetune_config(steps=1)
  other.model.variant = "Ti/16"
  with pytest.raises(ValueError, match="holds a fine-tuned Mu/16"):  # read through epath
    finetune.finetune(other, ft)
