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
The reverse model is `p(x_s | x_t) = sum_{x_0} q(x_s | x_t, x_0) p_hat(x_0 | x_t)` (x_0
parameterisation), which `reverse_probs` evaluates in O(V) per position.

This file is "remote code": it imports only torch and is copied next to the weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Continuous-time uniform NELBO: probability with which a training draw evaluates the t = 0
# reconstruction term (weighted 1/p) instead of the integrand, keeping one forward pass per row.
RECONSTRUCTION_DRAW_PROBABILITY = 1.0 / 16


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
        reconstruction: (B,) bool, rows whose term is -log p_hat(x_0 | x_t) (discrete step 1, or
            the t = 0 atom of the continuous uniform NELBO).
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

    @property
    def reconstruction_atom(self) -> bool:
        """Whether the continuous-time NELBO has a t = 0 term -log p_hat(x_0 | x_0) besides the integral."""
        return False

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
        """p(x_s | x_t) = sum_{x_0} q(x_s | x_t, x_0) x0_probs(x_0), for every position.

        With `x0_probs = onehot(x_0)` this is the exact posterior q(x_s | x_t, x_0).

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
                   u: torch.Tensor | None = None, reconstruction_probability: float | None = None) -> NoiseDraw:
        """Stratified noise levels: row k gets u_k = (k + U_k) / B (then shuffled), a low-variance
        cover of [0, 1) that keeps every row's draw uniform. Pass `u` to choose the quantiles yourself.

        `reconstruction_probability` (continuous time): how often a row draws the t = 0 reconstruction
        term instead of the integral; defaults to `RECONSTRUCTION_DRAW_PROBABILITY` where the NELBO has
        that term (`reconstruction_atom`), else 0.
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
        if reconstruction_probability is None:
            reconstruction_probability = RECONSTRUCTION_DRAW_PROBABILITY if self.reconstruction_atom else 0.0
        rho = reconstruction_probability
        reconstruction = u < rho
        t = torch.where(reconstruction, torch.zeros_like(u), (u - rho) / (1 - rho))
        weight = torch.where(reconstruction, torch.full_like(u, 1 / rho if rho else 0.0),
                             torch.full_like(u, 1 / (1 - rho)))
        return NoiseDraw(t.to(device), None, weight.to(device), reconstruction.to(device))

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
        recon = draw.reconstruction.view(-1, 1)
        if self.num_timesteps is not None:
            term = self._discrete_kl(log_probs, x0, x_t, draw.s, draw.t)
        else:
            # Reconstruction rows sit at t = 0 where the integrand is singular; evaluate it at a safe
            # t so that the unused branch of `where` cannot put NaN into the gradients.
            safe_t = torch.where(draw.reconstruction, torch.full_like(draw.t, 0.5), draw.t)
            term = self._continuous_integrand(log_probs, nll, x0, x_t, safe_t)
        terms = draw.weight.view(-1, 1).to(term.dtype) * torch.where(recon, nll.to(term.dtype), term)
        return self._only_scored(terms, scored)

    @staticmethod
    def _only_scored(terms: torch.Tensor, scored: torch.Tensor | None) -> torch.Tensor:
        return terms if scored is None else torch.where(scored, terms, torch.zeros_like(terms))

    def _nll(self, log_probs, x0, x_t) -> torch.Tensor:
        """-log p_hat(x_0 | x_t) per position (B, L)."""
        return -log_probs.gather(-1, x0.unsqueeze(-1)).squeeze(-1)

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
        # MDLM closed form: (alpha_s - alpha_t) / (1 - alpha_t) * (-log p_hat(x_0)) at masked positions.
        alpha_s, alpha_t = self.schedule.alpha(s), self.schedule.alpha(t)
        coef = ((alpha_s - alpha_t) / (1 - alpha_t).clamp_min(1e-30)).to(log_probs.dtype).view(-1, 1)
        return coef * self._nll(log_probs, x0, x_t)

    def _continuous_integrand(self, log_probs, nll, x0, x_t, t):
        # MDLM Eq. 10-11: -alpha'(t) / (1 - alpha(t)) * (-log p_hat(x_0)) at masked positions.
        alpha = self.schedule.alpha(t)
        rate = -self.schedule.alpha_derivative(t)
        weight = (rate / (1 - alpha).clamp_min(1e-30)).to(log_probs.dtype).view(-1, 1)
        return weight * nll


class UniformDiffusion(DiscreteDiffusion):
    """pi = 1/V (SFDLM Eq. 5, D3PM-uniform, UDLM, Duo): every token may change at every step."""

    process = "uniform"

    def prior(self, dtype=torch.float32, device=None) -> torch.Tensor:
        return torch.full((self.vocab_size,), 1.0 / self.vocab_size, dtype=dtype, device=device)

    def _noise(self, x0, generator):
        return torch.randint(0, self.vocab_size, x0.shape, generator=generator, device=x0.device)

    @property
    def reconstruction_atom(self) -> bool:
        return self.objective == "elbo" and self.num_timesteps is None

    def reverse_probs(self, x0_probs, x_t, alpha_s, alpha_t):
        # q(z | y) = a [z = y] + (1 - a) u over one step, q(z | x_0) = c [z = x_0] + (1 - c) u.
        dtype = x0_probs.dtype
        b = alpha_s.to(dtype).view(-1, 1, 1)
        c = alpha_t.to(dtype).view(-1, 1, 1)
        p_z = x0_probs.gather(-1, x_t.unsqueeze(-1))  # p_hat(x_0 = x_t)
        u = 1.0 / self.vocab_size
        a = c / b.clamp_min(torch.finfo(dtype).tiny)
        one_minus_c = (1 - c).clamp_min(torch.finfo(dtype).tiny)
        same = c + (1 - c) * u  # q(z | x_0 = z)
        # u * S with S = sum_{x_0} p_hat(x_0) / q(z | x_0)
        u_s = u * p_z / same + (1 - p_z) / one_minus_c
        probs = b * (1 - a) / one_minus_c * x0_probs + (1 - a) * (1 - b) * u * u_s
        stay = (a + (1 - a) * u) * (b * p_z / same + (1 - b) * u_s)
        return probs.scatter(-1, x_t.unsqueeze(-1), stay)

    def _discrete_kl(self, log_probs, x0, x_t, s, t):
        return self.kl_to_reverse(log_probs.exp(), x0, x_t, self.schedule.alpha(s), self.schedule.alpha(t))

    def _continuous_integrand(self, log_probs, nll, x0, x_t, t):
        # The reverse chain jumps z -> y != z at rate R(y); the KL of a step of length dt is
        # dt * sum_{y != z} [R_q log(R_q / R_p) - R_q + R_p] + O(dt^2).
        alpha = self.schedule.alpha(t)
        rate = -self.schedule.alpha_derivative(t)
        rates_q = self._jump_rates(F.one_hot(x0, self.vocab_size).to(log_probs.dtype), x_t, alpha, rate)
        rates_p = self._jump_rates(log_probs.exp(), x_t, alpha, rate)
        tiny = torch.finfo(rates_p.dtype).tiny
        terms = torch.special.xlogy(rates_q, rates_q) - torch.special.xlogy(rates_q, rates_p.clamp_min(tiny))
        terms = terms - rates_q + rates_p
        return terms.scatter(-1, x_t.unsqueeze(-1), 0.0).sum(-1)

    def _jump_rates(self, x0_probs, x_t, alpha, rate) -> torch.Tensor:
        """R(y) = r [alpha p_hat(y) / (1 - alpha) + (1 - alpha) u^2 S], r = -alpha'/alpha, for y != x_t."""
        dtype = x0_probs.dtype
        u = 1.0 / self.vocab_size
        alpha = alpha.to(dtype).view(-1, 1, 1)
        hazard = (rate.to(dtype).view(-1, 1, 1) / alpha.clamp_min(torch.finfo(dtype).tiny))
        one_minus = (1 - alpha).clamp_min(torch.finfo(dtype).tiny)
        p_z = x0_probs.gather(-1, x_t.unsqueeze(-1))
        u2_s = u * u * p_z / (alpha + one_minus * u) + u * (1 - p_z) / one_minus
        return hazard * (alpha * x0_probs / one_minus + one_minus * u2_s)


PROCESSES.update({AbsorbingDiffusion.process: AbsorbingDiffusion, UniformDiffusion.process: UniformDiffusion})


# ============================================================================================== estimators
def training_loss(process, denoise, x0: torch.Tensor, scored: torch.Tensor,
                  generator: torch.Generator | None = None):
    """One training draw: corrupt the scored positions at stratified noise levels, denoise, and return
    `(loss per scored token, logits, x_t, t)`. `denoise(x_t, t)` returns the model's logits."""
    draw = process.draw_noise(x0.shape[0], generator=generator, device=x0.device)
    noisy = process.corrupt(x0, process.schedule.alpha(draw.t), corruptible=scored, generator=generator)
    logits = denoise(noisy, draw.t)
    terms = process.loss_terms(logits, x0, noisy, draw, scored=scored)
    loss = terms.sum() / scored.sum().clamp_min(1)
    return loss, logits, noisy, draw.t


def monte_carlo_nelbo(process, denoise, x0: torch.Tensor, scored: torch.Tensor, num_samples: int,
                      generator: torch.Generator | None = None,
                      exact_reconstruction: bool | None = None) -> torch.Tensor:
    """(B, num_samples) single-draw NELBO estimates of each sequence, in nats, for any denoiser.

    The draws of each row are stratified over [0, 1): draw k uses u = (k + U) / num_samples.

    Args:
        process: a `DiscreteDiffusion` (or anything with its `schedule`, `draw_noise`, `corrupt`, `loss_terms`).
        denoise: callable `(x_t, t) -> logits` of the model.
        x0: (B, L) clean ids. scored: (B, L) bool, the positions whose likelihood is measured; the others
            stay clean and condition the prediction.
        exact_reconstruction: add the continuous-time NELBO's t = 0 term -log p_hat(x_0 | x_0) computed
            exactly (one extra pass) instead of drawing it; defaults to `process.reconstruction_atom`.
    """
    if exact_reconstruction is None:
        exact_reconstruction = process.reconstruction_atom
    batch = x0.shape[0]
    offset = torch.rand(batch, generator=generator, dtype=torch.float64,
                        device=generator.device if generator is not None else "cpu")
    samples = []
    for k in range(num_samples):
        u = ((k + offset) / num_samples).clamp(max=1 - 1e-12)
        draw = process.draw_noise(batch, device=x0.device, u=u, reconstruction_probability=0.0)
        noisy = process.corrupt(x0, process.schedule.alpha(draw.t), corruptible=scored, generator=generator)
        terms = process.loss_terms(denoise(noisy, draw.t), x0, noisy, draw, scored=scored)
        samples.append(terms.double().sum(-1))
    samples = torch.stack(samples, dim=-1)
    if exact_reconstruction:
        log_probs = denoise(x0, torch.zeros(batch, device=x0.device)).double().log_softmax(-1)
        nll = -log_probs.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
        samples = samples + torch.where(scored, nll, torch.zeros_like(nll)).sum(-1).unsqueeze(-1)
    return samples


__all__ = ["AbsorbingDiffusion", "DiscreteDiffusion", "GeometricSchedule", "CosineSchedule", "LinearSchedule",
           "LogLinearSchedule", "NoiseDraw", "NoiseSchedule", "PROCESSES", "RECONSTRUCTION_DRAW_PROBABILITY",
           "SCHEDULES", "UniformDiffusion", "monte_carlo_nelbo", "training_loss"]
