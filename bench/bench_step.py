"""Train-step speed: step time, samples/s, MFU; ours vs the same model in PyTorch, in one run.

  python bench/bench_step.py                  # CPU: ViT-Ti @ 32 and ViT-B @ 8, ours vs PyTorch
  python bench/bench_step.py --cases=B/16:256 --dtype=bfloat16 --max_batch   # GPU / TPU
  python bench/bench_step.py --cases=L/16:64 --fsdp=8 --no_torch --pipeline
  python bench/bench_step.py --cases=B/16:512 --attention_impl=xla,cudnn --no_torch   # GPU
  python bench/bench_step.py --config=configs/cim_pretrain.py:L/16 --config.batch_size=64 --no_torch

Any pre-training config can be timed: `--config=FILE` and `--config.key=value` as for
`python -m cim_jax.pretrain` (without them: configs/cim_pretrain.py:B/16, the recipe's sizes of
docs/METHOD.md: context 160, 6 exemplars of 64); --cases, --dtype, --remat, --fsdp, --workers
and --attention_impl, when given, override the config's variant/batch and settings. "device
batch" times the jitted step on a batch already on device; "with pipeline" adds grain pair
generation and the host -> device transfer. MFU = FLOPs / step time / (peak x devices), with FLOPs from XLA's cost
analysis of the whole lowered step (backward, optimizer and rematerialised work included). The
lowered, not the compiled, program is analysed: after GPU compilation the matmuls are cuBLAS
custom calls that the analysis does not count, before it they are plain dots on every backend.
"MFU mm" counts only the matmuls / convolutions of the step's jaxpr, a cross-check. With cuDNN
attention both counts come from the same step with XLA attention (the fused kernel is a custom
call, and its padding rows are not useful work). Figures on a shared machine are noisy: compare
ratios within one run.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from cim_jax import cli, sharding  # pylint: disable=wrong-import-position
from cim_jax.models import cim  # pylint: disable=wrong-import-position
from cim_jax.train import schedules, state as state_lib, step as step_lib  # pylint: disable=wrong-import-position

# Dense peak FLOP/s per device (bf16 tensor cores / MXU), by substring of jax's device_kind.
PEAK_FLOPS = [("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("v5p", 459e12),
              ("v5 lite", 197e12), ("v5e", 197e12), ("v4", 275e12)]


def peak_flops(device) -> float | None:
  kind = device.device_kind
  for key, value in PEAK_FLOPS:
    if key.lower() in kind.lower():
      return value
  return None


def measured_matmul_peak(n: int = 1024, repeats: int = 10) -> float:
  """FLOP/s of a float32 n x n matmul on device 0 (the CPU's practical peak)."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  t = time.perf_counter()
  for _ in range(repeats):
    out = f(a)
  out.block_until_ready()
  return 2 * n**3 * repeats / (time.perf_counter() - t)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "cim_pretrain.py:B/16")


def load_base_config(config_args):
  """The config `--config=FILE --config.key=value ...` describe (one-line error, exit 2)."""
  return cli.exit_on_config_error(cli.parse, config_args, default_config=DEFAULT_CONFIG)[0]


def add_case_arguments(parser, default_cases: str, default_dtype: str):
  """--config, --cases, --dtype: the config and cases to time or compile (gpu_aot.py too)."""
  parser.add_argument("--config", default="",
                      help="pre-training config file (default configs/cim_pretrain.py:B/16); "
                           "--config.key=value overrides may follow")
  parser.add_argument("--cases", default=None,
                      help=f"comma-separated VARIANT:GLOBAL_BATCH (default: {default_cases}; "
                           f"with --config, the config's own)")
  parser.add_argument("--dtype", default=None,
                      help=f"compute dtype (default: {default_dtype}; with --config, the "
                           f"config's own)")


def parse_case_arguments(parser, argv, default_cases: str, default_dtype: str):
  """(args, config_args): the flags, with the `--config.key=value` overrides taken apart;
  args.base_config is the config they describe, args.custom_config whether one was given.
  Without a config, --cases / --dtype default to the given ones; with one, to the config's."""
  args, rest = parser.parse_known_args(argv)
  config_args = [a for a in rest if a.startswith("--config.") and "=" in a]
  if len(config_args) != len(rest):
    parser.error(f"unrecognized arguments: {' '.join(a for a in rest if a not in config_args)}")
  args.custom_config = bool(args.config or config_args)
  if args.cases is None:
    args.cases = "" if args.custom_config else default_cases
  if args.dtype is None and not args.custom_config:
    args.dtype = default_dtype
  args.base_config = load_base_config(
      ([f"--config={args.config}"] if args.config else []) + config_args)
  return args, config_args


def parse_cases(cases: str) -> list[tuple[str, int]]:
  """'B/16:512,L/16:64' -> [('B/16', 512), ('L/16', 64)]; '' -> [('', 0)]: the config's own."""
  if not cases:
    return [("", 0)]
  pairs = [case.split(":") for case in cases.split(",")]
  if any(len(pair) != 2 or not pair[1].isdigit() for pair in pairs):
    raise ValueError(f"--cases={cases!r}: expected comma-separated VARIANT:GLOBAL_BATCH")
  return [(variant, int(batch)) for variant, batch in pairs]


def case_label(config, with_attention: bool) -> str:
  """'B/16 b512' (+ ' cudnn' when attention kernels are compared)."""
  label = f"{config.model.variant} b{config.batch_size}"
  return label + (f" {config.model.attention_impl}" if with_attention else "")


def bench_config(variant: str, batch: int, args, attention_impl: str = ""):
  """args.base_config with the case (variant, global batch) and the flags that were given."""
  c = args.base_config.copy_and_resolve_references()
  if variant:
    c.model.variant = variant
  if batch:
    c.batch_size = batch
  if attention_impl:
    c.model.attention_impl = attention_impl
  for value, key in ((args.dtype, "dtype"), (args.remat, "remat")):
    if value is not None:
      c.model[key] = value
  if args.fsdp is not None:
    c.mesh.fsdp = args.fsdp
  if args.workers is not None:
    c.data.num_workers = args.workers
  # Long enough a schedule that the timed steps are ordinary (past warm-up, lr > 0).
  c.num_train_steps = 10_000
  c.optim.warmup_steps = 10
  return c


def synthetic_batch(config, seed=0):
  rng = np.random.default_rng(seed)
  d, b = config.data, config.batch_size
  c, n, e = d.context_size, d.num_exemplars, d.exemplar_size
  centre = rng.uniform(e / 2, c - e / 2, (b, n, 1, 2))
  half = rng.uniform(8, e / 2, (b, n, 1, 1))
  square = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float32)
  return {"context": rng.integers(0, 256, (b, c, c, 3), dtype=np.uint8),
          "exemplars": rng.integers(0, 256, (b, n, e, e, 3), dtype=np.uint8),
          "corners": (centre + half * square).astype(np.float32)}


def _dot_flops(eqn) -> float:
  (contract, _), _ = eqn.params["dimension_numbers"]
  lhs = eqn.invars[0].aval.shape
  return 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[d] for d in contract])


def _conv_flops(eqn) -> float:
  rhs = eqn.invars[1].aval.shape  # kernel: out features x (in / groups) x spatial, in some order
  out_features = eqn.outvars[0].aval.shape[eqn.params["dimension_numbers"].out_spec[1]]
  return 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod(rhs) / out_features


def _sub_jaxprs(params):
  for value in params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, jax.extend.core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax.extend.core.Jaxpr):
        yield item


def matmul_flops(jaxpr) -> float:
  """FLOPs of every matmul / convolution in a jaxpr (the whole, unpartitioned program).

  Counted from the program itself so the figure is the same on every backend (XLA's cost
  analysis misses cuBLAS calls on GPU); elementwise work is left out, rematerialised work is in.
  """
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_flops(eqn)
    elif name == "conv_general_dilated":
      total += _conv_flops(eqn)
    inner = sum(matmul_flops(j) for j in _sub_jaxprs(eqn.params))
    if name == "cond":  # one branch runs
      inner = max([matmul_flops(j) for j in _sub_jaxprs(eqn.params)] or [0.0])
    total += inner * (eqn.params.get("length", 1) if name == "scan" else 1)
  return total


def xla_flops(lowered) -> float:
  """FLOPs of a lowered (not yet compiled) program by XLA's HLO cost analysis (NaN if this
  backend offers none, so the timing still gets reported)."""
  try:
    analysis = lowered.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
      analysis = analysis[0]
    return float(analysis["flops"])
  except Exception as e:  # pylint: disable=broad-except
    print(f"warning: no XLA cost analysis ({type(e).__name__}: {e}); MFU column n/a", flush=True)
    return float("nan")


class Ours:
  """Our jitted, donated step on a fresh state."""

  def __init__(self, config):
    self.config = config
    mesh = self.trainer_mesh = sharding.make_mesh(config.mesh.fsdp)
    counts = schedules.step_counts(config, num_examples=None)
    self.trainer = step_lib.build_trainer(config, cim.build_model(config.model, config.data),
                                          mesh, counts)
    self.state = self.trainer.init_state(jax.random.PRNGKey(0), state_lib.dummy_batch(config.data))
    self.rng = jax.random.PRNGKey(1)
    self.batch = sharding.global_batch(synthetic_batch(config), self.trainer.batch_sharding)
    t = time.perf_counter()
    # One trace and one compilation: the FLOPs come from the traced jaxpr and the timed calls go
    # to the compiled executable (jit's own cache would compile the same program a second time).
    traced = self.trainer.train_step.trace(self.state, self.batch, self.rng)
    lowered = traced.lower()
    self.step = lowered.compile()
    self.compile_seconds = time.perf_counter() - t
    if config.model.attention_impl == "cudnn":
      traced, lowered = self._traced_with_xla_attention(config)
    self.flops = xla_flops(lowered)
    self.matmul_flops = matmul_flops(traced.jaxpr.jaxpr)

  def _traced_with_xla_attention(self, config):
    """(traced, lowered) of the same step with XLA attention, on abstract arguments (no device
    memory, no compilation): the FLOPs of the model itself."""
    config = config.copy_and_resolve_references()
    config.model.attention_impl = "xla"
    counts = schedules.step_counts(config, num_examples=None)
    trainer = step_lib.build_trainer(config, cim.build_model(config.model, config.data),
                                     self.trainer_mesh, counts)
    abstract = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    traced = trainer.train_step.trace(jax.tree.map(abstract, self.state),
                                      jax.tree.map(abstract, self.batch), self.rng)
    return traced, traced.lower()

  def run(self, steps: int, batches=None) -> float:
    """Seconds per step over `steps` (after the first, compiling call has been made)."""
    t = time.perf_counter()
    for _ in range(steps):
      batch = self.batch if batches is None else sharding.global_batch(
          next(batches), self.trainer.batch_sharding)
      self.state, metrics = self.step(self.state, batch, self.rng)
    jax.block_until_ready(metrics["loss"])
    return (time.perf_counter() - t) / steps


class Torch:
  """The same model and step in PyTorch (timm blocks), CPU threads as given."""

  def __init__(self, config, threads: int):
    import torch  # pylint: disable=g-import-not-at-top
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch_cim  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    fields = __import__("cim_jax.models.vit", fromlist=["x"]).decode_variant(config.model.variant)
    d = config.data
    self.model = torch_cim.TorchCIM(fields["width"], fields["depth"], fields["num_heads"],
                                    fields["patch_size"], d.context_size, d.exemplar_size,
                                    config.model.decoder_dim, config.model.decoder_heads)
    self.step = torch_cim.make_step(self.model)
    b, n, c, e = config.batch_size, d.num_exemplars, d.context_size, d.exemplar_size
    self.inputs = (torch.randn(b, 3, c, c), torch.randn(b, n, 3, e, e),
                   torch.rand(b, n, c, c) > 0.7)

  def run(self, steps: int) -> float:
    t = time.perf_counter()
    for _ in range(steps):
      self.step(*self.inputs)
    return (time.perf_counter() - t) / steps


def pipeline_iterator(config):
  from cim_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  return iter(pipeline.make_dataset(config, "train"))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  on_cpu = jax.default_backend() == "cpu"
  add_case_arguments(parser, "Ti/16:32,B/16:8 on CPU, B/16:256 elsewhere",
                     "float32 on CPU, bfloat16 elsewhere")
  parser.add_argument("--attention_impl", default="",
                      help="comma-separated attention kernels to compare per case: xla, cudnn "
                           "(cuDNN fused attention; NVIDIA GPU with bfloat16/float16 only)")
  parser.add_argument("--steps", type=int, default=3 if on_cpu else 20, help="timed steps/round")
  parser.add_argument("--rounds", type=int, default=2, help="alternating ours/torch rounds")
  parser.add_argument("--fsdp", type=int, default=None, help="fsdp axis size (default: config)")
  parser.add_argument("--remat", action=argparse.BooleanOptionalAction, default=None,
                      help="rematerialise encoder blocks (default: config)")
  parser.add_argument("--workers", type=int, default=None,
                      help="grain workers for --pipeline (default: config)")
  parser.add_argument("--torch_threads", type=int, default=2)
  parser.add_argument("--settle", type=float, default=2.0,
                      help="seconds of idle after each torch round (its threads spin-wait)")
  parser.add_argument("--no_torch", action="store_true", help="skip the PyTorch comparison")
  parser.add_argument("--pipeline", action=argparse.BooleanOptionalAction, default=on_cpu,
                      help="also time with the input pipeline included")
  parser.add_argument("--max_batch", action="store_true",
                      help="double the batch from the given one until it no longer fits")
  parser.add_argument("--max_batch_cap", type=int, default=0,
                      help="with --max_batch: stop doubling at this batch (0: no cap)")
  parser.add_argument("--profile", default="",
                      help="write a jax.profiler (perfetto) trace of a few device-batch steps here")
  args, config_args = parse_case_arguments(
      parser, argv, default_cases="Ti/16:32,B/16:8" if on_cpu else "B/16:256",
      default_dtype="float32" if on_cpu else "bfloat16")
  if args.workers is None and not args.custom_config:
    args.workers = 0

  device = jax.devices()[0]
  peak = peak_flops(device)
  peak_note = "table"
  if peak is None:
    peak, peak_note = measured_matmul_peak(), "measured f32 matmul"
  print(f"device: {device.device_kind} x{jax.device_count()} ({jax.default_backend()}), "
        f"config {args.config or DEFAULT_CONFIG}"
        f"{' with ' + ' '.join(config_args) if config_args else ''}, "
        f"peak/device {peak:.3g} FLOP/s ({peak_note}); "
        f"torch threads {args.torch_threads}. Shared machine: figures are noisy.", flush=True)
  print(f"jax {jax.__version__}, {installed_versions()}{cudnn_version()}; "
        f"devices {jax.devices()}", flush=True)
  args.peak = peak
  impls = args.attention_impl.split(",")
  for impl in impls:
    if impl not in ("", "xla", "cudnn"):
      parser.error(f"--attention_impl: unknown kernel {impl!r}; expected xla or cudnn")
  print_header()
  try:
    cases = parse_cases(args.cases)
  except ValueError as e:
    parser.error(str(e))
  for variant, batch in cases:
    for impl in impls:
      config = bench_config(variant, batch, args, impl)
      label = case_label(config, with_attention=bool(impl))
      unsupported = unsupported_reason(config.model.attention_impl, config.model.dtype)
      if unsupported:
        print(f"{label:<{CASE_WIDTH}}n/a ({unsupported})", flush=True)
        continue
      try:
        print_row(bench_case(variant, config.batch_size, args, impl))
      except Exception as e:  # pylint: disable=broad-except  (report and go on to the next case)
        message = (str(e).strip().splitlines() or [""])[0][:200]
        print(f"{label:<{CASE_WIDTH}}n/a (failed: {type(e).__name__}: {message})", flush=True)


def installed_versions() -> str:
  """'jaxlib X[, jax-cuda12-plugin Y]': what the JAX runtime is made of (informational)."""
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  found = []
  for name in ("jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin"):
    try:
      found.append(f"{name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
      pass
  return ", ".join(found)


def cudnn_version() -> str:
  """', cuDNN <version>' on NVIDIA GPUs ('' elsewhere or when unknown)."""
  if jax.default_backend() != "gpu":
    return ""
  try:
    from jax._src.lib import cuda_versions  # pylint: disable=g-import-not-at-top  (no public API)
    return f", cuDNN {cuda_versions.cudnn_get_version()}"
  except Exception:  # pylint: disable=broad-except  (informational only)
    return ""


def unsupported_reason(attention_impl: str, dtype: str) -> str:
  """Why this attention kernel cannot run here ('' when it can)."""
  if attention_impl != "cudnn":
    return ""
  if jax.default_backend() != "gpu":
    return f"cudnn attention needs an NVIDIA GPU, backend is {jax.default_backend()}"
  if dtype not in ("bfloat16", "float16"):
    return f"cudnn attention needs bfloat16/float16, dtype is {dtype}"
  return ""


def bench_case(variant, batch, args, attention_impl: str = ""):
  """Times one VARIANT:BATCH case: ours (device batch, with pipeline) and PyTorch."""
  if args.max_batch:
    batch = largest_batch(variant, batch, args, attention_impl)
  config = bench_config(variant, batch, args, attention_impl)
  ours = Ours(config)
  ours.run(1)  # first call: executable load + warm-up
  torch_model = None if args.no_torch else Torch(config, args.torch_threads)
  if torch_model is not None:
    torch_model.run(1)
    time.sleep(args.settle)
  ours_t, torch_t = [], []
  for _ in range(args.rounds):  # alternate, so background load hits both sides alike
    ours_t.append(ours.run(args.steps))
    if torch_model is not None:
      torch_t.append(torch_model.run(args.steps))
      time.sleep(args.settle)  # let torch's OpenMP threads stop spinning before we time ours
  t_ours = statistics.median(ours_t)
  row = dict(case=case_label(config, with_attention=bool(attention_impl)), ours=t_ours, sps=batch / t_ours,
             mfu=ours.flops / t_ours / (args.peak * jax.device_count()),
             mfu_matmul=ours.matmul_flops / t_ours / (args.peak * jax.device_count()),
             compile=ours.compile_seconds)
  if torch_model is not None:
    row["torch"] = statistics.median(torch_t)
    row["ratio"] = t_ours / row["torch"]
  if args.profile:
    with jax.profiler.trace(args.profile, create_perfetto_trace=True):
      ours.run(3)
  if args.pipeline:
    batches = pipeline_iterator(config)
    ours.run(1, batches)
    row["with_pipeline"] = ours.run(args.steps, batches)
  return row


def largest_batch(variant, batch, args, attention_impl: str = ""):
  """Doubles the batch while a step still fits in device memory."""
  fits = None
  while True:
    if args.max_batch_cap and batch > args.max_batch_cap and fits is not None:
      print(f"{variant}: stopped doubling at the cap, {args.max_batch_cap}")
      return fits
    try:
      ours = Ours(bench_config(variant, batch, args, attention_impl))
      ours.run(1)
      del ours
      fits, batch = batch, batch * 2
    except Exception as e:  # pylint: disable=broad-except
      if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
        raise
      if fits is None:
        raise SystemExit(f"{variant}: batch {batch} does not fit") from None
      print(f"{variant}: batch {batch} does not fit; using {fits}")
      return fits


CASE_WIDTH = 20
HEADER = (f"{'case':<{CASE_WIDTH}}{'ours s/step':>12}{'samples/s':>11}{'MFU':>8}{'MFU mm':>8}"
          f"{'torch s/step':>13}{'ours/torch':>11}{'w/ pipeline':>12}{'compile s':>10}")


def print_header():
  print(HEADER)
  print("-" * len(HEADER), flush=True)


def print_row(r):
  """One row per case, printed as soon as it is measured."""
  torch_s = f"{r['torch']:.3f}" if "torch" in r else "-"
  ratio = f"{r['ratio']:.2f}" if "ratio" in r else "-"
  pipe = f"{r['with_pipeline']:.3f}" if "with_pipeline" in r else "-"
  print(f"{r['case']:<{CASE_WIDTH}}{r['ours']:>12.4f}{r['sps']:>11.1f}{r['mfu']:>8.1%}"
        f"{r['mfu_matmul']:>8.1%}"
        f"{torch_s:>13}{ratio:>11}{pipe:>12}{r['compile']:>10.1f}", flush=True)


if __name__ == "__main__":
  main()
