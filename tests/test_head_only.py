"""Absorbing models run their output head at masked positions only in the training loss and the NELBO:
the loss, its gradients and the NELBO equal those of the full-canvas path."""

import pytest
import torch

from conftest import tiny_config
from hf_sfdlm import SFDLMForDiffusionLM
from hf_sfdlm.baselines import TransformerDenoiserForDiffusionLM, transformer_denoiser_config


def absorbing_model(kind, num_timesteps=None, objective="elbo"):
    if kind == "sfdlm":
        model = SFDLMForDiffusionLM(tiny_config(process="absorbing", mask_token_id=31, num_timesteps=num_timesteps,
                                                objective=objective))
    else:
        model = TransformerDenoiserForDiffusionLM(transformer_denoiser_config(
            32, 16, 2, 16, num_heads=2, process="absorbing", mask_token_id=31, num_timesteps=num_timesteps,
            objective=objective))
    with torch.no_grad():  # past adaLN-Zero's identity start
        for parameter in model.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
    return model.double()


def loss_and_gradients(model, head_only, estimator, **batch):
    model.head_only_loss, model.training_estimator = head_only, estimator
    model.zero_grad()
    out = model(**batch, generator=torch.Generator().manual_seed(4))
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["sfdlm", "transformer"])
@pytest.mark.parametrize("num_timesteps", [None, 5])
@pytest.mark.parametrize("estimator", ["uniform_t", "masked_count"])
def test_head_only_loss_and_gradients_equal_the_full_canvas(kind, num_timesteps, estimator):
    model = absorbing_model(kind, num_timesteps)
    ids = torch.randint(0, 31, (6, 12))
    labels = ids.clone()
    labels[:2, :4] = -100  # prompts: unscored, never corrupted
    mask = torch.ones_like(ids)
    mask[5, 9:] = 0  # right padding
    labels[5, 9:] = -100
    full, full_grads = loss_and_gradients(model, False, estimator, input_ids=ids, labels=labels, attention_mask=mask)
    head, head_grads = loss_and_gradients(model, True, estimator, input_ids=ids, labels=labels, attention_mask=mask)
    assert torch.equal(full.noisy_input_ids, head.noisy_input_ids)
    masked = head.noisy_input_ids == 31
    assert masked.any() and (~masked).any()
    torch.testing.assert_close(head.loss, full.loss, rtol=1e-12, atol=0)
    assert full_grads.keys() == head_grads.keys()
    for name in full_grads:
        torch.testing.assert_close(head_grads[name], full_grads[name], rtol=1e-9, atol=1e-12, msg=name)
    # the returned logits: the model's rows where x_t is masked, the carry-over (p_hat = onehot(x_t)) elsewhere
    torch.testing.assert_close(head.logits[masked], full.logits[masked])
    carried = head.logits[~masked].softmax(-1)
    torch.testing.assert_close(carried, torch.nn.functional.one_hot(ids[~masked], 32).double())


def test_head_only_float32_matches_to_float_tolerance():
    model = absorbing_model("sfdlm").float()
    ids = torch.randint(0, 31, (8, 16))
    full, full_grads = loss_and_gradients(model, False, "uniform_t", input_ids=ids, labels=ids)
    head, head_grads = loss_and_gradients(model, True, "uniform_t", input_ids=ids, labels=ids)
    torch.testing.assert_close(head.loss, full.loss, rtol=1e-5, atol=1e-6)
    for name in full_grads:
        torch.testing.assert_close(head_grads[name], full_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_ce_objective_head_only_is_the_plain_cross_entropy_too():
    model = absorbing_model("sfdlm", objective="ce")
    ids = torch.randint(0, 31, (4, 10))
    full, _ = loss_and_gradients(model, False, "masked_count", input_ids=ids, labels=ids)
    head, _ = loss_and_gradients(model, True, "masked_count", input_ids=ids, labels=ids)
    torch.testing.assert_close(head.loss, full.loss, rtol=1e-12, atol=0)


@pytest.mark.parametrize("num_timesteps", [None, 4])
def test_head_only_nelbo_equals_the_full_canvas(num_timesteps):
    from hf_sfdlm.diffusion import monte_carlo_nelbo

    model = absorbing_model("sfdlm", num_timesteps).eval()
    ids = torch.randint(0, 31, (5, 12))
    scored = torch.ones_like(ids, dtype=torch.bool)

    def denoise(x_t, t, positions=None):
        return model.denoise(x_t, t, positions=positions)

    with torch.no_grad():
        values = [monte_carlo_nelbo(model.diffusion, denoise, ids, scored, 3, torch.Generator().manual_seed(7),
                                    head_only=head_only) for head_only in (False, True)]
    torch.testing.assert_close(values[1], values[0], rtol=1e-12, atol=1e-12)
    assert (values[0] > 0).all()
