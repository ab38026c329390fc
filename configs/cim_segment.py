"""Semantic segmentation transfer of a CIM-pretrained ViT: ADE20K with UperNet (docs/METHOD.md
section 7), the MAE / BEiT ADE20K recipe.

python -m cim_jax.segment --config=configs/cim_segment.py:B/16 --workdir=DIR \
    --config.init_from=PRETRAIN_WORKDIR_OR_PTH --config.data.source=ade20k \
    --config.data.root=/data/ADEChallengeData2016

The argument is the encoder: Ti/16, S/16, B/16, L/16 or H/14. The figures are ViT-B's recipe
(512x512 crops, 160k iterations at batch 16, AdamW lr 1e-4, layer decay 0.65); the other sizes
keep them and change only what the size needs (fsdp, remat, which blocks feed the pyramid).
"""

import os

import ml_collections

from cim_jax import config_defaults
from cim_jax import config_validation
from cim_jax.models import upernet
from cim_jax.models import vit


def get_config(arg="B/16"):
  pretraining = config_validation.load_config_file(
      os.path.join(os.path.dirname(__file__), f"cim_pretrain.py:{arg}"))
  c = config_defaults.training()
  c.batch_size = 16  # global
  c.num_train_steps = 160_000
  c.num_epochs = 0.0  # the run length is num_train_steps
  c.eval_every_steps = 16_000
  c.checkpoint_every_steps = 4000
  c.eval_examples = 4  # validation images drawn as image | ground truth | prediction per eval
  c.mesh.fsdp = pretraining.mesh.fsdp

  c.model = pretraining.model  # the decoder keys only shape the import of a CIM checkpoint
  c.model.drop_path_rate = 0.1
  c.model.freeze_patch_embed = False

  c.segmentation = ml_collections.ConfigDict()
  # 1-based blocks feeding the pyramid: depth/3, depth/2, 2 depth/3, depth (4, 6, 8, 12 for B).
  c.segmentation.feature_blocks = upernet.feature_blocks(vit.decode_variant(arg)["depth"])
  c.segmentation.channels = 512  # UperNet decode head
  c.segmentation.pool_scales = (1, 2, 3, 6)
  c.segmentation.aux_channels = 256  # auxiliary FCN head on the third pyramid level
  c.segmentation.aux_weight = 0.4
  c.segmentation.dropout = 0.1  # before each classifier
  # How 3x3 / 1x1 convolutions are computed: 'auto' = XLA's convolution on GPU / TPU and the
  # matmul forms that are faster on XLA:CPU there (models/upernet.py); the results are the same.
  c.segmentation.conv_impl = "auto"

  d = c.data = ml_collections.ConfigDict()
  d.source = "ade20k"  # "ade20k" (ADEChallengeData2016 folder), "tfds", or "synthetic"
  d.root = ""  # ADEChallengeData2016/ (images/ and annotations/, training/ and validation/)
  d.tfds_name = "scene_parse150"  # source="tfds": prepared as array_record
  d.tfds_split = "train"
  d.tfds_eval_split = "test"  # TFDS names ADE20K's validation images 'test'
  d.tfds_data_dir = ""
  d.tfds_image_key = "image"
  d.tfds_label_key = "annotation"
  d.num_classes = 150
  d.reduce_zero_label = True  # label 0 ("other") -> ignored, the others shifted down by one
  patch = vit.decode_variant(arg)["patch_size"]
  # 512 crops; a /14 ViT takes 504 (36 x 36 tokens, an even grid for the pyramid's max-pool).
  d.crop_size = 512 if 512 % patch == 0 else 36 * patch
  d.scale = (2048, 512)  # mmseg img_scale: (long, short) sides of the keep-ratio rescale
  d.ratio_range = (0.5, 2.0)  # training: the scale times a uniform ratio
  d.cat_max_ratio = 0.75  # training crops: no class above 75% of the labelled pixels (10 tries)
  d.flip_prob = 0.5
  d.photometric = True  # mmseg PhotoMetricDistortion
  d.eval_stride = d.crop_size * 2 // 3  # 341: sliding windows, logits averaged over overlaps
  d.eval_batch_size = 8  # windows per evaluation batch (global)
  d.num_images = 0  # >0: only the first num_images training records
  d.num_eval_images = 0  # >0: only the first num_eval_images validation records
  d.synthetic_train_images = 64  # source="synthetic": the embedded set's split sizes
  d.synthetic_eval_images = 16
  d.num_workers = 0  # grain worker processes; 0 = in-process
  d.worker_buffer_size = 2

  o = c.optim = ml_collections.ConfigDict()
  o.lr = 1e-4  # peak, as is (not scaled by the batch)
  o.min_lr = 0.0
  o.schedule = "poly"  # linear warm-up, then (1 - step / steps) ** poly_power down to min_lr
  o.poly_power = 1.0
  o.warmup_steps = 1500
  o.warmup_epochs = 0.0
  o.b1 = 0.9
  o.b2 = 0.999
  o.weight_decay = 0.05
  o.wd_exempt = "1d"  # biases and norm parameters, the pre-training exemption set
  o.layer_decay = 0.65
  o.grad_clip_norm = 0.0
  o.accum_steps = 1
  return c
