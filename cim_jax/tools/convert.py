r"""Import the authors' PyTorch CIM checkpoints; export encoders as timm state dicts.

    python -m cim_jax.tools.convert import --checkpoint cim_base.pth --variant B/16 \
        --output params.msgpack
    python -m cim_jax.tools.convert export --params params.msgpack --variant B/16 \
        --which target --output vit_b16_cim.safetensors
    python -m cim_jax.tools.convert export --workdir /runs/cim_b16 --variant B/16 \
        --output vit.safetensors
"""

import argparse
import logging
import os
import pickle
from typing import Optional

import jax

from cim_jax import config_validation
from cim_jax import interop
from cim_jax.models import cim
from cim_jax.models import vit
from cim_jax.train import warm_start


# The released model's architecture (decoder, heads) is that of the pre-training recipe.
RECIPE = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "cim_pretrain.py")


def _build_model(variant: str, global_loss: bool, context_size: int, exemplar_size: int):
  config = config_validation.load_config_file(RECIPE)
  config.model.variant = variant
  config.model.global_loss_weight = 1.0 if global_loss else 0.0
  config.data.context_size = context_size
  config.data.exemplar_size = exemplar_size
  return cim.build_model(config.model, config.data)


def main(argv: Optional[list] = None):
  parser = argparse.ArgumentParser(prog="python -m cim_jax.tools.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  imp = sub.add_parser("import", help="authors' .pth -> flax msgpack {params, target_params, "
                                      "model_state}")
  imp.add_argument("--checkpoint", required=True)
  imp.add_argument("--output", required=True)
  exp = sub.add_parser("export", help="encoder -> timm state dict (.safetensors or .pth)")
  src = exp.add_mutually_exclusive_group(required=True)
  src.add_argument("--params", help="msgpack written by `import` (or by cim_jax.interop.save)")
  src.add_argument("--checkpoint", help="an authors' .pth, converted directly")
  src.add_argument("--workdir", help="a pre-training work dir of this project (latest checkpoint)")
  exp.add_argument("--which", choices=("online", "target"), default="online")
  exp.add_argument("--output", required=True)
  for p in (imp, exp):
    p.add_argument("--variant", default="B/16")
    p.add_argument("--global-loss", action="store_true",
                   help="the checkpoint's global-loss heads are imported too")
    p.add_argument("--context-size", type=int, default=160)
    p.add_argument("--exemplar-size", type=int, default=64)
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  model = _build_model(args.variant, args.global_loss, args.context_size, args.exemplar_size)

  if args.command == "import" or args.checkpoint:
    try:
      state_dict = interop.load_torch_state_dict(args.checkpoint)
    except (FileNotFoundError, ValueError, pickle.UnpicklingError) as e:
      message = interop.first_line(e)
      if args.checkpoint not in message:
        message = f"{args.checkpoint}: {message}"
      parser.exit(2, f"error: {message}\n")
    params, target_params, model_state = interop.import_authors_state_dict(state_dict, model)
  elif args.workdir:
    restored = warm_start.load_warm_start(
        args.workdir, model, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    params, target_params = restored["params"], restored["target_params"]
  else:
    restored = interop.load_params(args.params)
    params, target_params = restored["params"], restored["target_params"]
  if args.command == "import":
    interop.save(args.output, params, target_params, model_state)
    print(f"wrote {args.output} ({args.variant}; params, target_params, model_state)")
    return
  encoder = params["encoder"] if args.which == "online" else target_params["encoder"]
  state = interop.encoder_to_timm(encoder, cls_token=params["encoder"]["cls_token"],
                                 pos_embed_grid=model.encoder.pos_embed_grid)
  interop.save_state_dict(state, args.output)
  try:
    target_model = f"timm.create_model({interop.timm_model_name(args.variant)!r}, num_classes=0)"
  except ValueError:
    target_model = f"a timm VisionTransformer({vit.decode_variant(args.variant)})"
  print(f"wrote {args.output}: {args.which} encoder, {len(state)} tensors, loads strictly into "
        f"{target_model}")


if __name__ == "__main__":
  main()
