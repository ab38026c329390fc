"""cim_jax.models.upernet restated in PyTorch (mmseg's UPerHead / FCNHead, BEiT's pyramid neck).

Test and bench only: parity tests load our Flax variables into it (`load_flax_variables`) and
bench/bench_segmentation_step.py times the same train step. Import it after
`pytest.importorskip("torch")`.
"""

import re

import jax
import numpy as np
import torch
from flax import traverse_util
from torch import nn

from cim_jax import interop
from cim_jax.models import vit as vit_lib

F = nn.functional


class ConvModule(nn.Sequential):
  """mmcv ConvModule(conv without bias, BN, ReLU), padding k // 2."""

  def __init__(self, in_channels, out_channels, kernel_size):
    super().__init__()
    self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2,
                          bias=False)
    self.bn = nn.BatchNorm2d(out_channels)
    self.activate = nn.ReLU()


def resize(x, size):
  return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class UPerHead(nn.Module):
  """mmseg UPerHead(in_channels=[width] * 4, channels, pool_scales), Dropout2d + conv_seg."""

  def __init__(self, width, channels, pool_scales, num_classes, dropout):
    super().__init__()
    self.pool_scales = pool_scales
    self.psp_modules = nn.ModuleList(ConvModule(width, channels, 1) for _ in pool_scales)
    self.bottleneck = ConvModule(width + len(pool_scales) * channels, channels, 3)
    self.lateral_convs = nn.ModuleList(ConvModule(width, channels, 1) for _ in range(3))
    self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3) for _ in range(3))
    self.fpn_bottleneck = ConvModule(4 * channels, channels, 3)
    self.dropout = nn.Dropout2d(dropout)
    self.conv_seg = nn.Conv2d(channels, num_classes, 1)

  def forward(self, inputs):
    top = inputs[3]
    psp = [top] + [resize(module(F.adaptive_avg_pool2d(top, scale)), top.shape[2:])
                   for module, scale in zip(self.psp_modules, self.pool_scales)]
    laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs)]
    laterals.append(self.bottleneck(torch.cat(psp, 1)))
    for i in range(len(laterals) - 1, 0, -1):
      laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[2:])
    outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)] + [laterals[-1]]
    outs = [outs[0]] + [resize(x, outs[0].shape[2:]) for x in outs[1:]]
    return self.conv_seg(self.dropout(self.fpn_bottleneck(torch.cat(outs, 1))))


class FCNHead(nn.Module):
  """mmseg FCNHead(num_convs=1, kernel 3, concat_input=False)."""

  def __init__(self, width, channels, num_classes, dropout):
    super().__init__()
    self.convs = nn.Sequential(ConvModule(width, channels, 3))
    self.dropout = nn.Dropout2d(dropout)
    self.conv_seg = nn.Conv2d(channels, num_classes, 1)

  def forward(self, x):
    return self.conv_seg(self.dropout(self.convs(x)))


class Neck(nn.Module):
  """BEiT/MAE segmentation backbone's fpn1..fpn4."""

  def __init__(self, width):
    super().__init__()
    self.fpn1 = nn.Sequential(nn.ConvTranspose2d(width, width, 2, 2), nn.BatchNorm2d(width),
                              nn.GELU(), nn.ConvTranspose2d(width, width, 2, 2))
    self.fpn2 = nn.Sequential(nn.ConvTranspose2d(width, width, 2, 2))
    self.fpn4 = nn.MaxPool2d(2, 2)

  def forward(self, maps):
    return [self.fpn1(maps[0]), self.fpn2(maps[1]), maps[2], self.fpn4(maps[3])]


class TorchSegmenter(nn.Module):
  """timm ViT blocks -> Neck -> UPerHead + FCNHead on level 2; NCHW images, NCHW logits."""

  def __init__(self, segmenter, drop_path_rate=None):
    super().__init__()
    from timm.models import vision_transformer  # pylint: disable=g-import-not-at-top
    encoder = segmenter.backbone
    self.encoder = encoder
    self.blocks_used = tuple(segmenter.blocks)
    self.vit = vision_transformer.VisionTransformer(
        img_size=encoder.patch_size * 4, patch_size=encoder.patch_size, embed_dim=encoder.width,
        depth=encoder.depth, num_heads=encoder.num_heads, mlp_ratio=encoder.mlp_ratio,
        qkv_bias=True, num_classes=0,
        drop_path_rate=encoder.drop_path_rate if drop_path_rate is None else drop_path_rate)
    self.neck = Neck(encoder.width)
    self.decode_head = UPerHead(encoder.width, segmenter.channels, tuple(segmenter.pool_scales),
                                segmenter.num_classes, segmenter.dropout)
    self.auxiliary_head = FCNHead(encoder.width, segmenter.aux_channels, segmenter.num_classes,
                                  segmenter.dropout)

  def forward(self, images):
    """(B, 3, H, W) normalised -> (logits (B, C, H/4, W/4), aux logits (B, C, H/16, W/16))."""
    p = self.encoder.patch_size
    grid = (images.shape[2] // p, images.shape[3] // p)
    x = self.vit.patch_embed.proj(images).flatten(2).transpose(1, 2)
    x = torch.cat([self.vit.cls_token.expand(x.shape[0], -1, -1), x], 1)
    pos = vit_lib.resampled_pos_embed(self.encoder.width, grid, self.encoder.pos_embed_grid)
    x = x + torch.from_numpy(pos)
    outputs = []
    for block in self.vit.blocks:
      x = block(x)
      outputs.append(x)
    maps = [outputs[b - 1][:, 1:].transpose(1, 2).reshape(x.shape[0], -1, *grid)
            for b in self.blocks_used]
    levels = self.neck(maps)
    return self.decode_head(levels), self.auxiliary_head(levels[2])


def _torch_name(path):
  """Flax path -> torch state-dict key (+ how to lay out the array)."""
  parts = [re.sub(r"_(\d+)$", r".\1", part) for part in path if part != "cls"]
  leaf = {"kernel": "weight", "scale": "weight", "mean": "running_mean",
          "var": "running_var"}.get(parts[-1], parts[-1])
  return ".".join(parts[:-1] + [leaf])


def load_flax_variables(model: TorchSegmenter, variables) -> TorchSegmenter:
  """Copies our {'params', 'batch_stats'} into `model` (every tensor; strict)."""
  variables = jax.device_get(variables)
  params = dict(variables["params"])
  backbone = dict(params.pop("backbone"))
  width = model.encoder.width
  # timm's final norm is never used here; identity values fill its slot.
  backbone["norm"] = {"scale": np.ones(width, np.float32), "bias": np.zeros(width, np.float32)}
  state = {f"vit.{k}": v for k, v in interop.encoder_to_timm(
      backbone, pos_embed_grid=model.encoder.pos_embed_grid).items()}
  state["vit.pos_embed"] = model.vit.pos_embed.detach().numpy()  # unused: resampled in forward
  flat = traverse_util.flatten_dict({"params": params, "batch_stats": variables["batch_stats"]})
  for path, value in flat.items():
    value = np.asarray(value, np.float32)
    if path[-1] == "kernel":
      # Deconv kernels (2, 2, in, out) -> torch (in, out, 2, 2); conv (k, k, in, out) -> (out, in,
      # k, k).
      value = value.transpose(2, 3, 0, 1) if path[1] == "neck" else value.transpose(3, 2, 0, 1)
    state[_torch_name(path[1:])] = np.ascontiguousarray(value)
  for key, tensor in model.state_dict().items():
    if key.endswith("num_batches_tracked"):
      state[key] = tensor
  model.load_state_dict({k: torch.as_tensor(np.array(v)) for k, v in state.items()}, strict=True)
  return model


def segmentation_loss(logits, aux_logits, labels, aux_weight=0.4, ignore_index=255):
  """mmseg's CrossEntropyLoss (avg_non_ignore=False) on resized logits, decode + weighted aux."""

  def pixel_ce(x):
    x = resize(x, labels.shape[1:])
    nll = F.cross_entropy(x, labels, ignore_index=ignore_index, reduction="none")
    return nll.sum() / labels.numel()

  return pixel_ce(logits) + aux_weight * pixel_ce(aux_logits)


def make_step(model, learning_rate=1e-4, weight_decay=0.05):
  """forward + loss + backward + AdamW step on (images NCHW, labels (B, H, W) int64)."""
  optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
  model.train()

  def step(images, labels):
    optimizer.zero_grad(set_to_none=True)
    loss = segmentation_loss(*model(images), labels)
    loss.backward()
    optimizer.step()
    return loss.detach()

  return step
