"""Checks of every user-supplied path before any compilation: one `ConfigError` line each.

A run that would fail minutes later (after compiling, or at its first checkpoint) on a mistyped
data root, an unprepared TFDS split, a missing `init_from` or an unwritable work dir stops here
instead (the entry points print `error: ...` and exit with status 2).
"""

import os
import uuid

from etils import epath

from cim_jax.data import sources
from cim_jax.errors import ConfigError
from cim_jax.train import warm_start



def _is_image(name: str) -> bool:
  return name.lower().endswith(sources.IMAGE_EXTENSIONS) and not name.startswith(".")


def check_imagefolder(root: str, key: str) -> None:
  """`root` is a directory of root/<class>/<image> with at least one image file.

  Stops at the first image found (cheap on ImageNet-sized trees). Images directly under root
  are accepted too (one unnamed class), as `sources.ImageFolderSource` reads them.
  """
  if not root:
    raise ConfigError(f"{key} must name an ImageFolder directory (root/<class>/<image>)")
  if not os.path.exists(root):
    raise ConfigError(f"{key}={root!r} does not exist")
  if not os.path.isdir(root):
    raise ConfigError(f"{key}={root!r} is not a directory (expected root/<class>/<image>)")
  try:
    for _, subdirs, files in os.walk(root, followlinks=True):
      subdirs.sort()
      if any(_is_image(f) for f in files):
        return
  except OSError as e:
    raise ConfigError(f"{key}={root!r} cannot be read: {e.strerror}") from None
  if not os.access(root, os.R_OK | os.X_OK):
    raise ConfigError(f"{key}={root!r} cannot be read: permission denied")
  raise ConfigError(f"{key}={root!r} holds no image files ({', '.join(sources.IMAGE_EXTENSIONS)}); "
                    "expected root/<class>/<image>")


def _tfds_data_dir(data_dir: str) -> str:
  return (data_dir or os.environ.get("TFDS_DATA_DIR")
          or os.path.join(os.path.expanduser("~"), "tensorflow_datasets"))


def check_tfds(name: str, data_dir: str, split: str, key: str,
               split_key: str = "tfds_split") -> None:
  """The TFDS dataset `name` ("name[/config][:version]") is prepared as array_record for every
  split named in `split` ("train", "train[:10%]", "train+validation") under `data_dir`.

  Looks for the files TFDS writes (<data_dir>/<name>[/<config>]/<version>/
  <name>-<split>.array_record-NNNNN-of-NNNNN): no TFDS import, works on gs:// alike.
  """
  if not name:
    raise ConfigError(f"{key}.tfds_name must name a TFDS dataset")
  directory = _tfds_data_dir(data_dir)
  base, _, version = name.partition(":")
  dataset = base.split("/")[0]
  where = epath.Path(directory) / base
  shown = f"{key}.tfds_data_dir={data_dir!r}" if data_dir else f"the TFDS data dir {directory!r}"
  try:
    if not where.is_dir():
      raise ConfigError(f"{key}.tfds_name={name!r}: not prepared in {shown} (no {where}); "
                        "prepare it with `tfds build --file_format=array_record`")
    versions = [where / version] if version else [d for d in where.iterdir() if d.is_dir()]
    files = [f.name for v in versions if v.is_dir() for f in v.iterdir()]
  except OSError as e:
    raise ConfigError(f"{key}.tfds_name={name!r}: cannot read {where}: {e}") from None
  found = sorted({f[len(dataset) + 1:].split(".array_record")[0] for f in files
                  if f.startswith(dataset + "-") and ".array_record" in f})
  for part in split.split("+"):
    wanted = part.split("[")[0].strip()
    if wanted in found:
      continue
    if found:
      detail = f"prepared splits: {', '.join(found)}"
    elif any(".tfrecord" in f for f in files):
      detail = ("it is prepared as tfrecord only; rebuild it with "
                "`tfds build --file_format=array_record`")
    else:
      detail = ("no array_record files; prepare it with "
                "`tfds build --file_format=array_record`")
    raise ConfigError(f"{key}.{split_key}={split!r}: TFDS dataset {name!r} has no split "
                      f"{wanted!r} in {where} ({detail})")


def check_workdir(workdir: str, flag: str = "--workdir") -> None:
  """A local work dir is created and test-written; remote ones (gs://, s3://) are left alone."""
  if "://" in workdir:
    return
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise ConfigError(f"{flag}={workdir!r} is a file, not a directory")
  try:
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f".write_test_{uuid.uuid4().hex}")
    with open(probe, "wb") as f:
      f.write(b"ok")
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f"{flag}={workdir!r} cannot be written: "
                      f"{e.strerror or e} ({e.filename or path})") from None


def check_pretraining(config, workdir: str) -> None:
  """Every path a pre-training run reads or writes (before anything is compiled)."""
  d = config.data
  if d.source == "imagefolder":
    check_imagefolder(d.root, "config.data.root")
    if d.eval_root:
      check_imagefolder(d.eval_root, "config.data.eval_root")
  elif d.source == "tfds":
    check_tfds(d.tfds_name, d.tfds_data_dir, d.tfds_split, "config.data")
    if config.eval.pretext_iou or config.eval.visualize:
      check_tfds(d.tfds_name, d.tfds_data_dir, d.tfds_eval_split, "config.data",
                 "tfds_eval_split")
  warm_start.check_warm_start_path(config.init_from, "config.init_from")
  check_workdir(workdir)
