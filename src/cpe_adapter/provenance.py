"""Provenance checks: are these the weights the config says, trained for the base model expected?

``save_pretrained`` records ``weights_sha256`` (:meth:`CPEAdapter.digest`, a SHA-256 over every
tensor's name, shape, dtype and fp32 bytes) and ``library_version`` in the config. An eraser is a
safety control, so a user who takes one from a stranger wants to know that its weights are the
ones its card describes and that it was trained for their base model; :func:`verify_adapter`
answers with a list of warnings (empty when everything checks out).
"""

from __future__ import annotations

import os
from typing import Any

from .adapter import CPEAdapter


def verify_adapter(
    folder_or_adapter: CPEAdapter | str | os.PathLike,
    base_model: str | None = None,
    **hub_kwargs: Any,
) -> list[str]:
    """Warnings about an adapter's provenance; an empty list means every check passed.

    Args:
        folder_or_adapter: a :class:`CPEAdapter`, or anything :meth:`CPEAdapter.from_pretrained`
            accepts (folder, ``.safetensors`` file, Hub repo id). A file that cannot be read raises
            :class:`~cpe_adapter.errors.CPEAdapterError`, as loading does.
        base_model: the model the adapter is meant for (Hub id or path); when given, it must equal
            the ``base_model`` recorded in the config.
        hub_kwargs: ``revision``, ``subfolder``, ``token``... passed on to the loader.

    Checks: the recomputed weight hash equals the recorded ``weights_sha256`` (weights changed
    after saving, or a config copied beside other weights, fail it); a hash and the writing
    ``library_version`` are recorded at all; the recorded base model matches ``base_model``.
    """
    if isinstance(folder_or_adapter, CPEAdapter):
        adapter = folder_or_adapter
    else:
        adapter = CPEAdapter.from_pretrained(folder_or_adapter, **hub_kwargs)
    config = adapter.config
    warnings: list[str] = []
    if config.weights_sha256 is None:
        warnings.append(
            "No weights_sha256 is recorded, so the weights cannot be checked against the config; "
            "save the adapter with save_pretrained to record one."
        )
    else:
        actual = adapter.digest()
        if actual != config.weights_sha256:
            warnings.append(
                f"The weights do not match the recorded weights_sha256 (recorded {config.weights_sha256[:16]}..., "
                f"computed {actual[:16]}...): they were changed after saving. Do not trust this adapter's "
                "description of what it erases; get it again from its publisher."
            )
    if config.library_version is None:
        warnings.append("No library_version is recorded: the files were not written by cpe-adapter's save_pretrained.")
    if base_model is not None:
        if config.base_model is None:
            warnings.append(
                f"The adapter does not record its base model, so it cannot be confirmed for {base_model!r}."
            )
        elif config.base_model != base_model:
            warnings.append(
                f"The adapter was trained for base model {config.base_model!r}, not {base_model!r}: its erasure is "
                "tuned to that model's cross-attention and may be weaker or off-target here."
            )
    return warnings
