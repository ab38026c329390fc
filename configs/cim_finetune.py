"""Supervised fine-tuning of a CIM-pretrained ViT: the recipe of docs/METHOD.md section 5.

python -m cim_jax.finetune --config=configs/cim_finetune.py:B/16 --workdir=DIR \
    --config.init_from=PRETRAIN_WORKDIR_OR_PTH [--config.data.source=imagefolder|tfds ...]

The argument is the encoder: Ti/16, S/16, B/16, L/16 or H/14.
"""

import os

import ml_collections

from cim_jax import config_defaults
from cim_jax import config_validation

EPOCHS = {"Ti/16": 200, "S/16": 200, "B/16": 100, "L/16": 50, "H/14": 50}


def get_config(arg="B/16"):
  pretraining = config_validation.load_config_file(
      os.path.join(os.path.dirname(__file__), f"cim_pretrain.py:{arg}"))
  c = config_defaults.training()
  c.batch_size = 1024  # global
  c.num_epochs = float(EPOCHS[arg])
  c.mesh.fsdp = pretraining.mesh.fsdp  # 8 for L/16 and H/14
  c.eval_every_steps = -1  # -1: once per epoch (and at the end)

  # The pre-trained encoder; the decoder keys only shape the import of a CIM checkpoint.
  c.model = pretraining.model
  c.model.drop_path_rate = 0.1
  c.model.freeze_patch_embed = False  # the release fine-tunes the patch projection too

  c.data = config_defaults.labelled_source("digits")
  c.data.num_classes = 0  # 0 = the number of classes in the training data; else must match it
  c.data.image_size = 224
  c.data.crop_scale = (0.08, 1.0)  # RandomResizedCrop
  c.data.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)
  c.data.flip_prob = 0.5
  c.data.randaug_num_ops = 2  # timm 'rand-m9-mstd0.5-inc1'; 0 disables RandAugment
  c.data.randaug_magnitude = 9.0
  c.data.randaug_magnitude_std = 0.5
  c.data.random_erase_prob = 0.25
  c.data.eval_crop_pct = 0.95  # eval: resize to image_size / crop_pct, centre crop
  c.data.eval_batch_size = 256
  c.data.num_workers = 0  # grain worker processes; 0 = in-process
  c.data.worker_buffer_size = 2

  c.mixup = ml_collections.ConfigDict()
  c.mixup.mixup_alpha = 0.8
  c.mixup.cutmix_alpha = 1.0
  c.mixup.prob = 1.0
  c.mixup.switch_prob = 0.5
  c.mixup.label_smoothing = 0.1

  c.optim = ml_collections.ConfigDict()
  c.optim.base_lr = 1.2e-3  # lr = base_lr * batch_size / 256
  c.optim.min_lr = 1e-6
  c.optim.warmup_epochs = 5.0
  c.optim.warmup_steps = -1  # >=0 overrides warmup_epochs
  c.optim.layer_decay = 0.8  # the authors' script sets 0.8 once, for every size
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.weight_decay = 0.05
  # "1d+tokens": biases, norm parameters and the cls token are not decayed, as MAE's
  # param_groups_lrd with timm's no_weight_decay() in the authors' fine-tuning (pos_embed is
  # a fixed table here, not a parameter).
  c.optim.wd_exempt = "1d+tokens"
  c.optim.grad_clip_norm = 0.0  # 0 disables (the MAE / CIM fine-tuning recipe does not clip)
  c.optim.accum_steps = 1  # optimizer steps every accum_steps batches (mean gradient)
  return c
