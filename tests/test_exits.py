"""Every exit of `python -m cim_jax.pretrain`, run as a user runs it: user-supplied paths checked
before any compilation (one line, exit 2), the default held-out subset of an ImageFolder, and
clean stops (no traceback, no asyncio noise) on a normal end, a non-finite loss, SIGTERM,
Ctrl-C and a checkpoint that cannot be written."""

import logging
import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from cim_jax import errors
from cim_jax.train import preflight
from cim_jax.data import sources
from train_fixtures import committed, read_metrics, REPO, subprocess_env, tiny_config
from train_fixtures import tiny_config_file

TESTS = os.path.dirname(os.path.abspath(__file__))
NO_EVAL = ["--config.eval.pretext_iou=false", "--config.eval.knn=false",
           "--config.eval.visualize=false"]

# Makes the commit (rename) of checkpoint step $FAIL_STEP fail with ENOSPC inside orbax's
# background save thread, then runs the pre-training entry point.
ENOSPC_RUNNER = """
import errno, os, runpy
from orbax.checkpoint._src.path import async_path
rename = async_path.rename
async def failing_rename(src, dst):
  if os.path.basename(str(dst)) == os.environ["FAIL_STEP"]:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
  return await rename(src, dst)
async_path.rename = failing_rename
runpy.run_module("cim_jax.pretrain", run_name="__main__", alter_sys=True)
"""


def write_images(root, layout=None, size=(48, 40)):
  """root/<class>/<name> tiny PNG / JPEG files; returns root as str."""
  layout = layout or {f"{c}/{i}.{'png' if i % 2 else 'jpg'}": (40 * i, 90, 30 * j)
                      for j, c in enumerate("ab") for i in range(5)}
  for rel, colour in layout.items():
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path)
  return str(root)


def command(tmp_path, workdir, *overrides, runner=None):
  config_file = tiny_config_file(tmp_path)
  start = ["-c", runner] if runner else ["-m", "cim_jax.pretrain"]
  return [sys.executable, *start, f"--config={config_file}", f"--workdir={workdir}", *overrides]


def run(cmd, **env):
  return subprocess.run(cmd, cwd=REPO, env=subprocess_env(**env), capture_output=True, text=True,
                        timeout=300)


def assert_clean(stderr):
  assert "Traceback" not in stderr and "never retrieved" not in stderr, stderr[-3000:]
  assert "internal error" not in stderr, stderr[-3000:]


def error_lines(stderr):
  return [line for line in stderr.splitlines() if line.startswith("error: ")]


# ---- Part 1: paths checked before any compilation ----

def _config(**data):
  config = tiny_config()
  config.data.update(data)
  return config


@pytest.mark.parametrize("make,message", [
    (lambda p: str(p / "missing"), "config.data.root='{}' does not exist"),
    (lambda p: (p / "file.txt").write_text("x") and str(p / "file.txt"), "is not a directory"),
    (lambda p: (p / "cls").mkdir() or str(p), "holds no image files"),
    (lambda p: (p / "cls").mkdir() or (p / "cls" / "a.txt").write_text("x") and str(p),
     "holds no image files"),
])
def test_bad_imagefolder_root_is_one_config_error(tmp_path, make, message):
  root = make(tmp_path)
  with pytest.raises(errors.ConfigError, match=message.format(root).replace("(", r"\(")):
    preflight.check_pretraining(_config(source="imagefolder", root=root), str(tmp_path / "w"))


def test_bad_eval_root_tfds_init_from_and_workdir(tmp_path):
  root = write_images(tmp_path / "imgs")
  workdir = str(tmp_path / "w")
  check = preflight.check_pretraining
  with pytest.raises(errors.ConfigError, match="config.data.eval_root=.* does not"):
    check(_config(source="imagefolder", root=root, eval_root=str(tmp_path / "no")), workdir)
  fixture = os.path.join(TESTS, "fixtures", "tfds")
  with pytest.raises(errors.ConfigError, match="'imagenet2012': not prepared in"):
    check(_config(source="tfds", tfds_name="imagenet2012", tfds_data_dir=fixture), workdir)
  with pytest.raises(errors.ConfigError,
                     match=r"tfds_split='test'.*prepared splits: train, validation"):
    check(_config(source="tfds", tfds_name="cim_tiny_photos", tfds_data_dir=fixture,
                  tfds_split="test"), workdir)
  check(_config(source="tfds", tfds_name="cim_tiny_photos", tfds_data_dir=fixture,
                tfds_split="train[:50%]"), workdir)  # prepared: passes
  for init_from, message in [(str(tmp_path / "none"), "no such work dir"),
                             (str(tmp_path), "no finished checkpoint in"),
                             (os.path.join(root, "a", "0.jpg"), "not a work dir or a weights")]:
    config = tiny_config(init_from=init_from)
    with pytest.raises(errors.ConfigError, match=f"config.init_from=.*{message}"):
      check(config, workdir)
  with pytest.raises(errors.ConfigError, match="--workdir=.* cannot be written"):
    check(tiny_config(), os.path.join(root, "a", "0.jpg", "run"))
  check(tiny_config(), workdir)
  assert os.path.isdir(workdir) and os.listdir(workdir) == []  # created, probe removed


def test_missing_data_root_stops_in_one_line_before_compiling(tmp_path):
  out = run(command(tmp_path, tmp_path / "w", "--config.data.source=imagefolder",
                    f"--config.data.root={tmp_path / 'nonexistent'}"))
  assert out.returncode == 2, out.stderr[-3000:]
  assert out.stderr.strip() == (f"error: config.data.root='{tmp_path / 'nonexistent'}' "
                                "does not exist")


# ---- Part 1: the default held-out subset of an ImageFolder ----

def test_heldout_subset_is_small_disjoint_and_stable(tmp_path, caplog):
  root = write_images(tmp_path / "imgs")
  everything = sources.ImageFolderSource(root)
  data = _config(source="imagefolder", root=root).data
  with caplog.at_level(logging.INFO):
    train = sources.make_source(data, "train")
  heldout = sources.make_source(data, "heldout")
  assert len(heldout) == sources.heldout_count(10) == 1
  assert sorted(train.paths + heldout.paths) == everything.paths
  assert not set(train.paths) & set(heldout.paths)
  assert "1 of the 10 images under" in caplog.text and "held out" in caplog.text
  # The choice depends on the relative paths alone: a copy elsewhere holds out the same file.
  copy = write_images(tmp_path / "copy")
  again = sources.ImageFolderSource(copy, subset="heldout")
  assert [os.path.relpath(p, copy) for p in again.paths] == [
      os.path.relpath(p, root) for p in heldout.paths]
  # More images: the share stays small, at most HELDOUT_MAX.
  assert sources.heldout_count(1000) == 20 and sources.heldout_count(10 ** 6) == 256


# ---- Part 2: clean exits ----

def test_normal_end_on_an_imagefolder_without_eval_root(tmp_path):
  root = write_images(tmp_path / "imgs")
  workdir = tmp_path / "w"
  out = run(command(tmp_path, workdir, "--config.num_train_steps=2",
                    "--config.data.source=imagefolder", f"--config.data.root={root}",
                    "--config.eval.pretext_iou=true", "--config.eval.knn=false",
                    "--config.eval.visualize=false", "--config.eval.num_heldout_pairs=2"))
  assert out.returncode == 0, out.stderr[-3000:]
  assert_clean(out.stderr)
  assert "1 of the 10 images under" in out.stderr
  assert committed(workdir, 2) and (workdir / "report.json").exists()


def test_non_finite_loss_stops_in_one_line_keeping_the_last_checkpoint(tmp_path):
  workdir = tmp_path / "w"
  # Step 1 runs at learning rate 0 (warm-up) and is saved; a later step diverges.
  out = run(command(tmp_path, workdir, *NO_EVAL, "--config.optim.base_lr=1e30",
                    "--config.optim.warmup_steps=3", "--config.checkpoint_every_steps=1"))
  assert out.returncode == 1, out.stderr[-3000:]
  assert_clean(out.stderr)
  (line,) = error_lines(out.stderr)
  assert "non-finite loss or gradient at step" in line
  bad = int(line.split("at step ")[1].split(" ")[0])
  assert bad >= 2, line
  assert f"Last good checkpoint: step {bad - 1} in {workdir}/checkpoints (kept" in line, line
  assert sorted(int(s) for s in os.listdir(workdir / "checkpoints")) == list(range(1, bad))


@pytest.mark.parametrize("signum,status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_checkpoints_the_current_step_and_exits(tmp_path, signum, status):
  workdir = tmp_path / "w"
  proc = subprocess.Popen(
      command(tmp_path, workdir, *NO_EVAL, "--config.num_train_steps=100000",
              "--config.checkpoint_every_steps=100000"),
      cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 240
  while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    assert time.time() < deadline, "no step logged"
    time.sleep(0.05)
  proc.send_signal(signum)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == status, stderr[-3000:]
  assert_clean(stderr)
  last = max(read_metrics(workdir))
  assert committed(workdir, last), f"no checkpoint at step {last}"
  assert f"stopped by {signal.Signals(signum).name}: checkpoint of step {last} written" in stderr


# ---- Part 3: a checkpoint that cannot be written ----

def test_checkpoint_write_failure_stops_naming_the_step_and_the_run_resumes(tmp_path, caplog):
  workdir = tmp_path / "w"
  out = run(command(tmp_path, workdir, *NO_EVAL, runner=ENOSPC_RUNNER), FAIL_STEP=4)
  assert out.returncode == 1, out.stderr[-3000:]
  assert_clean(out.stderr)
  assert error_lines(out.stderr) == [
      "error: checkpoint of step 4 could not be written: No space left on device; the last "
      "good checkpoint is step 2"], out.stderr[-3000:]
  assert [line for line in out.stderr.splitlines() if line.strip()] == error_lines(out.stderr)
  assert committed(workdir, 2) and not committed(workdir, 4)
  # The next run resumes from step 2 and finishes.
  out = run(command(tmp_path, workdir, *NO_EVAL))
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"resuming from {workdir}/checkpoints step 2" in out.stderr
  assert all(committed(workdir, s) for s in (2, 4, 6))


def test_evaluation_checkpoint_without_a_finished_checkpoint_is_one_line(tmp_path):
  out = subprocess.run([sys.executable, "-m", "cim_jax.evaluate.knn",
                        "--config=configs/cim_eval.py:Ti/16", f"--config.init_from={tmp_path}"],
                       cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 2, out.stderr[-3000:]
  assert out.stderr.strip() == (f"error: config.init_from='{tmp_path}': no finished checkpoint "
                                f"in {tmp_path} (expected the work dir of a run, holding "
                                "checkpoints/<step>/, or a weights file)")
