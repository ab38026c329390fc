"""CIM pre-training entry point: flags -> config -> trainer.

python -m cim_jax.pretrain --config=configs/cim_pretrain.py:B/16 --workdir=DIR \
    [--config.key=value ...]

A restart with the same --workdir resumes from its last checkpoint.

Exit status: 0 done; 2 a user's mistake (config, a data / init_from / work dir path, unreadable
data), one `error: ...` line, before anything is compiled where it can be checked up front;
1 the run stopped on a fault it detected (a non-finite loss, a checkpoint that could not be
written: one `error: ...` line naming the step and the last good checkpoint) or an internal
error (`internal error: ...` and a traceback); 130 / 143 stopped by SIGINT (Ctrl-C) / SIGTERM
after writing a checkpoint at the current step (a second Ctrl-C stops at once, without one).
"""

import functools
import sys

from cim_jax import cli
from cim_jax import config_validation
from cim_jax import sharding
from cim_jax.evaluate import report
from cim_jax.train import loop
from cim_jax.train import preflight


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  # Validation needs the device count, which multi-host runs only know after
  # jax.distributed.initialize(): parse first, initialise, then validate.
  config, flags = cli.parse_or_exit(
      argv, default_config="configs/cim_pretrain.py:B/16", flags={"workdir": ""},
      validate=False, prog="cim_jax.pretrain")
  if not flags["workdir"]:
    print("error: --workdir=DIR is required (checkpoints, logs and the report go there)",
          file=sys.stderr)
    sys.exit(2)
  sharding.maybe_initialize_distributed()
  cli.exit_on_config_error(config_validation.validate, config, kind="pretraining")
  cli.configure_logging()
  cli.exit_on_config_error(preflight.check_pretraining, config, flags["workdir"])

  evaluate = None
  if config.eval.pretext_iou or config.eval.knn or config.eval.visualize:
    evaluate = report.evaluate_run
  cli.run_training(functools.partial(loop.train_and_evaluate, evaluate=evaluate), config,
                   flags["workdir"])


if __name__ == "__main__":
  main()
