"""The lowest transformers version pyproject.toml allows (5.0): what it needs from the remote code.

`.ci/run` runs the full check (`.ci/floor_smoke.py` in a venv with the declared floors); this is the fast part
that the main suite can check with any transformers version."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import hf_sfdlm
from hf_sfdlm.generation_sfdlm import SFDLMGenerationConfig

PACKAGE = Path(hf_sfdlm.__file__).parent


def _relative_imports(module: str) -> set[str]:
    """The sibling modules a file imports, found as transformers finds them (both its patterns)."""
    text = (PACKAGE / f"{module}.py").read_text()
    found = re.findall(r"^\s*import\s+\.(\S+)\s*$", text, flags=re.MULTILINE)
    found += re.findall(r"^\s*from\s+\.(\S+)\s+import", text, flags=re.MULTILINE)
    return {name.split(".")[0] for name in found}


def test_the_modeling_file_imports_every_remote_code_module_itself():
    """transformers 5.0 copies a local folder's remote code into its module cache by the modeling file's own
    relative imports only, then fails on any module those import in turn (FileNotFoundError)."""
    direct = _relative_imports("modeling_sfdlm")
    reachable, todo = set(), list(direct)
    while todo:
        module = todo.pop()
        if module not in reachable:
            reachable.add(module)
            todo.extend(_relative_imports(module))
    assert {"configuration_sfdlm", "diffusion", "sampling_sfdlm", "score_entropy"} <= reachable
    assert reachable - {"modeling_sfdlm"} <= direct, sorted(reachable - direct)


def test_generation_config_files_written_by_transformers_5_0_load():
    """5.0 saves the plain `GenerationConfig.from_model_config`, with output_attentions/hidden_states false."""
    config = SFDLMGenerationConfig(mask_token_id=1, eos_token_id=2, output_attentions=False,
                                   output_hidden_states=False, _from_model_config=True, transformers_version="5.0.0")
    assert config.mask_token_id == 1 and not hasattr(config, "output_attentions")
    with pytest.raises(ValueError, match="output_attentions"):
        SFDLMGenerationConfig(output_attentions=True)


def test_a_model_always_carries_the_sfdlm_generation_config():
    """transformers 5.0 gives models a plain GenerationConfig in `__init__`; `post_init` replaces it."""
    from hf_sfdlm import SFDLMConfig, SFDLMForDiffusionLM

    config = SFDLMConfig(vocab_size=20, mask_token_id=1, pad_token_id=0, eos_token_id=2, hidden_size=16,
                         stage_depths=[1], pool_factors=[], ssm_state_size=2, fourier_intermediate_size=16)
    model = SFDLMForDiffusionLM(config)
    assert type(model.generation_config) is SFDLMGenerationConfig
    assert (model.generation_config.mask_token_id, model.generation_config.eos_token_id) == (1, 2)
