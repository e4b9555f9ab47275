"""`CPEConfig`: everything needed to rebuild, check and describe one CPE adapter.

Modelled on PEFT's configs: a dataclass whose fields are documented, serialised to
``cpe_config.json`` and into the safetensors header. Unknown keys written by newer versions are
ignored with a warning; a newer ``format_version`` than this package understands is refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import AdapterFileError, CPEAdapterError

_PACKAGE = __name__.partition(".")[0]

CONFIG_NAME = "cpe_config.json"
WEIGHTS_NAME = "cpe_adapter.safetensors"
METADATA_KEY = "cpe_adapter_metadata"
FORMAT_VERSION = 1
# Refuse configs that would allocate more than this many parameters (8 GB in fp32): a hostile or
# corrupt file must not be able to exhaust memory before its weights are checked.
MAX_PARAMETERS = 2_000_000_000
# The largest cpe_config.json read; real configs are a few kB, even with thousands of layers.
MAX_CONFIG_BYTES = 16 * 1024 * 1024
# Deepest nesting of lists and objects a config may have (real ones: 4, in ``training``).
MAX_CONFIG_DEPTH = 32
# Largest residual scale factor ``alpha`` accepted (real ones: 1 to a few times the rank).
MAX_ALPHA = 1e6


def _depth(data: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0), without recursion."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, level = stack.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
        if children is not None:
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in children)
    return deepest


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """An ``int`` or ``float`` (``bool`` is no number here) that is neither infinite nor NaN."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class ConceptSpec:
    """One erased concept.

    Attributes:
        name: the concept as users write it ("Van Gogh").
        neutral: the phrase it is mapped toward ("real photograph", "a person").
        eta: over-shoot of the erase target, ``(1 + eta) P(E_n) - eta P(E_t)`` (docs/training.md).
    """

    name: str
    neutral: str
    eta: float = 0.3

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConceptSpec:
        if not isinstance(data, dict):
            raise CPEAdapterError(f"Each CPEConfig.concepts entry must be an object, got {data!r:.80}.")
        return cls(**_known_keys(cls, data, "a CPEConfig concept"))

    def validate(self) -> None:
        """Names are non-empty strings and ``eta`` a finite number; raises :class:`CPEAdapterError`."""
        if not isinstance(self.name, str) or not self.name.strip():
            raise CPEAdapterError(f"A concept name must be a non-empty string, got {self.name!r:.80}.")
        if not isinstance(self.neutral, str):
            raise CPEAdapterError(f"The neutral phrase of {self.name!r} must be a string, got {self.neutral!r:.80}.")
        for text in (self.name, self.neutral):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:
                raise CPEAdapterError(f"Concept text {text!r:.80} is not valid Unicode ({err.reason}).") from err
        if not is_finite_number(self.eta):
            raise CPEAdapterError(f"eta of concept {self.name!r} must be a finite number, got {self.eta!r:.80}.")


def _known_keys(cls: type, data: dict[str, Any], what: str) -> dict[str, Any]:
    """The entries of ``data`` that are fields of ``cls``; the others (written by a newer version) are
    dropped with a warning, so that an older version still loads the file."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        message = f"Ignoring unknown keys of {what} (written by a newer version?): {unknown[:10]}"
        warnings.warn(message, stacklevel=_caller_stacklevel())
    return {k: v for k, v in data.items() if k in known}


def config_json(data: dict[str, Any]) -> str:
    """``data`` as the text of ``cpe_config.json`` (sorted keys, UTF-8 as it is)."""
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False)


def _caller_stacklevel() -> int:
    """The ``stacklevel`` of a warning issued by this function's caller that names the first frame
    outside this package (dataclass-generated ``__init__`` frames count as inside): the user's line,
    whichever library path led to the warning."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] == _PACKAGE:
        level, frame = level + 1, frame.f_back
    return level


@dataclass
class TargetLayer:
    """One wrapped projection: its path relative to the denoiser and its dimensions."""

    name: str
    in_features: int
    out_features: int

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TargetLayer:
        if not isinstance(data, dict):
            raise CPEAdapterError(f"Each CPEConfig.target_layers entry must be an object, got {data!r:.80}.")
        known = _known_keys(cls, data, "a CPEConfig target layer")
        return cls(name=known["name"], in_features=known["in_features"], out_features=known["out_features"])

    def validate(self) -> None:
        """A non-empty string name and positive integer dimensions; raises :class:`CPEAdapterError`."""
        if not isinstance(self.name, str) or not self.name:
            raise CPEAdapterError(f"A target layer name must be a non-empty string, got {self.name!r:.80}.")
        for key in ("in_features", "out_features"):
            value = getattr(self, key)
            if not _is_int(value) or not 0 < value <= 1_000_000:
                raise CPEAdapterError(
                    f"Target layer {self.name!r:.120} has {key}={value!r:.40}; expected a positive integer."
                )


@dataclass
class CPEConfig:
    """Configuration of a CPE adapter (one or more erased concepts stacked on a concept axis).

    Attributes:
        concepts: the erased concepts, in the order of the weights' concept axis.
        text_embed_dim: dimension ``d`` of the text embedding the gate reads (768 for SD 1.x).
        target_layers: the wrapped ``attn2.to_k`` / ``attn2.to_v`` projections, in weight order.
        gate_rank: ``m``, the rank of the token-mixing matrices ``A_c`` and ``B_c``.
        residual_rank: ``r``, the rank of each per-layer residual ``D_l U_l``.
        alpha: residual strength; the residual is scaled by ``alpha / residual_rank``.
        tie_gate_qk: use ``A_c`` for both sides of the token mixing, as the paper's released
            checkpoints do (``B_c`` is then ignored).
        name: default adapter name when loaded without ``adapter_name``.
        base_model: Hub id or path of the model the adapter was trained on.
        base_model_revision: revision (commit) of ``base_model`` when known.
        preset: training preset ("names", "styles", "explicit") or ``None``.
        training: training hyper-parameters (free-form, recorded for provenance).
        evaluation: evaluation figures recorded at save time (free-form).
        library_version: version of cpe-adapter that wrote the file.
        weights_sha256: content hash of the weights (see :func:`cpe_adapter.adapter.weights_digest`).
        format_version: version of the file format; loading refuses newer versions.
    """

    concepts: list[ConceptSpec] = field(default_factory=list)
    text_embed_dim: int = 768
    target_layers: list[TargetLayer] = field(default_factory=list)
    gate_rank: int = 16
    residual_rank: int = 1
    alpha: float = 1.0
    tie_gate_qk: bool = False
    name: str | None = None
    base_model: str | None = None
    base_model_revision: str | None = None
    preset: str | None = None
    training: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    library_version: str | None = None
    weights_sha256: str | None = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.concepts, (list, tuple)) or not isinstance(self.target_layers, (list, tuple)):
            raise CPEAdapterError("CPEConfig.concepts and CPEConfig.target_layers must be lists.")
        self.concepts = [c if isinstance(c, ConceptSpec) else ConceptSpec.from_dict(c) for c in self.concepts]
        self.target_layers = [t if isinstance(t, TargetLayer) else TargetLayer.from_dict(t) for t in self.target_layers]
        self.validate()

    @property
    def num_concepts(self) -> int:
        return len(self.concepts)

    @property
    def concept_names(self) -> list[str]:
        return [c.name for c in self.concepts]

    @property
    def layer_names(self) -> list[str]:
        return [t.name for t in self.target_layers]

    def validate(self) -> None:
        """Check that the numbers make sense; raises :class:`CPEAdapterError` naming the field."""
        for key in ("text_embed_dim", "gate_rank", "residual_rank"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= 1_000_000:
                raise CPEAdapterError(f"CPEConfig.{key} must be a positive integer, got {value!r:.40}.")
        if not is_finite_number(self.alpha) or not 0 < self.alpha <= MAX_ALPHA:
            raise CPEAdapterError(
                f"CPEConfig.alpha must be a positive number up to {MAX_ALPHA:g} (it scales the residual), "
                f"got {self.alpha!r:.80}."
            )
        if not isinstance(self.tie_gate_qk, bool):
            raise CPEAdapterError(f"CPEConfig.tie_gate_qk must be true or false, got {self.tie_gate_qk!r:.80}.")
        for key in ("name", "base_model", "base_model_revision", "preset", "library_version", "weights_sha256"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, str):
                raise CPEAdapterError(f"CPEConfig.{key} must be a string or null, got {value!r:.80}.")
        for key in ("training", "evaluation"):
            if not isinstance(getattr(self, key), dict):
                raise CPEAdapterError(f"CPEConfig.{key} must be a JSON object, got {getattr(self, key)!r:.80}.")
        if not _is_int(self.format_version) or not 1 <= self.format_version <= FORMAT_VERSION:
            raise CPEAdapterError(
                f"CPEConfig.format_version must be from 1 to {FORMAT_VERSION}, got {self.format_version!r:.40}."
            )
        for concept in self.concepts:
            concept.validate()
        for layer in self.target_layers:
            layer.validate()
        names = self.layer_names
        if len(set(names)) != len(names):
            raise CPEAdapterError("CPEConfig.target_layers lists a layer twice.")
        for layer in self.target_layers:
            if layer.in_features != self.text_embed_dim:
                raise CPEAdapterError(
                    f"Target layer {layer.name!r} reads {layer.in_features}-d input but text_embed_dim is "
                    f"{self.text_embed_dim}."
                )
        if self.num_parameters > MAX_PARAMETERS:
            raise CPEAdapterError(
                f"This CPEConfig describes {self.num_parameters:,} parameters, more than the {MAX_PARAMETERS:,} any "
                "real CPE adapter needs; the config is corrupt or hostile. Check text_embed_dim, the ranks, the "
                "concepts and the target layers."
            )

    @property
    def num_parameters(self) -> int:
        """Parameter count the config implies: per concept ``2 d m + d`` (gate) plus ``d r + r d_out`` per layer."""
        d, m, r = self.text_embed_dim, self.gate_rank, self.residual_rank
        per_concept = 2 * d * m + d + sum(d * r + r * t.out_features for t in self.target_layers)
        return self.num_concepts * per_concept

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json_string(self) -> str:
        return config_json(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CPEConfig:
        """Build a config from a dict, ignoring (with a warning) keys this version does not know."""
        if not isinstance(data, dict):
            raise AdapterFileError(f"A CPE config must be a JSON object, got {type(data).__name__}.")
        version = data.get("format_version", FORMAT_VERSION)
        if not _is_int(version) or version < 1:
            raise AdapterFileError(
                f"format_version must be a positive integer, got {version!r:.40}; the config is corrupt. Re-save it."
            )
        if version > FORMAT_VERSION:
            raise AdapterFileError(
                f"This adapter uses format_version {version}, but this cpe-adapter understands up to "
                f"{FORMAT_VERSION}. Upgrade with `pip install -U cpe-adapter`."
            )
        known = _known_keys(cls, data, "a CPEConfig")
        try:
            return cls(**known)
        except (TypeError, KeyError, AttributeError) as err:
            raise AdapterFileError(f"Invalid CPE config: {err}. Re-save the adapter with save_pretrained.") from err

    @classmethod
    def from_json_string(cls, text: str, source: str = CONFIG_NAME) -> CPEConfig:
        """Parse a config, refusing (before or while parsing) what no real config looks like:
        more than :data:`MAX_CONFIG_BYTES` characters, nesting deeper than :data:`MAX_CONFIG_DEPTH`,
        integers too long to convert. ``source`` names the text in error messages."""
        if len(text) > MAX_CONFIG_BYTES:
            raise AdapterFileError(
                f"The CPE config in {source} has {len(text):,} characters; real ones have a few thousand (corrupt)."
            )
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as err:  # JSONDecodeError, or an integer of too many digits
            raise AdapterFileError(f"{source} is not valid JSON ({err}); the file is corrupt.") from err
        if _depth(data) > MAX_CONFIG_DEPTH:
            raise AdapterFileError(
                f"The CPE config in {source} nests deeper than {MAX_CONFIG_DEPTH} levels; real ones nest 4 (corrupt)."
            )
        return cls.from_dict(data)

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write ``cpe_config.json`` into ``save_directory`` atomically; returns its path."""
        from .serialization import atomic_write_bytes

        path = Path(save_directory) / CONFIG_NAME
        atomic_write_bytes(path, (self.to_json_string() + "\n").encode("utf-8"))
        return path

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **hub_kwargs: Any) -> CPEConfig:
        """Read ``cpe_config.json`` from a folder, a config file, or a Hub repo; or the config copy in
        the header of a ``.safetensors`` weights file (such a file describes itself): a lone file, the
        file ``weight_name`` names, or the weights of a folder or repo without ``cpe_config.json``."""
        from .hub import resolve_file
        from .serialization import config_from_metadata, read_config_text, read_metadata

        weight_name = hub_kwargs.pop("weight_name", None)
        source = pretrained_model_name_or_path
        if weight_name not in (None, WEIGHTS_NAME):  # the chosen file's own header, as loading reads it
            weights = resolve_file(source, weight_name, **hub_kwargs)
            metadata = read_metadata(weights)
            if METADATA_KEY in metadata:
                return config_from_metadata(metadata, str(weights))
        path = resolve_file(source, CONFIG_NAME, required=False, **hub_kwargs)
        if path is None or path.suffix == ".safetensors":
            path = path or resolve_file(source, WEIGHTS_NAME, **hub_kwargs)
            return config_from_metadata(read_metadata(path), str(path))
        return cls.from_json_string(read_config_text(path))
