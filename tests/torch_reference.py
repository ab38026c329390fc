"""The authors' CIM forward pass restated in PyTorch from a state dict in their layout.

Shared by the interop tests (imported checkpoints reproduce the authors' logits) and the release
parity tests (training trajectories against a PyTorch restatement of the release's recipe).
Import it after `pytest.importorskip("torch")`.
"""

import math

import numpy as np
import torch

from cim_jax.models import cim
from train_fixtures import recipe

F = torch.nn.functional

WIDTH, DEPTH, HEADS, PATCH = 32, 2, 2, 16
DEC_DIM, DEC_HEADS, CONTEXT, EXEMPLAR, NUM = 32, 4, 64, 32, 2


def tiny_config(global_loss=False):
  """A pre-training config with this module's sizes (encoder sizes go to `model`)."""
  config = recipe()
  config.model.update(decoder_dim=DEC_DIM, decoder_heads=DEC_HEADS, projector_hidden_dim=16,
                      projector_dim=8, global_loss_weight=1.0 if global_loss else 0.0)
  config.data.update(context_size=CONTEXT, exemplar_size=EXEMPLAR, num_exemplars=NUM)
  return config


def model(global_loss=False, config=None):
  """The CIMModel of `config` (default `tiny_config(global_loss)`), WIDTH x DEPTH x HEADS."""
  config = tiny_config(global_loss) if config is None else config
  return cim.build_model(config.model, config.data, width=WIDTH, depth=DEPTH, num_heads=HEADS)


def authors_state_dict(global_loss=True, seed=0):
  """Random tensors in the authors' layout (docs/METHOD.md), built from the layout, not our code."""
  g = torch.Generator().manual_seed(seed)
  rand = lambda *shape: 0.2 * torch.randn(*shape, generator=g)
  sd = {"cls_token": rand(1, 1, WIDTH)}
  sd["pos_embed"] = torch.from_numpy(sincos(WIDTH, 14))
  sd["decoder_pos_embed"] = torch.from_numpy(sincos(DEC_DIM, CONTEXT // PATCH))
  for s in ("", "_c"):
    sd[f"patch_embed{s}.proj.weight"] = rand(WIDTH, 3, PATCH, PATCH)
    sd[f"patch_embed{s}.proj.bias"] = rand(WIDTH)
    for i in range(DEPTH):
      b = f"blocks{s}.{i}"
      linears = {"attn.qkv": (3 * WIDTH, WIDTH), "attn.proj": (WIDTH, WIDTH),
                 "mlp.fc1": (4 * WIDTH, WIDTH), "mlp.fc2": (WIDTH, 4 * WIDTH)}
      for name, (out, inp) in linears.items():
        sd[f"{b}.{name}.weight"], sd[f"{b}.{name}.bias"] = rand(out, inp), rand(out)
      for norm in ("norm1", "norm2"):
        sd[f"{b}.{norm}.weight"], sd[f"{b}.{norm}.bias"] = 1 + rand(WIDTH), rand(WIDTH)
    sd[f"norm{s}.weight"], sd[f"norm{s}.bias"] = 1 + rand(WIDTH), rand(WIDTH)
  d = "decoder_corr_block.block"
  linears = {"decoder_embed": (DEC_DIM, WIDTH), f"{d}.attn.q": (DEC_DIM, DEC_DIM),
             f"{d}.attn.kv": (2 * DEC_DIM, DEC_DIM), f"{d}.attn.proj": (DEC_DIM, DEC_DIM),
             f"{d}.mlp.fc1": (4 * DEC_DIM, DEC_DIM), f"{d}.mlp.fc2": (DEC_DIM, 4 * DEC_DIM)}
  for name, (out, inp) in linears.items():
    sd[f"{name}.weight"], sd[f"{name}.bias"] = rand(out, inp), rand(out)
  for norm in (f"{d}.norm1", f"{d}.norm2", "decoder_norm"):
    sd[f"{norm}.weight"], sd[f"{norm}.bias"] = 1 + rand(DEC_DIM), rand(DEC_DIM)
  sd["decoder_pred_mask.0.weight"], sd["decoder_pred_mask.0.bias"] = rand(2, DEC_DIM, 1, 1), rand(2)
  if global_loss:
    for prefix, dims in [("decoder_g_embed", (WIDTH, 16, 16, 8)),
                         ("decoder_g_embed_c", (WIDTH, 16, 16, 8)),
                         ("decoder_predictor", (8, 16, 8))]:
      for layer in range(len(dims) - 1):
        sd[f"{prefix}.{3 * layer}.weight"] = rand(dims[layer + 1], dims[layer])
        bn = f"{prefix}.{3 * layer + 1}"
        if layer < len(dims) - 2:
          sd[f"{bn}.weight"], sd[f"{bn}.bias"] = 1 + rand(dims[layer + 1]), rand(dims[layer + 1])
        sd[f"{bn}.running_mean"] = rand(dims[layer + 1])
        sd[f"{bn}.running_var"] = 1 + rand(dims[layer + 1]).abs()
        sd[f"{bn}.num_batches_tracked"] = torch.tensor(7)
  return sd


def sincos(dim, grid):
  """MAE's get_2d_sincos_pos_embed(dim, grid, cls_token=True), written out independently."""
  coords = np.arange(grid, dtype=np.float64)
  gw, gh = np.meshgrid(coords, coords)
  omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))

  def emb(pos):
    out = np.outer(pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], 1)

  table = np.concatenate([emb(gw), emb(gh)], 1)
  return np.concatenate([np.zeros((1, dim)), table])[None].astype(np.float32)


# ----------------------------------------------------------------------------------------------
# The authors' forward pass, by hand in torch (their models_cim.py semantics).

def linear(sd, name, x):
  return F.linear(x, sd[f"{name}.weight"], sd[f"{name}.bias"])


def norm(sd, name, x):
  return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-6)


def attention(q, k, v, heads):
  split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)
  q, k, v = split(q), split(k), split(v)
  attn = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)
  return (attn @ v).transpose(1, 2).flatten(2)


def mlp(sd, name, x):
  return linear(sd, f"{name}.fc2", F.gelu(linear(sd, f"{name}.fc1", x)))


def torch_encoder(sd, images, suffix):
  x = F.conv2d(images, sd[f"patch_embed{suffix}.proj.weight"], sd[f"patch_embed{suffix}.proj.bias"],
               stride=PATCH).flatten(2).transpose(1, 2)
  x = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), x], 1)
  grid = images.shape[-1] // PATCH
  pos = sd["pos_embed"]
  if grid != 14:  # authors' interpolate_pos_encoding
    patches = pos[:, 1:].reshape(1, 14, 14, WIDTH).permute(0, 3, 1, 2)
    scale = (grid + 0.1) / 14
    patches = F.interpolate(patches, scale_factor=(scale, scale), mode="bicubic")
    pos = torch.cat([pos[:, :1], patches.permute(0, 2, 3, 1).reshape(1, -1, WIDTH)], 1)
  x = x + pos
  for i in range(DEPTH):
    b = f"blocks{suffix}.{i}"
    qkv = linear(sd, f"{b}.attn.qkv", norm(sd, f"{b}.norm1", x))
    x = x + linear(sd, f"{b}.attn.proj", attention(*qkv.chunk(3, -1), HEADS))
    x = x + mlp(sd, f"{b}.mlp", norm(sd, f"{b}.norm2", x))
  return norm(sd, f"norm{suffix}", x)


def torch_correlation_logits(sd, context, exemplars):
  """(B, N, C, C, 2) logits; the target (context) encoder runs without gradient, as the authors'
  forward_encoder, so the shared cls token gets gradient only through the exemplars."""
  with torch.no_grad():
    x = torch_encoder(sd, context, "_c")
  x = linear(sd, "decoder_embed", x) + sd["decoder_pos_embed"]
  d = "decoder_corr_block.block"
  preds = []
  for t in exemplars:
    t = linear(sd, "decoder_embed", torch_encoder(sd, t, ""))
    xn, tn = norm(sd, f"{d}.norm1", x), norm(sd, f"{d}.norm1", t)
    k, v = linear(sd, f"{d}.attn.kv", tn).chunk(2, -1)
    y = x + linear(sd, f"{d}.attn.proj",
                    attention(linear(sd, f"{d}.attn.q", xn), k, v, DEC_HEADS))
    y = y + mlp(sd, f"{d}.mlp", norm(sd, f"{d}.norm2", y))
    y = norm(sd, "decoder_norm", y)[:, 1:]
    grid = math.isqrt(y.shape[1])
    m = y.reshape(-1, grid, grid, DEC_DIM).permute(0, 3, 1, 2)
    m = F.conv2d(m, sd["decoder_pred_mask.0.weight"], sd["decoder_pred_mask.0.bias"])
    preds.append(F.interpolate(m, size=(CONTEXT, CONTEXT), mode="bilinear", align_corners=True))
  return torch.stack(preds, 1).permute(0, 1, 3, 4, 2)  # (B, N, C, C, 2)


