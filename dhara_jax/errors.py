"""Errors that the CLI reports as one line with a non-zero exit."""


class DharaError(Exception):
  """A user-facing error: bad input, config or file. The message is the whole report."""


class ConfigError(DharaError, ValueError):
  """A config value is missing, unknown or invalid; the message names the field."""
