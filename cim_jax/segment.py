"""Segmentation transfer entry point (docs/METHOD.md section 9): flags -> config -> the trainer.

python -m cim_jax.segment --config=configs/cim_segment.py:B/16 --workdir=DIR \
    --config.init_from=PRETRAIN_WORKDIR_OR_PTH --config.data.root=ADEChallengeData2016

A restart with the same --workdir resumes exactly (state, best mIoU and data iterator).
`--eval_only=true` evaluates the work dir's latest checkpoint. Exit statuses as
`python -m cim_jax.pretrain` (2: a user's mistake; 1: a fault or bug; 130 / 143: SIGINT /
SIGTERM after a checkpoint).
"""

import sys

from cim_jax import cli
from cim_jax.train import segmentation


def main(argv: list[str] | None = None) -> dict:
  return cli.trainer_main(sys.argv[1:] if argv is None else argv, segmentation.segment,
                          default_config="configs/cim_segment.py:B/16", kind="segmentation",
                          prog="cim_jax.segment")


if __name__ == "__main__":
  main()
