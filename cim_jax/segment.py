"""Segmentation transfer entry point (docs/METHOD.md section 9): flags -> config -> the trainer.

python -m cim_jax.segment --config=configs/cim_segment.py:B/16 --workdir=DIR \
    --config.init_from=PRETRAIN_WORKDIR_OR_PTH --config.data.root=ADEChallengeData2016

A restart with the same --workdir resumes exactly (state, best mIoU and data iterator).
`--eval_only=true` evaluates the work dir's latest checkpoint. Exit statuses as
`python -m cim_jax.pretrain` (2: a user's mistake; 1: a fault or bug; 130 / 143: SIGINT /
SIGTERM after a checkpoint).
"""

import functools
import sys

from cim_jax import cli
from cim_jax import config_validation
from cim_jax import sharding
from cim_jax.train import segmentation


def main(argv: list[str] | None = None) -> dict:
  argv = sys.argv[1:] if argv is None else argv
  config, flags = cli.parse_or_exit(
      argv, default_config="configs/cim_segment.py:B/16",
      flags={"workdir": "", "eval_only": "false"}, validate=False, prog="cim_jax.segment")
  if not flags["workdir"]:
    print("error: --workdir=DIR is required (checkpoints and metrics go there)", file=sys.stderr)
    sys.exit(2)
  sharding.maybe_initialize_distributed()
  cli.exit_on_config_error(config_validation.validate, config, kind="segmentation")
  cli.configure_logging()
  eval_only = flags["eval_only"].lower() in ("1", "true", "yes")
  result = cli.run_training(functools.partial(segmentation.segment, eval_only=eval_only), config,
                            flags["workdir"], user_errors=cli.USER_ERRORS)
  print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                 for k, v in result.items()))
  return result


if __name__ == "__main__":
  main()
