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
    assert "model.generate(ids, steps=16)" in body and "Kiruluta" in body


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
    (tmp_path / "sfdlm-tiny").mkdir()
    peft_model = apply_lora(SFDLMForDiffusionLM(tiny_config()), r=2)
    save_adapter(peft_model, tmp_path)
    path = write_model_card(tmp_path, peft_model, base_model=str(tmp_path / "sfdlm-tiny"))
    card = validate_model_card(path)
    assert card.data.base_model is None and str(tmp_path) not in path.read_text()
    assert "| base model | sfdlm-tiny (local); its Hub id was not recorded (`sfdlm push --base-model" in card.text
    assert 'base_id = "TODO/base-model-id"  # TODO' in card.text
    assert "| Method | LoRA (low-rank adaptation) |" in card.text and "PeftType" not in card.text
    # Regenerated with the base's Hub id (what `sfdlm push --base-model` does), everything else kept.
    card = validate_model_card(write_model_card(tmp_path, base_model="org/sfdlm-tiny"))
    assert card.data.base_model == "org/sfdlm-tiny" and 'base_id = "org/sfdlm-tiny"' in card.text
    assert "TODO" not in card.text and "| Rank r | 2 |" in card.text
    assert "unknown discrete steps" not in card.text


def test_validation_rejects_cards_that_are_not_sfdlm_or_malformed(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: mit\nlibrary_name: transformers\n---\n# x\n")
    with pytest.raises(ValueError, match="missing `pipeline_tag`.*tags lack 'sfdlm'"):
        validate_model_card(tmp_path)
    (tmp_path / "README.md").write_text("---\nlicense: mit\nmodel-index:\n- name: x\n  results: 3\n---\n")
    with pytest.raises(ValueError):
        validate_model_card(tmp_path)
    with pytest.raises(ValueError, match="No model card"):
        validate_model_card(tmp_path / "elsewhere")


# ------------------------------------------------------------------------------------------ a run's card
def _word_model_and_held_out():
    from hf_sfdlm.synthetic import SyntheticGrammar, word_level_tokenizer

    tokenizer = word_level_tokenizer()
    model = SFDLMForDiffusionLM(tiny_config(vocab_size=len(tokenizer), process="absorbing",
                                            mask_token_id=tokenizer.mask_token_id))
    sentences = SyntheticGrammar().sample_sentences(8, generator=1)
    ids = [i for sentence in sentences for i in tokenizer(sentence)["input_ids"] + [tokenizer.eos_token_id]]
    return model, tokenizer, [ids[:64], ids[64:128]]


def test_run_card_is_built_from_the_models_tokenizer_and_held_out_text(tmp_path):
    import ast
    import re

    from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results

    from hf_sfdlm.model_card import ModelCardCallback, card_examples, eval_results_from_metrics

    model, tokenizer, held_out = _word_model_and_held_out()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    examples = card_examples(model, tokenizer, held_out, seed=0, steps=4)
    callback = ModelCardCallback("hf_sfdlm synthetic grammar corpus (20000 sentences, seed 0)",
                                 dataset_type="synthetic-grammar", entropy_rate=1.0)
    callback.metrics = {"eval/nelbo": 1.079, "eval/perplexity": math.exp(1.079)}
    results = eval_results_from_metrics(callback.metrics, callback.dataset_name, dataset_type="synthetic-grammar",
                                        bytes_per_token=4.0)
    local_data = str(tmp_path / "ptb.train.txt")
    path = write_model_card(tmp_path, eval_results=results, examples=examples, headline=callback.headline(),
                            datasets=[local_data, "Salesforce/wikitext"],
                            training_info={"data": local_data, "tokenizer": str(tmp_path)})
    text = path.read_text()
    card = validate_model_card(path)

    # Examples: code built from a held-out line, every token known to the model's tokenizer.
    prompt = ast.literal_eval(re.search(r"prompt = tokenizer\((.+?), return_tensors", text).group(1))
    before, count, after = re.search(r"text = (.+?) \+ tokenizer\.mask_token \* (\d+) \+ (.+)\n", text).groups()
    infill = ast.literal_eval(before) + tokenizer.mask_token * int(count) + ast.literal_eval(after)
    for example in (prompt, infill):
        ids = tokenizer(example, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids and len(ids) >= 2
    assert tokenizer(infill, add_special_tokens=False)["input_ids"].count(tokenizer.mask_token_id) == int(count)
    assert examples["line"] in text and f'This checkpoint wrote (seed 0): "{examples["prompt_output"]}"' in text
    assert "### A sample" in text and examples["sample"] in text
    assert not any(token in examples[key] for token in ("[PAD]", "[EOS]", "[MASK]")
                   for key in ("prompt_output", "infill_output", "sample"))

    # Metadata: no local path, a short dataset type, Hub metric names, and huggingface_hub parses it back.
    metadata = yaml.safe_load(text.split("---")[1])
    assert str(tmp_path) not in text.split("---")[1] and card.data.datasets == ["Salesforce/wikitext"]
    dataset = metadata["model-index"][0]["results"][0]["dataset"]
    assert dataset == {"type": "synthetic-grammar", "name": "hf_sfdlm synthetic grammar corpus (20000 sentences, "
                       "seed 0)", "split": "validation"}
    assert {r.metric_type for r in card.data.eval_results} == {"nelbo", "perplexity", "bits_per_byte"}
    assert [r.metric_value for r in card.data.eval_results if r.metric_type == "bits_per_byte"] == \
        [pytest.approx(1.079 / math.log(2) / 4.0)]
    name, parsed = model_index_to_eval_results(metadata["model-index"])
    assert eval_results_to_model_index(name, parsed) == metadata["model-index"]
    assert "**Held-out NELBO / entropy rate = 1.079**" in text and "upper bound" in text
    assert "| data | ptb.train.txt (local) |" in text

    # Regenerated from the folder alone (as `sfdlm push` does): every recorded field is kept.
    again = validate_model_card(write_model_card(tmp_path, license="mit"))
    assert again.data.eval_results == card.data.eval_results and again.data.license == "mit"
    assert again.text.replace("mit", "apache-2.0") == card.text.replace("mit", "apache-2.0")
