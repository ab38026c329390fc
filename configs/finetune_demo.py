"""Fine-tuning demo: the demo pre-training's ViT-Tiny on the embedded digits, on CPU in minutes.

python -m cim_jax.finetune --config=configs/finetune_demo.py --workdir=workdirs/ftdemo \
    [--config.init_from=workdirs/demo]

The recipe of configs/cim_finetune.py:Ti/16 (layer-wise lr decay, RandAugment, mixup / cutmix,
label smoothing, random erasing, drop path, AdamW with warm-up + cosine), shrunk to 64x64 digits
(16 patches), batch 64 and 8 epochs over the 1437 training digits (176 steps), evaluated on the
360 test digits after every epoch. It starts from `workdirs/demo` (the README's pre-training run)
when that work dir exists in the current directory, else from scratch; --config.init_from=DIR
picks another pre-training work dir (--config.init_from= forces from scratch).
"""

import os

from cim_jax import config_validation

DEMO_PRETRAINING = "workdirs/demo"


def get_config():
  config = config_validation.load_config_file(
      os.path.join(os.path.dirname(__file__), "cim_finetune.py:Ti/16"))
  if os.path.isdir(os.path.join(DEMO_PRETRAINING, "checkpoints")):
    config.init_from = DEMO_PRETRAINING
  config.data.source = "digits"
  config.data.image_size = 64
  config.data.eval_batch_size = 120
  config.data.num_workers = 0
  config.batch_size = 64
  config.num_epochs = 8.0
  # A short run needs a larger learning rate and lighter regularisation than the 100-epoch
  # recipe (peak 2.5e-3 at batch 64; mixup on a fifth of the batches, milder RandAugment).
  config.optim.base_lr = 1e-2
  config.optim.warmup_steps = 10
  config.optim.layer_decay = 0.85
  config.mixup.prob = 0.2
  config.data.randaug_magnitude = 5.0
  config.log_every_steps = 11
  config.checkpoint_every_steps = 44
  config.keep_checkpoints = 1
  return config
