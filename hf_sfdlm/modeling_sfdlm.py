"""SFDLM: a U-Net of attention-free blocks `x + SSM(x) + FourierMLP(x)` that denoises token sequences.

Layers, bottom up:
  BidirectionalDiagonalSSM  S4D kernel K_n = C A^n B for the actual length, forward and reversed,
                            applied as one zero-padded FFT convolution (local-to-mid range mixing)
  DepthwiseConvMixer        the short centred convolution of the paper's reference code (option)
  ComplexFourierMLP         rFFT over the sequence, MLP on [Re, Im], irFFT (global mixing; paper Eq. 8-10)
  SFDLMBlock                X + gate * SSM(h) + gate * Fourier(h), h = adaLN(X, t) (paper Eq. 11)
  SFDLMModel                embedding, noise-level embedding, U-Net with pooling and skips, final norm
  SFDLMForDiffusionLM       tied head predicting p_hat(x_0 | x_t); `forward(labels=...)` returns the NELBO

This file is "remote code": it imports only torch, transformers and its sibling files.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from . import block_diffusion
from .block_diffusion import BlockContext  # noqa: F401  (save_pretrained copies the files of `from .x import` lines)
from .generation_block import generate_blocks  # noqa: F401  (block mode's `generate`, called by generation_sfdlm)
from .configuration_sfdlm import SFDLMConfig
from .diffusion_lm import DiffusionLMMixin, DiffusionLMOutput, check_inputs
from .generation_sfdlm import SFDLMGenerationMixin

# transformers 5.0 copies into its module cache only the files that the modeling file itself imports (later
# versions follow imports transitively): every remote-code module is imported here directly.
from .diffusion import DiscreteDiffusion  # noqa: F401
from .sampling_sfdlm import Sampler  # noqa: F401
from .score_entropy import ScoreEntropy  # noqa: F401


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype FFT-side arithmetic runs in: float32 for half-precision inputs, float64 kept as float64
    (so a `.double()` model is exact to float64 rounding, which block-causality and equivalence tests use)."""
    return torch.promote_types(x.dtype, torch.float32)


def _fft_precision(x: torch.Tensor):
    """FFTs run in float32 even under bf16/fp16 autocast (cuFFT half precision is limited and lossy)."""
    if not torch.amp.is_autocast_available(x.device.type):  # e.g. "meta", as FLOP counters use
        return contextlib.nullcontext()
    return torch.autocast(device_type=x.device.type, enabled=False)


def fast_fft_size(minimum: int) -> int:
    """Smallest n >= minimum whose only prime factors are 2, 3 and 5 (where FFTs are fastest)."""
    n = minimum
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


class _FFTConvolution(torch.autograd.Function):
    """y = irfft(rfft(u, n) * spectrum)[..., :L]: linear convolution of u (B, H, L) with the real circular
    kernel k (H, n), n >= 2L - 1, along the last dimension, given k and its rFFT `spectrum` (H, n // 2 + 1)
    (the caller has it, often cached). Saves u and the spectrum for the backward pass rather than
    autograd's complex rfft(u) (twice u's size), and recomputes rfft(u) there; k is used only for its
    gradient (no gradient flows into `spectrum`)."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, kernel: torch.Tensor, spectrum: torch.Tensor) -> torch.Tensor:
        ctx.n = kernel.shape[-1]
        ctx.save_for_backward(u, spectrum)
        return _convolve(u, spectrum, ctx.n)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        u, spectrum = ctx.saved_tensors
        n, length = ctx.n, u.shape[-1]
        grad_spectrum = torch.fft.rfft(grad, n=n)
        grad_u = grad_kernel = None
        if ctx.needs_input_grad[0]:  # the adjoint of a convolution is a correlation: conj(spectrum)
            grad_u = torch.fft.irfft(grad_spectrum * spectrum.conj(), n=n)[..., :length]
        if ctx.needs_input_grad[1]:  # dL/dk[p] = sum_t g[t] u[t - p]: a correlation, summed over the batch
            correlation = (grad_spectrum * torch.fft.rfft(u, n=n).conj()).sum(0)
            grad_kernel = torch.fft.irfft(correlation, n=n)
        return grad_u, grad_kernel, None


def _convolve(u: torch.Tensor, spectrum: torch.Tensor, n: int) -> torch.Tensor:
    return torch.fft.irfft(torch.fft.rfft(u, n=n) * spectrum, n=n)[..., : u.shape[-1]]


def _split(length: int) -> tuple[int, int]:
    """(M, Q): l = q M + r with r < M ~ sqrt(length), q < Q, Q M >= length."""
    block = math.isqrt(length - 1) + 1
    return block, -(-length // block)


def _powers(x_re: torch.Tensor, x_im: torch.Tensor, exponents: torch.Tensor):
    """exp(x e) for e in `exponents` as (re, im) tensors; x_re and x_im broadcast against `exponents`."""
    magnitude, angle = torch.exp(x_re * exponents), x_im * exponents
    return magnitude * angle.cos(), magnitude * angle.sin()


def _powers_into(out: torch.Tensor, x_re: torch.Tensor, x_im: torch.Tensor, exponents: torch.Tensor, dim: int):
    """exp(x e) for e in `exponents`, written as (re, im) into out.select(dim, 0 / 1). x_re and x_im must
    already broadcast against `exponents` to the shape of one part."""
    angle = x_im * exponents
    torch.cos(angle, out=out.select(dim, 0))
    torch.sin(angle, out=out.select(dim, 1))
    out.mul_(torch.exp(x_re * exponents).unsqueeze(dim))
    return out


class _VandermondeKernel(torch.autograd.Function):
    """K[d, h, l] = Re(sum_n w[d, h, n] z[h, n]^l), z = exp(x), l = 0..L-1, with a hand-written backward.

    Forward: writing l = q M + r (M ~ sqrt L), the sum over modes is one real batched matmul of
    [Re, -Im](w z^(qM)) (2Q x 2N) by [Re; Im](z^r) (2N x M) per channel, both factors written in place in the
    layout the matmul reads. Backward, for G = dLoss/dK: with S = sum_l G_l z^l, grad Re w = Re S and
    grad Im w = -Im S; since d z^l / dx = l z^l, with T = sum_l l G_l z^l, grad Re x = Re sum_d w T and
    grad Im x = -Im sum_d w T. Both sums by the same split, sum_q z^(qM) sum_r G[qM + r] (qM + r) z^r: one
    batched matmul, then products with z^(qM) summed over q. Only the (H, N) inputs are saved; the
    (H, N, sqrt L) tables are rebuilt, where autograd through elementwise ops would keep a dozen of them
    (or, checkpointed, run every op twice)."""

    @staticmethod
    def forward(ctx, x_re, x_im, w_re, w_im, length: int):
        ctx.length = length
        ctx.save_for_backward(x_re, x_im, w_re, w_im)
        (hidden, modes), (block, blocks) = x_re.shape, _split(length)
        lags = torch.arange(block, device=x_re.device, dtype=x_re.dtype)
        starts = block * torch.arange(blocks, device=x_re.device, dtype=x_re.dtype)
        right = _powers_into(x_re.new_empty(hidden, 2, modes, block), x_re.unsqueeze(-1), x_im.unsqueeze(-1), lags, 1)
        high = _powers_into(x_re.new_empty(2, hidden, modes, blocks), x_re.unsqueeze(-1), x_im.unsqueeze(-1), starts, 0)
        # left[h, d, q, (re, -im), n] = (Re, -Im) of w[d, h, n] z[h, n]^(qM), written through (d, h, n, q) views
        left = x_re.new_empty(hidden, 2, blocks, 2, modes)
        real, minus_imag = (left.select(3, part).permute(1, 0, 3, 2) for part in (0, 1))
        w_re, w_im = w_re.unsqueeze(-1), w_im.unsqueeze(-1)
        torch.mul(w_re, high[0], out=real).addcmul_(w_im, high[1], value=-1)
        torch.mul(w_re, high[1], out=minus_imag).addcmul_(w_im, high[0]).neg_()
        kernel = torch.bmm(left.view(hidden, 2 * blocks, 2 * modes), right.view(hidden, 2 * modes, block))
        return kernel.view(hidden, 2, blocks * block)[..., :length].transpose(0, 1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        with _fft_precision(grad):  # float32 tables and matmul even if backward() runs under autocast
            return _VandermondeKernel._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad: torch.Tensor):
        x_re, x_im, w_re, w_im = ctx.saved_tensors
        length, (hidden, modes) = ctx.length, x_re.shape
        block, blocks = _split(length)
        lags = torch.arange(block, device=grad.device, dtype=grad.dtype)
        starts = block * torch.arange(blocks, device=grad.device, dtype=grad.dtype)
        # Contiguous (.., N) blocks side by side: strided writes with 16-long rows are several times slower.
        low_re, low_im = _powers(x_re.unsqueeze(1), x_im.unsqueeze(1), lags.unsqueeze(-1))  # z^r: (H, M, N)
        lag = lags.unsqueeze(-1)
        right = torch.cat([low_re, low_re * lag, low_im, low_im * lag], dim=-1)  # (H, M, 4N)
        grid = grad.new_zeros(hidden, 2, blocks * block)  # G zero-padded to QM, read as (H, 2Q, M)
        grid[..., :length] = grad.transpose(0, 1)
        sums = torch.bmm(grid.view(hidden, 2 * blocks, block), right)
        # (H, 2, Q, [re, im], [U, V], N): U = sum_r G z^r, V = sum_r r G z^r
        sums = sums.view(hidden, 2, blocks, 2, 2, modes)
        sums[:, :, :, :, 1].addcmul_(sums[:, :, :, :, 0], starts.view(blocks, 1, 1))  # V += qM U
        high_re, high_im = _powers(x_re.unsqueeze(1), x_im.unsqueeze(1), starts.unsqueeze(-1))  # z^(qM): (H, Q, N)
        high_re, high_im = (torch.cat([h, h], dim=-1).unsqueeze(1) for h in (high_re, high_im))  # (H, 1, Q, 2N)
        real, imag = sums.flatten(4).unbind(3)  # (H, 2, Q, 2N)
        total_re = (real * high_re).addcmul_(imag, high_im, value=-1).sum(2).view(hidden, 2, 2, modes)
        total_im = (real * high_im).addcmul_(imag, high_re).sum(2).view(hidden, 2, 2, modes)  # (H, 2, [S, T], N)
        s_re, s_im = total_re[:, :, 0].transpose(0, 1), total_im[:, :, 0].transpose(0, 1)  # (2, H, N)
        t_re, t_im = total_re[:, :, 1].transpose(0, 1), total_im[:, :, 1].transpose(0, 1)
        grad_x_re = (w_re * t_re - w_im * t_im).sum(0)
        grad_x_im = -(w_re * t_im + w_im * t_re).sum(0)
        return grad_x_re, grad_x_im, s_re, -s_im, None


def _vandermonde_by_autograd(x_re, x_im, w_re, w_im, length: int) -> torch.Tensor:
    """`_VandermondeKernel` in plain differentiable ops (what `torch.compile` traces): the same split
    l = q M + r and batched matmul, with autograd's backward."""
    (hidden, modes), (block, blocks) = x_re.shape, _split(length)
    lags = torch.arange(block, device=x_re.device, dtype=x_re.dtype)
    starts = block * torch.arange(blocks, device=x_re.device, dtype=x_re.dtype)
    low_re, low_im = _powers(x_re.unsqueeze(-1), x_im.unsqueeze(-1), lags)  # z^r: (H, N, M)
    high_re, high_im = _powers(x_re.unsqueeze(-1), x_im.unsqueeze(-1), starts)  # z^(qM): (H, N, Q)
    p_re = w_re.unsqueeze(-1) * high_re - w_im.unsqueeze(-1) * high_im  # w z^(qM): (2, H, N, Q)
    p_im = w_re.unsqueeze(-1) * high_im + w_im.unsqueeze(-1) * high_re
    left = torch.cat([p_re, -p_im], dim=2).permute(1, 0, 3, 2).reshape(hidden, 2 * blocks, 2 * modes)
    right = torch.cat([low_re, low_im], dim=1)  # (H, 2N, M)
    kernel = torch.bmm(left, right).view(hidden, 2, blocks * block)[..., :length]
    return kernel.transpose(0, 1)


class _KernelRecomputedInBackward(torch.autograd.Function):
    """Stands for `ssm.two_sided_kernel(length)` in this call's graph when its spectrum came from the cache:
    the forward pass returns `stand_in` (the shape only; `_FFTConvolution` reads the cached spectrum), the
    backward pass rebuilds the kernel with autograd and back-propagates into the parameters, so no cached
    tensor ever carries (or reuses) a graph of an earlier call."""

    @staticmethod
    def forward(ctx, ssm, length: int, stand_in: torch.Tensor, *parameters: torch.Tensor) -> torch.Tensor:
        ctx.ssm, ctx.length = ssm, length
        ctx.save_for_backward(*parameters)  # autograd then refuses a backward after an in-place update
        return stand_in.view_as(stand_in)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        parameters, length, ssm = ctx.saved_tensors, ctx.length, ctx.ssm
        with _fft_precision(grad):  # as the forward pass built it: float32
            # Only the (H, N) factors are rebuilt with autograd; the (H, N, sqrt L) part goes straight to
            # `_VandermondeKernel`'s hand-written backward, which needs no forward tables.
            with torch.enable_grad():
                factors = ssm.kernel_factors()
            grad = grad.to(factors[0].dtype)
            n = grad.shape[-1]
            grad_kernel = grad.new_empty(2, ssm.hidden_size, length)  # the two-sided layout, undone
            grad_kernel[0] = grad[:, :length]
            grad_kernel[1, :, 0] = grad[:, 0]
            grad_kernel[1, :, 1:] = grad[:, n - length + 1:].flip(-1)
            saved = _SavedFactors(tuple(f.detach() for f in factors), length)
            grad_factors = _VandermondeKernel._backward(saved, grad_kernel)[:4]
        needs = ctx.needs_input_grad[3:]  # log_dt, log_neg_a_real, a_imag, c, d
        wanted = [p for p, needed in zip(parameters[:4], needs[:4]) if needed]
        grads = iter(torch.autograd.grad(factors, wanted, grad_factors, allow_unused=True) if wanted else ())
        grad_d = grad[:, 0].to(parameters[4].dtype) if needs[4] else None  # d adds to the lag-0 entry
        return None, None, None, *(next(grads) if needed else None for needed in needs[:4]), grad_d


class _SavedFactors:
    """What `_VandermondeKernel._backward` reads from its context: the (H, N) inputs and the length."""

    def __init__(self, saved_tensors: tuple, length: int):
        self.saved_tensors, self.length = saved_tensors, length


# Under autograd the SSM keeps its kernel spectrum across calls only up to this size (4 MiB: L <= 2K at width 256).
_TRAINING_CACHE_MAX_BYTES = 4 * 2**20


class BidirectionalDiagonalSSM(nn.Module):
    """Per-channel diagonal state-space model run in both directions (S4D-Lin initialisation).

    For channel h: z_{n+1} = A z_n + B u_n, y_n = C z_n, with A diagonal complex. Unrolled, this is a
    convolution with kernel K_n = Re(C dA^n dB) computed for any length in O(N L). A forward and a
    reversed kernel (own C each, shared A and dt) and the skip D make one two-sided kernel with lags
    -(L-1)..L-1, applied by an FFT of a fast size n >= 2L - 1 so the convolution is linear, not circular.
    """

    def __init__(self, hidden_size: int, state_size: int, dt_min: float, dt_max: float):
        super().__init__()
        self.hidden_size, self.num_modes = hidden_size, state_size // 2
        self.dt_min, self.dt_max = dt_min, dt_max
        self.log_dt = nn.Parameter(torch.empty(hidden_size))
        self.log_neg_a_real = nn.Parameter(torch.empty(hidden_size, self.num_modes))
        self.a_imag = nn.Parameter(torch.empty(hidden_size, self.num_modes))
        # (direction, channel, mode, [re, im]) for forward and backward output matrices C.
        self.c = nn.Parameter(torch.empty(2, hidden_size, self.num_modes, 2))
        self.d = nn.Parameter(torch.empty(hidden_size))
        self._spectrum_cache: tuple | None = None  # (key, parameter snapshot, spectrum)

    def reset_parameters(self) -> None:
        log_dt = torch.rand(self.hidden_size) * (math.log(self.dt_max) - math.log(self.dt_min)) + math.log(self.dt_min)
        init.copy_(self.log_dt, log_dt)
        init.copy_(self.log_neg_a_real, torch.full((self.hidden_size, self.num_modes), math.log(0.5)))
        init.copy_(self.a_imag, math.pi * torch.arange(self.num_modes).float().expand(self.hidden_size, -1))
        init.normal_(self.c, std=0.5**0.5)
        init.normal_(self.d, std=1.0)

    def kernel_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Re, Im) of dt * a (H, N) and of 2 C dB (2, H, N): K_l = Re(sum_n 2 C dB exp(dt a)^l)."""
        dtype = _compute_dtype(self.log_dt)
        dt = self.log_dt.to(dtype).exp().unsqueeze(-1)  # (H, 1)
        a_re, a_im = -self.log_neg_a_real.to(dtype).exp(), self.a_imag.to(dtype)  # (H, N)
        x_re, x_im = a_re * dt, a_im * dt  # dt * a
        # dB = (exp(dt a) - 1) / a (B = 1), then 2 C dB, all as (re, im) pairs
        decay = x_re.exp()
        num_re, num_im = decay * x_im.cos() - 1, decay * x_im.sin()
        norm = a_re.square() + a_im.square()
        db_re, db_im = (num_re * a_re + num_im * a_im) / norm, (num_im * a_re - num_re * a_im) / norm
        c_re, c_im = 2 * self.c[..., 0].to(dtype), 2 * self.c[..., 1].to(dtype)  # (2, H, N)
        cb_re, cb_im = c_re * db_re - c_im * db_im, c_re * db_im + c_im * db_re
        return x_re, x_im, cb_re, cb_im

    def kernel(self, length: int) -> torch.Tensor:
        """(2, H, L) forward and backward kernels K_l = 2 Re(sum_n C_n dB_n dA_n^l), l = 0..L-1.

        The (H, N) quantities (dA = exp(dt a), 2 C dB) go through autograd; the (H, N, sqrt L) part runs in
        `_VandermondeKernel`, real arithmetic with a hand-written backward.
        """
        x_re, x_im, cb_re, cb_im = self.kernel_factors()
        if torch.compiler.is_compiling():  # in-place writes into strided views would break the graph
            return _vandermonde_by_autograd(x_re, x_im, cb_re, cb_im, length)
        return _VandermondeKernel.apply(x_re, x_im, cb_re, cb_im, length)

    def two_sided_kernel(self, length: int) -> torch.Tensor:
        """(H, n) circular kernel for an FFT of size n: lag 0 (both directions and D), lags 1..L-1 forward
        at the start, lags -(L-1)..-1 backward at the end, zeros between."""
        n = fast_fft_size(2 * length - 1)
        k_fwd, k_bwd = self.kernel(length)
        parts = [k_fwd[:, :1] + k_bwd[:, :1] + self.d.to(k_fwd.dtype).unsqueeze(-1), k_fwd[:, 1:],
                 k_fwd.new_zeros(self.hidden_size, n - 2 * length + 1), k_bwd[:, 1:].flip(-1)]
        return torch.cat(parts, dim=-1)

    def kernel_spectrum(self, length: int) -> torch.Tensor:
        """rFFT (size n) of the two-sided kernel, (H, n // 2 + 1), from the cache while the parameters are
        unchanged (see `_kernel_and_spectrum`); no gradient flows through it."""
        return self._kernel_and_spectrum(length, with_graph=False)[1]

    def _ssm_parameters(self) -> tuple[torch.Tensor, ...]:
        return self.log_dt, self.log_neg_a_real, self.a_imag, self.c, self.d

    def _cache_key(self, length: int) -> tuple:
        return (length, tuple((id(p), p._version, p.data_ptr(), p.dtype, p.device) for p in self._ssm_parameters()))

    def _cached(self, length: int, with_graph: bool) -> torch.Tensor | None:
        """The kernel spectrum cached for `length`, or None when any parameter may have changed since.

        Every autograd-visible in-place update (optimiser steps, `load_state_dict`, `torch.no_grad()` edits)
        bumps a parameter's version, which the key holds with the storage address. On CPU the values are also
        compared with a snapshot (a few thousand numbers), so even writes through `.data` (which bump no
        version) are seen. On accelerators that comparison would synchronise the device on every call, so
        there only calls without autograd (sampling, evaluation) reuse the cache, on the key alone; training
        there always rebuilds the kernel (sharded or offloaded training may rewrite parameter storage in
        place without a version bump, and a stale kernel would silently corrupt the gradients).
        """
        cache = self._spectrum_cache
        if cache is None or torch.compiler.is_compiling() or cache[0] != self._cache_key(length):
            return None
        _, snapshot, spectrum = cache
        if with_graph and spectrum.is_inference():  # made under inference_mode: cannot join a graph
            return None
        if self.log_dt.device.type != "cpu":
            return None if with_graph else spectrum
        if not all(torch.equal(p, s) for p, s in zip(self._ssm_parameters(), snapshot)):
            return None
        return spectrum

    def _kernel_and_spectrum(self, length: int, with_graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The two-sided kernel (H, n) and its rFFT; the spectrum is reused across calls while the parameters
        are unchanged (gradient accumulation, checkpointed recomputation, every step of `generate`).

        With `with_graph` the kernel is a node of this call's autograd graph as `_KernelRecomputedInBackward`,
        which rebuilds it only in the backward pass, on a cache hit and on a miss alike: the forward pass then
        saves the same tensors whether or not the cache served it, which activation checkpointing requires
        (its recomputation may hit the cache that the original forward pass filled). Under
        `torch.compile` the kernel is built with autograd in the traced graph and nothing is cached. The
        spectrum never carries a graph (`_FFTConvolution` sends the gradient through the kernel). Without a
        graph the kernel is a stand-in of the right shape (zero strides, no memory). Under autograd a
        spectrum is kept only up to `_TRAINING_CACHE_MAX_BYTES`: at long lengths a kept spectrum per block
        would add to the memory that activation checkpointing saves, for a kernel that costs little next to
        the step.
        """
        if torch.compiler.is_compiling():  # the key's versions would be guards (recompiles)
            kernel = self.two_sided_kernel(length)
            return kernel, torch.fft.rfft(kernel.detach())
        spectrum = self._cached(length, with_graph)
        if spectrum is None:
            with torch.no_grad():
                spectrum = torch.fft.rfft(self.two_sided_kernel(length))
            keep = not with_graph or spectrum.numel() * spectrum.element_size() <= _TRAINING_CACHE_MAX_BYTES
            if keep:
                snapshot = tuple(p.detach().clone() for p in self._ssm_parameters())
                self._spectrum_cache = (self._cache_key(length), snapshot, spectrum)
            else:
                self._spectrum_cache = None
        stand_in = self.log_dt.new_zeros((), dtype=_compute_dtype(self.log_dt))
        stand_in = stand_in.expand(self.hidden_size, fast_fft_size(2 * length - 1))
        if with_graph:
            return _KernelRecomputedInBackward.apply(self, length, stand_in, *self._ssm_parameters()), spectrum
        return stand_in, spectrum

    def forward(self, u: torch.Tensor, *, block_context=None) -> torch.Tensor:
        """u: (B, L, H) -> (B, L, H). In block mode `block_context(self, u)` adds the earlier blocks' term."""
        length = u.shape[1]
        with_graph = torch.is_grad_enabled() and any(p.requires_grad for p in self._ssm_parameters())
        with _fft_precision(u):
            x = u.to(_compute_dtype(u)).transpose(1, 2)  # (B, H, L): FFTs and products run along contiguous memory
            kernel, spectrum = self._kernel_and_spectrum(length, with_graph)
            if torch.is_grad_enabled() and (with_graph or x.requires_grad):
                y = _FFTConvolution.apply(x, kernel, spectrum)
            else:
                y = _convolve(x, spectrum, kernel.shape[-1])
        y = y.transpose(1, 2).to(u.dtype)
        return y if block_context is None else y + block_context(self, u)


class DepthwiseConvMixer(nn.Module):
    """Centred depthwise convolution: the short-range fallback of the paper's reference implementation."""

    def __init__(self, hidden_size: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv1d(hidden_size, hidden_size, kernel_size, padding=kernel_size // 2, groups=hidden_size)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.conv(u.transpose(1, 2)).transpose(1, 2)


class SequenceMixerBranch(nn.Module):
    """The f_SSM branch: linear in, (SSM or convolution), GELU, linear out."""

    def __init__(self, config: SFDLMConfig):
        super().__init__()
        hidden = config.hidden_size
        self.in_proj = nn.Linear(hidden, hidden)
        if config.ssm_mode == "diagonal":
            self.mixer = BidirectionalDiagonalSSM(hidden, config.ssm_state_size, config.ssm_dt_min, config.ssm_dt_max)
        else:
            self.mixer = DepthwiseConvMixer(hidden, config.conv_kernel_size)
        self.out_proj = nn.Linear(hidden, hidden)

    def forward(self, h: torch.Tensor, *, block_context=None) -> torch.Tensor:
        u = self.in_proj(h)
        mixed = self.mixer(u) if block_context is None else self.mixer(u, block_context=block_context)
        return self.out_proj(F.gelu(mixed))


def _one_sided_weights(spectrum: torch.Tensor, length: int, interior: float) -> torch.Tensor:
    """Scale the bins that a one-sided spectrum of a real length-`length` signal stands for twice (all but
    DC and, for even lengths, Nyquist) by `interior`, along dim 1, in place."""
    last = spectrum.shape[1] - (1 if length % 2 == 0 else 0)
    spectrum[:, 1:last] *= interior
    return spectrum


class _SpectrumFeatures(torch.autograd.Function):
    """[Re, Im] of the orthonormal rFFT along dim 1: (B, L, H) -> (B, L // 2 + 1, 2H).

    Its backward is an irFFT of half the size (the adjoint of the one-sided DFT: halve the bins irFFT
    counts twice), where autograd's rFFT backward runs a full-size complex FFT."""

    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:
        ctx.length = h.shape[1]
        spectrum = torch.fft.rfft(h, dim=1, norm="ortho")
        return torch.cat([spectrum.real, spectrum.imag], dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        real, imag = grad.chunk(2, dim=-1)
        spectrum = _one_sided_weights(torch.complex(real, imag), ctx.length, 0.5)
        return torch.fft.irfft(spectrum, n=ctx.length, dim=1, norm="ortho")


class _SignalFromFeatures(torch.autograd.Function):
    """Inverse of `_SpectrumFeatures`: (B, F, 2H) [Re, Im] -> orthonormal irFFT (B, L, H) along dim 1.
    Its backward is the rFFT with the twice-counted bins doubled."""

    @staticmethod
    def forward(ctx, features: torch.Tensor, length: int) -> torch.Tensor:
        ctx.length = length
        real, imag = features.chunk(2, dim=-1)
        return torch.fft.irfft(torch.complex(real, imag), n=length, dim=1, norm="ortho")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        spectrum = _one_sided_weights(torch.fft.rfft(grad, dim=1, norm="ortho"), ctx.length, 2.0)
        return torch.cat([spectrum.real, spectrum.imag], dim=-1), None


class ComplexFourierMLP(nn.Module):
    """The f_Fourier branch (paper Eq. 8-10): rFFT along the sequence, an MLP on the concatenated
    real and imaginary parts of each frequency, back to complex, irFFT to the original length."""

    def __init__(self, config: SFDLMConfig):
        super().__init__()
        hidden = config.hidden_size
        self.fc_in = nn.Linear(2 * hidden, config.fourier_intermediate_size)
        self.fc_out = nn.Linear(config.fourier_intermediate_size, 2 * hidden)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        length = h.shape[1]
        with _fft_precision(h):
            features = _SpectrumFeatures.apply(h.to(_compute_dtype(h))).to(h.dtype)  # (B, L//2 + 1, 2H)
        features = self.fc_out(F.gelu(self.fc_in(features)))
        with _fft_precision(h):
            out = _SignalFromFeatures.apply(features.to(_compute_dtype(features)), length)
        return out.to(h.dtype)


class AdaptiveLayerNorm(nn.Module):
    """LayerNorm followed by a noise-conditioned shift and scale, plus `num_gates` gates (adaLN-Zero).

    Without conditioning (`cond_size=None`) it is an affine LayerNorm and every gate is 1.
    """

    def __init__(self, hidden_size: int, cond_size: int | None, num_gates: int, eps: float):
        super().__init__()
        self.num_gates = num_gates
        self.norm = nn.LayerNorm(hidden_size, eps=eps, elementwise_affine=cond_size is None)
        self.modulation = nn.Linear(cond_size, (2 + num_gates) * hidden_size) if cond_size else None

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None) -> tuple[torch.Tensor, list]:
        h = self.norm(x)
        if self.modulation is None:
            return h, [1.0] * self.num_gates
        shift, scale, *gates = self.modulation(cond).unsqueeze(1).chunk(2 + self.num_gates, dim=-1)
        return h * (1 + scale) + shift, gates


class SFDLMBlock(GradientCheckpointingLayer):
    """X_out = X + gate_ssm * SSM(h) + gate_fourier * Fourier(h), with h = adaLN(X, t) (paper Eq. 11)."""

    def __init__(self, config: SFDLMConfig):
        super().__init__()
        cond = config.hidden_size if config.time_conditioning else None
        self.norm = AdaptiveLayerNorm(config.hidden_size, cond, num_gates=2, eps=config.layer_norm_eps)
        # Ablations (`use_ssm` / `use_fourier_mlp` False) drop a branch entirely.
        self.ssm = SequenceMixerBranch(config) if getattr(config, "use_ssm", True) else None
        self.fourier = ComplexFourierMLP(config) if getattr(config, "use_fourier_mlp", True) else None
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None, *, block_context=None) -> torch.Tensor:
        h, (gate_ssm, gate_fourier) = self.norm(x, cond)
        out = x
        if self.ssm is not None:
            out = out + gate_ssm * self.dropout(self.ssm(h, block_context=block_context))
        if self.fourier is not None:
            out = out + gate_fourier * self.dropout(self.fourier(h))
        return out


class DownPool(nn.Module):
    """Shorten the sequence k-fold: stack k neighbours and project back to the width (SaShiMi)."""

    def __init__(self, hidden_size: int, factor: int):
        super().__init__()
        self.factor = factor
        self.proj = nn.Linear(hidden_size * factor, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = x.shape
        padded = -(-length // self.factor) * self.factor  # lengths the factor does not divide: zero-pad
        x = F.pad(x, (0, 0, 0, padded - length))
        return self.proj(x.reshape(batch, padded // self.factor, self.factor * hidden))


class UpPool(nn.Module):
    """Undo `DownPool`: project each position to k positions and crop to the original length."""

    def __init__(self, hidden_size: int, factor: int):
        super().__init__()
        self.factor = factor
        self.proj = nn.Linear(hidden_size, hidden_size * factor)

    def forward(self, x: torch.Tensor, length: int) -> torch.Tensor:
        batch, short, hidden = x.shape
        return self.proj(x).reshape(batch, short * self.factor, hidden)[:, :length]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal features of the noise level t in [0, 1] (scaled by 1000, as in DiT), shape (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = 1000.0 * t.float().unsqueeze(-1) * freqs
    embedding = torch.cat([angles.cos(), angles.sin()], dim=-1)
    return F.pad(embedding, (0, dim % 2))


@dataclass
class SFDLMModelOutput(ModelOutput):
    """Output of `SFDLMModel`.

    Args:
        last_hidden_state: (B, L, H) hidden states after the final norm; zeros at padded positions.
        hidden_states: with `output_hidden_states=True`, the output of every U-Net stage: the embeddings,
            each down stage (before its pooling), the bottleneck, each up stage (after its skip and
            blocks), the last one after the final norm (so `hidden_states[-1]` is `last_hidden_state`).
            Pooled stages are shorter: (B, ceil(L / product of the pooling factors so far), H). With
            padding, full-length stages sit at the real positions like `last_hidden_state`; a pooled
            stage holds each row's own pooled sequence from position 0, zeros after it.
    """

    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


# Output of `SFDLMForDiffusionLM` (loss, logits, noisy_input_ids, timesteps): the shared head's.
SFDLMDiffusionLMOutput = DiffusionLMOutput


class SFDLMPreTrainedModel(PreTrainedModel):
    config_class = SFDLMConfig
    config: SFDLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["SFDLMBlock"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, std=std)
        elif isinstance(module, nn.LayerNorm) and module.weight is not None:
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Conv1d):
            init.normal_(module.weight, std=(1.0 / module.kernel_size[0]) ** 0.5)
            init.zeros_(module.bias)
        elif isinstance(module, BidirectionalDiagonalSSM):
            module.reset_parameters()
        if isinstance(module, AdaptiveLayerNorm) and module.modulation is not None:
            # adaLN-Zero: every block starts as the identity, its gates open during training.
            init.zeros_(module.modulation.weight)
            init.zeros_(module.modulation.bias)


class SFDLMModel(SFDLMPreTrainedModel):
    """The SFDLM backbone: token ids (and noise levels) to hidden states. No attention anywhere."""

    def __init__(self, config: SFDLMConfig):
        super().__init__(config)
        hidden = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, hidden)
        self.time_embed = (
            nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
            if config.time_conditioning else None
        )
        *down_depths, bottleneck_depth = config.stage_depths
        self.down_stages = nn.ModuleList(
            nn.ModuleList(SFDLMBlock(config) for _ in range(depth)) for depth in down_depths
        )
        self.down_pools = nn.ModuleList(DownPool(hidden, f) for f in config.pool_factors)
        self.bottleneck = nn.ModuleList(SFDLMBlock(config) for _ in range(bottleneck_depth))
        self.up_pools = nn.ModuleList(UpPool(hidden, f) for f in config.pool_factors)
        self.up_stages = nn.ModuleList(
            nn.ModuleList(SFDLMBlock(config) for _ in range(depth)) for depth in down_depths
        )
        cond = hidden if config.time_conditioning else None
        self.final_norm = AdaptiveLayerNorm(hidden, cond, num_gates=0, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def check_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     timesteps: torch.Tensor | None = None) -> None:
        """Raise before any compute when ids, mask, noise levels or lengths are not what the model accepts."""
        check_inputs(self.config, input_ids, attention_mask, timesteps)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                timesteps: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None,
                clean_input_ids: torch.Tensor | None = None, **kwargs) -> SFDLMModelOutput | tuple:
        """
        Args:
            input_ids: (B, L) corrupted token ids x_t.
            attention_mask: (B, L), 1 for real tokens, 0 for padding (left, right or anywhere). Padding
                never changes the outputs at real positions: each row's real tokens are processed as a
                sequence of their own length (rows of equal length share one pass).
            timesteps: (B,) or scalar noise levels t in [0, 1]; required when `time_conditioning`.
            inputs_embeds: (B, L, H) input embeddings instead of `input_ids` (exactly one of the two).
            output_hidden_states: also return every stage's hidden states (see `SFDLMModelOutput`).
            return_dict: `False` returns the output's non-None fields as a tuple (default: `config.return_dict`).
            clean_input_ids: block mode (`config.block_size`) only: (B, L) clean ids that block j reads its
                earlier blocks from (default: `input_ids` itself); `timesteps` may then be (B, blocks).
        """
        output_hidden_states = bool(output_hidden_states if output_hidden_states is not None
                                    else self.config.output_hidden_states)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        block_mode = getattr(self.config, "block_size", None) is not None
        embeds = self._input_embeddings(input_ids, inputs_embeds, attention_mask, None if block_mode else timesteps)
        if block_mode:  # block diffusion: blocks see earlier blocks only through the forward SSM's state
            hidden, states = block_diffusion.block_causal_backbone(self, embeds, attention_mask, timesteps,
                                                                   output_hidden_states, clean_input_ids)
            output = SFDLMModelOutput(last_hidden_state=hidden, hidden_states=states)
            return output if return_dict else output.to_tuple()
        if clean_input_ids is not None:
            raise ValueError("`clean_input_ids` is for block mode only (`config.block_size` is None).")
        cond = self._noise_condition(timesteps, embeds.shape[0], embeds.device)
        if attention_mask is None or bool(attention_mask.all()):
            hidden, states = self._backbone(embeds, cond, output_hidden_states)
        else:
            hidden, states = self._backbone_by_length(embeds, attention_mask.bool(), cond, output_hidden_states)
        output = SFDLMModelOutput(last_hidden_state=hidden, hidden_states=states)
        return output if return_dict else output.to_tuple()

    def _input_embeddings(self, input_ids, inputs_embeds, attention_mask, timesteps) -> torch.Tensor:
        """Checked inputs, embedded: (B, L, H)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`.")
        if input_ids is not None:
            self.check_inputs(input_ids, attention_mask, timesteps)
            return self.embed_tokens(input_ids)
        expected = f"(batch, length, hidden_size={self.config.hidden_size})"
        if not isinstance(inputs_embeds, torch.Tensor) or not inputs_embeds.is_floating_point():
            raise TypeError(f"`inputs_embeds` must be a float tensor of shape {expected}, got "
                            f"{type(inputs_embeds).__name__} {getattr(inputs_embeds, 'dtype', '')}.")
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size or 0 in inputs_embeds.shape:
            raise ValueError(f"`inputs_embeds` must have shape {expected}, got {tuple(inputs_embeds.shape)}.")
        # The id-independent checks (length, mask, noise levels) on stand-in ids of the same shape.
        self.check_inputs(torch.zeros(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device),
                          attention_mask, timesteps)
        return inputs_embeds

    def _backbone_by_length(self, embeds, mask, cond, output_hidden_states: bool):
        """The backbone on each row's real positions only, rows of equal length in one pass."""
        lengths = mask.sum(-1)
        hidden = embeds.new_zeros(*embeds.shape[:2], self.config.hidden_size)
        states = None
        for length in lengths.unique().tolist():
            if length == 0:
                continue
            rows = (lengths == length).nonzero().squeeze(-1)
            out, row_states = self._backbone(embeds[rows][mask[rows]].view(len(rows), length, -1),
                                             None if cond is None else cond[rows], output_hidden_states)
            hidden[rows] = self._scatter_rows(hidden[rows], mask[rows], out)
            if row_states is not None:
                if states is None:
                    lengths_full = self._stage_lengths(embeds.shape[1])
                    states = [embeds.new_zeros(embeds.shape[0], n, self.config.hidden_size) for n in lengths_full]
                for state, row_state in zip(states, row_states):
                    if row_state.shape[1] == length:  # a full-length stage: back to the real positions
                        state[rows] = self._scatter_rows(state[rows], mask[rows], row_state)
                    else:  # a pooled stage: the row's own pooled sequence, from position 0
                        state[rows, :row_state.shape[1]] = row_state.to(state.dtype)
        return hidden, None if states is None else tuple(states)

    @staticmethod
    def _scatter_rows(target: torch.Tensor, mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        target[mask] = values.reshape(-1, values.shape[-1]).to(target.dtype)
        return target

    def _stage_lengths(self, length: int) -> list[int]:
        """Length of every entry of `hidden_states` for an input of `length` positions."""
        lengths, current = [length], length
        for pool in self.down_pools:
            lengths.append(current)
            current = -(-current // pool.factor)
        lengths.append(current)  # bottleneck
        lengths += lengths[1:len(self.down_pools) + 1][::-1]  # up stages, back to full length
        return lengths

    def _noise_condition(self, timesteps, batch_size: int, device) -> torch.Tensor | None:
        if self.time_embed is None:
            return None
        if timesteps is None:
            raise ValueError("This model is noise-conditioned (`time_conditioning=True`): pass `timesteps` "
                             "(the noise level t in [0, 1] of each row, a float or a (batch,) tensor).")
        t = torch.as_tensor(timesteps, device=device, dtype=torch.float32).reshape(-1).expand(batch_size)
        return self.time_embed(timestep_embedding(t, self.config.hidden_size).to(self.embed_tokens.weight.dtype))

    def _backbone(self, x: torch.Tensor, cond: torch.Tensor | None, output_hidden_states: bool = False, *,
                  block_context=None):
        """Embeddings (B, L, H) -> (final hidden states, every stage's output or None). In block mode the rows
        are blocks and `block_context` (`block_diffusion.BlockContext`) adds the earlier blocks' SSM term."""
        states = [x] if output_hidden_states else None
        record = states.append if states is not None else (lambda _: None)
        skips = []
        for blocks, pool in zip(self.down_stages, self.down_pools):
            for block in blocks:
                x = block(x, cond, block_context=block_context)
            skips.append(x)
            record(x)
            x = pool(x)
        for block in self.bottleneck:
            x = block(x, cond, block_context=block_context)
        record(x)
        for blocks, pool, skip in zip(reversed(self.up_stages), reversed(self.up_pools), reversed(skips)):
            x = pool(x, skip.shape[1]) + skip
            for block in blocks:
                x = block(x, cond, block_context=block_context)
            record(x)
        x = self.final_norm(x, cond)[0]
        if states is not None:
            states[-1] = x  # the last stage's output is reported after the final norm
        return x, None if states is None else tuple(states)


# transformers' custom-pipeline entry written into config.json by `save_pretrained`
FEATURE_EXTRACTION_PIPELINE = {"impl": "feature_extraction_sfdlm.SFDLMFeatureExtractionPipeline", "pt": ["AutoModel"]}


class SFDLMForDiffusionLM(DiffusionLMMixin, SFDLMGenerationMixin, SFDLMPreTrainedModel):
    """SFDLM with its output head: predicts p_hat(x_0 | x_t) and, given `labels`, returns the NELBO.

    `forward(labels=...)`, `nelbo` and the input checks are the shared diffusion-LM head's
    (`diffusion_lm.DiffusionLMMixin`); this class adds the SFDLM backbone and `denoise`.
    `AutoModel` and `AutoModelForMaskedLM` both resolve to this class (the convention of diffusion-LM
    remote code such as Dream and LLaDA), so `AutoModel.from_pretrained(..., trust_remote_code=True)`
    gives a model that can compute likelihoods and generate.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    output_class = SFDLMDiffusionLMOutput

    def __init__(self, config: SFDLMConfig):
        super().__init__(config)
        self.model = SFDLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # objective="score_entropy" (SEDD): the head emits log-scores and the loss is the score entropy.
        self.init_diffusion()
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, plus an `auto_map` that sends both `AutoModel` and
        `AutoModelForMaskedLM` to this class, so `trust_remote_code=True` loading finds it either way.
        The remote-code files (this module and its relative imports) are copied next to the weights, and
        `checksums.json` records the SHA-256 of the weight files (`hf_sfdlm.integrity`)."""
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        for auto_class in ("AutoModel", "AutoModelForMaskedLM"):
            auto_map[auto_class] = f"modeling_sfdlm.{SFDLMForDiffusionLM.__name__}"
        auto_map["AutoConfig"] = f"configuration_sfdlm.{SFDLMConfig.__name__}"
        self.config.auto_map = auto_map
        # pipeline("feature-extraction") gives hidden states, not logits (feature_extraction_sfdlm.py)
        self.config.custom_pipelines = {**(getattr(self.config, "custom_pipelines", None) or {}),
                                        "feature-extraction": FEATURE_EXTRACTION_PIPELINE}
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            from .integrity import write_checksums  # copied with the remote code (standard library only)

            write_checksums(save_directory)  # checksums.json: SHA-256 of the weights, verified on load
        return result

    @staticmethod
    def feature_extraction_pipeline() -> type:
        """The `feature-extraction` pipeline class that `config.custom_pipelines` names (hidden states). This
        import also makes transformers copy its file with the remote code."""
        from .feature_extraction_sfdlm import SFDLMFeatureExtractionPipeline

        return SFDLMFeatureExtractionPipeline

    def denoise(self, noisy_input_ids: torch.Tensor, timesteps: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, L, V) of p_hat(x_0 | x_t) for already-corrupted ids x_t at noise levels t.

        `positions` (B, L) bool: only the logits (N, V) at its N `True` entries, row-major; the output head
        runs at those positions only (generation asks for the positions it samples).
        """
        hidden = self.model(noisy_input_ids, attention_mask=attention_mask, timesteps=timesteps).last_hidden_state
        if positions is not None:
            hidden = hidden[positions]
        return self.diffusion.restrict_logits(self.lm_head(hidden))

    def denoise_with_outputs(self, input_ids, timesteps=None, attention_mask=None, inputs_embeds=None,
                             output_hidden_states: bool = False):
        """`(logits, hidden_states or None)`; `inputs_embeds` (B, L, H) may replace `input_ids`."""
        out = self.model(input_ids, attention_mask=attention_mask, timesteps=timesteps, inputs_embeds=inputs_embeds,
                         output_hidden_states=output_hidden_states, return_dict=True)
        return self.diffusion.restrict_logits(self.lm_head(out.last_hidden_state)), out.hidden_states


# `save_pretrained` copies the remote-code files and writes `auto_map` for registered classes.
SFDLMForDiffusionLM.register_for_auto_class("AutoModel")

__all__ = [
    "SFDLMDiffusionLMOutput",
    "SFDLMForDiffusionLM",
    "SFDLMModel",
    "SFDLMModelOutput",
    "SFDLMPreTrainedModel",
]
