"""Fine-tuning: layer-wise lr decay, mixup / erasing, overfitting, save / restore, bad input."""

import json
import socket
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from cim_jax.data import labelled
from cim_jax.data import sources
from cim_jax.data import augment
from cim_jax.train import finetuning
from cim_jax.train import optimizer as optimizer_lib
from cim_jax.train import schedules
from train_fixtures import REPO, key_bias_mask, subprocess_env
from train_fixtures import recipe

DEPTH = 2  # of the classifier the tiny_classifier fixture builds (conftest.py)


def tiny_config(steps: int = 40):
  config = recipe("cim_finetune.py:Ti/16")
  config.batch_size = 16
  config.num_train_steps = steps
  config.data.image_size = 16
  config.data.eval_crop_pct = 1.0
  config.data.eval_batch_size = 16
  config.data.randaug_num_ops = 0  # memorising needs the images unchanged
  config.data.random_erase_prob = 0.0
  config.data.crop_scale = (1.0, 1.0)
  config.data.crop_ratio = (1.0, 1.0)
  config.data.flip_prob = 0.0
  config.mixup.prob = 0.0
  config.mixup.label_smoothing = 0.0
  config.model.drop_path_rate = 0.0
  config.optim.base_lr = 2e-2
  config.optim.warmup_steps = 3
  config.optim.layer_decay = 1.0
  config.log_every_steps = 10
  config.eval_every_steps = 20
  config.checkpoint_every_steps = 20
  config.progress_bar = False
  return config


def tiny_labelled_subset(monkeypatch, num=16):
  """The same 16 digits (4 classes) for training and evaluation: a memorisation check."""
  from sklearn.datasets import load_digits
  digits = load_digits()
  keep = np.flatnonzero(digits.target < 4)[:num]
  images = np.repeat((digits.images[keep] * 15.9).astype(np.uint8)[..., None], 3, axis=-1)
  images = np.stack([np.kron(im, np.ones((2, 2, 1), np.uint8)) for im in images])  # 16x16
  source = labelled.LabelledRecords(labelled.Labelled(images, digits.target[keep].astype(np.int32), 4))
  monkeypatch.setattr(finetuning, "labelled_sources", lambda config: (source, source, 4))
  return source


def logged(workdir):
  """The rows of workdir/metrics.jsonl without their timings (which differ from run to run)."""
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [{k: v for k, v in row.items() if k not in ("samples_per_second", "data_wait_seconds")}
          for row in rows]


def init_params(model):
  return jax.jit(lambda rng: model.init(rng, jnp.zeros((1, 16, 16, 3)))["params"])(
      jax.random.key(0))


def test_layerwise_lr_scales_per_layer(tiny_classifier):
  config = tiny_config()
  model = finetuning.build_classifier(config, 4)
  params = init_params(model)
  decay = 0.5
  scales = optimizer_lib.layerwise_lr_scales(params, DEPTH, decay)
  assert scales["patch_embed"]["kernel"] == decay ** 3
  assert scales["cls_token"] == decay ** 3
  assert scales["blocks_0"]["attn"]["qkv"]["kernel"] == decay ** 2
  assert scales["blocks_1"]["mlp"]["fc2"]["bias"] == decay ** 1
  assert scales["fc_norm"]["scale"] == 1.0 and scales["head"]["kernel"] == 1.0


def test_optimizer_applies_layer_scales(tiny_classifier):
  config = tiny_config()
  config.optim.layer_decay = 0.5
  config.optim.weight_decay = 0.0
  config.optim.warmup_steps = 0
  config.optim.base_lr = 0.1 * 256 / config.batch_size  # lr 0.1 at step 0
  model = finetuning.build_classifier(config, 4)
  params = init_params(model)
  tx, _, _ = optimizer_lib.build_optimizer(config, params, schedules.step_counts(config, None),
                                           layer_decay=0.5)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  # Adam's first step with a unit gradient is -lr per element; the layer factor multiplies it.
  expected = {"patch_embed": 0.125, "blocks_0": 0.25, "blocks_1": 0.5, "head": 1.0}
  for name, factor in expected.items():
    leaf = jax.tree.leaves(updates[name])[0]
    np.testing.assert_allclose(leaf, -0.1 * factor, rtol=1e-5)


def test_weight_decay_mask_matches_pretraining_rule(tiny_classifier):
  model = finetuning.build_classifier(tiny_config(), 4)
  params = init_params(model)
  mask = optimizer_lib.weight_decay_mask(params, "1d")
  assert mask["head"]["kernel"] and mask["blocks_0"]["attn"]["qkv"]["kernel"]
  assert not mask["head"]["bias"] and not mask["fc_norm"]["scale"]
  assert mask["cls_token"]  # "1d": the pre-training set, which decays the cls token
  assert not optimizer_lib.weight_decay_mask(params, "1d+tokens")["cls_token"]
  # The fine-tuning default exempts it, as the release (timm's no_weight_decay list).
  default = optimizer_lib.weight_decay_mask(params, tiny_config().optim.wd_exempt)
  assert not default["cls_token"] and default["head"]["kernel"]
  with pytest.raises(ValueError, match="must be '1d' or '1d\\+tokens'"):
    optimizer_lib.weight_decay_mask(params, "tokens")


def test_mixup_cutmix_targets_follow_pixels():
  m = ml_collections.ConfigDict(dict(mixup_alpha=0.0, cutmix_alpha=1.0, prob=1.0,
                                     switch_prob=0.5, label_smoothing=0.0))
  images = jnp.concatenate([jnp.zeros((1, 8, 8, 3)), jnp.ones((1, 8, 8, 3))])
  mix = jax.jit(lambda rng, x, y: finetuning.mixup_cutmix(rng, x, y, 2, m))
  mixed, targets = mix(jax.random.key(1), images, jnp.array([0, 1]))
  pasted = float(mixed[0, ..., 0].mean())  # sample 0 is zeros; the pasted box comes from ones
  np.testing.assert_allclose(targets[0], [1 - pasted, pasted], atol=1e-6)
  np.testing.assert_allclose(targets.sum(-1), 1.0, atol=1e-6)
  m.mixup_alpha, m.cutmix_alpha = 0.8, 0.0
  mix = jax.jit(lambda rng, x, y: finetuning.mixup_cutmix(rng, x, y, 2, m))
  mixed, targets = mix(jax.random.key(2), images, jnp.array([0, 1]))
  np.testing.assert_allclose(targets[0, 1], mixed[0, 0, 0, 0], atol=1e-6)


def test_label_smoothing_follows_timm():
  targets = finetuning.smooth_one_hot(jnp.array([2]), 4, 0.1)
  np.testing.assert_allclose(targets, [[0.025, 0.025, 0.925, 0.025]], atol=1e-7)


def test_random_erasing_probability():
  images = jnp.full((64, 16, 16, 3), 7.0)
  assert (finetuning.random_erasing(jax.random.key(0), images, 0.0) == 7.0).all()
  erase = jax.jit(finetuning.random_erasing, static_argnums=2)
  erased = erase(jax.random.key(0), images, 0.25)
  touched = (erased != 7.0).any(axis=(1, 2, 3)).mean()
  assert 0.05 < touched < 0.5


def test_eval_transform_resizes_by_crop_pct():
  image = np.zeros((100, 200, 3), np.uint8)
  image[:, 100:] = 255  # right half white
  out = augment.eval_transform(image, size=32, crop_pct=0.5)  # resize to 64 x 128, crop centre
  assert out.shape == (32, 32, 3)
  assert out[:, :14].max() < 30 and out[:, 18:].min() > 225


def test_rand_augment_is_seeded_and_changes_images():
  image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
  a = augment.rand_augment(image, np.random.default_rng(5), prob=1.0)
  b = augment.rand_augment(image, np.random.default_rng(5), prob=1.0)
  assert a.shape == image.shape and a.dtype == np.uint8 and (a == b).all()
  assert any((augment.rand_augment(image, np.random.default_rng(s), prob=1.0) != image).any()
             for s in range(3))


def test_overfits_tiny_subset_and_restores_same_accuracy(tmp_path, monkeypatch,
                                                         tiny_classifier):
  tiny_labelled_subset(monkeypatch)
  config = tiny_config(steps=40)
  result = finetuning.finetune(config, str(tmp_path))
  assert result["last_top1"] >= 93.75, result  # at most 1 of 16 wrong; chance is 25%
  assert result["best_top1"] >= result["last_top1"]
  restored = finetuning.finetune(config, str(tmp_path), eval_only=True)
  assert restored["step"] == 40
  assert restored["top1"] == result["last_top1"]


@pytest.mark.slow  # three fine-tuning runs: ~1 minute on 2 shared cores
def test_resume_is_exact(tmp_path, monkeypatch, tiny_classifier):
  tiny_labelled_subset(monkeypatch)
  config = tiny_config(steps=6)
  config.checkpoint_every_steps = 3
  config.eval_every_steps = 6
  config.log_every_steps = 1
  config.mixup.prob = 1.0  # the random parts must replay too
  config.data.random_erase_prob = 0.25
  config.data.randaug_num_ops = 2
  straight = finetuning.finetune(config, str(tmp_path / "a"))
  config.num_train_steps = 3
  finetuning.finetune(config, str(tmp_path / "b"))
  config.num_train_steps = 6
  resumed = finetuning.finetune(config, str(tmp_path / "b"))
  assert resumed == straight
  assert logged(tmp_path / "a")[-1] == logged(tmp_path / "b")[-1]


def test_checkpoint_of_another_variant_or_head(tmp_path, monkeypatch, tiny_classifier):
  tiny_labelled_subset(monkeypatch)
  config = tiny_config(steps=1)
  finetuning.finetune(config, str(tmp_path))
  other = tiny_config(steps=1)
  other.model.variant = "S/16"
  with pytest.raises(ValueError, match=r"holds a fine-tuned Ti/16 but model.variant='S/16'"):
    finetuning.finetune(other, str(tmp_path))
  monkeypatch.setattr(finetuning, "labelled_sources",
                      lambda c: (labelled.LabelledRecords(labelled.Labelled(
                          np.zeros((2, 16, 16, 3), np.uint8), np.array([0, 6]), 7)),) * 2 + (7,))
  with pytest.raises(ValueError, match="head of 4 classes but the labelled data has 7"):
    finetuning.finetune(tiny_config(steps=1), str(tmp_path))


def test_pretraining_workdir_is_not_resumed(tmp_path):
  saved = tmp_path / "checkpoints" / "3" / "config"
  saved.mkdir(parents=True)
  (saved / "metadata").write_text('{"model": {"variant": "Ti/16"}}')
  with pytest.raises(ValueError, match="holds a pre-training run, not a fine-tuning one"):
    finetuning.check_checkpoint_matches(str(tmp_path), tiny_config(), 4)


def test_label_set_differs_from_configured_head():
  config = tiny_config()
  train, test, num_classes = finetuning.labelled_sources(config)  # embedded digits, 80/20
  images, labels = sources.embedded_labelled("digits", "test", image_size=config.data.image_size)
  assert (len(train), len(test), num_classes) == (1438, 359, 10)
  np.testing.assert_array_equal(test[7]["image"], images[7])
  assert test[7]["label"] == labels[7]
  config.data.num_classes = 5
  with pytest.raises(ValueError, match=r"has 10 classes but the head has .*num_classes=5"):
    finetuning.labelled_sources(config)


class _FixedDraw:
  """An rng stand-in whose random() returns one value (it decides the sign of every op)."""

  def __init__(self, value):
    self.value = value

  def random(self):
    return self.value


@pytest.mark.parametrize("negative", [False, True])
@pytest.mark.parametrize("name", list(augment.RAND_INCREASING_OPS))
def test_rand_augment_ops_match_timm(name, negative):
  auto_augment = pytest.importorskip("timm.data.auto_augment")
  from PIL import Image
  image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8))
  level = 7.3
  # As timm's create_transform builds them for ImageNet mean and interpolation='bicubic'.
  hparams = dict(auto_augment._HPARAMS_DEFAULT, interpolation=Image.BICUBIC,
                 img_mean=(124, 116, 104))
  op = auto_augment.AugmentOp(name, prob=1.0, magnitude=level, hparams=hparams)
  timm_random = auto_augment.random.random
  auto_augment.random.random = lambda: 0.9 if negative else 0.1  # timm negates above 0.5
  try:
    expected = np.asarray(op(image))
  finally:
    auto_augment.random.random = timm_random
  got = np.asarray(augment.RAND_INCREASING_OPS[name](image, level,
                                                       _FixedDraw(0.1 if negative else 0.9)))
  np.testing.assert_array_equal(got, expected)


def test_the_old_command_names_the_new_one():
  out = subprocess.run([sys.executable, "-m", "cim_jax.evaluate.finetune", "--workdir=x"],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
  assert out.returncode != 0 and out.stderr.splitlines() == [
      "error: python -m cim_jax.evaluate.finetune moved to python -m cim_jax.finetune "
      "(same flags)"], out.stderr


def test_fsdp_shards_the_params_and_trains_like_one_replica(tmp_path):
  """4 CPU devices: mesh.fsdp=2 (data 2 x fsdp 2) shards params and Adam moments over the fsdp
  axis and gives the losses, accuracy and params of mesh.fsdp=1 (data 4)."""
  out = subprocess.run([sys.executable, __file__, str(tmp_path)], capture_output=True, text=True,
                       timeout=600, env=subprocess_env(devices=4))
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  runs = {fsdp: dict(np.load(tmp_path / f"fsdp{fsdp}.npz")) for fsdp in (1, 2)}
  report = json.loads((tmp_path / "report.json").read_text())
  assert report["1"]["devices"] == report["2"]["devices"] == 4
  assert report["1"]["sharded"] == [] and report["2"]["mesh"] == {"data": 2, "fsdp": 2}
  # Every large leaf is split over fsdp (the cls token, biases, norms and the 4-class head are
  # below sharding.fsdp_spec's size threshold), its Adam moments too.
  sharded = set(report["2"]["sharded"])
  for name in ("['patch_embed']['kernel']", "['blocks_1']['attn']['qkv']['kernel']",
               "['blocks_0']['mlp']['fc1']['kernel']"):
    assert f"params{name}" in sharded, name
    for moment in (".mu", ".nu"):  # Adam's
      assert any(k.startswith("opt") and k.endswith(moment + name) for k in sharded), name
  assert report["2"]["qkv_shard"] == [64, 96]  # (64, 192) split in two
  np.testing.assert_allclose(report["2"]["losses"], report["1"]["losses"], rtol=1e-5)
  assert abs(report["2"]["top1"] - report["1"]["top1"]) <= 100 / 16  # at most one image
  keys = traverse_util.flatten_dict(key_bias_mask(
      traverse_util.unflatten_dict(runs[1], sep="/")), sep="/")
  for name, value in runs[2].items():
    np.testing.assert_allclose(value[~keys[name]], runs[1][name][~keys[name]], rtol=1e-4,
                               atol=1e-5, err_msg=name)


def test_two_processes_fine_tune_with_the_state_sharded_across_them(tmp_path):
  """mesh.fsdp=2 over two processes of one CPU device: each holds half of every large leaf,
  trains on its share of the batch, evaluates with the sharded params, and both agree."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = [subprocess.Popen(
      [sys.executable, __file__, str(tmp_path), "multi"], stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True, env=subprocess_env(
          devices=1, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=2,
          JAX_PROCESS_ID=i)) for i in range(2)]
  for proc in procs:
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]
  reports = [json.loads((tmp_path / f"report_process{i}.json").read_text())["2"]
             for i in range(2)]
  assert reports[0]["devices"] == 2 and reports[0]["qkv_shard"] == [64, 96]
  assert "params['blocks_1']['attn']['qkv']['kernel']" in reports[0]["sharded"]
  assert reports[0] == reports[1]  # the same loss and accuracy on both processes
  params = [np.load(tmp_path / f"fsdp2_process{i}.npz") for i in range(2)]
  for name in params[0].files:
    np.testing.assert_array_equal(params[0][name], params[1][name], err_msg=name)


def _fsdp_child(workdir: str, multi: bool = False):
  """Runs in a fresh process with 4 CPU devices (the test above): fine-tunes the Mu ViT 3 steps
  with mesh.fsdp 1 and 2; writes the params, losses and shardings to workdir. `multi`: one of
  two processes of one CPU device each, mesh.fsdp 2 only (sharded across the processes)."""
  from cim_jax import sharding  # pylint: disable=g-import-not-at-top
  from cim_jax.train import loop  # pylint: disable=g-import-not-at-top
  if multi:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    sharding.maybe_initialize_distributed()
  states, run = [], loop.run
  loop.run = lambda *args, **kwargs: states.append(run(*args, **kwargs)) or states[-1]
  tiny_labelled_subset(types.SimpleNamespace(setattr=setattr))
  report, suffix = {}, f"_process{jax.process_index()}" if multi else ""
  for fsdp in (2,) if multi else (1, 2):
    config = tiny_config(steps=3)
    config.model.variant = "Mu/16"  # 64 wide, 2 blocks (registered by train_fixtures)
    config.mesh.fsdp = fsdp
    config.log_every_steps = 1
    config.optim.layer_decay = 0.75
    config.mixup.prob = 1.0  # the random parts must not depend on the sharding either
    config.data.random_erase_prob = 0.25
    result = finetuning.finetune(config, f"{workdir}/run{fsdp}")
    state, summary, _ = states[-1]
    leaves = {f"{name}{jax.tree_util.keystr(p)}": x
              for name, tree in (("params", state.params), ("opt", state.opt_state))
              for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    sharded = [k for k, x in leaves.items() if "fsdp" in jax.tree.leaves(tuple(x.sharding.spec))]
    qkv = state.params["blocks_1"]["attn"]["qkv"]["kernel"]
    losses = [json.loads(line)["loss"] for line in
              open(f"{workdir}/run{fsdp}/metrics.jsonl", encoding="utf-8")] if not multi else []
    report[fsdp] = dict(devices=jax.device_count(), mesh=dict(qkv.sharding.mesh.shape),
                        sharded=sharded, qkv_shard=list(qkv.sharding.shard_shape(qkv.shape)),
                        losses=losses, last_loss=summary["loss"], top1=result["last_top1"])
    flat = traverse_util.flatten_dict(sharding.to_host(state.params), sep="/")
    np.savez(f"{workdir}/fsdp{fsdp}{suffix}.npz", **flat)
  with open(f"{workdir}/report{suffix}.json", "w", encoding="utf-8") as f:
    json.dump(report, f)


if __name__ == "__main__":
  _fsdp_child(sys.argv[1], multi=sys.argv[2:] == ["multi"])


def test_layer_ids_of_a_backbone_under_a_head():
  """A segmenter keeps its ViT under 'backbone': embeddings 0, blocks i + 1, the rest depth + 1."""
  depth = 2
  assert optimizer_lib.layer_id(("backbone", "patch_embed", "kernel"), depth) == 0
  assert optimizer_lib.layer_id(("backbone", "cls_token"), depth) == 0
  assert optimizer_lib.layer_id(("backbone", "blocks_1", "mlp", "fc1", "bias"), depth) == 2
  for head in (("decode_head", "conv_seg", "kernel"), ("fpn1", "kernel")):
    assert optimizer_lib.layer_id(head, depth) == depth + 1
  params = {"backbone": {"patch_embed": {"kernel": 0.0}, "blocks_0": {"w": 0.0},
                         "blocks_1": {"w": 0.0}}, "decode_head": {"w": 0.0}}
  scales = optimizer_lib.layerwise_lr_scales(params, depth, 0.5)
  assert (scales["backbone"]["patch_embed"]["kernel"], scales["backbone"]["blocks_0"]["w"],
          scales["backbone"]["blocks_1"]["w"], scales["decode_head"]["w"]) == (0.125, 0.25, 0.5,
                                                                               1.0)
