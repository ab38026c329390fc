"""The README's main job: CIM pre-training of a ViT-Tiny on the embedded photos, on CPU.

python -m cim_jax.pretrain --config=configs/demo.py --workdir=workdirs/demo

The recipe of configs/cim_pretrain.py:Ti/16 (160x160 context, 6 rotated and augmented 64x64
exemplars, exact masks, EMA target, correlation decoder, cross-entropy loss) at a scale that
finishes in a few minutes on 2 CPU cores, then the end-of-run report: correlation-map PNG,
pretext IoU before vs after, kNN accuracy of the pretrained vs a randomly initialised encoder.
"""

import os

from cim_jax import config_validation


def get_config():
  config = config_validation.load_config_file(
      os.path.join(os.path.dirname(__file__), "cim_pretrain.py:Ti/16"))
  config.batch_size = 32
  config.num_train_steps = 180
  # A short run needs a larger learning rate than the 300-epoch recipe (1.5e-4 * 32/256).
  config.optim.base_lr = 1.5e-3
  config.optim.warmup_steps = 20
  config.data.source = "embedded"
  config.data.num_workers = 0
  config.log_every_steps = 10
  config.checkpoint_every_steps = 100
  config.keep_checkpoints = 2
  config.eval.pretext_iou = True
  config.eval.knn = True
  config.eval.visualize = True
  config.eval.num_heldout_pairs = 64
  config.eval.data.source = "digits"
  config.eval.data.image_size = 64  # 8x8 digits need no more; 16 patches keep the kNN fast
  return config
