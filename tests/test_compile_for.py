"""compile_for: the real train step compiled for Cloud TPU slices described by libtpu (no TPU here).

Needs libtpu (the test requirements install jax[tpu] at the runtime jax version); skipped without.
Every compilation uses the tiny Mu/16 ViT, so each takes seconds.
"""

import json

import jax
import numpy as np
import pytest

from train_fixtures import tiny_config

from cim_jax.errors import ConfigError
from cim_jax.tools import compile_for

pytest.importorskip("libtpu", reason="libtpu (jax[tpu]) compiles for TPU topologies")


def _config(batch_size=32, fsdp=1, **overrides):
  config = tiny_config(**overrides)  # Mu/16, 64x64 context, 2 exemplars
  config.batch_size = batch_size
  config.mesh.fsdp = fsdp
  config.model.dtype = "bfloat16"
  return config


def _flags(target, **extra):
  return dict(compile_for.FLAGS, target=target, **extra)


def _expected_bytes(tree, devices: int, fsdp: int) -> int:
  """Per-device bytes from the leaves' shapes and partition specs (computed independently)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    spec = tuple(leaf.sharding.spec) + (None,) * (len(leaf.shape) - len(leaf.sharding.spec))
    size = 1
    for dim, axis in zip(leaf.shape, spec):
      split = {None: 1, "fsdp": fsdp, "data": devices // fsdp}[axis]
      assert dim % split == 0
      size *= dim // split
    total += size * np.dtype(leaf.dtype).itemsize
  return total


@pytest.mark.parametrize("target,generation,shape", [
    ("v5p-64", "v5p", "2x4x4"), ("v4-32", "v4", "2x2x4"), ("v5e-64", "v5e", "8x8"),
    ("v5litepod-8", "v5e", "2x4"), ("v6e-64", "v6e", "8x8"), ("v5p:2x2x2", "v5p", "2x2x2")])
def test_accelerator_types_name_their_slices(target, generation, shape):
  assert compile_for.tpu_topology(target) == (generation, shape)


@pytest.mark.parametrize("target", ["v5p-3", "v7-8", "v5e:2x2x2", "v6e-12", "tpu"])
def test_unknown_targets_are_one_line_errors(target):
  with pytest.raises(ConfigError, match="--target="):
    compile_for.tpu_topology(target)


def test_single_host_slice_state_bytes_match_the_shardings():
  config = _config(batch_size=32)
  target = compile_for.resolve_target("v5e-4")
  assert len(target.devices) == 4 and target.hosts == 1
  _, state, _, _ = compile_for.abstract_step(config, target.devices)
  result = compile_for.run(config, _flags("v5e-4"))
  b = result["bytes_per_device"]
  assert b["params"] == _expected_bytes(state.params, 4, 1)
  assert b["optimizer"] == _expected_bytes(state.opt_state, 4, 1)
  assert b["ema_target"] == _expected_bytes(state.target_params, 4, 1)
  # fsdp=1: every device holds the whole f32 parameter tree.
  whole = sum(int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(state.params))
  assert b["params"] == whole
  assert result["fits"] and b["available"] == 16 * 2**30
  assert b["total"] >= b["params"] + b["optimizer"] + b["ema_target"]
  assert result["flops_per_device_step"] > 0
  assert "all-reduce" in result["collectives"]  # data parallel: gradients are summed
  assert 0 < result["estimate"]["mfu"] <= 1
  assert result["estimate"]["samples_per_second"] == pytest.approx(
      32 / result["estimate"]["step_seconds"])


def test_multi_host_slice_shards_the_state_across_hosts_with_fsdp():
  config = _config(batch_size=64, fsdp=8)
  result = compile_for.run(config, _flags("v5p:2x2x2"))
  assert result["devices"] == 8 and result["hosts"] == 2
  assert result["mesh"] == {"data": 1, "fsdp": 8}
  target = compile_for.resolve_target("v5p:2x2x2")
  _, state, _, _ = compile_for.abstract_step(config, target.devices)
  b = result["bytes_per_device"]
  assert b["params"] == _expected_bytes(state.params, 8, 8)
  assert b["optimizer"] == _expected_bytes(state.opt_state, 8, 8)
  whole = sum(int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(state.params))
  assert b["params"] < whole / 4  # the large leaves are split 8 ways
  # fsdp gathers parameters for the forward pass and scatters gradients back.
  assert {"all-gather"} <= set(result["collectives"])


def test_a_state_too_large_for_the_chip_does_not_fit_at_any_batch():
  # A 12288-wide correlation block: ~1.8e9 parameters, whose f32 state alone (params, Adam
  # moments, gradients) outgrows a 16 GiB v5e chip.
  config = _config(batch_size=32)
  config.model.decoder_dim = 12288
  result = compile_for.run(config, _flags("v5e-4", largest_batch="true"))
  assert not result["fits"] and result["largest_batch"] == 0
  assert result["bytes_per_device"]["params"] > 6 * 2**30
  assert "does not fit" in compile_for.format_report(result)


def test_largest_batch_search_doubles_and_bisects(monkeypatch):
  """The search on a fake compiler whose step needs 1 GiB + 100 MiB per device-sample."""
  target = compile_for.Target("fake v5e-4", tuple(range(4)), compile_for.CHIPS["v5e"])
  compiled = []

  def fake_compile(config, target_, task):
    compiled.append(config.batch_size)
    total = 2**30 + (config.batch_size // 4) * 100 * 2**20
    return compile_for.Compiled(config.batch_size, 0.0, 1, 2**20, 2**20, 0, 0, 0, 0, 0, 0, 0, 0,
                                total, 0.0, 0.0, {})

  monkeypatch.setattr(compile_for, "compile_step", fake_compile)
  config = _config()
  budget = 16 * 2**30 * 0.9  # headroom 0.1
  per_device = int((budget - 2**30) // (100 * 2**20))  # 137 samples per device fit, 138 do not
  for start in (8, 4 * 400):
    config.batch_size = start
    compiled.clear()
    first = fake_compile(config, target, "pretrain")
    assert compile_for.largest_batch(config, target, "pretrain", 0.1, first) == 4 * per_device
    assert max(b for b in compiled if 2**30 + b // 4 * 100 * 2**20 <= budget) == 4 * per_device
    assert len(compiled) <= 16  # doublings, then bisection


@pytest.mark.slow
def test_largest_batch_is_found_and_verified_by_compiling():
  # 160x160 correlation maps of 6 exemplars; memory kept free so that 32 pairs per chip do not
  # fit but fewer do.
  config = _config(batch_size=4 * 32)
  config.data.search_size, config.data.context_size, config.data.num_exemplars = 224, 160, 6
  first = compile_for.run(config, _flags("v5e-4"))["bytes_per_device"]
  small = config.copy_and_resolve_references()
  small.batch_size = 4
  floor = compile_for.run(small, _flags("v5e-4"))["bytes_per_device"]["total"]
  budget = (first["total"] + floor) // 2
  flags = _flags("v5e-4", largest_batch="true", headroom=repr(1 - budget / (16 * 2**30)))
  result = compile_for.run(config, flags)
  assert not result["fits"]
  largest = result["largest_batch"]
  assert 0 < largest < config.batch_size and largest % 4 == 0
  config.batch_size = largest
  assert compile_for.run(config, dict(flags, largest_batch="false"))["fits"]
  text = compile_for.format_report(result)
  assert "does not fit" in text and f"largest global batch that fits: {largest}" in text


def test_command_line_json_and_exit_status(capsys, tmp_path):
  config_file = tmp_path / "mu.py"
  config_file.write_text(
      "import sys\nfrom train_fixtures import tiny_config\n\n\ndef get_config():\n"
      "  c = tiny_config()\n  c.batch_size = 32\n  return c\n")
  compile_for.main([f"--config={config_file}", "--target=v5e-4", "--json=true"])
  report = json.loads(capsys.readouterr().out)
  assert report["fits"] and report["devices"] == 4
  with pytest.raises(SystemExit) as exit_info:
    compile_for.main([f"--config={config_file}", "--target=v9-8"])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err.strip().startswith("error: --target=v9-8")


def test_collective_parser_reads_sync_and_async_forms():
  hlo = "\n".join([
      "  %ar = f32[1024]{0} all-reduce(f32[1024]{0} %x), replica_groups={}",
      "  %ag = (bf16[8,16]{1,0}, bf16[64,16]{1,0}) all-gather-start(bf16[8,16]{1,0} %y)",
      "  %rs = f32[128]{0} reduce-scatter(f32[1024]{0} %z), dimensions={0}",
      "  %add = f32[1024]{0} add(f32[1024]{0} %a, f32[1024]{0} %b)"])
  assert compile_for.collectives(hlo) == {
      "all-gather": (1, 64 * 16 * 2), "all-reduce": (1, 4096), "reduce-scatter": (1, 512)}
