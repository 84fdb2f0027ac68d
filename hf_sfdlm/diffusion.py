"""Discrete diffusion maths for one family: corruption by mixing with a prior.

Both processes of the seed papers are instances of

    q(x_t | x_0) = Cat(alpha_t * onehot(x_0) + (1 - alpha_t) * pi)

with pi uniform over the vocabulary (SFDLM, D3PM-uniform, UDLM) or a point mass on the mask token
(D3PM-absorb, MDLM). This module knows nothing of the backbone: it takes logits and token ids, so
the same objective drives the SFDLM U-Net, a Transformer denoiser or a test stub.

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


class NoiseSchedule:
    """Signal level alpha(t) on t in [0, 1], with alpha(0) = 1 and alpha(1) = 0 exactly.

    Names: ``"linear"`` (linear beta(t) = beta_min + t (beta_max - beta_min), alpha = exp(-int beta),
    as in the SFDLM paper), ``"cosine"`` (alpha = cos(pi t / 2)), ``"loglinear"`` (alpha = 1 - t,
    MDLM/SEDD) and ``"geometric"`` (total noise sigma_min^(1-t) sigma_max^t, SEDD). Schedules whose raw
    form does not end at 0 (linear, geometric) are affinely rescaled to [0, 1] so that the last step
    reaches the prior exactly; for the discrete chain this means beta_T = 1, as in D3PM-absorb.
    """

    def __init__(self, name: str, beta_min: float = 0.1, beta_max: float = 20.0,
                 sigma_min: float = 1e-4, sigma_max: float = 20.0):
        if name not in ("linear", "cosine", "loglinear", "geometric"):
            raise ValueError(f"Unknown noise schedule {name!r}; expected linear, cosine, loglinear or geometric.")
        self.name = name
        self.beta_min, self.beta_max = beta_min, beta_max
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    @classmethod
    def from_config(cls, config) -> "NoiseSchedule":
        return cls(config.noise_schedule, config.linear_beta_min, config.linear_beta_max,
                   config.geometric_sigma_min, config.geometric_sigma_max)

    def _raw(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Un-normalised (value, derivative) for the schedules that are rescaled."""
        if self.name == "linear":
            integral = self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t
            value = torch.exp(-integral)
            return value, -(self.beta_min + t * (self.beta_max - self.beta_min)) * value
        sigma = self.sigma_min ** (1 - t) * self.sigma_max ** t
        value = torch.exp(-sigma)
        return value, -sigma * math.log(self.sigma_max / self.sigma_min) * value

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.name == "cosine":
            return torch.where(t >= 1, torch.zeros_like(t), torch.cos(0.5 * math.pi * t))
        if self.name == "loglinear":
            return 1 - t
        value, _ = self._raw(t)
        start, _ = self._raw(torch.zeros((), dtype=torch.float64))
        end, _ = self._raw(torch.ones((), dtype=torch.float64))
        return ((value - end) / (start - end)).clamp(0, 1)

    def alpha_derivative(self, t: torch.Tensor) -> torch.Tensor:
        """d alpha / d t (negative)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.name == "cosine":
            return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)
        if self.name == "loglinear":
            return -torch.ones_like(t)
        _, derivative = self._raw(t)
        start, _ = self._raw(torch.zeros((), dtype=torch.float64))
        end, _ = self._raw(torch.ones((), dtype=torch.float64))
        return derivative / (start - end)


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


class DiscreteDiffusion:
    """Corruption, posterior, reverse step and NELBO for the uniform and absorbing processes.

    Args:
        vocab_size: V, the number of token ids.
        process: ``"uniform"`` or ``"absorbing"``.
        schedule: the `NoiseSchedule`.
        num_timesteps: T for the discrete-time NELBO, or None for continuous time.
        mask_token_id: the absorbing state (required for ``"absorbing"``).
        objective: ``"elbo"`` (exact NELBO) or ``"ce"`` (the SFDLM paper's plain cross-entropy).
    """

    def __init__(self, vocab_size: int, process: str, schedule: NoiseSchedule,
                 num_timesteps: int | None = None, mask_token_id: int | None = None, objective: str = "elbo"):
        if process not in ("uniform", "absorbing"):
            raise ValueError(f"`process` must be 'uniform' or 'absorbing', got {process!r}.")
        if process == "absorbing" and mask_token_id is None:
            raise ValueError("The absorbing process needs `mask_token_id`, got None.")
        if objective not in ("elbo", "ce"):
            raise ValueError(f"`objective` must be 'elbo' or 'ce', got {objective!r}.")
        self.vocab_size = vocab_size
        self.process = process
        self.schedule = schedule
        self.num_timesteps = num_timesteps
        self.mask_token_id = mask_token_id
        self.objective = objective

    @classmethod
    def from_config(cls, config) -> "DiscreteDiffusion":
        return cls(config.vocab_size, config.process, NoiseSchedule.from_config(config),
                   config.num_timesteps, config.mask_token_id, config.objective)

    # ------------------------------------------------------------------ the forward process
    def prior(self, dtype=torch.float32, device=None) -> torch.Tensor:
        """pi: (V,) probabilities of the fully corrupted state."""
        if self.process == "uniform":
            return torch.full((self.vocab_size,), 1.0 / self.vocab_size, dtype=dtype, device=device)
        prior = torch.zeros(self.vocab_size, dtype=dtype, device=device)
        prior[self.mask_token_id] = 1.0
        return prior

    def corrupt(self, x0: torch.Tensor, alpha_t: torch.Tensor, corruptible: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0) per position; positions where `corruptible` is False stay x_0.

        Args:
            x0: (B, L) clean ids. alpha_t: (B,) signal levels.
        """
        alpha_t = alpha_t.to(device=x0.device, dtype=torch.float64).view(-1, 1)
        keep = torch.rand(x0.shape, generator=generator, device=x0.device, dtype=torch.float64) < alpha_t
        if self.process == "uniform":
            noise = torch.randint(0, self.vocab_size, x0.shape, generator=generator, device=x0.device)
        else:
            noise = torch.full_like(x0, self.mask_token_id)
        keep = keep if corruptible is None else keep | ~corruptible.bool()
        return torch.where(keep, x0, noise)

    # ------------------------------------------------------------------ the reverse process
    def x0_probs(self, logits: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """p_hat(x_0 | x_t): softmax of the logits in float32 (or float64 if given).

        Absorbing process: the mask is never a clean token, and unmasked positions carry over
        (p_hat = onehot(x_t)), as MDLM's SUBS parameterisation.
        """
        logits = logits.float() if logits.dtype not in (torch.float32, torch.float64) else logits
        if self.process == "uniform":
            return logits.softmax(-1)
        logits = logits.clone()
        logits[..., self.mask_token_id] = -math.inf
        probs = logits.softmax(-1)
        carry = x_t != self.mask_token_id
        return torch.where(carry.unsqueeze(-1), F.one_hot(x_t, self.vocab_size).to(probs.dtype), probs)

    def reverse_probs(self, x0_probs: torch.Tensor, x_t: torch.Tensor, alpha_s: torch.Tensor,
                      alpha_t: torch.Tensor) -> torch.Tensor:
        """p(x_s | x_t) = sum_{x_0} q(x_s | x_t, x_0) x0_probs(x_0), for every position.

        With `x0_probs = onehot(x_0)` this is the exact posterior q(x_s | x_t, x_0).

        Args:
            x0_probs: (B, L, V). x_t: (B, L). alpha_s, alpha_t: (B,) with alpha_s >= alpha_t.
        Returns:
            (B, L, V) probabilities over x_s.
        """
        dtype = x0_probs.dtype
        b = alpha_s.to(dtype).view(-1, 1, 1)
        c = alpha_t.to(dtype).view(-1, 1, 1)
        p_z = x0_probs.gather(-1, x_t.unsqueeze(-1))  # p_hat(x_0 = x_t)
        if self.process == "absorbing":
            # Masked: unmask to y with (alpha_s - alpha_t) / (1 - alpha_t) p_hat(y), stay masked otherwise.
            one_minus_c = (1 - c).clamp_min(torch.finfo(dtype).tiny)
            masked = (b - c) / one_minus_c * x0_probs
            masked[..., self.mask_token_id] = ((1 - b) / one_minus_c).squeeze(-1)
            is_masked = (x_t == self.mask_token_id).unsqueeze(-1)
            return torch.where(is_masked, masked, F.one_hot(x_t, self.vocab_size).to(dtype))
        # Uniform: q(z | y) = a [z = y] + (1 - a) u over one step, q(z | x_0) = c [z = x_0] + (1 - c) u.
        u = 1.0 / self.vocab_size
        a = c / b.clamp_min(torch.finfo(dtype).tiny)
        one_minus_c = (1 - c).clamp_min(torch.finfo(dtype).tiny)
        same = c + (1 - c) * u  # q(z | x_0 = z)
        # u * S with S = sum_{x_0} p_hat(x_0) / q(z | x_0)
        u_s = u * p_z / same + (1 - p_z) / one_minus_c
        probs = b * (1 - a) / one_minus_c * x0_probs + (1 - a) * (1 - b) * u * u_s
        stay = (a + (1 - a) * u) * (b * p_z / same + (1 - b) * u_s)
        return probs.scatter(-1, x_t.unsqueeze(-1), stay)

    def posterior_probs(self, x0: torch.Tensor, x_t: torch.Tensor, alpha_s: torch.Tensor,
                        alpha_t: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
        """q(x_s | x_t, x_0): (B, L, V)."""
        return self.reverse_probs(F.one_hot(x0, self.vocab_size).to(dtype), x_t, alpha_s, alpha_t)

    # ------------------------------------------------------------------ noise levels
    def draw_noise(self, batch_size: int, generator: torch.Generator | None = None, device=None,
                   u: torch.Tensor | None = None,
                   reconstruction_probability: float = RECONSTRUCTION_DRAW_PROBABILITY) -> NoiseDraw:
        """Stratified noise levels: row k gets u_k = (k + U_k) / B (then shuffled), a low-variance
        cover of [0, 1) that keeps every row's draw uniform. Pass `u` to choose the quantiles yourself.
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
        rho = reconstruction_probability if self.process == "uniform" and self.objective == "elbo" else 0.0
        reconstruction = u < rho
        t = torch.where(reconstruction, torch.zeros_like(u), (u - rho) / (1 - rho))
        weight = torch.where(reconstruction, torch.full_like(u, 1 / rho if rho else 0.0),
                             torch.full_like(u, 1 / (1 - rho)))
        return NoiseDraw(t.to(device), None, weight.to(device), reconstruction.to(device))

    # ------------------------------------------------------------------ losses
    def loss_terms(self, logits: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, draw: NoiseDraw) -> torch.Tensor:
        """Per-position loss (B, L) whose sum over positions is an unbiased NELBO estimate (or the CE).

        Discrete time: T * KL(q(x_s | x_t, x_0) || p(x_s | x_t)) at step t = i/T, and
        T * (-log p_hat(x_0 | x_t)) at step 1. Continuous time: the integrand of the T -> infinity limit.
        """
        log_probs = self._x0_log_probs(logits, x_t)
        nll = -log_probs.gather(-1, x0.unsqueeze(-1)).squeeze(-1)  # -log p_hat(x_0 | x_t)
        if self.process == "absorbing":  # carry-over: unmasked positions are predicted exactly
            nll = torch.where(x_t == self.mask_token_id, nll, torch.zeros_like(nll))
        if self.objective == "ce":
            return nll
        recon = draw.reconstruction.view(-1, 1)
        if self.num_timesteps is not None:
            term = self._discrete_kl(log_probs, x0, x_t, draw.s, draw.t)
        else:
            # Reconstruction rows sit at t = 0 where the integrand is singular; evaluate it at a safe
            # t so that the unused branch of `where` cannot put NaN into the gradients.
            safe_t = torch.where(draw.reconstruction, torch.full_like(draw.t, 0.5), draw.t)
            term = self._continuous_integrand(log_probs, nll, x0, x_t, safe_t)
        return draw.weight.view(-1, 1).to(term.dtype) * torch.where(recon, nll.to(term.dtype), term)

    def _x0_log_probs(self, logits: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        logits = logits.float() if logits.dtype not in (torch.float32, torch.float64) else logits
        if self.process == "uniform":
            return logits.log_softmax(-1)
        logits = logits.clone()
        logits[..., self.mask_token_id] = -math.inf
        return logits.log_softmax(-1)  # carry-over is applied by the callers (unmasked terms are 0)

    def _discrete_kl(self, log_probs, x0, x_t, s, t) -> torch.Tensor:
        alpha_s, alpha_t = self.schedule.alpha(s), self.schedule.alpha(t)
        if self.process == "absorbing":
            # MDLM closed form: (alpha_s - alpha_t) / (1 - alpha_t) * (-log p_hat(x_0)) at masked positions.
            coef = ((alpha_s - alpha_t) / (1 - alpha_t).clamp_min(1e-30)).to(log_probs.dtype).view(-1, 1)
            nll = -log_probs.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
            return torch.where(x_t == self.mask_token_id, coef * nll, torch.zeros_like(nll))
        return self.kl_to_reverse(log_probs.exp(), x0, x_t, alpha_s, alpha_t)

    def kl_to_reverse(self, x0_probs, x0, x_t, alpha_s, alpha_t) -> torch.Tensor:
        """KL(q(x_s | x_t, x_0) || p(x_s | x_t)) per position (B, L), by summing over the vocabulary."""
        q = self.posterior_probs(x0, x_t, alpha_s, alpha_t, dtype=x0_probs.dtype)
        p = self.reverse_probs(x0_probs, x_t, alpha_s, alpha_t)
        tiny = torch.finfo(p.dtype).tiny
        return (torch.special.xlogy(q, q) - torch.special.xlogy(q, p.clamp_min(tiny))).sum(-1)

    def _continuous_integrand(self, log_probs, nll, x0, x_t, t) -> torch.Tensor:
        alpha = self.schedule.alpha(t)
        rate = -self.schedule.alpha_derivative(t)
        if self.process == "absorbing":
            # MDLM Eq. 10-11: -alpha'(t) / (1 - alpha(t)) * (-log p_hat(x_0)) at masked positions.
            weight = (rate / (1 - alpha).clamp_min(1e-30)).to(log_probs.dtype).view(-1, 1)
            return torch.where(x_t == self.mask_token_id, weight * nll, torch.zeros_like(nll))
        # Uniform: the reverse chain jumps z -> y != z at rate R(y); the KL of a step of length dt is
        # dt * sum_{y != z} [R_q log(R_q / R_p) - R_q + R_p] + O(dt^2).
        rates_q = self._uniform_jump_rates(F.one_hot(x0, self.vocab_size).to(log_probs.dtype), x_t, alpha, rate)
        rates_p = self._uniform_jump_rates(log_probs.exp(), x_t, alpha, rate)
        tiny = torch.finfo(rates_p.dtype).tiny
        terms = torch.special.xlogy(rates_q, rates_q) - torch.special.xlogy(rates_q, rates_p.clamp_min(tiny))
        terms = terms - rates_q + rates_p
        return terms.scatter(-1, x_t.unsqueeze(-1), 0.0).sum(-1)

    def _uniform_jump_rates(self, x0_probs, x_t, alpha, rate) -> torch.Tensor:
        """R(y) = r [alpha p_hat(y) / (1 - alpha) + (1 - alpha) u^2 S], r = -alpha'/alpha, for y != x_t."""
        dtype = x0_probs.dtype
        u = 1.0 / self.vocab_size
        alpha = alpha.to(dtype).view(-1, 1, 1)
        hazard = (rate.to(dtype).view(-1, 1, 1) / alpha.clamp_min(torch.finfo(dtype).tiny))
        one_minus = (1 - alpha).clamp_min(torch.finfo(dtype).tiny)
        p_z = x0_probs.gather(-1, x_t.unsqueeze(-1))
        u2_s = u * u * p_z / (alpha + one_minus * u) + u * (1 - p_z) / one_minus
        return hazard * (alpha * x0_probs / one_minus + one_minus * u2_s)


def clean_and_scored(input_ids: torch.Tensor, labels: torch.Tensor | None,
                     attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_0, scored) from a batch: labels give the clean ids to score (-100: not scored, keep `input_ids`
    there as conditioning); padding (`attention_mask` 0) is never scored."""
    if labels is not None and labels.shape != input_ids.shape:
        raise ValueError(f"`labels` shape {tuple(labels.shape)} does not match `input_ids` {tuple(input_ids.shape)}.")
    scored = torch.ones_like(input_ids, dtype=torch.bool) if labels is None else labels != -100
    if attention_mask is not None:
        scored = scored & attention_mask.bool()
    x0 = input_ids if labels is None else torch.where(scored, labels, input_ids)
    return x0, scored


def training_loss(process, denoise, x0: torch.Tensor, scored: torch.Tensor,
                  generator: torch.Generator | None = None):
    """One training draw: corrupt the scored positions at stratified noise levels, denoise, and return
    `(loss per scored token, logits, x_t, t)`. `denoise(x_t, t)` returns the model's logits."""
    draw = process.draw_noise(x0.shape[0], generator=generator, device=x0.device)
    noisy = process.corrupt(x0, process.schedule.alpha(draw.t), corruptible=scored, generator=generator)
    logits = denoise(noisy, draw.t)
    terms = process.loss_terms(logits, x0, noisy, draw)
    loss = (terms * scored).sum() / scored.sum().clamp_min(1)
    return loss, logits, noisy, draw.t


def monte_carlo_nelbo(process, denoise, x0: torch.Tensor, scored: torch.Tensor, num_samples: int,
                      generator: torch.Generator | None = None,
                      exact_reconstruction: bool = False) -> torch.Tensor:
    """(B, num_samples) single-draw NELBO estimates of each sequence, in nats, for any denoiser.

    The draws of each row are stratified over [0, 1): draw k uses u = (k + U) / num_samples.

    Args:
        process: a `DiscreteDiffusion` (or anything with its `schedule`, `draw_noise`, `corrupt`, `loss_terms`).
        denoise: callable `(x_t, t) -> logits` of the model.
        x0: (B, L) clean ids. scored: (B, L) bool, the positions whose likelihood is measured; the others
            stay clean and condition the prediction.
        exact_reconstruction: add the continuous-time uniform NELBO's t = 0 term -log p_hat(x_0 | x_0)
            computed exactly (one extra pass) instead of drawing it.
    """
    batch = x0.shape[0]
    offset = torch.rand(batch, generator=generator, dtype=torch.float64,
                        device=generator.device if generator is not None else "cpu")
    samples = []
    for k in range(num_samples):
        u = ((k + offset) / num_samples).clamp(max=1 - 1e-12)
        draw = process.draw_noise(batch, device=x0.device, u=u, reconstruction_probability=0.0)
        noisy = process.corrupt(x0, process.schedule.alpha(draw.t), corruptible=scored, generator=generator)
        terms = process.loss_terms(denoise(noisy, draw.t), x0, noisy, draw)
        samples.append((terms.double() * scored).sum(-1))
    samples = torch.stack(samples, dim=-1)
    if exact_reconstruction:
        log_probs = denoise(x0, torch.zeros(batch, device=x0.device)).double().log_softmax(-1)
        recon = -(log_probs.gather(-1, x0.unsqueeze(-1)).squeeze(-1) * scored).sum(-1)
        samples = samples + recon.unsqueeze(-1)
    return samples


__all__ = ["DiscreteDiffusion", "clean_and_scored", "monte_carlo_nelbo", "training_loss", "NoiseDraw", "NoiseSchedule", "RECONSTRUCTION_DRAW_PROBABILITY"]
