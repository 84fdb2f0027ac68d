"""SEDD (score_entropy.py): noise conventions, score <-> x_0 conversions, the DSE loss, its ELBO against
the exact likelihood of the reverse CTMC, and the Tweedie / Euler samplers against known distributions.

Everything is checked by exact enumeration over all V^L sequences of a tiny problem (vocabulary 3, plus
the mask for the absorbing graph), independently of the per-position formulas under test.
"""

import itertools
import math

import pytest
import torch
from conftest import tiny_config
from scipy import stats

from hf_sfdlm import SFDLMConfig, SFDLMForDiffusionLM
from hf_sfdlm.diffusion import DiscreteDiffusion, NoiseDraw, NoiseSchedule
from hf_sfdlm.score_entropy import ScoreEntropy

REAL = 3  # real tokens; the absorbing graph adds the mask as id 3
GRAPHS = ("absorbing", "uniform")



# ---------------------------------------------------------------------------------------------- helpers
def make(graph: str, schedule: str = "loglinear") -> ScoreEntropy:
    vocab = REAL + 1 if graph == "absorbing" else REAL
    return ScoreEntropy(vocab, graph, NoiseSchedule(schedule), mask_token_id=REAL if graph == "absorbing" else None)


def all_states(vocab: int, length: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product(range(vocab), repeat=length)))


def index_of(x: torch.Tensor, vocab: int) -> torch.Tensor:
    powers = vocab ** torch.arange(x.shape[-1] - 1, -1, -1)
    return (x * powers).sum(-1)


def random_data(se: ScoreEntropy, length: int, seed: int = 0) -> torch.Tensor:
    """A full-support distribution over clean sequences (no mask), as a vector over all states."""
    states = all_states(se.vocab_size, length)
    gen = torch.Generator().manual_seed(seed)
    p0 = torch.rand(len(states), generator=gen, dtype=torch.float64) + 0.2
    if se.graph == "absorbing":
        p0 = p0 * (states != se.mask_token_id).all(-1)
    return p0 / p0.sum()


def kernel(se: ScoreEntropy, alpha: float) -> torch.Tensor:
    """K[v, z] = q(z | v) = alpha [z = v] + (1 - alpha) pi_z, built independently of the library."""
    vocab = se.vocab_size
    pi = torch.zeros(vocab, dtype=torch.float64)
    if se.graph == "uniform":
        pi[:] = 1.0 / vocab
    else:
        pi[se.mask_token_id] = 1.0
    return alpha * torch.eye(vocab, dtype=torch.float64) + (1 - alpha) * pi.expand(vocab, vocab)


def transition(se: ScoreEntropy, states: torch.Tensor, alpha: float, noised=None) -> torch.Tensor:
    """T[x0, x] = prod_i q(x^i | x0^i); positions with noised[i] False are not corrupted."""
    k = kernel(se, alpha)
    out = torch.ones(len(states), len(states), dtype=torch.float64)
    for i in range(states.shape[1]):
        k_i = k if noised is None or noised[i] else torch.eye(se.vocab_size, dtype=torch.float64)
        out = out * k_i[states[:, i].unsqueeze(1), states[:, i].unsqueeze(0)]
    return out


def on_graph(se: ScoreEntropy, x: torch.Tensor) -> torch.Tensor:
    y = torch.arange(se.vocab_size)
    if se.graph == "uniform":
        return y != x.unsqueeze(-1)
    return (x.unsqueeze(-1) == se.mask_token_id) & (y != se.mask_token_id)


class Truth:
    """Exact quantities of the forward process of a data distribution p0, by enumeration."""

    def __init__(self, se: ScoreEntropy, p0: torch.Tensor, length: int, noised=None):
        self.se, self.p0, self.length, self.noised = se, p0, length, noised
        self.states = all_states(se.vocab_size, length)

    def alpha(self, t: float) -> float:
        return float(self.se.schedule.alpha(torch.tensor(t, dtype=torch.float64)))

    def marginal(self, t: float) -> torch.Tensor:
        return self.p0 @ transition(self.se, self.states, self.alpha(t), self.noised)

    def log_scores(self, t: float) -> torch.Tensor:
        """(S, L, V) log p_t(x with x^i := y) / p_t(x), -inf off the graph, 0 at y = x^i."""
        vocab, states = self.se.vocab_size, self.states
        log_p = self.marginal(t).log()
        idx = index_of(states, vocab)
        out = torch.zeros(len(states), self.length, vocab, dtype=torch.float64)
        for i in range(self.length):
            step = vocab ** (self.length - 1 - i)
            for y in range(vocab):
                neighbour = idx + (y - states[:, i]) * step
                out[:, i, y] = log_p[neighbour] - log_p[idx]
        out = torch.where(on_graph(self.se, states), out, torch.full_like(out, -math.inf))
        return out.masked_fill(torch.nn.functional.one_hot(states, vocab).bool(), 0.0)

    def posterior(self, t: float) -> torch.Tensor:
        """(S, L, V) p(x_0^i = v | x_t = x)."""
        joint = self.p0.unsqueeze(1) * transition(self.se, self.states, self.alpha(t), self.noised)  # [x0, x]
        p_t = joint.sum(0)
        out = torch.zeros(len(self.states), self.length, self.se.vocab_size, dtype=torch.float64)
        for i in range(self.length):
            for v in range(self.se.vocab_size):
                out[:, i, v] = joint[self.states[:, i] == v].sum(0) / p_t
        return out

    def outputs(self, t: float) -> torch.Tensor:
        """Head outputs whose `log_scores` are the exact scores (the parameterisation inverted)."""
        se, states = self.se, self.states
        alpha = self.alpha(t)
        if se.graph == "absorbing":
            out = self.posterior(t).log() + math.log(se.vocab_size - 1)
            return torch.nan_to_num(out, nan=0.0, neginf=-1e4)  # states of probability 0 and the mask column
        if alpha > 0:
            return self.log_scores(t).masked_fill(~on_graph(se, states), 0.0) / alpha
        # alpha -> 0: log s_y / alpha -> V (m_y - m_x), m the marginal of p0 at the position.
        marginal = self.posterior(t)  # at alpha = 0, x_t carries no information
        return se.vocab_size * (marginal - marginal.gather(-1, states.unsqueeze(-1)))

    def reverse_marginals(self, t: float, s: float) -> torch.Tensor:
        """(S, L, V) exact p(x_s^i = y | x_t = x)."""
        a = self.alpha(t) / self.alpha(s)
        joint = self.marginal(s).unsqueeze(1) * transition(self.se, self.states, a, self.noised)  # [x_s, x_t]
        p_t = joint.sum(0)
        out = torch.zeros(len(self.states), self.length, self.se.vocab_size, dtype=torch.float64)
        for i in range(self.length):
            for y in range(self.se.vocab_size):
                out[:, i, y] = joint[self.states[:, i] == y].sum(0) / p_t
        return out


def time_of_alpha(schedule: NoiseSchedule, target: torch.Tensor) -> torch.Tensor:
    """t with alpha(t) = target, by bisection (alpha is decreasing)."""
    lo, hi = torch.zeros_like(target), torch.ones_like(target)
    for _ in range(100):
        mid = (lo + hi) / 2
        above = schedule.alpha(mid) > target
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    return (lo + hi) / 2


def gauss_legendre(n: int):
    """Nodes and weights on [0, 1] for t = u^3 (which tames the log singularity at t = 0)."""
    import numpy as np

    u, w = np.polynomial.legendre.leggauss(n)
    u, w = torch.tensor((u + 1) / 2), torch.tensor(w / 2)
    return u**3, 3 * u**2 * w


def exact_elbo(se: ScoreEntropy, outputs_fn, length: int, nodes: int) -> torch.Tensor:
    """int_0^1 sum_{x_t} q(x_t | x_0) sum_i DSE_i dt for every clean x_0 (quadrature x enumeration)."""
    states = all_states(se.vocab_size, length)
    s_count = len(states)
    ts, ws = gauss_legendre(nodes)
    elbo = torch.zeros(s_count, dtype=torch.float64)
    for t, w in zip(ts.tolist(), ws.tolist()):
        outputs = outputs_fn(t)  # (S, L, V) for every x_t
        q = transition(se, states, float(se.schedule.alpha(torch.tensor(t))))  # [x0, x_t]
        x0 = states.repeat_interleave(s_count, 0)
        x_t = states.repeat(s_count, 1)
        dse = se.denoising_score_entropy(outputs.repeat(s_count, 1, 1), x0, x_t, t).sum(-1).view(s_count, s_count)
        elbo += w * (q * torch.nan_to_num(dse, posinf=0.0)).sum(1)  # nan/inf only where q = 0
    return elbo


def exact_nll(se: ScoreEntropy, outputs_fn, length: int, steps: int, clock_max: float = 30.0) -> torch.Tensor:
    """-log p_theta(x_0) of the reverse CTMC whose rates are sigma(t) Q(y -> x) s_theta(x, t)_y.

    The generator is integrated on a grid uniform in the graph's natural clock (absorbing:
    c = -log(1 - alpha), uniform: c = -log alpha), where the rates per unit clock are bounded, with
    piecewise-constant (midpoint) generators and exact matrix exponentials. Absorbing: from c = 0 (t = 1,
    all masked) to c_max, then the masks left are resolved by the frozen generator run to absorption.
    Uniform: from pi at c_max (alpha = e^-30) to c = 0 (t = 0).
    """
    vocab = se.vocab_size
    states = all_states(vocab, length)
    s_count = len(states)
    idx = index_of(states, vocab)

    def generators_per_clock(clocks: torch.Tensor) -> torch.Tensor:
        """(N, S, S) generators G[y, x] (rate x -> y per unit clock) at the given clock values."""
        alpha = -torch.expm1(-clocks) if se.graph == "absorbing" else torch.exp(-clocks)
        times = time_of_alpha(se.schedule, alpha)
        scores = torch.stack([se.log_scores(outputs_fn(t), states, t).exp() for t in times.tolist()])
        # Rate per unit clock: absorbing s (1 - alpha) / alpha, uniform s / V (see the docstring).
        factor = (1 - alpha) / alpha if se.graph == "absorbing" else torch.full_like(alpha, 1.0 / vocab)
        per_clock = torch.where(on_graph(se, states), scores * factor.view(-1, 1, 1, 1), torch.zeros_like(scores))
        gens = torch.zeros(len(clocks), s_count, s_count, dtype=torch.float64)
        source = torch.arange(s_count)
        for i in range(length):
            step = vocab ** (length - 1 - i)
            for y in range(vocab):
                target = idx + (y - states[:, i]) * step
                gens[:, target, source] += per_clock[:, :, i, y]
        return gens - torch.diag_embed(gens.sum(1))

    # Grid: half uniform in the clock, half uniform in t (mapped to the clock), so that both the clock's
    # long tail and fast changes of the scores in t are resolved.
    alpha_grid = se.schedule.alpha(torch.linspace(0, 1, steps // 2 + 1, dtype=torch.float64))
    clock_of_t = -torch.log1p(-alpha_grid) if se.graph == "absorbing" else -torch.log(alpha_grid)
    grid = torch.cat([torch.linspace(0, clock_max, steps - steps // 2 + 1, dtype=torch.float64),
                      clock_of_t.clamp(0, clock_max)]).unique()  # sorted ascending
    p = torch.zeros(s_count, dtype=torch.float64)
    if se.graph == "absorbing":
        p[index_of(torch.full((length,), se.mask_token_id), vocab)] = 1.0
    else:
        p[:] = 1.0 / s_count
        grid = grid.flip(0)
    widths = (grid[1:] - grid[:-1]).abs()
    for propagator in torch.linalg.matrix_exp(generators_per_clock((grid[:-1] + grid[1:]) / 2) * widths.view(-1, 1, 1)):
        p = propagator @ p
    clean = (states != se.mask_token_id).all(-1) if se.graph == "absorbing" else torch.ones(s_count, dtype=torch.bool)
    if se.graph == "absorbing":
        gen = generators_per_clock(torch.tensor([clock_max], dtype=torch.float64))[0]
        transient = ~clean
        # Mass left on masked states at the end is absorbed: p_A += -G_AT G_TT^{-1} p_T.
        absorbed = -gen[clean][:, transient] @ torch.linalg.solve(gen[transient][:, transient], p[transient])
        p = torch.where(clean, p, torch.zeros_like(p))
        p[clean] += absorbed
    return -p.log()[clean], clean


# ---------------------------------------------------------------------------------------------- conventions
def test_sedd_noise_is_derived_from_our_alpha():
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    for name in ("loglinear", "geometric", "linear", "cosine"):
        se = ScoreEntropy(5, "uniform", NoiseSchedule(name))
        assert torch.allclose(se.total_noise(t), -se.schedule.alpha(t).log())
        h = 1e-6
        numeric = (se.total_noise(t + h) - se.total_noise(t - h)) / (2 * h)
        assert torch.allclose(se.noise_rate(t), numeric, rtol=1e-5)
        assert float(se.total_noise(torch.tensor(0.0))) == 0.0 and math.isinf(float(se.total_noise(torch.tensor(1.0))))
    # SEDD's log-linear schedule with eps = 0, and SEDD's geometric one shifted by sigma_min.
    loglinear = ScoreEntropy(5, "uniform", NoiseSchedule("loglinear"))
    assert torch.allclose(loglinear.total_noise(t), -torch.log1p(-t))
    geometric = ScoreEntropy(5, "uniform", NoiseSchedule("geometric", sigma_min=1e-4, sigma_max=20.0))
    t = torch.linspace(0, 0.9, 50, dtype=torch.float64)
    sedd = 1e-4 ** (1 - t) * 20.0**t
    assert torch.allclose(geometric.total_noise(t), sedd - 1e-4, atol=1e-6)


def test_config_and_model_routing():
    with pytest.raises(ValueError, match="num_timesteps=None"):
        SFDLMConfig(objective="score_entropy")  # num_timesteps defaults to 1000
    config = tiny_config(objective="score_entropy", process="absorbing", mask_token_id=31)
    model = SFDLMForDiffusionLM(config)
    assert isinstance(model.diffusion, ScoreEntropy) and model.diffusion.graph == "absorbing"
    with pytest.raises(AttributeError, match="log-scores"):
        model.diffusion.reverse_probs
    assert isinstance(SFDLMForDiffusionLM(tiny_config()).diffusion, DiscreteDiffusion)  # x0 path unchanged
    with pytest.raises(ValueError, match="graph"):
        ScoreEntropy(4, "gaussian", NoiseSchedule("loglinear"))
    with pytest.raises(ValueError, match="mask_token_id"):
        ScoreEntropy(4, "absorbing", NoiseSchedule("loglinear"))
    with pytest.raises(TypeError, match="NoiseSchedule"):
        ScoreEntropy(4, "uniform", "loglinear")
    se = make("uniform")
    x = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="shape"):
        se.tweedie_probs(torch.zeros(2, 3, 5), x, 0.5, 0.4)
    with pytest.raises(ValueError, match="s < t"):
        se.euler_probs(torch.zeros(2, 3, 3), x, 0.4, 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        se.tweedie_probs(torch.zeros(2, 3, 3), x, 1.5, 0.4)
    assert not se.draw_noise(4).reconstruction.any()  # the SEDD ELBO has no t = 0 term


def test_save_pretrained_ships_score_entropy_and_reloads(tmp_path):
    model = SFDLMForDiffusionLM(tiny_config(objective="score_entropy", process="uniform")).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "score_entropy.py").exists()  # remote code: the relative import travels along
    loaded = SFDLMForDiffusionLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded.diffusion, ScoreEntropy) and loaded.config.objective == "score_entropy"
    ids, t = torch.randint(0, 31, (2, 8)), torch.tensor([0.3, 0.6])
    assert torch.equal(model.denoise(ids, t), loaded.denoise(ids, t))


@pytest.mark.parametrize("graph", GRAPHS)
def test_training_loss_and_nelbo_run_and_backpropagate(graph):
    extra = dict(mask_token_id=31) if graph == "absorbing" else {}
    model = SFDLMForDiffusionLM(tiny_config(objective="score_entropy", process=graph, **extra))
    ids = torch.randint(0, 31, (4, 12))
    labels = ids.clone()
    labels[:, :3] = -100  # a prompt: not corrupted, not scored
    out = model(ids, labels=labels, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss) and out.loss > 0
    assert torch.equal(out.noisy_input_ids[:, :3], ids[:, :3])
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    nelbo = model.nelbo(ids, num_samples=4, generator=torch.Generator().manual_seed(0))
    assert nelbo.shape == (4,) and torch.isfinite(nelbo).all()


# ---------------------------------------------------------------------------------------------- conversions
@pytest.mark.parametrize("graph", GRAPHS)
def test_scores_and_x0_probabilities_determine_each_other(graph):
    se = make(graph)
    truth = Truth(se, random_data(se, 2), 2)
    states = truth.states
    for t in (0.1, 0.5, 0.9):
        p_t = truth.marginal(t)
        live = p_t > 0
        scores, posterior = truth.log_scores(t)[live], truth.posterior(t)[live]
        x = states[live]
        # x_0 posterior -> scores: exact on the graph (entries that carry a rate).
        from_x0 = se.log_scores_from_x0_probs(posterior, x, t)
        assert torch.allclose(from_x0, scores, atol=1e-10)
        # scores -> x_0 posterior: exact where the theory allows it (absorbing: masked positions).
        back = se.x0_probs_from_log_scores(scores, x, t)
        where = (x == se.mask_token_id) if graph == "absorbing" else torch.ones_like(x, dtype=torch.bool)
        assert where.any()
        assert torch.allclose(back[where], posterior[where], atol=1e-10)
        # The head parameterisation inverts too: exact outputs give exact scores.
        assert torch.allclose(se.log_scores(truth.outputs(t)[live], x, t)[on_graph(se, x)], scores[on_graph(se, x)], atol=1e-9)
    # For a score model that is not exactly consistent, the absorbing inverse is the normalised s (1-a)/a.
    x = torch.full((1, 2), se.mask_token_id) if graph == "absorbing" else torch.zeros(1, 2, dtype=torch.long)
    outputs = torch.randn(1, 2, se.vocab_size, dtype=torch.float64)
    probs = se.x0_probs_from_log_scores(se.log_scores(outputs, x, 0.4), x, 0.4)
    assert torch.allclose(probs.sum(-1), torch.ones(1, 2, dtype=torch.float64))
    if graph == "absorbing":
        assert torch.allclose(probs[..., :REAL], outputs[..., :REAL].softmax(-1))
    else:
        with pytest.raises(ValueError, match="0 < t < 1"):
            se.x0_probs_from_log_scores(se.log_scores(outputs, x, 1.0), x, 1.0)


# ---------------------------------------------------------------------------------------------- the loss
@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("schedule", ["loglinear", "geometric"])
def test_stable_loss_equals_the_definition(graph, schedule):
    se = make(graph, schedule)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randint(0, REAL, (64, 3), generator=gen)
    t = torch.rand(64, generator=gen, dtype=torch.float64) * 0.98 + 0.01
    x_t = se.corrupt(x0, se.schedule.alpha(t), generator=gen)
    outputs = torch.randn(64, 3, se.vocab_size, generator=gen, dtype=torch.float64)
    reference = se.score_entropy(se.log_scores(outputs, x_t, t), x0, x_t, t)
    assert torch.allclose(se.denoising_score_entropy(outputs, x0, x_t, t), reference, rtol=1e-9, atol=1e-12)
    draw = NoiseDraw(t, None, torch.full_like(t, 2.0), torch.zeros_like(t, dtype=torch.bool))
    assert torch.allclose(se.loss_terms(outputs, x0, x_t, draw), 2 * reference, rtol=1e-9, atol=1e-12)
    # Finite at the ends of [0, 1], where sigma or the absorbing scores are infinite.
    for end in (0.0, 1.0):
        x_end = se.corrupt(x0, se.schedule.alpha(torch.tensor([end])).expand(64), generator=gen)
        loss = se.denoising_score_entropy(outputs.float().requires_grad_(), x0, x_end, end)
        loss.sum().backward()
        assert torch.isfinite(loss).all()


@pytest.mark.parametrize("graph", GRAPHS)
def test_score_entropy_of_x0_model_is_the_continuous_nelbo(graph):
    """With the scores implied by an x_0 model's reverse kernel, DSE is diffusion.py's continuous-time NELBO
    integrand (an independent implementation): the objectives differ only in what the network parameterises.
    Absorbing: the scores of the posterior mixture. Uniform: the normalised D3PM kernel (UDLM, Duo) jumps
    z -> y at rate sigma Q(y -> z) m(y) / m(z), m = alpha p_hat + (1 - alpha) / V, so s_y = m(y) / m(z)."""
    se = make(graph)
    x0_model = DiscreteDiffusion(se.vocab_size, graph, se.schedule, None, se.mask_token_id, objective="elbo")
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randint(0, REAL, (64, 3), generator=gen)
    t = torch.rand(64, generator=gen, dtype=torch.float64) * 0.98 + 0.01
    x_t = se.corrupt(x0, se.schedule.alpha(t), generator=gen)
    logits = torch.randn(64, 3, se.vocab_size, generator=gen, dtype=torch.float64)
    if graph == "absorbing":
        logits[..., se.mask_token_id] = -math.inf
    x0_probs = x0_model.x0_probs(logits, x_t)
    if graph == "absorbing":
        scores = se.log_scores_from_x0_probs(x0_probs, x_t, t)
    else:
        alpha = se.schedule.alpha(t).view(-1, 1, 1)
        m = alpha * x0_probs + (1 - alpha) / se.vocab_size
        scores = (m / m.gather(-1, x_t.unsqueeze(-1))).log()
    dse = se.score_entropy(scores, x0, x_t, t)
    draw = NoiseDraw(t, None, torch.ones_like(t), torch.zeros_like(t, dtype=torch.bool))
    assert torch.allclose(dse, x0_model.loss_terms(logits, x0, x_t, draw), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("graph", GRAPHS)
def test_true_scores_minimise_the_expected_loss(graph):
    se = make(graph)
    truth = Truth(se, random_data(se, 2), 2)
    states, s_count = truth.states, len(truth.states)
    t = 0.45
    weights = truth.p0.unsqueeze(1) * transition(se, states, truth.alpha(t))  # p(x0, x_t)
    rows = weights.flatten() > 0
    x0 = states.repeat_interleave(s_count, 0)[rows]
    x_t = states.repeat(s_count, 1)[rows]
    x_t_index = index_of(x_t, se.vocab_size)

    def expected_loss(log_scores):
        return (weights.flatten()[rows] * se.score_entropy(log_scores[x_t_index], x0, x_t, t).sum(-1)).sum()

    exact = truth.log_scores(t).masked_fill(truth.marginal(t).unsqueeze(-1).unsqueeze(-1) == 0, 0.0)
    exact = torch.where(on_graph(se, states), exact, torch.zeros_like(exact)).requires_grad_()
    best = expected_loss(torch.where(on_graph(se, states), exact, torch.full_like(exact, -math.inf)))
    (grad,) = torch.autograd.grad(best, exact)
    assert grad.abs().max() < 1e-10
    for seed in range(3):
        noise = 0.1 * torch.randn(exact.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        perturbed = torch.where(on_graph(se, states), exact.detach() + noise, torch.full_like(exact, -math.inf))
        assert expected_loss(perturbed) > best + 1e-6


# ---------------------------------------------------------------------------------------------- the ELBO
@pytest.mark.parametrize("graph,schedule", [("absorbing", "loglinear"), ("absorbing", "geometric"),
                                            ("uniform", "loglinear"), ("uniform", "geometric")])
def test_elbo_bounds_the_exact_nll_of_the_reverse_ctmc(graph, schedule):
    """For a generic score model (head outputs a smooth random function of (x_t, t)), the exact
    -log p_theta(x_0) of its reverse CTMC never exceeds the exact score-entropy ELBO."""
    se = make(graph, schedule)
    length = 2
    states = all_states(se.vocab_size, length)
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(len(states), length, se.vocab_size, generator=gen, dtype=torch.float64)
    b = torch.randn(len(states), length, se.vocab_size, generator=gen, dtype=torch.float64)

    def outputs_fn(t):
        return a + b * t

    nll, clean = exact_nll(se, outputs_fn, length, steps=400)
    nll_coarse, _ = exact_nll(se, outputs_fn, length, steps=200)
    assert (nll - nll_coarse).abs().max() < 1e-3  # the reverse CTMC is resolved
    elbo = exact_elbo(se, outputs_fn, length, nodes=64)[clean]
    elbo_coarse = exact_elbo(se, outputs_fn, length, nodes=32)[clean]
    assert (elbo - elbo_coarse).abs().max() < 1e-4  # the quadrature is resolved
    assert torch.isfinite(elbo).all() and torch.isfinite(nll).all()
    assert (nll <= elbo - 0.05).all(), (nll, elbo)  # gaps here are 0.14 to 0.3 nats
    assert math.isclose(float(torch.exp(-nll).sum()), 1.0, abs_tol=1e-9)  # a distribution over clean x_0


@pytest.mark.parametrize("graph", GRAPHS)
def test_reverse_ctmc_of_true_scores_recovers_the_data(graph):
    """Check of the enumerator itself: exact scores reproduce p0, and the ELBO bounds -log p0."""
    se = make(graph)
    truth = Truth(se, random_data(se, 2, seed=4), 2)
    nll, clean = exact_nll(se, truth.outputs, 2, steps=200)
    target = -truth.p0.log()[clean]
    assert torch.allclose(nll, target, atol=3e-3)
    elbo = exact_elbo(se, truth.outputs, 2, nodes=96)[clean]
    assert (elbo >= target - 1e-3).all()


@pytest.mark.parametrize("graph", GRAPHS)
def test_model_nelbo_is_an_unbiased_estimate_of_the_exact_elbo(graph):
    """`SFDLMForDiffusionLM.nelbo` of a score-entropy model estimates the exact ELBO of its outputs. The
    cosine schedule keeps the estimator's variance finite (with alpha = 1 - t it diverges logarithmically
    at t -> 0, for the x_0-parameterised NELBO as well), so the standard errors can be trusted."""
    extra = dict(mask_token_id=REAL) if graph == "absorbing" else {}
    config = tiny_config(vocab_size=REAL + bool(extra), objective="score_entropy", process=graph,
                         stage_depths=[1], pool_factors=[], noise_schedule="cosine", **extra)
    model = SFDLMForDiffusionLM(config).eval()
    se = model.diffusion
    states = all_states(se.vocab_size, 2)

    def outputs_fn(t):
        with torch.no_grad():
            return model.denoise(states, torch.full((len(states),), t)).double()

    clean = (states != REAL).all(-1) if graph == "absorbing" else torch.ones(len(states), dtype=torch.bool)
    exact = exact_elbo(se, outputs_fn, 2, nodes=32)[clean]
    x0 = states[clean].repeat_interleave(32, 0)
    samples = model.nelbo(x0, num_samples=64, generator=torch.Generator().manual_seed(5), return_samples=True)
    samples = samples.view(int(clean.sum()), -1)
    mean, stderr = samples.mean(-1), samples.std(-1) / math.sqrt(samples.shape[-1])
    assert ((mean - exact).abs() < 4 * stderr).all(), (mean, exact, stderr)
    assert (stderr < 0.1 * exact).all()  # ... and the comparison has teeth


# ---------------------------------------------------------------------------------------------- samplers
@pytest.mark.parametrize("graph", GRAPHS)
def test_tweedie_step_is_the_exact_per_position_reverse_marginal(graph):
    se = make(graph)
    truth = Truth(se, random_data(se, 2, seed=6), 2)
    for t, s in ((1.0, 0.8), (0.7, 0.4), (0.3, 0.0)):
        live = truth.marginal(t) > 0
        x = truth.states[live]
        probs = se.tweedie_probs(truth.outputs(t)[live], x, t, s)
        assert torch.allclose(probs, truth.reverse_marginals(t, s)[live], atol=1e-9), (t, s)


@pytest.mark.parametrize("graph", GRAPHS)
def test_euler_step_is_first_order_accurate(graph):
    se = make(graph, "geometric")  # with alpha = 1 - t the absorbing Euler step happens to be exact
    truth = Truth(se, random_data(se, 2, seed=7), 2)
    t = 0.6
    live = truth.marginal(t) > 0
    x, outputs = truth.states[live], truth.outputs(t)[live]
    errors = []
    for h in (0.02, 0.01):
        errors.append(float((se.euler_probs(outputs, x, t, t - h) - truth.reverse_marginals(t, t - h)[live]).abs().max()))
    assert errors[1] < errors[0] / 3 and errors[0] < 0.05, errors  # local error O(h^2)


def run_sampler(se, truth, step: str, steps: int, batch: int, seed: int, fixed=None, start=None):
    gen = torch.Generator().manual_seed(seed)
    length = truth.length
    if start is not None:
        x = start.clone()
    elif se.graph == "absorbing":
        x = torch.full((batch, length), se.mask_token_id)
    else:
        x = torch.randint(0, se.vocab_size, (batch, length), generator=gen)
    grid = torch.linspace(1, 0, steps + 1, dtype=torch.float64).tolist()
    predictor = se.tweedie_probs if step == "tweedie" else se.euler_probs
    for t, s in zip(grid[:-1], grid[1:]):
        probs = predictor(truth.outputs(t)[index_of(x, se.vocab_size)], x, t, s)
        drawn = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=gen).view_as(x)
        x = drawn if fixed is None else torch.where(fixed.bool(), x, drawn)  # SEDD's proj_fun
    return x


def chi_square_pvalue(samples: torch.Tensor, probs: torch.Tensor, vocab: int) -> float:
    counts = torch.bincount(index_of(samples, vocab), minlength=len(probs)).double()
    support = probs > 0
    assert counts[~support].sum() == 0  # never a sequence of probability zero (e.g. a leftover mask)
    return float(stats.chisquare(counts[support].numpy(), (probs[support] * len(samples)).numpy()).pvalue)


@pytest.mark.parametrize("graph,schedule", [("absorbing", "loglinear"), ("absorbing", "geometric"),
                                            ("uniform", "loglinear"), ("uniform", "geometric")])
@pytest.mark.parametrize("step", ["tweedie", "euler"])
def test_sampler_draws_the_data_distribution(graph, schedule, step):
    """Chi-square goodness of fit at a fixed seed, with a stub score model that returns the exact scores
    of a known distribution over all 27 sequences of length 3. (Tau-leaping's bias at 128 steps shows
    only with ~1e5 samples, for the uniform graph under the geometric schedule.)"""
    se = make(graph, schedule)
    truth = Truth(se, random_data(se, 3, seed=8), 3)
    samples = run_sampler(se, truth, step, steps=128, batch=4000, seed=9)
    assert chi_square_pvalue(samples, truth.p0, se.vocab_size) > 1e-3
    # ... and the test has power: the same samples are rejected against p0 with 0.03 of mass moved from
    # its most likely sequence to its least likely one (total variation 0.03).
    other = truth.p0.clone()
    support = other > 0
    most, least = other.argmax(), torch.where(support, other, torch.ones_like(other)).argmin()
    other[most] -= 0.03
    other[least] += 0.03
    assert chi_square_pvalue(samples, other, se.vocab_size) < 1e-4


@pytest.mark.parametrize("graph,step", [("absorbing", "tweedie"), ("uniform", "euler")])
def test_infilling_samples_the_conditional_and_keeps_the_context(graph, step):
    """Position 1 is fixed (SEDD's proj_fun); the stub's scores are those of the conditional, as a model
    trained with the context unscored (labels = -100) learns them."""
    se = make(graph)
    p0 = random_data(se, 3, seed=11)
    states = all_states(se.vocab_size, 3)
    conditional = p0 * (states[:, 1] == 2)
    conditional = conditional / conditional.sum()
    truth = Truth(se, conditional, 3, noised=[True, False, True])
    batch = 3000
    start = torch.full((batch, 3), se.mask_token_id) if graph == "absorbing" else \
        torch.randint(0, se.vocab_size, (batch, 3), generator=torch.Generator().manual_seed(12))
    start[:, 1] = 2
    fixed = torch.zeros(batch, 3, dtype=torch.bool)
    fixed[:, 1] = True
    samples = run_sampler(se, truth, step, steps=64, batch=batch, seed=13, fixed=fixed, start=start)
    assert (samples[:, 1] == 2).all()
    assert chi_square_pvalue(samples, conditional, se.vocab_size) > 1e-3


# ---------------------------------------------------------------------------------------------- generate()
def score_stub_model(graph: str, p0_fn, length: int, noised=None, schedule: str = "loglinear"):
    """An SFDLM score model whose `denoise` returns the exact head outputs of a known distribution, so
    `generate` runs the samplers through the generation mixin (fixed positions, per-row generators)."""
    extra = dict(mask_token_id=REAL) if graph == "absorbing" else {}
    config = tiny_config(vocab_size=REAL + bool(extra), objective="score_entropy", process=graph,
                         noise_schedule=schedule, **extra)
    model = SFDLMForDiffusionLM(config).eval()
    truth = Truth(model.diffusion, p0_fn(model.diffusion), length, noised)

    def denoise(ids, timesteps=None, attention_mask=None):
        out = torch.empty(*ids.shape, model.diffusion.vocab_size)
        for t in timesteps.unique().tolist():
            rows = timesteps == t
            out[rows] = truth.outputs(t)[index_of(ids[rows], model.diffusion.vocab_size)].float()
        return out

    model.denoise = denoise
    return model, truth


@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("sampler", ["tweedie", "euler"])
def test_generate_with_sedd_samplers_draws_the_data_distribution(graph, sampler):
    model, truth = score_stub_model(graph, lambda se: random_data(se, 3, seed=14), 3)
    out = model.generate(None, max_new_tokens=3, num_return_sequences=1500, steps=64, sampler=sampler,
                         generator=torch.Generator().manual_seed(15))
    assert chi_square_pvalue(out, truth.p0, model.diffusion.vocab_size) > 1e-3


@pytest.mark.parametrize("graph,sampler", [("absorbing", "euler"), ("uniform", "tweedie")])
def test_generate_infills_and_continues_prompts_from_the_conditional(graph, sampler):
    """Absorbing: infill [MASK, 2, MASK]; uniform: continue the prompt [2] by two tokens. The stub's scores
    are those of the data conditioned on the fixed token, as a model trained with it unscored learns."""
    fixed_at = 1 if graph == "absorbing" else 0

    def conditional(se):
        states = all_states(se.vocab_size, 3)
        p = random_data(se, 3, seed=16) * (states[:, fixed_at] == 2)
        return p / p.sum()

    noised = [i != fixed_at for i in range(3)]
    model, truth = score_stub_model(graph, conditional, 3, noised=noised)
    if graph == "absorbing":
        prompt, new = torch.tensor([[REAL, 2, REAL]]), 0
    else:
        prompt, new = torch.tensor([[2]]), 2
    out = model.generate(prompt, max_new_tokens=new, num_return_sequences=1500, steps=64, sampler=sampler,
                         generator=torch.Generator().manual_seed(17))
    assert (out[:, fixed_at] == 2).all()
    assert chi_square_pvalue(out, truth.p0, model.diffusion.vocab_size) > 1e-3


def test_generate_refuses_mismatched_samplers_and_logit_filters():
    model, _ = score_stub_model("absorbing", lambda se: random_data(se, 2), 2)
    out = model.generate(None, max_new_tokens=2, steps=4, generator=torch.Generator().manual_seed(0))
    assert (out != REAL).all()  # the default sampler for a score model is a SEDD one and leaves no mask
    with pytest.raises(ValueError, match="score"):
        model.generate(None, max_new_tokens=2, steps=4, sampler="ancestral")
    with pytest.raises(ValueError, match="temperature 1"):
        model.generate(None, max_new_tokens=2, steps=4, sampler="tweedie", temperature=0.7)
    x0_model = SFDLMForDiffusionLM(tiny_config(process="absorbing", mask_token_id=31)).eval()
    with pytest.raises(ValueError, match="x0"):
        x0_model.generate(None, max_new_tokens=2, steps=4, sampler="euler")


@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("sampler", ["tweedie", "euler"])
def test_greedy_generation(graph, sampler):
    """temperature=0: the last step takes each position's most probable token (uniform: Duo's greedy tail),
    and absorbing positions that unmask earlier take their most probable token. With 80% of the data on one
    sequence (whose every conditional is the most probable), absorbing greedy decoding always returns it,
    where sampling returns it about 80% of the time."""

    def peaked(se):
        p = random_data(se, 3, seed=18)
        p = 0.2 * p / p.sum()
        p[index_of(torch.tensor([1, 0, 2]), se.vocab_size)] += 0.8
        return p

    model, truth = score_stub_model(graph, peaked, 3)
    mode = torch.tensor([1, 0, 2])
    steps = 16
    greedy = model.generate(None, max_new_tokens=3, num_return_sequences=200, steps=steps, sampler=sampler,
                            temperature=0.0, output_history=True, generator=torch.Generator().manual_seed(19))
    sampled = model.generate(None, max_new_tokens=3, num_return_sequences=200, steps=steps, sampler=sampler,
                             generator=torch.Generator().manual_seed(19))
    greedy_rate, sampled_rate = ((out == mode).all(-1).double().mean() for out in (greedy.sequences, sampled))
    assert 0.65 < sampled_rate < 0.95
    if graph == "absorbing":
        assert greedy_rate == 1
    else:
        se, before = model.diffusion, greedy.history[-2]
        t = 1 / steps
        last = getattr(se, f"{sampler}_probs")(truth.outputs(t)[index_of(before, se.vocab_size)], before, t, 0.0)
        assert torch.equal(greedy.sequences, last.argmax(-1))
        assert greedy_rate >= sampled_rate
