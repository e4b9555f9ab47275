"""Error types raised by cpe-adapter.

Every user-facing failure is a :class:`CPEAdapterError`, a subclass of :class:`ValueError`, so
callers can catch one type; the message names the problem and the fix.
"""

from __future__ import annotations


class CPEAdapterError(ValueError):
    """Bad input for a cpe-adapter operation (unknown adapter, incompatible file, ...)."""


class IncompatibleAdapterError(CPEAdapterError):
    """The adapter was trained for another text-embedding dimension or layer layout."""


class AdapterFileError(CPEAdapterError):
    """An adapter file is missing, corrupt, unsupported (pickle) or of an unknown format version."""


class ErasureIntegrityError(CPEAdapterError, RuntimeError):
    """An active erasure cannot be applied; generation stops instead of running unerased.

    Raised at generation time (the UNet was changed after the adapters were attached), hence also
    a :class:`RuntimeError`; it is a :class:`CPEAdapterError` like every other failure.
    """
