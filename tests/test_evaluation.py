"""Tests for hf_sfdlm.evaluation, hf_sfdlm.baselines, the evaluate metric, the lm-eval adapter and `sfdlm eval`.

The NELBO evaluation is checked against values derived independently of `diffusion.py`: a denoiser
whose prediction p_hat is fixed (the same for every x_t and t) has a NELBO whose expectation is known.

* Absorbing process, any schedule, discrete T or continuous time: with carry-over unmasking the
  expected NELBO of a position is sum_i (alpha_{s_i} - alpha_{t_i}) (-log p_hat(x_0)) = -log p_hat(x_0)
  (the weights telescope to alpha(0) - alpha(1) = 1): exactly -log p_hat(x_0) per position.
* Uniform process: positions are independent under a fixed p_hat, so the expected NELBO is a sum of
  per-position sums over steps of E_{x_t}[KL(q(x_s | x_t, x_0) || p(x_s | x_t))], enumerated below
  with explicit V x V transition matrices and Bayes' rule in numpy (continuous time: its T -> inf limit).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, tiny_config
from transformers import AutoTokenizer, GPT2LMHeadModel

from hf_sfdlm import NoiseSchedule, SFDLMForDiffusionLM
from hf_sfdlm.baselines import (TransformerDenoiserForDiffusionLM, count_parameters, gpt2_config,
                                matched_gpt2_config, matched_transformer_denoiser_config,
                                transformer_denoiser_config)
from hf_sfdlm.evaluation import (CompactVocabulary, PerplexityResult, count_bytes, count_words, distinct_n,
                                 evaluate_perplexity, generative_perplexity, infilling_exact_match, make_blocks,
                                 read_text, score_blocks, sequence_nll_samples, span_nll, tokenize_lines, unigram_entropy)

V = 8
GPT2_TOKENIZER = os.path.join(SHARED_DATA, "gpt2-tokenizer")
HAND_TEXT = "hello world\nantidisestablishmentarianism rules\ncafé\n"


def fixed_logits(seed: int = 3) -> torch.Tensor:
    return torch.randn(V, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def with_fixed_prediction(model, logits: torch.Tensor):
    """Replace the network by a stub predicting the same p_hat(x_0) everywhere."""
    def denoise(noisy_input_ids, timesteps=None, attention_mask=None):
        out = logits.expand(*noisy_input_ids.shape, logits.shape[-1]).clone()
        if model.config.process == "absorbing":
            out[..., model.config.mask_token_id] = -math.inf
        return out
    model.denoise = denoise
    return model


def sfdlm_stub(process: str, num_timesteps, schedule: str, logits=None):
    config = tiny_config(vocab_size=V, process=process, num_timesteps=num_timesteps, noise_schedule=schedule,
                         mask_token_id=V - 1 if process == "absorbing" else None)
    return with_fixed_prediction(SFDLMForDiffusionLM(config).eval(), fixed_logits() if logits is None else logits)


def denoiser_stub(process: str, num_timesteps, schedule: str):
    config = transformer_denoiser_config(V, 16, 1, 64, num_heads=2, process=process, num_timesteps=num_timesteps,
                                         noise_schedule=schedule, mask_token_id=V - 1 if process == "absorbing" else None,
                                         time_conditioning=process == "uniform")
    return with_fixed_prediction(TransformerDenoiserForDiffusionLM(config).eval(), fixed_logits())


def absorbing_reference(x0: torch.Tensor, logits: torch.Tensor) -> float:
    log_p = logits.clone()
    log_p[V - 1] = -math.inf
    return float(-log_p.log_softmax(-1)[x0].sum())


def uniform_reference_per_token(schedule: NoiseSchedule, num_timesteps: int, logits: torch.Tensor) -> np.ndarray:
    """E[NELBO] of one position with clean token x0, for every x0 (V,), by enumeration, under the normalised
    D3PM kernel p(x_s = j | x_t = k) proportional to q(k | j) sum_y q(j | y) p_hat(y)."""
    p_hat = torch.softmax(logits, -1).numpy()
    u = np.full(V, 1.0 / V)
    eye = np.eye(V)
    times = np.arange(num_timesteps + 1) / num_timesteps
    alphas = schedule.alpha(torch.tensor(times)).numpy()
    out = np.zeros(V)
    for x0 in range(V):
        marg_1 = alphas[1] * eye + (1 - alphas[1]) * u[None, :]  # q(x_{t_1} | x_0)
        # step 1: reconstruction -log p(x_0 | x_{t_1} = k) = -log[q(k | x_0) p_hat(x_0) / sum_y q(k | y) p_hat(y)]
        total = -float(np.sum(marg_1[x0] * np.log(marg_1[x0] * p_hat[x0] / (p_hat @ marg_1))))
        for i in range(2, num_timesteps + 1):
            a_s, a_t = alphas[i - 1], alphas[i]
            step = (a_t / a_s) * eye + (1 - a_t / a_s) * u[None, :]  # step[j, k] = q(x_t = k | x_s = j)
            marg_s = a_s * eye + (1 - a_s) * u[None, :]  # marg_s[y, j] = q(x_s = j | x_0 = y)
            marg_t = marg_s @ step  # q(x_t | x_0)
            for k in range(V):  # x_t = k
                post = step[:, k][None, :] * marg_s / marg_t[:, k][:, None]  # post[y, j] = q(x_s = j | x_t = k, y)
                p = step[:, k] * (p_hat @ marg_s)
                p = p / p.sum()
                q = post[x0]
                kl = float(np.sum(np.where(q > 0, q * (np.log(np.where(q > 0, q, 1)) - np.log(p)), 0.0)))
                total += marg_t[x0, k] * kl
        out[x0] = total
    return out


BLOCKS = [torch.tensor(row) for row in
          [[0, 1, 2, 3, 4, 5], [6, 6, 0, 0, 1, 2], [3, 3, 3, 4, 5, 6], [2, 4, 6, 1, 3, 5]]]


def check_within_stderr(model, reference: float, num_samples: int = 64, slack: float = 0.0):
    totals, variances = score_blocks(model, BLOCKS * 4, batch_size=8, num_samples=num_samples, seed=11)
    estimate, stderr = float(totals.sum()), float(variances.sum().sqrt())
    assert stderr > 0
    assert abs(estimate - reference) < 4 * stderr + slack, (estimate, reference, stderr)
    return estimate, stderr


# ---------------------------------------------------------------------------------------------- NELBO vs analytic
@pytest.mark.parametrize("num_timesteps,schedule", [(None, "loglinear"), (None, "cosine"), (4, "linear"),
                                                    (10, "loglinear")])
@pytest.mark.parametrize("build", [sfdlm_stub, denoiser_stub], ids=["sfdlm", "transformer"])
def test_absorbing_nelbo_of_fixed_prediction_is_its_cross_entropy(build, num_timesteps, schedule):
    model = build("absorbing", num_timesteps, schedule)
    reference = sum(absorbing_reference(b, fixed_logits()) for b in BLOCKS * 4)
    estimate, stderr = check_within_stderr(model, reference)
    assert stderr < 0.05 * reference  # the check has teeth: a 2x error (no carry-over at step 1) fails it


@pytest.mark.parametrize("num_timesteps,schedule", [(4, "linear"), (10, "cosine"), (None, "loglinear")])
def test_uniform_nelbo_of_fixed_prediction_matches_enumeration(num_timesteps, schedule):
    model = sfdlm_stub("uniform", num_timesteps, schedule)
    # Continuous time: compare with T = 1000 and allow the O(1/T) gap measured between T = 500 and 1000.
    steps = num_timesteps or 1000
    per_token = uniform_reference_per_token(model.noise_schedule, steps, fixed_logits())
    slack = 0.0
    if num_timesteps is None:
        coarse = uniform_reference_per_token(model.noise_schedule, 500, fixed_logits())
        slack = 2 * float(sum(abs(per_token - coarse)[b].sum() for b in BLOCKS * 4))
    reference = float(sum(per_token[b.numpy()].sum() for b in BLOCKS * 4))
    # A fixed p_hat ignores x_t: the reverse chain is then the exact reversal of the forward process started
    # from p_hat, so the bound is tight at its cross-entropy.
    cross_entropy = -float(sum(torch.softmax(fixed_logits(), -1).log()[b].sum() for b in BLOCKS * 4))
    assert reference == pytest.approx(cross_entropy, rel=1e-9)
    check_within_stderr(model, reference, slack=slack)


def test_transformer_denoiser_uses_the_same_estimator_as_sfdlm():
    for process in ("absorbing", "uniform"):
        a, b = sfdlm_stub(process, None, "loglinear"), denoiser_stub(process, None, "loglinear")
        ids = torch.stack(BLOCKS)
        sa = a.nelbo(ids, num_samples=5, generator=torch.Generator().manual_seed(4), return_samples=True)
        sb = b.nelbo(ids, num_samples=5, generator=torch.Generator().manual_seed(4), return_samples=True)
        torch.testing.assert_close(sa, sb)


# ---------------------------------------------------------------------------------------------- conversions
def test_word_byte_token_counts_on_a_hand_made_example():
    tokenizer = AutoTokenizer.from_pretrained(GPT2_TOKENIZER)
    # hello| world|\n  ant|idis|establishment|arian|ism| rules|\n  c|af|é|\n
    assert len(tokenize_lines(HAND_TEXT, tokenizer)) == 14
    assert count_words(HAND_TEXT) == 5 + 3  # five words and three end-of-line tokens
    assert count_words("a b\nc") == 3 + 2  # a last line without a newline still ends a sentence
    assert count_bytes(HAND_TEXT) == 12 + 35 + 6  # "é" is two bytes
    result = PerplexityResult(total_nll=28.0, total_nll_stderr=0.5, num_tokens=14, num_words=8, num_bytes=53,
                              num_sequences=1, block_size=16, num_samples=4, tokenizer="gpt2", estimator="nelbo")
    assert result.token_perplexity == pytest.approx(math.exp(2.0))
    assert result.word_perplexity == pytest.approx(math.exp(3.5))
    assert result.bits_per_byte == pytest.approx(28.0 / (53 * math.log(2)))
    # One NLL, three normalisations: they must convert into each other.
    assert result.token_perplexity ** (14 / 8) == pytest.approx(result.word_perplexity)
    assert result.bits_per_byte * 53 == pytest.approx(result.bits_per_token * 14)
    assert result.stderr("word_perplexity") == pytest.approx(math.exp(3.5) * 0.5 / 8)
    record = result.to_dict()
    assert record["tokenizer"] == "gpt2" and record["word_perplexity"] == pytest.approx(math.exp(3.5))


def test_classic_word_counts_of_ptb_test():
    path = os.path.join(SHARED_DATA, "ptb", "ptb.test.txt")
    if not os.path.exists(path):
        pytest.skip("shared PTB data not present")
    assert count_words(read_text(path)) == 82430  # Mikolov's PTB test set, <eos> included


def test_evaluate_perplexity_end_to_end_with_a_known_nelbo():
    """The text path (tokenize, block, score, normalise) on a stub whose expected NELBO is known."""
    tokenizer = AutoTokenizer.from_pretrained(GPT2_TOKENIZER)
    full_ids = torch.tensor(tokenize_lines(HAND_TEXT, tokenizer))
    # Keep hello| world|\n|ant|idis|establishment; the other six tokens of the text become "other".
    vocabulary = CompactVocabulary.from_token_ids(full_ids[:6].tolist(), len(tokenizer))
    assert vocabulary.size == V - 1
    model = sfdlm_stub("absorbing", None, "loglinear")
    result = evaluate_perplexity(model, tokenizer, HAND_TEXT * 8, block_size=8, num_samples=64, vocabulary=vocabulary,
                                 tokenizer_name="gpt2")
    compact = vocabulary.encode(full_ids.repeat(8))
    n_other = int((compact == vocabulary.other_id).sum())
    assert n_other == 8 * 6
    reference = absorbing_reference(compact, fixed_logits()) + n_other * math.log(len(tokenizer) - (V - 2))
    assert result.num_tokens == 112 and result.num_words == 64 and result.num_bytes == 8 * 53
    assert result.estimator == "nelbo" and result.num_samples == 64 and result.num_sequences == 14
    assert abs(result.total_nll - reference) < 4 * result.total_nll_stderr
    assert result.word_perplexity == pytest.approx(math.exp(result.total_nll / 64))


# ---------------------------------------------------------------------------------------------- autoregressive
def tiny_gpt2(vocab_size: int = V, max_length: int = 16) -> GPT2LMHeadModel:
    return GPT2LMHeadModel(gpt2_config(vocab_size, 16, 1, max_length, num_heads=2)).eval()


def test_autoregressive_nll_is_exact_chain_rule():
    model = tiny_gpt2()
    blocks = make_blocks(list(range(7)) * 3, 8)  # blocks of 8, 8, 5
    totals, variances = score_blocks(model, blocks, batch_size=2, bos_token_id=7)
    assert torch.all(variances == 0)
    for block, total in zip(blocks, totals):
        reference = 0.0
        context = [7]
        for token in block.tolist():  # one prefix at a time: an independent path through the model
            with torch.no_grad():
                logits = model(torch.tensor([context])).logits[0, -1].double()
            reference -= float(logits.log_softmax(-1)[token])
            context.append(token)
        assert float(total) == pytest.approx(reference, rel=1e-5)


def test_compact_vocabulary_keeps_a_normalised_distribution():
    full_size = 20
    vocabulary = CompactVocabulary.from_token_ids([3, 5, 5, 9], full_size, always_keep=[0])
    assert vocabulary.kept_ids == [0, 3, 5, 9] and vocabulary.other_id == 4
    assert vocabulary.encode(torch.tensor([9, 1, 3])).tolist() == [3, 4, 1]
    assert vocabulary.decode(torch.tensor([3, 4, 1]), other_token_id=19).tolist() == [9, 19, 3]
    top = CompactVocabulary.from_token_ids([3, 5, 5, 9, 9, 9, 7], full_size, always_keep=[0], max_kept=3)
    assert top.kept_ids == [0, 5, 9]  # the two most frequent ids and the one always kept
    model = tiny_gpt2(vocab_size=vocabulary.size)
    total = 0.0
    for full in range(full_size):  # p(full id) summed over the whole tokenizer vocabulary must be 1
        ids = torch.tensor([full])
        nll = score_blocks(model, [vocabulary.encode(ids)], bos_token_id=0)[0][0] + vocabulary.penalty(ids)
        total += math.exp(-float(nll))
    assert total == pytest.approx(1.0, rel=1e-9)
    with pytest.raises(ValueError, match="full_size"):
        CompactVocabulary([1, 2], 0)
    with pytest.raises(ValueError, match="Token ids"):
        vocabulary.encode(torch.tensor([25]))


# ---------------------------------------------------------------------------------------------- inputs
def test_read_text_sources_and_errors(tmp_path):
    from datasets import Dataset, DatasetDict

    path = tmp_path / "t.txt"
    path.write_text("a b\nc\nd e f\n", encoding="utf-8")
    assert read_text(path, max_lines=2) == "a b\nc\n"
    assert read_text(DatasetDict(test=Dataset.from_dict({"text": ["x y", "z"]})), split="test") == "x y\nz\n"
    with pytest.raises(ValueError, match="does not exist"):
        read_text(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="max_lines"):
        read_text(path, max_lines=0)
    with pytest.raises(ValueError, match="split"):
        read_text(DatasetDict(test=Dataset.from_dict({"text": ["x"]})), split="train")
    with pytest.raises(TypeError, match="file path"):
        read_text(42)
    with pytest.raises(ValueError, match="block_size"):
        make_blocks([1, 2], 0)
    with pytest.raises(ValueError, match="num_samples"):
        score_blocks(sfdlm_stub("absorbing", None, "loglinear"), BLOCKS, num_samples=1)
    with pytest.raises(TypeError, match="Cannot score"):
        score_blocks(torch.nn.Linear(2, 2), BLOCKS)


# ---------------------------------------------------------------------------------------------- generation quality
def test_generation_diversity_metrics_on_hand_made_rows():
    rows = torch.tensor([[1, 1, 1, 1], [1, 2, 3, 4]])
    assert unigram_entropy(rows) == pytest.approx((0.0 + math.log(4)) / 2)
    assert distinct_n(rows, 1) == pytest.approx(4 / 8)  # {1, 2, 3, 4} over 8 unigrams
    assert distinct_n(rows, 2) == pytest.approx(4 / 6)  # (1,1) (1,2) (2,3) (3,4) over 6 bigrams
    with pytest.raises(ValueError, match="n"):
        distinct_n(rows, 0)


def test_generative_perplexity_and_infilling_metrics():
    judge = tiny_gpt2()
    rows = torch.tensor([[1, 2, 3, 4], [4, 3, 2, 1]])
    totals, _ = score_blocks(judge, list(rows), bos_token_id=0)
    assert generative_perplexity(judge, rows, bos_token_id=0) == pytest.approx(math.exp(float(totals.sum()) / 8))
    span = torch.tensor([[False, True, True, False], [False, False, True, False]])
    predictions = torch.tensor([[1, 2, 3, 4], [4, 3, 0, 1]])
    scores = infilling_exact_match(predictions, rows, span)
    assert scores == {"exact_match": 0.5, "token_accuracy": pytest.approx(2 / 3)}
    with pytest.raises(ValueError, match="Shapes"):
        infilling_exact_match(predictions[:1], rows, span)
    # NLL of the true span under the fixed-prediction absorbing stub: in expectation its cross-entropy.
    model = sfdlm_stub("absorbing", None, "loglinear")
    ids = torch.stack(BLOCKS * 4)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 2:4] = True
    nll = span_nll(model, ids, mask, num_samples=64, generator=torch.Generator().manual_seed(0))
    samples = sequence_nll_samples(model, ids, labels=torch.where(mask, ids, -100), num_samples=64,
                                   generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(nll, samples.mean(-1))
    stderr = float((samples.var(-1) / 64).sum().sqrt())
    reference = sum(absorbing_reference(b[2:4], fixed_logits()) for b in BLOCKS * 4)
    assert abs(float(nll.sum()) - reference) < 4 * stderr


# ---------------------------------------------------------------------------------------------- baselines
def test_matched_baselines_have_matched_parameter_counts():
    sfdlm = SFDLMForDiffusionLM(tiny_config(vocab_size=200, hidden_size=32, fourier_intermediate_size=64))
    target = count_parameters(sfdlm)
    gpt2 = GPT2LMHeadModel(matched_gpt2_config(target, 200, 32, 64, num_heads=2))
    bert = TransformerDenoiserForDiffusionLM(matched_transformer_denoiser_config(
        target, 201, 32, 64, num_heads=2, mask_token_id=200))
    for model in (gpt2, bert):
        assert abs(count_parameters(model) - target) <= 0.02 * target
    assert bert.get_output_embeddings().weight is bert.get_input_embeddings().weight  # tied, counted once


def test_transformer_denoiser_trains_saves_and_loads(tmp_path):
    from transformers import AutoModel

    config = transformer_denoiser_config(V, 16, 1, 32, num_heads=2, mask_token_id=V - 1)
    model = TransformerDenoiserForDiffusionLM(config)
    ids = (torch.randint(0, V - 1, (4, 1)) + torch.arange(12)) % (V - 1)  # each token its left neighbour + 1
    g = torch.Generator

    def held_out_nelbo() -> float:  # the same 64 stratified draws before and after training
        with torch.no_grad():
            return float(model.nelbo(ids, num_samples=64, generator=g().manual_seed(123)).sum())

    before = held_out_nelbo()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(100):  # learn the rule from one repeated batch: the NELBO must fall (to 0.56-0.70x, 5 seeds)
        model(ids, labels=ids, generator=g().manual_seed(step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert held_out_nelbo() < 0.8 * before
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is TransformerDenoiserForDiffusionLM
    model.eval()
    torch.testing.assert_close(model.nelbo(ids, generator=g().manual_seed(1)), loaded.nelbo(ids, generator=g().manual_seed(1)))
    with pytest.raises(ValueError, match="outside"):
        model.denoise(torch.tensor([[V]]))
    with pytest.raises(ValueError, match="mask_token_id"):
        transformer_denoiser_config(V, 16, 1, 32, num_heads=2)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-5), (torch.float32, 1e-4)])
def test_rotary_scores_depend_only_on_the_distance_between_positions(dtype, tolerance):
    from hf_sfdlm.baselines import rotary_tables, rotate

    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8, dtype=dtype), torch.randn(1, 1, 1, 8, dtype=dtype)
    cos, sin = rotary_tables(40, 8, dtype=dtype)
    rq, rk = rotate(q.expand(1, 1, 40, 8), cos, sin), rotate(k.expand(1, 1, 40, 8), cos, sin)
    scores = (rq[0, 0] @ rk[0, 0].T)  # scores[i, j] = <R_i q, R_j k>
    for shift in (1, 7, 20):
        torch.testing.assert_close(scores[shift:, shift:], scores[:-shift, :-shift], rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(scores[0, 0], (q * k).sum())  # position 0 is not rotated
    assert not torch.allclose(scores[0, 1], scores[0, 3])  # but the distance matters


def test_transformer_denoiser_never_attends_to_padding():
    config = transformer_denoiser_config(V, 16, 2, 32, num_heads=2, mask_token_id=V - 1)
    model = TransformerDenoiserForDiffusionLM(config).eval()
    ids = torch.randint(0, V - 1, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    other = ids.clone()
    other[0, 6:] = (ids[0, 6:] + 1) % (V - 1)  # different tokens under the padding
    with torch.no_grad():
        a = model.denoise(ids, attention_mask=mask)
        b = model.denoise(other, attention_mask=mask)
        unmasked = model.denoise(other)
    torch.testing.assert_close(a[0, :6], b[0, :6])
    torch.testing.assert_close(a[1], b[1])
    assert not torch.allclose(a[0, :6], unmasked[0, :6])  # without the mask the same tokens do change them
    with torch.no_grad():  # an all-padding row still gives finite logits (the mask id's is -inf by design)
        assert torch.isfinite(model.denoise(ids, attention_mask=torch.zeros_like(ids))[..., :V - 1]).all()
    with pytest.raises(ValueError, match="even width"):
        transformer_denoiser_config(V, 18, 1, 32, num_heads=2, mask_token_id=V - 1)  # heads of 9 features


def test_transformer_denoiser_under_bf16_autocast_matches_float32():
    torch.manual_seed(0)
    model = TransformerDenoiserForDiffusionLM(transformer_denoiser_config(V, 32, 2, 32, num_heads=2,
                                                                         mask_token_id=V - 1)).eval()
    ids = torch.randint(0, V - 1, (2, 16))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    with torch.no_grad():
        reference = model.denoise(ids, attention_mask=mask)[..., :V - 1]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model.denoise(ids, attention_mask=mask)[..., :V - 1]
    assert low.dtype == torch.bfloat16  # the low-precision path really ran
    assert torch.isfinite(low).all()
    torch.testing.assert_close(low.float(), reference, rtol=0.05, atol=0.05 * float(reference.abs().max()))


def test_ablation_switches_drop_a_branch():
    full = SFDLMForDiffusionLM(tiny_config())
    for field, branch in (("use_ssm", "ssm"), ("use_fourier_mlp", "fourier")):
        ablated = SFDLMForDiffusionLM(tiny_config(**{field: False}))
        block = ablated.model.bottleneck[0]
        assert getattr(block, branch) is None
        removed = sum(p.numel() for p in getattr(full.model.bottleneck[0], branch).parameters())
        assert count_parameters(full) - count_parameters(ablated) == removed * 3  # down, bottleneck, up blocks
        ids = torch.randint(0, 32, (2, 10))
        assert torch.isfinite(ablated(ids, labels=ids).loss)
    with pytest.raises(ValueError, match="at least one branch"):
        tiny_config(use_ssm=False, use_fourier_mlp=False)


# ---------------------------------------------------------------------------------------------- integrations
@pytest.fixture(scope="module")
def saved_word_model(tmp_path_factory):
    """A tiny absorbing SFDLM over the synthetic grammar's word-level tokenizer, saved with its tokenizer."""
    from hf_sfdlm.synthetic import word_level_tokenizer

    tokenizer = word_level_tokenizer()
    config = tiny_config(vocab_size=len(tokenizer), process="absorbing", mask_token_id=tokenizer.mask_token_id)
    torch.manual_seed(0)
    model = SFDLMForDiffusionLM(config).eval()
    path = tmp_path_factory.mktemp("word_model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    words = [w for w in tokenizer.get_vocab() if not w.startswith("[")][:12]
    return path, model, tokenizer, words


def test_evaluate_metric_loads_offline_from_its_folder(saved_word_model):
    import evaluate

    from hf_sfdlm.metrics import SFDLM_PERPLEXITY_PATH

    path, model, tokenizer, words = saved_word_model
    texts = [" ".join(words[:6]), " ".join(words[6:10])]
    metric = evaluate.load(SFDLM_PERPLEXITY_PATH)
    scores = metric.compute(predictions=texts, model_id=str(path), block_size=8, num_samples=4)
    # The same numbers as the library call on the same text and seed.
    direct = evaluate_perplexity(model, tokenizer, "".join(t + "\n" for t in texts), block_size=8, num_samples=4)
    assert scores["total_nll"] == pytest.approx(direct.total_nll)
    assert scores["num_words"] == 10 + 2 and scores["num_tokens"] == 10 and scores["estimator"] == "nelbo"
    assert scores["word_perplexity"] == pytest.approx(math.exp(scores["total_nll"] / 12))
    with pytest.raises(ValueError, match="model_id"):
        metric.compute(predictions=texts)


def test_lm_eval_adapter_runs_a_local_task_offline(saved_word_model, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    import json

    from lm_eval.tasks import TaskManager

    from hf_sfdlm.lm_eval_adapter import SFDLMEvalHarnessLM

    path, model, tokenizer, words = saved_word_model
    rows = [{"question": " ".join(words[i:i + 3]), "choices": [words[i + 3], words[i + 4]], "answer": 0,
             "target": words[i + 3]} for i in range(3)]
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (tmp_path / "mc.yaml").write_text(
        "task: tiny_sfdlm_mc\n" + common + "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\ntarget_delimiter: ' '\n"
        "metric_list:\n  - metric: acc\n")
    (tmp_path / "gen.yaml").write_text(
        "task: tiny_sfdlm_gen\n" + common + "output_type: generate_until\ndoc_to_text: '{{question}}'\n"
        "doc_to_target: '{{target}}'\ngeneration_kwargs:\n  until: ['[EOS]']\n  max_gen_toks: 2\n"
        "metric_list:\n  - metric: exact_match\n")
    lm = SFDLMEvalHarnessLM(pretrained=str(path), num_samples=4, batch_size=4, max_length=32)
    results = lm_eval.simple_evaluate(model=lm, tasks=["tiny_sfdlm_mc", "tiny_sfdlm_gen"],
                                      task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
                                      bootstrap_iters=0, log_samples=True)
    assert 0.0 <= results["results"]["tiny_sfdlm_mc"]["acc,none"] <= 1.0
    assert "exact_match,none" in results["results"]["tiny_sfdlm_gen"]
    # The loglikelihoods the harness saw are the adapter's conditional NELBOs.
    sample = results["samples"]["tiny_sfdlm_mc"][0]
    context, continuation = sample["arguments"][0]
    ids = tokenizer(context + continuation, add_special_tokens=False, return_tensors="pt")["input_ids"]
    n_context = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    labels = ids.clone()
    labels[:, :n_context] = -100
    expected = -float(model.nelbo(ids, labels=labels, num_samples=4, generator=torch.Generator().manual_seed(0)))
    assert sample["resps"][0][0][0] == pytest.approx(expected)
    rolling = lm.loglikelihood_rolling([type("R", (), {"args": (" ".join(words[:5]),)})()])
    assert rolling[0] < 0


def test_sfdlm_eval_command(saved_word_model, tmp_path, capsys):
    import json

    from hf_sfdlm.cli import main

    path, model, tokenizer, words = saved_word_model
    text_file = tmp_path / "eval.txt"
    text_file.write_text(" ".join(words[:7]) + "\n" + " ".join(words[7:10]) + "\n")
    out = tmp_path / "result.json"
    assert main(["eval", str(path), "--text-file", str(text_file), "--block-size", "8", "--nelbo-samples", "4",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "word perplexity" in printed and "NELBO upper bound, 4 t samples" in printed
    record = json.loads(out.read_text())
    direct = evaluate_perplexity(model, tokenizer, text_file.read_text(), block_size=8, num_samples=4)
    assert record["total_nll"] == pytest.approx(direct.total_nll) and record["num_words"] == 12
    # The estimator is chosen by name (the old one stays available) and recorded.
    assert main(["eval", str(path), "--text-file", str(text_file), "--block-size", "8", "--nelbo-samples", "4",
                 "--nelbo-estimator", "uniform_t", "--json", str(out), "--overwrite"]) == 0
    record = json.loads(out.read_text())
    direct = evaluate_perplexity(model, tokenizer, text_file.read_text(), block_size=8, num_samples=4,
                                 estimator="uniform_t")
    assert record["nelbo_estimator"] == "uniform_t" and record["total_nll"] == pytest.approx(direct.total_nll)
    assert main(["eval", str(path), "--text-file", str(text_file), "--nelbo-estimator", "bogus"]) == 2
    assert "bogus" in capsys.readouterr().err
    # An autoregressive model goes through the same command, exactly.
    gpt2_dir = tmp_path / "gpt2"
    gpt2 = GPT2LMHeadModel(gpt2_config(len(tokenizer), 16, 1, 16, num_heads=2, bos_token_id=tokenizer.eos_token_id))
    gpt2.save_pretrained(gpt2_dir)
    tokenizer.save_pretrained(gpt2_dir)
    assert main(["eval", str(gpt2_dir), "--text-file", str(text_file), "--block-size", "8", "--json", str(out),
                 "--overwrite"]) == 0
    record = json.loads(out.read_text())
    assert record["estimator"] == "exact" and record["total_nll_stderr"] == 0.0


def test_benchmark_report_renders_every_json_with_its_command(tmp_path):
    # (the quality benchmark's own tables are tested in tests/test_quality_benchmark.py)
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("bench_report", os.path.join(os.path.dirname(__file__), "..",
                                                                               "benchmarks", "report.py"))
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    (tmp_path / "speed.json").write_text(json.dumps({"benchmark": "speed", "results": [{"model": "a", "tok_s": 12.5}]}))
    text = report.render(tmp_path)
    assert "Command: not recorded in the JSON" in text and "| a | 12.5 |" in text
