"""Helpers of the trainer tests: a tiny, fast CIM config, a subprocess runner, result readers.

Run as a script it trains in a fresh process (the way tests kill, preempt or multiply it):
  PYTHONPATH=. python tests/train_fixtures.py WORKDIR [key=value ...] [--evaluate]
"""

import ast
import json
import os
import shutil
import subprocess
import sys
import tempfile

from flax import traverse_util
import jax
import numpy as np

from cim_jax import cli
from cim_jax import config_validation
from cim_jax import sharding
from cim_jax.evaluate import report as report_lib
from cim_jax.train import checkpoint
from cim_jax.train import loop

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)


def recipe(spec: str = "cim_pretrain.py:Ti/16"):
  """A config of configs/ (`FILE.py[:ARG]`), loaded as `--config=configs/FILE.py:ARG` loads it."""
  return config_validation.load_config_file(os.path.join(REPO, "configs", spec))


def tiny_config(**overrides):
  """A tiny model on small pairs: seconds per run on one CPU core."""
  c = recipe()
  c.model.variant = "Mu/16"  # 2 blocks, 64 wide: compiles in seconds
  c.model.decoder_dim = 32
  c.model.decoder_heads = 2
  c.data.context_size = 32
  c.data.exemplar_size = 16
  c.data.num_exemplars = 2
  c.data.search_size = 48
  c.data.num_images = 16
  c.batch_size = 8
  c.num_train_steps = 6
  c.optim.warmup_steps = 2
  c.optim.base_lr = 1e-3
  c.log_every_steps = 1
  c.checkpoint_every_steps = 2
  c.keep_checkpoints = 5
  c.progress_bar = False
  c.mesh.fsdp = 1
  c.eval.data.image_size = 64  # the end-of-run kNN (when a test turns it on)
  for key, value in overrides.items():
    set_key(c, key, value)
  return c


def learning_config(steps: int = 40):
  """tiny_config that learns in a few dozen steps on 4 fixed images (tests/test_learning.py);
  test_training_guards.py builds the same train step, so the two share its compilation."""
  c = tiny_config(num_train_steps=steps)
  c.optim.base_lr = 0.1  # peak lr 3e-3 at batch 8
  c.optim.warmup_steps = 3
  c.data.num_images = 4
  c.checkpoint_every_steps = steps
  return c


def randomize(params, seed=1, scale=0.05):
  """Random (not init-structured) values, so parity checks see every weight, bias and norm."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: (np.asarray(x) + scale * rng.normal(size=x.shape)).astype(np.float32), params)


def key_bias_mask(params):
  """Tree of bool arrays like `params`: True on the attention *key* biases (the k rows of every
  qkv bias, the k half of the decoder's kv bias).

  Softmax is shift-invariant, so a key bias adds the same q.b to every logit of a query: its
  gradient is exactly zero, and what is computed is float noise. Adam normalises that noise
  into steps of up to about +-lr, so two correct implementations (or a batch split two ways)
  move these entries differently; tests compare them by their (nil) effect on outputs instead.
  """
  mask = {}
  for path, leaf in traverse_util.flatten_dict(params).items():
    m = np.zeros(np.shape(leaf), bool)
    if path[-3:] == ("attn", "qkv", "bias"):
      width = m.shape[-1] // 3
      m[..., width:2 * width] = True
    elif path[-3:] == ("attn", "kv", "bias"):
      m[..., :m.shape[-1] // 2] = True
    mask[path] = m
  return traverse_util.unflatten_dict(mask)


def set_key(config, dotted: str, value):
  *parents, leaf = dotted.split(".")
  for p in parents:
    config = config[p]
  config[leaf] = value


def copy_run(src, tmp_path):
  """A copy of the run work dir `src` under tmp_path (tests that change or break a run)."""
  dst = str(tmp_path / "run")
  shutil.copytree(src, dst)
  return dst


def read_metrics(workdir):
  """Rows of workdir/metrics.jsonl keyed by step (a later row for a step replaces an earlier)."""
  rows = {}
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    for line in f:
      row = json.loads(line)
      rows[row["step"]] = row
  return rows


def committed(workdir, step) -> bool:
  """Whether checkpoint `step` of a run is fully written (orbax's commit marker)."""
  return os.path.exists(os.path.join(workdir, "checkpoints", str(step), "_CHECKPOINT_METADATA"))


def read_checkpoint(workdir, step=None):
  """The saved train state (numpy pytree) at `step` (default: latest)."""
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  _, state = checkpoint.restore_state_anywhere(os.path.join(workdir, "checkpoints"), device, step)
  return jax.device_get(state)


# Compiled executables are shared by the test processes (compiling dominates their run time);
# conftest.compilation_cache points in-process tests at the same cache.
XLA_CACHE = os.path.join(tempfile.gettempdir(), f"cim_jax_test_xla_cache_{os.getuid()}")
CACHE_ENV = {"JAX_COMPILATION_CACHE_DIR": XLA_CACHE,
             "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
             "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def subprocess_env(devices: int = 1, **extra):
  env = dict(os.environ, **CACHE_ENV)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  # The repository and tests/: config files written by the tests import train_fixtures.
  env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, TESTS, env.get("PYTHONPATH", "")) if p)
  env.update({k: str(v) for k, v in extra.items()})
  return env


def tiny_config_file(directory, **overrides) -> str:
  """A config file for `python -m cim_jax.pretrain` (run with subprocess_env): tiny_config."""
  path = os.path.join(directory, "tiny_config.py")
  with open(path, "w", encoding="utf-8") as f:
    f.write("from train_fixtures import tiny_config\n\n\ndef get_config():\n"
            f"  return tiny_config(**{overrides!r})\n")
  return path


def start_run(workdir, overrides=(), devices: int = 1, **env):
  """Starts training in a fresh process; returns the Popen."""
  cmd = [sys.executable, os.path.abspath(__file__), str(workdir)] + list(overrides)
  return subprocess.Popen(cmd, env=subprocess_env(devices, **env), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _main(argv):
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  sharding.maybe_initialize_distributed()
  evaluate = "--evaluate" in argv  # train_and_evaluate with the end-of-run report
  argv = [a for a in argv if a != "--evaluate"]
  workdir, overrides = argv[0], argv[1:]
  config = tiny_config()
  for item in overrides:
    key, value = item.split("=", 1)
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass
    set_key(config, key, value)
  result = cli.run_or_exit(loop.train, config, workdir)  # a ConfigError: one line, exit 2
  if evaluate:
    evaluation = report_lib.evaluate_run(result)
    with open(os.path.join(workdir, f"evaluation_process{jax.process_index()}.json"), "w") as f:
      json.dump(evaluation, f)
  # Each process reports what it holds, so multi-process tests can compare processes.
  params = {jax.tree_util.keystr(p): x for p, x in
            jax.tree_util.tree_flatten_with_path(sharding.to_host(result.state.params))[0]}
  np.savez(os.path.join(workdir, f"params_process{jax.process_index()}.npz"), **params)
  sharded = [x for x in jax.tree.leaves(result.state) if not x.sharding.is_fully_replicated]
  report = dict(result.metrics, sharded_leaves=len(sharded), devices=jax.device_count(),
                processes=jax.process_count())
  with open(os.path.join(workdir, f"final_process{jax.process_index()}.json"), "w") as f:
    json.dump(report, f)
  print("TRAINING DONE", json.dumps(result.metrics), flush=True)


if __name__ == "__main__":
  _main(sys.argv[1:])
