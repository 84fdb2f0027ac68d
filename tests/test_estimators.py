"""The NELBO estimators (`hf_sfdlm.diffusion.NELBO_ESTIMATORS`): unbiased for the same bound against exact
enumeration on a tiny model, and of finite, much lower variance than the uniform-t estimator on the
Bayes-optimal factorised denoiser of a Markov chain."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from hf_sfdlm import DiscreteDiffusion, NoiseSchedule, SFDLMForDiffusionLM
from hf_sfdlm.diffusion import MaskedCountTable, monte_carlo_nelbo, resolve_estimator, training_loss
from test_diffusion import accurate_continuous_nelbo, exact_discrete_nelbo


def random_model(process, schedule="loglinear", num_timesteps=None, seed=0, time_conditioning=False):
    """A 2-token SFDLM (3 clean tokens; + the mask for absorbing) with random weights, and its float64
    denoiser for the enumerations. Without noise conditioning by default: a random model's sinusoidal time
    features oscillate faster in t than the quadrature of the exact NELBO resolves (see `smooth_in_t`)."""
    config = tiny_config(vocab_size=4, process=process, mask_token_id=3 if process == "absorbing" else None,
                         stage_depths=[1], pool_factors=[], hidden_size=8, num_timesteps=num_timesteps,
                         noise_schedule=schedule, time_conditioning=time_conditioning)
    torch.manual_seed(seed)
    model = SFDLMForDiffusionLM(config).double().eval()
    with torch.no_grad():  # past adaLN-Zero's identity start, so that every input matters
        for parameter in model.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))

    def denoise(states, t, positions=None):
        with torch.no_grad():
            return model.denoise(states, t, positions=positions).double()

    return model, denoise


def smooth_in_t(denoise):
    """The denoiser made to depend on t smoothly (a test of the law of t given the masked count)."""

    def timed(states, t, positions=None):
        logits = denoise(states, t)
        logits = logits * (0.3 + 2 * t.view(-1, 1, 1)) + torch.sin(3 * t).view(-1, 1, 1) * torch.arange(
            logits.shape[-1], dtype=logits.dtype)
        return logits if positions is None else logits[positions]

    return timed


def check_unbiased(samples: torch.Tensor, exact: float) -> None:
    """Rows are independent replicates (each a stratified mean over its draws)."""
    rows = samples.mean(-1)
    standard_error = rows.std().item() / math.sqrt(len(rows))
    assert abs(rows.mean().item() - exact) < 4 * standard_error + 1e-9, (rows.mean().item(), exact, standard_error)
    assert standard_error < 0.03 * exact  # the check has teeth (a 12 % bias would fail it)


@pytest.mark.parametrize("process", ["absorbing", "uniform"])
@pytest.mark.parametrize("estimator", ["masked_count", "importance"])
def test_continuous_estimators_are_unbiased_for_the_enumerated_nelbo(process, estimator):
    model, denoise = random_model(process, schedule="loglinear")
    timed = smooth_in_t(denoise)
    x0 = torch.tensor([0, 2])
    exact = accurate_continuous_nelbo(timed, model.diffusion, x0)
    rows = x0.view(1, -1).expand(8000, -1)
    samples = monte_carlo_nelbo(model.diffusion, timed, rows, torch.ones_like(rows, dtype=torch.bool), 2,
                                torch.Generator().manual_seed(1), estimator=estimator,
                                head_only=process == "absorbing")
    check_unbiased(samples, exact)
    # and through the model's own `nelbo` (its denoiser ignores t)
    exact = accurate_continuous_nelbo(denoise, model.diffusion, x0)
    check_unbiased(model.nelbo(rows, num_samples=2, estimator=estimator, generator=torch.Generator().manual_seed(2),
                               return_samples=True), exact)


def test_discrete_time_masked_count_is_unbiased_for_the_enumerated_nelbo():
    model, denoise = random_model("absorbing", schedule="cosine", num_timesteps=3, time_conditioning=True)
    for x0 in (torch.tensor([1, 2]), torch.tensor([0, 0])):
        exact = exact_discrete_nelbo(denoise, model.diffusion, x0, 3)
        samples = model.nelbo(x0.view(1, -1).expand(3000, -1), num_samples=2, estimator="masked_count",
                              generator=torch.Generator().manual_seed(2), return_samples=True)
        check_unbiased(samples, exact)


def test_discrete_masked_count_weights_tend_to_one_over_m():
    """W_m = sum_i c_i Binom(m; n, a_i) is the Riemann sum of int (1/a) Binom(m; n, a) da = 1/m."""
    n = 6
    for schedule in ("loglinear", "cosine"):
        fine = MaskedCountTable(NoiseSchedule(schedule), 20_000, n)
        m = torch.arange(1, n + 1, dtype=torch.float64)
        torch.testing.assert_close(fine.weights[1:], 1 / m, rtol=2e-3, atol=0)
        torch.testing.assert_close(fine.steps.sum(-1)[1:], torch.ones(n, dtype=torch.float64))
    coarse = MaskedCountTable(NoiseSchedule("loglinear"), 1, n)  # one step: everything masked, weight 1
    assert coarse.support.tolist() == [n] and coarse.weights[n].item() == pytest.approx(1.0)


@pytest.mark.parametrize("process", ["absorbing", "uniform"])
@pytest.mark.parametrize("estimator", ["masked_count", "importance"])
def test_training_loss_keeps_the_bound_s_expectation(process, estimator):
    """E[loss per scored token] = NELBO / n under every training estimator (exact, by enumeration)."""
    model, denoise = random_model(process, schedule="loglinear")
    timed = smooth_in_t(denoise)
    x0 = torch.tensor([1, 0])
    exact = accurate_continuous_nelbo(timed, model.diffusion, x0)
    generator = torch.Generator().manual_seed(3)
    rows = x0.view(1, -1).expand(500, -1)
    scored = torch.ones_like(rows, dtype=torch.bool)
    losses = torch.stack([training_loss(model.diffusion, timed, rows, scored, generator, estimator=estimator,
                                        head_only=process == "absorbing")[0] for _ in range(12)])
    # each loss averages 500 rows stratified together: 12 independent replicates
    standard_error = losses.std().item() / math.sqrt(len(losses))
    assert abs(losses.mean().item() * 2 - exact) < 4 * 2 * standard_error + 1e-9
    assert standard_error < 0.02 * exact / 2


def test_estimator_names_are_checked():
    continuous_uniform = DiscreteDiffusion(4, "uniform", NoiseSchedule("loglinear"), None)
    discrete_uniform = DiscreteDiffusion(4, "uniform", NoiseSchedule("loglinear"), 8)
    discrete_absorbing = DiscreteDiffusion(4, "absorbing", NoiseSchedule("loglinear"), 8, 3)
    assert resolve_estimator(continuous_uniform, "auto") == "masked_count"
    assert resolve_estimator(discrete_uniform, "auto") == "uniform_t"
    assert resolve_estimator(discrete_absorbing, "auto") == "masked_count"
    with pytest.raises(ValueError, match="estimator"):
        resolve_estimator(continuous_uniform, "stratified")
    with pytest.raises(ValueError, match="uniform_t"):
        resolve_estimator(discrete_uniform, "masked_count")
    with pytest.raises(ValueError, match="continuous-time"):
        resolve_estimator(discrete_absorbing, "importance")
    model, _ = random_model("absorbing")
    with pytest.raises(ValueError, match="estimator"):
        model.nelbo(torch.tensor([[0, 1]]), estimator="t")


# ---------------------------------------------------------------------------------------------------
# Variance on a trained-looking denoiser: the exact per-position posterior of a Markov chain.

def markov_chain(k=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    transition = torch.rand(k, k, generator=generator, dtype=torch.float64) ** 3 + 0.02
    transition = transition / transition.sum(-1, keepdim=True)
    values, vectors = torch.linalg.eig(transition.T)
    stationary = vectors[:, values.real.argmax()].real
    return transition, (stationary / stationary.sum()).abs()


def bayes_denoiser(diffusion, transition, start, leave_one_out):
    """p_hat(x_0^i | x_t) of the chain by forward-backward: the posterior given all of x_t (absorbing, whose
    masked positions carry no evidence of their own) or given x_t without position i (uniform: the reverse
    kernel adds position i's own evidence itself)."""
    k, vocab = transition.shape[0], diffusion.vocab_size
    prior = diffusion.prior(torch.float64)

    def denoise(x_t, t, positions=None):
        alpha = diffusion.schedule.alpha(t).view(-1, 1, 1)
        evidence = alpha * F.one_hot(x_t, vocab)[..., :k].double() + (1 - alpha) * prior[x_t].unsqueeze(-1)
        batch, length = x_t.shape
        forward = [start.expand(batch, k)]
        for j in range(1, length):
            message = (forward[-1] * evidence[:, j - 1]) @ transition
            forward.append(message / message.sum(-1, keepdim=True))
        backward = [torch.ones(batch, k, dtype=torch.float64)]
        for j in range(length - 2, -1, -1):
            message = (evidence[:, j + 1] * backward[0]) @ transition.T
            backward.insert(0, message / message.sum(-1, keepdim=True))
        posterior = torch.stack(forward, 1) * torch.stack(backward, 1)
        if not leave_one_out:
            posterior = posterior * evidence
        logits = torch.full((batch, length, vocab), -math.inf, dtype=torch.float64)
        logits[..., :k] = (posterior / posterior.sum(-1, keepdim=True)).clamp_min(1e-300).log()
        return logits if positions is None else logits[positions]

    return denoise


@pytest.mark.parametrize("process", ["absorbing", "uniform"])
def test_new_estimator_has_finite_variance_five_times_below_uniform_t(process):
    """Length 8, 4 model calls per estimate, 20,000 independent estimates of one sequence, log-linear schedule
    (alpha'(0) != 0: the uniform-t estimator's variance is infinite, its sample variance grows with the
    number of replicates). Measured: absorbing 6.5 vs 1.0, uniform 93 vs 6.3."""
    transition, start = markov_chain()
    k, length, calls, replicates = 3, 8, 4, 20_000
    mask = k if process == "absorbing" else None
    diffusion = DiscreteDiffusion(k + (process == "absorbing"), process, NoiseSchedule("loglinear"), None, mask)
    denoise = bayes_denoiser(diffusion, transition, start, leave_one_out=process == "uniform")
    x0 = torch.tensor([[0, 0, 1, 2, 2, 1, 0, 2]]).expand(replicates, -1)
    scored = torch.ones_like(x0, dtype=torch.bool)
    estimates = {}
    for estimator in ("uniform_t", "masked_count"):
        samples = monte_carlo_nelbo(diffusion, denoise, x0, scored, calls, torch.Generator().manual_seed(5),
                                    estimator=estimator)
        estimates[estimator] = samples.mean(-1)
    new, old = estimates["masked_count"], estimates["uniform_t"]
    assert old.var() >= 5 * new.var(), (old.var().item(), new.var().item())
    # finite: the two halves' variances agree, and no estimate strays far (one uniform-t draw can)
    first, second = new[:replicates // 2].var(), new[replicates // 2:].var()
    assert 0.8 < float(first / second) < 1.25
    assert float((new - new.mean()).abs().max()) < 10 * float(new.std())
    # both estimate the same value: the chain's -log p(x_0) (a Bayes-optimal continuous-time denoiser is tight)
    states = x0[0]
    exact = -float(start[states[0]].log() + transition[states[:-1], states[1:]].log().sum())
    assert abs(new.mean().item() - exact) < 4 * new.std().item() / math.sqrt(replicates)
    assert abs(old.mean().item() - exact) < 4 * old.std().item() / math.sqrt(replicates)


# ---------------------------------------------------------------------------------------------------
# The reported error bar (independent replicates) against the spread of independent runs and a long run.

@pytest.mark.parametrize("process", ["absorbing", "uniform"])
def test_reported_standard_error_matches_the_spread_of_independent_runs(process):
    from hf_sfdlm.evaluation import score_blocks

    config = tiny_config(process=process, mask_token_id=31 if process == "absorbing" else None,
                         noise_schedule="loglinear")
    torch.manual_seed(0)
    model = SFDLMForDiffusionLM(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    blocks = list(torch.randint(0, 31, (8, 16), generator=torch.Generator().manual_seed(1)))
    totals, errors = [], []
    for seed in range(30):
        values, variances = score_blocks(model, blocks, batch_size=8, num_samples=4, seed=seed)
        totals.append(float(values.sum()))
        errors.append(float(variances.sum().sqrt()))
    totals = torch.tensor(totals, dtype=torch.float64)
    spread, reported = float(totals.std()), float(torch.tensor(errors).pow(2).mean().sqrt())
    assert 0.65 < reported / spread < 1.5, (reported, spread)
    values, variances = score_blocks(model, blocks, batch_size=8, num_samples=96, seed=999)
    long_run, long_error = float(values.sum()), float(variances.sum().sqrt())
    assert long_error < 0.3 * spread
    assert abs(float(totals.mean()) - long_run) < 4 * math.hypot(spread / math.sqrt(len(totals)), long_error)
    with pytest.raises(ValueError, match="num_replicates"):
        score_blocks(model, blocks, num_samples=3)
