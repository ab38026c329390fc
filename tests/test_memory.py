"""compile_for on this machine (`--target=local`, the memory tool): XLA's compiled sizes of the
trainer's real step, split into state parts.

Measurements run in a subprocess with 8 host-platform CPU devices (a pod-like mesh); the
compiler's numbers are checked against each other and against the state's own sizes.
"""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs `cim_jax.tools.compile_for.main` for each argv in one process (one jax start-up).
MEASURE_MANY = """
import json, sys
from cim_jax.tools import compile_for
for argv in json.loads(sys.argv[1]):
  compile_for.main(argv)
"""

# The 2-block "Mu/16" encoder compiles in seconds; the presets' other settings stay.
MU = "--config.model.variant=Mu/16"
# Small pairs keep the CPU compile short where the check is about the state, not activations.
SMALL_PAIRS = ["--config.data.context_size=64", "--config.data.exemplar_size=32",
               "--config.data.num_exemplars=2", "--config.data.search_size=96"]


def env(devices: int = 8) -> dict:
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def measure_many(cases: list[list[str]], timeout: int = 900) -> list[dict]:
  argvs = [case + ["--json=true"] for case in cases]
  result = subprocess.run([sys.executable, "-c", MEASURE_MANY, json.dumps(argvs)], cwd=REPO,
                          env=env(), capture_output=True, text=True, timeout=timeout,
                          check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
  assert len(reports) == len(cases)
  return [dict(r["bytes_per_device"], target=r["bytes_per_device"]["ema_target"],
               temp=r["bytes_per_device"]["activations_and_temporaries"],
               **{k: r[k] for k in ("devices", "mesh", "num_params")}) for r in reports]


def state_and_batch(report: dict) -> int:
  return sum(report[k] for k in ("params", "optimizer", "target", "model_state", "batch"))


def check_consistent(report: dict) -> None:
  """XLA's argument buffers are the state and batch we account for (plus step count and rng)."""
  assert 0 <= report["arguments"] - state_and_batch(report) <= 64
  assert report["aliased"] >= report["params"] + report["optimizer"] + report["target"]
  assert report["temp"] > 0
  # Adam keeps two moments per parameter (frozen ones included).
  assert report["optimizer"] == pytest.approx(2 * report["params"], rel=1e-3)


@pytest.mark.slow  # estimates several presets' steps: ~20 s warm
def test_batch_fsdp_and_presets_move_the_right_parts():
  tiny = ["--config=configs/cim_pretrain.py:Ti/16", MU]
  b8, b16, large = measure_many([
      tiny + ["--config.batch_size=8"],
      tiny + ["--config.batch_size=16"],
      ["--config=configs/cim_pretrain.py:L/16", MU, "--config.batch_size=8"] + SMALL_PAIRS,
  ])
  for report in (b8, b16, large):
    check_consistent(report)
  assert b8["devices"] == 8 and b8["mesh"] == {"data": 8, "fsdp": 1}
  assert b8["params"] == 4 * b8["num_params"]  # replicated: every device holds all of them

  # Twice the batch: the same state, twice the input, more activations (at the recipe's pair
  # sizes the decoder's activations outweigh this small model's gradients).
  assert (b16["params"], b16["optimizer"], b16["target"]) == (b8["params"], b8["optimizer"],
                                                              b8["target"])
  assert b16["batch"] == 2 * b8["batch"]
  assert b16["temp"] > 1.5 * b8["temp"]

  # The L preset (fsdp=8, remat): the large leaves are split 8 ways, only small ones (biases,
  # norms) stay whole on every device.
  assert large["mesh"] == {"data": 1, "fsdp": 8}
  whole = 4 * large["num_params"]
  assert whole / 8 <= large["params"] < whole / 8 * 1.05
  # The target encoder's split leaves: qkv + proj + mlp weights of 2 blocks, the patch projection.
  split = 2 * 12 * 64 * 64 + 16 * 16 * 3 * 64
  assert split * 4 / 8 < large["target"] < split * 4 / 8 * 1.2


def test_command_line_prints_a_table_and_rejects_bad_flags():
  cmd = [sys.executable, "-m", "cim_jax.tools.memory", "--config=configs/cim_pretrain.py:Ti/16",
         MU, "--config.batch_size=8", "--devices=2"] + SMALL_PAIRS
  result = subprocess.run(cmd, cwd=REPO, env=env(1), capture_output=True, text=True,
                          timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert "(4 per device) on 2 cpu devices, 1 host, mesh data=2 x fsdp=1" in out
  for row in ("params (online)", "optimizer state", "EMA target", "activations / temporaries",
              "total during the step"):
    assert row in out
  for bad, message in ((["--devices=many"], "--devices=many"), (["--json=yes"], "--json=yes"),
                       (["--config.batch_size=7", "--devices=2"], "not divisible"),
                       (["--bogus=1"], "unknown flag --bogus")):
    result = subprocess.run(cmd[:4] + bad, cwd=REPO, env=env(1), capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 2 and message in result.stderr, (bad, result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parametrize("variant, extra", [
    ("Ti/16", []), ("S/16", []), ("B/16", []),
    ("L/16", ["--config.mesh.fsdp=8"]), ("H/14", ["--config.mesh.fsdp=8"]),
])
def test_full_size_presets_on_eight_devices(variant, extra):
  """T/S/B (data parallel) and L/H (fsdp=8, remat) at their real depth and pair sizes."""
  [report] = measure_many([[f"--config=configs/cim_pretrain.py:{variant}",
                            "--config.batch_size=8"] + extra], timeout=1800)
  check_consistent(report)
  encoder = {"Ti/16": 5.7e6, "S/16": 22e6, "B/16": 86e6, "L/16": 304e6, "H/14": 632e6}[variant]
  assert encoder < report["num_params"] < encoder + 10e6  # + the one-block correlation decoder
  shards = report["mesh"]["fsdp"]
  whole = 4 * report["num_params"]
  assert whole / shards <= report["params"] < whole / shards * 1.05
