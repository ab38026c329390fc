"""CIM pre-training entry point: flags -> config -> trainer.

python -m cim_jax.pretrain --config=configs/cim_vit_base.py --workdir=DIR [--config.key=value ...]

A restart with the same --workdir resumes from its last checkpoint.
"""

import logging
import sys

from cim_jax import cli
from cim_jax import config_validation


def _configure_logging() -> None:
  """Our INFO lines on stderr; the libraries' absl INFO chatter (orbax, grain) only as warnings."""
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                      datefmt="%H:%M:%S")
  logging.getLogger("absl").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  # Validation needs the device count, which multi-host runs only know after
  # jax.distributed.initialize(): parse first, initialise, then validate.
  config, flags = cli.parse_or_exit(
      argv, default_config="configs/cim_vit_base.py", flags={"workdir": ""},
      validate=False, prog="cim_jax.pretrain")
  if not flags["workdir"]:
    print("error: --workdir=DIR is required (checkpoints, logs and the report go there)",
          file=sys.stderr)
    sys.exit(2)
  from cim_jax import sharding  # pylint: disable=g-import-not-at-top
  sharding.maybe_initialize_distributed()
  cli.exit_on_config_error(config_validation.validate_pretraining, config)

  _configure_logging()
  from cim_jax.train import loop  # pylint: disable=g-import-not-at-top
  evaluate = None
  if config.eval.pretext_iou or config.eval.knn or config.eval.visualize:
    from cim_jax.evaluate import report  # pylint: disable=g-import-not-at-top
    evaluate = report.evaluate_run
  cli.run_or_exit(loop.train_and_evaluate, config, flags["workdir"], evaluate=evaluate)


if __name__ == "__main__":
  main()
