"""rvhub: extract, compress, publish and apply reasoning vectors (v = θ_RL − θ_SFT).

The public API is importable from here; heavy modules (torch) load on first use, so ``rvhub --help``
stays fast. The commands' functions are also in their modules: ``rvhub.extract.extract``,
``rvhub.apply.apply``, ``rvhub.registry.push``/``pull``/``pull_apply``/``info``/``search`` (here
``extract_vector``, ``apply_vector``, ``push_vector``…: a package attribute named like one of its submodules
would be replaced by the submodule once it is imported).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "extract_vector",
    "ExtractResult",
    "apply_vector",
    "ApplyResult",
    "check_compatibility",
    "CompatReport",
    "edit_card",
    "import_lm_eval",
    "open_model",
    "ModelSource",
    "VectorFolder",
    "VectorCard",
    "ModelRef",
    "RvhubError",
    "push_vector",
    "pull_vector",
    "pull_and_apply",
    "vector_info",
    "search_vectors",
    "open_registry",
    "HubRegistry",
    "LocalRegistry",
    "combine_vectors",
    "CombineResult",
    "ScalePatterns",
    "inspect_vector",
    "InspectReport",
    "add_vector",
    "vector_added",
    "evaluate_vector",
    "EvalReport",
    "mirror_vector",
    "MirrorResult",
]

_EXPORTS = {  # public name -> (module, name there)
    "extract_vector": ("rvhub.extract", "extract"),
    "ExtractResult": ("rvhub.extract", "ExtractResult"),
    "apply_vector": ("rvhub.apply", "apply"),
    "ApplyResult": ("rvhub.apply", "ApplyResult"),
    "check_compatibility": ("rvhub.compat", "check"),
    "CompatReport": ("rvhub.compat", "CompatReport"),
    "edit_card": ("rvhub.benchmarks", "edit_card"),
    "import_lm_eval": ("rvhub.benchmarks", "import_lm_eval"),
    "open_model": ("rvhub.sources", "open_model"),
    "ModelSource": ("rvhub.sources", "ModelSource"),
    "VectorFolder": ("rvhub.formats", "VectorFolder"),
    "VectorCard": ("rvhub.card", "VectorCard"),
    "ModelRef": ("rvhub.card", "ModelRef"),
    "RvhubError": ("rvhub.errors", "RvhubError"),
    "push_vector": ("rvhub.registry", "push"),
    "pull_vector": ("rvhub.registry", "pull"),
    "pull_and_apply": ("rvhub.registry", "pull_apply"),
    "vector_info": ("rvhub.registry", "info"),
    "search_vectors": ("rvhub.registry", "search"),
    "open_registry": ("rvhub.registry", "open_registry"),
    "HubRegistry": ("rvhub._hub_registry", "HubRegistry"),
    "LocalRegistry": ("rvhub._local_registry", "LocalRegistry"),
    "combine_vectors": ("rvhub.algebra", "combine"),
    "CombineResult": ("rvhub.algebra", "CombineResult"),
    "ScalePatterns": ("rvhub.algebra", "ScalePatterns"),
    "inspect_vector": ("rvhub.inspect", "inspect_vector"),
    "InspectReport": ("rvhub.inspect", "InspectReport"),
    "add_vector": ("rvhub.inmemory", "add_vector"),
    "vector_added": ("rvhub.inmemory", "vector_added"),
    "evaluate_vector": ("rvhub.eval", "evaluate_vector"),
    "EvalReport": ("rvhub.eval", "EvalReport"),
    "mirror_vector": ("rvhub.mirror", "mirror"),
    "MirrorResult": ("rvhub.mirror", "MirrorResult"),
}

if TYPE_CHECKING:
    from ._hub_registry import HubRegistry
    from ._local_registry import LocalRegistry
    from .algebra import CombineResult, ScalePatterns
    from .algebra import combine as combine_vectors
    from .apply import ApplyResult
    from .apply import apply as apply_vector
    from .benchmarks import edit_card, import_lm_eval
    from .card import ModelRef, VectorCard
    from .compat import CompatReport
    from .compat import check as check_compatibility
    from .errors import RvhubError
    from .eval import EvalReport, evaluate_vector
    from .extract import ExtractResult
    from .extract import extract as extract_vector
    from .formats import VectorFolder
    from .inmemory import add_vector, vector_added
    from .inspect import InspectReport, inspect_vector
    from .mirror import MirrorResult
    from .mirror import mirror as mirror_vector
    from .registry import info as vector_info
    from .registry import open_registry
    from .registry import pull as pull_vector
    from .registry import pull_apply as pull_and_apply
    from .registry import push as push_vector
    from .registry import search as search_vectors
    from .sources import ModelSource, open_model


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module, attr = _EXPORTS[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'rvhub' has no attribute {name!r}")
