"""Block diffusion (`config.block_size`, `block_diffusion.py`, `generation_block.py`) against independent
computations: a block-by-block reference whose cross-block SSM term is a direct sum over the SSM kernel,
the full-canvas model (b = L), the autoregressive likelihood (b = 1), and the exact likelihood of the
block-wise reverse chain enumerated over every state of a tiny problem."""

import itertools
import math

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
        return model.lm_head(hidden)


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
            inner._backbone(inner.embed_tokens(clean[:, start:end]), zero,
                            block_context=DirectSumContext(prefix, record=True))
        outputs.append(model.lm_head(hidden))
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


def test_padding_never_changes_a_real_position():
    model = block_model("uniform")
    ids = torch.randint(0, 30, (1, 10))
    t = torch.rand(1, 3, dtype=torch.float64)
    alone = logits_of(model, ids, t, ids)
    padded = torch.cat([torch.full((1, 3), 5), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 10, dtype=torch.long)], dim=1)
    t_padded = torch.cat([t, torch.rand(1, 1, dtype=torch.float64)], dim=1)  # 13 positions: 4 blocks
    torch.testing.assert_close(logits_of(model, padded, t_padded, padded, mask)[:, 3:], alone, atol=1e-12, rtol=0)


@pytest.mark.parametrize("process", ["absorbing", "uniform"])
def test_block_size_equal_to_the_length_is_the_full_canvas_model(process):
    full = block_model(process, block_size=None)
    block = block_model(process, block_size=12)
    block.load_state_dict(full.state_dict())
    ids = torch.randint(0, 30, (3, 12))
    t = torch.rand(3, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(block(ids, timesteps=t).logits, full(ids, timesteps=t).logits, atol=1e-12, rtol=0)
        kwargs = dict(input_ids=ids, labels=ids)
        loss_block = block(**kwargs, generator=torch.Generator().manual_seed(4)).loss
        loss_full = full(**kwargs, generator=torch.Generator().manual_seed(4)).loss
        torch.testing.assert_close(loss_block, loss_full, atol=1e-12, rtol=0)
        nelbo_block = block.nelbo(ids, num_samples=3, generator=torch.Generator().manual_seed(5))
        nelbo_full = full.nelbo(ids, num_samples=3, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(nelbo_block, nelbo_full, atol=1e-10, rtol=0)
