"""Shared fixtures: offline Hub, deterministic seeds, tiny configurations."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from hf_sfdlm import SFDLMConfig

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def tiny_config(**overrides) -> SFDLMConfig:
    """A model small enough for every test to run in well under a second."""
    values = dict(vocab_size=32, hidden_size=16, stage_depths=[1, 1], pool_factors=[2], ssm_state_size=4,
                  fourier_intermediate_size=32, num_timesteps=None, noise_schedule="loglinear")
    values.update(overrides)
    return SFDLMConfig(**values)


# Tests use tiny tensors, where a second intra-op thread costs more than it gives (and on a busy
# machine costs a great deal); one thread also makes float reductions reproducible across runs.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_uniform_config() -> SFDLMConfig:
    return tiny_config(process="uniform")


@pytest.fixture
def tiny_absorbing_config() -> SFDLMConfig:
    return tiny_config(process="absorbing", mask_token_id=31)
