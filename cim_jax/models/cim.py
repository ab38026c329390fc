"""CIM: online encoder on exemplars, EMA target encoder on the context, decoder and losses."""

from typing import Optional

import jax
import jax.numpy as jnp

from cim_jax import geometry
from cim_jax.models.decoder import CorrelationDecoder, upsample_align_corners
from cim_jax.models.decoder import upsample_plane_align_corners
from cim_jax.models.heads import MLPHead, info_nce_loss
from cim_jax.models.vit import compute_dtype, encoder_from_config

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_images(images, dtype=jnp.float32):
  """uint8 (..., 3) -> ImageNet-normalised float, computed in float32 then cast to `dtype`."""
  x = jnp.asarray(images).astype(jnp.float32) / 255.0
  x = (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)
  return x.astype(dtype)


def correlation_loss(correlation_logits, masks):
  """Per-pixel 2-class softmax CE, mean over pixels and batch, summed over the N exemplars.

  correlation_logits (B, N, C, C, 2), masks (B, N, C, C) in {0, 1}.
  """
  logits = correlation_logits.astype(jnp.float32)
  return correlation_loss_from_difference(logits[..., 1] - logits[..., 0], masks)


def correlation_loss_from_difference(logit_difference, masks):
  """`correlation_loss` from d = logit_1 - logit_0 (B, N, C, C): CE = softplus(-d) on mask pixels,
  softplus(d) elsewhere (the 2-class softmax CE), float32."""
  difference = logit_difference.astype(jnp.float32)
  nll = jax.nn.softplus(jnp.where(masks.astype(bool), -difference, difference))
  return nll.mean(axis=(0, 2, 3)).sum()


class CIMModel:
  """Holds the encoder / decoder / head modules and applies them as pure functions."""

  def __init__(self, model_config, data_config, **encoder_overrides):
    self.config = model_config
    self.context_size = int(data_config.context_size)
    self.exemplar_size = int(data_config.exemplar_size)
    self.num_exemplars = int(data_config.num_exemplars)
    self.dtype = compute_dtype(model_config.dtype)
    self.encoder = encoder_from_config(model_config, **encoder_overrides)
    patch = self.encoder.patch_size
    for name, size in (("context_size", self.context_size), ("exemplar_size", self.exemplar_size)):
      if size % patch:
        raise ValueError(f"data.{name}={size} is not a multiple of the patch size {patch}")
    self.decoder = CorrelationDecoder(
        dim=int(model_config.decoder_dim), num_heads=int(model_config.decoder_heads),
        mlp_ratio=float(model_config.decoder_mlp_ratio), output_size=self.context_size,
        dtype=self.dtype, attention_impl=self.encoder.attention_impl,
        approximate_gelu=self.encoder.approximate_gelu)
    self.corr_loss_weight = float(model_config.corr_loss_weight)
    self.global_loss_weight = float(model_config.global_loss_weight)
    self.use_global_loss = self.global_loss_weight > 0
    self.temperature = float(model_config.global_temperature)
    head = dict(hidden_dim=int(model_config.projector_hidden_dim),
                output_dim=int(model_config.projector_dim), dtype=self.dtype)
    self.projector = MLPHead(3, **head)
    self.predictor = MLPHead(2, **head)

  # ------------------------------------------------------------------------------------------
  # Initialisation.

  def init_variables(self, rng, batch: Optional[dict] = None):
    """-> (params, model_state); only the batch's shapes matter (None: the configured shapes)."""
    width = self.encoder.width
    patch = self.encoder.patch_size
    exemplar_size = self.exemplar_size if batch is None else batch["exemplars"].shape[-2]
    context_size = self.context_size if batch is None else batch["context"].shape[-2]
    enc_rng, dec_rng, proj_rng, pred_rng = jax.random.split(rng, 4)
    exemplar = jnp.zeros((1, exemplar_size, exemplar_size, 3), jnp.float32)
    params = {"encoder": self.encoder.init(enc_rng, exemplar)["params"]}
    context_tokens = jnp.zeros((1, 1 + (context_size // patch)**2, width), jnp.float32)
    exemplar_tokens = jnp.zeros((1, 1, 1 + (exemplar_size // patch)**2, width), jnp.float32)
    params["decoder"] = self.decoder.init(dec_rng, context_tokens, exemplar_tokens)["params"]
    model_state = {}
    if self.use_global_loss:
      projector = self.projector.init(proj_rng, jnp.zeros((1, 2, width)), train=False)
      predictor = self.predictor.init(
          pred_rng, jnp.zeros((1, 2, self.projector.output_dim)), train=False)
      params["projector"] = projector["params"]
      params["predictor"] = predictor["params"]
      model_state = {"projector": projector["batch_stats"],
                     "predictor": predictor["batch_stats"],
                     "target_projector": jax.tree.map(jnp.copy, projector["batch_stats"])}
    return params, model_state

  def init(self, rng, batch: Optional[dict] = None):
    """-> params {'encoder', 'decoder'[, 'projector', 'predictor']}."""
    return self.init_variables(rng, batch)[0]

  def target_params_from(self, params):
    """The EMA target's starting point: an exact (separate-buffer) copy of encoder [+ projector]."""
    target = {"encoder": params["encoder"]}
    if self.use_global_loss:
      target["projector"] = params["projector"]
    return jax.tree.map(jnp.copy, target)

  # ------------------------------------------------------------------------------------------
  # Forward pass and losses.

  def encode_exemplars(self, encoder_params, exemplars, *, train: bool, rng=None):
    """(B, N, E, E, 3) normalised -> online tokens (B, N, 1+Le, D)."""
    batch, num = exemplars.shape[:2]
    rngs = {}
    if train and self.encoder.drop_path_rate > 0:
      if rng is None:
        raise ValueError("train=True with drop_path_rate > 0 needs an rng")
      rngs = {"dropout": rng}
    tokens, _ = self.encoder.apply({"params": encoder_params},
                                   exemplars.reshape((batch * num,) + exemplars.shape[2:]),
                                   train=train, rngs=rngs)
    return tokens.reshape((batch, num) + tokens.shape[1:])

  def encode_context(self, target_encoder_params, context, shared_cls_token):
    """Target branch: (B, C, C, 3) normalised -> tokens (B, 1+Lc, D), entirely without gradient."""
    tokens, _ = self.encoder.apply({"params": target_encoder_params}, context,
                                   cls_token=jax.lax.stop_gradient(shared_cls_token), train=False)
    return jax.lax.stop_gradient(tokens)

  def _check_batch(self, batch):
    context, exemplars, corners = batch["context"], batch["exemplars"], batch["corners"]
    if context.ndim != 4 or exemplars.ndim != 5 or corners.shape[-2:] != (4, 2):
      raise ValueError(f"batch must hold context (B,C,C,3), exemplars (B,N,E,E,3), corners "
                       f"(B,N,4,2); got {context.shape}, {exemplars.shape}, {corners.shape}")
    if exemplars.shape[:2] != corners.shape[:2] or context.shape[0] != exemplars.shape[0]:
      raise ValueError(f"batch/exemplar counts disagree: context {context.shape}, exemplars "
                       f"{exemplars.shape}, corners {corners.shape}")

  def apply(self, params, target_params, model_state, batch, *, train: bool, rng=None,
            axis_name: Optional[str] = None):
    """-> (loss, aux) with aux = {'metrics', 'correlation_logits', 'model_state'}.

    Under a global `jax.jit` (arrays sharded over the mesh) leave axis_name None: the batch axis
    already spans all devices. Inside shard_map, name the data axis so the global loss gathers
    the targets of every device (the correlation loss then is this device's share; pmean it).
    """
    self._check_batch(batch)
    context = normalize_images(batch["context"], self.dtype)
    exemplars = normalize_images(batch["exemplars"], self.dtype)
    online_tokens = self.encode_exemplars(params["encoder"], exemplars, train=train, rng=rng)
    target_tokens = self.encode_context(target_params["encoder"], context,
                                        params["encoder"]["cls_token"])
    grid_logits = self.decoder.apply({"params": params["decoder"]}, target_tokens, online_tokens,
                                     upsample=False)
    # Bilinear upsampling is linear and the 2-class CE depends only on logit_1 - logit_0, so the
    # loss upsamples that one difference map instead of both logit maps (half the full-res work).
    logit_difference = upsample_plane_align_corners(
        grid_logits[..., 1] - grid_logits[..., 0], self.context_size)
    masks = geometry.masks_from_corners(batch["corners"], self.context_size, xp=jnp)
    corr_loss = correlation_loss_from_difference(logit_difference, masks)
    metrics = {
        "corr_loss": corr_loss,
        "mask_fraction": masks.astype(jnp.float32).mean(),
        "pixel_accuracy": ((logit_difference > 0) == masks).astype(jnp.float32).mean(),
    }
    loss = self.corr_loss_weight * corr_loss
    new_model_state = model_state
    if self.use_global_loss:
      global_loss, new_model_state = self._global_loss(
          params, target_params, model_state, online_tokens, target_tokens, train=train,
          axis_name=axis_name)
      metrics["global_loss"] = global_loss
      loss = loss + self.global_loss_weight * global_loss
    metrics["loss"] = loss
    # Full-resolution logits for evaluation; a jitted caller that drops them (the train step
    # returns only metrics) never computes them: XLA removes unused outputs.
    correlation_logits = upsample_align_corners(grid_logits, self.context_size)
    return loss, {"metrics": metrics, "correlation_logits": correlation_logits,
                  "model_state": new_model_state}

  def _global_loss(self, params, target_params, model_state, online_tokens, target_tokens, *,
                   train: bool, axis_name: Optional[str] = None):
    mutable = ["batch_stats"] if train else False

    def run(module, head_params, stats, x):
      out = module.apply({"params": head_params, "batch_stats": stats}, x, train=train,
                         mutable=mutable)
      return out if train else (out, {"batch_stats": stats})

    # Online heads run once per exemplar (group axis N), as the authors loop over exemplars.
    online_cls = jnp.swapaxes(online_tokens[:, :, 0], 0, 1)  # (N, B, D)
    projected, projector_state = run(self.projector, params["projector"],
                                     model_state["projector"], online_cls)
    predicted, predictor_state = run(self.predictor, params["predictor"],
                                     model_state["predictor"], projected)
    target, target_state = run(self.projector, target_params["projector"],
                               model_state["target_projector"], target_tokens[None, :, 0])
    target = jax.lax.stop_gradient(target[0])
    loss = info_nce_loss(predicted, target, self.temperature, axis_name=axis_name)
    new_state = {"projector": projector_state["batch_stats"],
                 "predictor": predictor_state["batch_stats"],
                 "target_projector": jax.lax.stop_gradient(target_state["batch_stats"])}
    return loss, new_state


def build_model(model_config, data_config, **encoder_overrides) -> CIMModel:
  """The CIM model a config describes (encoder_overrides: VisionTransformer fields, for tests)."""
  return CIMModel(model_config, data_config, **encoder_overrides)
