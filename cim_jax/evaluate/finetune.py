"""Moved: fine-tuning runs as `python -m cim_jax.finetune` (same flags)."""

import sys

if __name__ == "__main__":
  sys.exit("error: python -m cim_jax.evaluate.finetune moved to python -m cim_jax.finetune "
           "(same flags)")
