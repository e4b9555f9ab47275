"""`CPEAdapter`: the ResAG parameters of one adapter, stacked along a concept axis.

Parameters (N concepts, d text dims, m gate rank, L layers, r residual rank):

- ``gate_a``, ``gate_b`` ``[N, d, m]`` and ``gate_v`` ``[N, d]``: the gate, shared by all layers;
- ``down`` ``[N, d, L*r]``: every layer's ``D_l`` side by side (layer-major);
- ``up`` ``[N, r, sum(d_out)]``: every layer's ``U_l`` side by side.

Keeping the layers concatenated lets one matrix product serve all layers; the file format splits
them per layer (``docs/format.md``).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import WEIGHTS_NAME, ConceptSpec, CPEConfig, TargetLayer
from .errors import AdapterFileError, CPEAdapterError, IncompatibleAdapterError
from .gate import expand_residual, gated_mixed_embedding

GATE_INIT_STD = 1e-8


def weights_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over tensor names, shapes, dtypes and bytes, in name order (provenance hash)."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().contiguous().cpu()
        digest.update(f"{key}|{list(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


class CPEAdapter(nn.Module):
    """One CPE adapter: the gates and residuals of ``config.num_concepts`` erased concepts."""

    def __init__(self, config: CPEConfig, *, init: bool = True) -> None:
        super().__init__()
        if config.num_concepts == 0:
            raise CPEAdapterError("A CPE adapter needs at least one concept.")
        if not config.target_layers:
            raise CPEAdapterError("A CPE adapter needs at least one target layer.")
        self.config = config
        n, d, m, r = config.num_concepts, config.text_embed_dim, config.gate_rank, config.residual_rank
        num_layers = len(config.target_layers)
        total_out = sum(t.out_features for t in config.target_layers)
        self.gate_a = nn.Parameter(torch.empty(n, d, m))
        self.gate_b = nn.Parameter(torch.empty(n, d, m))
        self.gate_v = nn.Parameter(torch.empty(n, d))
        self.down = nn.Parameter(torch.empty(n, d, num_layers * r))
        self.up = nn.Parameter(torch.empty(n, r, total_out))
        layer_of_column = torch.repeat_interleave(
            torch.arange(num_layers), torch.tensor([t.out_features for t in config.target_layers])
        )
        self.register_buffer("layer_of_column", layer_of_column, persistent=False)
        if init:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialisation (docs/concepts.md): tiny gates (uniform mixing), gate at 0.5, zero residual."""
        with torch.no_grad():
            self.gate_a.normal_(0.0, GATE_INIT_STD)
            self.gate_b.normal_(0.0, GATE_INIT_STD)
            self.gate_v.zero_()
            bound = 1.0 / math.sqrt(self.config.text_embed_dim)  # kaiming_uniform(a=sqrt(5)) on [r, d]
            self.down.uniform_(-bound, bound)
            self.up.zero_()

    # ----------------------------------------------------------------------------------- shapes
    @property
    def num_concepts(self) -> int:
        return self.config.num_concepts

    @property
    def residual_scale(self) -> float:
        return self.config.alpha / self.config.residual_rank

    @property
    def out_features(self) -> list[int]:
        return [t.out_features for t in self.config.target_layers]

    def key_weight(self) -> torch.Tensor:
        """The key side ``B`` of the token mixing (``A`` itself when ``tie_gate_qk``)."""
        return self.gate_a if self.config.tie_gate_qk else self.gate_b

    # ---------------------------------------------------------------------------------- compute
    def residuals(self, embeds: torch.Tensor) -> torch.Tensor:
        """Every concept's residual for every layer, without routing: ``[B, T, d] -> [N, B, T, sum(d_out)]``.

        Used in training (one concept at a time); inference routes tokens in :mod:`runtime`.
        """
        hidden = gated_mixed_embedding(embeds, self.gate_a, self.key_weight(), self.gate_v)
        codes = torch.einsum("nbtd,ndk->nbtk", hidden, self.down)
        codes = codes.unflatten(-1, (len(self.config.target_layers), self.config.residual_rank))
        return self.residual_scale * expand_residual(codes, self.up.unsqueeze(1).unsqueeze(1), self.layer_of_column)

    # ------------------------------------------------------------------------------ file layout
    def expected_file_shapes(self) -> dict[str, tuple[int, ...]]:
        return self.file_shapes(self.config)

    @staticmethod
    def file_shapes(config: CPEConfig) -> dict[str, tuple[int, ...]]:
        """Names and shapes of the tensors in ``cpe_adapter.safetensors`` for ``config``."""
        n, d, m, r = config.num_concepts, config.text_embed_dim, config.gate_rank, config.residual_rank
        shapes: dict[str, tuple[int, ...]] = {"gate.A": (n, d, m), "gate.B": (n, d, m), "gate.v": (n, d)}
        for layer in config.target_layers:
            shapes[f"{layer.name}.down"] = (n, d, r)
            shapes[f"{layer.name}.up"] = (n, r, layer.out_features)
        return shapes

    def file_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors in the documented per-layer file layout (see ``docs/format.md``)."""
        r = self.config.residual_rank
        tensors = {"gate.A": self.gate_a, "gate.B": self.gate_b, "gate.v": self.gate_v}
        ups = torch.split(self.up, self.out_features, dim=-1)
        for index, layer in enumerate(self.config.target_layers):
            tensors[f"{layer.name}.down"] = self.down[:, :, index * r : (index + 1) * r]
            tensors[f"{layer.name}.up"] = ups[index]
        return {k: v.detach().contiguous() for k, v in tensors.items()}

    def load_file_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Fill the parameters from the per-layer layout; checks names, shapes and finiteness."""
        expected = self.expected_file_shapes()
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        if missing or extra:
            if any(name in extra for name, _ in self.named_parameters()):
                hint = (
                    "these are the module's own parameters (`CPEAdapter.state_dict()`); pass the file layout, "
                    "`adapter.file_state_dict()` or `safetensors.torch.load_file(...)` of a saved adapter"
                )
            else:
                hint = "the weights belong to another adapter or config: load them with their own `cpe_config.json`"
            raise AdapterFileError(
                f"Adapter weights do not match the config: missing {missing[:5]}, unexpected {extra[:5]}; {hint}."
            )
        for key, shape in expected.items():
            tensor = tensors[key]
            if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
                got = list(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise AdapterFileError(
                    f"Adapter tensor {key!r} has shape {got}, expected {list(shape)}: the file was written for "
                    "another config (other ranks or dimensions); load it with its own `cpe_config.json`."
                )
            if tensor.is_meta:
                raise AdapterFileError(f"Adapter tensor {key!r} is on the meta device: it holds no values.")
            if not tensor.is_floating_point():
                raise AdapterFileError(f"Adapter tensor {key!r} has dtype {tensor.dtype}; expected a float tensor.")
            if not torch.isfinite(tensor).all():
                raise AdapterFileError(
                    f"Adapter tensor {key!r} contains NaN or infinite values; the adapter is broken."
                )
        names = self.config.layer_names
        with torch.no_grad():
            self.gate_a.copy_(tensors["gate.A"])
            self.gate_b.copy_(tensors["gate.B"])
            self.gate_v.copy_(tensors["gate.v"])
            self.down.copy_(torch.cat([tensors[f"{n}.down"] for n in names], dim=-1))
            self.up.copy_(torch.cat([tensors[f"{n}.up"] for n in names], dim=-1))
        self.check_finite(f"overflows once stored in {self.gate_v.dtype}; the adapter holds values no real one does.")

    def check_finite(self, problem: str) -> None:
        """Refuse NaN or infinite parameters, raising ``"Adapter weight <name> <problem>"``.

        Files are checked before conversion; this catches what a conversion made infinite (finite
        float64 beyond float32's range) and in-memory adapters handed over as objects.
        """
        for name, param in self.named_parameters():
            if not bool(torch.isfinite(param.detach()).all()):
                raise AdapterFileError(f"Adapter weight {name!r} {problem}")

    def check_covers(self, layers: Sequence[TargetLayer]) -> None:
        """Raise :class:`IncompatibleAdapterError` unless the adapter has weights for every one of ``layers``."""
        names = {t.name for t in self.config.target_layers}
        missing = [t.name for t in layers if t.name not in names]
        if missing:
            raise IncompatibleAdapterError(
                f"The adapter has no weights for {missing[:3]} ({len(missing)} layers); it was made for another layout."
            )

    def restricted_to(self, layers: Sequence[TargetLayer]) -> CPEAdapter:
        """A copy holding only ``layers`` (e.g. a ControlNet's copy of some UNet layers), gates included."""
        self.check_covers(layers)
        config = CPEConfig.from_dict({**self.config.to_dict(), "target_layers": [t.__dict__ for t in layers]})
        tensors = self.file_state_dict()
        kept = {k: v for k, v in tensors.items() if k.startswith("gate.")}
        for layer in layers:
            kept[f"{layer.name}.down"] = tensors[f"{layer.name}.down"]
            kept[f"{layer.name}.up"] = tensors[f"{layer.name}.up"]
        return CPEAdapter.from_state_dict(kept, config).to(device=self.gate_v.device, dtype=self.gate_v.dtype)

    def digest(self) -> str:
        """Content hash of the weights in file layout and fp32 (recorded as ``weights_sha256``)."""
        return weights_digest({k: v.float() for k, v in self.file_state_dict().items()})

    # ------------------------------------------------------------------------------ construction
    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], config: CPEConfig | dict[str, Any]) -> CPEAdapter:
        """Build an adapter from file-layout tensors and a config (or its dict)."""
        if isinstance(config, dict):
            config = CPEConfig.from_dict(config)
        if not isinstance(config, CPEConfig):
            raise CPEAdapterError(f"Expected a CPEConfig or dict, got {type(config).__name__}.")
        adapter = cls(config, init=False)
        adapter.load_file_state_dict(tensors)
        return adapter

    @classmethod
    def for_layers(
        cls,
        target_layers: Sequence[TargetLayer],
        concepts: str | Sequence[str | ConceptSpec],
        preset: str = "names",
        **overrides: Any,
    ) -> CPEAdapter:
        """A fresh, untrained adapter for the given projections, sized by ``preset`` and ``overrides``."""
        from .presets import get_preset

        settings = get_preset(preset)
        config_fields = {
            "gate_rank",
            "residual_rank",
            "alpha",
            "tie_gate_qk",
            "name",
            "base_model",
            "base_model_revision",
        }
        config_overrides = {k: overrides.pop(k) for k in list(overrides) if k in config_fields}
        neutral = overrides.pop("neutral", settings.neutral)
        eta = overrides.pop("eta", settings.eta)
        settings = settings.replace(**overrides)
        if isinstance(concepts, (str, ConceptSpec)):
            concepts = [concepts]
        specs = [c if isinstance(c, ConceptSpec) else ConceptSpec(name=c, neutral=neutral, eta=eta) for c in concepts]
        if not specs or any(not s.name.strip() for s in specs):
            raise CPEAdapterError("Concepts must be non-empty strings.")
        layers = list(target_layers)
        config = CPEConfig(
            concepts=specs,
            text_embed_dim=layers[0].in_features if layers else 0,
            target_layers=layers,
            gate_rank=config_overrides.pop("gate_rank", settings.gate_rank),
            residual_rank=config_overrides.pop("residual_rank", settings.residual_rank),
            alpha=config_overrides.pop("alpha", settings.alpha),
            preset=preset,
            training=settings.to_dict(),
            **config_overrides,
        )
        return cls(config)

    @classmethod
    def for_pipeline(
        cls, pipe: Any, concepts: str | Sequence[str | ConceptSpec], preset: str = "names", **overrides: Any
    ) -> CPEAdapter:
        """A fresh, untrained adapter sized for ``pipe``'s cross-attention projections."""
        from .hooks import adapter_placement
        from .targets import denoiser_of, find_target_layers

        denoiser = denoiser_of(pipe)
        model_id, revision = base_model_info(pipe, denoiser)
        overrides.setdefault("base_model", model_id)
        overrides.setdefault("base_model_revision", revision)
        adapter = cls.for_layers(find_target_layers(denoiser), concepts, preset, **overrides)
        return adapter.to(adapter_placement(denoiser)[0])

    @classmethod
    def concatenate(cls, adapters: Sequence[CPEAdapter], name: str | None = None) -> CPEAdapter:
        """Stack several adapters with the same layout and ranks into one (concepts in order)."""
        if not adapters:
            raise CPEAdapterError("Nothing to concatenate.")
        first = adapters[0].config
        for other in adapters[1:]:
            cfg = other.config
            same = (
                cfg.target_layers == first.target_layers
                and cfg.text_embed_dim == first.text_embed_dim
                and (cfg.gate_rank, cfg.residual_rank, cfg.alpha, cfg.tie_gate_qk)
                == (first.gate_rank, first.residual_rank, first.alpha, first.tie_gate_qk)
            )
            if not same:
                raise CPEAdapterError(
                    "Only adapters with the same layers, ranks, alpha and tie_gate_qk can be stacked."
                )
        config = CPEConfig.from_dict(
            {**first.to_dict(), "concepts": [c for a in adapters for c in a.config.to_dict()["concepts"]], "name": name}
        )
        merged = cls(config, init=False)
        with torch.no_grad():
            for param_name, param in merged.named_parameters():
                param.copy_(torch.cat([getattr(a, param_name).detach().cpu() for a in adapters]))
        return merged

    # ------------------------------------------------------------------------------------ files
    def save_pretrained(
        self, save_directory: str | os.PathLike, *, model_card: bool = True, safe_serialization: bool = True
    ) -> Path:
        """Write ``cpe_config.json``, ``cpe_adapter.safetensors`` and a model card; returns the folder.

        A card already in the folder keeps everything outside its generated part. Weights are
        always safetensors: ``safe_serialization=False`` (pickle) is refused.
        """
        from .hub import save_adapter_folder

        if safe_serialization is not True:
            raise CPEAdapterError(
                "safe_serialization=False would write a pickle file; cpe-adapter saves only .safetensors weights."
            )
        return save_adapter_folder(self, save_directory, model_card=model_card)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **hub_kwargs: Any) -> CPEAdapter:
        """Load from a local folder, a ``.safetensors`` file or a Hub repo id."""
        from .hub import load_adapter

        return load_adapter(pretrained_model_name_or_path, **hub_kwargs)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str | None = None,
        revision: str | None = None,
    ) -> str:
        """Upload to the Hub (repo created if needed) with a model card; returns the commit URL."""
        from .hub import push_adapter

        return push_adapter(
            self, repo_id, private=private, token=token, commit_message=commit_message, revision=revision
        )

    def extra_repr(self) -> str:
        cfg = self.config
        return (
            f"concepts={cfg.concept_names}, layers={len(cfg.target_layers)}, d={cfg.text_embed_dim}, "
            f"m={cfg.gate_rank}, r={cfg.residual_rank}, alpha={cfg.alpha}"
        )


def base_model_info(pipe: Any, denoiser: nn.Module) -> tuple[str | None, str | None]:
    """``(model id or path, Hub commit)`` of the pipeline an adapter is made for, where recorded.

    The id is the ``_name_or_path`` diffusers records at ``from_pretrained``; the commit is the one
    transformers records on Hub-loaded text encoders (``None`` for local folders).
    """
    model_id = None
    for obj in (pipe, denoiser):
        path = getattr(getattr(obj, "config", None), "_name_or_path", None)
        if path:
            model_id = str(path)
            break
    encoder = getattr(pipe, "text_encoder", None)
    revision = getattr(getattr(encoder, "config", None), "_commit_hash", None)
    return model_id, (str(revision) if revision else None)


def weights_path(folder: str | os.PathLike) -> Path:
    return Path(folder) / WEIGHTS_NAME
