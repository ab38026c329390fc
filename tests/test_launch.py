"""The cluster launchers: dry-run command lines, input checks, preemption restarts, and a real
two-process run through the plain multi-node launcher and `python -m cim_jax.pretrain`.

No gcloud or SLURM is needed: dry runs print the commands; a fake `gcloud` on PATH stands in
for the Cloud TPU API where the control flow (re-create after preemption) is under test.
"""

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import textwrap

import jax
import pytest

from cim_jax import cli
from cim_jax import sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JAX_VERSION = re.search(r"^jax==(\S+)", open(os.path.join(REPO, "requirements.txt")).read(),
                        re.M).group(1)
TRICKY_OVERRIDE = "--config.data.root=/data/it's a \"dir\" $HOME;x"


def run_script(script, *args, env=None, cwd=REPO, timeout=60):
  full_env = dict(os.environ)
  full_env.update(env or {})
  return subprocess.run(["bash", script, *args], cwd=cwd, env=full_env, capture_output=True,
                        text=True, timeout=timeout, check=False)


def printed_commands(stdout: str) -> list[list[str]]:
  """The argv of every '+ ' line of a dry run, parsed as a POSIX shell would."""
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def option(argv: list[str], name: str) -> str:
  values = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
  assert len(values) == 1, (name, argv)
  return values[0]


def pretrain_args(words: list[str]) -> list[str]:
  """The arguments after `-m cim_jax.pretrain` in a (remote) command's words."""
  i = words.index("cim_jax.pretrain")
  assert words[i - 1] == "-m"
  end = next((j for j in range(i + 1, len(words)) if words[j] in ("2>&1", "|", "&&", ";")),
             len(words))
  return words[i + 1:end]


# --------------------------------------------------------------------------- Cloud TPU pod

TPU_ARGS = ["--name=cim-b16", "--zone=us-central2-b", "--accelerator-type=v4-32",
            "--workdir=gs://bkt/runs/b16", "--data-dir=gs://bkt/tensorflow_datasets", "--spot",
            "--config=configs/cim_pretrain.py:B/16", "--config.batch_size=1024", TRICKY_OVERRIDE,
            "--skip-compile-check"]


def test_tpu_dry_run_for_a_four_worker_v4_slice():
  result = run_script("launch/tpu_pod.sh", *TPU_ARGS, "--dry-run")
  assert result.returncode == 0, result.stderr
  commands = printed_commands(result.stdout)
  verbs = [c[4] for c in commands if c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"]]
  assert verbs == ["describe", "create", "scp", "ssh", "ssh", "ssh"], result.stdout

  create = next(c for c in commands if c[4:5] == ["create"])
  assert create[5] == "cim-b16"
  assert option(create, "--accelerator-type") == "v4-32"
  assert option(create, "--version") == "tpu-ubuntu2204-base"
  assert option(create, "--zone") == "us-central2-b"
  assert "--spot" in create

  remote = [c for c in commands if c[4:5] in (["ssh"], ["scp"])]
  for c in remote:  # every step reaches every worker of the slice
    assert "--worker=all" in c and option(c, "--zone") == "us-central2-b"
  ship, install, train = (shlex.split(option(c, "--command")) for c in remote[1:])
  assert "tar" in ship and "~/cim-jax" in ship

  # The install step: the pinned requirements plus jax[tpu] of the same jax version.
  assert ["-r", "requirements.txt"] == install[install.index("-r"):install.index("-r") + 2]
  assert f"jax[tpu]=={JAX_VERSION}" in install

  # The training step: the same entry point, GCS work dir and TFDS data dir, overrides intact
  # (through two rounds of shell parsing: the local line and ssh's remote shell) and last.
  args = pretrain_args(train)
  assert args[:2] == ["--config=configs/cim_pretrain.py:B/16", "--workdir=gs://bkt/runs/b16"]
  assert "--config.data.source=tfds" in args
  assert "--config.data.tfds_data_dir=gs://bkt/tensorflow_datasets" in args
  assert args[-2:] == ["--config.batch_size=1024", TRICKY_OVERRIDE]

  # The entry point's own parser accepts that argument list.
  config, flags = cli.parse(args, default_config="", flags={"workdir": ""}, validate=False)
  assert flags["workdir"] == "gs://bkt/runs/b16"
  assert config.batch_size == 1024 and config.data.tfds_data_dir == "gs://bkt/tensorflow_datasets"
  assert config.data.root == "/data/it's a \"dir\" $HOME;x"


def test_tpu_dry_run_per_generation_runtime_git_checkout_and_detach():
  result = run_script("launch/tpu_pod.sh", "--name=p", "--zone=us-east5-a",
                      "--accelerator-type=v5p-64", "--workdir=gs://b/w", "--preemptible",
                      "--repo=https://example.com/cim-jax.git", "--ref=v1.0", "--detach",
                      "--skip-compile-check", "--dry-run")
  assert result.returncode == 0, result.stderr
  commands = printed_commands(result.stdout)
  create = next(c for c in commands if c[4:5] == ["create"])
  assert option(create, "--version") == "v2-alpha-tpuv5" and "--preemptible" in create
  assert not any(c[4:5] == ["scp"] for c in commands)  # cloned, not copied
  ship = option(commands[2], "--command")
  assert "git clone -q https://example.com/cim-jax.git" in ship and "fetch -q origin v1.0" in ship
  train = option(commands[-1], "--command")
  assert train.startswith("nohup bash -c ") and train.endswith("&")
  assert "--config.data.source=tfds" not in train  # no --data-dir: the config's source stands


@pytest.mark.parametrize("args, message", [
    (["--zone=z", "--accelerator-type=v4-8", "--workdir=gs://b/w"], "--name"),
    (["--name=n", "--zone=z", "--accelerator-type=v4-8", "--workdir=/local/dir"], "gs://"),
    (["--name=n", "--zone=z", "--accelerator-type=v9-8", "--workdir=gs://b/w"], "--version"),
    (["--name=n", "--zone=z", "--accelerator-type=v4-8", "--workdir=gs://b/w",
      "--config=configs/nope.py"], "config file not found"),
    (["--name=n", "--bogus"], "unknown argument '--bogus'"),
])
def test_tpu_rejects_bad_input_with_one_line(args, message):
  result = run_script("launch/tpu_pod.sh", *args, "--dry-run")
  assert result.returncode == 2 and message in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1 and not result.stdout


# The pre-flight compiles a 2-block ViT for a 4-chip v5e slice (libtpu on this CPU host).
MU_SLICE = ["--name=mu", "--zone=us-west4-a", "--accelerator-type=v5litepod-4",
            "--workdir=gs://b/mu", "--config=configs/cim_pretrain.py:Ti/16",
            "--config.model.variant=Mu/16", "--config.batch_size=32", "--config.data.search_size=96",
            "--config.data.context_size=64", "--config.data.exemplar_size=32",
            "--config.data.num_exemplars=2", "--dry-run"]


@pytest.mark.slow  # compiles the step for a TPU slice: ~17 s warm
def test_tpu_dry_run_compiles_the_step_for_the_slice_first():
  pytest.importorskip("libtpu", reason="the pre-flight compiles with libtpu (jax[tpu])")
  result = run_script("launch/tpu_pod.sh", *MU_SLICE, env={"PYTHON": sys.executable},
                      timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  preflight = out.index("# pre-flight: compile the train step for v5litepod-4")
  assert "-m cim_jax.tools.compile_for --target=v5litepod-4" in out
  assert "on v5litepod-4 (v5e:2x2)" in out and "fits (needs" in out
  commands = printed_commands(out)
  assert commands[0][1:4] == ["-m", "cim_jax.tools.compile_for", "--target=v5litepod-4"]
  assert [c[4] for c in commands[1:3]] == ["describe", "create"]
  assert out.index("gcloud compute tpus tpu-vm describe") > preflight


def test_tpu_preflight_stops_a_config_that_does_not_fit():
  pytest.importorskip("libtpu", reason="the pre-flight compiles with libtpu (jax[tpu])")
  # A 12288-wide correlation block: ~1.8e9 parameters, whose f32 state alone (params, Adam
  # moments, gradients) outgrows a 16 GiB v5e chip at any batch.
  result = run_script("launch/tpu_pod.sh", *MU_SLICE, "--config.model.decoder_dim=12288",
                      env={"PYTHON": sys.executable}, timeout=600)
  assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
  assert "does not fit" in result.stdout + result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith(
      "tpu_pod.sh: error: pre-flight: the train step does not compile or fit on v5litepod-4")
  assert "tpu-vm" not in result.stdout  # nothing created, nothing shipped


FAKE_GCLOUD = r"""#!/usr/bin/env bash
# A stand-in for the Cloud TPU API: a slice in $FAKE/state; the first training run is preempted.
echo "$4" >> "$FAKE/calls"
case "$4" in
  describe) [ -f "$FAKE/state" ] && cat "$FAKE/state" || exit 1 ;;
  create) echo READY > "$FAKE/state" ;;
  delete) rm -f "$FAKE/state" ;;
  ssh) if [[ "$*" == *cim_jax.pretrain* ]]; then
         echo train >> "$FAKE/calls"
         if [ ! -f "$FAKE/preempted_once" ]; then
           touch "$FAKE/preempted_once"; echo PREEMPTED > "$FAKE/state"; exit 255
         fi
       fi ;;
esac
"""


@pytest.mark.parametrize("max_restarts", [0, 1])
def test_tpu_recreates_a_preempted_slice_and_starts_again(tmp_path, max_restarts):
  fake = tmp_path / "fake"
  (fake / "bin").mkdir(parents=True)
  gcloud = fake / "bin" / "gcloud"
  gcloud.write_text(FAKE_GCLOUD)
  gcloud.chmod(0o755)
  env = {"PATH": f"{fake / 'bin'}:{os.environ['PATH']}", "FAKE": str(fake),
         "TMPDIR": str(tmp_path)}
  result = run_script("launch/tpu_pod.sh", *TPU_ARGS[:6], "--skip-install", "--skip-compile-check",
                      f"--max-restarts={max_restarts}", env=env)
  calls = (fake / "calls").read_text().split()
  first = ["describe", "create", "scp", "ssh", "ssh", "train", "describe"]
  if max_restarts == 0:
    assert result.returncode == 255 and calls == first
    assert "slice state: PREEMPTED" in result.stderr
  else:
    assert result.returncode == 0, result.stderr
    assert calls == first + ["describe", "delete", "create", "scp", "ssh", "ssh", "train"]
    assert "restart 1/1 resumes from gs://bkt/runs/b16" in result.stdout


# --------------------------------------------------------------------------- SLURM


def slurm_env(tasks_per_node: str, job_id: int = 4242) -> dict:
  """What SLURM sets in the batch script of a 2-node x 8-GPU job."""
  return {"DRY_RUN": "1", "SLURM_JOB_ID": str(job_id), "SLURM_JOB_NUM_NODES": "2",
          "SLURM_NTASKS_PER_NODE": tasks_per_node, "SLURM_GPUS_ON_NODE": "8",
          "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_SUBMIT_DIR": REPO}


def run_sbatch(tmp_path, env, *args):
  # SLURM runs a spool copy of the script from elsewhere; so does this test.
  spool = tmp_path / "spool"
  spool.mkdir(exist_ok=True)
  shutil.copy(os.path.join(REPO, "launch/gpu_cluster.sbatch"), spool / "slurm_script")
  return run_script(str(spool / "slurm_script"), *args, env=env, cwd=tmp_path)


def detected_by_jax(monkeypatch, env: dict, local_device_ids):
  """What jax.distributed.initialize() would take from a srun task's SLURM variables."""
  from jax._src import clusters  # pylint: disable=g-import-not-at-top
  for key in list(os.environ):
    if key.startswith(("SLURM_", "OMPI_", "JAX_", "TPU_")):
      monkeypatch.delenv(key)
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  return clusters.ClusterEnv.auto_detect_unset_distributed_params(
      None, None, None, local_device_ids, None, 300)


def test_sbatch_two_nodes_one_process_per_node(tmp_path, monkeypatch):
  result = run_sbatch(tmp_path, slurm_env("1(x2)"), "--config=configs/cim_pretrain.py:B/16",
                      "--workdir=/shared/runs/b16", TRICKY_OVERRIDE)
  assert result.returncode == 0, result.stderr
  [srun] = printed_commands(result.stdout)
  assert srun[:4] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
  assert srun[4].endswith("python") and srun[5:7] == ["-m", "cim_jax.pretrain"]
  assert srun[7:] == ["--config=configs/cim_pretrain.py:B/16", "--workdir=/shared/runs/b16",
                      TRICKY_OVERRIDE]
  assert "# export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in result.stdout
  coordinator = re.search(r"coordinator (\S+)", result.stdout).group(1)
  assert coordinator == f"gpu07:{4242 % 4096 + 61440}"

  # Inside srun, jax finds the same coordinator and this task's rank; all 8 GPUs stay visible.
  task = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_NTASKS": "2",
          "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}
  assert detected_by_jax(monkeypatch, task, list(range(8))) == (coordinator, 2, 1, list(range(8)))


def test_sbatch_two_nodes_one_process_per_gpu(tmp_path, monkeypatch):
  result = run_sbatch(tmp_path, slurm_env("8(x2)"), "--workdir=/shared/runs/b16")
  assert result.returncode == 0, result.stderr
  [srun] = printed_commands(result.stdout)
  assert srun[:3] == ["srun", "--nodes=2", "--ntasks-per-node=8"]
  assert "JAX_LOCAL_DEVICE_IDS" not in result.stdout
  task = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_NTASKS": "16",
          "SLURM_PROCID": "11", "SLURM_LOCALID": "3"}
  assert detected_by_jax(monkeypatch, task, None)[1:] == (16, 11, [3])


def test_sbatch_dry_run_outside_slurm_follows_the_header(tmp_path):
  env = {"DRY_RUN": "1", "SLURM_SUBMIT_DIR": REPO, "SLURM_JOB_ID": ""}
  result = run_sbatch(tmp_path, env, "--workdir=/shared/w")
  assert result.returncode == 0, result.stderr
  [srun] = printed_commands(result.stdout)
  assert srun[1:3] == ["--nodes=2", "--ntasks-per-node=1"]


@pytest.mark.parametrize("env_update, args, message", [
    ({"SLURM_NTASKS_PER_NODE": "3"}, ["--workdir=/w"], "must be 1 (per node) or 8 (per GPU)"),
    ({}, ["--config=c.py"], "--workdir=DIR is required"),
    ({}, ["--workdir=/w", "--oops"], "unknown argument '--oops'"),
    ({"DRY_RUN": "0", "SLURM_JOB_ID": ""}, ["--workdir=/w"], "not inside a SLURM job"),
    ({"SLURM_SUBMIT_DIR": "/nonexistent"}, ["--workdir=/w"], "no cim-jax checkout"),
])
def test_sbatch_rejects_bad_input(tmp_path, env_update, args, message):
  env = dict(slurm_env("1"), **env_update)
  result = run_sbatch(tmp_path, env, *args)
  assert result.returncode == 2 and message in result.stderr, result.stderr


# --------------------------------------------------------------------------- plain multi-node


def test_multinode_dry_run_exports_what_sharding_reads(monkeypatch):
  result = run_script("launch/gpu_multinode.sh", "--coordinator=10.1.0.5:7777",
                      "--num-processes=16", "--process-id=11", "--local-device-ids=3",
                      "--workdir=/shared/runs/b16", TRICKY_OVERRIDE, "--dry-run")
  assert result.returncode == 0, result.stderr
  [cmd] = printed_commands(result.stdout)
  assert cmd[0] == "env"
  exported = dict(a.split("=", 1) for a in cmd[1:5])
  assert exported == {"JAX_COORDINATOR_ADDRESS": "10.1.0.5:7777", "JAX_NUM_PROCESSES": "16",
                      "JAX_PROCESS_ID": "11", "JAX_LOCAL_DEVICE_IDS": "3"}
  assert pretrain_args(cmd) == ["--workdir=/shared/runs/b16", TRICKY_OVERRIDE]

  # The entry point's start-up turns exactly these variables into jax.distributed.initialize().
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  for key, value in exported.items():
    monkeypatch.setenv(key, value)
  assert sharding.maybe_initialize_distributed()
  assert calls == [{"coordinator_address": "10.1.0.5:7777", "num_processes": 16,
                    "process_id": 11, "local_device_ids": [3]}]


@pytest.mark.parametrize("args, message", [
    (["--num-processes=2", "--process-id=0"], "--coordinator=HOST:PORT"),
    (["--coordinator=h:1", "--num-processes=2", "--process-id=2"], "--process-id"),
    (["--coordinator=h:1", "--num-processes=0", "--process-id=0"], "--num-processes"),
    (["--coordinator=h:1", "--num-processes=1", "--process-id=0", "--local-device-ids=a"],
     "--local-device-ids"),
    (["--coordinator=h:1", "--num-processes=1", "--process-id=0"], "--workdir"),
])
def test_multinode_rejects_bad_input(args, message):
  result = run_script("launch/gpu_multinode.sh", *args, "--dry-run")
  assert result.returncode == 2 and message in result.stderr, result.stderr


RECORDING_CONFIG = """
import os, sys
sys.path.insert(0, {tests!r})
import train_fixtures
from cim_jax.data import sources

class RecordingSource:
  '''The real source, noting each record index this process reads.'''

  def __init__(self, inner):
    self.inner = inner

  def __len__(self):
    return len(self.inner)

  def __getitem__(self, index):
    import jax
    with open(os.path.join({reads!r}, f"process{{jax.process_index()}}.txt"), "a") as f:
      f.write(f"{{int(index)}}\\n")
    return self.inner[index]

_make_source = sources.make_source
sources.make_source = lambda *a, **k: RecordingSource(_make_source(*a, **k))

def get_config():
  return train_fixtures.tiny_config(num_train_steps=2, checkpoint_every_steps=2)
"""


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow  # two jax start-ups and compiles: about 80 s on a busy 2-core machine
def test_two_processes_through_the_launcher_and_entry_point(tmp_path):
  """gpu_multinode.sh -> python -m cim_jax.pretrain in 2 CPU processes (gloo), 16 records."""
  reads, workdir = tmp_path / "reads", tmp_path / "work"
  reads.mkdir()
  config = tmp_path / "recording_config.py"
  config.write_text(textwrap.dedent(RECORDING_CONFIG.format(
      tests=os.path.join(REPO, "tests"), reads=str(reads))))
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
             XLA_FLAGS="--xla_force_host_platform_device_count=1", PYTHONPATH=REPO)
  coordinator = f"127.0.0.1:{free_port()}"
  procs = [subprocess.Popen(
      ["bash", "launch/gpu_multinode.sh", f"--coordinator={coordinator}", "--num-processes=2",
       f"--process-id={i}", f"--python={sys.executable}", f"--config={config}",
       f"--workdir={workdir}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = []
  for p in procs:
    try:
      outputs.append(p.communicate(timeout=240)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail("two-process run did not finish in 240 s")
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]

  read = [{int(i) for i in (reads / f"process{k}.txt").read_text().split()} for k in range(2)]
  assert read[0] and read[1]
  assert not read[0] & read[1], "the processes' shards overlap"
  assert read[0] | read[1] == set(range(16)), "the shards together miss records"
  assert (workdir / "checkpoints" / "2").is_dir()
  assert '"step": 2' in (workdir / "metrics.jsonl").read_text()
