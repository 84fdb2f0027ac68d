"""SEDD: concrete scores, the denoising score-entropy loss, its ELBO and the Tweedie / Euler samplers.

Score Entropy Discrete Diffusion (SEDD, Lou, Meng & Ermon, arXiv 2310.16834) parameterises the reverse
process by *concrete scores* s_theta(x_t, t)_{i,y} ~ p_t(x_t with x^i := y) / p_t(x_t) instead of x_0
probabilities. This module is its counterpart of `diffusion.py` and uses the same forward processes.

Graphs and noise, in SEDD's language and ours. Per position the forward CTMC is dp/dt = sigma(t) Q p:

  absorbing  Q: rate 1 from every token to the mask          exp(sigma_bar Q) = mixing with onehot(mask)
  uniform    Q = 1 1^T / V - I: rate 1/V to every other token exp(sigma_bar Q) = mixing with 1 / V

so `q(x_t | x_0) = alpha_t onehot(x_0) + (1 - alpha_t) pi` with alpha_t = exp(-sigma_bar(t)). We take
alpha from `NoiseSchedule`, which reaches alpha(0) = 1 and alpha(1) = 0 exactly, and *derive* SEDD's
total noise and rate from it: sigma_bar(t) = -log alpha(t), sigma(t) = -alpha'(t) / alpha(t).
`"loglinear"` is SEDD's log-linear schedule with eps = 0 (alpha = 1 - t). `"geometric"` is SEDD's
sigma_bar = sigma_min^(1-t) sigma_max^t after the affine rescaling of `NoiseSchedule`, which makes
ours sigma_bar_SEDD(t) - sigma_min to within exp(-sigma_max) away from t = 1, and infinite at t = 1
(SEDD stops at sigma_max and adds a prior KL; ours is zero because the chain ends at pi exactly).

Parameterisation of the head outputs o (SEDD's `scale_by_sigma` and our uniform analogue):

  absorbing, x_t^i = mask, y != mask:  log s_y = o_y - log(V - 1) + log(alpha_t / (1 - alpha_t))
  uniform,   y != x_t^i:               log s_y = alpha_t * o_y

and log s = 0 at y = x_t^i. Entries off the graph (no forward jump y -> x_t^i: every y at an unmasked
absorbing position, y = mask elsewhere) are -inf: their reverse rates are zero. Both scalings keep the
ELBO finite although sigma(1) = inf: for the absorbing graph the integrand becomes
-alpha'/(1 - alpha) * (sum_y s^_y - log s^_{x_0} - 1) with s^ = exp(o) / (V - 1), and the uniform
scores tend to 1 as alpha_t -> 0, which the integrand needs (it is sigma(t) times a term that is zero
only at s = 1); SEDD's own uniform model needs no scaling because its sigma_bar stops at sigma_max.

Scores and x_0 probabilities. Because the forward noise is independent per position, the exact score
is linear in the exact posterior marginal p(x_0^i | x_t):

  s_y = sum_v p(x_0^i = v | x_t) q(y | v) / q(x_t^i | v)

  absorbing (masked x_t^i):  s_y = alpha / (1 - alpha) * p(x_0^i = y | x_t), so each determines the other,
  uniform:                   s_y = alpha p_y / c + c W, W = sum_v p_v / q(x_t^i | v), c = (1 - alpha) / V:
                             an affine bijection for 0 < alpha < 1 (at alpha = 0 every score is 1),

and the inverse is Tweedie's formula to t = 0: x0_probs_from_log_scores(s) = tweedie_probs(s, t -> 0).
A learned score need not be exactly consistent: for the absorbing graph the inverse is normalised
(sum_y s^_y = 1 exactly for true scores); for the uniform graph it always sums to 1 but leaves the
simplex when the scores are outside the image of the map (never for exact scores).

ELBO (SEDD's likelihood bound): -log p_theta(x_0) <= int_0^1 E_{x_t ~ q(.|x_0)} sum_i DSE_i dt, where

  DSE_i = sigma(t) sum_{y != x_t^i} Q(y -> x_t^i) [s_y - r_y log s_y + r_y log r_y - r_y],
  r_y = q(y | x_0^i) / q(x_t^i | x_0^i),

and the prior term KL(q(x_1 | x_0) || pi) is zero. This is exactly the continuous-time NELBO of
`diffusion.py` when the rates come from x_0 probabilities (tested), so the two objectives differ only
in what the network parameterises.

This file is "remote code": it imports only torch and its sibling files.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .diffusion import AbsorbingDiffusion, DiscreteDiffusion, NoiseDraw, NoiseSchedule, UniformDiffusion

GRAPHS = ("absorbing", "uniform")
SCORE_PROCESSES: dict[str, type[ScoreEntropy]] = {}


def _as_rows(value, batch: int, device) -> torch.Tensor:
    """A scalar or (B,) time as a float64 (B,) tensor on `device`."""
    value = torch.as_tensor(value, dtype=torch.float64, device=device).reshape(-1)
    if value.numel() == 1:
        value = value.expand(batch)
    if value.shape != (batch,):
        raise ValueError(f"Expected a scalar or {batch} times (one per row), got shape {tuple(value.shape)}.")
    if bool(((value < 0) | (value > 1)).any()):
        raise ValueError(f"Times must lie in [0, 1], got {value.tolist()}.")
    return value


def _x0_only(name: str) -> property:
    """A method of the x_0 parameterisation, which a score model does not have."""

    def refuse(self):
        raise AttributeError(
            f"`{name}` needs logits of p_hat(x_0 | x_t), but a score-entropy model emits log-scores; "
            "use `x0_probs_from_log_scores(log_scores(outputs, x_t, t), x_t, t)` or the Tweedie/Euler steps.")

    return property(refuse)


class ScoreEntropy(DiscreteDiffusion):
    """SEDD for the absorbing and uniform graphs: score parameterisation, DSE loss, ELBO, conversions and
    the Tweedie tau-leaping and Euler sampler steps.

    A `DiscreteDiffusion` whose network emits log-scores: the forward process (`schedule`, `prior`,
    `corrupt`, `draw_noise`) is inherited from `AbsorbingDiffusion` / `UniformDiffusion`;
    `ScoreEntropy(vocab_size, graph, ...)` builds `AbsorbingScoreEntropy` or `UniformScoreEntropy`, which
    hold each graph's closed forms. `SFDLMForDiffusionLM` uses it as its `diffusion` when
    `config.objective == "score_entropy"`.

    Args:
        vocab_size: V, the number of token ids (the mask included, for the absorbing graph).
        graph: ``"absorbing"`` or ``"uniform"`` (the `process` of the config).
        schedule: the `NoiseSchedule` giving alpha(t).
        mask_token_id: the absorbing state (required for ``"absorbing"``).
    """

    parameterization = "score"

    x0_probs = _x0_only("x0_probs")
    x0_log_probs = _x0_only("x0_log_probs")
    reverse_probs = _x0_only("reverse_probs")
    posterior_probs = _x0_only("posterior_probs")
    kl_to_reverse = _x0_only("kl_to_reverse")

    def __new__(cls, vocab_size: int = 0, graph: str | None = None, *args, **kwargs):
        if cls is ScoreEntropy:
            if graph not in SCORE_PROCESSES:
                raise ValueError(f"`graph` must be one of {GRAPHS}, got {graph!r}.")
            cls = SCORE_PROCESSES[graph]
        return object.__new__(cls)

    def __init__(self, vocab_size: int, graph: str | None = None, schedule: NoiseSchedule | None = None,
                 mask_token_id: int | None = None):
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
            raise ValueError(f"`vocab_size` must be an integer >= 2, got {vocab_size!r}.")
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"`schedule` must be a NoiseSchedule, got {type(schedule).__name__}.")
        mask_token_id = self._check_mask(vocab_size, mask_token_id)
        super().__init__(vocab_size, graph, schedule, None, mask_token_id, objective="score_entropy")

    @classmethod
    def objectives(cls) -> tuple[str, ...]:
        return ("score_entropy",)

    @property
    def graph(self) -> str:
        return self.process

    def _check_mask(self, vocab_size: int, mask_token_id) -> int | None:
        raise NotImplementedError

    def total_noise(self, t) -> torch.Tensor:
        """SEDD's sigma_bar(t) = -log alpha(t) (float64; +inf at t = 1)."""
        return -torch.log(self.schedule.alpha(t))

    def noise_rate(self, t) -> torch.Tensor:
        """SEDD's sigma(t) = d sigma_bar / dt = -alpha'(t) / alpha(t) (float64; +inf at t = 1)."""
        return -self.schedule.alpha_derivative(t) / self.schedule.alpha(t)

    # ------------------------------------------------------------------ scores
    def _check(self, outputs: torch.Tensor, x_t: torch.Tensor) -> None:
        if outputs.dim() != 3 or outputs.shape[-1] != self.vocab_size or outputs.shape[:2] != x_t.shape:
            raise ValueError(f"Expected outputs of shape (B, L, V={self.vocab_size}) matching x_t {tuple(x_t.shape)}, "
                             f"got {tuple(outputs.shape)}.")

    def _on_graph(self, x_t: torch.Tensor) -> torch.Tensor:
        """(B, L, V) bool: y with a forward jump y -> x_t^i (the entries whose score matters)."""
        raise NotImplementedError

    def _finish_scores(self, scores: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """-inf off the graph, 0 at y = x_t^i."""
        scores = torch.where(self._on_graph(x_t), scores, torch.full_like(scores, -math.inf))
        return scores.masked_fill(F.one_hot(x_t, self.vocab_size).bool(), 0.0)

    def log_scores(self, outputs: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        """log s_theta(x_t, t): (B, L, V) from head outputs (see the module docstring for the scaling).

        0 at y = x_t^i, -inf off the graph. At t = 0 and t = 1 the absorbing scores are +inf and 0, as the
        exact scores are; `loss_terms` and the sampler steps work from `outputs` and stay finite there.
        """
        self._check(outputs, x_t)
        dtype = outputs.dtype if outputs.dtype in (torch.float32, torch.float64) else torch.float32
        alpha = self.schedule.alpha(_as_rows(t, x_t.shape[0], x_t.device)).view(-1, 1, 1)
        return self._finish_scores(self._scale_outputs(outputs.to(dtype), alpha), x_t)

    def _scale_outputs(self, outputs: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def log_scores_from_x0_probs(self, x0_probs: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        """The scores a model with posterior p_hat(x_0^i | x_t) implies: s_y = sum_v p_v q(y|v) / q(x_t^i|v).

        Exact when `x0_probs` is the true posterior marginal. (B, L, V), same conventions as `log_scores`.
        """
        self._check(x0_probs, x_t)
        alpha = self.schedule.alpha(_as_rows(t, x_t.shape[0], x_t.device)).view(-1, 1, 1).to(x0_probs.dtype)
        return self._finish_scores(self._scores_of_x0(x0_probs, x_t, alpha), x_t)

    def _scores_of_x0(self, x0_probs, x_t, alpha) -> torch.Tensor:
        raise NotImplementedError

    def x0_probs_from_log_scores(self, log_scores: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        """p_hat(x_0^i | x_t) implied by the scores: Tweedie's formula from t to 0 (exact inverse of
        `log_scores_from_x0_probs`). Absorbing: normalised s (1 - alpha) / alpha at masked positions,
        onehot(x_t) elsewhere. Uniform: the affine inverse, which needs 0 < alpha_t < 1."""
        self._check(log_scores, x_t)
        alpha = self.schedule.alpha(_as_rows(t, x_t.shape[0], x_t.device))
        return self._x0_of_scores(log_scores, x_t, alpha)

    def _x0_of_scores(self, log_scores, x_t, alpha) -> torch.Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ the loss
    def _rate_in(self, r: torch.Tensor, dtype, device) -> torch.Tensor:
        """Q(y -> x_t^i) for every y, shaped like `r`."""
        raise NotImplementedError

    def score_entropy(self, log_scores: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        """Per-position DSE integrand (B, L) for any log-scores, straight from the definition.

        The reference form (also for scores from other parameterisations); for training use `loss_terms`
        on head outputs, which is the same quantity written to stay finite as t -> 0 and t -> 1.
        """
        self._check(log_scores, x_t)
        batch = x_t.shape[0]
        t = _as_rows(t, batch, x_t.device)
        dtype = log_scores.dtype
        alpha = self.schedule.alpha(t).view(-1, 1, 1).to(dtype)
        sigma = self.noise_rate(t).view(-1, 1, 1).to(dtype)
        pi = self.prior(dtype, x_t.device)
        # q(y | x_0^i) for every y, and r_y = q(y | x_0) / q(x_t | x_0).
        q_y = alpha * F.one_hot(x0, self.vocab_size).to(dtype) + (1 - alpha) * pi
        r = q_y / q_y.gather(-1, x_t.unsqueeze(-1))
        rate_in = self._rate_in(r, dtype, x_t.device)
        edges = self._on_graph(x_t)
        safe = torch.where(edges, log_scores, torch.zeros_like(log_scores))
        terms = safe.exp() - r * safe + torch.special.xlogy(r, r) - r
        return sigma.squeeze(-1) * torch.where(edges, rate_in * terms, torch.zeros_like(terms)).sum(-1)

    def denoising_score_entropy(self, outputs: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        """Per-position DSE integrand (B, L) of head outputs: the ELBO is int_0^1 E[sum_i DSE_i] dt."""
        self._check(outputs, x_t)
        t = _as_rows(t, x_t.shape[0], x_t.device)
        outputs = outputs.float() if outputs.dtype not in (torch.float32, torch.float64) else outputs
        return self._dse(outputs, x0, x_t, t)

    def _dse(self, outputs, x0, x_t, t) -> torch.Tensor:
        raise NotImplementedError

    def loss_terms(self, outputs: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, draw: NoiseDraw,
                   scored: torch.Tensor | None = None) -> torch.Tensor:
        """`DiscreteDiffusion.loss_terms` for score models: weight * DSE per position (B, L), whose sum over
        positions is an unbiased estimate of the ELBO for t ~ U[0, 1); 0 where `scored` is False."""
        terms = self.denoising_score_entropy(outputs, x0, x_t, draw.t)
        return self._only_scored(draw.weight.view(-1, 1).to(terms.dtype) * terms, scored)

    # ------------------------------------------------------------------ samplers
    def _tweedie(self, values, x_t, alpha_t, alpha_s, from_outputs: bool) -> torch.Tensor:
        """Per-position p(x_s^i = y | x_t) = [M^{-1} s]_y q(x_t^i | y), M the forward kernel from s to t."""
        raise NotImplementedError

    def _times(self, x_t, t, s):
        batch = x_t.shape[0]
        t, s = _as_rows(t, batch, x_t.device), _as_rows(s, batch, x_t.device)
        if bool((s >= t).any()):
            raise ValueError(f"A reverse step needs s < t, got t = {t.tolist()} and s = {s.tolist()}.")
        return t, s

    def tweedie_probs(self, outputs: torch.Tensor, x_t: torch.Tensor, t, s) -> torch.Tensor:
        """SEDD's `analytic` predictor: per-position probabilities (B, L, V) of x_s given x_t.

        Exact per position for exact scores (tau-leaping then updates the positions independently). Negative
        entries, possible for inconsistent scores, are clipped to 0 and the row renormalised. At s = 0 the
        absorbing graph's mask is dropped (SEDD's final noise removal).
        """
        self._check(outputs, x_t)
        t, s = self._times(x_t, t, s)
        probs = self._tweedie(outputs, x_t, self.schedule.alpha(t), self.schedule.alpha(s), from_outputs=True)
        probs = probs.clamp_min(0)
        return probs / probs.sum(-1, keepdim=True)

    def _euler_rates(self, outputs, x_t, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(rate (B, 1, 1), weights (B, L, V)): the reverse jump rate to y is rate * weights_y."""
        raise NotImplementedError

    def _euler_final(self, probs, weights, x_t, alpha_s) -> torch.Tensor:
        """The step's probabilities, adjusted at s = 0 where the graph needs it."""
        return probs

    def euler_probs(self, outputs: torch.Tensor, x_t: torch.Tensor, t, s) -> torch.Tensor:
        """SEDD's `euler` predictor: per position, jump x_t^i -> y with probability (t - s) times the
        reverse rate sigma(t) Q(y -> x_t^i) s_theta(x_t, t)_y. When the jump probabilities exceed 1 (steps
        too long for a first-order step, e.g. the first uniform step from t = 1 where sigma = inf) the
        stay probability is 0 and the jumps are renormalised. At s = 0 the absorbing mask is dropped.
        """
        self._check(outputs, x_t)
        t, s = self._times(x_t, t, s)
        dt = (t - s).view(-1, 1, 1)
        rate, weights = self._euler_rates(outputs.double(), x_t, t)
        total = weights.sum(-1, keepdim=True)
        leap = dt * rate * total
        jump = torch.where(leap > 1, weights / total.clamp_min(1e-300), dt * rate * weights)
        probs = jump + F.one_hot(x_t, self.vocab_size) * (1 - leap).clamp_min(0)
        probs = self._euler_final(probs, weights, x_t, self.schedule.alpha(s))
        return probs / probs.sum(-1, keepdim=True)


class AbsorbingScoreEntropy(ScoreEntropy, AbsorbingDiffusion):
    """SEDD-absorb: scores live at masked positions, log s_y = o_y - log(V - 1) + log(alpha / (1 - alpha))."""

    def _check_mask(self, vocab_size, mask_token_id):
        if not (isinstance(mask_token_id, int) and 0 <= mask_token_id < vocab_size):
            raise ValueError(f"The absorbing graph needs `mask_token_id` in [0, {vocab_size}), got {mask_token_id!r}.")
        return mask_token_id

    def _mask_index(self, device) -> torch.Tensor:
        return torch.tensor([self.mask_token_id], device=device)

    def _on_graph(self, x_t):
        edges = torch.ones(*x_t.shape, self.vocab_size, dtype=torch.bool, device=x_t.device)
        edges[..., self.mask_token_id] = False
        return edges & (x_t == self.mask_token_id).unsqueeze(-1)

    def _scale_outputs(self, outputs, alpha):
        offset = torch.log(alpha) - torch.log1p(-alpha) - math.log(self.vocab_size - 1)
        return outputs + offset.to(outputs.dtype)

    def _scores_of_x0(self, x0_probs, x_t, alpha):
        return torch.log(x0_probs) + torch.log(alpha) - torch.log1p(-alpha)

    def _x0_of_scores(self, log_scores, x_t, alpha):
        probs = self._tweedie(log_scores, x_t, alpha, torch.ones_like(alpha), from_outputs=False)
        return probs / probs.sum(-1, keepdim=True)

    def _rate_in(self, r, dtype, device):
        return torch.ones_like(r)

    def _dse(self, outputs, x0, x_t, t):
        # sigma r = -alpha'/(1 - alpha); DSE = that * (sum_y s^_y - log s^_{x_0} - 1) at masked positions.
        alpha = self.schedule.alpha(t)
        minus_derivative = -self.schedule.alpha_derivative(t)
        weight = torch.where(alpha < 1, minus_derivative / (1 - alpha).clamp_min(1e-300), torch.zeros_like(alpha))
        real = outputs.index_fill(-1, self._mask_index(outputs.device), -math.inf) - math.log(self.vocab_size - 1)
        term = real.logsumexp(-1).exp() - real.gather(-1, x0.unsqueeze(-1)).squeeze(-1) - 1
        masked = x_t == self.mask_token_id
        return torch.where(masked, weight.to(outputs.dtype).view(-1, 1) * term, torch.zeros_like(term))

    def _tweedie(self, values, x_t, alpha_t, alpha_s, from_outputs):
        values = values.double()
        a_t, a_s = alpha_t.view(-1, 1, 1), alpha_s.view(-1, 1, 1)
        mask = self._mask_index(x_t.device)
        # s^_y = s_y (1 - alpha_t) / alpha_t; masked x_t -> y with (alpha_s - alpha_t)/(1 - alpha_t) s^_y.
        if from_outputs:
            hat = (values - math.log(self.vocab_size - 1)).exp()
        else:
            hat = torch.exp(values + torch.log1p(-a_t) - torch.log(a_t))
        hat = hat.index_fill(-1, mask, 0.0)
        jump = (a_s - a_t) / (1 - a_t).clamp_min(1e-300) * hat
        probs = jump.clone()
        probs[..., self.mask_token_id] = 1 - jump.sum(-1)
        probs = torch.where(a_s >= 1, probs.index_fill(-1, mask, 0.0), probs)
        is_masked = (x_t == self.mask_token_id).unsqueeze(-1)
        return torch.where(is_masked, probs, F.one_hot(x_t, self.vocab_size).double())

    def _euler_rates(self, outputs, x_t, t):
        # sigma(t) s_y = -alpha'/(1 - alpha) s^_y: finite on (0, 1].
        alpha_t = self.schedule.alpha(t)
        rate = (-self.schedule.alpha_derivative(t) / (1 - alpha_t).clamp_min(1e-300)).view(-1, 1, 1)
        edges = self._on_graph(x_t)
        weights = torch.where(edges, (outputs - math.log(self.vocab_size - 1)).exp(), torch.zeros_like(outputs))
        return rate, weights

    def _euler_final(self, probs, weights, x_t, alpha_s):
        final = (alpha_s >= 1).view(-1, 1, 1) & (x_t == self.mask_token_id).unsqueeze(-1)
        return torch.where(final, weights, probs)  # noise removal: x_0 is never the mask


class UniformScoreEntropy(ScoreEntropy, UniformDiffusion):
    """SEDD-uniform: log s_y = alpha * o_y for y != x_t^i."""

    def _check_mask(self, vocab_size, mask_token_id):
        return None

    def _on_graph(self, x_t):
        return ~F.one_hot(x_t, self.vocab_size).bool()

    def _scale_outputs(self, outputs, alpha):
        return alpha.to(outputs.dtype) * outputs

    def _scores_of_x0(self, x0_probs, x_t, alpha):
        c = (1 - alpha) / self.vocab_size
        p_x = x0_probs.gather(-1, x_t.unsqueeze(-1))
        # W = sum_v p_v / q(x | v); s_y = alpha p_y / q(x | y) + c W, q(x | y) = c for y != x.
        w = p_x / (alpha + c) + (1 - p_x) / c
        return torch.log(alpha * x0_probs / c + c * w)

    def _x0_of_scores(self, log_scores, x_t, alpha):
        if bool(((alpha <= 0) | (alpha >= 1)).any()):
            raise ValueError("The uniform graph's scores determine p(x_0 | x_t) only for 0 < t < 1 "
                             f"(0 < alpha < 1), got alpha = {alpha.tolist()}.")
        return self._tweedie(log_scores, x_t, alpha, torch.ones_like(alpha), from_outputs=False)

    def _rate_in(self, r, dtype, device):
        return self.prior(dtype, device).expand_as(r)

    def _dse(self, outputs, x0, x_t, t):
        # sum_{y != x} (1/V) r_y phi(log s_y - log r_y), phi(z) = e^z - z - 1, written so that the
        # O(alpha^2) terms near t = 1 (where sigma ~ 1/alpha) do not cancel catastrophically.
        dtype = outputs.dtype
        alpha = self.schedule.alpha(t)
        minus_derivative = -self.schedule.alpha_derivative(t)
        weight = torch.where(alpha > 0, minus_derivative / alpha.clamp_min(1e-300), torch.zeros_like(alpha))
        a = alpha.view(-1, 1, 1)
        c = (1 - a) / self.vocab_size
        log_q_x0 = torch.log(a + c).to(dtype)  # log q(y | x_0) at y = x_0
        log_q_other = torch.log(c).to(dtype)  # ... and at y != x_0 (-inf at alpha = 1)
        is_x0 = F.one_hot(x0, self.vocab_size).bool()
        log_q = torch.where(is_x0, log_q_x0.expand_as(outputs), log_q_other.expand_as(outputs))
        log_r = log_q - log_q.gather(-1, x_t.unsqueeze(-1))
        log_s = a.to(dtype) * outputs
        r = log_r.exp()
        z = log_s - log_r
        small = z.abs() < 1
        z_small = torch.where(small, z, torch.zeros_like(z))
        near = r * (torch.expm1(z_small) - z_small)
        far = log_s.exp() - r * log_s + torch.special.xlogy(r, r) - r
        terms = torch.where(small, near, far).masked_fill(F.one_hot(x_t, self.vocab_size).bool(), 0.0)
        return (weight.to(dtype).view(-1, 1) / self.vocab_size) * terms.sum(-1)

    def _tweedie(self, values, x_t, alpha_t, alpha_s, from_outputs):
        # e_y = s_y - 1 = expm1(alpha_t o_y); with a = alpha_t / alpha_s,
        # [M^{-1} s]_y = 1 + alpha_s (g_y - (1 - a) G / V), g = e / alpha_t (-> o as alpha_t -> 0), G = sum g.
        values = values.double()
        a_t, a_s = alpha_t.view(-1, 1, 1), alpha_s.view(-1, 1, 1)
        self_mask = F.one_hot(x_t, self.vocab_size).bool()
        if from_outputs:
            scaled = torch.where(self_mask, torch.zeros_like(values), values)
            g = torch.where(a_t > 0, torch.expm1(a_t * scaled) / a_t.clamp_min(1e-300), scaled)
        else:
            g = torch.expm1(values) / a_t
        ratio = a_t / a_s
        tweedie = 1 + a_s * (g - (1 - ratio) * g.sum(-1, keepdim=True) / self.vocab_size)
        return tweedie * (ratio * self_mask + (1 - ratio) / self.vocab_size)

    def _euler_rates(self, outputs, x_t, t):
        rate = self.noise_rate(t).view(-1, 1, 1) / self.vocab_size
        a_t = self.schedule.alpha(t).view(-1, 1, 1)
        self_mask = F.one_hot(x_t, self.vocab_size).bool()
        return rate, torch.where(self_mask, torch.zeros_like(outputs), torch.exp(a_t * outputs))


SCORE_PROCESSES.update({"absorbing": AbsorbingScoreEntropy, "uniform": UniformScoreEntropy})

__all__ = ["GRAPHS", "AbsorbingScoreEntropy", "ScoreEntropy", "UniformScoreEntropy"]
