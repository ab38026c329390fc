"""The CIM pre-training step in PyTorch from timm blocks, same shapes as ours (bench-only)."""

import copy
import functools

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import Block
from torch import nn

LayerNorm = functools.partial(nn.LayerNorm, eps=1e-6)


class CrossBlock(nn.Module):
  """Pre-norm cross-attention: context tokens query exemplar tokens; one norm for both inputs."""

  def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
    super().__init__()
    self.heads = heads
    self.norm1, self.norm2 = LayerNorm(dim), LayerNorm(dim)
    self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
    self.mlp = Mlp(dim, int(dim * mlp_ratio))

  def forward(self, context, exemplars):
    b, lq, d = context.shape
    q = self.q(self.norm1(context)).reshape(b, lq, self.heads, -1).transpose(1, 2)
    k, v = self.kv(self.norm1(exemplars)).reshape(b, -1, 2, self.heads, d // self.heads).permute(
        2, 0, 3, 1, 4)
    attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, lq, d)
    context = context + self.proj(attended)
    return context + self.mlp(self.norm2(context))


class TorchCIM(nn.Module):
  """Online encoder on exemplars, EMA target encoder on the context, correlation decoder."""

  def __init__(self, width, depth, heads, patch, context_size, exemplar_size,
               decoder_dim=512, decoder_heads=16):
    super().__init__()
    self.context_grid = context_size // patch
    self.context_size = context_size
    self.patch_embed = nn.Conv2d(3, width, patch, patch)
    self.patch_embed.requires_grad_(False)  # frozen random projection, as in CIM
    self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
    # Fixed tables: buffers (values do not matter for speed).
    self.register_buffer("pos_context", torch.randn(1, 1 + self.context_grid**2, width) * .02)
    self.register_buffer("pos_exemplar",
                         torch.randn(1, 1 + (exemplar_size // patch)**2, width) * .02)
    self.blocks = nn.ModuleList(Block(width, heads, 4.0, qkv_bias=True, norm_layer=LayerNorm)
                                for _ in range(depth))
    self.norm = LayerNorm(width)
    self.target = nn.ModuleDict(dict(patch_embed=copy.deepcopy(self.patch_embed),
                                     blocks=copy.deepcopy(self.blocks),
                                     norm=copy.deepcopy(self.norm)))
    self.target.requires_grad_(False)
    self.decoder_embed = nn.Linear(width, decoder_dim)
    self.register_buffer("decoder_pos", torch.randn(1, 1 + self.context_grid**2, decoder_dim))
    self.decoder_block = CrossBlock(decoder_dim, decoder_heads)
    self.decoder_norm = LayerNorm(decoder_dim)
    self.pred = nn.Conv2d(decoder_dim, 2, 1)

  def _encode(self, images, patch_embed, blocks, norm, pos, cls):
    x = patch_embed(images).flatten(2).transpose(1, 2) + pos[:, 1:]
    x = torch.cat([(cls + pos[:, :1]).expand(x.shape[0], -1, -1), x], dim=1)
    for block in blocks:
      x = block(x)
    return norm(x)

  def forward(self, context, exemplars, masks):
    b, n = exemplars.shape[:2]
    with torch.no_grad():
      t = self.target
      context_tokens = self._encode(context, t["patch_embed"], t["blocks"], t["norm"],
                                    self.pos_context, self.cls_token.detach())
    exemplar_tokens = self._encode(exemplars.flatten(0, 1), self.patch_embed, self.blocks,
                                   self.norm, self.pos_exemplar, self.cls_token)
    c = (self.decoder_embed(context_tokens) + self.decoder_pos).repeat_interleave(n, dim=0)
    e = self.decoder_embed(exemplar_tokens)
    c = self.decoder_norm(self.decoder_block(c, e))[:, 1:]
    g = self.context_grid
    logits = self.pred(c.transpose(1, 2).reshape(b * n, -1, g, g))
    logits = F.interpolate(logits, size=self.context_size, mode="bilinear", align_corners=True)
    # Mean over pixels and batch, summed over the N exemplars.
    return F.cross_entropy(logits, masks.flatten(0, 1).long()) * n

  @torch.no_grad()
  def ema_update(self, momentum: float):
    online = [self.patch_embed, self.blocks, self.norm]
    target = [self.target["patch_embed"], self.target["blocks"], self.target["norm"]]
    for o, t in zip(online, target):
      t_params, o_params = list(t.parameters()), list(o.parameters())
      torch._foreach_mul_(t_params, momentum)  # pylint: disable=protected-access
      torch._foreach_add_(t_params, o_params, alpha=1 - momentum)  # pylint: disable=protected-access


def make_step(model: TorchCIM, lr=1e-4, weight_decay=0.05, clip=0.0):
  """One AdamW step + EMA, like ours (decay on >=2-D params only; clip > 0 clips, as our
  optim.grad_clip_norm; the recipe does not clip)."""
  params = [p for p in model.parameters() if p.requires_grad]
  decay = [p for p in params if p.ndim > 1]
  no_decay = [p for p in params if p.ndim <= 1]
  optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=lr, betas=(0.9, 0.95))

  def step(context, exemplars, masks):
    optimizer.zero_grad(set_to_none=True)
    loss = model(context, exemplars, masks)
    loss.backward()
    if clip > 0:
      torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()
    model.ema_update(0.996)
    return loss

  return step
