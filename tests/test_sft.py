"""SFT data: the prompt is never corrupted nor scored, the response and its EOS are, padding is neither."""

import json

import pytest
import torch
from conftest import tiny_config

from hf_sfdlm import SFDLMForDiffusionLM
from hf_sfdlm.diffusion import NoiseDraw
from hf_sfdlm.sft import IGNORE_INDEX, SFTCollator, is_sft_file, load_sft_dataset, sft_example
from hf_sfdlm.synthetic import word_level_tokenizer

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} [EOS] {% endfor %}"
                 "{% if add_generation_prompt %}assistant {% endif %}")



@pytest.fixture
def tokenizer():
    tok = word_level_tokenizer()
    tok.pad_token = tok.eos_token  # LLaDA-style: pad with EOS, the case where padding used to be counted
    return tok


def words(tokenizer, n: int, offset: int = 0) -> str:
    vocab = [w for w in tokenizer.get_vocab() if not w.startswith("[")]
    return " ".join(sorted(vocab)[offset + i] for i in range(n))


def records(tokenizer):
    return [{"prompt": words(tokenizer, 5), "response": words(tokenizer, 3, 10)},
            {"prompt": words(tokenizer, 2, 20), "response": words(tokenizer, 7, 30)},
            {"prompt": words(tokenizer, 8, 40), "response": words(tokenizer, 1, 50)}]


def model_for(tokenizer, **overrides) -> SFDLMForDiffusionLM:
    model = SFDLMForDiffusionLM(tiny_config(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                                            **overrides))
    with torch.no_grad():  # open the adaLN gates, as after pretraining
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


def test_prompt_is_unscored_and_the_response_ends_with_a_scored_eos(tokenizer):
    example = sft_example(records(tokenizer)[0], tokenizer)
    prompt = tokenizer(words(tokenizer, 5), add_special_tokens=False)["input_ids"]
    response = tokenizer(words(tokenizer, 3, 10), add_special_tokens=False)["input_ids"]
    assert example["input_ids"] == prompt + response + [tokenizer.eos_token_id]
    assert example["labels"] == [IGNORE_INDEX] * 5 + response + [tokenizer.eos_token_id]
    # Truncation cuts the response; a prompt that fills the budget is skipped.
    assert sft_example(records(tokenizer)[0], tokenizer, max_length=7)["labels"] == [IGNORE_INDEX] * 5 + response[:2]
    assert sft_example(records(tokenizer)[0], tokenizer, max_length=5) is None


def test_eos_padding_is_not_counted_but_the_responses_eos_is(tokenizer):
    batch = SFTCollator(tokenizer.pad_token_id)([sft_example(r, tokenizer) for r in records(tokenizer)])
    eos = tokenizer.eos_token_id
    assert tokenizer.pad_token_id == eos
    scored = batch["labels"] != IGNORE_INDEX
    assert scored.sum(-1).tolist() == [3 + 1, 7 + 1, 1 + 1]  # response + its EOS, nothing of the padding
    lengths = batch["attention_mask"].sum(-1)
    assert lengths.tolist() == [9, 10, 10]
    for row, length in enumerate(lengths.tolist()):
        assert batch["labels"][row, length - 1] == eos  # the real EOS is a target
        assert (batch["input_ids"][row, length:] == eos).all() and (batch["labels"][row, length:] == IGNORE_INDEX).all()


def logits_grad(model, batch, generator):
    """Forward with labels, return (loss, noisy ids, d loss / d logits)."""
    captured = {}

    def keep(module, inputs, output):
        output.retain_grad()
        captured["logits"] = output

    handle = model.lm_head.register_forward_hook(keep)
    try:
        out = model(**batch, generator=generator)
        out.loss.backward()
    finally:
        handle.remove()
    return out.loss, out.noisy_input_ids, captured["logits"].grad


@pytest.mark.parametrize("process", ["uniform", "absorbing"])
def test_prompt_and_padding_never_change_nor_contribute_to_the_loss(tokenizer, process):
    extra = {"mask_token_id": tokenizer.mask_token_id} if process == "absorbing" else {}
    model = model_for(tokenizer, process=process, **extra)
    model.head_only_loss = False  # the full canvas, so that every position has logits to take gradients of
    batch = SFTCollator(tokenizer.pad_token_id)([sft_example(r, tokenizer) for r in records(tokenizer)])
    scored = batch["labels"] != IGNORE_INDEX
    generator = torch.Generator().manual_seed(0)
    changed_somewhere = torch.zeros_like(scored)
    for _ in range(20):
        model.zero_grad()
        loss, noisy, grad = logits_grad(model, batch, generator)
        # Prompt and padding positions are never corrupted ...
        assert torch.equal(noisy[~scored], batch["input_ids"][~scored])
        changed_somewhere |= noisy != batch["input_ids"]
        # ... and carry no loss: the loss's gradient with respect to their logits is exactly zero.
        assert (grad[~scored] == 0).all() and torch.isfinite(grad).all()
        assert grad[scored].abs().sum() > 0
        assert torch.isfinite(loss)
    assert changed_somewhere[scored].float().mean() > 0.5  # the response is corrupted across draws


def test_loss_is_the_mean_over_response_tokens_only(tokenizer):
    """Recompute the loss from the per-position NELBO terms: the denominator is the number of response
    tokens (their EOS included), not of every real or padded position."""
    model = model_for(tokenizer, process="absorbing", mask_token_id=tokenizer.mask_token_id)
    model.training_estimator = "uniform_t"  # t uniform, weight 1: the draw rebuilt below
    batch = SFTCollator(tokenizer.pad_token_id, pad_to_multiple_of=16)(
        [sft_example(r, tokenizer) for r in records(tokenizer)])
    out = model(**batch, generator=torch.Generator().manual_seed(1))
    scored = batch["labels"] != IGNORE_INDEX
    ones = torch.ones_like(out.timesteps, dtype=torch.float64)
    # Continuous-time absorbing draws: weight 1, no reconstruction atom.
    draw = NoiseDraw(t=out.timesteps, s=None, weight=ones, reconstruction=torch.zeros_like(ones, dtype=torch.bool))
    x0 = torch.where(scored, batch["labels"], batch["input_ids"])
    terms = model.diffusion.loss_terms(out.logits, x0, out.noisy_input_ids, draw)
    assert int(scored.sum()) == (3 + 1) + (7 + 1) + (1 + 1)
    torch.testing.assert_close(out.loss.double(), (terms * scored).sum().double() / scored.sum(), rtol=1e-6, atol=0)


def test_chat_messages_use_the_template_and_learn_only_the_last_reply(tokenizer):
    tokenizer.chat_template = CHAT_TEMPLATE
    messages = [{"role": "user", "content": words(tokenizer, 3)},
                {"role": "assistant", "content": words(tokenizer, 2, 5)},
                {"role": "user", "content": words(tokenizer, 2, 9)},
                {"role": "assistant", "content": words(tokenizer, 4, 12)}]
    example = sft_example({"messages": messages}, tokenizer)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert example["input_ids"] == tokenizer(full, add_special_tokens=False)["input_ids"]
    learned = [i for i, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
    assert tokenizer.decode(learned) == words(tokenizer, 4, 12) + " [EOS]"  # one EOS: the template's
    # prompt/response records can go through the template too
    via_template = sft_example({"prompt": words(tokenizer, 3), "response": words(tokenizer, 2, 5)}, tokenizer,
                               use_chat_template=True)
    assert tokenizer.decode(via_template["input_ids"]).startswith("[UNK] " + words(tokenizer, 3) + " [EOS] [UNK]")


@pytest.mark.parametrize("record, message", [
    ({"prompt": "a"}, "'prompt' and 'response'"),
    ({"prompt": "a", "response": "  "}, "Empty 'response'"),
    ({"messages": [{"role": "user", "content": "a"}]}, "at least two"),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}, "last message"),
])
def test_bad_records_are_named(tokenizer, record, message):
    tokenizer.chat_template = CHAT_TEMPLATE
    with pytest.raises(ValueError, match=message):
        sft_example(record, tokenizer)


def test_messages_without_a_chat_template_are_refused(tokenizer):
    with pytest.raises(ValueError, match="chat template"):
        sft_example({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
                    tokenizer)


def test_jsonl_file_round_trip_and_errors_name_the_record(tmp_path, tokenizer):
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records(tokenizer)) + "\n")
    assert is_sft_file(path) and not is_sft_file(tmp_path / "missing.jsonl")
    dataset = load_sft_dataset(path, tokenizer, max_length=8)
    assert len(dataset) == 2  # the third record's 8-token prompt leaves no room for its response
    assert dataset[0] == sft_example(records(tokenizer)[0], tokenizer, max_length=8)
    assert max(len(ids) for ids in dataset["input_ids"]) == 8
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(records(tokenizer)[0]) + "\n" + json.dumps({"prompt": "x", "response": ""}) + "\n")
    with pytest.raises(ValueError, match="record 2: Empty 'response'"):
        load_sft_dataset(bad, tokenizer)
    text = tmp_path / "plain.jsonl"
    text.write_text(json.dumps({"text": "hello"}) + "\n")
    assert not is_sft_file(text)
    with pytest.raises(ValueError, match="SFT records need"):
        load_sft_dataset(text, tokenizer)


def test_literal_special_token_text_in_records_is_ordinary_text():
    """A prompt or reply that mentions "[MASK]" means the text (issue 10 item 6): it is neither a position to fill
    nor a masked target, while the chat template's own markup keeps its special tokens."""
    from hf_sfdlm.data import train_bpe_tokenizer

    texts = ["write [MASK] or [PAD] or [EOS] literally", "the user said hello", "assistant answers"] * 20
    bpe = train_bpe_tokenizer(texts, vocab_size=300)
    specials = {bpe.mask_token_id, bpe.pad_token_id}
    example = sft_example({"prompt": "what is [MASK]?", "response": "[MASK] and [PAD] are tokens [EOS]"}, bpe)
    assert not specials & set(example["input_ids"])
    assert example["input_ids"].count(bpe.eos_token_id) == 1 and example["input_ids"][-1] == bpe.eos_token_id
    assert bpe.decode(example["input_ids"][:-1]) == "what is [MASK]?[MASK] and [PAD] are tokens [EOS]"

    bpe.chat_template = CHAT_TEMPLATE
    chat = [{"role": "user", "content": "fill [MASK] please"}, {"role": "assistant", "content": "no [MASK] here"}]
    ids = sft_example({"messages": chat}, bpe)["input_ids"]
    assert bpe.mask_token_id not in ids
    # The template's "[EOS]" after each turn stays the control token, as in a conversation without the literal.
    plain = [{"role": "user", "content": "the user said hello"}, {"role": "assistant", "content": "assistant answers"}]
    plain_ids = sft_example({"messages": plain}, bpe)["input_ids"]
    assert ids.count(bpe.eos_token_id) == plain_ids.count(bpe.eos_token_id) == 3  # 2 turn ends + the learned stop
    assert plain_ids[:-1] == bpe.apply_chat_template(plain, tokenize=True)["input_ids"]  # unchanged without literals
    assert "fill [MASK] please" in bpe.decode(ids) and "no [MASK] here" in bpe.decode(ids)


def test_a_prompt_mentioning_mask_trains_with_a_finite_loss(tokenizer):
    record = {"prompt": words(tokenizer, 3) + " [MASK] [PAD]", "response": words(tokenizer, 4, 10) + " [MASK]"}
    example = sft_example(record, tokenizer)
    assert tokenizer.mask_token_id not in example["input_ids"]  # word-level: the literal becomes [UNK]
    model = model_for(tokenizer, process="absorbing", mask_token_id=tokenizer.mask_token_id)
    batch = SFTCollator(tokenizer.pad_token_id)([example, sft_example(records(tokenizer)[0], tokenizer)])
    loss = model(**batch, generator=torch.Generator().manual_seed(0)).loss
    assert torch.isfinite(loss)
    loss.backward()
