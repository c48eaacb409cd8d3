"""The errors a user can fix. Each names the key, file or row at fault; the command line prints
the message on one line and exits 2 (`USER_ERRORS`). Control flow tests the type, never the text."""
from __future__ import annotations


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged, of another format or unsafe; the message names the file."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint holds more than tensors and plain types: it is refused, never skipped over."""


class ShardError(RuntimeError):
    """A shard set is missing, damaged or disagrees with its manifest; the message names the file."""


class BadInputError(ValueError):
    """An input row or image cannot be used; the message names the row and file."""


class OutputError(OSError):
    """An output cannot be written (read-only, full disk, not a folder); the message names the path."""


class RunLockedError(OutputError):
    """Another live process is writing the run directory; the message names its host and PID."""


class PluginError(ConfigError):
    """A plug-in named in `plugins` or the `mclfir_dist.plugins` entry points does not import."""


class WorkerDiedError(RuntimeError):
    """A data loader worker died mid-run (the out-of-memory killer's SIGKILL, most often); the message names
    its PID, how it died and the checkpoint a `--resume` continues from. Not a user error: exit 1."""


class OtherModelWarning(UserWarning):
    """An index searched with allow_other_model may hold another model's vectors; `mclfir search` reports
    only this warning as a model mismatch (a library's DeprecationWarning is not one)."""


USER_ERRORS = (ConfigError, CheckpointError, ShardError, BadInputError, OutputError, FileNotFoundError)
