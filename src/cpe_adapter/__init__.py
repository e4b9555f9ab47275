"""cpe-adapter: Concept Pinpoint Eraser (CPE) adapters for diffusers pipelines.

``import cpe_adapter`` adds ``load_cpe_adapter``, ``set_cpe_adapters`` and friends to
``diffusers.DiffusionPipeline``; the same operations are available as functions here.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .adapter import CPEAdapter
from .config import ConceptSpec, CPEConfig, TargetLayer
from .errors import AdapterFileError, CPEAdapterError, ErasureIntegrityError, IncompatibleAdapterError
from .evaluation import EvalReport, evaluate
from .loaders import (
    clear_cpe_cache,
    disable_cpe_adapters,
    enable_cpe_adapters,
    get_active_cpe_adapters,
    get_cpe_adapter,
    list_cpe_adapters,
    load_cpe_adapter,
    push_cpe_adapter_to_hub,
    register_pipeline_methods,
    save_cpe_adapter,
    set_cpe_adapters,
    unload_cpe_adapter,
    use_cpe_adapters,
)
from .provenance import verify_adapter
from .training import train_cpe

register_pipeline_methods()

__all__ = [
    "AdapterFileError",
    "CPEAdapter",
    "CPEAdapterError",
    "CPEConfig",
    "ConceptSpec",
    "ErasureIntegrityError",
    "EvalReport",
    "IncompatibleAdapterError",
    "TargetLayer",
    "__version__",
    "clear_cpe_cache",
    "disable_cpe_adapters",
    "enable_cpe_adapters",
    "evaluate",
    "get_active_cpe_adapters",
    "get_cpe_adapter",
    "list_cpe_adapters",
    "load_cpe_adapter",
    "push_cpe_adapter_to_hub",
    "save_cpe_adapter",
    "set_cpe_adapters",
    "train_cpe",
    "unload_cpe_adapter",
    "use_cpe_adapters",
    "verify_adapter",
]
