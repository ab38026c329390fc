"""CIM pre-training: the recipe of docs/METHOD.md sections 1-4 for one ViT size.

python -m cim_jax.pretrain --config=configs/cim_pretrain.py:B/16 --workdir=DIR \
    [--config.key=value ...]

The argument is the encoder: Ti/16, S/16, B/16, L/16 or H/14.
"""

import ml_collections

from cim_jax import config_defaults

# Per size: mesh and rematerialisation (L and H do not fit one device otherwise). H/14 keeps the
# token grids of the /16 models (search 14x14, context 10x10, exemplar 4x4), so the decoder's
# 10x10 position table and the pretext stay the same.
PRESETS = {
    "Ti/16": dict(fsdp=1, remat=False),
    "S/16": dict(fsdp=1, remat=False),
    "B/16": dict(fsdp=1, remat=False),
    "L/16": dict(fsdp=8, remat=True),
    "H/14": dict(fsdp=8, remat=True, search_size=196, context_size=140, exemplar_size=56),
}


def get_config(arg="B/16"):
  preset = PRESETS[arg]
  c = config_defaults.training()
  c.batch_size = 4096  # global, over all processes and devices
  c.num_epochs = 300.0
  c.mesh.fsdp = preset["fsdp"]

  c.data = config_defaults.image_source()
  # Search image: RandomResizedCrop + horizontal flip.
  c.data.search_size = preset.get("search_size", 224)
  c.data.search_scale = (0.5, 1.0)
  c.data.search_ratio = (3.0 / 4.0, 4.0 / 3.0)
  c.data.search_flip_prob = 0.5
  # Context: the whole search image resized, no colour augmentation.
  c.data.context_size = preset.get("context_size", 160)
  # Exemplars cut from the search image.
  c.data.num_exemplars = 6
  c.data.exemplar_size = preset.get("exemplar_size", 64)
  c.data.exemplar_scale = (0.05, 0.48)  # area as a fraction of the search image's area
  c.data.exemplar_ratio = (1.0 / 3.0, 3.0)  # aspect ratio, sampled log-uniformly
  c.data.exemplar_rotation = 45.0  # degrees, r: the exemplar's angle range
  # "release" = the authors' code: an integer angle in [-r, r - 1], an axis-aligned
  # RandomResizedCrop box, the exemplar = that box's bounding rectangle in the rotated image,
  # corners clipped to it (mean 32% of the image); "drawn_box" = a box of the drawn area and
  # aspect rotated by U(-r, r), inside (mean 25%). See cim_jax/data/pairs.py.
  c.data.exemplar_geometry = "release"
  # Exemplar-only photometric augmentation.
  c.data.color_jitter_prob = 0.8
  c.data.brightness = 0.4
  c.data.contrast = 0.4
  c.data.saturation = 0.2
  c.data.hue = 0.1
  c.data.grayscale_prob = 0.2
  c.data.blur_prob = 0.5
  c.data.blur_sigma = (0.1, 2.0)
  c.data.solarize_prob = 0.2
  c.data.exemplar_flip_prob = 0.5  # applied after the label is fixed

  c.model = ml_collections.ConfigDict()
  c.model.variant = arg
  c.model.mlp_ratio = 4.0
  c.model.pos_embed_grid = 14  # the sin-cos table is built for 14x14, resampled to the input
  c.model.freeze_patch_embed = True
  c.model.drop_path_rate = 0.0
  c.model.dtype = "float32"  # compute dtype: "float32" or "bfloat16"; parameters stay float32
  c.model.remat = preset["remat"]  # activation rematerialisation of the encoder blocks
  # Attention: "" (jax.nn.dot_product_attention's choice, XLA; on a CPU, sequences of >= 256
  # tokens one head at a time, vit.head_by_head_attention), "xla" (always XLA's batched form), or
  # "cudnn" (fused kernel on NVIDIA GPUs, bfloat16 / float16 compute only).
  c.model.attention_impl = ""
  # GELU of every MLP: False = the exact erf form (timm, the authors); True = the tanh form
  # (not the recipe, see vit.Mlp and docs/BENCHMARKS.md).
  c.model.approximate_gelu = False
  c.model.decoder_dim = 512
  c.model.decoder_heads = 16
  c.model.decoder_mlp_ratio = 4.0
  c.model.corr_loss_weight = 1.0  # sigma_corr
  c.model.global_loss_weight = 0.0  # sigma_cont; 0 in the released recipe
  c.model.projector_hidden_dim = 4096
  c.model.projector_dim = 256
  c.model.global_temperature = 0.2

  c.optim = ml_collections.ConfigDict()
  c.optim.base_lr = 1.5e-4  # lr = base_lr * batch_size / 256
  c.optim.min_lr = 0.0
  c.optim.warmup_epochs = 40.0
  c.optim.warmup_steps = -1  # >=0 overrides warmup_epochs
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.weight_decay = 0.05
  # Exempt from weight decay: "1d" (biases, norm scales / offsets: timm's add_weight_decay,
  # as the authors' pre-training, so the cls token is decayed) or "1d+tokens" (also the cls
  # token; position tables are fixed, never parameters).
  c.optim.wd_exempt = "1d"
  # Global-norm clipping, 0 disables. The released run never clipped: its --clip_grad 1.0 only
  # acts in the mixed-precision branch, and the run was fp32.
  c.optim.grad_clip_norm = 0.0
  c.optim.accum_steps = 1  # optimizer steps every accum_steps batches (mean gradient)

  c.ema = ml_collections.ConfigDict()
  c.ema.momentum_start = 0.99
  c.ema.momentum_end = 1.0

  c.eval = config_defaults.report()
  return c

