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

    def masked_weight(self, draw: NoiseDraw) -> torch.Tensor:
        """(B,) float64 w with `loss_terms` = w * (-log p_hat(x_0)) at masked scored positions (0 elsewhere):
        1 for 'ce'; draw.weight * |alpha'(t)| / (1 - alpha(t)) in continuous time; draw.weight *
        (alpha_s - alpha_t) / (1 - alpha_t) in discrete time (1 at the reconstruction step)."""
        weight = draw.weight.to(torch.float64).cpu()
        t = draw.t.to(torch.float64).cpu()
        if self.objective == "ce":
            return torch.ones_like(t)
        one_minus = self.schedule.one_minus_alpha(t).clamp_min(1e-30)
        if self.num_timesteps is None:
            return weight * -self.schedule.alpha_derivative(t) / one_minus
        s = torch.where(draw.reconstruction.cpu(), torch.zeros_like(t), draw.s.to(torch.float64).cpu())
        return weight * (self.schedule.alpha(s) - self.schedule.alpha(t)) / one_minus

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
# How the noise of one Monte Carlo draw of the NELBO is chosen (all unbiased for the same bound):
#   "uniform_t"     t stratified uniform on [0, 1) (discrete time: the step), weight 1 (T). The historical
#                   estimator: for schedules with alpha'(0) != 0 one draw's variance is infinite (the integrand
#                   is 1/t-like near 0 with probability ~t).
#   "importance"    continuous time: 1 - alpha(t) = u^2 with u stratified uniform, weight 2u / |alpha'(t)|
#                   (the density of t is |alpha'(t)| / (2 sqrt(1 - alpha(t)))): finite variance for both
#                   processes and SEDD, whatever the schedule.
#   "masked_count"  the number m of masked (absorbing: 1..n) or resampled (uniform: 0..n) scored positions
#                   stratified uniformly, the set uniform among m-subsets, 1 - alpha(t) from its conditional law
#                   given m, weight P(m | a) / q(m, a): absorbing x_0 models score (n / m) sum_masked nll. One draw
#                   is bounded. Continuous time (any process, SEDD included) and discrete-time absorbing x_0
#                   models (`MaskedCountTable`); see `masked_count_draw`. The default ("auto") where it applies.
NELBO_ESTIMATORS = ("auto", "masked_count", "importance", "uniform_t")


def resolve_estimator(process, estimator: str) -> str:
    """The estimator `estimator` names for `process`. `"auto"` is masked_count wherever it applies (every
    continuous-time model, and discrete-time absorbing x_0 models) and uniform_t otherwise (discrete-time
    uniform: the NELBO is a finite sum of T bounded KL terms, so a stratified draw of the step has finite
    variance). Raises a ValueError for a name that does not exist or does not apply."""
    if estimator not in NELBO_ESTIMATORS:
        raise ValueError(f"`estimator` must be one of {NELBO_ESTIMATORS}, got {estimator!r}.")
    continuous = getattr(process, "num_timesteps", None) is None
    counts = continuous or (getattr(process, "process", None) == "absorbing"
                            and getattr(process, "parameterization", "x0") == "x0")
    if estimator == "auto":
        return "masked_count" if counts else "uniform_t"
    if estimator == "masked_count" and not counts:
        raise ValueError("`estimator='masked_count'` needs a continuous-time model or a discrete-time absorbing "
                         "one; a discrete-time uniform model's NELBO is a sum over its T steps: use 'uniform_t'.")
    if estimator == "importance" and not continuous:
        raise ValueError("`estimator='importance'` is for continuous-time models; a discrete-time NELBO is a sum "
                         "over its T steps: use 'uniform_t' (stratified steps) or 'masked_count' (absorbing).")
    return estimator


def invert_one_minus_alpha(schedule: NoiseSchedule, target: torch.Tensor, iterations: int = 64) -> torch.Tensor:
    """t in [0, 1] with schedule.one_minus_alpha(t) = target, float64 (bisection; 1 - alpha increases)."""
    target = target.to(torch.float64)
    low, high = torch.zeros_like(target), torch.ones_like(target)
    for _ in range(iterations):
        middle = (low + high) / 2
        below = schedule.one_minus_alpha(middle).to(target.device) < target
        low, high = torch.where(below, middle, low), torch.where(below, high, middle)
    t = (low + high) / 2
    return torch.where(target <= 0, torch.zeros_like(t), torch.where(target >= 1, torch.ones_like(t), t))


def importance_draw(process, u: torch.Tensor, device=None) -> NoiseDraw:
    """Continuous-time noise levels with 1 - alpha(t) = u^2 and weight 2u / |alpha'(t)|.

    In a = 1 - alpha the NELBO is int_0^1 g(a) da with g(a) = E[integrand(t(a))] / |alpha'(t(a))|; drawing
    a = u^2 (density 1 / (2 sqrt a)) puts more draws where one corrupted token makes a term of size ~1/a, so
    that the second moment int a (1/a)^2 sqrt(a) da is finite (with t uniform it is int (1/a) da = inf)."""
    u = u.to(torch.float64).cpu()
    t = invert_one_minus_alpha(process.schedule, u * u)
    rate = -process.schedule.alpha_derivative(t)
    weight = torch.where(rate > 0, 2 * u / rate.clamp_min(1e-300), torch.zeros_like(u))
    return NoiseDraw(t.to(device), None, weight.to(device), torch.zeros_like(u, dtype=torch.bool).to(device))


def _log_binomial(n: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return torch.lgamma(n + 1) - torch.lgamma(m + 1) - torch.lgamma(n - m + 1)


class MaskedCountTable:
    """Discrete-time masked-count law for sequences of n scored positions (T steps, a_i = 1 - alpha(i/T)).

    The discrete absorbing NELBO is sum_i c_i E[sum_masked nll(x_{t_i}, t_i)], c_i = (alpha_{i-1} - alpha_i)
    / (1 - alpha_i) (c_1 = 1: the reconstruction step). Split by the number m of masked positions:
    sum_m W_m E_{i ~ P(i | m)} E_{M uniform m-subset}[sum_M nll], W_m = sum_i c_i Binom(m; n, a_i),
    P(i | m) = c_i Binom(m; n, a_i) / W_m: the Riemann sum of the continuous identity
    int (1/a) Binom(m; n, a) da = 1/m. `weights[m]` = W_m, `steps[m]` = P(. | m) (rows with W_m = 0 are never
    drawn)."""

    def __init__(self, schedule: NoiseSchedule, num_timesteps: int, n: int):
        T = num_timesteps
        i = torch.arange(1, T + 1, dtype=torch.float64)
        alpha_t, alpha_s = schedule.alpha(i / T), schedule.alpha((i - 1) / T)
        a = schedule.one_minus_alpha(i / T)
        coefficient = (alpha_s - alpha_t) / a.clamp_min(1e-300)
        m = torch.arange(0, n + 1, dtype=torch.float64)
        log_binomial = (_log_binomial(torch.tensor(float(n)), m).view(1, -1) + torch.special.xlogy(m.view(1, -1), a.view(-1, 1))
                        + torch.special.xlogy(n - m.view(1, -1), alpha_t.view(-1, 1)))  # (T, n + 1)
        joint = coefficient.view(-1, 1) * log_binomial.exp()
        self.weights = joint.sum(0)  # (n + 1,)
        self.steps = (joint / self.weights.clamp_min(1e-300)).T.contiguous()  # (n + 1, T)
        self.support = torch.nonzero((self.weights > 0) & (m > 0)).flatten()  # the m worth drawing


def masked_count_draw(process, x0: torch.Tensor, scored: torch.Tensor, u: torch.Tensor,
                      generator: torch.Generator | None = None, tables: dict | None = None):
    """One masked-count draw per row: `(x_t, NoiseDraw)`, for any process in continuous time (SEDD included)
    and for discrete-time absorbing x_0-parameterised ones.

    Absorbing, continuous time. In a = 1 - alpha(t) the NELBO of a row with n scored positions is
    int_0^1 (1/a) E[sum_masked nll] da; each position is masked with probability a, so splitting by the
    masked count m (Binom(n, a)) and using int_0^1 C(n, m) a^(m-1) (1 - a)^(n-m) da = 1/m gives
    NELBO = sum_{m=1}^n (1/m) E_{a ~ Beta(m, n - m + 1)} E_{M uniform m-subset}[sum_{i in M} nll_i(t(a))]
          = E_{m ~ U{1..n}} [(n / m) sum_{i in M} nll_i].
    m is stratified over the rows' quantiles `u`; (a, M) come from n uniforms per row: a is their m-th
    smallest (a Beta(m, n - m + 1) draw) and M the positions of the m smallest (independent of a, uniform).
    One draw is at most n * max nll: finite variance. Discrete time: `MaskedCountTable`.

    Uniform process (continuous time): the same split by the number m of resampled positions, m in 0..n
    (an all-clean x_t has a non-zero term): m uniform on 0..n, a ~ Beta(m, n - m + 1) (m = 0: Beta(1, n + 1)),
    weight P(m | a) / q(m, a) = (n + 1) a / m (1 for m = 0) on the integrand in a, which is loss_terms' / |alpha'|;
    a resampled term is O(1/a), so a draw stays bounded.

    The returned draw's `weight` is set so that `loss_terms` gives (n / m) nll (resp. n W_m nll) at the
    masked scored positions, so every loss path reads the same draw.
    """
    u = u.to(torch.float64).cpu()
    n = scored.sum(-1).cpu().to(torch.float64)  # (B,)
    uniforms = torch.rand(x0.shape, generator=generator, dtype=torch.float64,
                          device=generator.device if generator is not None else "cpu").to(x0.device)
    uniforms = torch.where(scored, uniforms, torch.full_like(uniforms, 2.0))
    T = process.num_timesteps
    resampling = process.process != "absorbing"  # uniform: a resampled token may be any id, x_0 included
    if T is None and resampling:
        # m in 0..n: the all-clean draws are terms too (the model's jump rates out of x_0 are not the truth's)
        m = (u * (n + 1)).floor().clamp(max=n)
    elif T is None:
        m = (u * n).floor().clamp(max=(n - 1).clamp_min(0)) + 1
        factor = n / m
    else:
        tables = {} if tables is None else tables
        where = generator.device if generator is not None else "cpu"
        r = torch.rand(x0.shape[0], generator=generator, dtype=torch.float64, device=where).cpu()
        m, factor, steps = torch.ones_like(n), torch.zeros_like(n), torch.ones_like(n)
        for size in n.unique().tolist():
            rows = n == size
            if size == 0:
                continue
            table = tables.setdefault((int(size), T), MaskedCountTable(process.schedule, T, int(size)))
            k = len(table.support)
            pick = table.support[(u[rows] * k).floor().long().clamp(max=k - 1)]
            m[rows] = pick.to(torch.float64)
            factor[rows] = k * table.weights[pick]
            cdf = table.steps[pick].cumsum(-1)  # the step i | m by inversion of its distribution function
            index = torch.searchsorted(cdf, (r[rows] * cdf[:, -1]).unsqueeze(-1)).flatten().clamp(max=T - 1)
            steps[rows] = index.to(torch.float64) + 1
    threshold = uniforms.sort(-1).values.gather(-1, (m.long() - 1).clamp_min(0).to(x0.device).view(-1, 1))
    masked = (uniforms <= threshold) & scored & (m > 0).to(x0.device).view(-1, 1)
    noisy = torch.where(masked, process._noise(x0, generator), x0)
    if T is None:
        a = threshold.flatten().cpu().clamp(max=1.0)
        if resampling:  # m = 0: a ~ Beta(1, n + 1) (by inversion), weight 1; m >= 1: weight (n + 1) a / m
            extra = torch.rand(x0.shape[0], generator=generator, dtype=torch.float64,
                               device=generator.device if generator is not None else "cpu").cpu()
            a = torch.where(m > 0, a, -torch.expm1(torch.log1p(-extra) / (n + 1)))
            factor = torch.where(m > 0, (n + 1) * a / m.clamp_min(1), torch.ones_like(a))
        t = invert_one_minus_alpha(process.schedule, a)
        s, reconstruction = None, torch.zeros_like(t, dtype=torch.bool)
        if resampling:  # in a = 1 - alpha the NELBO integrand is loss_terms' / |alpha'(t)|
            rate = -process.schedule.alpha_derivative(t)
            weight = torch.where((n > 0) & (rate > 0), factor / rate.clamp_min(1e-300), torch.zeros_like(n))
            device = x0.device
            return noisy, NoiseDraw(t.to(device), None, weight.to(device), reconstruction.to(device))
    else:
        t, s = steps / T, (steps - 1) / T
        reconstruction = steps == 1
    draw = NoiseDraw(t, s, torch.ones_like(t), reconstruction)
    coefficient = process.masked_weight(draw)  # loss_terms' own factor at a masked position (weight 1)
    weight = torch.where((n > 0) & (coefficient > 0), factor / coefficient.clamp_min(1e-300), torch.zeros_like(n))
    device = x0.device
    return noisy, NoiseDraw(t.to(device), None if s is None else s.to(device), weight.to(device),
                            reconstruction.to(device))


def draw_for_estimator(process, estimator: str, x0: torch.Tensor, scored: torch.Tensor, u: torch.Tensor,
                       generator: torch.Generator | None = None, tables: dict | None = None):
    """`(x_t, NoiseDraw)` of one draw per row under a resolved estimator, at the rows' quantiles `u`."""
    if estimator == "masked_count":
        return masked_count_draw(process, x0, scored, u, generator, tables)
    if estimator == "importance":
        draw = importance_draw(process, u, device=x0.device)
    else:
        draw = process.draw_noise(x0.shape[0], device=x0.device, u=u)
    noisy = process.corrupt(x0, process.schedule.alpha(draw.t), corruptible=scored, generator=generator)
    return noisy, draw


def stratified_quantiles(batch: int, generator: torch.Generator | None = None, shuffle: bool = True) -> torch.Tensor:
    """(B,) float64 u_k = (k + U_k) / B in a random order: each uniform, together a stratified cover."""
    where = generator.device if generator is not None else "cpu"
    offsets = torch.rand(batch, generator=generator, dtype=torch.float64, device=where)
    order = torch.randperm(batch, generator=generator, device=where) if shuffle else torch.arange(batch, device=where)
    return ((order.to(torch.float64) + offsets) / batch).cpu()


def uses_head_only(process, denoise_accepts_positions: bool) -> bool:
    """Whether the loss can run the output head at masked positions only: absorbing x_0 models, whose terms
    are 0 wherever x_t is not the mask (carry-over)."""
    return (denoise_accepts_positions and getattr(process, "process", None) == "absorbing"
            and getattr(process, "parameterization", "x0") == "x0")


def head_only_terms(process, denoise, x0: torch.Tensor, scored: torch.Tensor, noisy: torch.Tensor, draw: NoiseDraw):
    """`(per-row loss sums (B,), logit rows (N, V), positions (B, L))` of an absorbing x_0 model with the
    head run at the masked positions only: equal to `loss_terms(denoise(x_t, t), ...).sum(-1)`."""
    positions = noisy == process.mask_token_id
    rows = denoise(noisy, draw.t, positions)
    log_probs = process.x0_log_probs(rows, None)
    nll = -log_probs.gather(-1, x0[positions].unsqueeze(-1)).squeeze(-1)
    row_index = positions.nonzero()[:, 0]
    weight = process.masked_weight(draw).to(device=nll.device, dtype=nll.dtype)[row_index]
    terms = torch.where(scored[positions], weight * nll, torch.zeros_like(nll))
    sums = torch.zeros(x0.shape[0], dtype=terms.dtype, device=terms.device).index_add(0, row_index, terms)
    return sums, rows, positions


def resolve_training_estimator(process, estimator: str, fixed: bool = False) -> str:
    """The estimator a training loss draws with: `estimator` resolved (see `resolve_estimator`), except that the
    objective 'ce' and discrete-time 'importance' use 'uniform_t', and so do `fixed` noise levels given by the
    caller (corrupt at exactly those t, weight 1). Shared by the full-canvas and the block training losses."""
    if not process.is_likelihood_bound or (estimator == "importance" and process.num_timesteps is not None):
        estimator = "uniform_t"  # the plain CE; a discrete-time NELBO's steps (see `resolve_estimator`)
    estimator = resolve_estimator(process, estimator)
    return "uniform_t" if fixed else estimator


def training_loss(process, denoise, x0: torch.Tensor, scored: torch.Tensor,
                  generator: torch.Generator | None = None, u: torch.Tensor | None = None,
                  estimator: str = "uniform_t", head_only: bool = False):
    """One training draw: corrupt the scored positions at noise levels stratified over the batch (or at the
    quantiles `u`, see `draw_noise`), denoise, and return `(loss per scored token, logits, x_t, t)`.

    `denoise(x_t, t, positions=None)` returns the model's logits (rows at `positions` when given).
    `estimator` (see `NELBO_ESTIMATORS`; the objective 'ce' always uses 'uniform_t', and 'importance' falls back
    to it in discrete time) picks the draws; every choice has the same expectation. `head_only` (absorbing x_0 models): the output head runs at masked
    positions only; the returned logits are then (B, L, V) with those rows and, elsewhere, the carry-over
    p_hat = onehot(x_t) (logit 0 at x_t, -inf elsewhere), the model's prediction there."""
    estimator = resolve_training_estimator(process, estimator, fixed=u is not None)
    if u is None:
        u = stratified_quantiles(x0.shape[0], generator)
    noisy, draw = draw_for_estimator(process, estimator, x0, scored, u, generator)
    if head_only:
        sums, rows, positions = head_only_terms(process, denoise, x0, scored, noisy, draw)
        loss = sums.sum() / scored.sum().clamp_min(1)
        logits = _carry_over_logits(noisy, process.vocab_size, rows, positions)
        return loss, logits, noisy, draw.t
    logits = denoise(noisy, draw.t)
    terms = process.loss_terms(logits, x0, noisy, draw, scored=scored)
    loss = terms.sum() / scored.sum().clamp_min(1)
    return loss, logits, noisy, draw.t


def _carry_over_logits(noisy: torch.Tensor, vocab_size: int, rows: torch.Tensor, positions: torch.Tensor):
    logits = torch.full((*noisy.shape, vocab_size), -math.inf, dtype=rows.dtype, device=rows.device)
    logits.scatter_(-1, noisy.unsqueeze(-1), 0.0)
    return logits.index_put((positions,), rows)


def monte_carlo_nelbo(process, denoise, x0: torch.Tensor, scored: torch.Tensor, num_samples: int,
                      generator: torch.Generator | None = None, estimator: str = "auto",
                      head_only: bool = False) -> torch.Tensor:
    """(B, num_samples) single-draw NELBO estimates of each sequence, in nats, for any denoiser.

    The draws of each row are stratified: draw k uses the quantile u = (k + U) / num_samples, read by
    `estimator` (see `NELBO_ESTIMATORS`, `resolve_estimator`) as t (uniform_t), as sqrt(1 - alpha(t))
    (importance) or as the masked count (masked_count). The mean over the draws is unbiased for the NELBO;
    single draws of a row are not independent (stratified), so error bars come from independent replicates
    (separate calls), not from their spread.

    Args:
        process: a `DiscreteDiffusion` (or anything with its `schedule`, `draw_noise`, `corrupt`, `loss_terms`).
        denoise: callable `(x_t, t, positions=None) -> logits` of the model (rows at `positions` when given,
            used when `head_only`).
        x0: (B, L) clean ids. scored: (B, L) bool, the positions whose likelihood is measured; the others
            stay clean and condition the prediction.
    """
    estimator = resolve_estimator(process, estimator)
    batch = x0.shape[0]
    offset = torch.rand(batch, generator=generator, dtype=torch.float64,
                        device=generator.device if generator is not None else "cpu").cpu()
    tables: dict = {}
    samples = []
    for k in range(num_samples):
        u = ((k + offset) / num_samples).clamp(max=1 - 1e-12)
        noisy, draw = draw_for_estimator(process, estimator, x0, scored, u, generator, tables)
        if head_only:
            sums = head_only_terms(process, denoise, x0, scored, noisy, draw)[0]
        else:
            sums = process.loss_terms(denoise(noisy, draw.t), x0, noisy, draw, scored=scored).sum(-1)
        samples.append(sums.double())
    return torch.stack(samples, dim=-1)


__all__ = ["AbsorbingDiffusion", "DiscreteDiffusion", "GeometricSchedule", "CosineSchedule", "LinearSchedule",
           "LogLinearSchedule", "NoiseDraw", "NoiseSchedule", "PROCESSES", "SCHEDULES",
           "UniformDiffusion", "NELBO_ESTIMATORS", "invert_one_minus_alpha", "monte_carlo_nelbo", "resolve_estimator",
           "resolve_training_estimator", "training_loss"]
