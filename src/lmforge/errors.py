"""The error types. A user mistake raises an `LmforgeError`; the CLI prints its message on one line
and exits with code 2. Anything else escaping to the CLI is a bug and keeps its traceback."""


class LmforgeError(Exception):
    """A mistake the user can fix: bad path, bad file, bad value. The message names the culprit."""


class ConfigError(LmforgeError):
    """A configuration key or value is wrong (unknown key, bad type, inconsistent sizes)."""


class DataError(LmforgeError):
    """An input file is missing, empty, undecodable or malformed."""


class CheckpointError(LmforgeError):
    """A run or checkpoint directory is missing pieces or does not match the requested model."""
