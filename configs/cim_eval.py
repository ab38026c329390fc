"""Frozen-encoder evaluation: weighted kNN (DINO) and linear probe of a pre-trained encoder.

python -m cim_jax.evaluate.knn --config=configs/cim_eval.py:B/16 \
    --config.init_from=WORKDIR_OR_PTH [--config.data.source=imagefolder --config.data.root=DIR/train
    --config.data.eval_root=DIR/val | --config.data.source=tfds --config.data.tfds_name=imagenet2012
    --config.data.tfds_data_dir=DIR]
python -m cim_jax.evaluate.linear_probe --config=configs/cim_eval.py:B/16 ...

The argument is the encoder: Ti/16, S/16, B/16, L/16 or H/14. Both tools also report a randomly
initialised encoder (seeded by config.seed) for reference.
"""

import os

import ml_collections

from cim_jax import config_defaults
from cim_jax import config_validation


def get_config(arg="B/16"):
  pretraining = config_validation.load_config_file(
      os.path.join(os.path.dirname(__file__), f"cim_pretrain.py:{arg}"))
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.init_from = ""  # the encoder: a work dir of this project or an authors' .pth; "" = none
  c.model = pretraining.model
  # Labelled sets: "digits" / "lfw" (embedded, in memory), "imagefolder" or "tfds" (streamed,
  # resized to image_size / crop_pct and centre-cropped).
  c.data = config_defaults.labelled_features(image_size=224)
  c.eval = ml_collections.ConfigDict()
  c.eval.feature_pool = "tok"  # "tok": the final-normed cls token; "gap": patch-token mean
  c.eval.knn_k = 20  # reported with k = 10, 100 and 200 as well
  c.eval.knn_temperature = 0.07
  # Linear probe on standardised frozen features: lr = base_lr * batch / 256, warm-up + cosine.
  # "lars" with batch 16384 is MAE's ImageNet recipe; LARS's trust ratio (coefficient 1e-3)
  # moves the weights by ~lr * 1e-3 of their norm per step, so it needs thousands of steps and
  # does not learn on the small embedded sets: SGD with momentum is the default.
  c.eval.probe_optimizer = "sgd"  # "sgd" | "lars" | "adamw"
  c.eval.probe_base_lr = 0.1
  c.eval.probe_epochs = 90
  c.eval.probe_warmup_epochs = 10
  c.eval.probe_batch_size = 256  # capped at the labelled training-set size
  c.eval.probe_weight_decay = 0.0
  c.progress_bar = True
  return c
