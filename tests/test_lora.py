"""LoRA through PEFT: what trains, save/reload/merge give the same logits, and wrong adapters are refused."""

import json

import pytest
import torch
from conftest import tiny_config
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoModel

from hf_sfdlm import SFDLMForDiffusionLM
from hf_sfdlm.lora import (
    LORA_TARGET_MODULES,
    apply_lora,
    check_adapter_matches_base,
    load_adapter,
    save_adapter,
    trainable_parameter_names,
)



def pretrained_like(seed: int = 0, **overrides) -> SFDLMForDiffusionLM:
    """A tiny model whose adaLN-Zero gates are open, as after pretraining (at init every block is the
    identity, so nothing inside a block would get a gradient)."""
    torch.manual_seed(seed)
    model = SFDLMForDiffusionLM(tiny_config(**overrides))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


def fixed_logits(model, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 32, (3, 12), generator=generator)
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, timesteps=torch.tensor([0.2, 0.5, 0.9])).logits


def train_steps(model, steps: int = 3) -> None:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, 32, (4, 16), generator=generator)
        loss = model(input_ids=ids, labels=ids, generator=generator).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def linear_names(model: nn.Module) -> set[str]:
    return {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}


def test_all_linear_wraps_every_linear_layer_but_the_tied_head():
    model = pretrained_like()
    expected = linear_names(model) - {"lm_head"}
    peft_model = apply_lora(model, r=4, target_modules="all-linear")
    assert set(peft_model.targeted_module_names) == expected
    # Every documented name is a real module suffix.
    for name in LORA_TARGET_MODULES:
        assert any(key == name or key.endswith("." + name) for key in expected), name


def test_explicit_targets_wrap_exactly_those_layers():
    model = pretrained_like()
    peft_model = apply_lora(model, r=4, target_modules=["fc_in", "modulation"])
    targeted = set(peft_model.targeted_module_names)
    assert targeted and all(name.endswith((".fc_in", ".modulation")) for name in targeted)
    assert len([n for n in targeted if n.endswith(".fc_in")]) == 3  # down, bottleneck, up block


def test_a_name_that_matches_nothing_is_refused_before_the_model_is_touched():
    model = pretrained_like()
    # PEFT itself accepts this list silently and adapts only fc_in (the LLaDA-style bug).
    assert get_peft_model(pretrained_like(), LoraConfig(target_modules=["q_proj", "fc_in"])).targeted_module_names
    with pytest.raises(ValueError, match=r"\['q_proj'\].*match no linear layer"):
        apply_lora(model, target_modules=["q_proj", "fc_in"])
    assert not any("lora" in name for name, _ in model.named_parameters())
    with pytest.raises(ValueError, match="tied"):
        apply_lora(model, target_modules=["lm_head"])
    with pytest.raises(ValueError, match="match no linear layer"):
        apply_lora(pretrained_like(time_conditioning=False), target_modules=["time_embed.0"])


@pytest.mark.parametrize("kwargs, message", [
    (dict(r=0), "rank"), (dict(alpha=-1), "alpha"), (dict(dropout=1.0), "dropout"),
    (dict(target_modules="fc_in"), "all-linear"), (dict(target_modules=[]), "non-empty"),
    (dict(modules_to_save=["no_such_module"]), "modules_to_save"),
])
def test_bad_lora_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        apply_lora(pretrained_like(), **kwargs)


def test_a_model_that_is_not_sfdlm_is_refused():
    with pytest.raises(TypeError, match="SFDLM"):
        apply_lora(nn.Linear(4, 4))


def test_training_changes_only_adapter_weights():
    model = pretrained_like()
    base_before = {name: p.detach().clone() for name, p in model.named_parameters()}
    peft_model = apply_lora(model, r=4, target_modules="all-linear")
    assert all(".lora_" in name for name in trainable_parameter_names(peft_model))
    lora_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if ".lora_" in n}
    train_steps(peft_model)
    for name, parameter in peft_model.get_base_model().named_parameters():
        if ".lora_" in name:
            continue
        original = name.replace(".base_layer", "")
        assert torch.equal(parameter, base_before[original]), f"base weight {original} changed"
    changed = [n for n, p in peft_model.named_parameters() if ".lora_" in n and not torch.equal(p, lora_before[n])]
    assert {n for n in changed if ".lora_B" in n} == {n for n in lora_before if ".lora_B" in n}


def test_train_ssm_trains_the_ssm_copy_and_leaves_the_original():
    model = pretrained_like()
    peft_model = apply_lora(model, r=4, train_ssm=True)
    trainable = trainable_parameter_names(peft_model)
    assert any(name.endswith("mixer.modules_to_save.default.log_dt") for name in trainable)
    original = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "original_module" in n}
    assert original
    train_steps(peft_model)
    for name, parameter in peft_model.named_parameters():
        if "original_module" in name:
            assert torch.equal(parameter, original[name])
    copy = dict(peft_model.named_parameters())
    assert not torch.equal(copy[next(n for n in original).replace("original_module", "modules_to_save.default")],
                           original[next(n for n in original)])


@pytest.mark.parametrize("train_ssm", [False, True])
def test_save_reload_onto_a_fresh_base_and_merge_give_identical_logits(tmp_path, train_ssm):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    pretrained_like().save_pretrained(base_dir)
    peft_model = apply_lora(AutoModel.from_pretrained(base_dir, trust_remote_code=True), r=4,
                            target_modules="all-linear", train_ssm=train_ssm)
    train_steps(peft_model)
    expected = fixed_logits(peft_model)
    save_adapter(peft_model, adapter_dir)

    fresh = AutoModel.from_pretrained(base_dir, trust_remote_code=True)
    assert not torch.allclose(fixed_logits(fresh), expected, atol=1e-4)  # the adapter does matter
    reloaded = load_adapter(fresh, adapter_dir)
    torch.testing.assert_close(fixed_logits(reloaded), expected, rtol=0, atol=1e-6)
    merged = reloaded.merge_and_unload()
    assert isinstance(merged, SFDLMForDiffusionLM) and not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(fixed_logits(merged), expected, rtol=1e-5, atol=1e-5)


def test_an_adapter_for_a_different_base_is_refused(tmp_path):
    base = pretrained_like(seed=0)
    peft_model = apply_lora(base, r=4)
    save_adapter(peft_model, tmp_path / "adapter")
    plain_dir = tmp_path / "plain"
    peft_model.save_pretrained(plain_dir)  # PEFT's own save: no SFDLM fingerprint, shapes still checked

    with pytest.raises(ValueError, match=r"different base model: config.hidden_size is 24.*16"):
        load_adapter(pretrained_like(hidden_size=24), tmp_path / "adapter")
    with pytest.raises(ValueError, match="different base model: weight .* different values"):
        load_adapter(pretrained_like(seed=1), tmp_path / "adapter")
    with pytest.raises(ValueError, match="different base model: .* does not fit"):
        load_adapter(pretrained_like(hidden_size=24), plain_dir)
    with pytest.raises(ValueError, match="no adapter_config.json"):
        load_adapter(pretrained_like(), tmp_path)
    # The same weights in bfloat16 are the same base.
    check_adapter_matches_base(pretrained_like(seed=0).to(torch.bfloat16), tmp_path / "adapter")


def test_save_adapter_needs_a_known_base(tmp_path):
    with pytest.raises(ValueError, match="apply_lora"):
        save_adapter(get_peft_model(pretrained_like(), LoraConfig(target_modules=["fc_in"])), tmp_path)


# ------------------------------------------------------------------------------ the fine-tuning entry point
def sft_files(tmp_path):
    """A pretrained-like tiny base saved with its tokenizer, and SFT records from the synthetic grammar."""
    from hf_sfdlm.synthetic import SyntheticGrammar, word_level_tokenizer

    tokenizer = word_level_tokenizer()
    model = pretrained_like(vocab_size=len(tokenizer), process="absorbing", mask_token_id=tokenizer.mask_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    base = tmp_path / "base"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    lines = []
    for sentence in SyntheticGrammar().sample_sentences(40, 0):
        words = sentence.split()
        half = len(words) // 2
        lines.append(json.dumps({"prompt": " ".join(words[:half]), "response": " ".join(words[half:])}))
    data = tmp_path / "sft.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return base, data


def test_finetune_trains_the_adapter_with_the_shared_loop_and_resumes(tmp_path):
    from hf_sfdlm.cli import main as cli_main
    from hf_sfdlm.model_card import validate_model_card
    from hf_sfdlm.tracking import read_metrics

    base, data = sft_files(tmp_path)
    base_bytes = (base / "model.safetensors").read_bytes()
    out = tmp_path / "out"
    common = ["finetune", "--model", str(base), "--data", str(data), "--output-dir", str(out), "--lora-r", "4",
              "--block-size", "32", "--base-model-id", "org/tiny-sfdlm", "training.batch_size=4",
              "training.eval_every=2", "training.checkpoint_every=2", "training.progress_bar=false",
              "training.log_with=[jsonl]", "training.learning_rate=0.01"]
    assert cli_main(common + ["--max-steps", "2"]) == 0
    assert cli_main(common + ["--max-steps", "4", "--resume", "--merge"]) == 0
    assert (base / "model.safetensors").read_bytes() == base_bytes  # the base is never written to

    metrics = read_metrics(out / "logs" / "metrics.jsonl")
    evals = [m for m in metrics if "eval/nelbo" in m]
    assert [m["step"] for m in evals] == [2, 4]  # one consistent run across the resume
    card = validate_model_card(out)
    assert card.data.base_model == "org/tiny-sfdlm" and card.data.library_name == "peft"
    measured = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert measured["nelbo"] == evals[-1]["eval/nelbo"] and measured["perplexity"] == evals[-1]["eval/perplexity"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["finished.json", "step-2", "step-4"]

    fresh = AutoModel.from_pretrained(base, trust_remote_code=True)
    adapted = load_adapter(AutoModel.from_pretrained(base, trust_remote_code=True), out)
    merged = AutoModel.from_pretrained(out / "merged", trust_remote_code=True)
    validate_model_card(out / "merged")
    assert not torch.allclose(fixed_logits(adapted), fixed_logits(fresh), atol=1e-5)  # the adapter learned
    torch.testing.assert_close(fixed_logits(merged), fixed_logits(adapted), rtol=1e-5, atol=1e-5)


def test_finetune_refuses_bad_input_before_training(tmp_path, capsys):
    from hf_sfdlm.cli import main as cli_main

    def refused(argv, message):  # the CLI reports a mistake in one line and exits with status 2
        assert cli_main(argv) == 2
        error = capsys.readouterr().err
        assert error.startswith("sfdlm finetune: error: ") and message in error, error

    base, data = sft_files(tmp_path)
    refused(["finetune", "--model", str(base), "--data", str(tmp_path / "missing.jsonl")], "does not exist")
    refused(["finetune", "--model", str(base), "--data", str(data), "--target-modules", "q_proj,v_proj",
             "--output-dir", str(tmp_path / "o")], "q_proj")
    refused(["finetune", "--model", "org/bad name", "--data", str(data)], "neither a local folder nor a valid Hub id")
    refused(["finetune", "--model", str(base), "--data", str(data), "max_steps=3"], "training.key=value")
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(["finetune", "--model", str(empty), "--data", str(data), "--output-dir", str(tmp_path / "o")],
            "no config.json")


def test_finetune_on_plain_text_adapts_with_the_pretraining_objective(tmp_path):
    from hf_sfdlm.cli import main as cli_main
    from hf_sfdlm.model_card import validate_model_card
    from hf_sfdlm.synthetic import SyntheticGrammar

    base, _ = sft_files(tmp_path)
    text = tmp_path / "domain.txt"
    text.write_text("\n".join(SyntheticGrammar().sample_sentences(60, 1)) + "\n")
    out = tmp_path / "out"
    assert cli_main(["finetune", "--model", str(base), "--data", str(text), "--output-dir", str(out),
                     "--max-steps", "2", "--block-size", "16", "--target-modules", "all-linear", "--train-ssm",
                     "training.batch_size=4", "training.progress_bar=false", "training.log_with=[]"]) == 0
    card = validate_model_card(out)
    assert "LoRA domain adaptation" in card.text and "| Trained in full (modules_to_save) | mixer |" in card.text
    assert {r.metric_type for r in card.data.eval_results} == {"nelbo", "perplexity", "bits_per_byte"}
    assert card.data.base_model is None  # a local base is named in the text only
