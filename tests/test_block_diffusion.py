"""Block diffusion (`config.block_size`, `block_diffusion.py`, `generation_block.py`) against independent
computations: a block-by-block reference whose cross-block SSM term is a direct sum over the SSM kernel,
the full-canvas model (b = L), the autoregressive likelihood (b = 1), and the exact likelihood of the
block-wise reverse chain enumerated over every state of a tiny problem."""

import itertools
import math
import re

import pytest
import torch

from conftest import tiny_config
from hf_sfdlm import SFDLMConfig, SFDLMForDiffusionLM
from hf_sfdlm.block_diffusion import BlockContext, ssm_factors
from hf_sfdlm.modeling_sfdlm import BidirectionalDiagonalSSM

MASK = 31


def block_model(process="absorbing", block_size=4, seed=0, **overrides):
    """A float64 model with every weight randomised past adaLN-Zero's identity start."""
    values = dict(process=process, mask_token_id=MASK if process == "absorbing" else None, block_size=block_size)
    values.update(overrides)
    torch.manual_seed(seed)
    model = SFDLMForDiffusionLM(tiny_config(**values)).double().eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
    return model


def logits_of(model, noisy, t, clean, attention_mask=None):
    with torch.no_grad():
        hidden = model.model(noisy, attention_mask=attention_mask, timesteps=t, clean_input_ids=clean).last_hidden_state
        return finite(model.diffusion.restrict_logits(model.lm_head(hidden)))


def finite(logits):
    """The mask logit of absorbing models (-inf) as -1e300, so that differences of logits are numbers."""
    return logits.nan_to_num(neginf=-1e300)


# ------------------------------------------------------------------------------------------------ config
def test_block_size_is_validated_with_errors_that_name_it():
    with pytest.raises(ValueError, match="block_size"):
        tiny_config(block_size=0)
    with pytest.raises(TypeError, match="block_size"):
        tiny_config(block_size=2.0)
    with pytest.raises(ValueError, match="multiple of the product of `pool_factors`"):
        tiny_config(block_size=3)  # pool factor 2
    with pytest.raises(ValueError, match="convolution mixer has no state"):
        tiny_config(block_size=4, ssm_mode="conv")
    with pytest.raises(ValueError, match="use_ssm"):
        tiny_config(block_size=4, use_ssm=False)
    with pytest.raises(ValueError, match="score_entropy"):
        tiny_config(block_size=4, objective="score_entropy", initializer_range=0.02)
    assert tiny_config().block_size is None
    config = tiny_config(block_size=4)
    assert SFDLMConfig.from_dict(config.to_dict()).block_size == 4


def test_state_factors_give_the_ssm_kernel():
    """The recurrence's (dA, dB, C) must be the ones `kernel` uses: K_l = Re(sum 2C dB dA^l)."""
    torch.manual_seed(0)
    ssm = BidirectionalDiagonalSSM(6, 8, 1e-3, 1e-1).double()
    ssm.reset_parameters()
    with torch.no_grad():
        ssm.log_dt.add_(torch.randn(6, dtype=torch.float64))
        ssm.c.normal_()
    log_da, db, c2 = ssm_factors(ssm)
    lags = torch.arange(50, dtype=torch.float64)
    kernel = (c2.unsqueeze(-1) * db.unsqueeze(-1) * torch.exp(log_da.unsqueeze(-1) * lags)).real.sum(1)
    torch.testing.assert_close(kernel, ssm.kernel(50)[0], atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------------------ backbone
class DirectSumContext:
    """The cross-block term by its definition, sum_{m < s} K_{n-m} u_m over the SSM's kernel, for one block
    whose prefix inputs u (per SSM layer) are in `prefix`; `record` appends this block's inputs after it."""

    def __init__(self, prefix: dict, record: bool):
        self.prefix, self.record = prefix, record

    def __call__(self, ssm, u):
        rows, length, hidden = u.shape
        before = self.prefix.get(ssm, u.new_zeros(rows, 0, hidden))
        start = before.shape[1]
        cross = u.new_zeros(u.shape)
        if start:
            kernel = ssm.kernel(start + length)[0]  # (H, lags)
            lags = start + torch.arange(length).unsqueeze(-1) - torch.arange(start).unsqueeze(0)  # (length, start)
            cross = torch.einsum("hlm,rmh->rlh", kernel[:, lags], before.to(kernel.dtype)).to(u.dtype)
        if self.record:
            self.prefix[ssm] = torch.cat([before, u], dim=1)
        return cross


def sequential_reference(model, noisy, t, clean):
    """Block-by-block logits: block j alone at its t, its SSMs adding the direct sum over the clean blocks < j,
    whose inputs come from running those blocks (clean, t = 0) the same way before. No state, no scan."""
    size = model.config.block_size
    inner = model.model
    prefix, outputs = {}, []
    for j, start in enumerate(range(0, noisy.shape[1], size)):
        end = min(start + size, noisy.shape[1])
        cond = None if t is None else inner._noise_condition(t[:, j], noisy.shape[0], noisy.device)
        zero = None if t is None else inner._noise_condition(torch.zeros_like(t[:, j]), noisy.shape[0], noisy.device)
        with torch.no_grad():
            hidden, _ = inner._backbone(inner.embed_tokens(noisy[:, start:end]), cond,
                                        block_context=DirectSumContext(prefix, record=False))
            hidden = finite(model.diffusion.restrict_logits(model.lm_head(hidden)))
            inner._backbone(inner.embed_tokens(clean[:, start:end]), zero,
                            block_context=DirectSumContext(prefix, record=True))
        outputs.append(hidden)
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("process", ["absorbing", "uniform"])
@pytest.mark.parametrize("length", [12, 10])  # whole blocks, and a shorter last block
def test_vectorised_forward_equals_the_block_by_block_direct_sum(process, length):
    model = block_model(process)
    generator = torch.Generator().manual_seed(1)
    clean = torch.randint(0, 30, (3, length), generator=generator)
    noisy = torch.randint(0, 32 if process == "absorbing" else 30, (3, length), generator=generator)
    t = torch.rand(3, -(-length // 4), generator=generator, dtype=torch.float64)
    fast = logits_of(model, noisy, t, clean)
    reference = sequential_reference(model, noisy, t, clean)
    torch.testing.assert_close(fast, reference, atol=1e-10, rtol=0)
    # the cross-block term matters: blocks read alone differ
    alone = torch.cat([logits_of(model, noisy[:, s:s + 4], t[:, j], clean[:, s:s + 4])
                       for j, s in enumerate(range(0, length, 4))], dim=1)
    assert (alone[:, 4:] - fast[:, 4:]).abs().max() > 1e-3
    torch.testing.assert_close(alone[:, :4], fast[:, :4], atol=1e-12, rtol=0)


def test_without_time_conditioning_one_pass_equals_the_reference():
    model = block_model("absorbing", time_conditioning=False)
    ids = torch.randint(0, 32, (2, 14))
    fast = logits_of(model, ids, None, None)
    torch.testing.assert_close(fast, sequential_reference(model, ids, None, ids), atol=1e-10, rtol=0)


@pytest.mark.parametrize("process", ["absorbing", "uniform"])
def test_changing_a_block_changes_no_logit_of_earlier_blocks(process):
    """Block causality, exactly (float64, 1e-12), with left and right padding: blocks are counted from each
    row's first real token."""
    model = block_model(process)
    generator = torch.Generator().manual_seed(3)
    length = 16
    clean = torch.randint(0, 30, (3, length), generator=generator)
    noisy = torch.where(torch.rand(3, length, generator=generator) < 0.5, clean,
                        torch.full_like(clean, MASK if process == "absorbing" else 7))
    mask = torch.ones(3, length, dtype=torch.long)
    mask[1, :3] = 0  # left padding: row 1's blocks start at position 3
    mask[2, 13:] = 0  # right padding
    start = torch.tensor([0, 3, 0])
    t = torch.rand(3, 4, generator=generator, dtype=torch.float64)
    base = logits_of(model, noisy, t, clean, mask)
    for j in range(1, 3):
        changed_clean, changed_noisy = clean.clone(), noisy.clone()
        for row in range(3):
            s = int(start[row]) + 4 * j
            changed_clean[row, s:s + 4] = (clean[row, s:s + 4] + 1) % 30
            changed_noisy[row, s:s + 4] = (noisy[row, s:s + 4] + 1) % 30
        after = logits_of(model, changed_noisy, t, changed_clean, mask)
        for row in range(3):
            s = int(start[row]) + 4 * j
            real = mask[row].bool()
            earlier = real.clone()
            earlier[s:] = False
            assert (after[row][earlier] - base[row][earlier]).abs().max() <= 1e-12
            later = real.clone()
            later[:s] = False
            assert (after[row][later] - base[row][later]).abs().max() > 1e-4


def test_an_absorbing_block_model_reads_each_blocks_noise_level_from_its_masks():
    """`model(ids)` without timesteps (fill-mask clients): each block's t from its own masked fraction."""
    model = block_model("absorbing")  # loglinear: alpha(t) = 1 - t, so t is the masked fraction
    ids = torch.randint(0, 30, (2, 10))
    ids[0, 4:7] = MASK  # block 1 of row 0: 3 of 4 masked; block 2 (2 tokens): none
    ids[1, 8] = MASK  # block 2 of row 1: 1 of 2
    out = model(ids)
    torch.testing.assert_close(out.timesteps, torch.tensor([[0.0, 0.75, 0.0], [0.0, 0.0, 0.5]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.logits, model(ids, timesteps=out.timesteps).logits)


def test_hidden_states_of_every_stage_in_block_mode():
    """Stage outputs are the blocks' own, concatenated (pooled stages: each block pooled on its own)."""
    model = block_model("uniform")
    ids = torch.randint(0, 30, (2, 10))
    t = torch.rand(2, 3, dtype=torch.float64)
    with torch.no_grad():
        out = model.model(ids, timesteps=t, output_hidden_states=True)
        padded = model.model(torch.cat([ids, ids[:, :3]], 1), timesteps=torch.cat([t, t[:, :1]], 1),
                             attention_mask=torch.cat([torch.ones_like(ids), torch.zeros(2, 3, dtype=torch.long)], 1),
                             output_hidden_states=True)
    # embeddings, down stage, bottleneck pooled per block (2 + 2 + 1 for the 2-token last block), up stage
    assert [s.shape[1] for s in out.hidden_states] == [10, 10, 5, 10]
    torch.testing.assert_close(out.hidden_states[-1], out.last_hidden_state)
    for full, pad in zip(out.hidden_states, padded.hidden_states):
        torch.testing.assert_close(pad[:, :full.shape[1]], full, atol=1e-12, rtol=0)


def test_padding_never_changes_a_real_position():
    model = block_model("uniform")
    ids = torch.randint(0, 30, (1, 10))
    t = torch.rand(1, 3, dtype=torch.float64)
    alone = logits_of(model, ids, t, ids)
    padded = torch.cat([torch.full((1, 3), 5), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 10, dtype=torch.long)], dim=1)
    t_padded = torch.cat([t, torch.rand(1, 1, dtype=torch.float64)], dim=1)  # 13 positions: 4 blocks
    torch.testing.assert_close(logits_of(model, padded, t_padded, padded, mask)[:, 3:], alone, atol=1e-12, rtol=0)


def gradients_of(model, **kwargs):
    model.zero_grad()
    loss = model(**kwargs).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("process", ["absorbing", "uniform"])
@pytest.mark.parametrize("num_timesteps", [None, 4])
def test_block_size_equal_to_the_length_is_the_full_canvas_model(process, num_timesteps):
    """b = L: the same logits, and, draw for draw, the same training loss and gradients (the training law of t
    and head-only for absorbing) and the same `nelbo` under every estimator name, with left padding and
    unscored prompts; the names a model refuses, it refuses in both modes."""
    from hf_sfdlm.diffusion import NELBO_ESTIMATORS

    full = block_model(process, block_size=None, num_timesteps=num_timesteps)
    block = block_model(process, block_size=12, num_timesteps=num_timesteps)
    block.load_state_dict(full.state_dict())
    ids = torch.randint(0, 30, (3, 12))
    t = torch.rand(3, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(block(ids, timesteps=t).logits, full(ids, timesteps=t).logits, atol=1e-12, rtol=0)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    labels = ids.clone()
    labels[1, :3] = labels[2, :5] = -100  # a prompt that conditions but is not scored
    kwargs = dict(input_ids=ids, attention_mask=mask, labels=labels)
    loss_block, grads_block = gradients_of(block, **kwargs, generator=torch.Generator().manual_seed(4))
    loss_full, grads_full = gradients_of(full, **kwargs, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(loss_block, loss_full, atol=1e-12, rtol=0)
    for a, b in zip(grads_block, grads_full):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    for estimator in NELBO_ESTIMATORS + ("bogus",):
        def nelbo(model):
            return model.nelbo(ids, attention_mask=mask, labels=labels, num_samples=3, estimator=estimator,
                               generator=torch.Generator().manual_seed(5), return_samples=True)

        try:
            expected = nelbo(full)
        except ValueError as error:
            with pytest.raises(ValueError, match=re.escape(str(error))):
                nelbo(block)
            continue
        torch.testing.assert_close(nelbo(block), expected, atol=1e-10, rtol=0)


# ------------------------------------------------------------------------------------------------ objective
def test_gradients_flow_through_both_passes():
    """The loss's gradient is the derivative of the loss (central differences in float64), the clean pass
    that carries the earlier blocks included: detaching it would change the directional derivative."""
    model = block_model("absorbing")
    model.train()
    ids = torch.randint(0, 30, (2, 12))
    labels = ids.clone()
    labels[:, :4] = -100  # block 0 only conditions: its effect on the loss goes through the clean pass

    def loss():
        return model(input_ids=ids, labels=labels, generator=torch.Generator().manual_seed(7)).loss

    model.zero_grad()
    loss().backward()
    direction = [torch.randn_like(p) for p in model.parameters()]
    analytic = sum((p.grad * d).sum() for p, d in zip(model.parameters(), direction))
    step = 1e-6
    with torch.no_grad():
        for p, d in zip(model.parameters(), direction):
            p.add_(step * d)
        plus = loss()
        for p, d in zip(model.parameters(), direction):
            p.sub_(2 * step * d)
        minus = loss()
        for p, d in zip(model.parameters(), direction):
            p.add_(step * d)
    assert float(analytic) == pytest.approx(float((plus - minus) / (2 * step)), rel=1e-6)
    embedding_grad = model.model.embed_tokens.weight.grad
    context_only = set(ids[:, :4].flatten().tolist()) - set(ids[:, 4:].flatten().tolist())
    assert any(embedding_grad[token].abs().sum() > 0 for token in context_only) or not context_only


def test_block_training_draws_each_blocks_t_by_the_full_canvas_law_stratified_over_all_blocks():
    """Loglinear (1 - alpha(t) = t): under the importance law t = u^2, so sqrt(t) of the 3 x 3 blocks holds one
    value in each ninth of [0, 1); fixed `timesteps` stay as given."""
    model = block_model("absorbing")
    ids = torch.randint(0, 30, (3, 12))
    with torch.no_grad():
        t = model(input_ids=ids, labels=ids, generator=torch.Generator().manual_seed(0)).timesteps
        assert t.shape == (3, 3)
        u = t.double().flatten().sqrt().sort().values
        k = torch.arange(9, dtype=torch.float64)
        assert bool(((u >= k / 9 - 1e-9) & (u < (k + 1) / 9 + 1e-9)).all()), u
        fixed = torch.rand(3, 3, dtype=torch.float64)
        torch.testing.assert_close(model(input_ids=ids, labels=ids, timesteps=fixed).timesteps.double(), fixed)


def test_block_training_runs_the_head_at_masked_positions_only_with_the_same_loss_and_gradients():
    model = block_model("absorbing")
    ids = torch.randint(0, 30, (2, 10))  # a shorter last block
    labels = ids.clone()
    labels[0, :3] = -100
    kwargs = dict(input_ids=ids, labels=labels)
    calls = []
    hook = model.lm_head.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    head_only_loss, head_only_grads = gradients_of(model, **kwargs, generator=torch.Generator().manual_seed(1))
    out = model(**kwargs, generator=torch.Generator().manual_seed(1))
    hook.remove()
    masked = out.noisy_input_ids == MASK
    assert calls[0] == int(masked.sum()) < ids.numel()  # the head saw the masked positions only
    carry = out.logits[~masked]  # elsewhere: the carry-over, logit 0 at x_t
    assert bool((carry.gather(-1, out.noisy_input_ids[~masked].unsqueeze(-1)) == 0).all())
    model.head_only_loss = False
    full_loss, full_grads = gradients_of(model, **kwargs, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(head_only_loss, full_loss, atol=1e-12, rtol=0)
    for a, b in zip(head_only_grads, full_grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_block_size_one_without_noise_conditioning_is_the_autoregressive_likelihood():
    """b = 1, absorbing, no noise conditioning: p_hat at position j reads x_<j (clean) and a mask, whatever t
    is. The loglinear integrand of a block is 1[masked] / t * (-log p_hat(x_j)) and the block is masked with
    probability t, so its expectation is -log p_hat(x_j) exactly: the NELBO is the AR likelihood -sum log p_hat.
    At t = 1 every block is masked and one draw is that value."""
    from hf_sfdlm.block_diffusion import block_terms

    model = block_model("absorbing", block_size=1, pool_factors=[1], time_conditioning=False)
    ids = torch.randint(0, 30, (3, 9))
    with torch.no_grad():
        masked = logits_of(model, torch.full_like(ids, MASK), None, ids)
        ar_nll = -masked.log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)  # (B, L)
        loss = model(input_ids=ids, labels=ids, timesteps=1.0).loss
        assert float(loss) == pytest.approx(float(ar_nll.mean()), abs=1e-12)
        u = torch.rand(3, 9, dtype=torch.float64)
        terms, _, noisy, t = block_terms(model, ids, torch.ones_like(ids, dtype=torch.bool), None, None, u)
        expected = torch.where(noisy == MASK, ar_nll / t, torch.zeros_like(ar_nll))
        torch.testing.assert_close(terms, expected, atol=1e-12, rtol=0)
        # p_hat(x_j) depends on the prefix: this is a real autoregressive model, not a unigram
        shifted = ids.clone()
        shifted[:, 0] = (ids[:, 0] + 1) % 30
        assert (logits_of(model, torch.full_like(ids, MASK), None, shifted)[:, 1:] - masked[:, 1:]).abs().max() > 1e-3


# Exact likelihood of the block-wise reverse chain: vocabulary 3 (+ mask), length 4, blocks of 2.
def enumeration_model(process, num_timesteps, seed=0, **overrides):
    vocab = 4
    config = dict(vocab_size=vocab, process=process, mask_token_id=3 if process == "absorbing" else None,
                  stage_depths=[1], pool_factors=[], hidden_size=8, num_timesteps=num_timesteps,
                  noise_schedule="cosine", block_size=2)
    config.update(overrides)
    torch.manual_seed(seed)
    model = SFDLMForDiffusionLM(tiny_config(**config)).double().eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
    return model


_MEMO = {}


def block_denoiser(model, x0, block):
    """The model's p_hat for block `block` of x0 as a 2-position denoiser: the earlier block clean, the
    later one anything (it cannot matter), each candidate state of the block at noise level t. Memoised on
    what it reads (the earlier block), so the enumeration over all x0 stays fast."""

    def denoise(states, t):
        key = (id(model), block, tuple(x0[:2 * block].tolist()), tuple(states.flatten().tolist()), tuple(t.tolist()))
        if key not in _MEMO:
            _MEMO[key] = evaluate(states, t)
        return _MEMO[key]

    def evaluate(states, t):
        rows = len(states)
        noisy = x0.expand(rows, -1).clone()
        noisy[:, 2 * block:2 * block + 2] = states
        return logits_of(model, noisy, t.view(-1, 1).expand(rows, 2), x0.expand(rows, -1))[:, 2 * block:2 * block + 2]

    return denoise


@pytest.mark.parametrize("process", ["absorbing", "uniform"])
@pytest.mark.parametrize("num_timesteps", [1, 2, 3])
def test_block_nelbo_bounds_the_exact_nll_of_the_block_wise_reverse_chain(process, num_timesteps):
    from test_diffusion import exact_discrete_nelbo, exact_reverse_nll

    model = enumeration_model(process, num_timesteps)
    for x0 in itertools.product(range(3), repeat=4):
        x0 = torch.tensor(x0)
        # p(x) = p(block 0) p(block 1 | block 0): each factor the T-step reverse chain of a 2-token block
        nll = sum(exact_reverse_nll(block_denoiser(model, x0, j), model.diffusion, x0[2 * j:2 * j + 2],
                                    num_timesteps) for j in range(2))
        nelbo = sum(exact_discrete_nelbo(block_denoiser(model, x0, j), model.diffusion, x0[2 * j:2 * j + 2],
                                         num_timesteps) for j in range(2))
        assert 0 < nll <= nelbo + 1e-9, (x0, nll, nelbo)


def check_unbiased(samples: torch.Tensor, exact: float) -> None:
    """Rows of `samples` are independent replicates (each a stratified mean over its draws)."""
    rows = samples.mean(-1)
    standard_error = rows.std().item() / math.sqrt(len(rows))
    assert abs(rows.mean().item() - exact) < 4 * standard_error, (rows.mean().item(), exact, standard_error)
    assert standard_error < 0.03 * exact  # the check has teeth


@pytest.mark.parametrize("process,estimator", [("absorbing", "masked_count"), ("absorbing", "uniform_t"),
                                               ("uniform", "uniform_t")])
def test_block_nelbo_estimator_is_unbiased_for_the_enumerated_value(process, estimator):
    """`nelbo` (the vectorised two-pass estimator, each block a row of `estimator`) averages to the enumerated
    sum of block NELBOs, discrete time (T = 3, every estimator that applies)."""
    from test_diffusion import exact_discrete_nelbo

    model = enumeration_model(process, 3, seed=1)
    x0 = torch.tensor([2, 0, 1, 1])
    exact = sum(exact_discrete_nelbo(block_denoiser(model, x0, j), model.diffusion, x0[2 * j:2 * j + 2], 3)
                for j in range(2))
    samples = model.nelbo(x0.view(1, -1).expand(2000, -1), num_samples=2, estimator=estimator,
                          generator=torch.Generator().manual_seed(0), return_samples=True)
    check_unbiased(samples, exact)


@pytest.mark.parametrize("process", ["absorbing", "uniform"])
def test_block_nelbo_and_training_loss_are_unbiased_in_continuous_time(process):
    """Continuous time: the finite-variance estimators' `nelbo`, and the training loss (the importance law,
    head-only for absorbing) times the scored count, average to the sum of the blocks' continuous NELBOs
    (enumerated states, quadrature in t; a model without noise conditioning, whose p_hat the quadrature
    resolves), on a ragged batch."""
    from test_diffusion import accurate_continuous_nelbo

    model = enumeration_model(process, None, seed=2, time_conditioning=False)
    x0 = torch.tensor([1, 2, 0, 2])
    exact = sum(accurate_continuous_nelbo(block_denoiser(model, x0, j), model.diffusion, x0[2 * j:2 * j + 2])
                for j in range(2))
    # a ragged batch of 6 positions: x0 with its padding on the right, the left, or both (blocks start at each
    # row's first real token, so every row's value is the same)
    rows = torch.zeros(3000, 6, dtype=torch.long)
    mask = torch.zeros_like(rows)
    for start in range(3):
        rows[start::3, start:start + 4] = x0
        mask[start::3, start:start + 4] = 1
    labels = torch.where(mask.bool(), rows, torch.full_like(rows, -100))
    for seed, estimator in enumerate(("masked_count", "importance")):  # the finite-variance ones ("auto" is the first)
        check_unbiased(model.nelbo(rows, attention_mask=mask, num_samples=2, estimator=estimator, return_samples=True,
                                   generator=torch.Generator().manual_seed(seed)), exact)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():  # each loss averages 3000 rows stratified together: 12 independent replicates
        losses = torch.stack([model(input_ids=rows, attention_mask=mask, labels=labels, generator=generator).loss
                              for _ in range(12)])
    check_unbiased(4 * losses.view(-1, 1), exact)


@pytest.mark.parametrize("process", ["absorbing", "uniform"])
@pytest.mark.parametrize("num_timesteps", [1, 2, 3])
def test_block_nelbo_is_tight_with_the_exact_posterior(process, num_timesteps):
    """Data whose two blocks are dependent but whose positions are independent within a block given the
    earlier block: the exact posterior of each block given the clean earlier one makes every reverse step
    exact, so the block NELBO, the exact block-wise -log p_theta(x) and -log p_data(x) coincide (a full-canvas
    factorised reverse step could not be exact here: block 1 depends on block 0)."""
    from test_diffusion import exact_discrete_nelbo, exact_reverse_nll, leave_one_out_posterior_denoiser
    from hf_sfdlm import DiscreteDiffusion

    generator = torch.Generator().manual_seed(num_timesteps)

    def marginals():
        m = torch.rand(2, 3, generator=generator, dtype=torch.float64) + 0.1
        return m / m.sum(-1, keepdim=True)

    first = marginals()
    second = {a: marginals() for a in itertools.product(range(3), repeat=2)}  # block 1's law given block 0
    pairs = torch.tensor(list(itertools.product(range(3), repeat=2)))

    def law(m):  # over the 9 two-token states, positions independent
        return m[0, pairs[:, 0]] * m[1, pairs[:, 1]]

    for x0 in itertools.product(range(3), repeat=4):
        a, b = x0[:2], x0[2:]
        index = lambda pair: pairs.tolist().index(list(pair))  # noqa: E731
        truth = -math.log(law(first)[index(a)] * law(second[a])[index(b)])
        nll = nelbo = 0.0
        for p_data, block in ((law(first), a), (law(second[a]), b)):
            denoise, schedule = leave_one_out_posterior_denoiser(p_data, 4, process)
            diffusion = DiscreteDiffusion(4, process, schedule, num_timesteps, 3 if process == "absorbing" else None)
            nll += exact_reverse_nll(denoise, diffusion, torch.tensor(block), num_timesteps)
            nelbo += exact_discrete_nelbo(denoise, diffusion, torch.tensor(block), num_timesteps)
        assert nll == pytest.approx(truth, abs=1e-8)
        assert nelbo == pytest.approx(truth, abs=1e-8)


# ------------------------------------------------------------------------------------------------ integration
def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    """Recomputed blocks call their SSMs again: the recorded cross terms are keyed by layer, not call order."""
    model = block_model("uniform")
    model.train()
    ids = torch.randint(0, 30, (2, 14))

    def gradients():
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids, generator=torch.Generator().manual_seed(2)).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    plain_loss, plain = gradients()
    model.gradient_checkpointing_enable()
    checkpointed_loss, checkpointed = gradients()
    torch.testing.assert_close(checkpointed_loss, plain_loss, atol=1e-12, rtol=0)
    for a, b in zip(checkpointed, plain):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_save_pretrained_and_remote_code_loading_keep_block_mode(tmp_path, monkeypatch):
    """The saved folder's own code (the files save_pretrained copied, imported as a package of their own)
    loads the weights and gives the same block-mode logits and generations."""
    import importlib
    import shutil

    model = block_model("absorbing").float()
    model.save_pretrained(tmp_path / "saved")
    package = tmp_path / "copied_sfdlm_code"
    package.mkdir()
    for file in (tmp_path / "saved").glob("*.py"):
        shutil.copy(file, package / file.name)
    (package / "__init__.py").write_text("")
    assert {"block_diffusion.py", "generation_block.py"} <= {f.name for f in package.iterdir()}
    monkeypatch.syspath_prepend(str(tmp_path))
    remote = importlib.import_module("copied_sfdlm_code.modeling_sfdlm")
    loaded = remote.SFDLMForDiffusionLM.from_pretrained(tmp_path / "saved").eval()
    assert loaded.config.block_size == 4 and type(loaded).__module__ == "copied_sfdlm_code.modeling_sfdlm"
    ids = torch.randint(0, 30, (2, 10))
    t = torch.rand(2, 3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, timesteps=t).logits, model(ids, timesteps=t).logits)
    kwargs = dict(max_new_tokens=6, steps=2)
    assert torch.equal(loaded.generate(ids, generator=torch.Generator().manual_seed(0), **kwargs),
                       model.generate(ids, generator=torch.Generator().manual_seed(0), **kwargs))


def test_hf_trainer_and_lora_train_a_block_model(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments, default_data_collator

    from hf_sfdlm.lora import apply_lora

    ids = torch.randint(0, 30, (8, 12), generator=torch.Generator().manual_seed(5))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    for lora in (False, True):
        model = block_model("absorbing").float()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        trained = apply_lora(model, r=4, target_modules="all-linear", train_ssm=True) if lora else model
        args = TrainingArguments(str(tmp_path / str(lora)), per_device_train_batch_size=4, max_steps=2,
                                 learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no")
        trainer = Trainer(model=trained, args=args, train_dataset=data, data_collator=default_data_collator)
        losses = [log["train_loss"] for log in trainer.train() and trainer.state.log_history if "train_loss" in log]
        assert losses and all(math.isfinite(x) for x in losses)
        base = {n.replace(".base_layer", "").replace(".original_module", ""): p for n, p in model.named_parameters()
                if ".lora_" not in n and "modules_to_save" not in n}
        assert set(base) == set(before)
        changed = {n for n, p in base.items() if not torch.equal(p, before[n])}
        if lora:  # the base weights stay; the SSMs train through their saved copies
            assert not changed
            assert any(not torch.equal(p, before[n.replace(".modules_to_save.default", "")])
                       for n, p in model.named_parameters() if "modules_to_save" in n)
        else:
            assert changed


def test_run_training_with_a_model_block_size(tmp_path):
    """`sfdlm train ... model.block_size=4` is this run: the model section goes to SFDLMConfig as is."""
    from accelerate.state import AcceleratorState

    from hf_sfdlm.data import DataConfig
    from hf_sfdlm.pipelines import run_training
    from hf_sfdlm.train_config import TrainConfig, TrainingConfig, load_config

    assert load_config(None, ["model.block_size=4"]).model["block_size"] == 4
    with pytest.raises(ValueError, match="block_size"):
        load_config(None, ["model.block_size=3", "model.pool_factors=[2]", "model.stage_depths=[1,1]"])
    AcceleratorState._reset_state()
    model = dict(process="absorbing", hidden_size=16, stage_depths=[1, 1], pool_factors=[2], ssm_state_size=4,
                 fourier_intermediate_size=32, num_timesteps=None, noise_schedule="loglinear", block_size=4)
    training = TrainingConfig(output_dir=str(tmp_path), max_steps=3, batch_size=4, eval_every=3,
                              eval_max_sequences=4, eval_num_samples=1, checkpoint_every=3, log_every=1,
                              log_with=["jsonl"], progress_bar=False)
    try:
        result, _ = run_training(TrainConfig(model=model, data=DataConfig(block_size=16, synthetic_sentences=100),
                                             training=training))
    finally:
        AcceleratorState._reset_state()
    assert math.isfinite(result.eval_nelbo)
    assert SFDLMForDiffusionLM.from_pretrained(tmp_path).config.block_size == 4


# ------------------------------------------------------------------------------------------------ generation
def ragged_prompts():
    ids = torch.randint(0, 30, (3, 7), generator=torch.Generator().manual_seed(9))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding: 5 tokens
    mask[2, 5:] = 0  # right padding: 5 tokens; row 1: 7 tokens (a different block index)
    return ids, mask


@pytest.mark.parametrize("process,sampler", [("absorbing", "ancestral"), ("absorbing", "confidence"),
                                             ("absorbing", "threshold"),
                                             ("uniform", "uniform"), ("uniform", "ancestral")])
def test_cached_generation_equals_uncached_generation_draw_for_draw(process, sampler):
    model = block_model(process)
    ids, mask = ragged_prompts()
    outputs = {}
    for use_cache in (True, False):
        outputs[use_cache] = model.generate(ids, attention_mask=mask, max_new_tokens=10, steps=3, sampler=sampler,
                                            generator=torch.Generator().manual_seed(1), use_cache=use_cache,
                                            return_dict_in_generate=True)
    torch.testing.assert_close(outputs[True].sequences, outputs[False].sequences, rtol=0, atol=0)
    assert outputs[True].sequences.shape == (3, 17)
    assert torch.equal(outputs[True].sequences[:, :7], ids)  # the prompt (and its padding) in place
    # at most (steps + the commit) per block: rows 0 and 2 (5 tokens) need 3 blocks for 10 new tokens
    # (3 + 4 + 4 positions), row 1 (7 tokens) 4 blocks (1 + 4 + 4 + 4)
    # (the uniform sampler adds its greedy tail, one pass per block)
    per_block = 3 + 1 + (sampler == "uniform")
    passes = outputs[True].num_forward_passes.tolist()
    assert passes[0] <= 3 * per_block and passes[2] <= 3 * per_block and 4 * 2 <= passes[1] <= 4 * per_block
    # and the draws are the model's: another seed gives other tokens
    other = model.generate(ids, attention_mask=mask, max_new_tokens=10, steps=3, sampler=sampler,
                           generator=torch.Generator().manual_seed(2))
    assert not torch.equal(other, outputs[True].sequences)


@pytest.mark.parametrize("process", ["absorbing", "uniform"])
def test_one_block_generation_is_the_full_canvas_generation(process):
    """b = the canvas: the block model's generation is the full-canvas model's, draw for draw."""
    full = block_model(process, block_size=None)
    block = block_model(process, block_size=8)
    block.load_state_dict(full.state_dict())
    prompt = torch.randint(0, 30, (2, 3))
    kwargs = dict(max_new_tokens=5, steps=4)
    expected = full.generate(prompt, generator=torch.Generator().manual_seed(3), **kwargs)
    got = block.generate(prompt, generator=torch.Generator().manual_seed(3), **kwargs)
    assert torch.equal(got, expected)


def test_generation_goes_past_max_position_embeddings_with_a_constant_cache():
    from hf_sfdlm.generation_block import generate_blocks

    model = block_model("absorbing", block_size=8, max_position_embeddings=16)
    prompt = torch.randint(0, 30, (2, 5))
    sizes = {}
    for new in (24, 200):
        seen = []
        out = generate_blocks(model, prompt, max_new_tokens=new, steps=1, generator=torch.Generator().manual_seed(0),
                              cache_observer=lambda cache: seen.append((cache.nbytes(), int(cache.tokens.max()))))
        assert out.shape == (2, 5 + new)
        assert len({b for b, _ in seen}) == 1  # the same bytes after the prompt and after every block
        assert seen[-1][1] >= new  # ... while the consumed tokens grow
        sizes[new] = seen[0][0]
    layers = sum(1 for m in model.modules() if isinstance(m, BidirectionalDiagonalSSM))
    assert sizes[24] == sizes[200] == layers * 2 * 16 * 2 * 16  # layers x rows x H x N/2 complex128
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(prompt, max_new_tokens=24, steps=1, use_cache=False)


def test_eos_ends_a_row_after_its_block_and_later_positions_are_padding():
    model = block_model("absorbing")
    ids, mask = ragged_prompts()
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=12, steps=2,
                           generator=torch.Generator().manual_seed(4))
    eos = int(plain[1, 7 + 5])  # a token row 1 generates in its second block (positions 12-15 of the row)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=12, steps=2, eos_token_id=eos, pad_token_id=30,
                         generator=torch.Generator().manual_seed(4), return_dict_in_generate=True)
    row = out.sequences[1, 7:]
    first = int((row == eos).nonzero()[0])
    assert torch.equal(row[:first + 1], plain[1, 7:7 + first + 1])
    assert (row[first + 1:] == 30).all()
    assert out.num_forward_passes[1] <= 2 * 3  # at most two blocks of (2 steps + commit)
    # tokens_per_forward (DiffusionGemma's metric, as the full canvas reports it): new tokens up to and
    # including each row's first EOS, per forward pass
    generated = []
    for row in out.sequences[:, 7:]:
        hits = (row == eos).nonzero()
        generated.append(12 if len(hits) == 0 else int(hits[0]) + 1)
    assert generated[1] == first + 1
    torch.testing.assert_close(out.tokens_per_forward,
                               torch.tensor(generated, dtype=torch.float32) / out.num_forward_passes.float())


def test_streamer_gets_the_prompt_each_block_as_a_draft_and_the_rest():
    class Collect:
        def __init__(self):
            self.puts, self.drafts, self.ended = [], [], False

        def put(self, ids):
            self.puts.append(ids)

        def put_draft(self, ids):
            self.drafts.append(ids)

        def end(self):
            self.ended = True

    model = block_model("absorbing")
    prompt = torch.randint(0, 30, (1, 6))
    streamer = Collect()
    out = model.generate(prompt, max_new_tokens=9, steps=2, streamer=streamer,
                         generator=torch.Generator().manual_seed(0))
    assert streamer.ended and len(streamer.puts) == 2 and torch.equal(streamer.puts[0], prompt)
    assert torch.equal(streamer.puts[1], out[:, 6:])
    assert [d.shape[1] for d in streamer.drafts] == [2, 6, 9]  # the prompt's block, then whole blocks
    assert all(torch.equal(d, out[:, 6:6 + d.shape[1]]) for d in streamer.drafts)


def test_block_generation_refuses_infilling_and_a_foreign_block_length():
    model = block_model("absorbing")
    with pytest.raises(ValueError, match="does not infill"):
        model.generate(torch.tensor([[1, MASK, 2]]), max_new_tokens=4, steps=1)
    with pytest.raises(ValueError, match="block_length"):
        model.generate(torch.tensor([[1, 2]]), max_new_tokens=4, steps=1, block_length=2)
    with pytest.raises(TypeError, match="use_cache"):
        model.generate(torch.tensor([[1, 2]]), max_new_tokens=4, steps=1, use_cache="yes")


# ------------------------------------------------------------------------------------------------ Transformer denoiser
def transformer(process="absorbing", block_size=4, seed=0, time_conditioning=True):
    from hf_sfdlm.baselines import TransformerDenoiserConfig, TransformerDenoiserForDiffusionLM

    torch.manual_seed(seed)
    config = TransformerDenoiserConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=32, process=process, block_size=block_size,
                                       mask_token_id=MASK if process == "absorbing" else None,
                                       time_conditioning=time_conditioning)
    model = TransformerDenoiserForDiffusionLM(config).double().eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return model


@pytest.mark.parametrize("process", ["absorbing", "uniform"])
def test_transformer_block_mode_is_block_causal_and_b_equal_l_is_the_full_canvas(process):
    model = transformer(process)
    generator = torch.Generator().manual_seed(3)
    clean = torch.randint(0, 30, (2, 12), generator=generator)
    noisy = torch.where(torch.rand(2, 12, generator=generator) < 0.5, clean, torch.full_like(clean, 7))
    mask = torch.ones_like(clean)
    mask[1, :2] = 0
    t = torch.rand(2, 3, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        base = finite(model.denoise_blocks(noisy, t, mask, clean))
        changed_clean, changed_noisy = clean.clone(), noisy.clone()
        changed_clean[:, 6:] = (clean[:, 6:] + 1) % 30  # from block 1 of row 0 (block 1 of row 1 starts at 6)
        changed_noisy[:, 6:] = (noisy[:, 6:] + 1) % 30
        after = finite(model.denoise_blocks(changed_noisy, t, mask, changed_clean))
    assert (after[0, :4] - base[0, :4]).abs().max() <= 1e-12 and (after[1, 2:6] - base[1, 2:6]).abs().max() <= 1e-12
    assert (after[0, 4:] - base[0, 4:]).abs().max() > 1e-4  # block 1 of row 0 reads its changed tokens
    full = transformer(process, block_size=None)
    single = transformer(process, block_size=12)
    ids = torch.randint(0, 30, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(finite(single(ids, timesteps=t[:, 0]).logits),
                                   finite(full(ids, timesteps=t[:, 0]).logits), atol=1e-12, rtol=0)


@pytest.mark.parametrize("process", ["absorbing", "uniform"])
def test_transformer_kv_cached_generation_equals_uncached_and_its_cache_grows(process):
    model = transformer(process)
    ids, mask = ragged_prompts()
    kwargs = dict(attention_mask=mask, max_new_tokens=10, steps=3)
    cached = model.generate(ids, generator=torch.Generator().manual_seed(1), **kwargs)
    uncached = model.generate(ids, generator=torch.Generator().manual_seed(1), use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
    from hf_sfdlm.generation_block import generate_blocks

    seen = []
    generate_blocks(model, ids[:1], max_new_tokens=12, steps=1,
                    cache_observer=lambda cache: seen.append(cache.nbytes()))
    assert seen == sorted(seen) and seen[-1] > seen[0]  # unlike the SSM states, keys and values grow


def test_transformer_block_training_and_nelbo_run():
    model = transformer("absorbing", time_conditioning=False)
    model.train()
    ids = torch.randint(0, 30, (3, 10))
    loss = model(input_ids=ids, labels=ids, generator=torch.Generator().manual_seed(0)).loss
    loss.backward()
    assert math.isfinite(loss.item()) and model.embed_tokens.weight.grad.abs().sum() > 0
    assert model.nelbo(ids, num_samples=2).shape == (3,)


def test_each_row_of_a_ragged_batch_generates_what_it_generates_alone():
    model = block_model("uniform")
    ids, mask = ragged_prompts()
    kwargs = dict(max_new_tokens=9, steps=2)
    batch = model.generate(ids, attention_mask=mask, generator=[torch.Generator().manual_seed(s) for s in range(3)],
                           **kwargs)
    for row in range(3):
        alone = model.generate(ids[row:row + 1][:, mask[row].bool()], generator=[torch.Generator().manual_seed(row)],
                               **kwargs)
        assert torch.equal(batch[row, 7:], alone[0, -9:])


def test_block_training_under_bf16_autocast_stays_close_to_float32():
    """The state arithmetic runs in float32 (complex64) under autocast; the loss follows the float32 one."""
    model = block_model("absorbing").float()
    ids = torch.randint(0, 30, (4, 12))
    t = torch.rand(4, 3)
    with torch.no_grad():
        exact = model(input_ids=ids, labels=ids, timesteps=t, generator=torch.Generator().manual_seed(0)).loss
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(input_ids=ids, labels=ids, timesteps=t, generator=torch.Generator().manual_seed(0)).loss
    assert math.isfinite(low.item()) and low.item() == pytest.approx(exact.item(), rel=5e-2)


def test_model_card_examples_of_a_block_model_continue_a_prompt_and_skip_infilling():
    """Saving a trained block model writes card examples; block models do not infill, so none is asked."""
    from hf_sfdlm.model_card import card_examples
    from hf_sfdlm.synthetic import word_level_tokenizer

    tokenizer = word_level_tokenizer()
    model = block_model("absorbing", vocab_size=len(tokenizer), mask_token_id=tokenizer.mask_token_id).float()
    line = tokenizer("the small dog sees a red ball near the old house .", add_special_tokens=False)["input_ids"]
    example = card_examples(model, tokenizer, [line + [tokenizer.eos_token_id]], steps=2, new_tokens=6)
    assert example["prompt_output"] and example["sample"] and "infill_output" not in example


def test_generation_builds_each_layers_tables_once_whatever_the_length(monkeypatch):
    """Cached generation computes the complex powers of dA once per call (FrozenTables in the cache), not at
    every denoising step and commit: the count does not grow with the blocks generated. With gradients on
    (training), the tables are ignored, so a parameter update is always seen."""
    import hf_sfdlm.block_diffusion as block_diffusion

    model = block_model("absorbing", block_size=4)
    calls = []
    real_powers = block_diffusion._powers
    monkeypatch.setattr(block_diffusion, "_powers", lambda *args: calls.append(1) or real_powers(*args))
    prompt = torch.randint(0, 30, (2, 5))
    counts = {}
    for new in (8, 40):  # 2-3 blocks against 10-11
        calls.clear()
        model.generate(prompt, max_new_tokens=new, steps=3, generator=torch.Generator().manual_seed(0))
        counts[new] = len(calls)
    assert counts[8] == counts[40] > 0

    ssm = next(m for m in model.modules() if isinstance(m, BidirectionalDiagonalSSM))
    state = torch.randn(2, *ssm.log_neg_a_real.shape, dtype=torch.complex128)
    u = torch.randn(2, 4, model.config.hidden_size, dtype=torch.float64)
    tables = block_diffusion.FrozenTables()
    with torch.no_grad():
        frozen = BlockContext(1, {ssm: state}, tables=tables)(ssm, u)
    before = BlockContext(1, {ssm: state}, tables=tables)(ssm, u)  # grad enabled: computed afresh
    torch.testing.assert_close(before, frozen, rtol=0, atol=0)
    with torch.no_grad():
        ssm.a_imag.add_(0.5)
    after = BlockContext(1, {ssm: state}, tables=tables)(ssm, u)
    assert (after - before).abs().max() > 1e-3
