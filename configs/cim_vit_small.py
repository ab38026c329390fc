"""CIM pre-training of ViT-Small: the recipe of docs/METHOD.md section 4.

python -m cim_jax.pretrain --config=configs/cim_vit_small.py --workdir=DIR [--config.key=value ...]
"""

from cim_jax import config_defaults


def get_config():
  return config_defaults.pretrain_config("small")
