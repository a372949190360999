"""Errors lorafx raises for user mistakes. Each message names the site, key or file at fault."""


class LorafxError(Exception):
    """Base class of every error lorafx raises on purpose."""


class SpecError(LorafxError, ValueError):
    """The spec is malformed or does not fit the model (e.g. targets that match nothing)."""


class AdapterFileError(LorafxError, ValueError):
    """An adapter file or directory does not fit the model: missing, unexpected or mis-shaped keys."""


class NotMergeableError(LorafxError, ValueError):
    """The active adapter of a site cannot be folded into the base weight (input-dependent gate, e.g. MoR)."""


class TraceError(LorafxError, RuntimeError):
    """A region or site could not be traced or rewritten."""


class ExportError(LorafxError, RuntimeError):
    """A model or adapter cannot be exported in the requested mode (names the site and the reason)."""
