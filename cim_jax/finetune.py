"""Fine-tuning entry point (docs/METHOD.md §5): flags -> config -> the shared trainer.

python -m cim_jax.finetune --config=configs/cim_finetune.py:B/16 --workdir=DIR \
    --config.init_from=PRETRAIN_WORKDIR_OR_PTH [--config.data.source=imagefolder|tfds ...]

A restart with the same --workdir resumes exactly (state, best top-1 and data iterator).
`--eval_only=true` evaluates the work dir's latest checkpoint. Exit statuses as
`python -m cim_jax.pretrain` (2: a user's mistake; 1: a fault or bug; 130 / 143: SIGINT /
SIGTERM after a checkpoint).
"""

import functools
import sys

from cim_jax import cli
from cim_jax import config_validation
from cim_jax import sharding
from cim_jax.train import finetuning


def main(argv: list[str] | None = None) -> dict:
  argv = sys.argv[1:] if argv is None else argv
  config, flags = cli.parse_or_exit(
      argv, default_config="configs/cim_finetune.py:B/16",
      flags={"workdir": "", "eval_only": "false"}, validate=False, prog="cim_jax.finetune")
  if not flags["workdir"]:
    print("error: --workdir=DIR is required (checkpoints and metrics go there)", file=sys.stderr)
    sys.exit(2)
  sharding.maybe_initialize_distributed()
  cli.exit_on_config_error(config_validation.validate, config, kind="finetuning")
  cli.configure_logging()
  eval_only = flags["eval_only"].lower() in ("1", "true", "yes")
  result = cli.run_training(functools.partial(finetuning.finetune, eval_only=eval_only), config,
                            flags["workdir"], user_errors=cli.USER_ERRORS)
  print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                 for k, v in result.items()))
  return result


if __name__ == "__main__":
  main()
