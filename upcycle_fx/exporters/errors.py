"""Named errors of the checkpoint exporters: each says which file or field, and what to do."""

from __future__ import annotations

from ..errors import UpcycleError


class CheckpointError(UpcycleError):
    """A checkpoint could not be read or written."""


class MissingShardError(CheckpointError, FileNotFoundError):
    """A weight file the checkpoint refers to (or needs) is not there."""


class TruncatedShardError(CheckpointError):
    """A safetensors file is shorter than its own header says (an interrupted copy or download)."""


class CheckpointMismatchError(CheckpointError):
    """The weights do not fit the model they are meant for (config, skeleton or manifest)."""


class OutputExistsError(CheckpointError, FileExistsError):
    """The output directory already holds a model (or other files)."""


class HFFormatError(CheckpointError):
    """The upcycled model cannot be written exactly in a stock Hugging Face MoE architecture."""


class NotACheckpointError(CheckpointError):
    """`load` was given a path that is not a native checkpoint (missing, a file, an empty or a
    Hugging Face directory)."""


class ManifestError(CheckpointError):
    """`upcycle_fx.json` or a safetensors index is damaged: not JSON, another structure, a wrong
    type, a missing or unknown key, or a value this version does not know."""


class CheckpointDtypeError(CheckpointMismatchError):
    """A stored tensor's dtype cannot be the saved model's (an integer where the model has floats,
    or a floating-point type foreign to the rest of the checkpoint)."""


class CheckpointWriteError(CheckpointError, OSError):
    """The output could not be written (full disk, no permission, read-only file system, a path
    under a file); the partial output was removed and an existing model left as it was."""


class ShardSizeError(CheckpointError, ValueError):
    """`max_shard_size` is not a positive size ("2GB", "500MB" or a number of bytes)."""


class OutputOverlapsInputError(CheckpointError, ValueError):
    """The output directory is an input directory, inside one, or contains one."""


class TerminatedDuringWriteError(CheckpointError):
    """SIGTERM arrived while a checkpoint was being written; the partial output was removed."""


class InterruptedReplaceError(CheckpointError):
    """A process that was replacing a model died between its two renames: the target is missing
    and the previous model waits, complete, in a hidden directory beside it."""


class LeftoverOutputWarning(UserWarning):
    """A hidden directory left by a killed writer was removed, or a model it had moved aside was
    put back."""
