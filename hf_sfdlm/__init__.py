"""hf_sfdlm: attention-free discrete diffusion language models (SFDLM, MDLM, D3PM) for Hugging Face.

The public classes load on first use (PEP 562), so `import hf_sfdlm` and the `sfdlm` command line's
`--help` do not import torch and transformers. Loading any SFDLM class (`from hf_sfdlm import
SFDLMForDiffusionLM`, or `hf_sfdlm.register_auto_classes()`) registers it with the transformers Auto
classes, so `AutoConfig`, `AutoModel` and `AutoModelForMaskedLM` resolve `model_type="sfdlm"` locally.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "AbsorbingDiffusion": "diffusion",
    "DiscreteDiffusion": "diffusion",
    "NoiseSchedule": "diffusion",
    "SFDLMConfig": "configuration_sfdlm",
    "SFDLMDiffusionLMOutput": "modeling_sfdlm",
    "SFDLMFeatureExtractionPipeline": "feature_extraction_sfdlm",
    "SFDLMForDiffusionLM": "modeling_sfdlm",
    "SFDLMGenerationConfig": "generation_sfdlm",
    "SFDLMGenerationOutput": "generation_sfdlm",
    "SFDLMModel": "modeling_sfdlm",
    "SFDLMPreTrainedModel": "modeling_sfdlm",
    "UniformDiffusion": "diffusion",
}
_registered = False


def register_auto_classes() -> None:
    """Register `SFDLMConfig` and `SFDLMForDiffusionLM` with `AutoConfig`, `AutoModel` and
    `AutoModelForMaskedLM` (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

    from .configuration_sfdlm import SFDLMConfig
    from .modeling_sfdlm import SFDLMForDiffusionLM

    AutoConfig.register(SFDLMConfig.model_type, SFDLMConfig, exist_ok=True)
    AutoModel.register(SFDLMConfig, SFDLMForDiffusionLM, exist_ok=True)
    AutoModelForMaskedLM.register(SFDLMConfig, SFDLMForDiffusionLM, exist_ok=True)
    _registered = True


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hf_sfdlm' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    register_auto_classes()
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = sorted(_EXPORTS) + ["register_auto_classes"]
