"""Supervised fine-tuning of a CIM-pretrained ViT-Tiny: the recipe of docs/METHOD.md section 5.

python -m cim_jax.finetune --config=configs/finetune_vit_tiny.py --workdir=DIR \
    --config.init_from=PRETRAIN_WORKDIR_OR_PTH [--config.key=value ...]
"""

from cim_jax import config_defaults


def get_config():
  return config_defaults.finetune_config("tiny")
