"""Segmentation demo: the demo pre-training's ViT-Tiny with an UperNet head on the embedded
synthetic shapes, on CPU in minutes.

python -m cim_jax.segment --config=configs/segment_demo.py --workdir=workdirs/segdemo \
    [--config.init_from=workdirs/demo]

The recipe of configs/cim_segment.py:Ti/16 (mmseg's ADE20K pipeline, UperNet + auxiliary FCN,
AdamW with layer decay, linear warm-up then poly) shrunk 4x in pixels: 128 crops from a
keep-ratio rescale to (512, 128) x U(0.5, 2), sliding 128 windows at stride 85 for evaluation,
heads of 128 / 64 channels, batch 8. It starts from `workdirs/demo` (the README's pre-training
run) when that work dir exists in the current directory, else from scratch.
"""

import os

from cim_jax import config_validation

DEMO_PRETRAINING = "workdirs/demo"


def get_config():
  config = config_validation.load_config_file(
      os.path.join(os.path.dirname(__file__), "cim_segment.py:Ti/16"))
  if os.path.isdir(os.path.join(DEMO_PRETRAINING, "checkpoints")):
    config.init_from = DEMO_PRETRAINING
  d = config.data
  d.source = "synthetic"
  d.num_classes = 6
  d.crop_size = 128
  d.scale = (512, 128)
  d.eval_stride = 85
  d.eval_batch_size = 16
  config.segmentation.channels = 128
  config.segmentation.aux_channels = 64
  config.batch_size = 8
  config.num_train_steps = 300
  config.optim.warmup_steps = 30
  config.optim.lr = 3e-4  # a short run: a larger peak than the 160k-iteration recipe
  config.eval_every_steps = 100
  config.log_every_steps = 20
  config.checkpoint_every_steps = 100
  config.keep_checkpoints = 1
  return config
