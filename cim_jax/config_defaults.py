"""The one schema of every CIM config: defaults from docs/METHOD.md, presets per ViT size.

`configs/*.py` call `pretrain_config(...)`; every key a user may override lives here, so a
misspelt override can be caught against this schema (see `config_validation`).
"""

import ml_collections

# Encoder sizes are decoded from `model.variant` ("B/16"); these are the pre-training presets.
PRESETS = {
    "tiny": dict(variant="Ti/16", batch_size=4096, epochs=300, warmup_epochs=40),
    "small": dict(variant="S/16", batch_size=4096, epochs=300, warmup_epochs=40),
    "base": dict(variant="B/16", batch_size=4096, epochs=300, warmup_epochs=40),
    "large": dict(variant="L/16", batch_size=4096, epochs=300, warmup_epochs=40, fsdp=8, remat=True),
    # Patch 14: sizes keep the token grids of the /16 models (search 14x14, context 10x10,
    # exemplar 4x4), so the decoder's 10x10 position table and the pretext stay the same.
    "huge": dict(variant="H/14", batch_size=4096, epochs=300, warmup_epochs=40, fsdp=8, remat=True,
                 search_size=196, context_size=140, exemplar_size=56),
}


def data_config() -> ml_collections.ConfigDict:
  """Source and pair-generation settings (docs/METHOD.md §1)."""
  d = ml_collections.ConfigDict()
  # Source: "embedded" (photos shipped in scikit-image / scikit-learn), "imagefolder", "tfds".
  d.source = "embedded"
  d.root = ""  # ImageFolder root (root/<class>/<image>)
  d.tfds_name = "imagenet2012"
  d.tfds_split = "train"
  d.tfds_data_dir = ""  # "" -> TFDS default
  d.heldout_root = ""  # ImageFolder for the held-out pairs (pretext IoU) when source="imagefolder"
  d.tfds_heldout_split = "validation"  # TFDS split for the held-out pairs when source="tfds"
  d.num_images = 0  # >0: use only the first num_images records (debugging / demo)
  d.min_image_size = 16  # records whose shorter side is smaller are skipped (no usable crops)
  # Search image: RandomResizedCrop + horizontal flip.
  d.search_size = 224
  d.search_scale = (0.5, 1.0)
  d.search_ratio = (3.0 / 4.0, 4.0 / 3.0)
  d.search_flip_prob = 0.5
  # Context: the whole search image resized, no colour augmentation.
  d.context_size = 160
  # Exemplars cut from the search image.
  d.num_exemplars = 6
  d.exemplar_size = 64
  d.exemplar_scale = (0.05, 0.48)  # area as a fraction of the search image's area
  d.exemplar_ratio = (1.0 / 3.0, 3.0)  # aspect ratio, sampled log-uniformly
  d.exemplar_rotation = 45.0  # degrees, r: the exemplar's angle range (see exemplar_geometry)
  # How an exemplar is drawn (cim_jax/data/pairs.py): "release" = the authors' code: an integer
  # angle in [-r, r - 1], an axis-aligned RandomResizedCrop box, the exemplar = that box's
  # bounding rectangle in the rotated image, corners clipped to it (mean 32% of the image);
  # "drawn_box" = a box of the drawn area and aspect rotated by U(-r, r), inside (mean 25%).
  d.exemplar_geometry = "release"
  # Exemplar-only photometric augmentation.
  d.color_jitter_prob = 0.8
  d.brightness = 0.4
  d.contrast = 0.4
  d.saturation = 0.2
  d.hue = 0.1
  d.grayscale_prob = 0.2
  d.blur_prob = 0.5
  d.blur_sigma = (0.1, 2.0)
  d.solarize_prob = 0.2
  d.exemplar_flip_prob = 0.5  # applied after the label is fixed
  # Loader.
  d.num_workers = 0  # grain worker processes; 0 = in-process
  d.worker_buffer_size = 2
  d.shuffle = True
  return d


def model_config(variant: str = "B/16") -> ml_collections.ConfigDict:
  """Encoder, correlation decoder and loss settings (docs/METHOD.md §2-3)."""
  m = ml_collections.ConfigDict()
  m.variant = variant
  m.mlp_ratio = 4.0
  m.pos_embed_grid = 14  # the sin-cos table is built for 14x14 and resampled to the input grid
  m.freeze_patch_embed = True
  m.drop_path_rate = 0.0
  m.dtype = "float32"  # compute dtype: "float32" or "bfloat16"; parameters stay float32
  m.remat = False  # activation rematerialisation of encoder blocks (L/H)
  # jax.nn.dot_product_attention implementation: "" (JAX's choice, XLA), "xla", or "cudnn"
  # (fused kernel on NVIDIA GPUs, bfloat16/float16 compute only).
  m.attention_impl = ""
  # GELU of every MLP: False = exact erf form (timm, the authors); True = tanh form (not the
  # recipe; estimated no faster on an H100, see vit.Mlp and docs/BENCHMARKS.md).
  m.gelu_approximate = False
  m.decoder_dim = 512
  m.decoder_heads = 16
  m.decoder_mlp_ratio = 4.0
  m.corr_loss_weight = 1.0  # sigma_corr
  m.global_loss_weight = 0.0  # sigma_cont; 0 in the released recipe
  m.projector_hidden_dim = 4096
  m.projector_dim = 256
  m.global_temperature = 0.2
  return m


def pretrain_config(preset: str = "base") -> ml_collections.ConfigDict:
  """The CIM pre-training recipe (docs/METHOD.md §4) for one ViT size."""
  p = PRESETS[preset]
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = p["batch_size"]  # global, over all processes and devices
  c.num_epochs = float(p["epochs"])
  c.num_train_steps = -1  # >0 overrides num_epochs
  c.steps_per_epoch = -1  # >0 overrides len(source) // batch_size (for sources of unknown size)
  c.data = data_config()
  for key in ("search_size", "context_size", "exemplar_size"):
    if key in p:
      c.data[key] = p[key]
  c.model = model_config(p["variant"])
  c.model.remat = p.get("remat", False)

  c.optim = ml_collections.ConfigDict()
  c.optim.base_lr = 1.5e-4  # lr = base_lr * batch_size / 256
  c.optim.min_lr = 0.0
  c.optim.warmup_epochs = float(p["warmup_epochs"])
  c.optim.warmup_steps = -1  # >=0 overrides warmup_epochs
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.weight_decay = 0.05
  # Parameters exempt from weight decay: "1d" (biases, norm scales/offsets: the set of timm's
  # add_weight_decay, which the authors' pre-training uses, so the cls token is decayed) or
  # "1d+tokens" (also the cls token; position tables are fixed, never parameters).
  c.optim.wd_exempt = "1d"
  # Global-norm clipping, 0 disables. The released pre-training never clipped: its script's
  # --clip_grad 1.0 only acts in the mixed-precision loss-scaler branch, and the run was fp32.
  c.optim.grad_clip_norm = 0.0
  c.optim.accum_steps = 1  # gradient accumulation (optimizer steps every accum_steps batches)

  c.ema = ml_collections.ConfigDict()
  c.ema.momentum_start = 0.99
  c.ema.momentum_end = 1.0

  c.mesh = ml_collections.ConfigDict()
  c.mesh.fsdp = p.get("fsdp", 1)  # parameter / optimizer sharding axis size; data axis = rest

  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.init_from = ""  # warm start: a work dir of this project or an authors' .pth checkpoint
  c.progress_bar = True

  # End-of-run evaluation (used by the demo; off for real runs).
  c.eval = ml_collections.ConfigDict()
  c.eval.pretext_iou = False
  c.eval.knn = False
  c.eval.visualize = False
  c.eval.num_heldout_pairs = 64
  c.eval.knn_k = 20
  c.eval.knn_temperature = 0.07
  # Evaluation entry points (cim_jax/evaluate): what to evaluate and on which labelled images.
  c.checkpoint = ""  # a work dir of this project or an authors' .pth; "" = random init
  # "digits" / "lfw" (embedded, in memory), "imagefolder" or "tfds" (streamed, centre-cropped).
  c.eval.labelled_source = "digits"
  c.eval.train_root = ""  # labelled_source="imagefolder": train root (root/<class>/<image>)
  c.eval.eval_root = ""  # ... and test root (the same class folders)
  c.eval.tfds_name = "imagenet2012"  # labelled_source="tfds" (prepared as array_record)
  c.eval.tfds_train_split = "train"
  c.eval.tfds_eval_split = "validation"
  c.eval.tfds_data_dir = ""  # "" -> TFDS default
  c.eval.tfds_image_key = "image"
  c.eval.tfds_label_key = "label"
  c.eval.crop_pct = 0.95  # streamed sources: resize to image_size / crop_pct, centre crop
  c.eval.read_threads = 8  # streamed sources: threads that read and decode images
  c.eval.feature_pool = "cls"  # kNN / linear-probe features: "cls" token or "mean" of patches
  c.eval.image_size = 64  # labelled images are resized to this (a multiple of the patch size)
  c.eval.batch_size = 256
  c.eval.output_dir = ""  # PNGs of the visualisation entry point ("" -> checkpoint dir)
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
  return c


# Fine-tuning epochs and layer-wise lr decay per size. The authors' fine-tuning script sets
# --layer_decay 0.8 once for every model size (docs/METHOD.md).
FINETUNE_PRESETS = {
    "tiny": dict(epochs=200, layer_decay=0.8),
    "small": dict(epochs=200, layer_decay=0.8),
    "base": dict(epochs=100, layer_decay=0.8),
    "large": dict(epochs=50, layer_decay=0.8),
    "huge": dict(epochs=50, layer_decay=0.8),
}


def finetune_config(preset: str = "base") -> ml_collections.ConfigDict:
  """The supervised fine-tuning recipe (docs/METHOD.md §5) for one ViT size."""
  p, f = PRESETS[preset], FINETUNE_PRESETS[preset]
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 1024  # global
  c.num_epochs = float(f["epochs"])
  c.num_train_steps = -1  # >0 overrides num_epochs
  c.steps_per_epoch = -1  # >0 overrides len(train set) // batch_size
  c.init_from = ""  # pre-trained CIM work dir or authors' .pth; "" = from scratch
  c.model = model_config(p["variant"])
  c.model.drop_path_rate = 0.1
  c.model.remat = p.get("remat", False)
  c.model.freeze_patch_embed = False  # the release fine-tunes the patch projection too

  c.data = ml_collections.ConfigDict()
  # "digits" / "lfw" (embedded, in memory), "imagefolder" or "tfds" (streamed).
  c.data.source = "digits"
  c.data.root = ""  # ImageFolder train root (root/<class>/<image>)
  c.data.eval_root = ""  # ImageFolder evaluation root (same class folders)
  c.data.tfds_name = "imagenet2012"  # source="tfds" (prepared as array_record)
  c.data.tfds_split = "train"
  c.data.tfds_eval_split = "validation"
  c.data.tfds_data_dir = ""  # "" -> TFDS default
  c.data.tfds_image_key = "image"
  c.data.tfds_label_key = "label"
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
  c.data.num_workers = 0
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
  c.optim.layer_decay = f["layer_decay"]
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.weight_decay = 0.05
  # "1d+tokens": biases, norm parameters and the cls token are not decayed, as MAE's
  # param_groups_lrd with timm's no_weight_decay() = {pos_embed, cls_token, dist_token} in the
  # authors' fine-tuning (pos_embed is a fixed table here, not a parameter). "1d" decays the
  # cls token (the pre-training set).
  c.optim.wd_exempt = "1d+tokens"
  c.optim.grad_clip_norm = 0.0  # 0 disables (the MAE / CIM fine-tuning recipe does not clip)
  c.optim.accum_steps = 1  # gradient accumulation (optimizer steps every accum_steps batches)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.fsdp = p.get("fsdp", 1)  # parameter / optimizer sharding axis size; data axis = rest

  c.log_every_steps = 50
  c.eval_every_steps = -1  # -1: once per epoch (and at the end)
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.progress_bar = True
  return c
