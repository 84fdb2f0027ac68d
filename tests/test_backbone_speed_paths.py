"""The backbone's fast paths: the SSM kernel's hand-written backward and the kernel cache, checked against
independent computations and against fresh models that never cache."""

import copy

import pytest
import torch

from conftest import tiny_config
from hf_sfdlm import SFDLMModel
from hf_sfdlm.modeling_sfdlm import BidirectionalDiagonalSSM, _VandermondeKernel


def random_ssm(hidden=3, state=6, dtype=torch.float64) -> BidirectionalDiagonalSSM:
    ssm = BidirectionalDiagonalSSM(hidden_size=hidden, state_size=state, dt_min=0.01, dt_max=0.5)
    ssm.reset_parameters()
    with torch.no_grad():  # away from the S4D-Lin initialisation's regular grid
        ssm.log_neg_a_real.add_(0.3 * torch.randn_like(ssm.log_neg_a_real))
        ssm.a_imag.add_(torch.randn_like(ssm.a_imag))
    return ssm.to(dtype)


@pytest.mark.parametrize("length", [1, 2, 5, 16, 17, 30])
def test_vandermonde_kernel_equals_complex_powers_and_its_backward_passes_gradcheck(length):
    x_re = (-0.3 * torch.rand(3, 4, dtype=torch.float64)).requires_grad_()
    x_im = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w_re, w_im = (torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    got = _VandermondeKernel.apply(x_re, x_im, w_re, w_im, length)
    z, w = torch.complex(x_re, x_im).detach().exp(), torch.complex(w_re, w_im).detach()
    powers = z.unsqueeze(-1) ** torch.arange(length, dtype=torch.float64)  # (H, N, L)
    expected = (w.unsqueeze(-1) * powers).sum(-2).real
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *a: _VandermondeKernel.apply(*a, length), (x_re, x_im, w_re, w_im))


def test_kernel_is_twice_the_real_part_of_c_db_da_powers():
    ssm = random_ssm()
    dt = ssm.log_dt.exp().unsqueeze(-1)
    a = torch.complex(-ssm.log_neg_a_real.exp(), ssm.a_imag)
    d_a, d_b = torch.exp(dt * a), (torch.exp(dt * a) - 1) / a
    c = torch.view_as_complex(ssm.c.detach().contiguous())  # (2, H, N)
    powers = d_a.unsqueeze(-1) ** torch.arange(23, dtype=torch.float64)
    expected = 2 * (c.unsqueeze(-1) * (d_b.unsqueeze(-1) * powers)).sum(-2).real
    torch.testing.assert_close(ssm.kernel(23), expected.detach(), rtol=1e-10, atol=1e-12)


def _loss_and_grads(module, u, calls=None):
    module.zero_grad()
    calls = [] if calls is None else calls
    calls.append("forward")
    loss = (module(u) * torch.linspace(-1, 1, u.shape[1], dtype=u.dtype).unsqueeze(-1)).square().sum()
    calls.append("backward")
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in module.parameters()]


def test_training_with_the_cache_matches_fresh_models_after_every_optimiser_step():
    """Two micro-batches per step (the second one hits the cache with autograd on) and an evaluation call
    between steps: losses and gradients equal those of a fresh copy that has never cached anything, and
    after each step the outputs move as the fresh copy's do."""
    ssm = random_ssm()
    calls = []
    original_kernel = ssm.kernel
    original_factors = ssm.kernel_factors
    ssm.kernel = lambda length: calls.append(length) or original_kernel(length)
    ssm.kernel_factors = lambda: calls.append("factors") or original_factors()
    optimizer = torch.optim.Adam(ssm.parameters(), lr=0.05)
    batches = [torch.randn(2, 9, 3, dtype=torch.float64) for _ in range(2)]
    previous = None
    for _ in range(3):
        fresh = copy.deepcopy(ssm)
        fresh._spectrum_cache = None
        fresh.kernel = lambda length, fresh=fresh: BidirectionalDiagonalSSM.kernel(fresh, length)
        fresh.kernel_factors = lambda fresh=fresh: BidirectionalDiagonalSSM.kernel_factors(fresh)
        gradients = [torch.zeros_like(p) for p in ssm.parameters()]
        for index, u in enumerate(batches):
            calls.clear()
            loss, grads = _loss_and_grads(ssm, u, calls)
            # the first micro-batch after a step builds the kernel in its forward pass (the cache is stale),
            # without a graph; each backward pass rebuilds only the (H, N) factors with one (so that a
            # checkpointed recomputation, which may hit the cache, saves the same tensors); the second
            # micro-batch reuses the cached spectrum
            built = ["forward", 9, "factors"] if index == 0 else ["forward"]
            assert calls == built + ["backward", "factors"]
            fresh._spectrum_cache = None
            expected_loss, expected_grads = _loss_and_grads(fresh, u)
            torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=0)
            for got, expected in zip(grads, expected_grads):
                torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
            gradients = [g + grad for g, grad in zip(gradients, grads)]
        with torch.no_grad():
            evaluated = ssm(batches[0])
            fresh._spectrum_cache = None
            torch.testing.assert_close(evaluated, fresh(batches[0]), rtol=1e-12, atol=1e-12)
        if previous is not None:
            assert not torch.allclose(evaluated, previous)  # the step moved the outputs
        previous = evaluated
        for parameter, gradient in zip(ssm.parameters(), gradients):
            parameter.grad = gradient
        optimizer.step()


def test_a_cache_hit_under_autograd_builds_the_kernel_only_in_the_backward_pass():
    ssm = random_ssm()
    u = torch.randn(1, 7, 3, dtype=torch.float64)
    ssm(u).sum().backward()  # fills the cache
    calls = []
    original_kernel, original_factors = ssm.kernel, ssm.kernel_factors
    ssm.kernel = lambda length: calls.append(length) or original_kernel(length)
    ssm.kernel_factors = lambda: calls.append("factors") or original_factors()
    out = ssm(u)
    assert calls == []
    out.sum().backward()
    assert calls == ["factors"]  # the (H, N) factors only: the (H, N, sqrt L) tables never


def test_writes_through_data_are_seen_on_cpu():
    """`.data` writes bypass the version counters; on CPU the cache compares the values too."""
    ssm = random_ssm()
    u = torch.randn(1, 8, 3, dtype=torch.float64)
    with torch.no_grad():
        ssm(u)
        ssm.c.data.mul_(-2.0)
        ssm.log_dt.data.add_(0.5)
        got = ssm(u)
        ssm._spectrum_cache = None
        expected = ssm(u)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_a_kernel_cached_under_inference_mode_serves_training_afterwards():
    ssm = random_ssm()
    u = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    with torch.inference_mode():
        ssm(u.detach())
    loss, grads = _loss_and_grads(ssm, u)
    fresh = copy.deepcopy(ssm)
    fresh._spectrum_cache = None
    expected_loss, expected_grads = _loss_and_grads(fresh, u)
    torch.testing.assert_close(loss, expected_loss)
    for got, expected in zip(grads, expected_grads):
        torch.testing.assert_close(got, expected)


def test_frozen_ssm_parameters_still_pass_gradients_to_the_input():
    ssm = random_ssm().requires_grad_(False)
    u = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ssm, (u,))
    assert all(p.grad is None for p in ssm.parameters())


def test_a_backward_after_an_in_place_parameter_update_is_refused():
    ssm = random_ssm()
    u = torch.randn(1, 6, 3, dtype=torch.float64)
    ssm(u).sum().backward()  # fills the cache
    out = ssm(u)  # a cache hit: the backward pass would rebuild the kernel from the parameters
    with torch.no_grad():
        ssm.c.mul_(2.0)
    with pytest.raises(RuntimeError, match="inplace"):
        out.sum().backward()


def test_model_outputs_and_gradients_do_not_depend_on_the_cache():
    config = tiny_config(stage_depths=[1, 1])
    model = SFDLMModel(config).double()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    ids, t = torch.randint(0, config.vocab_size, (2, 12)), torch.rand(2, dtype=torch.float64)
    fresh = copy.deepcopy(model)
    outputs = []
    for _ in range(2):  # the second pass hits every SSM's cache
        model.zero_grad()
        out = model(ids, timesteps=t).last_hidden_state
        out.square().mean().backward()
        outputs.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    for module in fresh.modules():
        if isinstance(module, BidirectionalDiagonalSSM):
            module._spectrum_cache = None
    out = fresh(ids, timesteps=t).last_hidden_state
    out.square().mean().backward()
    for got, grads in outputs:
        torch.testing.assert_close(got, out.detach(), rtol=1e-12, atol=1e-12)
        for a, b in zip(grads, (p.grad for p in fresh.parameters())):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_backward_under_bf16_autocast_keeps_the_kernel_in_float32():
    """`backward()` called inside an autocast region (as many training loops do) must not drop the kernel's
    rebuilt tables or matmuls to bf16: the SSM's gradients equal those computed without autocast."""
    ssm = random_ssm(hidden=4, dtype=torch.float32)
    u = torch.randn(2, 10, 4)
    _, expected = _loss_and_grads(ssm, u)  # fills the cache: a hit, then (cleared) a miss
    for clear in (False, True):
        if clear:
            ssm._spectrum_cache = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, got = _loss_and_grads(ssm, u)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_under_autograd_only_small_spectra_are_kept(monkeypatch):
    from hf_sfdlm import modeling_sfdlm

    ssm = random_ssm()
    u = torch.randn(1, 16, 3, dtype=torch.float64)
    with torch.no_grad():
        ssm(u)
    assert ssm._spectrum_cache is not None  # without autograd every size is kept (sampling reuses it)
    spectrum_bytes = ssm._spectrum_cache[2].numel() * ssm._spectrum_cache[2].element_size()
    monkeypatch.setattr(modeling_sfdlm, "_TRAINING_CACHE_MAX_BYTES", spectrum_bytes - 1)
    with torch.no_grad():
        ssm.c.mul_(1.5)
    loss, grads = _loss_and_grads(ssm, u)
    assert ssm._spectrum_cache is None  # too large to keep under autograd: nothing held between calls
    monkeypatch.setattr(modeling_sfdlm, "_TRAINING_CACHE_MAX_BYTES", spectrum_bytes)
    _loss_and_grads(ssm, u)
    assert ssm._spectrum_cache is not None
    again, grads_again = _loss_and_grads(ssm, u)  # a hit
    torch.testing.assert_close(again, loss)
    for a, b in zip(grads_again, grads):
        torch.testing.assert_close(a, b)


def test_the_traced_kernel_equals_the_hand_written_one():
    """Under torch.compile the kernel is built by plain differentiable ops (in-place writes into strided
    views break dynamo's graph): same values and gradients as `_VandermondeKernel`."""
    from hf_sfdlm.modeling_sfdlm import _VandermondeKernel, _vandermonde_by_autograd

    generator = torch.Generator().manual_seed(3)
    x_re = -torch.rand(4, 5, generator=generator, dtype=torch.float64) * 0.3
    x_im = torch.randn(4, 5, generator=generator, dtype=torch.float64)
    w_re, w_im = torch.randn(2, 2, 4, 5, generator=generator, dtype=torch.float64)
    inputs = [t.clone().requires_grad_() for t in (x_re, x_im, w_re, w_im)]
    for length in (1, 6, 50):
        weights = torch.randn(2, 4, length, generator=generator, dtype=torch.float64)
        got = _vandermonde_by_autograd(*inputs, length)
        expected = _VandermondeKernel.apply(*inputs, length)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        grads = torch.autograd.grad((got * weights).sum(), inputs)
        expected_grads = torch.autograd.grad((expected * weights).sum(), inputs)
        for a, b in zip(grads, expected_grads):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_gradient_checkpointing_with_a_cache_filled_in_the_forward_pass():
    """Activation checkpointing recomputes a block's forward pass in backward, where the SSM's cache (filled
    by the original pass) hits: both passes must save the same tensors, and the gradients equal a plain
    pass's."""
    from torch.utils.checkpoint import checkpoint

    ssm = random_ssm()
    u = torch.randn(2, 12, 3, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 12, 3, dtype=torch.float64)
    for warm in (False, True):  # cold: the original pass misses and fills the cache; warm: both hit
        ssm._spectrum_cache = None
        if warm:
            with torch.no_grad():
                ssm(u)
        out = checkpoint(ssm, u, use_reentrant=False)
        grads = torch.autograd.grad((out * weights).sum(), [u, *ssm.parameters()])
        ssm._spectrum_cache = None
        expected = torch.autograd.grad((ssm(u) * weights).sum(), [u, *ssm.parameters()])
        for a, b in zip(grads, expected):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
