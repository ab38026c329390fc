"""The benchmark helpers' own arithmetic (FLOP counts, the profile summary); the benches run."""

import os
import sys

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
import bench_attention  # pylint: disable=g-import-not-at-top,wrong-import-position
import bench_step  # pylint: disable=g-import-not-at-top,wrong-import-position
import profile_summary  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_flop_counts_of_a_matmul_and_its_gradient():
  def loss(w, x):
    return jnp.tanh(x @ w).sum()

  w, x = jnp.ones((32, 16)), jnp.ones((8, 32))
  forward = 2 * 8 * 32 * 16
  traced = jax.jit(loss).trace(w, x)
  assert bench_step.matmul_flops(traced.jaxpr.jaxpr) == forward
  # XLA's analysis of the lowered program also counts the elementwise work (tanh, the sum).
  assert forward <= bench_step.xla_flops(traced.lower()) < 1.5 * forward
  grad = jax.jit(jax.grad(loss)).trace(w, x)  # forward + the weight-gradient matmul
  assert bench_step.matmul_flops(grad.jaxpr.jaxpr) == 2 * forward


def _trace(kernels, device=True):
  process = "/device:GPU:0 (NVIDIA H100)" if device else "/host:CPU"
  thread = "Stream #20(Compute)" if device else "tf_XLAEigen/1"
  events = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": process}},
            {"ph": "M", "pid": 1, "tid": 7, "name": "thread_name", "args": {"name": thread}},
            {"ph": "M", "pid": 1, "tid": 8, "name": "thread_name", "args": {"name": "XLA Ops"}}]
  for name, dur in kernels:
    events.append({"ph": "X", "pid": 1, "tid": 7, "ts": 0, "dur": dur, "name": name})
    events.append({"ph": "X", "pid": 1, "tid": 8, "ts": 0, "dur": dur, "name": "hlo op"})
  return {"traceEvents": events}


def test_profile_summary_groups_kernel_time_by_kind():
  trace = _trace([("nvjet_hsh_256x128_gemm", 600.0), ("sm90_xmma_gemm_bf16", 200.0),
                  ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", 100.0),
                  ("input_reduce_fusion_3", 50.0), ("loop_add_fusion", 40.0),
                  ("loop_add_fusion", 10.0)])
  kernels = profile_summary.kernel_events(trace)
  assert len(kernels) == 6  # the stream kernels, not the HLO-op line beside them
  summary = profile_summary.summarize(kernels, top=2)
  assert "kernel time 1.0 ms over 6 kernels" in summary
  assert "matmul                 0.8 ms   80.0%" in summary
  assert "attention              0.1 ms   10.0%" in summary
  assert "elementwise            0.1 ms    5.0%" in summary
  assert "nvjet_hsh_256x128_gemm" in summary and "input_reduce_fusion_3" not in summary


@pytest.mark.parametrize("name,kind", [("gemm_fusion_dot_1", "matmul"),
                                       ("transpose_copy_fusion", "transpose/copy"),
                                       ("Memcpy HtoD", "memcpy/memset"),
                                       ("something_else", "other")])
def test_kernel_kinds(name, kind):
  assert profile_summary.kernel_kind(name) == kind


TINY_CONFIG = ["--config=configs/cim_pretrain.py:Ti/16", "--config.batch_size=2",
               "--config.data.num_exemplars=2", "--config.data.context_size=32",
               "--config.data.exemplar_size=16", "--config.model.decoder_dim=64",
               "--config.model.decoder_heads=4"]


@pytest.mark.slow  # compiles two CIM steps and starts grain workers: ~20 s
def test_bench_step_times_any_config_with_and_without_the_pipeline(capsys):
  bench_step.main(TINY_CONFIG + ["--no_torch", "--steps=1", "--rounds=1", "--pipeline"])
  out = capsys.readouterr().out
  assert "config configs/cim_pretrain.py:Ti/16 with --config.batch_size=2" in out
  row = [line for line in out.splitlines() if line.startswith("Ti/16 b2 ")]
  assert len(row) == 1, out
  fields = row[0].split()
  step_seconds, samples_per_second = float(fields[2]), float(fields[3])
  assert step_seconds > 0 and abs(samples_per_second * step_seconds / 2 - 1) < 0.01
  mfu, matmul_mfu = (float(f.rstrip("%")) for f in fields[4:6])
  assert 0 < matmul_mfu <= mfu < 100  # XLA's count includes elementwise work too
  assert float(fields[8]) > 0  # the step fed by the input pipeline


def test_bench_step_rejects_a_misspelt_config_key(capsys):
  with pytest.raises(SystemExit) as exit_info:
    bench_step.main(["--config.batch_sise=2"])
  assert exit_info.value.code == 2
  assert "did you mean config.batch_size" in capsys.readouterr().err


def test_bench_cases_flag(capsys):
  assert bench_step.parse_cases("B/16:512,L/16:64") == [("B/16", 512), ("L/16", 64)]
  assert bench_step.parse_cases("") == [("", 0)]  # the config's own variant and batch
  with pytest.raises(SystemExit) as exit_info:
    bench_step.main(["--cases=B/16"])
  assert exit_info.value.code == 2
  assert "--cases='B/16': expected comma-separated VARIANT:GLOBAL_BATCH" in capsys.readouterr().err


# A compiled GPU program in miniature, in the text form XLA prints (bench/gpu_aot.py reads it).
_GPU_HLO = """HloModule jit_step

%fused_add (p0: bf16[64,32], p1: bf16[32]) -> bf16[64,32] {
  %p0 = bf16[64,32]{1,0} parameter(0)
  %p1 = bf16[32]{0} parameter(1)
  %broadcast = bf16[64,32]{1,0} broadcast(%p1), dimensions={1}
  ROOT %add = bf16[64,32]{1,0} add(%p0, %broadcast)
}

ENTRY %main (x: bf16[64,16], w: bf16[16,32], b: bf16[32]) -> bf16[64,32] {
  %x = bf16[64,16]{1,0} parameter(0)
  %w = bf16[16,32]{1,0} parameter(1)
  %b = bf16[32]{0} parameter(2)
  %cublas-lt-matmul.1 = (bf16[64,32]{1,0}, s8[4194304]{0}) custom-call(%x, %w), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(train_step)/blocks_3/dense/dot_general"}, backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
  %get-tuple-element.1 = bf16[64,32]{1,0} get-tuple-element(%cublas-lt-matmul.1), index=0
  %loop_add_fusion = bf16[64,32]{1,0} fusion(%get-tuple-element.1, %b), kind=kLoop, calls=%fused_add, metadata={op_name="jit(train_step)/blocks_3/add"}
  ROOT %copy.1 = bf16[64,32]{1,0} copy(%loop_add_fusion)
}
"""


def test_gpu_aot_reads_kernels_bytes_and_gemm_flops():
  import gpu_aot  # pylint: disable=g-import-not-at-top
  found = gpu_aot.kernels(_GPU_HLO)
  assert [(k.kind, k.bytes, k.flops) for k in found] == [
      # x (64x16) + w (16x32) read, the 64x32 result written (not cuBLAS's workspace)
      ("gemm", 2 * (64 * 16 + 16 * 32 + 64 * 32), 2.0 * 64 * 32 * 16),
      ("fusion:kLoop", 2 * (64 * 32 + 32 + 64 * 32), 0.0),
      ("copy", 2 * (64 * 32 + 64 * 32), 0.0)]
  assert found[1].op_name == "jit(train_step)/blocks_3/add"
  assert gpu_aot._op_group(found[1].op_name) == "blocks_N/add"  # pylint: disable=protected-access
  assert gpu_aot.shape_bytes("(f32[2,3]{1,0}, pred[4]{0}, s32[])") == 24 + 4 + 4
  gpu = gpu_aot.GPUS["H100"]
  gemm, fusion, _ = found
  # the GEMM is bound by its math, the fusion by its traffic; each pays the launch once
  assert gpu_aot.estimate_seconds(gemm, gpu, 0.5, 1e12, 1e-6) == pytest.approx(
      max(gemm.flops / (0.5 * gpu.peak_flops), gemm.bytes / 1e12) + 1e-6)
  assert gpu_aot.estimate_seconds(fusion, gpu, 0.5, 1e9, 0.0) == pytest.approx(fusion.bytes / 1e9)
  with pytest.raises(ValueError, match="ENTRY"):
    gpu_aot.kernels("HloModule empty\n")


def test_bench_attention_times_both_forms_and_compares_their_gradients(capsys):
  # --threads above the core count: no pinning of the test process.
  bench_attention.main(["--shapes=2x20x2x8,1x7x1x4", "--rounds=1", "--no_torch", "--threads=512"])
  rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("2x", "1x"))]
  assert [row.split(":")[0] for row in rows] == ["2x20x2x8", "1x7x1x4"]
  for row in rows:
    fields = row.split()
    assert fields[1] == "xla" and fields[3] == "head_by_head"
    assert float(fields[2]) >= 0 and float(fields[4]) >= 0  # (tiny shapes print as 0.000 s)
    assert float(fields[-1]) < 1e-5  # the gradient difference of ours against XLA's
