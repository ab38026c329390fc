"""Where a profiled step's device time goes: kernel time by kind and the top kernels.

  python bench/profile_summary.py TRACE_DIR [--top=15]

TRACE_DIR is what `bench/bench_step.py --profile=TRACE_DIR` (jax.profiler with a perfetto trace)
wrote. On a GPU the kernels are the events of the device's stream threads; on a CPU (a format
check only) the events of XLA's worker threads. Kinds are guessed from kernel names: matmul
(cuBLAS / cuTLASS / Triton GEMMs), attention (cuDNN fused attention), reduction, transpose/copy,
elementwise (XLA loop fusions), memcpy/memset, other. Shares are of summed kernel time, which
can exceed wall time where streams overlap.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import sys

# (kind, substrings of a lower-cased kernel name), first match wins: GEMM fusions before fusions.
KINDS = (
    ("attention", ("fmha", "flash", "cudnn", "dot_product_attention")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_", "sm80_", "dot", "matmul")),
    ("memcpy/memset", ("memcpy", "memset")),
    ("reduction", ("reduce", "reduction")),
    ("transpose/copy", ("transpose", "copy")),
    ("elementwise", ("loop_", "fusion", "convert", "multiply", "add", "select", "broadcast")),
)


def kernel_kind(name: str) -> str:
  lowered = name.lower()
  for kind, keys in KINDS:
    if any(key in lowered for key in keys):
      return kind
  return "other"


def find_trace(trace_dir: str) -> str:
  paths = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True))
  if not paths:
    raise SystemExit(f"error: no perfetto_trace.json.gz under {trace_dir}")
  return paths[-1]  # the newest profile session


def kernel_events(trace: dict):
  """(name, microseconds) of every device kernel; CPU traces: XLA's worker-thread events."""
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  processes, threads = {}, {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      processes[e["pid"]] = e["args"]["name"]
    elif e.get("ph") == "M" and e.get("name") == "thread_name":
      threads[(e["pid"], e.get("tid"))] = e["args"]["name"]
  device_pids = {pid for pid, name in processes.items() if name.startswith("/device:")}
  # Kernels on GPU stream threads; failing those, the device's HLO-op line; on a CPU, the ops
  # XLA's worker threads ran (without the executor span that encloses them).
  choices = ((lambda pid, thread: pid in device_pids and thread.lower().startswith("stream")),
             (lambda pid, thread: pid in device_pids and thread == "XLA Ops"),
             (lambda pid, thread: not device_pids and thread.startswith("tf_XLAEigen")))
  for keep in choices:
    kernels = [(e["name"], float(e.get("dur", 0.0))) for e in events
               if e.get("ph") == "X" and keep(e.get("pid"), threads.get((e.get("pid"), e.get("tid")), ""))
               and not e["name"].startswith("ThunkExecutor")]
    if kernels:
      return kernels
  return []


def summarize(kernels, top: int = 15) -> str:
  total = sum(d for _, d in kernels)
  if not total:
    return "no kernel events found"
  by_kind, by_name, counts = (collections.Counter(), collections.Counter(),
                              collections.Counter())
  for name, duration in kernels:
    by_kind[kernel_kind(name)] += duration
    by_name[name] += duration
    counts[name] += 1
  lines = [f"kernel time {total / 1e3:.1f} ms over {len(kernels)} kernels"]
  lines += [f"  {kind:<16}{t / 1e3:>10.1f} ms {t / total:>7.1%}" for kind, t in by_kind.most_common()]
  lines.append(f"top {top} kernels (total ms, calls, kind):")
  for name, t in by_name.most_common(top):
    lines.append(f"  {t / 1e3:>9.2f} {counts[name]:>6}  {kernel_kind(name):<15} {name[:110]}")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("trace_dir")
  parser.add_argument("--top", type=int, default=15)
  args = parser.parse_args(argv)
  path = find_trace(args.trace_dir)
  with gzip.open(path, "rt") as f:
    trace = json.load(f)
  print(f"profile: {path}")
  print(summarize(kernel_events(trace), args.top))


if __name__ == "__main__":
  sys.exit(main())
