"""The diffusion maths against independent computations: Bayes' rule on explicit transition matrices,
and the exact likelihood of the reverse chain enumerated over every state of a tiny problem."""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from hf_sfdlm import DiscreteDiffusion, NoiseSchedule, SFDLMForDiffusionLM
from hf_sfdlm.diffusion import NoiseDraw

SCHEDULES = ["linear", "cosine", "loglinear", "geometric"]


def make_diffusion(process, vocab_size=4, num_timesteps=None, schedule="loglinear"):
    mask = vocab_size - 1 if process == "absorbing" else None
    return DiscreteDiffusion(vocab_size, process, NoiseSchedule(schedule), num_timesteps, mask)


def transition_matrix(diffusion, alpha):
    """Q[i, j] = q(x_t = j | x_s = i) for a step whose signal level is `alpha`, built explicitly."""
    prior = diffusion.prior(torch.float64)
    return alpha * torch.eye(diffusion.vocab_size, dtype=torch.float64) + (1 - alpha) * prior.expand(diffusion.vocab_size, -1)


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedules_start_clean_end_at_prior_and_decrease(name):
    schedule = NoiseSchedule(name)
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    alpha = schedule.alpha(t)
    assert alpha[0] == 1 and alpha[-1] == 0
    assert (alpha[1:] <= alpha[:-1]).all()
    # the closed-form derivative agrees with finite differences
    mid = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    h = 1e-6
    numeric = (schedule.alpha(mid + h) - schedule.alpha(mid - h)) / (2 * h)
    torch.testing.assert_close(schedule.alpha_derivative(mid), numeric, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("process", ["uniform", "absorbing"])
def test_posterior_matches_bayes_rule_on_explicit_matrices(process):
    diffusion = make_diffusion(process, vocab_size=5)
    alpha_s, alpha_t = torch.tensor([0.7], dtype=torch.float64), torch.tensor([0.3], dtype=torch.float64)
    step = transition_matrix(diffusion, alpha_t / alpha_s)
    marginal_s = transition_matrix(diffusion, alpha_s)
    marginal_t = transition_matrix(diffusion, alpha_t)
    for x0, z in itertools.product(range(5), range(5)):
        if marginal_t[x0, z] == 0 or x0 == diffusion.mask_token_id:
            continue  # x_t impossible from this x_0, or a mask as clean token (rejected by the model)
        expected = step[:, z] * marginal_s[x0] / marginal_t[x0, z]
        got = diffusion.posterior_probs(torch.tensor([[x0]]), torch.tensor([[z]]), alpha_s, alpha_t)[0, 0]
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("process", ["uniform", "absorbing"])
def test_reverse_step_is_the_normalised_d3pm_kernel(process):
    """p(x_s = y | x_t = z) proportional to q(z | y) sum_x0 q(y | x0) p_hat(x0), built from explicit matrices;
    for the absorbing process it is also the posterior mixture sum_x0 q(y | z, x0) p_hat(x0) (MDLM)."""
    diffusion = make_diffusion(process, vocab_size=5)
    alpha_s, alpha_t = torch.tensor([0.6], dtype=torch.float64), torch.tensor([0.2], dtype=torch.float64)
    logits = torch.randn(1, 5, 5, dtype=torch.float64)
    z = torch.arange(5).view(1, 5)
    x0_probs = diffusion.x0_probs(logits, z)
    got = diffusion.reverse_probs(x0_probs, z, alpha_s, alpha_t)
    torch.testing.assert_close(got.sum(-1), torch.ones(1, 5, dtype=torch.float64))
    step = transition_matrix(diffusion, alpha_t / alpha_s)
    marginal_s = transition_matrix(diffusion, alpha_s)
    marginal_t = transition_matrix(diffusion, alpha_t)
    for position in range(5):
        zi = z[0, position]
        kernel = step[:, zi] * (x0_probs[0, position] @ marginal_s)
        torch.testing.assert_close(got[0, position], kernel / kernel.sum())
        mixture = torch.zeros(5, dtype=torch.float64)
        for x0 in range(5):
            if x0_probs[0, position, x0] > 0 and marginal_t[x0, zi] > 0:
                posterior = diffusion.posterior_probs(torch.tensor([[x0]]), z[:, position:position + 1], alpha_s, alpha_t)
                mixture += x0_probs[0, position, x0] * posterior[0, 0]
        if process == "absorbing":
            torch.testing.assert_close(got[0, position], mixture)
        else:  # the mixture weights p_hat(x0) by q(z | x0) before normalising: different kernels
            assert (got[0, position] - mixture).abs().max() > 1e-3


def test_absorbing_closed_form_kl_matches_the_vocabulary_sum():
    diffusion = make_diffusion("absorbing", vocab_size=6, num_timesteps=10)
    x0 = torch.randint(0, 5, (3, 7))
    x_t = diffusion.corrupt(x0, torch.full((3,), 0.4))
    logits = torch.randn(3, 7, 6, dtype=torch.float64)
    s, t = torch.full((3,), 0.5, dtype=torch.float64), torch.full((3,), 0.6, dtype=torch.float64)
    closed = diffusion._discrete_kl(diffusion.x0_log_probs(logits, x_t), x0, x_t, s, t)
    summed = diffusion.kl_to_reverse(diffusion.x0_probs(logits, x_t), x0, x_t,
                                     diffusion.schedule.alpha(s), diffusion.schedule.alpha(t))
    torch.testing.assert_close(closed, summed)


def test_corruption_has_the_marginal_of_the_forward_process():
    diffusion = make_diffusion("uniform", vocab_size=4)
    x0 = torch.zeros(1, 200_000, dtype=torch.long)
    generator = torch.Generator().manual_seed(0)
    x_t = diffusion.corrupt(x0, torch.tensor([0.4]), generator=generator)
    frequencies = torch.bincount(x_t[0], minlength=4).double() / x_t.numel()
    expected = torch.tensor([0.4 + 0.6 / 4, 0.15, 0.15, 0.15], dtype=torch.float64)
    torch.testing.assert_close(frequencies, expected, atol=4e-3, rtol=0)


def test_stratified_draws_cover_the_unit_interval_once_per_stratum():
    diffusion = make_diffusion("absorbing", num_timesteps=None)
    draw = diffusion.draw_noise(8, generator=torch.Generator().manual_seed(3))
    strata = sorted((draw.t * 8).floor().long().tolist())
    assert strata == list(range(8))
    discrete = make_diffusion("uniform", num_timesteps=4).draw_noise(8, generator=torch.Generator().manual_seed(3))
    assert sorted((discrete.t * 4).round().long().tolist()) == [1, 1, 2, 2, 3, 3, 4, 4]
    assert torch.equal(discrete.reconstruction, discrete.t == 0.25)


# ---------------------------------------------------------------------------------------------------
# Exact likelihood of the reverse chain of a tiny problem, by enumeration of every state.

LENGTH = 2


def all_states(vocab_size):
    return torch.tensor(list(itertools.product(range(vocab_size), repeat=LENGTH)))


def exact_reverse_nll(denoise, diffusion, x0, num_timesteps):
    """-log p(x_0) of the T-step reverse chain started from the prior, summing over every path."""
    states = all_states(diffusion.vocab_size)
    prior = diffusion.prior(torch.float64)
    distribution = prior[states].prod(-1)  # p(x_T) over joint states
    for i in range(num_timesteps, 0, -1):
        t = torch.full((len(states),), i / num_timesteps, dtype=torch.float64)
        s = torch.full((len(states),), (i - 1) / num_timesteps, dtype=torch.float64)
        x0_probs = diffusion.x0_probs(denoise(states, t), states)
        step = diffusion.reverse_probs(x0_probs, states, diffusion.schedule.alpha(s), diffusion.schedule.alpha(t))
        # transition[a, b] = prod over positions of p(x_s = states[b] | x_t = states[a])
        transition = torch.ones(len(states), len(states), dtype=torch.float64)
        for position in range(LENGTH):
            transition = transition * step[:, position, :][:, states[:, position]]
        distribution = distribution @ transition
    index = [tuple(state) for state in states.tolist()].index(tuple(x0.tolist()))
    return -math.log(distribution[index])


def exact_expected_terms(denoise, diffusion, x0, t, s, reconstruction):
    """E_{x_t ~ q(x_t | x_0)} of NELBO terms (weight 1) at each time in `t`, by enumerating x_t."""
    states = all_states(diffusion.vocab_size)
    alpha = diffusion.schedule.alpha(t).view(-1, 1, 1)
    prior = diffusion.prior(torch.float64)
    marginal = alpha * F.one_hot(x0, diffusion.vocab_size).double() + (1 - alpha) * prior  # (K, L, V)
    weights = marginal[:, torch.arange(LENGTH), states].prod(-1)  # (K, S): q(x_t = state | x_0)
    k, n = weights.shape
    rows = states.repeat(k, 1)
    draw = NoiseDraw(t=t.repeat_interleave(n), s=None if s is None else s.repeat_interleave(n),
                     weight=torch.ones(k * n, dtype=torch.float64), reconstruction=reconstruction.repeat_interleave(n))
    terms = diffusion.loss_terms(denoise(rows, draw.t), x0.expand(k * n, -1), rows, draw).sum(-1).view(k, n)
    return (weights * torch.where(weights > 0, terms, torch.zeros_like(terms))).sum(-1)


def exact_discrete_nelbo(denoise, diffusion, x0, num_timesteps):
    steps = torch.arange(1, num_timesteps + 1, dtype=torch.float64)
    terms = exact_expected_terms(denoise, diffusion, x0, steps / num_timesteps, (steps - 1) / num_timesteps, steps == 1)
    return float(terms.sum())  # the prior term is zero: alpha(1) = 0


def exact_continuous_nelbo(denoise, diffusion, x0, nodes=64):
    """Gauss-Legendre quadrature of the enumerated integrand (the t = 0 term is 0 for these denoisers)."""
    points, weights = np.polynomial.legendre.leggauss(nodes)
    t = torch.tensor(0.5 * (points + 1), dtype=torch.float64)
    integrand = exact_expected_terms(denoise, diffusion, x0, t, None, torch.zeros(nodes, dtype=torch.bool))
    return float((0.5 * torch.tensor(weights) * integrand).sum())


def random_model_denoiser(process, seed, time_conditioning=True):
    vocab_size = 4  # 3 tokens + the mask for absorbing; 4 tokens for uniform
    config = tiny_config(vocab_size=vocab_size, process=process, mask_token_id=3 if process == "absorbing" else None,
                         stage_depths=[1], pool_factors=[], hidden_size=8, num_timesteps=3, noise_schedule="cosine",
                         time_conditioning=time_conditioning)
    torch.manual_seed(seed)
    model = SFDLMForDiffusionLM(config).double().eval()
    with torch.no_grad():  # leave adaLN-Zero's identity start: a random model should use every part
        for parameter in model.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))

    cache = {}

    def denoise(states, t):
        key = (tuple(states.flatten().tolist()), None if not time_conditioning else tuple(t.tolist()))
        if key not in cache:  # without noise conditioning the prediction does not depend on t
            with torch.no_grad():
                cache[key] = model.denoise(states, t).double()
        return cache[key]

    return model, denoise


@pytest.mark.parametrize("process", ["uniform", "absorbing"])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("num_timesteps", [1, 2, 3, 5])
def test_discrete_nelbo_bounds_the_exact_nll_of_the_reverse_chain(process, seed, num_timesteps):
    model, denoise = random_model_denoiser(process, seed)
    diffusion = DiscreteDiffusion(4, process, model.diffusion.schedule, num_timesteps, model.diffusion.mask_token_id)
    tokens = 3
    for x0 in itertools.product(range(tokens), repeat=LENGTH):
        x0 = torch.tensor(x0)
        nll = exact_reverse_nll(denoise, diffusion, x0, num_timesteps)
        nelbo = exact_discrete_nelbo(denoise, diffusion, x0, num_timesteps)
        assert nll <= nelbo + 1e-9, (x0, nll, nelbo)
        assert nll > 0


def leave_one_out_posterior_denoiser(p_data, vocab_size, process):
    """The exact p_hat of the reverse kernel for data distribution `p_data` over all LENGTH-token states:
    p(x_0^i | x_t^{-i}), the posterior of position i given the other positions of x_t (the kernel adds
    position i's own evidence q(x_t^i | x_0^i) itself), computed by enumeration."""
    clean = all_states(3)

    def denoise(rows, t):
        diffusion_alpha = schedule.alpha(t).view(-1, 1, 1)
        prior = torch.zeros(vocab_size, dtype=torch.float64)
        if process == "uniform":
            prior[:] = 1.0 / vocab_size
        else:
            prior[vocab_size - 1] = 1.0
        # q(x_t^j = rows[:, j] | x_0^j = v) for every row, position and clean token v < 3: (B, L, 3)
        like = diffusion_alpha * F.one_hot(rows, vocab_size)[..., :3].double() + (1 - diffusion_alpha) * prior[rows].unsqueeze(-1)
        out = torch.full((len(rows), LENGTH, vocab_size), -math.inf, dtype=torch.float64)
        for i in range(LENGTH):
            others = [j for j in range(LENGTH) if j != i]
            weight = p_data.clone().expand(len(rows), -1)  # over clean joint states
            for j in others:
                weight = weight * like[:, j, :][:, clean[:, j]]
            posterior = torch.zeros(len(rows), 3, dtype=torch.float64).index_add_(1, clean[:, i], weight)
            posterior = torch.where(posterior.sum(-1, keepdim=True) > 0, posterior, torch.ones_like(posterior))
            out[:, i, :3] = (posterior / posterior.sum(-1, keepdim=True)).log()  # (impossible x_t: any p_hat)
        return out

    schedule = NoiseSchedule("cosine")
    return denoise, schedule


@pytest.mark.parametrize("process", ["uniform", "absorbing"])
@pytest.mark.parametrize("num_timesteps", [1, 2, 3, 5])
def test_the_bound_is_tight_with_the_exact_posterior(process, num_timesteps):
    """With the exact p_hat of a data distribution whose positions are independent (a factorised reverse
    step can then be exact), the reverse chain is the time reversal of the forward process, so the exact
    -log p_theta(x_0), the NELBO and -log p_data(x_0) coincide."""
    generator = torch.Generator().manual_seed(num_timesteps)
    marginals = torch.rand(LENGTH, 3, generator=generator, dtype=torch.float64) + 0.1
    marginals = marginals / marginals.sum(-1, keepdim=True)
    clean = all_states(3)
    p_data = marginals[0, clean[:, 0]] * marginals[1, clean[:, 1]]
    denoise, schedule = leave_one_out_posterior_denoiser(p_data, 4, process)
    diffusion = DiscreteDiffusion(4, process, schedule, num_timesteps, 3 if process == "absorbing" else None)
    for index, x0 in enumerate(clean):
        truth = -math.log(p_data[index])
        assert exact_reverse_nll(denoise, diffusion, x0, num_timesteps) == pytest.approx(truth, abs=1e-8)
        assert exact_discrete_nelbo(denoise, diffusion, x0, num_timesteps) == pytest.approx(truth, abs=1e-8)


@pytest.mark.parametrize("process", ["uniform", "absorbing"])
def test_monte_carlo_nelbo_is_unbiased_for_the_exact_value(process):
    model, denoise = random_model_denoiser(process, seed=2)
    x0 = torch.tensor([1, 2])
    exact = exact_discrete_nelbo(denoise, model.diffusion, x0, 3)
    samples = model.nelbo(x0.view(1, -1).expand(4000, -1), num_samples=1,
                          generator=torch.Generator().manual_seed(0), return_samples=True).flatten()
    standard_error = samples.std().item() / math.sqrt(len(samples))
    assert abs(samples.mean().item() - exact) < 4 * standard_error + 1e-9


def test_continuous_nelbo_is_the_large_T_limit_absorbing():
    # Without noise conditioning the integrand is smooth in t (a random model's sinusoidal time
    # features would oscillate faster than either grid resolves).
    model, denoise = random_model_denoiser("absorbing", seed=3, time_conditioning=False)
    diffusion = model.diffusion
    x0 = torch.tensor([0, 2])
    discrete = exact_discrete_nelbo(denoise, diffusion, x0, 1000)
    continuous = DiscreteDiffusion(4, "absorbing", diffusion.schedule, None, 3)
    assert discrete == pytest.approx(exact_continuous_nelbo(denoise, continuous, x0), rel=5e-3)


def accurate_continuous_nelbo(denoise, diffusion, x0, decades=12, nodes=20):
    """The enumerated integrand integrated by Gauss-Legendre on [0, 1e-12] and geometric panels
    [10^-(k+1), 10^-k], which resolve its log(1/t) growth at t -> 0 (no t = 0 term: p(x_0 | x_0) -> 1)."""
    points, weights = np.polynomial.legendre.leggauss(nodes)
    edges = [0.0] + [10.0 ** -k for k in range(decades, -1, -1)]
    total = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        t = torch.tensor(low + (high - low) * 0.5 * (points + 1), dtype=torch.float64)
        integrand = exact_expected_terms(denoise, diffusion, x0, t, None, torch.zeros(nodes, dtype=torch.bool))
        total += float((0.5 * (high - low) * torch.tensor(weights) * integrand).sum())
    return total


def test_continuous_nelbo_is_the_large_T_limit_uniform():
    # A random model whose p_hat has full support and ignores t: the case whose continuous-time bound
    # was +inf under the posterior-mixture kernel. The gap to the discrete NELBO shrinks like 1/T.
    model, denoise = random_model_denoiser("uniform", seed=3, time_conditioning=False)
    schedule = model.diffusion.schedule
    x0 = torch.tensor([0, 2])
    continuous = accurate_continuous_nelbo(denoise, DiscreteDiffusion(4, "uniform", schedule, None), x0)
    assert math.isfinite(continuous)
    gaps = []
    for T in (10, 100, 1000):
        discrete = exact_discrete_nelbo(denoise, DiscreteDiffusion(4, "uniform", schedule, T), x0, T)
        gaps.append((discrete - continuous) / continuous)
    assert 0 < gaps[0] < 0.05
    for coarse, fine in zip(gaps[:-1], gaps[1:]):
        assert 7 < coarse / fine < 13  # O(1/T)
    nll = exact_reverse_nll(denoise, DiscreteDiffusion(4, "uniform", schedule, 100), x0, 100)
    assert nll < continuous


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_uniform_integrand_is_finite_and_integrable_as_t_goes_to_zero(schedule):
    """E_{x_t}[integrand] for a full-support softmax p_hat (one position, x_t enumerated) on a log grid down
    to t = 1e-10: finite, and growing no faster than log(1/t) (the posterior mixture grew like eps / t)."""
    vocab = 5
    diffusion = DiscreteDiffusion(vocab, "uniform", NoiseSchedule(schedule), None)
    logits = torch.randn(vocab, vocab, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x0 = 1
    grid = torch.logspace(-10, -1, 10, dtype=torch.float64)
    values = []
    for t in grid:
        t = t.view(1)
        alpha, one_minus = diffusion.schedule.alpha(t), diffusion.schedule.one_minus_alpha(t)
        q = one_minus / vocab + alpha * F.one_hot(torch.tensor(x0), vocab)
        draw = NoiseDraw(t.expand(vocab), None, torch.ones(vocab, dtype=torch.float64), torch.zeros(vocab, dtype=torch.bool))
        x_t = torch.arange(vocab).view(-1, 1)
        terms = diffusion.loss_terms(logits.view(vocab, 1, vocab), torch.full_like(x_t, x0), x_t, draw)
        values.append(float((q * terms.view(-1)).sum()))
    values = torch.tensor(values)
    assert torch.isfinite(values).all() and (values >= 0).all()
    # At most logarithmic growth: a decade closer to 0 adds a bounded amount (eps / t would multiply by 10).
    small = grid[1:] <= 1e-3
    assert (values[:-1][small] <= 1.5 * values[1:][small] + 1e-9).all(), values
    assert float(grid[0] * values[0]) < 1e-8  # t f(t) -> 0: the integral near 0 vanishes


def test_monte_carlo_nelbo_of_a_random_uniform_model_has_a_small_spread():
    """The posterior-mixture kernel's estimator had no finite mean: 16-draw estimates of a random model
    were 200 +- 236 nats on this input. The D3PM kernel's are a few per cent apart."""
    model = SFDLMForDiffusionLM(tiny_config(process="uniform", noise_schedule="loglinear")).eval()
    ids = torch.randint(0, 31, (1, 16), generator=torch.Generator().manual_seed(0)).expand(200, -1)
    estimates = model.nelbo(ids, num_samples=16, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(estimates).all()
    assert float(estimates.std()) < 0.5 * float(estimates.mean())
    assert float(estimates.mean()) < 3 * 16 * math.log(32)  # within a small factor of a uniform guess


def copying_logits(x_t, vocab, eps, dtype):
    """Logits of p_hat = (1 - eps) onehot(x_t) + eps / V, rounded to `dtype` (the reference sees the same)."""
    probs = (1 - eps) * F.one_hot(x_t, vocab).double() + eps / vocab
    return probs.log().to(dtype)


@pytest.mark.parametrize("process", ["uniform", "absorbing"])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_loss_in_float32_and_bf16_autocast_agrees_with_float64(process, schedule):
    vocab = 6
    diffusion = make_diffusion(process, vocab_size=vocab, schedule=schedule)
    x0 = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]])
    x_t = x0.clone()
    x_t[0, 5:] = torch.tensor([1, 2, 3, 4, 0]) if process == "uniform" else vocab - 1  # half corrupted
    grid = torch.cat([torch.logspace(-8, -1, 15, dtype=torch.float64), torch.tensor([0.5, 0.9, 1 - 1e-4, 1 - 1e-8])])
    worst = 0.0
    for eps in (1e-2, 1e-4):
        for t in grid:
            draw = NoiseDraw(t.view(1), None, torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.bool))
            for dtype in (torch.float32, torch.bfloat16):
                logits = copying_logits(x_t, vocab, eps, dtype)
                if process == "absorbing":
                    logits = diffusion.restrict_logits(logits.clone())
                reference = diffusion.loss_terms(logits.double(), x0, x_t, draw)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                    got = diffusion.loss_terms(logits, x0, x_t, draw)
                assert torch.isfinite(reference).all() and (reference >= 0).all()
                error = ((got.double() - reference).abs() / reference.abs().clamp_min(1e-300)).max()
                worst = max(worst, float(error))
                assert error < 1e-4, (eps, float(t), dtype, got, reference)
    assert worst > 0  # the low-precision path really ran in low precision


# ---------------------------------------------------------------------------------------------------
# The one diffusion-LM head: input checks and the scored-positions rule, for SFDLM and the Transformer.

def head_models():
    from hf_sfdlm.baselines import TransformerDenoiserConfig, TransformerDenoiserForDiffusionLM

    denoiser = TransformerDenoiserConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32, max_position_embeddings=64, process="uniform",
                                         time_conditioning=True)
    return {
        "sfdlm-uniform": SFDLMForDiffusionLM(tiny_config(process="uniform")),
        "sfdlm-absorbing": SFDLMForDiffusionLM(tiny_config(process="absorbing", mask_token_id=31)),
        "sedd-uniform": SFDLMForDiffusionLM(tiny_config(process="uniform", objective="score_entropy")),
        "transformer-uniform": TransformerDenoiserForDiffusionLM(denoiser),
    }


@pytest.mark.parametrize("name", ["sfdlm-uniform", "sfdlm-absorbing", "sedd-uniform", "transformer-uniform"])
def test_head_refuses_bad_inputs_with_errors_that_name_them(name):
    model = head_models()[name].eval()
    ids = torch.randint(0, 31, (2, 6))
    t = torch.tensor([0.3, 0.7])
    for bad, error, match in [(torch.tensor([float("nan"), 0.5]), ValueError, "timesteps"),
                              (torch.tensor([0.5, 1.5]), ValueError, "timesteps"),
                              (torch.tensor([-0.1, 0.5]), ValueError, "timesteps"),
                              (torch.zeros(2, 1), ValueError, "timesteps"),
                              (torch.zeros(3), ValueError, "timesteps"),
                              ("0.5", TypeError, "timesteps"),
                              (torch.tensor([True, False]), TypeError, "timesteps")]:
        with pytest.raises(error, match=match):
            model(ids, timesteps=bad)
    model(ids, timesteps=0.5)  # a scalar is one level for every row
    for mask, error in [([[1] * 6] * 2, TypeError), (torch.full((2, 6), -1), ValueError),
                        (torch.full((2, 6), 0.5), ValueError), (torch.ones(2, 5), ValueError)]:
        with pytest.raises(error, match="attention_mask"):
            model(ids, attention_mask=mask, timesteps=t)
        with pytest.raises(error, match="attention_mask"):
            model(ids, attention_mask=mask, labels=ids)
    with pytest.raises(TypeError, match="labels"):
        model(ids, labels=ids.float())
    with pytest.raises(ValueError, match="outside"):
        model(ids, labels=torch.full_like(ids, 40))


@pytest.mark.parametrize("name", ["sfdlm-uniform", "sedd-uniform", "transformer-uniform", "sfdlm-absorbing"])
def test_int32_ids_give_the_int64_results(name):
    model = head_models()[name].eval()
    ids = torch.randint(0, 31, (2, 6))
    labels = ids.clone()
    labels[:, 0] = -100
    for kwargs in (dict(), dict(labels=labels)):
        wide = model.nelbo(ids, num_samples=2, generator=torch.Generator().manual_seed(0), **kwargs)
        narrow = model.nelbo(ids.int(), num_samples=2, generator=torch.Generator().manual_seed(0),
                             **{k: v.int() for k, v in kwargs.items()})
        torch.testing.assert_close(narrow, wide)
    wide = model(ids, labels=labels, generator=torch.Generator().manual_seed(1)).loss
    narrow = model(ids.int(), labels=labels.int(), generator=torch.Generator().manual_seed(1)).loss
    torch.testing.assert_close(narrow, wide)


@pytest.mark.parametrize("process", ["absorbing", "uniform"])
@pytest.mark.parametrize("objective", ["elbo", "score_entropy"])
def test_a_mask_id_at_unscored_or_padded_positions_contributes_exactly_zero(process, objective):
    model = SFDLMForDiffusionLM(tiny_config(process=process, mask_token_id=31, objective=objective)).eval()
    ids = torch.randint(0, 31, (3, 8))
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # right padding holding the mask id
    with_mask = ids.clone()
    with_mask[0, -2:] = 31
    # Padding never reaches the real positions, so the token held there changes nothing.
    for labels in (None, ids):
        kwargs = dict(attention_mask=mask, labels=labels)
        nelbo = model.nelbo(with_mask, num_samples=3, generator=torch.Generator().manual_seed(0), **kwargs)
        reference = model.nelbo(ids, num_samples=3, generator=torch.Generator().manual_seed(0), **kwargs)
        assert torch.isfinite(nelbo).all()
        torch.testing.assert_close(nelbo, reference, rtol=0, atol=0)
    # A prompt position (label -100) holding the mask id conditions the others and adds exactly 0.
    labels = ids.clone()
    labels[:, :2] = -100
    with_mask[:, :2] = 31
    out = model(with_mask, labels=labels, generator=torch.Generator().manual_seed(2))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert torch.isfinite(model.nelbo(with_mask, labels=labels, num_samples=2)).all()
    process_ = model.diffusion
    scored = labels != -100
    logits = torch.randn(3, 8, 32, dtype=torch.float64)
    process_.restrict_logits(logits)
    draw = process_.draw_noise(3, generator=torch.Generator().manual_seed(3))
    x_t = process_.corrupt(with_mask, process_.schedule.alpha(draw.t), corruptible=scored)
    x0 = torch.where(scored, labels, with_mask)
    terms = process_.loss_terms(logits, x0, x_t, draw, scored=scored)
    assert torch.equal(terms[:, :2], torch.zeros(3, 2, dtype=terms.dtype)) and torch.isfinite(terms).all()


def test_every_scored_position_count_is_the_one_rule():
    from hf_sfdlm.diffusion_lm import scored_positions
    from hf_sfdlm.trainer import _scored_tokens, default_evaluate_batch

    ids = torch.randint(0, 31, (2, 5))
    labels = ids.clone()
    labels[0, :2] = -100
    mask = torch.ones_like(ids)
    mask[1, -1] = 0
    expected = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]], dtype=torch.bool)
    assert torch.equal(scored_positions(ids, labels, mask), expected)
    assert float(_scored_tokens(dict(input_ids=ids, labels=labels, attention_mask=mask))) == 7
    assert float(_scored_tokens(dict(input_ids=ids, attention_mask=mask))) == 9
    model = SFDLMForDiffusionLM(tiny_config(process="absorbing", mask_token_id=31)).eval()
    _, tokens = default_evaluate_batch(model, dict(input_ids=ids, labels=labels, attention_mask=mask), 1)
    assert tokens.tolist() == [3, 4]


def test_both_heads_refuse_a_mask_id_among_the_scored_clean_tokens():
    from hf_sfdlm.baselines import TransformerDenoiserConfig, TransformerDenoiserForDiffusionLM

    denoiser = TransformerDenoiserForDiffusionLM(TransformerDenoiserConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=64, process="absorbing", mask_token_id=31))
    sfdlm = SFDLMForDiffusionLM(tiny_config(process="absorbing", mask_token_id=31))
    ids = torch.randint(0, 31, (2, 6))
    labels = ids.clone()
    labels[0, 3] = 31
    for model in (denoiser, sfdlm):  # the Transformer's copy of the head used to skip this check
        with pytest.raises(ValueError, match="mask token id 31"):
            model(ids, labels=labels)
        with pytest.raises(ValueError, match="mask token id 31"):
            model.nelbo(ids, labels=labels)
        labels_ok = labels.clone()
        labels_ok[0, 3] = -100
        assert torch.isfinite(model(ids, labels=labels_ok).loss)


def straightforward_uniform_kl_rate(diffusion, logits, x0, x_t, t):
    """UDLM's continuous-time integrand written entry by entry in float64 (no regrouping, no series):
    h u sum_{y != z} [r_p(y) - r_q(y) + r_q(y) log(r_q(y) / r_p(y))], r_p = m_t(y) / m_t(z),
    r_q = q_t(y | x_0) / q_t(z | x_0), m_t = alpha p_hat + (1 - alpha) / V."""
    vocab = diffusion.vocab_size
    probs = logits.double().softmax(-1)
    alpha = diffusion.schedule.alpha(t).view(-1, 1, 1)
    hazard = -diffusion.schedule.alpha_derivative(t).view(-1, 1) / alpha.view(-1, 1)
    m = alpha * probs + (1 - alpha) / vocab
    q = alpha * F.one_hot(x0, vocab).double() + (1 - alpha) / vocab
    rate_p = m / m.gather(-1, x_t.unsqueeze(-1))
    rate_q = q / q.gather(-1, x_t.unsqueeze(-1))
    entries = (rate_p - rate_q + rate_q * (rate_q / rate_p).log()).scatter(-1, x_t.unsqueeze(-1), 0.0)
    return hazard / vocab * entries.sum(-1)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_regrouped_uniform_kl_rate_and_its_gradient_match_the_entrywise_formula(schedule):
    """The one-pass V-sized sum with a hand-written backward against the entry-wise formula and autograd,
    at moderate t (where float64 needs no care), for corrupted and clean positions, in float64 and float32."""
    vocab, batch, length = 37, 6, 9
    generator = torch.Generator().manual_seed(0)
    diffusion = make_diffusion("uniform", vocab_size=vocab, schedule=schedule)
    logits = (3 * torch.randn(batch, length, vocab, generator=generator, dtype=torch.float64)).requires_grad_()
    x0 = torch.randint(0, vocab, (batch, length), generator=generator)
    x_t = torch.where(torch.rand(batch, length, generator=generator) < 0.5, x0,
                      torch.randint(0, vocab, (batch, length), generator=generator))
    t = torch.tensor([0.05, 0.2, 0.4, 0.6, 0.8, 0.95], dtype=torch.float64)
    draw = NoiseDraw(t, None, torch.ones(batch, dtype=torch.float64), torch.zeros(batch, dtype=torch.bool))
    reference = straightforward_uniform_kl_rate(diffusion, logits, x0, x_t, t)
    (reference_grad,) = torch.autograd.grad(reference.sum(), logits)
    assert (x_t == x0).any() and (x_t != x0).any()
    for dtype, tolerance in ((torch.float64, 1e-8), (torch.float32, 1e-4)):  # series: < 4e-9
        leaf = logits.detach().to(dtype).requires_grad_()
        got = diffusion.loss_terms(leaf, x0, x_t, draw)
        (grad,) = torch.autograd.grad(got.sum(), leaf)
        torch.testing.assert_close(got.double(), reference.detach(), rtol=tolerance, atol=0)
        torch.testing.assert_close(grad.double(), reference_grad, rtol=tolerance, atol=tolerance * reference_grad.abs().max())


# ---------------------------------------------------------------------------------------------------
# t = 0, tiny t and inferred t (issue 22, item 4)

@pytest.mark.parametrize("process", ["uniform", "absorbing"])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_timesteps_zero_gives_the_t_to_zero_limit_with_finite_gradients(process, schedule):
    """`model(ids, labels=ids, timesteps=0.0)` was NaN for the uniform process (0 / 0 in the integrand). At
    t = 0, x_t = x_0, and the integrand is its limit: 0 for the absorbing process (nothing is masked) and,
    for the uniform one, the entry-wise float64 KL rate at t = 1e-10 (where it needs no care) to O(t)."""
    model = SFDLMForDiffusionLM(tiny_config(process=process, mask_token_id=31, noise_schedule=schedule)).double()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():  # past the adaLN-Zero identity init: p_hat depends on the input
            parameter.normal_(0, 0.2, generator=generator)
    ids = torch.randint(0, 31, (2, 8), generator=generator)
    out = model(ids, labels=ids, timesteps=0.0)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.isfinite(out.loss) and grads and all(torch.isfinite(g).all() for g in grads)
    assert torch.equal(out.noisy_input_ids, ids)
    if process == "absorbing":
        assert out.loss.item() == 0.0
        return
    if schedule == "cosine":  # alpha'(0) = 0: the hazard, and with it the integrand, vanishes at t = 0
        assert out.loss.item() == 0.0
        return
    t = torch.full((2,), 1e-10, dtype=torch.float64)
    reference = straightforward_uniform_kl_rate(model.diffusion, out.logits.detach(), ids, ids, t).mean()
    assert out.loss.item() > 0 and out.loss.item() == pytest.approx(float(reference), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_uniform_integrand_at_t_zero_is_finite_for_a_confident_and_a_hopeless_model(dtype):
    """Clean positions at t = 0 (and where 1 - alpha underflows) take the limit (h / V)(1 - p0) / p0, formed
    from the accurate 1 - p0; gradients stay finite also where p_hat(x_0) is tiny."""
    vocab = 7
    diffusion = make_diffusion("uniform", vocab_size=vocab)  # loglinear: h(0) = 1
    x0 = torch.tensor([[0, 1, 2]])
    for eps in (1e-6, 1 - 1e-6):  # p_hat puts 1 - eps on x_0
        probs = (1 - eps) * F.one_hot(x0, vocab).double() + eps * (1 - F.one_hot(x0, vocab).double()) / (vocab - 1)
        for t in (0.0, 1e-30):
            logits = probs.log().to(dtype).requires_grad_()
            draw = NoiseDraw(torch.tensor([t], dtype=torch.float64), None, torch.ones(1, dtype=torch.float64),
                             torch.zeros(1, dtype=torch.bool))
            terms = diffusion.loss_terms(logits, x0, x0, draw)
            (grad,) = torch.autograd.grad(terms.sum(), logits)
            assert torch.isfinite(grad).all()
            expected = (1 / vocab) * eps / (1 - eps)
            torch.testing.assert_close(terms.double(), torch.full_like(terms, expected, dtype=torch.float64),
                                       rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0)


def test_absorbing_weights_use_one_minus_alpha_at_tiny_t():
    """Cosine schedule at t = 1e-9: in float64 alpha(t) rounds to 1, so weights built from 1 - alpha were 0
    (discrete) or 1e12 times too large (continuous). Reference: closed forms in float64,
    -alpha'/(1 - alpha) = (pi / 2) cot(pi t / 4) and (alpha_s - alpha_t)/(1 - alpha_t) =
    (sin^2(pi t / 4) - sin^2(pi s / 4)) / sin^2(pi t / 4), with no cancellation at small t."""
    vocab, mask = 5, 4
    x0 = torch.tensor([[0, 1, 2]])
    x_t = torch.tensor([[mask, 1, mask]])
    logits = torch.randn(1, 3, vocab, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    nll = -DiscreteDiffusion(vocab, "absorbing", NoiseSchedule("cosine"), None, mask).x0_log_probs(
        logits, x_t).gather(-1, x0.unsqueeze(-1)).squeeze(-1)
    t, s = 1e-9, 0.5e-9
    ones = torch.ones(1, dtype=torch.float64)
    continuous = DiscreteDiffusion(vocab, "absorbing", NoiseSchedule("cosine"), None, mask)
    draw = NoiseDraw(torch.tensor([t], dtype=torch.float64), None, ones, torch.zeros(1, dtype=torch.bool))
    weight = (math.pi / 2) / math.tan(math.pi * t / 4)  # ~ 2 / t
    expected = torch.where(x_t == mask, weight * nll, torch.zeros_like(nll))
    torch.testing.assert_close(continuous.loss_terms(logits, x0, x_t, draw), expected, rtol=1e-12, atol=0)

    discrete = DiscreteDiffusion(vocab, "absorbing", NoiseSchedule("cosine"), 10**9, mask)
    draw = NoiseDraw(torch.tensor([t], dtype=torch.float64), torch.tensor([s], dtype=torch.float64), ones,
                     torch.zeros(1, dtype=torch.bool))
    coef = (math.sin(math.pi * t / 4) ** 2 - math.sin(math.pi * s / 4) ** 2) / math.sin(math.pi * t / 4) ** 2
    assert coef == pytest.approx(0.75, rel=1e-9)
    expected = torch.where(x_t == mask, coef * nll, torch.zeros_like(nll))
    torch.testing.assert_close(discrete.loss_terms(logits, x0, x_t, draw), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("num_timesteps", [None, 1, 2, 5, 10, 1000])
def test_inferred_timesteps_never_land_on_an_impossible_state(schedule, num_timesteps):
    """For every number of masked positions k out of L (and with padding), the t read from the input is
    one where such an x_t can occur: t > 0 when k > 0 and t < 1 when k < L (for T = 1 the only step,
    t = 1, whenever something is masked). Rounding to the grid i / T used to give t = 0 for 1 masked in
    64 and t = 1 for 63 masked in 64."""
    length, mask = 64, 31
    model = SFDLMForDiffusionLM(tiny_config(process="absorbing", mask_token_id=mask, noise_schedule=schedule,
                                            num_timesteps=num_timesteps, max_position_embeddings=128))
    ids = torch.full((length + 1, length), 5)
    for k in range(length + 1):
        ids[k, :k] = mask
    attention = torch.ones_like(ids)
    attention[::3, -4:] = 0  # padding is not maskable: it counts neither way
    t = model.infer_timesteps(ids, attention)
    masked = ((ids == mask) & (attention == 1)).any(-1)
    unmasked = ((ids != mask) & (attention == 1)).any(-1)
    assert torch.isfinite(t).all()
    assert (t[masked] > 0).all() and (t[~masked] == 0).all()
    if num_timesteps == 1:
        assert (t[masked] == 1).all()
    else:
        assert (t[unmasked] < 1).all() and (t[~unmasked] == 1).all()
    if num_timesteps is not None:  # still on the grid
        assert ((t.double() * num_timesteps - (t.double() * num_timesteps).round()).abs() < 1e-3).all()
