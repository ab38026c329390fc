"""Segmentation transfer: the trainer on the embedded synthetic shapes, warm starts, the command."""

import json
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
import torch

from cim_jax import interop
from cim_jax.data import segmentation as data_lib
from cim_jax.models import cim
from cim_jax.models import upernet
from cim_jax.train import loop
from cim_jax.train import segmentation
from train_fixtures import REPO, read_checkpoint, recipe, subprocess_env
from train_fixtures import tiny_config as pretrain_config

pytestmark = pytest.mark.usefixtures("compilation_cache")

NUM_CLASSES = len(data_lib.SYNTHETIC_CLASSES)


def tiny_config(steps: int = 8):
  """Mu/8 on 64-pixel crops with 32-channel heads: a segmentation step in well under a second."""
  config = recipe("cim_segment.py:Ti/16")
  config.model.variant = "Mu/8"
  config.model.drop_path_rate = 0.0
  config.segmentation.feature_blocks = upernet.feature_blocks(2)
  d = config.data
  d.source = "synthetic"
  d.num_classes = NUM_CLASSES
  d.synthetic_train_images = 8
  d.synthetic_eval_images = 4
  d.crop_size = 64
  d.scale = (256, 64)
  d.eval_stride = 43
  d.eval_batch_size = 8
  config.segmentation.channels = 32
  config.segmentation.aux_channels = 16
  config.batch_size = 8
  config.num_train_steps = steps
  config.optim.warmup_steps = 2
  config.optim.lr = 1e-3
  config.eval_every_steps = steps
  config.checkpoint_every_steps = steps
  config.log_every_steps = 1
  config.eval_examples = 2
  config.progress_bar = False
  return config


def memorise(config, monkeypatch):
  """Evaluation on the training images themselves, augmentation off: a memorisation check."""
  train, _ = data_lib.splits(config.data)
  monkeypatch.setattr(data_lib, "splits", lambda d: (train, train))
  d = config.data
  d.ratio_range = (1.0, 1.0)
  d.photometric = False
  d.flip_prob = 0.0
  config.segmentation.dropout = 0.0
  config.optim.lr = 1e-2
  config.optim.layer_decay = 1.0
  config.optim.weight_decay = 0.0


def logged(workdir):
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [{k: v for k, v in row.items() if k not in ("samples_per_second", "data_wait_seconds")}
          for row in rows]


def test_overfits_eight_images_and_restores_the_same_miou(tmp_path, monkeypatch):
  config = tiny_config(steps=300)
  memorise(config, monkeypatch)
  result = segmentation.segment(config, str(tmp_path))
  assert result["last_mIoU"] >= 90.0, result
  assert result["best_mIoU"] >= result["last_mIoU"] - 1e-4  # kept as float32 in the state
  assert (tmp_path / segmentation.EXAMPLES_DIR / "step_300.png").is_file()
  restored = segmentation.segment(config, str(tmp_path), eval_only=True)
  assert restored["step"] == 300 and restored["mIoU"] == result["last_mIoU"]


def test_resume_is_exact(tmp_path, monkeypatch):
  """Stopped after step 2 (as a preemption stops it) and resumed: the run of 4 steps, exactly."""
  config = tiny_config(steps=4)
  config.checkpoint_every_steps = 2
  config.data.num_workers = 0
  straight = segmentation.segment(config, str(tmp_path / "a"))
  with monkeypatch.context() as patch:
    patch.setattr(loop._Preemption, "reached", lambda self, step: step == 2)  # pylint: disable=protected-access
    stopped = segmentation.segment(config, str(tmp_path / "b"))
  assert stopped["step"] == 2 and "last_mIoU" not in stopped
  resumed = segmentation.segment(config, str(tmp_path / "b"))
  assert resumed == straight
  assert logged(tmp_path / "a")[-1] == logged(tmp_path / "b")[-1]


@pytest.mark.parametrize("kind", [pytest.param("workdir", marks=pytest.mark.slow),  # ~40 s
                                  "timm", "authors"])
def test_init_from_fills_the_backbone(tmp_path, kind):
  """A pre-training work dir, an authors' checkpoint or a timm ViT state dict (with a classifier,
  which is ignored) starts the backbone; with lr 0 the saved backbone is that encoder."""
  pretraining = pretrain_config(num_train_steps=1)
  # The release's shapes (10 x 10 context tokens), which a weights file is imported with.
  release_shapes = ml_collections.ConfigDict(dict(context_size=160, exemplar_size=64,
                                                  num_exemplars=1))
  model = cim.build_model(pretraining.model, release_shapes)
  if kind == "workdir":
    loop.train(pretraining, str(tmp_path / "pre"))
    source = str(tmp_path / "pre")
    encoder = read_checkpoint(source)["params"]["encoder"]
  else:
    params, model_state = jax.jit(model.init_variables)(jax.random.key(3))
    params, model_state = jax.device_get((params, model_state))
    encoder = params["encoder"]
    if kind == "timm":
      state_dict = interop.encoder_to_timm(encoder)
      state_dict["head.weight"] = np.ones((1000, 64), np.float32)
      state_dict["head.bias"] = np.ones((1000,), np.float32)
    else:
      target = {"encoder": encoder, **{k: v for k, v in params.items() if k == "projector"}}
      state_dict = interop.export_authors_state_dict(params, target, model_state, model)
    source = str(tmp_path / f"{kind}.pth")
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()},
               source)
  config = tiny_config(steps=1)
  config.model = pretraining.model
  config.init_from = source
  config.optim.lr = 0.0
  segmentation.segment(config, str(tmp_path / "seg"))
  backbone = read_checkpoint(str(tmp_path / "seg"))["params"]["backbone"]
  assert "norm" not in backbone  # block outputs feed the pyramid: no final norm
  expected = {k: v for k, v in encoder.items() if k != "norm"}
  jax.tree.map(np.testing.assert_array_equal, backbone, expected)


def test_command_errors_are_one_line(tmp_path):
  for args, message in (
      (["--config=configs/cim_segment.py:B/16"], "config.data.root='' is not a directory (the "
       "ADEChallengeData2016 folder)"),
      (["--config=configs/cim_segment.py:B/16", "--config.data.source=ade20k",
        f"--config.data.root={tmp_path / 'missing'}"], str(tmp_path / "missing")),
      (["--config=configs/cim_finetune.py:B/16"], "expected a config for segmentation"),
      (["--config=configs/cim_segment.py:B/16", "--config.data.source=synthetic",
        "--config.data.crop_size=500"], "crop_size=500 must be a positive multiple"),
  ):
    done = subprocess.run([sys.executable, "-m", "cim_jax.segment", *args,
                           f"--workdir={tmp_path / 'w'}"], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, (args, done.stderr[-2000:])
    lines = [l for l in done.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], (args, done.stderr[-2000:])


@pytest.mark.slow  # two runs of the command, ~70 s on 2 cores
def test_data_parallel_and_fsdp_runs_train_like_one_device(tmp_path):
  """`python -m cim_jax.segment` on 4 CPU devices (data 2 x fsdp 2) logs the losses of a
  1-device run: BatchNorm statistics span the whole global batch, not each device's rows."""
  config_file = tmp_path / "tiny_segment.py"
  config_file.write_text(
      "from test_segment import tiny_config\n\n\ndef get_config():\n"
      "  config = tiny_config(steps=3)\n  config.data.synthetic_eval_images = 2\n"
      "  return config\n", encoding="utf-8")
  losses = {}
  for devices, fsdp in ((1, 1), (4, 2)):
    workdir = tmp_path / f"run{devices}"
    done = subprocess.run([sys.executable, "-m", "cim_jax.segment", f"--config={config_file}",
                           f"--config.mesh.fsdp={fsdp}", f"--workdir={workdir}"], cwd=REPO,
                          env=subprocess_env(devices=devices), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "last_mIoU=" in done.stdout
    losses[devices] = [(row["loss"], row["decode_loss"], row["aux_loss"])
                       for row in logged(workdir) if "loss" in row]
  assert len(losses[1]) == 3
  np.testing.assert_allclose(losses[4], losses[1], rtol=2e-4)
