"""Fixtures shared by the test modules; helper functions are in train_fixtures.py.

pyproject.toml puts the repository and tests/ on sys.path: `from train_fixtures import ...`.
"""

import io
import os

# Tests run on the CPU even where libtpu (a test requirement: TPU compilation) is installed;
# subprocesses inherit the setting.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from etils import epath  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest

from cim_jax.train import finetuning
from train_fixtures import XLA_CACHE


@pytest.fixture(scope="module")
def compilation_cache():
  """Shares compiled executables with the other trainer tests and their subprocesses.

  A module opts in with `pytestmark = pytest.mark.usefixtures("compilation_cache")`.
  """
  saved = {key: getattr(jax.config, key) for key in (
      "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")}
  jax.config.update("jax_compilation_cache_dir", XLA_CACHE)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  yield
  for key, value in saved.items():
    jax.config.update(key, value)


@pytest.fixture
def tiny_classifier(monkeypatch):
  """Fine-tuning builds a 2-block classifier of the configured width: fast tests."""
  build = finetuning.build_classifier
  monkeypatch.setattr(finetuning, "build_classifier",
                      lambda config, num_classes: build(config, num_classes).clone(depth=2))


@pytest.fixture
def tensorboard_to_epath(monkeypatch):
  """tensorboardX's own gs:// writer needs google-cloud-storage: write its events via epath."""
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top  (optional)

  class Writer:
    """Like tensorboardX's GCSRecordWriter: buffers, uploads the whole object on flush."""

    def __init__(self, path):
      self.path, self.buffer = epath.Path(path), io.BytesIO()

    def write(self, data):
      self.buffer.write(data)

    def flush(self):
      self.path.write_bytes(self.buffer.getvalue())

    def close(self):
      self.flush()

  class Factory:

    def open(self, path):
      return Writer(path)

    def directory_check(self, path):
      del path

  monkeypatch.setitem(record_writer.REGISTERED_FACTORIES, "gs", Factory())
