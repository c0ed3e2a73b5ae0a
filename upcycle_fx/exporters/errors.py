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
