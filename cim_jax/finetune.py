"""Fine-tuning entry point (docs/METHOD.md §5): flags -> config -> the shared trainer.

python -m cim_jax.finetune --config=configs/cim_finetune.py:B/16 --workdir=DIR \
    --config.init_from=PRETRAIN_WORKDIR_OR_PTH [--config.data.source=imagefolder|tfds ...]

A restart with the same --workdir resumes exactly (state, best top-1 and data iterator).
`--eval_only=true` evaluates the work dir's latest checkpoint. Exit statuses as
`python -m cim_jax.pretrain` (2: a user's mistake; 1: a fault or bug; 130 / 143: SIGINT /
SIGTERM after a checkpoint).
"""

import sys

from cim_jax import cli
from cim_jax.train import finetuning


def main(argv: list[str] | None = None) -> dict:
  return cli.trainer_main(sys.argv[1:] if argv is None else argv, finetuning.finetune,
                          default_config="configs/cim_finetune.py:B/16", kind="finetuning",
                          prog="cim_jax.finetune")


if __name__ == "__main__":
  main()
