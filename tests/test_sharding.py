"""Mesh and sharding rules; 8 CPU devices (data / fsdp) train like 1 device."""

import json
import os

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from cim_jax import sharding
from train_fixtures import key_bias_mask, read_checkpoint, read_metrics, start_run, tiny_config


def test_fsdp_rule_shards_largest_divisible_dimension():
  assert sharding.fsdp_spec((64, 192), 4) == P(None, "fsdp")
  assert sharding.fsdp_spec((192, 64), 4) == P("fsdp", None)
  assert sharding.fsdp_spec((6, 301), 4) == P()  # nothing divisible: replicate
  assert sharding.fsdp_spec((302, 100), 4) == P(None, "fsdp")  # the largest *divisible* one
  assert sharding.fsdp_spec((64,), 4) == P()  # small leaves stay replicated
  assert sharding.fsdp_spec((), 4) == P()
  assert sharding.fsdp_spec((64, 192), 1) == P()


def test_mesh_and_batch_errors_are_clear():
  with pytest.raises(ValueError, match="must be >= 1 and divide the device count"):
    sharding.make_mesh(fsdp=jax.device_count() + 1)
  mesh = sharding.make_mesh(1)
  assert mesh.axis_names == ("data", "fsdp")
  if jax.device_count() == 1:
    assert sharding.process_batch_size(8) == 8


def _run(tmp_path, name, devices, overrides=()):
  workdir = str(tmp_path / name)
  proc = start_run(workdir, ["num_train_steps=4", "checkpoint_every_steps=4"] + list(overrides),
                   devices=devices)
  out, _ = proc.communicate(timeout=400)
  assert proc.returncode == 0, out[-3000:]
  with open(os.path.join(workdir, "final_process0.json")) as f:
    report = json.load(f)
  return workdir, report


def test_eight_devices_match_one_device_with_and_without_fsdp(tmp_path):
  single, report1 = _run(tmp_path, "one", 1)
  assert report1["devices"] == 1
  reference_losses = read_metrics(single)
  reference = read_checkpoint(single, 4)
  for name, fsdp in (("data8", 1), ("data2_fsdp4", 4)):
    workdir, report = _run(tmp_path, name, 8, [f"mesh.fsdp={fsdp}"])
    assert report["devices"] == 8
    assert (report["sharded_leaves"] > 0) == (fsdp > 1), report
    losses = read_metrics(workdir)
    for step in range(1, 5):
      np.testing.assert_allclose(losses[step]["loss"], reference_losses[step]["loss"],
                                 rtol=1e-5, err_msg=f"{name} step {step}")
    state = read_checkpoint(workdir, 4)
    # Attention key biases have an exactly zero gradient; without clipping (the release's
    # recipe) Adam turns the float noise computed there into steps of up to +-lr, differently on
    # 1 and 8 devices. They are bounded here and compared elsewhere by their (nil) effect on
    # outputs (test_release_parity); every other entry must agree.
    peak_lr = tiny_config().optim.base_lr * tiny_config().batch_size / 256
    for key in ("params", "target_params"):
      for a, b, k in zip(jax.tree.leaves(state[key]), jax.tree.leaves(reference[key]),
                         jax.tree.leaves(key_bias_mask(reference[key]))):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(a[~k], b[~k], rtol=1e-4, atol=1e-5, err_msg=f"{name} {key}")
        np.testing.assert_array_less(np.abs(a - b)[k], 2 * 4 * peak_lr, err_msg=f"{name} {key}")
