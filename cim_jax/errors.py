"""The two kinds of error every entry point turns into one `error: ...` line (see `cim_jax.cli`)."""


class ConfigError(ValueError):
  """A config file, override, value or path that cannot be used; the message names it (exit 2)."""


class RunStopped(Exception):
  """A run stopped by a fault it detected, not a bug (a non-finite loss, a checkpoint that could
  not be written): the entry point prints `error: <message>` and exits with `exit_status`."""
  exit_status = 1
