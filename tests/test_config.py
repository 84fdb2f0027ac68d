"""SFDLMConfig validation: every field's type and range is checked, errors name the field and the value."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_config

from hf_sfdlm import SFDLMConfig, SFDLMForDiffusionLM

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "field, value, error",
    [
        # The reproductions of issue 13: each used to build a model that trains on NaN, zero or crashes late.
        ("layer_norm_eps", NAN, ValueError),
        ("layer_norm_eps", -1e-5, ValueError),
        ("layer_norm_eps", 0.0, ValueError),
        ("ssm_dt_max", INF, ValueError),
        ("ssm_dt_min", NAN, ValueError),
        ("linear_beta_max", INF, ValueError),
        ("linear_beta_max", 1e300, ValueError),
        ("linear_beta_min", -0.1, ValueError),
        ("geometric_sigma_max", INF, ValueError),
        ("geometric_sigma_min", 0.0, ValueError),
        ("initializer_range", 100, ValueError),
        ("initializer_range", 0.0, ValueError),
        ("dropout", None, TypeError),
        ("dropout", 1.0, ValueError),
        ("dropout", NAN, ValueError),
        ("layer_norm_eps", "1e-6", TypeError),  # what a YAML 1.1 reader makes of `1e-6`
        ("linear_beta_max", "20", TypeError),
        ("hidden_size", 16.0, TypeError),
        ("hidden_size", "16", TypeError),
        ("hidden_size", 0, ValueError),
        ("vocab_size", None, TypeError),
        ("vocab_size", 1, ValueError),
        ("num_timesteps", 10.5, TypeError),
        ("num_timesteps", -1, ValueError),
        ("num_timesteps", 2**62, ValueError),  # loss exactly 0: float64 cannot tell t from t - 1/T
        ("max_position_embeddings", True, TypeError),
        ("use_ssm", "false", TypeError),
        ("time_conditioning", 1, TypeError),
        ("tie_word_embeddings", None, TypeError),
        ("stage_depths", 3, TypeError),
        ("stage_depths", "22", TypeError),
        ("pool_factors", 2, TypeError),
        ("pad_token_id", True, TypeError),
        ("eos_token_id", 3.0, TypeError),
        ("ssm_mode", ["diagonal"], ValueError),
        ("objective", None, ValueError),
    ],
)
def test_each_bad_field_is_refused_naming_the_field_and_the_value(field, value, error):
    with pytest.raises(error) as caught:
        SFDLMConfig(**{field: value})
    message = str(caught.value)
    assert f"`{field}`" in message and repr(value)[:20] in message, message


def test_a_string_vocab_size_beside_token_ids_is_named_before_transformers_compares_them():
    with pytest.raises(TypeError, match="`vocab_size` must be an integer, got '32'"):
        SFDLMConfig(vocab_size="32", pad_token_id=3)


def test_score_entropy_refuses_an_initialisation_whose_exponentiated_scores_overflow():
    with pytest.raises(ValueError, match=r"`initializer_range` \* sqrt\(`hidden_size`\) <= 1.5.*0.3 \* sqrt\(128\)"):
        SFDLMConfig(objective="score_entropy", num_timesteps=None, initializer_range=0.3)
    # Just inside the bound the first losses are finite and ordinary (measured: inf at 0.3 * sqrt(128) = 3.4).
    config = tiny_config(objective="score_entropy", hidden_size=64, fourier_intermediate_size=128,
                         initializer_range=1.5 / 8)
    model = SFDLMForDiffusionLM(config)
    ids = torch.randint(0, 32, (2, 16))
    for seed in range(3):
        loss = model(ids, labels=ids, generator=torch.Generator().manual_seed(seed)).loss
        assert torch.isfinite(loss), loss


def test_a_yaml_string_number_says_how_to_write_it():
    with pytest.raises(TypeError, match=r"`layer_norm_eps` must be a real number, got '1e-6' \(str\).*1\.0e-6"):
        SFDLMConfig(layer_norm_eps="1e-6")


@pytest.mark.parametrize(
    "overrides",
    [
        # The documented bounds themselves are accepted and still train on finite, non-zero losses.
        dict(noise_schedule="linear", linear_beta_max=100.0),
        dict(noise_schedule="geometric", geometric_sigma_min=1e-4, geometric_sigma_max=100.0),
        dict(initializer_range=1.0),
        dict(ssm_dt_min=1000.0, ssm_dt_max=1000.0),
        dict(layer_norm_eps=1e-12, hidden_size=2),
        dict(dropout=0.99),
        dict(num_timesteps=10**9),
    ],
)
@pytest.mark.parametrize("process", ["uniform", "absorbing"])
@pytest.mark.parametrize("num_timesteps", [None, 1000])
def test_values_at_the_bounds_train_on_finite_nonzero_losses(overrides, process, num_timesteps):
    config = tiny_config(**{"process": process, "mask_token_id": 31, "num_timesteps": num_timesteps,
                            "noise_schedule": "cosine", **overrides})
    model = SFDLMForDiffusionLM(config).train()
    ids = torch.randint(0, 31, (4, 12))
    for seed in range(4):
        loss = model(ids, labels=ids, generator=torch.Generator().manual_seed(seed)).loss
        assert math.isfinite(loss.item()) and loss.item() > 0, (overrides, seed, loss)
        loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_numpy_scalars_are_stored_as_python_numbers():
    config = SFDLMConfig(vocab_size=np.int64(40), dropout=np.float32(0.25), stage_depths=np.array([1, 2]).tolist(),
                         pool_factors=(np.int64(2),), mask_token_id=np.int32(3))
    assert type(config.vocab_size) is int and type(config.dropout) is float and type(config.mask_token_id) is int
    assert config.pool_factors == [2] and type(config.pool_factors[0]) is int
    json.loads(config.to_json_string())


def test_saved_configs_still_load_with_the_keys_transformers_adds(tmp_path):
    model = SFDLMForDiffusionLM(tiny_config(process="absorbing", mask_token_id=31))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert {"transformers_version", "architectures", "auto_map", "model_type"} <= set(saved)
    saved.update(torch_dtype="float32", dtype="float32")  # written by older and newer transformers
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = SFDLMForDiffusionLM.from_pretrained(tmp_path)
    assert loaded.config.to_diff_dict() == {**model.config.to_diff_dict(), **{k: loaded.config.to_diff_dict()[k]
                                                                             for k in ("dtype",)}}
    # A saved config.json with a broken value names the field when it is loaded.
    saved["layer_norm_eps"] = "1e-6"
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(TypeError, match="`layer_norm_eps`"):
        SFDLMConfig.from_pretrained(tmp_path)
