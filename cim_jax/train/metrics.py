"""Metrics of every trainer: TensorBoard scalars + workdir/metrics.jsonl, written through epath.

The training loop (train/loop.py, both tasks) logs through `MetricsWriter`, so a work dir may
be local or on an object store (gs://, s3://) alike.
"""

import json
import os
from typing import Iterable

import jax
from etils import epath
from tqdm import tqdm

from cim_jax.train.checkpoint import is_local


class JsonlLog:
  """workdir/metrics.jsonl: appended in place locally, rewritten whole on object stores.

  GCS / S3 objects cannot be appended to, so on a non-local work dir every write uploads the
  whole (small: one line per log interval) file: earlier lines, e.g. of a resumed run, are read
  once at start and kept in memory.
  """

  def __init__(self, path: epath.Path):
    self.path = path
    self._append = is_local(path)
    self._lines: list[str] = []
    if self._append:
      self._file = path.open("a", encoding="utf-8")
    elif path.exists():
      self._lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
      if self._lines and not self._lines[-1].endswith("\n"):
        self._lines[-1] += "\n"

  def write(self, record: dict) -> None:
    line = json.dumps(record) + "\n"
    if self._append:
      self._file.write(line)
      self._file.flush()
    else:
      self._lines.append(line)
      self.path.write_text("".join(self._lines), encoding="utf-8")

  def close(self) -> None:
    if self._append:
      self._file.close()


class MetricsWriter:
  """TensorBoard scalars (tag `{prefix}/{name}`) + workdir/metrics.jsonl, on process 0 only."""

  def __init__(self, workdir, prefix: str = "train"):
    workdir = epath.Path(workdir)
    self.prefix = prefix
    self.enabled = jax.process_index() == 0
    if self.enabled:
      # tensorboardX writes gs:// itself (with google-cloud-storage installed) and s3:// via boto.
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self.tb = SummaryWriter(os.fspath(workdir / "tensorboard"))
      self.jsonl = JsonlLog(workdir / "metrics.jsonl")

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    for name, value in scalars.items():
      self.tb.add_scalar(f"{self.prefix}/{name}", value, step)
    self.jsonl.write({"step": step, **scalars})

  def close(self) -> None:
    if self.enabled:
      self.tb.close()
      self.jsonl.close()


def progress(iterable: Iterable, *, enabled: bool, desc: str = "", total: int | None = None
             ) -> Iterable:
  """`tqdm` around `iterable` when enabled (and only on the first process)."""
  if not enabled or jax.process_index() != 0:
    return iterable
  return tqdm(iterable, desc=desc, total=total, leave=False)
