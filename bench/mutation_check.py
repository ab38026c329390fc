"""Critical-mutation check: does the default test suite catch deliberately broken code copies?

Run by hand (not in CI), from the repository root:

  python bench/mutation_check.py                 # every mutation
  python bench/mutation_check.py ema_constant    # only the named ones
  python bench/mutation_check.py --list

Each mutation is one exact text replacement in one file (checked to apply exactly once). It is
applied, one at a time, to a temporary copy of the repository's tracked files (the working tree's
contents, uncommitted edits included), and the mutation's own small selection of default-suite
tests is run there with `python -m pytest -q -x -p no:cacheprovider`. A mutation is *caught* when
those tests fail. Printed per mutation: caught / SURVIVED, the first failing test, seconds; then
a summary and the total wall time. Exit status 1 when a mutation survives (or does not apply).

Every mutation listed here must be caught: when one survives, strengthen a test until it is.
"""

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Mutation:
  name: str
  file: str  # relative to the repository root
  old: str  # exact text, present exactly once
  new: str
  tests: tuple  # pytest node ids or files (relative to the repository root)
  why: str = ""


T_GUARDS = "tests/test_training_guards.py"
T_LEARN = "tests/test_learning.py"
T_FAST = "tests/test_fast_paths.py"
T_PAIRS = "tests/test_pairs.py"
_DECAY_MASK_LINE = "decay = weight_decay_mask(params, o.wd_exempt)"

MUTATIONS = [
    # --- bugs the default suite used to miss -------------------------------------------------
    Mutation("update_negated", "cim_jax/train/step.py",
             "params = optax.apply_updates(state.params, updates)",
             "params = jax.tree.map(lambda p, u: p - u, state.params, updates)",
             (f"{T_LEARN}::test_loss_falls_and_pretext_iou_rises",), "gradient ascent"),
    Mutation("report_after_is_init", "cim_jax/evaluate/report.py",
             '("after", (params, target_params, model_state))',
             '("after", before)',
             (f"{T_LEARN}::test_report_evaluates_trained_and_initial_parameters",), "the report's after pretext IoU computed with the random init"),
    Mutation("report_pretrained_knn_is_init", "cim_jax/evaluate/report.py",
             '(("pretrained", encoder_params), ("random_init", None))',
             '(("pretrained", None), ("random_init", None))',
             (f"{T_LEARN}::test_report_evaluates_trained_and_initial_parameters",), "the report's pretrained kNN computed with the random init"),
    Mutation("decay_every_leaf", "cim_jax/train/optimizer.py",
             _DECAY_MASK_LINE,
             "decay = jax.tree.map(lambda _: True, params)",
             (f"{T_GUARDS}::test_build_trainer_decays_exactly_the_listed_leaves",),
             "build_trainer decays every leaf"),
    Mutation("wd_exempt_ignored", "cim_jax/train/optimizer.py",
             _DECAY_MASK_LINE,
             "decay = weight_decay_mask(params)",
             (f"{T_GUARDS}::test_build_trainer_decays_exactly_the_listed_leaves",),
             "build_trainer ignores optim.wd_exempt"),
    Mutation("adam_b2_fixed", "cim_jax/train/optimizer.py",
             "optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=1e-8)",
             "optax.scale_by_adam(b1=o.b1, b2=0.999, eps=1e-8)",
             (f"{T_GUARDS}::test_adamw_matches_numpy_over_steps",), "Adam b2 hard-coded"),
    Mutation("adam_b1_fixed", "cim_jax/train/optimizer.py",
             "optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=1e-8)",
             "optax.scale_by_adam(b1=0.9, b2=o.b2, eps=1e-8)",
             (f"{T_GUARDS}::test_adamw_matches_numpy_over_steps",), "Adam b1 hard-coded"),
    Mutation("adam_eps", "cim_jax/train/optimizer.py",
             "optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=1e-8)",
             "optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=1e-6)",
             (f"{T_GUARDS}::test_adamw_matches_numpy_over_steps",), "Adam eps changed"),
    Mutation("accum_sums", "cim_jax/train/optimizer.py",
             "optax.MultiSteps(tx, every_k_schedule=counts.accum_steps)",
             "optax.MultiSteps(tx, every_k_schedule=counts.accum_steps, use_grad_mean=False)",
             (f"{T_GUARDS}::test_accumulation_averages_micro_batch_gradients",),
             "gradient accumulation sums instead of averaging"),
    Mutation("clip_ignored", "cim_jax/train/optimizer.py",
             "optax.clip_by_global_norm(o.grad_clip_norm) if o.grad_clip_norm > 0 else "
             "optax.identity()",
             "optax.identity()",
             (f"{T_GUARDS}::test_clipping_scales_a_large_gradient",), "grad_clip_norm ignored"),
    Mutation("knn_gap_pool_ignored", "cim_jax/evaluate/knn.py",
             'return tokens[:, 0] if pool == "tok" else tokens[:, 1:].mean(axis=1)',
             "return tokens[:, 0]",
             (f"{T_FAST}::test_knn_gap_pool_is_the_mean_of_patch_tokens",),
             'kNN pool="gap" ignored'),
    Mutation("knn_pool_not_passed", "cim_jax/evaluate/knn.py",
             "apply_fn = encoder_feature_fn(encoder, encoder_params, pool=pool)",
             "apply_fn = encoder_feature_fn(encoder, encoder_params)",
             (f"{T_FAST}::test_knn_gap_pool_is_the_mean_of_patch_tokens",),
             "knn_accuracy drops its pool argument"),
    Mutation("ema_constant_momentum", "cim_jax/train/step.py",
             "momentum = momentum_schedule(last_batch)",
             "momentum = momentum_schedule(0)",
             (f"{T_GUARDS}::test_ema_from_a_distant_target",), "EMA with a constant momentum"),
    Mutation("ema_momentum_off_by_one", "cim_jax/train/step.py",
             "momentum = momentum_schedule(last_batch)",
             "momentum = momentum_schedule(last_batch + 1)",
             (f"{T_GUARDS}::test_ema_from_a_distant_target",), "EMA momentum of the next batch"),
    Mutation("decoder_kv_swapped", "cim_jax/models/decoder.py",
             "k, v = (t.reshape(batch * num_exemplars, -1, self.num_heads, head_dim)",
             "v, k = (t.reshape(batch * num_exemplars, -1, self.num_heads, head_dim)",
             (f"{T_GUARDS}::test_decoder_attention_matches_numpy",), "decoder k and v swapped"),
    Mutation("pixel_accuracy_inverted", "cim_jax/models/cim.py",
             '"pixel_accuracy": ((logit_difference > 0) == masks)',
             '"pixel_accuracy": ((logit_difference < 0) == masks)',
             (f"{T_GUARDS}::test_pixel_accuracy_metric",), "pixel_accuracy metric wrong"),
    # --- core ones -----------------------------------------------------------------------------
    Mutation("corners_order", "cim_jax/data/pairs.py",
             "grid = ((0.0, 0.0), (e, 0.0), (e, e), (0.0, e))  # TL, TR, BR, BL",
             "grid = ((0.0, 0.0), (0.0, e), (e, e), (e, 0.0))  # TL, TR, BR, BL",
             (f"{T_PAIRS}::test_label_corners_are_the_exemplar_tl_tr_br_bl",),
             "label corners in TL, BL, BR, TR order (same mask, mirrored label)"),
    Mutation("mask_edge_order", "cim_jax/geometry.py",
             "end = xp.concatenate([corners[..., 1:, :], corners[..., :1, :]], axis=-2)",
             "end = xp.concatenate([corners[..., 2:, :], corners[..., :2, :]], axis=-2)",
             (f"{T_PAIRS}::test_exemplar_warped_back_matches_context_inside_the_mask",),
             "mask rasterised from the wrong corner pairs"),
    Mutation("box_centre", "cim_jax/data/pairs.py",
             "cx - (cos * width - sin * height) / 2",
             "cx - (cos * width + sin * height) / 2",
             (f"{T_PAIRS}::test_outputs_match_the_original_through_the_composed_affines",),
             "exemplar affine not centred on the box"),
    Mutation("drawn_box_centre_range", "cim_jax/data/pairs.py",
             "centre_x = extent_x / 2 + u[-2] * max(size - extent_x, 0.0)",
             "centre_x = u[-2] * max(size - extent_x, 0.0)",
             (T_PAIRS,), "drawn boxes' centres not offset by half their extent"),
    Mutation("search_flip_not_folded", "cim_jax/data/pairs.py",
             "source_affines = [[[-a, -b, s - t], row] for (a, b, t), row in affines]",
             "source_affines = affines",
             (f"{T_PAIRS}::test_exemplar_warped_back_matches_context_inside_the_mask",),
             "search flip not applied to the exemplar warps"),
    Mutation("context_not_flipped", "cim_jax/data/pairs.py",
             "    context = cv2.flip(context, 1)\n",
             "    context = context\n",
             (f"{T_PAIRS}::test_exemplar_warped_back_matches_context_inside_the_mask",),
             "context not flipped with the search image"),
    Mutation("exemplar_flip_vertical", "cim_jax/data/photometric.py",
             "image = cv2.flip(image, 1)", "image = cv2.flip(image, 0)",
             (f"{T_PAIRS}::test_flip_mirrors_after_the_label_is_fixed",),
             "exemplar flip vertical instead of horizontal"),
    Mutation("ema_schedule_reversed", "cim_jax/train/schedules.py",
             "return end - (end - start) * (jnp.cos(math.pi * progress) + 1.0) / 2.0",
             "return start + (end - start) * (jnp.cos(math.pi * progress) + 1.0) / 2.0",
             ("tests/test_train_schedules.py::test_ema_momentum_is_byol_cosine",),
             "EMA momentum schedule runs backwards"),
    Mutation("ema_update_weight", "cim_jax/train/step.py",
             "step_size=1.0 - momentum)", "step_size=momentum)",
             (f"{T_GUARDS}::test_ema_update_directly",), "EMA weights swapped"),
    Mutation("decay_mask_norms", "cim_jax/train/optimizer.py",
             "{p: len(x.shape) > 1 and not", "{p: len(x.shape) > 0 and not",
             (f"{T_GUARDS}::test_build_trainer_decays_exactly_the_listed_leaves",),
             "biases and norm parameters decayed"),
    Mutation("loss_channel_order", "cim_jax/models/cim.py",
             "grid_logits[..., 1] - grid_logits[..., 0], self.context_size)",
             "grid_logits[..., 0] - grid_logits[..., 1], self.context_size)",
             (f"{T_GUARDS}::test_pixel_accuracy_metric", T_LEARN), "loss channel order swapped"),
    Mutation("loss_channel_order_eval", "cim_jax/models/cim.py",
             "return correlation_loss_from_difference(logits[..., 1] - logits[..., 0], masks)",
             "return correlation_loss_from_difference(logits[..., 0] - logits[..., 1], masks)",
             ("tests/test_cim_model.py::test_correlation_loss_equals_hand_computation",),
             "correlation_loss channel order swapped"),
    # --- slow-only paths, now with fast tests --------------------------------------------------
    Mutation("finetune_resume_without_data_state", "cim_jax/train/loop.py",
             "restored = checkpointer.restore_latest(task.trainer.abstract_sharded_state(), "
             "task.data,",
             "restored = checkpointer.restore_latest(task.trainer.abstract_sharded_state(), "
             "None,",
             (f"{T_FAST}::test_finetune_resume_is_exact",),
             "fine-tuning resumes the state but restarts the data"),
    Mutation("finetune_resume_skips_a_step", "cim_jax/train/loop.py",
             "for step in range(start, total):",
             "for step in range(start + (start > 0), total):",
             (f"{T_FAST}::test_finetune_resume_is_exact",),
             "a resumed fine-tuning run skips the step after its checkpoint"),
    Mutation("grain_worker_batches_not_copied", "cim_jax/data/pipeline.py",
             "return {k: v if type(v) is np.ndarray else np.array(v) for k, v in batch.items()}",
             "return {k: v if type(v) is np.ndarray else np.array(v)[::-1] "
             "for k, v in batch.items()}",
             (f"{T_FAST}::test_one_grain_worker_gives_identical_batches_and_resumes",),
             "batches from worker processes altered (the shared-memory copy path)"),
    Mutation("interop_export_online_for_target", "cim_jax/tools/convert.py",
             'encoder = params["encoder"] if args.which == "online" else target_params["encoder"]',
             'encoder = params["encoder"]',
             (f"{T_LEARN}::test_interop_exports_the_run_workdir",),
             "interop export --which target writes the online encoder"),
]


def tracked_files(repo):
  out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                       cwd=repo, check=True, capture_output=True).stdout
  return [p for p in out.decode().split("\0") if p]


def copy_tree(repo, dest):
  for rel in tracked_files(repo):
    src = os.path.join(repo, rel)
    if not os.path.isfile(src):
      continue  # deleted in the working tree
    dst = os.path.join(dest, rel)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.copy2(src, dst)


def first_failure(output):
  for pattern in (r"^FAILED (\S+)", r"^ERROR (\S+)", r"^_{3,} (\S.*\S) _{3,}$"):
    m = re.search(pattern, output, re.M)
    if m:
      return m.group(1)
  return "?"


def run_one(mutation, copy, python, timeout):
  path = os.path.join(copy, mutation.file)
  with open(path, encoding="utf-8") as f:
    original = f.read()
  count = original.count(mutation.old)
  if count != 1:
    return "NOT APPLIED", f"old text found {count} times in {mutation.file}", 0.0
  with open(path, "w", encoding="utf-8") as f:
    f.write(original.replace(mutation.old, mutation.new))
  start = time.perf_counter()
  try:
    proc = subprocess.run(
        [python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *mutation.tests],
        cwd=copy, capture_output=True, text=True, timeout=timeout,
        env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    seconds = time.perf_counter() - start
    output = proc.stdout + proc.stderr
    if proc.returncode == 0:
      return "SURVIVED", "-", seconds
    if proc.returncode in (1,):
      return "caught", first_failure(output), seconds
    tail = output.strip().splitlines()[-1:] or ["?"]
    return f"ERROR rc={proc.returncode}", tail[0][:120], seconds
  except subprocess.TimeoutExpired:
    return "TIMEOUT", f"> {timeout} s", time.perf_counter() - start
  finally:
    with open(path, "w", encoding="utf-8") as f:
      f.write(original)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
  parser.add_argument("--list", action="store_true")
  parser.add_argument("--python", default=sys.executable)
  parser.add_argument("--timeout", type=float, default=900.0, help="seconds per mutation")
  parser.add_argument("--baseline", action="store_true",
                      help="first run every selected test unmutated (they must pass)")
  args = parser.parse_args()
  chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]
  if args.list:
    for m in chosen:
      print(f"{m.name:32s} {m.file:36s} {m.why}\n{'':32s} tests: {' '.join(m.tests)}")
    return 0
  unknown = set(args.names) - {m.name for m in MUTATIONS}
  if unknown:
    parser.error(f"unknown mutations: {sorted(unknown)}")
  total_start = time.perf_counter()
  results = []
  with tempfile.TemporaryDirectory(prefix="cim_mutation_") as copy:
    copy_tree(REPO, copy)
    if args.baseline:
      tests = sorted({t for m in chosen for t in m.tests})
      proc = subprocess.run([args.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                            cwd=copy)
      if proc.returncode:
        print("baseline: the selected tests fail on the unmutated code", flush=True)
        return 1
    for m in chosen:
      verdict, where, seconds = run_one(m, copy, args.python, args.timeout)
      results.append((m, verdict, where, seconds))
      print(f"{m.name:32s} {verdict:11s} {seconds:7.1f} s  {where}", flush=True)
  wall = time.perf_counter() - total_start
  caught = sum(v == "caught" for _, v, _, _ in results)
  print(f"\n{caught}/{len(results)} mutations caught; total wall time {wall:.0f} s")
  bad = [m.name for m, v, _, _ in results if v != "caught"]
  if bad:
    print("not caught: " + ", ".join(bad))
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
