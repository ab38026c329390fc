"""Plumbing keys the recipes in configs/ share: run length, logging, checkpoints, data sources.

The recipes themselves (docs/METHOD.md sections 4-5) are `configs/cim_pretrain.py`,
`configs/cim_finetune.py` and `configs/cim_eval.py`; `config_validation` checks them.
"""

import ml_collections


def training() -> ml_collections.ConfigDict:
  """Run plumbing of a training config: step counts, warm start, logging, checkpoints, mesh."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_train_steps = -1  # >0 overrides num_epochs
  c.steps_per_epoch = -1  # >0 overrides len(source) // batch_size (for sources of unknown size)
  c.init_from = ""  # a work dir of this project or an authors' .pth; "" = random init
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.progress_bar = True
  c.mesh = ml_collections.ConfigDict()
  c.mesh.fsdp = 1  # parameter / optimizer sharding axis size; data axis = the other devices
  return c


def image_source() -> ml_collections.ConfigDict:
  """Where pre-training images come from and how they are loaded."""
  d = ml_collections.ConfigDict()
  # "embedded" (photos shipped in scikit-image / scikit-learn), "imagefolder" or "tfds".
  d.source = "embedded"
  d.root = ""  # ImageFolder root (root/<class>/<image>)
  # Images of the held-out pairs (pretext IoU); without it an ImageFolder run holds a few of
  # its own images out (see `sources.heldout_count`).
  d.eval_root = ""
  d.tfds_name = "imagenet2012"  # prepared as array_record
  d.tfds_split = "train"
  d.tfds_eval_split = "validation"  # the held-out pairs of source="tfds"
  d.tfds_data_dir = ""  # "" -> TFDS default
  d.num_images = 0  # >0: use only the first num_images records (debugging / demo)
  d.min_image_size = 16  # records whose shorter side is smaller are skipped (no usable crops)
  d.num_workers = 0  # grain worker processes; 0 = in-process
  d.worker_buffer_size = 2
  d.shuffle = True
  return d


def labelled_source(source: str = "digits") -> ml_collections.ConfigDict:
  """A labelled train / eval pair of sets: "digits" / "lfw" (embedded), "imagefolder", "tfds"."""
  d = ml_collections.ConfigDict()
  d.source = source
  d.root = ""  # source="imagefolder": train root (root/<class>/<image>)
  d.eval_root = ""  # ... and evaluation root (the same class folders)
  d.tfds_name = "imagenet2012"  # source="tfds" (prepared as array_record)
  d.tfds_split = "train"
  d.tfds_eval_split = "validation"
  d.tfds_data_dir = ""  # "" -> TFDS default
  d.tfds_image_key = "image"
  d.tfds_label_key = "label"
  return d


def labelled_features(image_size: int = 224) -> ml_collections.ConfigDict:
  """`labelled_source` plus how its images become frozen-encoder features (kNN, probe)."""
  d = labelled_source()
  d.image_size = image_size  # a multiple of the patch size
  d.crop_pct = 0.95  # streamed sources: resize to image_size / crop_pct, centre crop
  d.batch_size = 256
  d.read_threads = 8  # streamed sources: threads that read and decode images
  return d


def report() -> ml_collections.ConfigDict:
  """The end-of-run report of pre-training (`evaluate/report.py`): off unless asked for."""
  e = ml_collections.ConfigDict()
  e.pretext_iou = False
  e.knn = False
  e.visualize = False
  e.num_heldout_pairs = 64
  e.knn_k = 20
  e.knn_temperature = 0.07
  e.data = labelled_features()  # the labelled sets of the kNN
  return e
