"""Shared command-line handling: `--config=FILE[:ARG] --config.key=value --flag=value`.

Config problems end the program with a one-line message and exit status 2, before any jax
compilation, instead of a traceback (absl's config_flags raises deep inside flag parsing).
"""

import functools
import logging
import os
import signal
import sys
import traceback
from typing import Callable

import ml_collections

from cim_jax import config_validation
from cim_jax import sharding
from cim_jax.data import decode
from cim_jax.errors import ConfigError, RunStopped

# What the tools report as the user's mistake (exit 2): also a path that does not exist and an
# image that cannot be decoded.
USER_ERRORS = (ConfigError, FileNotFoundError, decode.UndecodableImage)


class _OneLineLibraryErrors(logging.Filter):
  """Library errors logged with a traceback become one line; an OSError (orbax logs a failed
  background save several times over) is left out: the trainer reports it in one line
  (`error: checkpoint of step N could not be written: ...`)."""

  def filter(self, record: logging.LogRecord) -> bool:
    if not (record.exc_info or record.exc_text):
      return True
    error = record.exc_info[1] if record.exc_info else None
    if isinstance(error, OSError):
      return False
    text = record.getMessage() + (f" ({type(error).__name__}: {error})" if error else "")
    record.msg, record.args = text.splitlines()[0] if text else text, None
    record.exc_info, record.exc_text, record.stack_info = None, None, None
    return True


def configure_logging() -> None:
  """Our INFO lines on stderr; the libraries' absl INFO chatter (orbax, grain) only as warnings."""
  # force: replaces a handler a library installed on import (ours are INFO, with a time stamp).
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                      datefmt="%H:%M:%S", force=True)
  logging.getLogger("absl").setLevel(logging.WARNING)
  logging.getLogger("jax").setLevel(logging.WARNING)  # e.g. which backends failed to start
  logging.getLogger("absl").addFilter(_OneLineLibraryErrors())


def parse(argv: list[str], *, default_config: str, flags: dict[str, str] | None = None,
          validate: bool = True, kind: str | None = None
          ) -> tuple[ml_collections.ConfigDict, dict[str, str]]:
  """Returns (config, flags) from argv; flags maps each `--name=value` to its string value.

  `--config=FILE:ARG` calls the file's `get_config(ARG)`; `kind` is the kind of config expected
  (see `config_validation.validate`).
  """
  flags = dict(flags or {})
  config_path = default_config
  overrides = []
  for arg in argv:
    if not arg.startswith("--") or "=" not in arg:
      raise ConfigError(f"arguments look like --name=value, got {arg!r}")
    name, value = arg[2:].split("=", 1)
    if name == "config":
      config_path = value
    elif name.startswith("config."):
      overrides.append((name[len("config."):], value))
    elif name in flags:
      flags[name] = value
    else:
      known = ", ".join(["--config", "--config.<key>"] + [f"--{f}" for f in flags])
      raise ConfigError(f"unknown flag --{name}; known flags: {known}")
  config = config_validation.load_config_file(config_path)
  for key, value in overrides:
    config_validation.apply_override(config, key, value)
  if validate:
    config_validation.validate(config, kind=kind)
  return config, flags


def parse_or_exit(argv, **kwargs):
  """`parse`, printing a ConfigError as one line and exiting with status 2."""
  if any(a in ("-h", "--help") for a in argv):
    print(f"usage: python -m {kwargs.get('prog', 'cim_jax...')} --config=FILE[:ARG] "
          "[--config.key=value ...] " + " ".join(f"[--{f}=...]" for f in kwargs.get("flags", {})))
    sys.exit(0)
  kwargs.pop("prog", None)
  return exit_on_config_error(parse, argv, **kwargs)


def exit_on_config_error(fn, *args, **kwargs):
  """Calls fn, turning a ConfigError into a one-line message and exit status 2."""
  try:
    return fn(*args, **kwargs)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def describe_failure(error: BaseException) -> str:
  """'Type: message (raised at file:line in function[, from cim_jax file:line])': one line."""
  frames = traceback.extract_tb(error.__traceback__)
  message = str(error).strip().splitlines()
  text = f"{type(error).__name__}: {message[0] if message else '(no message)'}"
  if frames:
    last = frames[-1]
    text += f" (raised at {last.filename}:{last.lineno} in {last.name}"
    package = os.path.dirname(os.path.abspath(__file__))
    ours = [f for f in frames if os.path.abspath(f.filename).startswith(package + os.sep)]
    if ours and ours[-1] is not last:
      text += f", called from {ours[-1].filename}:{ours[-1].lineno} in {ours[-1].name}"
    text += ")"
  return text


def run_or_exit(fn, *args, user_errors=(ConfigError,), **kwargs):
  """Calls fn: a ConfigError (a user's mistake; or one of `user_errors`) ends the program with
  `error: ...` and status 2; a RunStopped with `error: ...` and its exit_status; any other
  exception is an internal failure: `internal error: Type:
  message (raised at file:line ...)`, then the traceback for a bug report, and status 1."""
  try:
    return fn(*args, **kwargs)
  except user_errors as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except RunStopped as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(e.exit_status)
  except Exception as e:  # pylint: disable=broad-except
    print(f"internal error: {describe_failure(e)}", file=sys.stderr)
    print("traceback (include it in a bug report):", file=sys.stderr)
    traceback.print_exception(e, file=sys.stderr)
    print(f"internal error: {describe_failure(e)}", file=sys.stderr)
    sys.stderr.flush()
    sys.exit(1)


def run_training(fn, config, workdir: str, **kwargs) -> dict:
  """`run_or_exit(fn, config, workdir)` for a trainer: a run stopped by SIGINT / SIGTERM after
  its checkpoint (result['signal']), or a Ctrl-C outside the steps, exits with 128 + signal."""
  try:
    result = run_or_exit(fn, config, workdir, **kwargs)
  except KeyboardInterrupt:  # start-up, compilation, evaluation, or a second Ctrl-C
    print(f"error: interrupted; {workdir} keeps its last finished checkpoint", file=sys.stderr)
    sys.exit(128 + signal.SIGINT)
  if result.get("signal"):
    print(f"stopped by {signal.Signals(result['signal']).name}: checkpoint of step "
          f"{result['step']} written; the same command resumes from it", file=sys.stderr)
    sys.exit(128 + result["signal"])
  return result


def run_tool(main: Callable, *, prog: str, default_config: str,
             flags: dict[str, str] | None = None, kind: str | None = None):
  """Entry point in the style of pre-training: `--config=FILE --config.key=value [--flag=...]`.

  Calls `main(config, **flags)`, after validating a config of `kind` when given. The user's
  mistakes (a ConfigError, a path that does not exist, an image that cannot be decoded) end the
  program with `error: ...` and status 2; anything else is an internal failure, named with where
  it was raised, status 1 (see run_or_exit).
  """
  config, flag_values = parse_or_exit(sys.argv[1:], default_config=default_config,
                                      flags=dict(flags or {}), validate=kind is not None,
                                      kind=kind, prog=prog)
  return run_or_exit(main, config, **flag_values, user_errors=USER_ERRORS)


def trainer_main(argv: list[str], train: Callable, *, default_config: str, kind: str,
                 prog: str) -> dict:
  """A trainer's entry point: `--config=FILE[:ARG] --workdir=DIR [--eval_only=true]` -> config
  checked as `kind` -> `train(config, workdir, eval_only=...)` -> one line of its results."""
  config, flags = parse_or_exit(argv, default_config=default_config,
                                flags={"workdir": "", "eval_only": "false"}, validate=False,
                                prog=prog)
  if not flags["workdir"]:
    print("error: --workdir=DIR is required (checkpoints and metrics go there)", file=sys.stderr)
    sys.exit(2)
  sharding.maybe_initialize_distributed()
  exit_on_config_error(config_validation.validate, config, kind=kind)
  configure_logging()
  eval_only = flags["eval_only"].lower() in ("1", "true", "yes")
  result = run_training(functools.partial(train, eval_only=eval_only), config, flags["workdir"],
                        user_errors=USER_ERRORS)
  print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                 for k, v in result.items()))
  return result
