"""Named exceptions: each message says what went wrong, where, and what to try."""

from __future__ import annotations


class UpcycleError(Exception):
    """Base class of every error `upcycle_fx` raises on purpose."""


class UpcycleConfigError(UpcycleError, ValueError):
    """An argument of `rewrite` / `UpcycleConfig` is out of range or unknown."""


class CaptureError(UpcycleError):
    """A module that holds projection layers could not be captured as an FX graph."""


class NoMLPFoundError(UpcycleError):
    """The model has no FFN that the registered patterns recognise."""


class NoMLPSelectedError(UpcycleError):
    """FFNs were found, but the selection pattern picked none of them."""


class RewriteError(UpcycleError):
    """A selected FFN was found but cannot be replaced by an MoE without changing the model."""


class AlreadyMoEError(UpcycleError):
    """The input is already a Mixture-of-Experts model (Mixtral, Qwen2-MoE, an upcycled model...)."""
