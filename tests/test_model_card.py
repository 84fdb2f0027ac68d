"""Model cards: rendered from the template, parsed back, metadata checked, measured numbers preserved."""

import math

import pytest
import torch
import yaml
from conftest import tiny_config
from huggingface_hub import EvalResult, ModelCard

from hf_sfdlm import SFDLMForDiffusionLM
from hf_sfdlm.lora import apply_lora, save_adapter
from hf_sfdlm.model_card import (
    TEMPLATE_PATH,
    eval_result,
    is_sfdlm_card,
    render_model_card,
    validate_model_card,
    write_model_card,
)



def measured_results(model) -> list[EvalResult]:
    """Numbers a run would measure: the held-out NELBO per token and the perplexity bound it implies."""
    ids = torch.randint(0, model.config.vocab_size - 1, (4, 16), generator=torch.Generator().manual_seed(3))
    nelbo_per_token = float(model.nelbo(ids, num_samples=4, generator=torch.Generator().manual_seed(4)).sum()
                            / ids.numel())
    return [eval_result("nelbo", nelbo_per_token, "synthetic-grammar", split="validation",
                        metric_name="NELBO (nats/token)"),
            eval_result("perplexity", math.exp(nelbo_per_token), "synthetic-grammar", split="validation",
                        metric_name="Perplexity bound (token-level)")]


def test_template_is_a_jinja_template_with_the_metadata_slot():
    text = TEMPLATE_PATH.read_text()
    assert text.startswith("---\n{{ card_data }}\n---")
    assert "2503.17382" in text


def test_card_parses_back_with_the_measured_numbers(tmp_path):
    model = SFDLMForDiffusionLM(tiny_config(process="absorbing", mask_token_id=31, ssm_state_size=6))
    results = measured_results(model)
    path = write_model_card(tmp_path, model, eval_results=results, repo_id="org/tiny-sfdlm",
                            training_info={"datasets": ["synthetic-grammar"], "optimizer_steps": 120,
                                           "tokens_seen": 61_440, "learning_rate": 3e-4})
    card = ModelCard.load(path)
    validate_model_card(tmp_path)
    data = card.data
    assert (data.library_name, data.pipeline_tag, data.license) == ("transformers", "text-generation", "apache-2.0")
    assert data.datasets == ["synthetic-grammar"]
    assert {"sfdlm", "diffusion", "masked-diffusion", "custom_code"} <= set(data.tags)
    assert data.model_name == "org/tiny-sfdlm"
    parsed = {(r.metric_type, r.dataset_split): r.metric_value for r in data.eval_results}
    assert parsed == {(r.metric_type, r.dataset_split): r.metric_value for r in results}  # exact floats
    # The raw YAML holds a model-index, as the Hub expects.
    metadata = yaml.safe_load(path.read_text().split("---")[1])
    assert metadata["model-index"][0]["results"][0]["metrics"][0]["value"] == results[0].metric_value
    body = card.text
    assert "state size 6" in body and "absorbing / masked (mask token id 31)" in body
    assert "| tokens seen | 61,440 |" in body and "| Parameters | " in body
    assert f"{results[1].metric_value:.4g}" in body
    assert 'AutoModel.from_pretrained("org/tiny-sfdlm", trust_remote_code=True)' in body
    assert "model.generate(ids, steps=32)" in body and "Kiruluta" in body


def test_card_from_a_saved_folder_counts_the_saved_parameters(tmp_path):
    model = SFDLMForDiffusionLM(tiny_config())
    model.save_pretrained(tmp_path)
    write_model_card(tmp_path)
    card = validate_model_card(tmp_path)
    assert f"({model.num_parameters():,})" in card.text or f"| Parameters | {model.num_parameters()} |" in card.text
    assert card.data.model_name == tmp_path.name and not card.data.eval_results
    assert "No evaluation results were recorded" in card.text
    assert "mask_token_id=tokenizer.mask_token_id" in card.text  # uniform process: name the placeholder


def test_adapter_card_names_its_base_and_peft(tmp_path):
    peft_model = apply_lora(SFDLMForDiffusionLM(tiny_config()), r=2, target_modules=["fc_in", "fc_out"])
    save_adapter(peft_model, tmp_path)
    assert not is_sfdlm_card(tmp_path)  # PEFT's own placeholder card
    write_model_card(tmp_path, peft_model, base_model="org/tiny-sfdlm", repo_id="org/tiny-sfdlm-lora")
    card = validate_model_card(tmp_path)
    assert card.data.library_name == "peft" and card.data.base_model == "org/tiny-sfdlm"
    assert {"lora", "peft", "sfdlm"} <= set(card.data.tags)
    assert "| Rank r | 2 |" in card.text and "| Target modules | fc_in, fc_out |" in card.text
    assert 'PeftModel.from_pretrained(base, "org/tiny-sfdlm-lora")' in card.text
    # The same card from the folder alone.
    again = render_model_card(folder=tmp_path, base_model="org/tiny-sfdlm", repo_id="org/tiny-sfdlm-lora")
    assert "| Rank r | 2 |" in again.text and "| Hidden size | 16 |" in again.text


@pytest.mark.parametrize("results, message", [
    ([{"metric_type": "perplexity", "metric_value": float("nan"), "dataset_name": "x", "dataset_type": "x"}],
     "finite number"),
    ([{"metric_type": "perplexity", "metric_value": 3.0, "dataset_name": "x", "dataset_type": "x", "bogus": 1}],
     "Unknown eval result field"),
    ([{"metric_type": "perplexity", "metric_value": 3.0}], "lacks required"),
    ({"metric_type": "perplexity"}, "list of EvalResult"),
])
def test_bad_eval_results_are_refused(tmp_path, results, message):
    with pytest.raises((ValueError, TypeError), match=message):
        write_model_card(tmp_path, SFDLMForDiffusionLM(tiny_config()), eval_results=results)
    assert not (tmp_path / "README.md").exists()


def test_bad_card_inputs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        write_model_card(tmp_path)
    with pytest.raises(ValueError, match="license"):
        write_model_card(tmp_path, SFDLMForDiffusionLM(tiny_config()), license="Apache 2")
    with pytest.raises(ValueError, match="does not exist"):
        write_model_card(tmp_path / "missing", SFDLMForDiffusionLM(tiny_config()))
    (tmp_path / "README.md").write_text("---\nlicense: mit\nlibrary_name: peft\npipeline_tag: text-generation\n"
                                        "tags: [sfdlm]\nbase_model: /home/me/model\n---\n")
    with pytest.raises(ValueError, match="not a Hub repo id"):
        validate_model_card(tmp_path)


def test_a_local_base_is_named_in_the_text_not_the_metadata(tmp_path):
    peft_model = apply_lora(SFDLMForDiffusionLM(tiny_config()), r=2)
    card = validate_model_card(write_model_card(tmp_path, peft_model, base_model=str(tmp_path / "base")))
    assert card.data.base_model is None and f"| base model | {tmp_path / 'base'} |" in card.text
    assert "BASE-MODEL-REPO-ID" in card.text


def test_validation_rejects_cards_that_are_not_sfdlm_or_malformed(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: mit\nlibrary_name: transformers\n---\n# x\n")
    with pytest.raises(ValueError, match="missing `pipeline_tag`.*tags lack 'sfdlm'"):
        validate_model_card(tmp_path)
    (tmp_path / "README.md").write_text("---\nlicense: mit\nmodel-index:\n- name: x\n  results: 3\n---\n")
    with pytest.raises(ValueError):
        validate_model_card(tmp_path)
    with pytest.raises(ValueError, match="No model card"):
        validate_model_card(tmp_path / "elsewhere")
