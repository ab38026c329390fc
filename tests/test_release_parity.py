"""Training-trajectory parity with PyTorch restatements of the authors' released recipes.

Pre-training: the release's loop (tools/main_pretrain.py, engines/pretrain_cim.py, models/cim.py
iter_update / momentum_update; docs/METHOD.md): fp32, no clipping, torch AdamW (0.9, 0.95) over
timm's add_weight_decay groups, MAE's per-iteration lr schedule set on the first micro-batch of
each accumulation cycle, loss / accum + backward, one step on the last micro-batch, then the EMA
of patch_embed / blocks / norm with the cosine momentum of the micro-batch index. Our side is
the jitted train step `build_trainer` compiles for pre-training, started from the same weights
(ours, exported through our authors'-layout exporter) on the same micro-batches.

Fine-tuning: the release's optimizer (tools/main_finetune.py, engines/finetune.py, MAE's
util/lr_decay.py param_groups_lrd): torch AdamW (0.9, 0.999) over layer-decay groups of a timm
VisionTransformer (global average pool + fc_norm), cls token exempt from weight decay,
per-iteration lr schedule to min_lr, LabelSmoothingCrossEntropy(0.1); ours is the trainer
`finetuning.build_trainer` builds for `python -m cim_jax.finetune`.

Attention key biases have an exactly zero gradient (softmax is shift-invariant); the float noise
computed there is normalised by Adam into steps of up to +-lr on either side, so they are
compared by their effect on the outputs (none), not element by element (key_bias_mask).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
import timm.loss  # noqa: E402  pylint: disable=wrong-import-position

import torch_reference as ref  # noqa: E402  pylint: disable=wrong-import-position
from cim_jax import interop, sharding  # noqa: E402
from cim_jax.geometry import masks_from_corners  # noqa: E402
from cim_jax.train import finetuning  # noqa: E402
from cim_jax.models import cim  # noqa: E402
from cim_jax.train import schedules  # noqa: E402
from cim_jax.train import state as state_lib  # noqa: E402
from cim_jax.train import step as step_lib  # noqa: E402
from train_fixtures import key_bias_mask, recipe  # noqa: E402

pytestmark = pytest.mark.usefixtures("compilation_cache")

F = torch.nn.functional

# Tolerances, fp32 on both sides. Reached on CPU: losses within 3e-6 relative, parameters
# within 1e-6 absolute (under 1e-5 of each leaf's scale); run with -s to see the figures.
LOSS_RTOL = 1e-5  # per-step losses
PARAM_ATOL, PARAM_RTOL = 2e-6, 1e-5  # final online and target parameters, element by element
LOGIT_ATOL = 1e-5  # outputs with our vs the torch side's key biases

BATCH = 2
TOTAL = 10  # micro-batches the schedules span
WARMUP = 3  # micro-batches (not a multiple of accum 2: the schedule must be exact anyway)
PEAK_LR = 1e-2  # large enough that every step moves the weights far beyond float noise


def _release_lr(iteration, num_iterations, peak, min_lr, warmup):
  """MAE's util/lr_sched.adjust_learning_rate at epoch = iteration / len(data_loader) (1 epoch)."""
  epoch, warmup_epochs, epochs = iteration / num_iterations, warmup / num_iterations, 1.0
  if epoch < warmup_epochs:
    return peak * epoch / warmup_epochs
  return min_lr + (peak - min_lr) * 0.5 * (
      1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


def _perturbed(tree, seed, scale):
  """`tree` plus Gaussian noise: nonzero biases, non-unit norm scales, nothing degenerate."""
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(jax.device_get(tree))
  out = {}
  for path, leaf in flat.items():
    s = scale * (0.2 if path[-2:] == ("patch_embed", "kernel") else 1.0)  # 768 inputs
    out[path] = (np.asarray(leaf) + s * rng.standard_normal(leaf.shape)).astype(np.float32)
  return traverse_util.unflatten_dict(out)


def _compare_trees(ours, theirs, skip=None, where=""):
  """Element-wise comparison (except `skip` entries); returns the max abs difference and the
  max relative one, each leaf's difference over that leaf's largest magnitude."""
  flat_ours, flat_theirs = traverse_util.flatten_dict(ours), traverse_util.flatten_dict(theirs)
  assert flat_ours.keys() == flat_theirs.keys(), where
  flat_skip = traverse_util.flatten_dict(skip) if skip is not None else {}
  worst_abs = worst_rel = 0.0
  for path, a in flat_ours.items():
    a, b = np.asarray(a), np.asarray(flat_theirs[path])
    keep = ~flat_skip.get(path, np.zeros(a.shape, bool))
    np.testing.assert_allclose(a[keep], b[keep], rtol=PARAM_RTOL, atol=PARAM_ATOL,
                               err_msg=f"{where} {'/'.join(path)}")
    diff = np.abs(a - b)[keep]
    if diff.size:
      worst_abs = max(worst_abs, float(diff.max()))
      worst_rel = max(worst_rel, float(diff.max() / max(float(np.abs(b).max()), 1e-12)))
  return worst_abs, worst_rel


def _substitute(tree, other, mask):
  """`tree` with the `mask` entries taken from `other`."""
  return jax.tree.map(lambda a, b, m: np.where(m, np.asarray(b), np.asarray(a)), tree, other,
                      mask)


# ----------------------------------------------------------------------------------------------
# Pre-training.


def _pretrain_config(accum):
  config = ref.tiny_config()
  config.batch_size = BATCH  # per micro-batch (one device)
  config.num_train_steps = TOTAL
  config.optim.accum_steps = accum
  config.optim.warmup_steps = WARMUP
  config.optim.base_lr = PEAK_LR * 256 / (BATCH * accum)  # peak = blr * batch * accum / 256
  config.optim.min_lr = 0.0
  config.mesh.fsdp = 1
  return config


def _pretrain_batches(count, seed=0):
  """Micro-batches of random contexts / exemplars and random rotated boxes (non-trivial masks)."""
  rng = np.random.default_rng(seed)
  batches = []
  for _ in range(count):
    centre = rng.uniform(20, ref.CONTEXT - 20, (BATCH, ref.NUM, 1, 2))
    half = rng.uniform(8, 18, (BATCH, ref.NUM, 1, 2))
    angle = rng.uniform(-0.6, 0.6, (BATCH, ref.NUM, 1))
    unit = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64) * half
    cos, sin = np.cos(angle)[..., None], np.sin(angle)[..., None]
    rotated = np.stack([unit[..., 0] * cos[..., 0] - unit[..., 1] * sin[..., 0],
                        unit[..., 0] * sin[..., 0] + unit[..., 1] * cos[..., 0]], -1)
    batches.append({
        "context": rng.integers(0, 256, (BATCH, ref.CONTEXT, ref.CONTEXT, 3), dtype=np.uint8),
        "exemplars": rng.integers(0, 256, (BATCH, ref.NUM, ref.EXEMPLAR, ref.EXEMPLAR, 3),
                                  dtype=np.uint8),
        "corners": (centre + rotated).astype(np.float32)})
  return batches


def _nchw(images):
  return torch.from_numpy(np.array(cim.normalize_images(images))).permute(0, 3, 1, 2)


def _torch_pretrain(state_dict, batches, *, accum, total, warmup, peak, min_lr=0.0,
                    weight_decay=0.05, betas=(0.9, 0.95), momentum_range=(0.99, 1.0)):
  """The release's pre-training loop over `batches`; -> (per-micro-batch losses, state dict)."""
  sd = {k: torch.tensor(np.asarray(v)) for k, v in state_dict.items()}
  # requires_grad False in the release: the stop-grad patch projection, the fixed sin-cos tables
  # and every `_c` target copy; they are not in the optimizer.
  frozen = lambda k: k.startswith("patch_embed.") or k.endswith("pos_embed") or "_c." in k
  trainable = {k: v.requires_grad_(True) for k, v in sd.items() if not frozen(k)}
  # timm optim_factory.add_weight_decay(model, wd): 1-D tensors and biases are not decayed.
  no_decay = [p for k, p in trainable.items() if p.ndim == 1 or k.endswith(".bias")]
  decay = [p for k, p in trainable.items() if not (p.ndim == 1 or k.endswith(".bias"))]
  optimizer = torch.optim.AdamW([{"params": no_decay, "weight_decay": 0.0},
                                 {"params": decay, "weight_decay": weight_decay}],
                                lr=peak, betas=betas)
  ema_pairs = [(k, k.replace("patch_embed.", "patch_embed_c.").replace("blocks.", "blocks_c.")
                .replace("norm.", "norm_c.")) for k in sd
               if k.startswith(("patch_embed.", "blocks.", "norm."))]
  base_momentum, end_momentum = momentum_range
  iteration, max_iter = 0, total  # models/cim.py train_update: epochs * iter_per_epoch
  losses = []
  optimizer.zero_grad()
  for data_iter_step, batch in enumerate(batches):
    if data_iter_step % accum == 0:  # per-iteration lr, set at each cycle's first micro-batch
      lr = _release_lr(data_iter_step, total, peak, min_lr, warmup)
      for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    masks = torch.from_numpy(np.array(masks_from_corners(batch["corners"], ref.CONTEXT,
                                                           xp=jnp))).long()
    exemplars = [_nchw(batch["exemplars"][:, n]) for n in range(ref.NUM)]
    preds = ref.torch_correlation_logits(sd, _nchw(batch["context"]), exemplars)
    loss = sum(F.cross_entropy(preds[:, n].permute(0, 3, 1, 2), masks[:, n])  # forward_mask_loss
               for n in range(ref.NUM))
    losses.append(loss.item())
    (loss / accum).backward()
    if (data_iter_step + 1) % accum == 0:
      optimizer.step()
      optimizer.zero_grad()
    # models/cim.py iter_update, after every micro-batch.
    if (iteration + 1) % accum == 0:
      momentum = end_momentum - (end_momentum - base_momentum) * (
          math.cos(math.pi * iteration / float(max_iter)) + 1) / 2
      with torch.no_grad():
        for online, target in ema_pairs:
          sd[target] = sd[target] * momentum + sd[online] * (1.0 - momentum)
    iteration += 1
  return losses, {k: v.detach().numpy() for k, v in sd.items()}


@functools.lru_cache(maxsize=None)
def _pretrain_trainer(accum):
  config = _pretrain_config(accum)
  model = ref.model(config=config)
  counts = schedules.step_counts(config, num_examples=None)
  return config, model, step_lib.build_trainer(config, model, sharding.make_mesh(1), counts)


def _shift_to_value_rows(tree, other):
  """`tree` with (other - tree) of the key-bias rows added to the *value*-bias rows instead
  (the rows after the key rows): a control that a key-bias-sized change is visible elsewhere."""
  def shift(path, a, b):
    a, b = np.asarray(a), np.asarray(b)
    if path[-3:] == ("attn", "qkv", "bias") or path[-3:] == ("attn", "kv", "bias"):
      rows = a.shape[-1] // (3 if path[-2] == "qkv" else 2)
      start = rows if path[-2] == "qkv" else 0  # the key rows
      a = a.copy()
      a[-rows:] += b[start:start + rows] - a[start:start + rows]
    return a
  flat_a, flat_b = traverse_util.flatten_dict(tree), traverse_util.flatten_dict(other)
  return traverse_util.unflatten_dict({p: shift(p, a, flat_b[p]) for p, a in flat_a.items()})


def _key_bias_effect(model, params, target, other_params, other_target, batch):
  """(max |logits(ours) - logits(ours with the other side's key biases)|, the same for the
  key-bias differences moved onto the value biases: the control)."""
  apply = jax.jit(functools.partial(model.apply, train=False))
  logits = lambda p, t: apply(p, t, {}, batch)[1]["correlation_logits"]
  mine = logits(params, target)
  swapped = logits(_substitute(params, other_params, key_bias_mask(params)),
                   _substitute(target, other_target, key_bias_mask(target)))
  control = logits(_shift_to_value_rows(params, other_params),
                   _shift_to_value_rows(target, other_target))
  return float(jnp.abs(mine - swapped).max()), float(jnp.abs(mine - control).max())


@pytest.mark.parametrize("accum", [1, 2])
def test_pretraining_trajectory_matches_the_release(accum):
  config, model, trainer = _pretrain_trainer(accum)
  state = trainer.init_state(jax.random.PRNGKey(0), state_lib.dummy_batch(config.data))
  params = _perturbed(state.params, seed=1, scale=0.1)
  target = _perturbed(model.target_params_from(params), seed=2, scale=0.05)  # != online
  target["encoder"]["cls_token"] = params["encoder"]["cls_token"]  # shared in the release
  state = jax.device_put(state.replace(params=params, target_params=target),
                         trainer.state_shardings)
  state_dict = interop.export_authors_state_dict(params, target, {}, model)
  batches = _pretrain_batches(5 * accum)

  ours = []
  for batch in batches:
    state, metrics = trainer.train_step(state, sharding.global_batch(batch, trainer.batch_sharding),
                                        jax.random.PRNGKey(1))
    ours.append(float(metrics["loss"]))
  final = jax.device_get(state)
  theirs, torch_sd = _torch_pretrain(state_dict, batches, accum=accum, total=TOTAL, warmup=WARMUP,
                                     peak=PEAK_LR)

  np.testing.assert_allclose(ours, theirs, rtol=LOSS_RTOL)
  torch_params, torch_target, _ = interop.import_authors_state_dict(torch_sd, model)
  # Our target tree carries an (unused, EMA'd) cls-token copy; the release shares the online one.
  final_target = jax.tree.map(np.asarray, final.target_params)
  final_target["encoder"]["cls_token"] = np.asarray(final.params["encoder"]["cls_token"])
  online = _compare_trees(final.params, torch_params, key_bias_mask(final.params), "online")
  ema = _compare_trees(final_target, torch_target, key_bias_mask(final_target), "target")
  effect, control = _key_bias_effect(model, final.params, final_target, torch_params,
                                     torch_target, batches[0])
  assert effect < LOGIT_ATOL and control > 20 * LOGIT_ATOL, (effect, control)
  key_gap = max(float(np.abs(np.asarray(a) - np.asarray(b))[m].max()) for a, b, m in zip(
      jax.tree.leaves(final.params), jax.tree.leaves(torch_params),
      jax.tree.leaves(key_bias_mask(final.params))) if m.any())
  # The trajectory really moved: parameters and target far from where they started.
  moved = max(float(np.abs(a - b).max()) for a, b in zip(
      jax.tree.leaves(final.params["decoder"]), jax.tree.leaves(params["decoder"])))
  assert moved > 10 * PEAK_LR * 0.1
  print(f"\naccum {accum}: losses {np.round(ours, 4)}; max |dloss| "
        f"{np.abs(np.subtract(ours, theirs)).max():.2e} (rel "
        f"{(np.abs(np.subtract(ours, theirs)) / np.abs(theirs)).max():.2e}); online max abs "
        f"{online[0]:.2e} rel {online[1]:.2e}; target max abs {ema[0]:.2e} rel {ema[1]:.2e}; "
        f"key biases differ by up to {key_gap:.2e}, logit effect {effect:.2e} (moved onto the value "
        f"biases: {control:.2e})")


# ----------------------------------------------------------------------------------------------
# Fine-tuning.

FT_CLASSES, FT_BATCH, FT_IMAGE, FT_STEPS, FT_TOTAL, FT_WARMUP = 5, 4, 32, 4, 6, 2


def _finetune_config():
  config = recipe("cim_finetune.py:Ti/16")  # the release's recipe, then tiny sizes
  config.model.variant = "Mu/16"  # 64 wide, 2 blocks, 2 heads
  config.model.drop_path_rate = 0.0  # deterministic
  config.batch_size = FT_BATCH
  config.num_train_steps = FT_TOTAL
  config.optim.warmup_steps = FT_WARMUP
  config.optim.base_lr = PEAK_LR * 256 / FT_BATCH
  config.data.image_size = FT_IMAGE
  config.data.random_erase_prob = 0.0
  config.mixup.prob = 0.0  # no mixup / cutmix; label smoothing 0.1 stays
  return config


def _param_groups_lrd(model, weight_decay, no_weight_decay_list, layer_decay):
  """MAE's util/lr_decay.param_groups_lrd (with get_layer_id_for_vit)."""
  num_layers = len(model.blocks) + 1
  scales = [layer_decay ** (num_layers - i) for i in range(num_layers + 1)]
  groups = {}
  for name, p in model.named_parameters():
    if not p.requires_grad:
      continue
    no_decay = p.ndim == 1 or name in no_weight_decay_list
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
      layer = 0
    elif name.startswith("blocks"):
      layer = int(name.split(".")[1]) + 1
    else:
      layer = num_layers
    key = f"layer_{layer}_{'no_decay' if no_decay else 'decay'}"
    groups.setdefault(key, {"lr_scale": scales[layer], "params": [],
                            "weight_decay": 0.0 if no_decay else weight_decay})
    groups[key]["params"].append(p)
  return list(groups.values())


def _torch_finetune(runner, params, batches, *, layer_decay=0.8, weight_decay=0.05,
                    decay_cls_token=False, min_lr=1e-6, smoothing=0.1):
  model = interop.timm_vision_transformer(runner.model, params, img_size=FT_IMAGE).train()
  model.pos_embed.requires_grad_(False)  # the release's fixed sin-cos table
  no_wd = set(model.no_weight_decay()) - ({"cls_token"} if decay_cls_token else set())
  optimizer = torch.optim.AdamW(_param_groups_lrd(model, weight_decay, no_wd, layer_decay),
                                lr=PEAK_LR)
  criterion = timm.loss.LabelSmoothingCrossEntropy(smoothing=smoothing)
  losses = []
  for step, batch in enumerate(batches):
    lr = _release_lr(step, FT_TOTAL, PEAK_LR, min_lr, FT_WARMUP)
    for group in optimizer.param_groups:
      group["lr"] = lr * group["lr_scale"]
    loss = criterion(model(_nchw(batch["image"])), torch.from_numpy(batch["label"]).long())
    losses.append(loss.item())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
  state_dict = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  return losses, interop.encoder_from_timm(state_dict, runner.model)


def test_finetuning_trajectory_matches_the_release():
  config = _finetune_config()
  counts = schedules.step_counts(config, FT_BATCH * FT_TOTAL)
  runner = finetuning.build_trainer(config, FT_CLASSES, sharding.make_mesh(1), counts)
  state = runner.init_state(jax.random.key(0))
  params = _perturbed(state.params, seed=3, scale=0.1)
  state = jax.device_put(state.replace(params=params, opt_state=runner.tx.init(params)),
                         runner.state_shardings)
  rng = np.random.default_rng(4)
  batches = [{"image": rng.integers(0, 256, (FT_BATCH, FT_IMAGE, FT_IMAGE, 3), dtype=np.uint8),
              "label": rng.integers(0, FT_CLASSES, (FT_BATCH,)).astype(np.int32)}
             for _ in range(FT_STEPS)]
  ours = []
  for batch in batches:
    state, metrics = runner.train_step(state, jax.device_put(batch, runner.batch_sharding),
                                       jax.random.key(1))
    ours.append(float(metrics["loss"]))
  final = jax.device_get(state.params)
  theirs, torch_params = _torch_finetune(runner, params, batches)

  np.testing.assert_allclose(ours, theirs, rtol=LOSS_RTOL)
  worst = _compare_trees(final, torch_params, key_bias_mask(final), "fine-tuned")
  images = cim.normalize_images(batches[0]["image"])
  apply = jax.jit(lambda p: runner.model.apply({"params": p}, images, train=False)[0])
  effect = float(jnp.abs(
      apply(final) - apply(_substitute(final, torch_params, key_bias_mask(final)))).max())
  control = float(jnp.abs(apply(final) - apply(_shift_to_value_rows(final, torch_params))).max())
  assert effect < LOGIT_ATOL and control > 20 * LOGIT_ATOL, (effect, control)
  print(f"\nfine-tuning: losses {np.round(ours, 4)}; max |dloss| "
        f"{np.abs(np.subtract(ours, theirs)).max():.2e}; params max abs {worst[0]:.2e} rel "
        f"{worst[1]:.2e}; key-bias logit effect {effect:.2e} (moved onto the value biases: "
        f"{control:.2e})")
