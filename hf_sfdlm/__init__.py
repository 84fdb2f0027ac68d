"""hf_sfdlm: attention-free discrete diffusion language models (SFDLM, MDLM, D3PM) for Hugging Face.

Importing the package registers the SFDLM classes with the transformers Auto classes, so
`AutoConfig`, `AutoModel` and `AutoModelForMaskedLM` resolve `model_type="sfdlm"` locally.
"""

from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from .configuration_sfdlm import SFDLMConfig
from .diffusion import AbsorbingDiffusion, DiscreteDiffusion, NoiseSchedule, UniformDiffusion
from .generation_sfdlm import SFDLMGenerationConfig, SFDLMGenerationOutput
from .modeling_sfdlm import SFDLMDiffusionLMOutput, SFDLMForDiffusionLM, SFDLMModel, SFDLMPreTrainedModel

__version__ = "0.1.0"

AutoConfig.register(SFDLMConfig.model_type, SFDLMConfig, exist_ok=True)
AutoModel.register(SFDLMConfig, SFDLMForDiffusionLM, exist_ok=True)
AutoModelForMaskedLM.register(SFDLMConfig, SFDLMForDiffusionLM, exist_ok=True)

__all__ = [
    "AbsorbingDiffusion",
    "DiscreteDiffusion",
    "NoiseSchedule",
    "SFDLMConfig",
    "SFDLMDiffusionLMOutput",
    "SFDLMForDiffusionLM",
    "SFDLMGenerationConfig",
    "SFDLMGenerationOutput",
    "SFDLMModel",
    "SFDLMPreTrainedModel",
    "UniformDiffusion",
]
