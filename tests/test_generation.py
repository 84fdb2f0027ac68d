"""Generation: samplers checked against exact distributions, fixed positions, ragged batches, errors,
streaming, saving the generation config, the CLI, and a trained tiny model."""

import io
import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_config
from scipy import stats

from hf_sfdlm import SFDLMForDiffusionLM, SFDLMGenerationConfig, SFDLMGenerationOutput
from hf_sfdlm.sampling_sfdlm import SAMPLERS, Sampler, confidence, filter_logits, register_sampler
from hf_sfdlm.streaming import CanvasStreamer
from hf_sfdlm.synthetic import word_level_tokenizer

P_VALUE = 1e-3  # chi-square acceptance level; every statistical test runs at a fixed seed


def stub_model(process, probs, mask=None, time_conditioning=False, **config):
    """A model whose denoiser ignores its input: p_hat(x_0 | x_t) = `probs` (V,) at every position, or
    `probs[i]` at position i when `probs` is (L, V). Records the batch size of every call."""
    probs = torch.as_tensor(probs, dtype=torch.float64)
    vocab = probs.shape[-1]
    model = SFDLMForDiffusionLM(tiny_config(vocab_size=vocab, process=process, mask_token_id=mask,
                                            time_conditioning=time_conditioning, **config)).eval()
    logits = probs.log().float()
    model.stub_calls = []
    model.stub_head_positions = []

    def denoise(ids, timesteps=None, attention_mask=None, positions=None):
        model.stub_calls.append(ids.shape[0])
        model.stub_head_positions.append(ids.numel() if positions is None else int(positions.sum()))
        table = logits.expand(ids.shape[1], vocab) if logits.dim() == 1 else logits[: ids.shape[1]]
        out = table.expand(ids.shape[0], -1, -1).clone()
        return out if positions is None else out[positions]

    model.denoise = denoise
    return model


def forbid_forward(model):
    def denoise(*args, **kwargs):
        raise AssertionError("a forward pass ran before the input was checked")
    model.denoise = denoise
    return model


def counts(tokens, vocab):
    return np.bincount(np.asarray(tokens).reshape(-1), minlength=vocab)


def chi_square_p(observed, probs):
    """p-value of observed counts against `probs` (bins with zero probability must be empty)."""
    probs = np.asarray(probs, dtype=np.float64)
    assert observed[probs == 0].sum() == 0, "a zero-probability outcome was drawn"
    keep = probs > 0
    expected = probs[keep] / probs[keep].sum() * observed[keep].sum()
    return stats.chisquare(observed[keep], expected).pvalue


# ------------------------------------------------------------------------------------------ statistics
ABSORBING_P = [0.3, 0.2, 0.15, 0.1, 0.1, 0.1, 0.05, 0.0]  # id 7 is the mask
SURE_P = [0.94, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.0]


@pytest.mark.parametrize("sampler, options, probs", [
    ("ancestral", {}, ABSORBING_P),
    ("confidence", {"confidence_measure": "max_prob"}, ABSORBING_P),
    ("confidence", {"confidence_measure": "margin"}, ABSORBING_P),
    ("confidence", {"confidence_measure": "entropy"}, ABSORBING_P),
    ("threshold", {"confidence_threshold": 0.9}, ABSORBING_P),
    ("threshold", {"confidence_threshold": 0.9}, SURE_P),
])
def test_absorbing_samplers_draw_p_hat(sampler, options, probs):
    """With p_hat fixed, every position is unmasked once, to a draw of p_hat, whichever position the sampler
    picks when (confidence does not depend on the drawn token), so the final tokens are iid p_hat."""
    model = stub_model("absorbing", probs, mask=7)
    out = model.generate(None, max_new_tokens=64, num_return_sequences=64, steps=8, sampler=sampler,
                         return_dict_in_generate=True, generator=torch.Generator().manual_seed(0), **options)
    assert out.sequences.shape == (64, 64)
    assert chi_square_p(counts(out.sequences, 8), probs) > P_VALUE
    if probs is SURE_P:  # every position is sure: one step, one forward pass
        assert out.num_forward_passes.tolist() == [1] * 64


def test_absorbing_ancestral_intermediate_marginals():
    """After the step to time s, a position is masked with probability 1 - alpha(s) and otherwise a draw of
    p_hat (MDLM's reverse process with a fixed prediction)."""
    model = stub_model("absorbing", ABSORBING_P, mask=7, noise_schedule="cosine")
    steps = 4
    out = model.generate(None, max_new_tokens=64, num_return_sequences=64, steps=steps, sampler="ancestral",
                         output_history=True, generator=torch.Generator().manual_seed(1))
    assert len(out.history) == steps
    for j, draft in enumerate(out.history):
        s = (steps - 1 - j) / steps
        alpha_s = math.cos(math.pi / 2 * s)
        expected = [alpha_s * p for p in ABSORBING_P[:7]] + [1 - alpha_s]
        assert chi_square_p(counts(draft, 8), expected) > P_VALUE, j


def exact_uniform_marginals(p_hat, alphas):
    """Marginals of x_s after each reverse step, by composing the reverse kernels in float64. The kernel is
    the normalised D3PM kernel built by brute force, p(x_s | x_t) proportional to q(x_t | x_s)
    sum_{x_0} q(x_s | x_0) p_hat(x_0), independently of `UniformDiffusion.reverse_probs`."""
    p_hat = np.asarray(p_hat, dtype=np.float64)
    vocab = len(p_hat)
    marginal = np.full(vocab, 1.0 / vocab)  # x_1 ~ uniform prior
    out = []
    for alpha_t, alpha_s in zip(alphas[:-1], alphas[1:]):
        a = alpha_t / alpha_s
        step = a * np.eye(vocab) + (1 - a) / vocab  # q(x_t = col | x_s = row)
        from_clean = alpha_s * np.eye(vocab) + (1 - alpha_s) / vocab  # q(x_s = col | x_0 = row)
        kernel = np.zeros((vocab, vocab))  # kernel[z, y] = p(x_s = y | x_t = z)
        for z in range(vocab):
            for y in range(vocab):
                kernel[z, y] = step[y, z] * sum(p_hat[x0] * from_clean[x0, y] for x0 in range(vocab))
            kernel[z] /= kernel[z].sum()
        marginal = marginal @ kernel
        out.append(marginal)
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_in_place_uniform_kernel_is_the_process_kernel(dtype):
    from hf_sfdlm.diffusion import DiscreteDiffusion, NoiseSchedule
    from hf_sfdlm.sampling_sfdlm import uniform_reverse_weights_

    torch.manual_seed(0)
    diffusion = DiscreteDiffusion(11, "uniform", NoiseSchedule("cosine"))
    p_hat = torch.randn(40, 11, dtype=torch.float64).mul(3).softmax(-1)
    x_t = torch.randint(0, 11, (40,))
    t = torch.rand(40, dtype=torch.float64)
    alpha_t, alpha_s = diffusion.schedule.alpha(t), diffusion.schedule.alpha(t * torch.rand(40, dtype=torch.float64))
    expected = diffusion.reverse_probs(p_hat.unsqueeze(1), x_t.unsqueeze(1), alpha_s, alpha_t).squeeze(1)
    weights = p_hat.to(dtype).clone()
    assert uniform_reverse_weights_(weights, x_t, alpha_s, alpha_t).data_ptr() == weights.data_ptr()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(weights.double() / weights.double().sum(-1, keepdim=True), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("overwrite", [False, True])
def test_inverse_cdf_never_draws_a_zero_probability_id(overwrite):
    from hf_sfdlm.sampling_sfdlm import inverse_cdf

    probs = torch.tensor([[0.2, 0.0, 0.8, 0.0, 0.0], [0.0, 0.5, 0.0, 0.5, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0]])
    edges = torch.tensor([0.0, 0.2, 0.5, 1.0], dtype=torch.float64)  # 1.0: rounding reached the total
    drawn = [inverse_cdf(probs.clone(), u.expand(3), overwrite=overwrite).tolist() for u in edges]
    assert drawn == [[0, 1, 0], [2, 1, 0], [2, 3, 0], [2, 3, 0]]


UNIFORM_P = [0.4, 0.25, 0.15, 0.1, 0.06, 0.04]


@pytest.mark.parametrize("schedule", ["loglinear", "cosine"])
@pytest.mark.parametrize("sampler", ["ancestral", "uniform"])
def test_uniform_samplers_match_composed_reverse_kernels(sampler, schedule):
    model = stub_model("uniform", UNIFORM_P, noise_schedule=schedule)
    steps = 4
    out = model.generate(None, max_new_tokens=64, num_return_sequences=64, steps=steps, sampler=sampler,
                         output_history=True, generator=torch.Generator().manual_seed(2))
    grid = SAMPLERS[sampler](None).time_grid(steps)  # "uniform": steps ancestral steps to t_min, then argmax
    alphas = [float(model.diffusion.schedule.alpha(torch.tensor(t))) for t in [grid[0][0]] + [s for _, s in grid]]
    exact = exact_uniform_marginals(UNIFORM_P, alphas)
    ancestral_drafts = steps - 1 if sampler == "ancestral" else steps  # drafts x_s with s > 0
    assert len(out.history) == len(grid)
    for j in range(ancestral_drafts):
        assert chi_square_p(counts(out.history[j], 6), exact[j]) > P_VALUE, j
    # the test has power: the draft at s = 1/2 is not yet distributed as p_hat (its marginal is
    # alpha_s p_hat + (1 - alpha_s) / V under the D3PM kernel with an x_t-independent p_hat)
    assert chi_square_p(counts(out.history[steps - 3], 6), UNIFORM_P) < 1e-6
    final = out.sequences
    if sampler == "ancestral":  # at s = 0 the posterior is p_hat itself
        assert np.allclose(exact[-1], UNIFORM_P)
        assert chi_square_p(counts(final, 6), UNIFORM_P) > P_VALUE
    else:  # Duo's greedy tail: the argmax of p_hat(. | x_{t_min}), one pass more than the steps
        assert grid[-1] == (grid[-2][1], 0.0) and 0 < grid[-1][0] < 1e-3
        assert bool((final == int(np.argmax(UNIFORM_P))).all())


def test_duo_greedy_tail_keeps_one_step_sampling_random():
    """The tail is an extra argmax pass at t_min after the ancestral steps (not an argmax in place of the
    last step), so even one step draws x_{t_min} at random and different seeds give different texts."""
    model = word_model("uniform")
    outs = [model.generate(None, max_new_tokens=8, steps=1, return_dict_in_generate=True,
                           generator=torch.Generator().manual_seed(seed)) for seed in range(4)]
    assert all(out.num_forward_passes.tolist() == [2] for out in outs)
    assert len({tuple(out.sequences[0].tolist()) for out in outs}) > 1


def test_uniform_model_never_writes_the_mask_token():
    probs = [0.05, 0.05, 0.05, 0.85]  # most of p_hat on the mask id 3
    model = stub_model("uniform", probs, mask=3)
    prompt = torch.tensor([[0, 3, 1, 3]])
    out = model.generate(prompt, max_new_tokens=8, steps=4, sampler="ancestral",
                         generator=torch.Generator().manual_seed(0))
    assert not bool((out == 3).any())
    assert out[0, [0, 2]].tolist() == [0, 1]


@pytest.mark.parametrize("measure, order", [
    ("max_prob", [1, 0, 2]), ("margin", [1, 2, 0]), ("entropy", [0, 1, 2])])
def test_confidence_sampler_unmasks_in_order_of_its_measure(measure, order):
    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0, 0.0],      # max 0.5, margin 0.0, exp(-H) 0.50
                          [0.6, 0.2, 0.2, 0.0, 0.0],      # max 0.6, margin 0.4, exp(-H) 0.39
                          [0.45, 0.1, 0.1, 0.35, 0.0]])   # max 0.45, margin 0.1, exp(-H) 0.31
    model = stub_model("absorbing", probs, mask=4)
    out = model.generate(torch.full((1, 3), 4), steps=3, sampler="confidence", confidence_measure=measure,
                         output_history=True, generator=torch.Generator().manual_seed(0))
    revealed = [int(((h[0] != 4) & (prev[0] == 4)).nonzero()) for prev, h in
                zip((torch.full((1, 3), 4),) + out.history[:-1], out.history)]
    assert revealed == order  # one position per step (the per-row budget), most confident first


def test_confidence_measures_against_definitions():
    probs = torch.tensor([[0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3]], dtype=torch.float64)
    assert torch.allclose(confidence(probs, "max_prob"), torch.tensor([0.7, 1 / 3], dtype=torch.float64))
    assert torch.allclose(confidence(probs, "margin"), torch.tensor([0.5, 0.0], dtype=torch.float64))
    entropy = -(probs * probs.log()).sum(-1)
    assert torch.allclose(confidence(probs, "entropy"), torch.exp(-entropy))


def test_filter_logits_matches_brute_force():
    torch.manual_seed(0)
    logits = torch.randn(5, 7, dtype=torch.float64)
    kept = filter_logits(logits, temperature=0.5, top_k=3, top_p=1.0)
    for row, out in zip(logits, kept):
        top3 = set(row.topk(3).indices.tolist())
        assert {i for i in range(7) if out[i] > -math.inf} == top3
        assert torch.allclose(out[list(top3)], row[list(top3)] / 0.5)
    nucleus = filter_logits(logits, temperature=1.0, top_k=0, top_p=0.6)
    for row, out in zip(logits, nucleus):
        probs = row.softmax(-1)
        order = probs.argsort(descending=True).tolist()
        mass, keep = 0.0, set()
        for i in order:  # smallest prefix whose mass reaches 0.6
            keep.add(i)
            mass += float(probs[i])
            if mass >= 0.6:
                break
        assert {i for i in range(7) if out[i] > -math.inf} == keep


# ------------------------------------------------------------------------------------------ the canvas
TOKENIZER = word_level_tokenizer()
MASK, PAD, EOS = TOKENIZER.mask_token_id, TOKENIZER.pad_token_id, TOKENIZER.eos_token_id
SAMPLER_CASES = [("absorbing", "ancestral", None), ("absorbing", "confidence", None),
                 ("absorbing", "threshold", None), ("absorbing", "confidence", 3),
                 ("uniform", "ancestral", None), ("uniform", "uniform", None), ("uniform", "uniform", 3)]


def word_model(process, **config):
    torch.manual_seed(0)
    return SFDLMForDiffusionLM(tiny_config(vocab_size=len(TOKENIZER), process=process, mask_token_id=MASK,
                                           pad_token_id=PAD, eos_token_id=EOS, **config)).eval()


def encode(text):
    return TOKENIZER(text)["input_ids"]


@pytest.mark.parametrize("process, sampler, block_length", SAMPLER_CASES)
def test_fixed_positions_never_change_and_prompts_survive_decoding(process, sampler, block_length):
    model = word_model(process)
    prompt = "the small dog sees a [MASK] ball near the [MASK] ."
    ids = torch.tensor([encode(prompt)])
    fixed = ids[0] != MASK
    out = model.generate(ids, max_new_tokens=6, steps=6, sampler=sampler, block_length=block_length,
                         output_history=True, generator=torch.Generator().manual_seed(0))
    for draft in out.history + (out.sequences,):
        assert torch.equal(draft[0, : ids.shape[1]][fixed], ids[0][fixed])
    final = out.sequences[0]
    assert not bool((final == MASK).any())
    words = TOKENIZER.decode(final[: ids.shape[1]]).split(" ")
    for got, given in zip(words, prompt.split(" ")):
        assert given == "[MASK]" or got == given
    plain = "the small dog sees a"  # a prompt without masks decodes back byte for byte
    cont = model.generate(torch.tensor([encode(plain)]), max_new_tokens=4, steps=4, sampler=sampler,
                          generator=torch.Generator().manual_seed(0))
    assert TOKENIZER.decode(cont[0, : len(encode(plain))]) == plain


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("process, sampler, block_length", SAMPLER_CASES)
def test_ragged_batch_rows_equal_rows_generated_alone(process, sampler, block_length, side):
    model = word_model(process)
    prompts = [encode("the small dog sees a [MASK] ball"), encode("tom sleeps"), encode("[MASK] cat likes the")]
    width = max(map(len, prompts))
    ids = torch.full((3, width), PAD)
    attention = torch.zeros(3, width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        span = slice(width - len(prompt), width) if side == "left" else slice(0, len(prompt))
        ids[row, span], attention[row, span] = torch.tensor(prompt), 1
    options = dict(max_new_tokens=6, steps=6, sampler=sampler, block_length=block_length,
                   return_dict_in_generate=True)
    seeds = [11, 12, 13]
    batch = model.generate(ids, attention_mask=attention, **options,
                           generator=[torch.Generator().manual_seed(s) for s in seeds])
    real = torch.cat([attention.bool(), torch.ones(3, 6, dtype=torch.bool)], 1)
    for row, prompt in enumerate(prompts):
        alone = model.generate(torch.tensor([prompt]), **options,
                               generator=[torch.Generator().manual_seed(seeds[row])])
        assert torch.equal(batch.sequences[row][real[row]], alone.sequences[0])
        assert bool((batch.sequences[row][~real[row]] == PAD).all())  # padding stays in place
        assert batch.num_forward_passes[row] == alone.num_forward_passes[0]


def test_seed_reproducibility_and_num_return_sequences():
    model = word_model("absorbing")
    ids = torch.tensor([encode("the small dog"), encode("a red ball")])
    first = model.generate(ids, max_new_tokens=5, steps=5, num_return_sequences=3,
                           generator=torch.Generator().manual_seed(3))
    again = model.generate(ids, max_new_tokens=5, steps=5, num_return_sequences=3,
                           generator=torch.Generator().manual_seed(3))
    other = model.generate(ids, max_new_tokens=5, steps=5, num_return_sequences=3,
                           generator=torch.Generator().manual_seed(4))
    assert first.shape == (6, 8) and torch.equal(first, again) and not torch.equal(first, other)
    assert torch.equal(first[:3, :3], ids[:1].expand(3, -1)) and torch.equal(first[3:, :3], ids[1:].expand(3, -1))
    assert len({tuple(row.tolist()) for row in first[:3]}) > 1  # the samples differ
    torch.manual_seed(5)
    global_a = model.generate(ids, max_new_tokens=5, steps=5)
    torch.manual_seed(5)
    assert torch.equal(global_a, model.generate(ids, max_new_tokens=5, steps=5))


def test_text_after_the_first_generated_eos_is_padding_and_ends_the_row():
    vocab, mask, eos, pad, word = 8, 7, 2, 0, 5
    probs = torch.zeros(8, vocab)
    probs[:, word] = 1.0
    probs[4, :] = 0.0
    probs[4, eos] = 1.0  # the model is sure position 4 (the third generated one) ends the text
    model = stub_model("absorbing", probs, mask=mask, eos_token_id=eos, pad_token_id=pad)
    prompt = torch.tensor([[3, 4]])
    out = model.generate(prompt, max_new_tokens=6, steps=6, return_dict_in_generate=True,
                         generator=torch.Generator().manual_seed(0))
    assert out.sequences[0].tolist() == [3, 4, word, word, eos, pad, pad, pad]
    model.stub_calls.clear()
    blocks = model.generate(prompt, max_new_tokens=6, steps=6, block_length=3, sampler="confidence",
                            return_dict_in_generate=True, generator=torch.Generator().manual_seed(0))
    assert blocks.sequences[0].tolist() == [3, 4, word, word, eos, pad, pad, pad]
    assert int(blocks.num_forward_passes[0]) <= 3  # the second block was never denoised
    assert sum(model.stub_calls) == int(blocks.num_forward_passes.sum())


def test_logits_processors_and_filters_shape_p_hat():
    """Processors get what transformers passes them: (N, L) ids (each sampled position's row) and (N, V)
    float32 scores at the N positions drawn in this evaluation; transformers' own processors work."""
    from transformers import GenerationConfig, LogitsProcessorList, SuppressTokensLogitsProcessor

    seen = []

    def record(input_ids, scores):
        seen.append((tuple(input_ids.shape), tuple(scores.shape), scores.dtype))
        return scores

    model = stub_model("absorbing", ABSORBING_P, mask=7)
    processors = LogitsProcessorList([record, SuppressTokensLogitsProcessor([0])])
    out = model.generate(None, max_new_tokens=32, num_return_sequences=8, steps=4,
                         logits_processor=processors, generator=torch.Generator().manual_seed(0))
    assert not bool((out == 0).any())
    assert all(ids[0] == scores[0] and ids[1] == 32 and scores[1] == 8 and dtype == torch.float32
               for ids, scores, dtype in seen)
    assert sum(ids[0] for ids, _, _ in seen) == 8 * 32  # each position is drawn once, in one evaluation
    top1 = model.generate(None, max_new_tokens=16, steps=4, top_k=1, generator=torch.Generator().manual_seed(0))
    assert bool((top1 == 0).all())  # top-k = 1 keeps only the most probable clean token
    plain = model.generate(torch.tensor([[1, 2]]), generation_config=GenerationConfig(max_new_tokens=3))
    assert plain.shape == (1, 5)  # a plain GenerationConfig's shared fields carry over


def test_semi_autoregressive_blocks_finish_left_to_right():
    model = stub_model("absorbing", ABSORBING_P, mask=7)
    out = model.generate(torch.tensor([[1, 2]]), max_new_tokens=6, steps=6, block_length=2,
                         output_history=True, generator=torch.Generator().manual_seed(0))
    blocks = [slice(2, 4), slice(4, 6), slice(6, 8)]
    for draft in out.history:
        masked = [bool((draft[0, b] == 7).any()) for b in blocks]
        started = [not bool((draft[0, b] == 7).all()) for b in blocks]
        for b in range(1, 3):
            assert not started[b] or not masked[b - 1]  # a block starts only once the previous one is done
    assert len(out.history) <= 6 and not bool((out.sequences == 7).any())


def count_network_work(model):
    """Record (rows through the backbone, rows through the LM head) of every forward pass of a real model."""
    calls = []
    model.model.register_forward_hook(lambda module, args, out: calls.append([args[0].shape[0], 0]))
    model.lm_head.register_forward_hook(lambda module, args, out: calls[-1].__setitem__(1, args[0].shape[0]))
    return calls


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_absorbing_run_evaluates_the_head_exactly_where_tokens_unmask(time_conditioning):
    """Forward passes and head rows, counted on the real model: every step's one pass runs the backbone on
    the rows where something unmasks and the LM head on exactly the positions that unmask; rows (and steps)
    without a change make no backbone call."""
    model = word_model("absorbing", time_conditioning=time_conditioning)
    calls = count_network_work(model)
    prompt = torch.tensor([encode("the small dog sees a [MASK] ball")] * 2)
    out = model.generate(prompt, max_new_tokens=10, num_return_sequences=3, steps=24, output_history=True,
                         generator=torch.Generator().manual_seed(0))
    drafts = [out.sequences.new_full(out.sequences.shape, MASK)] + list(out.history)
    drafts[0][:, :7] = prompt.repeat_interleave(3, 0)
    expected = []
    for before, after in zip(drafts[:-1], drafts[1:]):
        changed = before != after
        if changed.any():
            expected.append([int(changed.any(-1).sum()), int(changed.sum())])
    assert calls == expected
    assert sum(head for _, head in calls) == 6 * 11  # each generated position once, nothing else
    assert sum(rows for rows, _ in calls) < 6 * 24  # rows where nothing unmasked cost nothing
    changed_rows = torch.stack([(b != a).any(-1) for b, a in zip(drafts[:-1], drafts[1:])])
    assert out.num_forward_passes.tolist() == changed_rows.sum(0).tolist()


def reference_absorbing_ancestral(model, canvas, steps, generators):
    """A straightforward absorbing ancestral sampler: the full network output at every step, p_hat over the
    whole vocabulary at every position, then per row (its own generator) one uniform per masked position for
    "unmasks now" and one inverse-CDF uniform per unmasking position, in row-major order."""
    canvas = canvas.clone()
    mask = model.config.mask_token_id
    schedule = model.diffusion.schedule
    for k in range(steps, 0, -1):
        t, s = k / steps, (k - 1) / steps
        alpha_t, alpha_s = float(schedule.alpha(torch.tensor(t))), float(schedule.alpha(torch.tensor(s)))
        probs = model.denoise(canvas, torch.full((len(canvas),), t)).float().softmax(-1)
        for row, g in enumerate(generators):
            masked = (canvas[row] == mask).nonzero().squeeze(-1)
            if not len(masked):
                continue
            if k > 1:
                u = torch.rand(len(masked), generator=g, dtype=torch.float64)
                masked = masked[u < (alpha_s - alpha_t) / (1 - alpha_t)]
            if len(masked):
                cdf = probs[row, masked].cumsum(-1)
                u = torch.rand(len(masked), generator=g, dtype=torch.float64).float() * cdf[:, -1]
                canvas[row, masked] = torch.searchsorted(cdf, u.unsqueeze(-1), right=True).squeeze(-1)
    return canvas


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_fast_absorbing_path_gives_the_reference_samples(time_conditioning):
    model = word_model("absorbing", time_conditioning=time_conditioning, noise_schedule="cosine")
    prompt = torch.tensor([encode("the small dog [MASK] a")] * 3)
    seeds = [5, 6, 7]
    fast = model.generate(prompt, max_new_tokens=9, steps=6, generator=[torch.Generator().manual_seed(s) for s in seeds])
    start = torch.cat([prompt, torch.full((3, 9), MASK)], 1)
    reference = reference_absorbing_ancestral(model, start, 6, [torch.Generator().manual_seed(s) for s in seeds])
    assert torch.equal(fast, reference)
    assert not bool((fast == MASK).any()) and len({tuple(r.tolist()) for r in fast}) == 3


def reference_uniform(model, canvas, steps, generators):
    """The `uniform` sampler written plainly: the time grid down to t_min, the full network output (the mask
    token banned), p_hat and the whole reverse kernel at every position, one inverse-CDF uniform per position per row (row-major),
    then the argmax pass at t_min."""
    from hf_sfdlm.sampling_sfdlm import UNIFORM_T_MIN, inverse_cdf

    canvas = canvas.clone()
    diffusion = model.diffusion
    knots = [UNIFORM_T_MIN + (1 - UNIFORM_T_MIN) * k / steps for k in range(steps, -1, -1)]
    for t, s in zip(knots[:-1], knots[1:]):
        rows = len(canvas)
        logits = model.denoise(canvas, torch.full((rows,), t)).float()
        logits[..., MASK] = -math.inf  # a uniform model never writes the mask token
        p_hat = logits.softmax(-1)
        alpha_t, alpha_s = (diffusion.schedule.alpha(torch.full((rows,), x, dtype=torch.float64)) for x in (t, s))
        kernel = diffusion.reverse_probs(p_hat, canvas, alpha_s, alpha_t)
        for row, g in enumerate(generators):
            u = torch.rand(canvas.shape[1], generator=g, dtype=torch.float64)
            canvas[row] = inverse_cdf(kernel[row], u)
    logits = model.denoise(canvas, torch.full((len(canvas),), UNIFORM_T_MIN))
    logits[..., MASK] = -math.inf
    return logits.argmax(-1)


def test_uniform_sampler_gives_the_reference_samples():
    model = word_model("uniform", noise_schedule="cosine")
    seeds = [3, 4]
    fast = model.generate(None, max_new_tokens=10, num_return_sequences=2, steps=5,
                          generator=[torch.Generator().manual_seed(s) for s in seeds])
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    prior = torch.stack([torch.randint(len(TOKENIZER), (10,), generator=g) for g in generators])
    assert torch.equal(fast, reference_uniform(model, prior, 5, generators))


def test_bf16_autocast_generation():
    """compute_dtype="bfloat16": the network runs under autocast, sampling in float32; for the absorbing
    process the unmasking sets do not depend on the network, so they equal float32's draw for draw."""
    model = word_model("absorbing")
    options = dict(max_new_tokens=12, num_return_sequences=3, steps=6, output_history=True)
    runs = {dtype: model.generate(None, compute_dtype=dtype, generator=torch.Generator().manual_seed(0), **options)
            for dtype in ("float32", "bfloat16")}
    for a, b in zip(runs["float32"].history, runs["bfloat16"].history):
        assert torch.equal(a == MASK, b == MASK)
    assert not bool((runs["bfloat16"].sequences == MASK).any())
    dtypes = []
    model.generate(None, compute_dtype="bfloat16", max_new_tokens=4, steps=2,
                   logits_processor=[lambda ids, scores: dtypes.append(scores.dtype) or scores])
    assert dtypes and set(dtypes) == {torch.float32}  # sampling sees float32 logits
    with pytest.raises(ValueError, match="compute_dtype"):
        model.generate(None, max_new_tokens=2, compute_dtype="int8")
    assert SFDLMGenerationConfig(compute_dtype=torch.bfloat16).compute_dtype == "bfloat16"


def test_mdlm_cache_reuses_logits_while_the_canvas_does_not_change():
    """Not noise-conditioned: a row is evaluated again only when its canvas changed since its last evaluation."""
    model = stub_model("uniform", [0.94, 0.02, 0.02, 0.02])
    steps, seeds = 32, [0, 1, 2, 3]
    out = model.generate(None, max_new_tokens=3, num_return_sequences=4, steps=steps, sampler="ancestral",
                         output_history=True, generator=[torch.Generator().manual_seed(s) for s in seeds])
    for row, seed in enumerate(seeds):
        prior = torch.randint(4, (3,), generator=torch.Generator().manual_seed(seed))  # x_1, drawn first
        inputs = [prior] + [h[row] for h in out.history[:-1]]  # the canvas each step starts from
        changes = sum(not torch.equal(a, b) for a, b in zip(inputs[:-1], inputs[1:]))
        assert int(out.num_forward_passes[row]) == 1 + changes < steps
    assert sum(model.stub_calls) == int(out.num_forward_passes.sum())


def test_stop_when_stable_and_stopping_criteria():
    model = stub_model("uniform", [0.97, 0.01, 0.01, 0.01], time_conditioning=True)
    out = model.generate(None, max_new_tokens=4, num_return_sequences=8, steps=64, stop_when_stable=3,
                         output_history=True, generator=torch.Generator().manual_seed(0))
    assert int(out.num_forward_passes.max()) < 64
    history = torch.stack(out.history)
    for row in range(8):
        last = int(out.num_forward_passes[row])  # the row froze after its last evaluation
        assert all(torch.equal(history[i, row], out.sequences[row]) for i in range(last - 1, len(history)))

    class StopAfter:
        def __init__(self):
            self.calls = 0

        def __call__(self, canvas, scores):
            self.calls += 1
            return torch.full((canvas.shape[0],), self.calls >= 2)

    out = model.generate(None, max_new_tokens=4, steps=16, stopping_criteria=StopAfter(),
                         return_dict_in_generate=True, generator=torch.Generator().manual_seed(0))
    assert out.num_forward_passes.tolist() == [2]


def test_streamer_receives_every_draft():
    class Recorder:
        def __init__(self):
            self.events = []

        def put(self, value):
            self.events.append(("put", value.clone()))

        def put_draft(self, value):
            self.events.append(("draft", value.clone()))

        def end(self):
            self.events.append(("end", None))

    model = word_model("absorbing")
    ids = torch.tensor([encode("the small dog sees a [MASK] ball")])
    recorder = Recorder()
    out = model.generate(ids, max_new_tokens=3, steps=5, streamer=recorder, output_history=True,
                         generator=torch.Generator().manual_seed(0))
    kinds = [kind for kind, _ in recorder.events]
    drafts = len(out.history)
    assert 1 <= drafts <= 5 and kinds == ["put"] + ["draft"] * drafts + ["put", "end"]
    start = 5  # the first generated position (the mask)
    assert torch.equal(recorder.events[0][1], ids[:, :start])
    for (_, draft), canvas in zip(recorder.events[1:-2], out.history):
        assert torch.equal(draft, canvas[:, start:])
    assert torch.equal(recorder.events[-2][1], out.sequences[:, start:])


def test_canvas_streamer_redraws_in_place_and_prints_plain_text_elsewhere():
    model = word_model("absorbing")
    ids = torch.tensor([encode("the small dog sees a")])
    live = io.StringIO()
    out = model.generate(ids, max_new_tokens=3, steps=3, streamer=CanvasStreamer(TOKENIZER, 3, stream=live, live=True),
                         sampler="confidence", generator=torch.Generator().manual_seed(0))  # one token per step
    text = TOKENIZER.decode(out[0], skip_special_tokens=True)
    shown = live.getvalue()
    first_draft = shown.split("\n")[0]
    assert first_draft.startswith("the small dog sees a ") and "░" in first_draft  # masks as placeholders
    assert "\033[J" in shown and "3/3" in shown  # redrawn in place, with the progress meter
    assert shown.rstrip("\n").endswith(text)
    plain = io.StringIO()
    model.generate(ids, max_new_tokens=3, steps=3, generator=torch.Generator().manual_seed(0), sampler="confidence",
                   streamer=CanvasStreamer(TOKENIZER, 3, stream=plain, progress=False))
    assert plain.getvalue() == text + "\n"


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("field, value", [
    ("steps", 0), ("steps", -3), ("steps", 2.5), ("top_p", 0.0), ("top_p", 1.5), ("temperature", -1.0),
    ("top_k", -1), ("max_new_tokens", -1), ("block_length", 0), ("sampler", "nope"),
    ("confidence_measure", "vibes"), ("confidence_threshold", 0.0), ("num_return_sequences", 0),
    ("eos_token_id", [])])
def test_bad_generation_config_values_are_named(field, value):
    with pytest.raises(ValueError, match=field):
        SFDLMGenerationConfig(**{field: value})
    model = forbid_forward(word_model("absorbing"))
    with pytest.raises(ValueError, match=field):
        model.generate(torch.tensor([encode("the dog")]), **{field: value})


def test_bad_inputs_fail_before_any_forward_pass():
    model = forbid_forward(word_model("absorbing", max_position_embeddings=16))
    prompt = torch.tensor([encode("the small dog sees a red ball")])  # 7 tokens
    with pytest.raises(ValueError, match="max_length"):
        model.generate(prompt, max_length=5)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(prompt, max_new_tokens=10)
    with pytest.raises(ValueError, match="blocks"):
        model.generate(prompt, max_new_tokens=8, block_length=2, steps=3)
    with pytest.raises(ValueError, match="unexpected"):
        model.generate(prompt, max_new_tokens=2, stepz=3)
    with pytest.raises(ValueError, match="one torch.Generator per output row"):
        model.generate(prompt, max_new_tokens=2, generator=[torch.Generator()] * 2)
    with pytest.raises(ValueError, match="outside"):
        model.generate(torch.tensor([[5, 10_000]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="attention_mask"):
        model.generate(prompt, attention_mask=torch.ones(1, 3), max_new_tokens=2)
    model.config.mask_token_id = model.diffusion.mask_token_id = None
    with pytest.raises(ValueError, match="no mask token"):
        model.generate(prompt, max_new_tokens=2)


def test_do_sample_speaks_transformers_language():
    from transformers import GenerationConfig

    model = word_model("absorbing")
    ids = torch.tensor([encode("the small dog")])
    greedy = model.generate(ids, max_new_tokens=6, steps=6, temperature=0, generator=torch.Generator().manual_seed(0))
    for seed in range(3):  # greedy, whatever the seed, as a kwarg or through a plain GenerationConfig
        generator = torch.Generator().manual_seed(seed)
        assert torch.equal(model.generate(ids, max_new_tokens=6, steps=6, do_sample=False, generator=generator), greedy)
        plain = GenerationConfig(do_sample=False, max_new_tokens=6)
        assert torch.equal(model.generate(ids, generation_config=plain, steps=6,
                                          generator=torch.Generator().manual_seed(seed)), greedy)
    sampled = {tuple(model.generate(ids, max_new_tokens=6, steps=6, do_sample=True,
                                    generator=torch.Generator().manual_seed(seed))[0].tolist()) for seed in range(4)}
    assert len(sampled) > 1
    with pytest.raises(ValueError, match="do_sample"):
        model.generate(ids, max_new_tokens=2, do_sample=True, temperature=0)
    with pytest.raises(ValueError, match="unexpected arguments \\['num_beams'\\]"):
        model.generate(ids, max_new_tokens=2, num_beams=2)


@pytest.mark.parametrize("temperature", [1e-40, 1e-8, 5e-4])
def test_tiny_temperatures_mean_greedy_never_nan(temperature):
    model = word_model("absorbing")
    ids = torch.tensor([encode("the small dog")])
    out = model.generate(ids, max_new_tokens=6, steps=6, temperature=temperature,
                         generator=torch.Generator().manual_seed(1))
    assert not bool((out == MASK).any())
    assert torch.equal(out, model.generate(ids, max_new_tokens=6, steps=6, temperature=0,
                                           generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("generator", [123, "seed", [123]])
def test_generator_of_a_wrong_type_is_named(generator):
    model = forbid_forward(word_model("absorbing"))
    with pytest.raises(TypeError, match="`generator`.*(int|str)"):
        model.generate(torch.tensor([encode("the dog")]), max_new_tokens=2, generator=generator)


def test_uniform_model_mask_errors():
    model = forbid_forward(word_model("uniform"))
    prompt = torch.tensor([encode("the [MASK] dog")])
    with pytest.raises(ValueError, match="cannot be filled|could not be filled"):
        model.generate(prompt, mask_token_id=len(TOKENIZER) + 5)
    with pytest.raises(ValueError, match="sampler='confidence'"):
        model.generate(prompt, sampler="confidence")


def test_misbehaving_custom_sampler_is_caught_and_registry_is_extensible():
    @register_sampler
    class Vandal(Sampler):
        name = "test_vandal"

        def __call__(self, step):
            new = step.canvas.clone()
            new[step.update_mask] = step.x0_probs(step.update_mask).argmax(-1)
            new[:, 0] = 3  # a fixed position
            return new

    @register_sampler
    class OneShot(Sampler):
        """Greedy in one step: every position to its argmax (what a sampler author writes)."""
        name = "test_one_shot"

        def __call__(self, step):
            new = step.canvas.clone()
            new[step.update_mask] = step.x0_probs(step.update_mask).argmax(-1)
            return new

    try:
        model = stub_model("absorbing", ABSORBING_P, mask=7)
        with pytest.raises(RuntimeError, match="outside `update_mask`"):
            model.generate(torch.tensor([[1, 7]]), sampler="test_vandal", steps=2)
        out = model.generate(torch.tensor([[1, 7]]), sampler="test_one_shot", steps=4, max_new_tokens=2,
                             return_dict_in_generate=True)
        assert out.sequences.tolist() == [[1, 0, 0, 0]] and out.num_forward_passes.tolist() == [1]
    finally:
        SAMPLERS.pop("test_vandal", None)
        SAMPLERS.pop("test_one_shot", None)


# ------------------------------------------------------------------------------------------ saving and loading
def test_generation_config_is_saved_and_used_by_default(tmp_path):
    from transformers import AutoModel

    model = word_model("absorbing")
    assert isinstance(model.generation_config, SFDLMGenerationConfig)
    assert model.generation_config.mask_token_id == MASK and model.generation_config.eos_token_id == EOS
    model.generation_config.steps = 3
    model.generation_config.sampler = "confidence"
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    assert saved["steps"] == 3 and saved["sampler"] == "confidence"
    for loaded in (SFDLMForDiffusionLM.from_pretrained(tmp_path), AutoModel.from_pretrained(tmp_path),
                   AutoModel.from_pretrained(tmp_path, trust_remote_code=True)):
        assert type(loaded.generation_config).__name__ == "SFDLMGenerationConfig"
        assert loaded.generation_config.steps == 3
        out = loaded.generate(torch.tensor([encode("the dog")]), max_new_tokens=4, output_history=True)
        assert len(out.history) == 3  # the saved steps are the default
        assert len(loaded.generate(torch.tensor([encode("the dog")]), max_new_tokens=4, steps=2,
                                   output_history=True).history) == 2  # keyword arguments override
    assert isinstance(out, SFDLMGenerationOutput)
    from transformers import GenerationConfig

    plain = GenerationConfig.from_pretrained(tmp_path)  # the saved sampler fields survive a plain load
    assert (plain.steps, plain.sampler, plain.mask_token_id) == (3, "confidence", MASK)
    assert SFDLMGenerationConfig.from_generation_config(plain).to_diff_dict() == \
        SFDLMGenerationConfig.from_pretrained(tmp_path).to_diff_dict()
    out = model.generate(torch.tensor([encode("the dog")]), generation_config=plain, max_new_tokens=4,
                         output_history=True)
    assert len(out.history) == 3


# ------------------------------------------------------------------------------------------ the CLI
@pytest.fixture
def saved_word_model(tmp_path):
    def save(process, mask=True):
        model = word_model(process)
        if not mask:
            model.config.mask_token_id = None
            model.generation_config.mask_token_id = None
        path = tmp_path / process
        model.save_pretrained(path)
        TOKENIZER.save_pretrained(path)
        return path
    return save


def test_cli_generate_and_infill(saved_word_model, capsys):
    from hf_sfdlm.cli import main

    path = saved_word_model("absorbing")
    assert main(["generate", "--model", str(path), "--prompt", "the small dog", "--steps", "4",
                 "--max-new-tokens", "5", "--no-live", "--sampler", "confidence"]) == 0
    assert capsys.readouterr().out.startswith("the small dog")
    text = "the [MASK] dog sees a [MASK] ball ."
    assert main(["infill", "--model", str(path), "--text", text, "--steps", "4", "--no-live"]) == 0
    filled = capsys.readouterr().out.strip().split(" ")
    given = text.split(" ")
    assert len(filled) == len(given) and "[MASK]" not in filled
    assert all(g == f for g, f in zip(given, filled) if g != "[MASK]")


def test_cli_infill_with_a_uniform_model(saved_word_model, capsys):
    from hf_sfdlm.cli import main

    path = saved_word_model("uniform", mask=False)  # the tokenizer's [MASK] marks the holes
    text = "the [MASK] dog sees a [MASK] ball ."
    assert main(["infill", "--model", str(path), "--text", text, "--steps", "4", "--no-live"]) == 0
    filled = capsys.readouterr().out.strip().split(" ")
    assert "[MASK]" not in filled and filled[0] == "the" and filled[2] == "dog"
    assert main(["infill", "--model", str(path), "--text", "no holes here", "--no-live"]) == 2
    assert "sfdlm infill: error: --text contains no '[MASK]' placeholder" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ a trained model
CYCLES = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [1, 5, 9, 13]])


def cyclic_batch(rows, length, generator):
    """Sequences that repeat one of four 4-cycles from a random phase (16 equally likely sequences)."""
    cycle = torch.randint(0, len(CYCLES), (rows,), generator=generator)
    phase = torch.randint(0, 4, (rows,), generator=generator)
    index = (torch.arange(length) + phase[:, None]) % 4
    return CYCLES[cycle][torch.arange(rows)[:, None], index]


@pytest.mark.slow
@pytest.mark.parametrize("process", ["absorbing", "uniform"])
def test_trained_tiny_model_generates_text_with_low_nelbo(process):
    torch.manual_seed(0)
    length, vocab = 16, 16
    config = tiny_config(vocab_size=vocab, process=process, mask_token_id=15 if process == "absorbing" else None,
                         hidden_size=32, fourier_intermediate_size=64, ssm_state_size=8)
    model = SFDLMForDiffusionLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        batch = cyclic_batch(64, length, generator)
        loss = model(batch, labels=batch, generator=generator).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    samples = model.generate(None, max_new_tokens=length, steps=16, num_return_sequences=32,
                             generator=torch.Generator().manual_seed(1))
    random = torch.randint(0, 15, (32, length), generator=generator)  # never the mask token
    sample_nelbo = model.nelbo(samples, num_samples=8, generator=generator).mean()
    random_nelbo = model.nelbo(random, num_samples=8, generator=generator).mean()
    assert sample_nelbo < 0.25 * random_nelbo, (sample_nelbo, random_nelbo)
    # and the samples are mostly the cycles: consecutive pairs are cycle steps
    pairs = {(int(c[i]), int(c[(i + 1) % 4])) for c in CYCLES for i in range(4)}
    follows = [(int(a), int(b)) in pairs for row in samples for a, b in zip(row[:-1], row[1:])]
    assert np.mean(follows) > 0.8


# ------------------------------------------------------------------ greedy decoding is deterministic (issue 22, item 1)
GREEDY_CASES = [("absorbing", "elbo", "ancestral"), ("absorbing", "elbo", "confidence"),
                ("absorbing", "elbo", "threshold"), ("uniform", "elbo", "ancestral"), ("uniform", "elbo", "uniform"),
                ("absorbing", "score_entropy", "tweedie"), ("absorbing", "score_entropy", "euler"),
                ("uniform", "score_entropy", "tweedie"), ("uniform", "score_entropy", "euler")]


def order_dependent_model(process, objective="elbo", seed=0):
    """A word-level model with weights randomised past the adaLN-Zero identity init, so that its predictions
    depend on the canvas (hence on which positions were unmasked or changed before)."""
    model = word_model(process, objective=objective)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.5, generator=generator)
    return model


@pytest.mark.parametrize("process, objective, sampler", GREEDY_CASES)
def test_greedy_generation_is_a_deterministic_function_of_the_input(process, objective, sampler):
    """Five greedy calls (do_sample=False, temperature=0 or a plain GenerationConfig(do_sample=False); other
    seeds, no generator) give one output, with and without semi-AR blocks; sampled calls on the same model do
    differ, so the model's predictions depend on what was decoded before (the identity-initialised model
    used before hid the random unmasking order)."""
    from transformers import GenerationConfig

    model = order_dependent_model(process, objective)
    ids = torch.tensor([encode("the small dog"), encode("a big cat")])
    for block_length in (None, 4):
        options = dict(max_new_tokens=8, steps=8, sampler=sampler, block_length=block_length)
        calls = [model.generate(ids, do_sample=False, generator=torch.Generator().manual_seed(0), **options),
                 model.generate(ids, temperature=0, generator=torch.Generator().manual_seed(1), **options),
                 model.generate(ids, generation_config=GenerationConfig(do_sample=False), **options),
                 model.generate(ids, do_sample=False, generator=[torch.Generator().manual_seed(s) for s in (5, 6)],
                                **options),
                 model.generate(ids, do_sample=False, **options)]
        assert all(torch.equal(call, calls[0]) for call in calls[1:]), (block_length, calls)
        assert not (calls[0] == MASK).any()
        sampled = {tuple(model.generate(ids, do_sample=True, generator=torch.Generator().manual_seed(seed),
                                        **options).flatten().tolist()) for seed in range(5)}
        assert len(sampled) > 1


@pytest.mark.parametrize("process, objective, sampler", GREEDY_CASES)
def test_greedy_samplers_never_draw(process, objective, sampler, monkeypatch):
    """Determinism by construction: in greedy mode no sampler asks a generator for anything."""
    from hf_sfdlm.sampling_sfdlm import SamplingStep

    def refuse(*args, **kwargs):
        raise AssertionError("a greedy step drew a random number")

    monkeypatch.setattr(SamplingStep, "uniform", refuse)
    model = order_dependent_model(process, objective)
    out = model.generate(torch.tensor([encode("the small dog")]), max_new_tokens=6, steps=6, sampler=sampler,
                         do_sample=False)
    assert not (out == MASK).any()
    with pytest.raises(AssertionError, match="drew a random number"):
        model.generate(torch.tensor([encode("the small dog")]), max_new_tokens=6, steps=6, sampler=sampler)


def test_greedy_ancestral_unmasks_the_expected_number_of_the_most_confident_positions():
    """Absorbing, greedy: each step unmasks round(m (alpha_s - alpha_t) / (1 - alpha_t)) of the m masked
    positions (read from the history against the schedule), and they are the confidence sampler's greedy
    choice (same output, same history)."""
    model = order_dependent_model("absorbing")
    ids = torch.tensor([encode("the small dog")])
    steps, new = 5, 9
    ancestral = model.generate(ids, max_new_tokens=new, steps=steps, do_sample=False, output_history=True)
    confident = model.generate(ids, max_new_tokens=new, steps=steps, do_sample=False, output_history=True,
                               sampler="confidence")
    assert torch.equal(ancestral.sequences, confident.sequences)
    assert all(torch.equal(a, b) for a, b in zip(ancestral.history, confident.history))
    schedule = model.diffusion.schedule  # loglinear: (alpha_s - alpha_t) / (1 - alpha_t) = (t - s) / t = 1 / k
    masked = new
    for k, canvas in zip(range(steps, 0, -1), ancestral.history):
        t, s = k / steps, (k - 1) / steps
        ratio = float((schedule.alpha(s) - schedule.alpha(t)) / (1 - schedule.alpha(t)))
        masked -= math.floor(masked * ratio + 0.5)
        assert int((canvas == MASK).sum()) == masked
    assert masked == 0


# ------------------------------------------------------------------ DiffusionGemma's generation contract (issue 22, item 10)
def diffusion_gemma_config(**fields):
    from transformers import GenerationConfig

    return GenerationConfig(**{"max_denoising_steps": 5, "t_min": 0.4, "t_max": 0.8, "return_dict_in_generate": True,
                               "max_new_tokens": 8, **fields})


def test_diffusion_gemma_temperature_schedule_is_transformers_own(monkeypatch):
    """A plain GenerationConfig with DiffusionGemma's fields: `max_denoising_steps` steps per block, each at
    the temperature of transformers' LinearTemperatureScheduleLogitsProcessor for the steps left."""
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import LinearTemperatureScheduleLogitsProcessor

    import hf_sfdlm.generation_sfdlm as generation

    seen = []
    original = generation.filter_logits
    monkeypatch.setattr(generation, "filter_logits", lambda logits, temperature, *rest: (
        seen.append(temperature), original(logits, temperature, *rest))[1])
    model = order_dependent_model("uniform")
    ids = torch.tensor([encode("the small dog")])
    out = model.generate(ids, generation_config=diffusion_gemma_config(), sampler="ancestral", block_length=4)
    assert out.num_forward_passes.tolist() == [10]  # 5 steps for each of the 2 blocks
    schedule = LinearTemperatureScheduleLogitsProcessor(t_min=0.4, t_max=0.8, max_denoising_steps=5)
    expected = [float(1 / schedule(None, torch.ones(1, 1), n)) for n in range(5, 0, -1)]
    assert seen == pytest.approx(expected * 2, rel=1e-6)
    sampled = {tuple(model.generate(ids, generation_config=diffusion_gemma_config(), sampler="ancestral",
                                    generator=torch.Generator().manual_seed(seed)).sequences[0].tolist())
               for seed in range(3)}
    assert len(sampled) > 1  # the schedule samples (DiffusionGemma always does); do_sample=False is greedy
    seen.clear()
    model.generate(ids, generation_config=diffusion_gemma_config(do_sample=False), sampler="ancestral")
    assert set(seen) == {0.0}


def confident_stub(process, length=8):
    """p_hat puts 1 - 1e-6 on token (i mod 3) + 1 at position i, whatever the input: an argmax canvas that
    never changes, and a mean entropy of about 2e-5 nats."""
    vocab = 6
    probs = torch.full((length + 4, vocab), 1e-6 / (vocab - 2))
    probs[:, vocab - 1] = 0 if process == "absorbing" else probs[0, 0]
    for i in range(length + 4):
        probs[i, i % 3 + 1] = 1 - 1e-6
    return stub_model(process, probs / probs.sum(-1, keepdim=True), mask=vocab - 1 if process == "absorbing" else None,
                      time_conditioning=True)  # no MDLM cache across steps: one pass per step


@pytest.mark.parametrize("process", ["absorbing", "uniform"])
def test_diffusion_gemma_stable_and_confident_stop(process):
    """`stability_threshold` n: the block stops (taking its argmax canvas) at the first step whose argmax
    canvas equals those of the n steps before and whose mean entropy is below `confidence_threshold`
    (DiffusionGemma's default 0.005 when unset); `tokens_per_forward` is generated tokens per pass."""
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import StableAndConfidentStoppingCriteria

    ids = torch.tensor([[1, 2]])
    expected = torch.tensor([[1, 2] + [i % 3 + 1 for i in range(2, 10)]])
    logits = confident_stub(process).denoise(expected, None)[:, 2:].float()
    for threshold, passes in ((0, 1), (1, 2), (3, 4)):
        criteria = StableAndConfidentStoppingCriteria(stability_threshold=threshold, confidence_threshold=0.005)
        stops = [bool(criteria(logits.argmax(-1), logits)) for _ in range(6)]
        assert stops.index(True) + 1 == passes  # transformers' own criteria stop at the same step
        model = confident_stub(process)
        out = model.generate(ids, generation_config=diffusion_gemma_config(stability_threshold=threshold,
                                                                          max_denoising_steps=6),
                             sampler="ancestral")
        assert out.num_forward_passes.tolist() == [passes], threshold
        assert torch.equal(out.sequences, expected)
        assert out.tokens_per_forward.tolist() == [pytest.approx(8 / passes)]
    model = confident_stub(process)  # not confident enough: every step runs, with one pass each
    out = model.generate(ids, generation_config=diffusion_gemma_config(stability_threshold=0, confidence_threshold=1e-6,
                                                                      max_denoising_steps=6, do_sample=False),
                         sampler="ancestral")
    assert out.num_forward_passes.tolist() == [6] and len(model.stub_calls) == 6
    assert torch.equal(out.sequences, expected)


def test_diffusion_gemma_fields_are_validated_and_take_priority_over_ours():
    model = word_model("absorbing")
    ids = torch.tensor([encode("the small dog")])
    model.generation_config.steps = 12  # the model's default, overridden by DiffusionGemma's per-block steps
    out = model.generate(ids, generation_config=diffusion_gemma_config(max_denoising_steps=3), block_length=4,
                         sampler="confidence")
    assert out.num_forward_passes.tolist() == [6]
    assert model.generate(ids, max_new_tokens=8, max_denoising_steps=2, return_dict_in_generate=True,
                          sampler="confidence").num_forward_passes.tolist() == [2]
    cases = [(dict(steps=4, max_denoising_steps=4), "both set"), (dict(t_min=0.5), "needs both"),
             (dict(t_min=0.5, t_max=0.5), "greater than `t_min`"), (dict(t_min=-1.0, t_max=1.0), "t_min"),
             (dict(t_min=0.1, t_max=0.5, temperature=0.7), "both set the temperature"),
             (dict(stability_threshold=1, sampler="threshold"), "DiffusionGemma's mean-entropy"),
             (dict(stability_threshold=-1), "stability_threshold"),
             (dict(stability_threshold=1, confidence_threshold=0.0), "mean entropy"),
             (dict(confidence_threshold=2.0), r"\(0, 1\]")]
    for fields, message in cases:
        with pytest.raises(ValueError, match=message):
            SFDLMGenerationConfig(**fields)
    SFDLMGenerationConfig(stability_threshold=1, confidence_threshold=2.0)  # nats: above 1 is fine there
