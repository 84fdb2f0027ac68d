"""Discrete diffusion maths for one family: corruption by mixing with a prior.

Both processes of the seed papers are instances of

    q(x_t | x_0) = Cat(alpha_t * onehot(x_0) + (1 - alpha_t) * pi)

with pi uniform over the vocabulary (`UniformDiffusion`: SFDLM, D3PM-uniform, UDLM) or a point mass on
the mask token (`AbsorbingDiffusion`: D3PM-absorb, MDLM). Both share `DiscreteDiffusion`, which holds what
does not depend on pi (corruption, noise draws, the loss template); each subclass holds its own closed
forms. Noise schedules alpha(t) are classes too, registered by name in `SCHEDULES`. This module knows
nothing of the backbone: it takes logits and token ids, so the same objective drives the SFDLM U-Net, a
Transformer denoiser or a test stub.

Conventions: `t` in [0, 1]; alpha(0) = 1 and alpha(1) = 0 for every schedule, so the chain starts
from pi exactly and the prior term of the NELBO is zero. All per-position quantities are in nats.

The reverse model p(x_s | x_t) is built from the network's p_hat(x_0 | x_t) (x_0 parameterisation) by
the normalised D3PM kernel (Austin et al., arXiv 2107.03006, Eq. 4)

    p(x_s | x_t)  proportional to  q(x_t | x_s) sum_{x_0} q(x_s | x_0) p_hat(x_0 | x_t).

Absorbing: it equals the posterior mixture sum_{x_0} q(x_s | x_t, x_0) p_hat(x_0 | x_t), because
q(x_t = mask | x_0) is the same for every clean x_0 (MDLM's SUBS, arXiv 2406.07524). Uniform: it does
not; it is UDLM's and Duo's reverse process (arXiv 2412.10193, 2506.10892), derived in
`UniformDiffusion`, whose continuous-time NELBO is finite for any full-support p_hat (the posterior
mixture's is +inf: its integrand grows like eps / t as t -> 0 when p_hat puts mass eps off the copied
token). `reverse_probs` evaluates either in O(V) per position.

Numerics: schedule quantities (alpha, 1 - alpha, alpha', their ratios) are float64 and
cancellation-free, cast to the logits' dtype only where they meet per-token tensors; every loss term is
a sum of non-negative entries computed from accurate log-ratios, so float32 and bf16-autocast runs agree
with float64.

This file is "remote code": it imports only torch and is copied next to the weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


# ============================================================================================== schedules
SCHEDULES: dict[str, type[NoiseSchedule]] = {}


def _time(t) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.float64)


class NoiseSchedule:
    """Signal level alpha(t) on t in [0, 1], with alpha(0) = 1 and alpha(1) = 0 exactly.

    `NoiseSchedule(name, ...)` builds the registered subclass of that name (`SCHEDULES`):
    ``"linear"`` (linear beta(t) = beta_min + t (beta_max - beta_min), alpha = exp(-int beta), as in the
    SFDLM paper), ``"cosine"`` (alpha = cos(pi t / 2)), ``"loglinear"`` (alpha = 1 - t, MDLM/SEDD) and
    ``"geometric"`` (total noise sigma_min^(1-t) sigma_max^t, SEDD). Schedules whose raw form does not
    end at 0 (linear, geometric) are affinely rescaled to [0, 1] so that the last step reaches the prior
    exactly; for the discrete chain this means beta_T = 1, as in D3PM-absorb.

    Every quantity is float64 and computed without cancellation (`one_minus_alpha` directly, not as
    1 - alpha), because in float32 alpha(t) rounds to 1 for small t.
    """

    name: str | None = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.name is not None:
            SCHEDULES[cls.name] = cls

    def __new__(cls, name: str | None = None, *args, **kwargs):
        if cls is NoiseSchedule:
            if name not in SCHEDULES:
                raise ValueError(f"Unknown noise schedule {name!r}; expected one of {sorted(SCHEDULES)}.")
            cls = SCHEDULES[name]
        return super().__new__(cls)

    def __init__(self, name: str | None = None, beta_min: float = 0.1, beta_max: float = 20.0,
                 sigma_min: float = 1e-4, sigma_max: float = 20.0):
        if name is not None and name != self.name:
            raise ValueError(f"{type(self).__name__} is the {self.name!r} schedule, got name={name!r}.")
        self.beta_min, self.beta_max = beta_min, beta_max
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    @classmethod
    def from_config(cls, config) -> NoiseSchedule:
        return NoiseSchedule(config.noise_schedule, config.linear_beta_min, config.linear_beta_max,
                             config.geometric_sigma_min, config.geometric_sigma_max)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def alpha(self, t) -> torch.Tensor:
        """alpha(t), float64 (from 1 - alpha where that is the more accurate, so alpha(0) = 1 exactly)."""
        t = _time(t)
        one_minus = self._one_minus_alpha(t)
        return torch.where(one_minus < 0.5, 1 - one_minus, self._alpha(t)) + 0.0  # + 0.0: no alpha(1) = -0.0

    def one_minus_alpha(self, t) -> torch.Tensor:
        """1 - alpha(t), float64, accurate also where alpha(t) is within rounding of 1."""
        return self._one_minus_alpha(_time(t))

    def alpha_derivative(self, t) -> torch.Tensor:
        """d alpha / d t (negative), float64."""
        return self._derivative(_time(t))

    def _alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _one_minus_alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _derivative(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class CosineSchedule(NoiseSchedule):
    """alpha = cos(pi t / 2) = sin(pi (1 - t) / 2); 1 - alpha = 2 sin^2(pi t / 4)."""

    name = "cosine"

    def _alpha(self, t):
        return torch.sin(0.5 * math.pi * (1 - t))

    def _one_minus_alpha(self, t):
        return 2 * torch.sin(0.25 * math.pi * t) ** 2

    def _derivative(self, t):
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)


class LogLinearSchedule(NoiseSchedule):
    """alpha = 1 - t (MDLM; SEDD's log-linear schedule with eps = 0)."""

    name = "loglinear"

    def _alpha(self, t):
        return 1 - t

    def _one_minus_alpha(self, t):
        return t.clone()

    def _derivative(self, t):
        return -torch.ones_like(t)


class LinearSchedule(NoiseSchedule):
    """SFDLM's linear beta(t) = beta_min + t (beta_max - beta_min), alpha_raw = exp(-I(t)) with
    I(t) = int_0^t beta, rescaled: alpha = (alpha_raw - e) / (1 - e), e = exp(-I(1))."""

    name = "linear"

    def _integral(self, t):
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t

    def _scale(self):
        return -torch.expm1(-self._integral(torch.ones((), dtype=torch.float64)))  # 1 - e

    def _alpha(self, t):
        # alpha_raw - e = e * expm1(I(1) - I(t)), I(1) - I(t) = (1 - t) (beta_min + (beta_max - beta_min)(1 + t) / 2)
        end = torch.exp(-self._integral(torch.ones((), dtype=torch.float64)))
        rest = (1 - t) * (self.beta_min + 0.5 * (self.beta_max - self.beta_min) * (1 + t))
        return end * torch.expm1(rest) / self._scale()

    def _one_minus_alpha(self, t):
        return -torch.expm1(-self._integral(t)) / self._scale()

    def _derivative(self, t):
        beta = self.beta_min + t * (self.beta_max - self.beta_min)
        return -beta * torch.exp(-self._integral(t)) / self._scale()


class GeometricSchedule(NoiseSchedule):
    """SEDD's geometric total noise sigma(t) = sigma_min^(1-t) sigma_max^t, alpha_raw = exp(-sigma(t)),
    rescaled: alpha = (alpha_raw - exp(-sigma_max)) / (exp(-sigma_min) - exp(-sigma_max))."""

    name = "geometric"

    def _log_ratio(self):
        return math.log(self.sigma_max / self.sigma_min)

    def _sigma(self, t):
        return self.sigma_min * torch.exp(t * self._log_ratio())

    def _scale(self):
        return math.exp(-self.sigma_min) * -math.expm1(self.sigma_min - self.sigma_max)

    def _alpha(self, t):
        rest = -self.sigma_max * torch.expm1((t - 1) * self._log_ratio())  # sigma_max - sigma(t)
        return math.exp(-self.sigma_max) * torch.expm1(rest) / self._scale()

    def _one_minus_alpha(self, t):
        gap = self.sigma_min * torch.expm1(t * self._log_ratio())  # sigma(t) - sigma_min
        return math.exp(-self.sigma_min) * -torch.expm1(-gap) / self._scale()

    def _derivative(self, t):
        sigma = self._sigma(t)
        return -sigma * self._log_ratio() * torch.exp(-sigma) / self._scale()


# ============================================================================================== processes
@dataclass
class NoiseDraw:
    """Noise levels drawn for a batch of rows.

    Attributes:
        t: (B,) time of the corrupted input x_t, in [0, 1].
        s: (B,) time of the step target x_s (discrete time: t - 1/T); None in continuous time.
        weight: (B,) importance weight that makes the per-row term an unbiased NELBO estimate.
        reconstruction: (B,) bool, rows whose term is -log p(x_0 | x_t) (discrete step 1; none in
            continuous time).
    """

    t: torch.Tensor
    s: torch.Tensor | None
    weight: torch.Tensor
    reconstruction: torch.Tensor


PROCESSES: dict[str, type[DiscreteDiffusion]] = {}
OBJECTIVES = ("elbo", "ce")


def _as_probs_dtype(logits: torch.Tensor) -> torch.Tensor:
    return logits.float() if logits.dtype not in (torch.float32, torch.float64) else logits


class DiscreteDiffusion:
    """Corruption, posterior, reverse step and NELBO of a mixing-with-a-prior process.

    `DiscreteDiffusion(vocab_size, process, ...)` builds the registered subclass for `process`
    (`AbsorbingDiffusion` or `UniformDiffusion`); `from_config` builds the model's process, a
    `score_entropy.ScoreEntropy` when `config.objective == "score_entropy"`.

    Args:
        vocab_size: V, the number of token ids.
        process: ``"uniform"`` or ``"absorbing"`` (optional when a subclass is built directly).
        schedule: the `NoiseSchedule`.
        num_timesteps: T for the discrete-time NELBO, or None for continuous time.
        mask_token_id: the absorbing state (required for ``"absorbing"``).
        objective: ``"elbo"`` (exact NELBO) or ``"ce"`` (the SFDLM paper's plain cross-entropy).
    """

    process: str | None = None
    parameterization = "x0"

    def __new__(cls, vocab_size: int = 0, process: str | None = None, *args, **kwargs):
        if cls is DiscreteDiffusion:
            if process not in PROCESSES:
                raise ValueError(f"`process` must be one of {sorted(PROCESSES)}, got {process!r}.")
            cls = PROCESSES[process]
        return super().__new__(cls)

    def __init__(self, vocab_size: int, process: str | None = None, schedule: NoiseSchedule | None = None,
                 num_timesteps: int | None = None, mask_token_id: int | None = None, objective: str = "elbo"):
        if process is not None and process != self.process:
            raise ValueError(f"{type(self).__name__} is the {self.process!r} process, got process={process!r}.")
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"`schedule` must be a NoiseSchedule, got {type(schedule).__name__}.")
        if objective not in self.objectives():
            raise ValueError(f"`objective` must be one of {self.objectives()}, got {objective!r}.")
        self.vocab_size = vocab_size
        self.schedule = schedule
        self.num_timesteps = num_timesteps
        self.mask_token_id = mask_token_id
        self.objective = objective

    @classmethod
    def objectives(cls) -> tuple[str, ...]:
        return OBJECTIVES

    @classmethod
    def from_config(cls, config) -> DiscreteDiffusion:
        """The process of a model config (`SFDLMConfig` or any config with the same diffusion fields)."""
        schedule = NoiseSchedule.from_config(config)
        if config.objective == "score_entropy":
            from .score_entropy import ScoreEntropy

            return ScoreEntropy(config.vocab_size, config.process, schedule, config.mask_token_id)
        return DiscreteDiffusion(config.vocab_size, config.process, schedule, config.num_timesteps,
                                 config.mask_token_id, config.objective)

    # ------------------------------------------------------------------ the forward process
    def prior(self, dtype=torch.float32, device=None) -> torch.Tensor:
        """pi: (V,) probabilities of the fully corrupted state."""
        raise NotImplementedError

    def _noise(self, x0: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """(B, L) draws from pi."""
        raise NotImplementedError

    def corrupt(self, x0: torch.Tensor, alpha_t: torch.Tensor, corruptible: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0) per position; positions where `corruptible` is False stay x_0.

        Args:
            x0: (B, L) clean ids. alpha_t: (B,) signal levels.
        """
        alpha_t = alpha_t.to(device=x0.device, dtype=torch.float64).view(-1, 1)
        keep = torch.rand(x0.shape, generator=generator, device=x0.device, dtype=torch.float64) < alpha_t
        noise = self._noise(x0, generator)
        keep = keep if corruptible is None else keep | ~corruptible.bool()
        return torch.where(keep, x0, noise)

    @property
    def is_likelihood_bound(self) -> bool:
        """Whether `loss_terms` estimate a NELBO (objective "elbo"), not the plain cross-entropy."""
        return self.objective != "ce"

    def check_clean_ids(self, x0: torch.Tensor, scored: torch.Tensor) -> None:
        """Raise a ValueError when a scored clean token is one the process cannot have as x_0."""

    # ------------------------------------------------------------------ the reverse process
    def restrict_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The denoiser's logits with impossible clean tokens set to -inf (in place); returns them."""
        return logits

    def x0_log_probs(self, logits: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """log p_hat(x_0 | x_t) in float32 (or float64 if given), before any carry-over."""
        return _as_probs_dtype(logits).log_softmax(-1)

    def x0_probs(self, logits: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """p_hat(x_0 | x_t): softmax of the logits in float32 (or float64 if given)."""
        return _as_probs_dtype(logits).softmax(-1)

    def reverse_probs(self, x0_probs: torch.Tensor, x_t: torch.Tensor, alpha_s: torch.Tensor,
                      alpha_t: torch.Tensor) -> torch.Tensor:
        """The model's reverse kernel p(x_s | x_t), the normalised D3PM kernel, for every position:

            p(x_s | x_t)  proportional to  q(x_t | x_s) sum_{x_0} q(x_s | x_0) x0_probs(x_0)

        (absorbing: equal to the posterior mixture sum_{x_0} q(x_s | x_t, x_0) x0_probs(x_0); uniform: not,
        see `UniformDiffusion`). With `x0_probs = onehot(x_0)` it is the exact posterior q(x_s | x_t, x_0).

        Args:
            x0_probs: (B, L, V). x_t: (B, L). alpha_s, alpha_t: (B,) with alpha_s >= alpha_t.
        Returns:
            (B, L, V) probabilities over x_s.
        """
        raise NotImplementedError

    def posterior_probs(self, x0: torch.Tensor, x_t: torch.Tensor, alpha_s: torch.Tensor,
                        alpha_t: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
        """q(x_s | x_t, x_0): (B, L, V)."""
        return self.reverse_probs(F.one_hot(x0, self.vocab_size).to(dtype), x_t, alpha_s, alpha_t)

    def kl_to_reverse(self, x0_probs, x0, x_t, alpha_s, alpha_t) -> torch.Tensor:
        """KL(q(x_s | x_t, x_0) || p(x_s | x_t)) per position (B, L), by summing over the vocabulary."""
        q = self.posterior_probs(x0, x_t, alpha_s, alpha_t, dtype=x0_probs.dtype)
        p = self.reverse_probs(x0_probs, x_t, alpha_s, alpha_t)
        tiny = torch.finfo(p.dtype).tiny
        return (torch.special.xlogy(q, q) - torch.special.xlogy(q, p.clamp_min(tiny))).sum(-1)

    # ------------------------------------------------------------------ noise levels
    def draw_noise(self, batch_size: int, generator: torch.Generator | None = None, device=None,
                   u: torch.Tensor | None = None) -> NoiseDraw:
        """Stratified noise levels: row k gets u_k = (k + U_k) / B (then shuffled), a low-variance
        cover of [0, 1) that keeps every row's draw uniform. Pass `u` to choose the quantiles yourself.
        Continuous time has no reconstruction term: for both processes -log p(x_0 | x_t) -> 0 as t -> 0.
        """
        if u is None:  # drawn where the generator lives, so a CUDA generator works too
            where = generator.device if generator is not None else "cpu"
            offsets = torch.rand(batch_size, generator=generator, dtype=torch.float64, device=where)
            order = torch.randperm(batch_size, generator=generator, device=where)
            u = (order.to(torch.float64) + offsets) / batch_size
        u = u.to(torch.float64).cpu()
        if self.num_timesteps is not None:
            T = self.num_timesteps
            step = (u * T).floor().clamp(0, T - 1) + 1  # in {1, ..., T}
            t, s = step / T, (step - 1) / T
            weight = torch.full_like(t, float(T))
            reconstruction = step == 1
            return NoiseDraw(t.to(device), s.to(device), weight.to(device), reconstruction.to(device))
        return NoiseDraw(u.to(device), None, torch.ones_like(u).to(device),
                         torch.zeros_like(u, dtype=torch.bool).to(device))

    # ------------------------------------------------------------------ losses
    def loss_terms(self, logits: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, draw: NoiseDraw,
                   scored: torch.Tensor | None = None) -> torch.Tensor:
        """Per-position loss (B, L) whose sum over positions is an unbiased NELBO estimate (or the CE).

        Discrete time: T * KL(q(x_s | x_t, x_0) || p(x_s | x_t)) at step t = i/T, and
        T * (-log p_hat(x_0 | x_t)) at step 1. Continuous time: the integrand of the T -> infinity limit.
        Positions where `scored` is False contribute exactly 0 (whatever token they hold).
        """
        log_probs = self.x0_log_probs(logits, x_t)
        nll = self._nll(log_probs, x0, x_t)
        if self.objective == "ce":
            return self._only_scored(nll, scored)
        if self.num_timesteps is None:
            term = self._continuous_integrand(log_probs, nll, x0, x_t, draw.t)
        else:
            # Step 1 (s = 0) is the reconstruction term; its KL branch is evaluated at a harmless s so that
            # the unused branch of `where` cannot put NaN into the gradients.
            recon = draw.reconstruction
            safe_s = torch.where(recon, 0.5 * draw.t, draw.s)
            kl = self._discrete_kl(log_probs, x0, x_t, safe_s, draw.t)
            term = torch.where(recon.view(-1, 1), self._reconstruction(log_probs, nll, x0, x_t, draw.t).to(kl.dtype), kl)
        terms = draw.weight.view(-1, 1).to(term.dtype) * term
        return self._only_scored(terms, scored)

    @staticmethod
    def _only_scored(terms: torch.Tensor, scored: torch.Tensor | None) -> torch.Tensor:
        return terms if scored is None else torch.where(scored, terms, torch.zeros_like(terms))

    def _nll(self, log_probs, x0, x_t) -> torch.Tensor:
        """-log p_hat(x_0 | x_t) per position (B, L)."""
        return -log_probs.gather(-1, x0.unsqueeze(-1)).squeeze(-1)

    def _reconstruction(self, log_probs, nll, x0, x_t, t) -> torch.Tensor:
        """-log p(x_0 | x_t) of the reverse kernel's last step (s = 0), per position (B, L)."""
        return nll

    def _discrete_kl(self, log_probs, x0, x_t, s, t) -> torch.Tensor:
        raise NotImplementedError

    def _continuous_integrand(self, log_probs, nll, x0, x_t, t) -> torch.Tensor:
        raise NotImplementedError


class AbsorbingDiffusion(DiscreteDiffusion):
    """pi = onehot([MASK]) (D3PM-absorb, MDLM). The mask is never a clean token, and unmasked positions
    carry over (p_hat = onehot(x_t), MDLM's SUBS parameterisation)."""

    process = "absorbing"

    def __init__(self, vocab_size: int, process: str | None = None, schedule: NoiseSchedule | None = None,
                 num_timesteps: int | None = None, mask_token_id: int | None = None, objective: str = "elbo"):
        if mask_token_id is None:
            raise ValueError("The absorbing process needs `mask_token_id`, got None.")
        super().__init__(vocab_size, process, schedule, num_timesteps, mask_token_id, objective)

    def prior(self, dtype=torch.float32, device=None) -> torch.Tensor:
        prior = torch.zeros(self.vocab_size, dtype=dtype, device=device)
        prior[self.mask_token_id] = 1.0
        return prior

    def _noise(self, x0, generator):
        return torch.full_like(x0, self.mask_token_id)

    def check_clean_ids(self, x0, scored):
        message = (f"The clean tokens to score contain the mask token id {self.mask_token_id}; an absorbing "
                   "model's data must not (set those labels to -100 to leave them unscored).")
        scored_mask = ((x0 == self.mask_token_id) & scored).any()
        if torch.compiler.is_compiling():  # no host sync inside a compiled graph: assert on the device
            torch._assert_async(~scored_mask, message)
        elif bool(scored_mask):
            raise ValueError(message)

    def restrict_logits(self, logits):
        logits[..., self.mask_token_id] = -math.inf
        return logits

    def x0_log_probs(self, logits, x_t):
        logits = _as_probs_dtype(logits).clone()
        logits[..., self.mask_token_id] = -math.inf
        return logits.log_softmax(-1)  # carry-over is applied by the callers (unmasked terms are 0)

    def x0_probs(self, logits, x_t):
        probs = self.x0_log_probs(logits, x_t).exp()
        carry = x_t != self.mask_token_id
        return torch.where(carry.unsqueeze(-1), F.one_hot(x_t, self.vocab_size).to(probs.dtype), probs)

    def reverse_probs(self, x0_probs, x_t, alpha_s, alpha_t):
        # Masked: unmask to y with (alpha_s - alpha_t) / (1 - alpha_t) p_hat(y), stay masked otherwise.
        dtype = x0_probs.dtype
        b = alpha_s.to(dtype).view(-1, 1, 1)
        c = alpha_t.to(dtype).view(-1, 1, 1)
        one_minus_c = (1 - c).clamp_min(torch.finfo(dtype).tiny)
        masked = (b - c) / one_minus_c * x0_probs
        masked[..., self.mask_token_id] = ((1 - b) / one_minus_c).squeeze(-1)
        is_masked = (x_t == self.mask_token_id).unsqueeze(-1)
        return torch.where(is_masked, masked, F.one_hot(x_t, self.vocab_size).to(dtype))

    def _nll(self, log_probs, x0, x_t):
        nll = super()._nll(log_probs, x0, x_t)  # carry-over: unmasked positions are predicted exactly
        return torch.where(x_t == self.mask_token_id, nll, torch.zeros_like(nll))

    def _discrete_kl(self, log_probs, x0, x_t, s, t):
        # MDLM closed form: (alpha_s - alpha_t) / (1 - alpha_t) * (-log p_hat(x_0)) at masked positions, from
        # 1 - alpha directly: alpha_s - alpha_t = (1 - alpha_t) - (1 - alpha_s) cancels nowhere near t = 0.
        one_minus_s, one_minus_t = self.schedule.one_minus_alpha(s), self.schedule.one_minus_alpha(t)
        coef = ((one_minus_t - one_minus_s) / one_minus_t.clamp_min(1e-300)).to(log_probs.dtype).view(-1, 1)
        return coef * self._nll(log_probs, x0, x_t)

    def _continuous_integrand(self, log_probs, nll, x0, x_t, t):
        # MDLM Eq. 10-11: -alpha'(t) / (1 - alpha(t)) * (-log p_hat(x_0)) at masked positions, with 1 - alpha
        # from the schedule (in float64, 1 - alpha(t) rounds to 0 below t ~ 1e-8 for the cosine schedule).
        # At t = 0 no position is masked (nll is 0 there): the floor only keeps the weight finite.
        rate = -self.schedule.alpha_derivative(t)
        weight = (rate / self.schedule.one_minus_alpha(t).clamp_min(1e-30)).to(log_probs.dtype).view(-1, 1)
        return weight * nll


def _kl_terms(p: torch.Tensor, q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Entries q log(q / p) - q + p >= 0 of a KL (or of a KL rate) with w = log(q / p) given accurately:
    p phi(w), phi(w) = 1 + (w - 1) e^w, by its Taylor series for |w| < 1/2 (sum_{n >= 2} (n - 1) w^n / n!)
    and q (w - 1) + p for w > 1, so nothing cancels or overflows, and no branch puts NaN into gradients."""
    small = w.abs() < 0.5
    ws = torch.where(small, w, torch.zeros_like(w))
    series = ws * ws * (1 / 2 + ws * (1 / 3 + ws * (1 / 8 + ws * (1 / 30 + ws * (1 / 144 + ws * (
        1 / 840 + ws * (1 / 5760 + ws * (1 / 45360 + ws / 403200))))))))
    wm = torch.where(small, torch.zeros_like(w), w).clamp(-100, 1)
    moderate = 1 + (wm - 1) * wm.exp()
    large = q * (torch.where(w > 1, w, torch.ones_like(w)) - 1) + p
    return torch.where(w > 1, large, p * torch.where(small, series, moderate))


class UniformDiffusion(DiscreteDiffusion):
    """pi = 1/V (SFDLM Eq. 5, D3PM-uniform, UDLM, Duo): every token may change at every step.

    Reverse model: the normalised D3PM kernel (Austin et al. 2021, arXiv 2107.03006, Eq. 4; UDLM, Schiff
    et al., arXiv 2412.10193; Duo, Sahoo et al., arXiv 2506.10892)

        p(x_s = y | x_t = z) = q(z | y) m_s(y) / m_t(z),   m_r(y) = alpha_r p_hat(y) + (1 - alpha_r) / V,

    i.e. proportional to q(x_t | x_s) sum_{x_0} q(x_s | x_0) p_hat(x_0 | x_t); the normaliser is m_t(z)
    because sum_y q(z | y) m_s(y) = m_t(z). With p_hat = onehot(x_0) it is the posterior q(x_s | x_t, x_0)
    (Bayes' rule), so all the terms below follow from g_r(y) = log(q_r(y | x_0) / m_r(y)):

      discrete step s < t:  KL(q(. | z, x_0) || p(. | z)) = sum_y p_y phi(w_y),  w_y = g_s(y) - g_t(z),
                            phi(w) = 1 + (w - 1) e^w (the KL written as a sum of non-negative terms);
      reconstruction (s = 0):  -log p(x_0 | z) = -log p_hat(x_0) - g_t(z);
      continuous time:  the chain jumps z -> y at rate h u m_t(y) / m_t(z) (model) and h u q_t(y | x_0) /
                        q_t(z | x_0) (truth), h = -alpha'/alpha, u = 1/V; the KL rate is
                        h u sum_{y != z} (m_t(y) / m_t(z)) phi(g_t(y) - g_t(z)),
    which is UDLM's continuous-time NELBO (Duo's `nll_per_token`). As t -> 0 it grows like log(1/t)
    (integrable), and p(x_0 | x_0) -> 1, so there is no t = 0 term. g is formed from
    q - m = alpha (onehot(x_0) - p_hat) with 1 - p_hat(x_0) summed from the other entries and 1 - alpha
    from the schedule, so float32 and bf16 runs keep float64's accuracy.
    """

    process = "uniform"

    def prior(self, dtype=torch.float32, device=None) -> torch.Tensor:
        return torch.full((self.vocab_size,), 1.0 / self.vocab_size, dtype=dtype, device=device)

    def _noise(self, x0, generator):
        return torch.randint(0, self.vocab_size, x0.shape, generator=generator, device=x0.device)

    def reverse_probs(self, x0_probs, x_t, alpha_s, alpha_t):
        dtype = x0_probs.dtype
        u = 1.0 / self.vocab_size
        b = alpha_s.to(torch.float64).view(-1, 1, 1)
        c = alpha_t.to(torch.float64).view(-1, 1, 1)
        jump = ((b - c) / b.clamp_min(1e-300) * u).to(dtype)  # (1 - alpha_t / alpha_s) u = q(z | y != z)
        stay = (c / b.clamp_min(1e-300)).to(dtype) + jump  # q(z | z)
        m_s = b.to(dtype) * x0_probs + ((1 - b) * u).to(dtype)
        m_t = c.to(dtype) * x0_probs.gather(-1, x_t.unsqueeze(-1)) + ((1 - c) * u).to(dtype)
        probs = jump * m_s / m_t
        return probs.scatter(-1, x_t.unsqueeze(-1), stay * m_s.gather(-1, x_t.unsqueeze(-1)) / m_t)

    def _log_ratio(self, probs, x0, t) -> torch.Tensor:
        """g(y) = log(q_t(y | x_0) / m_t(y)) for every y (B, L, V), without cancellation."""
        dtype = probs.dtype
        alpha = self.schedule.alpha(t).view(-1, 1, 1)
        c = (self.schedule.one_minus_alpha(t).view(-1, 1, 1) / self.vocab_size).to(dtype)
        is_x0 = F.one_hot(x0, self.vocab_size).bool()
        off_x0 = probs.masked_fill(is_x0, 0.0)
        gap = torch.where(is_x0, off_x0.sum(-1, keepdim=True), -probs)  # onehot(x_0) - p_hat
        m = alpha.to(dtype) * probs + c
        q = torch.where(is_x0, alpha.to(dtype) + c, c)
        d = alpha.to(dtype) * gap / m  # q / m - 1
        near = d > -0.5
        return torch.where(near, torch.log1p(torch.where(near, d, torch.zeros_like(d))),
                           torch.log(torch.where(near, torch.ones_like(q), q / m)))

    def _reconstruction(self, log_probs, nll, x0, x_t, t) -> torch.Tensor:
        g_z = self._log_ratio(log_probs.exp(), x0, t).gather(-1, x_t.unsqueeze(-1)).squeeze(-1)
        return nll - g_z

    def _discrete_kl(self, log_probs, x0, x_t, s, t):
        probs = log_probs.exp()
        g_s = self._log_ratio(probs, x0, s)
        g_t_z = self._log_ratio(probs, x0, t).gather(-1, x_t.unsqueeze(-1))
        alpha_s, alpha_t = self.schedule.alpha(s), self.schedule.alpha(t)
        p = self.reverse_probs(probs, x_t, alpha_s, alpha_t)
        q = self.posterior_probs(x0, x_t, alpha_s, alpha_t, dtype=probs.dtype)
        return _kl_terms(p, q, g_s - g_t_z).sum(-1)

    def _continuous_integrand(self, log_probs, nll, x0, x_t, t):
        # The KL rate (h u / m_t(z)) sum_{y != z} m_t(y) phi(g_t(y) - g_t(z)) regrouped: every y outside
        # {x_0, z} contributes beta psi(m_t(y) / beta), psi(r) = r - 1 - log r, with one beta per position
        # (beta = m_t(z) if z != x_0, c m_t(z) / q_t(z) if z = x_0; the y = z entry is psi(1) = 0), and
        # y = x_0 != z one `_kl_terms` entry. The V-sized part is `_jump_rate_sum`, one pass with a hand-
        # written backward: the entry-wise form cost ~10x the rest of a training step at V = 10k.
        probs = log_probs.exp()
        dtype = probs.dtype
        alpha64 = self.schedule.alpha(t)
        hazard = torch.where(alpha64 > 0, -self.schedule.alpha_derivative(t) / alpha64.clamp_min(1e-300),
                             torch.zeros_like(alpha64))
        alpha = alpha64.to(dtype).view(-1, 1)
        # q_t(y | x_0), y != x_0, floored: below the floor (t = 0 included, where the formula below is 0 / 0)
        # clean positions take the t -> 0 limit instead (`at_zero`), corrupted ones the floor's finite value.
        exact_c64 = self.schedule.one_minus_alpha(t) / self.vocab_size
        c64 = exact_c64.clamp_min(_JUMP_FLOOR)
        c = c64.to(dtype).view(-1, 1)
        p_z = probs.gather(-1, x_t.unsqueeze(-1)).squeeze(-1)
        p_x0 = probs.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
        # 1 - p_hat(x_0) summed from the other entries: -expm1(-nll) inherits log_softmax's absolute error
        one_minus_p_x0 = probs.scatter(-1, x0.unsqueeze(-1), 0.0).sum(-1)
        m_z = c + alpha * p_z
        clean = x_t == x0
        gamma = torch.where(clean, c / (alpha + c), torch.ones_like(m_z))  # c / q_t(z | x_0)
        beta = gamma * m_z
        # m_t(y) - beta = alpha (p_hat(y) + shift): no cancellation when z = x_0 (shift > 0)
        shift = torch.where(clean, gamma * one_minus_p_x0, -p_z)
        others = _jump_rate_sum(probs, x0, shift, beta, alpha, c)
        # y = x_0 != z: rates m_t(x_0) / m_t(z) (model) and q_t(x_0) / q_t(z) = (alpha + c) / c (truth)
        m_x0 = c + alpha * p_x0
        g_x0 = torch.log1p(alpha * one_minus_p_x0 / m_x0)
        g_z = -torch.log1p(alpha * p_z / c.clamp_min(torch.finfo(dtype).tiny))
        true_rate = ((alpha64 + c64) / c64.clamp_min(1e-300)).to(dtype).view(-1, 1)
        x0_term = _kl_terms(m_x0 / m_z, true_rate.expand_as(m_z), g_x0 - g_z)
        total = gamma * others + torch.where(clean, torch.zeros_like(x0_term), x0_term)
        # t -> 0 at z = x_0: gamma * others -> sum_{y != x_0} p_hat(y) / p_hat(x_0) = (1 - p_hat(x_0)) e^nll
        at_zero = (exact_c64 < _JUMP_FLOOR).view(-1, 1) & clean
        limit = one_minus_p_x0 * torch.where(at_zero, nll, torch.zeros_like(nll)).exp()
        total = torch.where(at_zero, limit, total)
        return (hazard / self.vocab_size).to(dtype).view(-1, 1) * total


# Below this c = (1 - alpha(t)) / V, the uniform integrand at clean positions is its t -> 0 limit (relative
# error ~ c / p_hat(x_0)); at and above it the regrouped formula stays finite in float32 (it divides by ~c^2).
_JUMP_FLOOR = 1e-15
_PSI_SERIES_BELOW = 0.01  # |x| below which psi uses its Taylor series (relative error < 4e-9 there)


class _JumpRateSum(torch.autograd.Function):
    """sum_{y != x_0} psi(x_y), x_y = (alpha / beta) (p(y) + shift), psi = x - log(1 + x), per position.

    1 + x = (c + alpha p(y)) / beta is formed directly (accurate as x -> -1), psi by its series
    x^2 (1/2 - x/3 + x^2/4 - x^3/5) for small |x| (where x - log(1 + x) cancels), and the backward from
    psi'(x) = x / (1 + x), which cancels nowhere."""

    @staticmethod
    def forward(ctx, probs, x0, shift, beta, alpha, c):
        beta = beta.unsqueeze(-1)
        scale = alpha.unsqueeze(-1) / beta
        x = (probs + shift.unsqueeze(-1)).mul_(scale)
        one_plus_x = torch.addcmul(c.unsqueeze(-1) / beta, probs, scale)
        ratio = x / one_plus_x
        # log(1 + x): log1p of the accurate x, except near x = -1, where 1 + x itself is the accurate one
        log_one_plus_x = torch.where(x < -0.5, one_plus_x.log_(), torch.log1p(x))
        psi = log_one_plus_x.neg_().add_(x)
        series = (x * -0.2).add_(0.25).mul_(x).sub_(1 / 3).mul_(x).add_(0.5).mul_(x).mul_(x)
        psi = torch.where(x.abs() < _PSI_SERIES_BELOW, series, psi)
        at_x0 = x0.unsqueeze(-1)
        for entries in (psi, ratio, x):
            entries.scatter_(-1, at_x0, 0.0)
        sum_ratio = ratio.sum(-1)
        sum_ratio_x = x.sum(-1) - sum_ratio  # x^2 / (1 + x) = x - x / (1 + x)
        ctx.save_for_backward(ratio, scale, beta, sum_ratio, sum_ratio_x)
        return psi.sum(-1)

    @staticmethod
    def backward(ctx, grad):
        ratio, scale, beta, sum_ratio, sum_ratio_x = ctx.saved_tensors
        grad_scaled = grad.unsqueeze(-1) * scale  # (B, L, 1)
        grad_probs = ratio * grad_scaled
        grad_shift = grad_scaled.squeeze(-1) * sum_ratio
        grad_beta = -grad * sum_ratio_x / beta.squeeze(-1)
        return grad_probs, None, grad_shift, grad_beta, None, None


def _jump_rate_sum(probs, x0, shift, beta, alpha, c):
    return _JumpRateSum.apply(probs, x0, shift, beta, alpha, c)


PROCESSES.update({AbsorbingDiffusion.process: AbsorbingDiffusion, UniformDiffusion.process: UniformDiffusion})


# ============================================================================================== estimators
def training_loss(process, denoise, x0: torch.Tensor, scored: torch.Tensor,
                  generator: torch.Generator | None = None, u: torch.Tensor | None = None):
    """One training draw: corrupt the scored positions at stratified noise levels (or at the quantiles
    `u`, see `draw_noise`), denoise, and return `(loss per scored token, logits, x_t, t)`.
    `denoise(x_t, t)` returns the model's logits."""
    draw = process.draw_noise(x0.shape[0], generator=generator, device=x0.device, u=u)
    noisy = process.corrupt(x0, process.schedule.alpha(draw.t), corruptible=scored, generator=generator)
    logits = denoise(noisy, draw.t)
    terms = process.loss_terms(logits, x0, noisy, draw, scored=scored)
    loss = terms.sum() / scored.sum().clamp_min(1)
    return loss, logits, noisy, draw.t


def monte_carlo_nelbo(process, denoise, x0: torch.Tensor, scored: torch.Tensor, num_samples: int,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, num_samples) single-draw NELBO estimates of each sequence, in nats, for any denoiser.

    The draws of each row are stratified over [0, 1): draw k uses u = (k + U) / num_samples.

    Args:
        process: a `DiscreteDiffusion` (or anything with its `schedule`, `draw_noise`, `corrupt`, `loss_terms`).
        denoise: callable `(x_t, t) -> logits` of the model.
        x0: (B, L) clean ids. scored: (B, L) bool, the positions whose likelihood is measured; the others
            stay clean and condition the prediction.
    """
    batch = x0.shape[0]
    offset = torch.rand(batch, generator=generator, dtype=torch.float64,
                        device=generator.device if generator is not None else "cpu")
    samples = []
    for k in range(num_samples):
        u = ((k + offset) / num_samples).clamp(max=1 - 1e-12)
        draw = process.draw_noise(batch, device=x0.device, u=u)
        noisy = process.corrupt(x0, process.schedule.alpha(draw.t), corruptible=scored, generator=generator)
        terms = process.loss_terms(denoise(noisy, draw.t), x0, noisy, draw, scored=scored)
        samples.append(terms.double().sum(-1))
    return torch.stack(samples, dim=-1)


__all__ = ["AbsorbingDiffusion", "DiscreteDiffusion", "GeometricSchedule", "CosineSchedule", "LinearSchedule",
           "LogLinearSchedule", "NoiseDraw", "NoiseSchedule", "PROCESSES", "SCHEDULES",
           "UniformDiffusion", "monte_carlo_nelbo", "training_loss"]
