"""Preset and override mistakes are refused naming the field, before any data is read or any folder made:
typos in the `model` section, out-of-range `training` values (NaN, infinities, impossible AdamW values),
wrong types in `data`, seeds that do not fit, EOS equal to the mask token, and a bad `num_items_in_batch`."""

import math

import pytest
import torch
from conftest import tiny_config

from hf_sfdlm import SFDLMConfig, SFDLMForDiffusionLM
from hf_sfdlm.cli import main
from hf_sfdlm.data import DataConfig
from hf_sfdlm.train_config import TrainingConfig, load_config

# (override, what the one-line error must say)
BAD_OVERRIDES = [
    ("model.hiden_size=64", "'hiden_size': did you mean 'hidden_size'?"),
    ("model.dtype=bogus", "`model.dtype` must be a torch floating-point dtype"),
    ("training.learning_rate=inf", "`training.learning_rate` must be in (0, 1.0]"),
    ("training.learning_rate=1e30", "`training.learning_rate` must be in (0, 1.0]"),
    ("training.learning_rate=.nan", "`training.learning_rate`"),
    ("training.adam_epsilon=0", "`training.adam_epsilon` must be in (0, 1)"),
    ("training.adam_epsilon=-1", "`training.adam_epsilon` must be in (0, 1)"),
    ("training.weight_decay=nan", "`training.weight_decay` must be >= 0"),
    ("training.weight_decay=-1", "`training.weight_decay` must be >= 0"),
    ("training.weight_decay=1000", "learning_rate * weight_decay < 1"),
    ("training.adam_beta1=2", "`training.adam_beta1` must be in [0, 1)"),
    ("training.adam_beta2=-0.1", "`training.adam_beta2` must be in [0, 1)"),
    ("training.max_grad_norm=.inf", "`training.max_grad_norm` must be a positive finite number"),
    ("training.min_lr_ratio=.nan", "`training.min_lr_ratio`"),
    ("training.seed=100000000000000000000000", "`training.seed` must be an integer in [0, 2**32 - 1]"),
    ("training.seed=-1", "`training.seed`"),
    ("training.save_best=7", "`training.save_best` must be true or false"),
    ("training.log_with=5", "`training.log_with` must be a list of strings"),
    ("training.output_dir=[3]", "`training.output_dir` must be a string"),
    ("data.packing=750", "`data.packing` must be true or false, got 750"),
    ("data.synthetic_seed=0.5", "`data.synthetic_seed` must be an integer, got 0.5"),
    ("data.synthetic_seed=5000000000", "`data.synthetic_seed` must be an integer in [0, 2**32 - 1]"),
    ("data.validation_fraction=abc", "`data.validation_fraction` must be a number"),
]


def test_every_bad_override_is_one_line_naming_its_field_before_any_work(tmp_path, capsys, monkeypatch):
    import hf_sfdlm.pipelines

    def accepted(config, **kwargs):
        raise AssertionError(f"the configuration was accepted: {config}")

    monkeypatch.setattr(hf_sfdlm.pipelines, "run_training", accepted)
    monkeypatch.chdir(tmp_path)
    for override, message in BAD_OVERRIDES:
        assert main(["train", override]) == 2, override
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and error[0].startswith("sfdlm train: error: ") and message in error[0], \
            (override, error)
    assert list(tmp_path.iterdir()) == []  # no output folder, no corpus, no tokenizer: refused before any work


def test_finetune_overrides_are_range_checked_too(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["finetune", "--model", "org/m", "--data", "d.txt", "training.adam_beta1=2"]) == 2
    assert "`training.adam_beta1` must be in [0, 1)" in capsys.readouterr().err


def test_a_model_typo_in_a_preset_file_is_refused(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("model:\n  hidden_size: 32\n  stage_dephts: [1, 1]\n")
    with pytest.raises(ValueError, match="stage_dephts"):
        load_config(preset)
    # what transformers' own PretrainedConfig takes stays allowed, and a good preset still loads
    assert load_config(None, ["model.dtype=float32", "model.output_hidden_states=false"]).model["dtype"] == "float32"


def test_eos_equal_to_the_mask_token_is_refused():
    with pytest.raises(ValueError, match="`eos_token_id` equals `mask_token_id`"):
        tiny_config(process="absorbing", mask_token_id=3, eos_token_id=3)
    with pytest.raises(ValueError, match="equals `mask_token_id`"):
        load_config(None, ["model.mask_token_id=3", "model.eos_token_id=3"])
    load_config(None, ["model.eos_token_id=0"])  # the placeholder mask id never clashes with a given id
    assert tiny_config(process="absorbing", mask_token_id=3, eos_token_id=4).eos_token_id == 4


def test_the_dataclasses_check_their_own_types():
    with pytest.raises(ValueError, match="`data.packing` must be true or false"):
        DataConfig(packing=750)
    with pytest.raises(ValueError, match="`training.gradient_checkpointing` must be true or false"):
        TrainingConfig(gradient_checkpointing="yes")
    assert TrainingConfig(learning_rate="3e-4").learning_rate == 3e-4  # YAML 1.1's string stays accepted
    assert TrainingConfig(learning_rate=1, weight_decay=0.5).learning_rate == 1


def test_a_bad_num_items_in_batch_is_refused_not_a_silent_nan_or_a_rescaled_loss():
    model = SFDLMForDiffusionLM(tiny_config(process="absorbing", mask_token_id=31))
    ids = torch.randint(0, 31, (2, 8), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.4, 0.6])

    def loss(**kwargs):  # the same corruption every call
        return model(input_ids=ids, labels=ids, timesteps=t, generator=torch.Generator().manual_seed(1), **kwargs).loss

    plain = loss()
    torch.testing.assert_close(loss(num_items_in_batch=ids.numel()), plain)  # the whole batch: the mean loss
    torch.testing.assert_close(loss(num_items_in_batch=torch.tensor(2 * ids.numel())), plain / 2)
    for bad in (math.nan, -1, torch.tensor(math.inf), torch.tensor([1, 2])):
        with pytest.raises(ValueError, match="num_items_in_batch"):
            loss(num_items_in_batch=bad)
