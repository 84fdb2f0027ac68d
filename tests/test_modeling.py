"""The SFDLM backbone: its layers against independent computations, lengths, padding, errors, learning."""

import math

import pytest
import torch

from conftest import tiny_config
from hf_sfdlm import SFDLMConfig, SFDLMForDiffusionLM, SFDLMModel
from hf_sfdlm.modeling_sfdlm import BidirectionalDiagonalSSM, ComplexFourierMLP


def perturbed(model, scale=0.3):
    """A model whose adaLN gates are open (zero-initialised gates would hide most of the network)."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(scale * torch.randn_like(parameter))
    return model.eval()


AUTOCAST = {"float32": dict(enabled=False), "bf16-autocast": dict(dtype=torch.bfloat16)}
# bf16 autocast: inputs and outputs (and in the Fourier MLP the matmuls) are bf16, 8 significant bits
TOLERANCE = {"float32": dict(rtol=1e-4, atol=1e-4), "bf16-autocast": dict(rtol=2e-2, atol=2e-2)}


@pytest.mark.parametrize("precision", AUTOCAST)
@pytest.mark.parametrize("length", [1, 11, 64, 97])
def test_ssm_fft_convolution_equals_the_unrolled_recurrence(precision, length):
    ssm = BidirectionalDiagonalSSM(hidden_size=3, state_size=4, dt_min=0.01, dt_max=0.5).double()
    ssm.reset_parameters()
    u = torch.randn(2, length, 3, dtype=torch.float64)
    with torch.autocast("cpu", **AUTOCAST[precision]):
        inputs = u.float().to(torch.bfloat16 if precision != "float32" else torch.float32)
        got = ssm(inputs)
    assert got.dtype == inputs.dtype
    got, u = got.double(), inputs.double()

    dt = ssm.log_dt.exp().unsqueeze(-1)
    a = torch.complex(-ssm.log_neg_a_real.exp(), ssm.a_imag)
    d_a, d_b = torch.exp(dt * a), (torch.exp(dt * a) - 1) / a
    c = torch.view_as_complex(ssm.c.contiguous())

    def run(direction, inputs):  # z_n = dA z_{n-1} + dB u_n ; y_n = 2 Re(C z_n)
        state = torch.zeros(2, 3, a.shape[-1], dtype=torch.complex128)
        outputs = []
        for n in range(inputs.shape[1]):
            state = d_a * state + d_b * inputs[:, n].unsqueeze(-1)
            outputs.append(2 * (c[direction] * state).sum(-1).real)
        return torch.stack(outputs, dim=1)

    forward = run(0, u)
    backward = run(1, u.flip(1)).flip(1)
    # both directions include lag 0; the D skip is added once
    expected = forward + backward + ssm.d * u
    torch.testing.assert_close(got, expected, **TOLERANCE[precision])


def test_ssm_gradients_equal_those_of_the_unrolled_recurrence():
    """The FFT convolution's hand-written backward against autograd through the explicit convolution."""
    ssm = BidirectionalDiagonalSSM(hidden_size=3, state_size=4, dt_min=0.01, dt_max=0.5)
    ssm.reset_parameters()
    u = torch.randn(2, 13, 3, requires_grad=True)
    weights = torch.randn(2, 13, 3)
    (ssm(u) * weights).sum().backward()
    got = [u.grad] + [p.grad for p in ssm.parameters()]
    u.grad = None
    ssm.zero_grad()
    k_fwd, k_bwd = ssm.kernel(13)  # y_t = sum_s K(t - s) u_s, K(l) = k_fwd[l] (l >= 0), k_bwd[-l] (l <= 0)
    lags = torch.arange(13).unsqueeze(1) - torch.arange(13)  # (t, s)
    toeplitz = torch.where(lags >= 0, k_fwd[:, lags.clamp(min=0)], 0) + torch.where(lags <= 0, k_bwd[:, (-lags).clamp(min=0)], 0)
    expected_y = torch.einsum("hts,bsh->bth", toeplitz, u) + ssm.d * u
    (expected_y * weights).sum().backward()
    expected = [u.grad] + [p.grad for p in ssm.parameters()]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("precision", AUTOCAST)
@pytest.mark.parametrize("length", [7, 8])
def test_fourier_mlp_equals_explicit_dft_matrices(precision, length):
    config = tiny_config(hidden_size=4, fourier_intermediate_size=8)
    layer = ComplexFourierMLP(config)
    h = torch.randn(2, length, 4)
    with torch.autocast("cpu", **AUTOCAST[precision]):
        got = layer(h if precision == "float32" else h.bfloat16())
    layer, h = layer.double(), (h if precision == "float32" else h.bfloat16()).double()
    n = torch.arange(length, dtype=torch.float64)
    freqs = torch.arange(length // 2 + 1, dtype=torch.float64)
    dft = torch.exp(-2j * math.pi * torch.outer(freqs, n) / length) / math.sqrt(length)  # ortho rFFT rows
    spectrum = torch.einsum("fn,bnh->bfh", dft, h.to(torch.complex128))
    features = layer.fc_out(torch.nn.functional.gelu(layer.fc_in(torch.cat([spectrum.real, spectrum.imag], -1))))
    real, imag = features.chunk(2, -1)
    # inverse real DFT: Hermitian extension, imaginary parts of DC (and Nyquist for even L) dropped
    coefficient = torch.complex(real, imag)
    full = torch.zeros(2, length, 4, dtype=torch.complex128)  # (the imaginary part of Nyquist too)
    full[:, : length // 2 + 1] = coefficient
    full[:, 0] = coefficient[:, 0].real
    for k in range(1, length // 2 + 1):
        full[:, length - k] = coefficient[:, k].conj()
    inverse = torch.exp(2j * math.pi * torch.outer(n, torch.arange(length, dtype=torch.float64)) / length) / math.sqrt(length)
    expected = torch.einsum("nk,bkh->bnh", inverse, full).real
    torch.testing.assert_close(got.double(), expected, **TOLERANCE[precision])


@pytest.mark.parametrize("ssm_mode", ["diagonal", "conv"])
def test_every_length_from_1_to_4096_runs_through_a_pooling_unet(ssm_mode):
    config = tiny_config(stage_depths=[1, 1, 1], pool_factors=[2, 3], ssm_mode=ssm_mode)
    model = SFDLMForDiffusionLM(config).eval()
    for length in [1, 2, 3, 5, 7, 13, 64, 100, 511, 1000, 4096]:
        ids = torch.randint(0, config.vocab_size, (1, length))
        with torch.no_grad():
            logits = model(ids, timesteps=torch.tensor([0.5])).logits
        assert logits.shape == (1, length, config.vocab_size)
        assert torch.isfinite(logits).all()


@pytest.mark.parametrize("process", ["uniform", "absorbing"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_never_changes_outputs_at_real_positions(process, side):
    config = tiny_config(process=process, mask_token_id=31 if process == "absorbing" else None,
                         stage_depths=[1, 1], pool_factors=[2], pad_token_id=0)
    model = perturbed(SFDLMForDiffusionLM(config))
    lengths = [9, 4, 1, 6]
    width = max(lengths)
    rows = [torch.randint(1, 30, (length,)) for length in lengths]
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        where = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, where], mask[i, where] = row, 1
    t = torch.rand(len(rows))
    with torch.no_grad():
        batched = model(ids, attention_mask=mask, timesteps=t).logits
        for i, row in enumerate(rows):
            alone = model(row.view(1, -1), timesteps=t[i:i + 1]).logits[0]
            torch.testing.assert_close(batched[i][mask[i].bool()], alone, rtol=1e-5, atol=1e-5)


def test_bad_ids_and_shapes_raise_before_compute():
    model = SFDLMForDiffusionLM(tiny_config())
    t = torch.tensor([0.5])
    with pytest.raises(ValueError, match="Token id 32 is outside"):
        model(torch.tensor([[1, 32]]), timesteps=t)
    with pytest.raises(ValueError, match="Token id -1"):
        model(torch.tensor([[-1, 3]]), timesteps=t)
    with pytest.raises(TypeError, match="integer tensor"):
        model(torch.tensor([[1.0, 2.0]]), timesteps=t)
    with pytest.raises(ValueError, match="both > 0"):
        model(torch.zeros(1, 0, dtype=torch.long), timesteps=t)
    with pytest.raises(ValueError, match="exceeds `max_position_embeddings`=8"):
        SFDLMForDiffusionLM(tiny_config(max_position_embeddings=8))(torch.zeros(1, 9, dtype=torch.long), timesteps=t)
    with pytest.raises(ValueError, match="pass `timesteps`"):
        model(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="does not match"):
        model(torch.tensor([[1, 2]]), labels=torch.tensor([[1, 2, 3]]))
    absorbing = SFDLMForDiffusionLM(tiny_config(process="absorbing", mask_token_id=31))
    with pytest.raises(ValueError, match="mask token id 31"):
        absorbing(torch.tensor([[1, 31]]), labels=torch.tensor([[1, 31]]))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(process="absorbing"), "needs `mask_token_id`"),
        (dict(process="absorbing", mask_token_id=512), r"`mask_token_id`=512 must be an id in \[0, vocab_size=512\)"),
        (dict(stage_depths=[1, 1], pool_factors=[0]), "pooling that cannot be undone"),
        (dict(stage_depths=[1, 1], pool_factors=[1.5]), "pooling that cannot be undone"),
        (dict(stage_depths=[1, 1, 1], pool_factors=[2]), "needs one factor between each pair of stages"),
        (dict(ssm_state_size=5), "must be even"),
        (dict(process="gaussian"), "`process` must be one of"),
        (dict(noise_schedule="sqrt"), "`noise_schedule` must be one of"),
        (dict(num_timesteps=0), "`num_timesteps` must be a positive integer"),
        (dict(conv_kernel_size=4), "must be odd"),
        (dict(pad_token_id=-3), "`pad_token_id`=-3"),
    ],
)
def test_contradicting_configs_raise_naming_the_fields(overrides, message):
    with pytest.raises(ValueError, match=message):
        SFDLMConfig(**overrides)


def test_default_config_is_a_valid_small_model():
    model = SFDLMForDiffusionLM(SFDLMConfig())
    ids = torch.randint(0, 512, (2, 16))
    out = model(ids, labels=ids)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied


def test_labels_minus_100_are_neither_corrupted_nor_scored():
    config = tiny_config(process="absorbing", mask_token_id=31)
    model = SFDLMForDiffusionLM(config)
    ids = torch.randint(0, 30, (4, 12))
    labels = ids.clone()
    labels[:, :5] = -100
    out = model(ids, labels=labels, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.noisy_input_ids[:, :5], ids[:, :5])
    # scored positions' gradients flow; the loss does not depend on the logits of unscored positions
    logits = out.logits.detach().requires_grad_(True)
    from hf_sfdlm.diffusion import NoiseDraw  # noqa: F401  (documenting that loss_terms is per position)
    terms = model.diffusion.loss_terms(logits, torch.where(labels == -100, ids, labels), out.noisy_input_ids,
                                       model.diffusion.draw_noise(4, u=torch.full((4,), 0.5)))
    (terms * (labels != -100)).sum().backward()
    assert logits.grad[:, :5].abs().sum() == 0


def test_gradient_checkpointing_gives_the_same_gradients():
    config = tiny_config(stage_depths=[1, 1], pool_factors=[2])
    model = perturbed(SFDLMForDiffusionLM(config)).train()
    ids = torch.randint(0, 32, (2, 10))

    def grads():
        model.zero_grad()
        model(ids, labels=ids, generator=torch.Generator().manual_seed(1)).loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain = grads()
    # transformers >= 5.x renames the switch; both enable the blocks' GradientCheckpointingLayer
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    for a, b in zip(plain, grads()):
        torch.testing.assert_close(a, b)


def test_bf16_autocast_keeps_the_ffts_in_float32():
    config = tiny_config()
    model = perturbed(SFDLMForDiffusionLM(config))
    ids = torch.randint(0, 32, (2, 24))
    t = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        reference = model(ids, timesteps=t).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(ids, timesteps=t).logits
    assert mixed.dtype == torch.bfloat16
    relative_error = (mixed.float() - reference).abs().mean() / reference.abs().mean()
    assert relative_error < 0.03  # bf16 matmuls, float32 FFTs
    seen = []
    hook = torch.fft.rfft
    try:
        def spy(x, *args, **kwargs):
            seen.append(x.dtype)
            return hook(x, *args, **kwargs)
        torch.fft.rfft = spy
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(ids, timesteps=t)
    finally:
        torch.fft.rfft = hook
    assert seen and all(dtype == torch.float32 for dtype in seen)


def test_bare_backbone_returns_hidden_states():
    config = tiny_config()
    backbone = SFDLMModel(config)
    out = backbone(torch.randint(0, 32, (2, 5)), timesteps=torch.tensor([0.1, 0.9]))
    assert out.last_hidden_state.shape == (2, 5, config.hidden_size)


@pytest.mark.parametrize("process", ["uniform", "absorbing"])
def test_a_few_hundred_steps_lower_the_nelbo_markedly(process):
    from hf_sfdlm.synthetic import SyntheticGrammar, word_level_tokenizer

    grammar = SyntheticGrammar()
    tokenizer = word_level_tokenizer(grammar)
    ids = torch.tensor(tokenizer(" ".join(grammar.sample_words(40_000, 0)))["input_ids"])
    length = 32
    blocks = ids[: len(ids) // length * length].view(-1, length)
    train, held_out = blocks[:-64], blocks[-64:]
    config = SFDLMConfig(vocab_size=len(tokenizer), hidden_size=32, stage_depths=[1, 1], pool_factors=[2],
                         ssm_state_size=8, fourier_intermediate_size=64, process=process,
                         mask_token_id=tokenizer.mask_token_id if process == "absorbing" else None,
                         num_timesteps=None, noise_schedule="loglinear")
    model = SFDLMForDiffusionLM(config)
    generator = torch.Generator().manual_seed(0)

    def held_out_nelbo():
        model.eval()
        value = model.nelbo(held_out, num_samples=4, generator=torch.Generator().manual_seed(1)).mean().item() / length
        model.train()
        return value

    before = held_out_nelbo()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(250):
        batch = train[torch.randint(0, len(train), (16,), generator=generator)]
        loss = model(batch, labels=batch, generator=generator).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    after = held_out_nelbo()
    # From about log(V) = 5.5 nats/token; the source's entropy rate is about 3.0 nats/token.
    assert before > math.log(len(tokenizer)) - 0.5
    assert after < 0.75 * before, (before, after)
    assert after > grammar.entropy_rate() * 0.9  # a bound, never below the source entropy (with MC slack)


def test_cached_kernel_spectrum_follows_parameter_updates():
    ssm = BidirectionalDiagonalSSM(hidden_size=3, state_size=4, dt_min=0.01, dt_max=0.5)
    ssm.reset_parameters()
    u = torch.randn(1, 9, 3)
    with torch.no_grad():
        first = ssm(u)
        assert ssm._spectrum_cache is not None
        torch.testing.assert_close(ssm(u), first)
        ssm.c.mul_(2.0)  # an in-place update, as an optimizer step makes
        updated = ssm(u)
    assert not torch.allclose(updated, first)
    with torch.enable_grad():
        torch.testing.assert_close(ssm(u), updated)  # the autograd path recomputes, same numbers


def test_resizing_the_vocabulary_rebuilds_the_diffusion_process():
    model = SFDLMForDiffusionLM(tiny_config(process="uniform"))
    model.resize_token_embeddings(40)
    assert model.config.vocab_size == 40 and model.diffusion.vocab_size == 40
    assert torch.allclose(model.diffusion.prior(), torch.full((40,), 1 / 40))
    ids = torch.randint(0, 40, (2, 6))
    assert torch.isfinite(model(ids, labels=ids).loss)


@pytest.mark.parametrize("length", [1, 2, 7, 8])
def test_fourier_transforms_hand_written_backwards_pass_gradcheck(length):
    """The rFFT/irFFT feature maps' backward passes (half-size transforms) against finite differences."""
    from hf_sfdlm.modeling_sfdlm import _SignalFromFeatures, _SpectrumFeatures

    signal = torch.randn(2, length, 3, dtype=torch.float64, requires_grad=True)
    features = torch.randn(2, length // 2 + 1, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_SpectrumFeatures.apply, (signal,))
    assert torch.autograd.gradcheck(lambda f: _SignalFromFeatures.apply(f, length), (features,))
