"""LoRA adapters for SFDLM through PEFT, with the guards PEFT leaves to the caller.

SFDLM has no attention, so the usual `q_proj`/`v_proj` names do not exist. `LORA_TARGET_MODULES`
lists what does. `apply_lora` checks that *every* requested name matches a module before PEFT
touches the model: PEFT only complains when no name matches at all, so a list such as
`["q_proj", "fc_in"]` (LLaDA/Llama names mixed with ours) would otherwise silently train a fraction
of what was asked.

The SSM's own parameters (the diagonal A, its step sizes, C and D) are plain `nn.Parameter`s, not
linear layers, so LoRA cannot wrap them; `train_ssm=True` makes them fully trainable through PEFT's
`modules_to_save` (a trained copy of every `mixer` module is stored in the adapter).

`save_adapter` stores, next to PEFT's files, `sfdlm_adapter.json`: the base's architecture and a
sample of its weights. `load_adapter` compares them with the base it is given and refuses an adapter
made for a different base with a `ValueError` naming the first difference.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from torch import nn

# Suffixes PEFT matches against module names (`key == name or key.endswith("." + name)`).
LORA_TARGET_MODULES = {
    "in_proj": "SSM branch: linear map into the bidirectional diagonal SSM (every block)",
    "out_proj": "SSM branch: linear map out of the SSM, after the GELU (every block)",
    "fc_in": "Complex Fourier MLP: first layer, on [Re, Im] of every frequency (every block)",
    "fc_out": "Complex Fourier MLP: second layer, back to [Re, Im] (every block)",
    "modulation": "adaLN noise conditioning: shift, scale and gates from the noise level (every block, final norm)",
    "time_embed.0": "noise-level embedding MLP, first layer",
    "time_embed.2": "noise-level embedding MLP, second layer",
    "proj": "U-Net pooling: DownPool/UpPool projections between stages",
}
# The two mixing branches of every block: what domain adaptation most needs to move.
DEFAULT_TARGET_MODULES = ("in_proj", "out_proj", "fc_in", "fc_out")
# Module whose parameters `train_ssm=True` trains in full (the SSM itself, or its convolution fallback).
SSM_MODULE_NAME = "mixer"
ADAPTER_METADATA_FILE = "sfdlm_adapter.json"
# Config fields that fix every weight shape and the meaning of the weights.
ARCHITECTURE_FIELDS = ("model_type", "vocab_size", "hidden_size", "stage_depths", "pool_factors", "ssm_mode",
                       "ssm_state_size", "conv_kernel_size", "fourier_intermediate_size", "time_conditioning",
                       "process", "mask_token_id", "tie_word_embeddings")
_SAMPLES_PER_TENSOR = 16
# Sampled base weights must agree to this fraction of the tensor's scale: loose enough for a base
# loaded in bf16 (relative rounding 2^-8), tight enough that any other checkpoint differs.
_FINGERPRINT_RTOL = 2e-2


def _check_sfdlm(model: nn.Module) -> None:
    # The class may come from hf_sfdlm or from remote code (transformers_modules...), so check the config.
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "sfdlm":
        raise TypeError(f"Expected an SFDLM model (config.model_type == 'sfdlm'), got {type(model).__name__} "
                        f"with model_type {getattr(config, 'model_type', None)!r}.")


def _matches(key: str, name: str) -> bool:
    return key == name or key.endswith("." + name)


def _unmatched(model: nn.Module, names: Sequence[str], kinds: tuple[type, ...] | None) -> list[str]:
    keys = [key for key, module in model.named_modules() if kinds is None or isinstance(module, kinds)]
    return [name for name in names if not any(_matches(key, name) for key in keys)]


def lora_config(r: int = 8, alpha: float = 16, target_modules: str | Sequence[str] = DEFAULT_TARGET_MODULES,
                dropout: float = 0.0, train_ssm: bool = False,
                modules_to_save: Sequence[str] | None = None) -> LoraConfig:
    """A validated `peft.LoraConfig` for SFDLM (see `apply_lora` for the arguments)."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"LoRA rank `r` must be a positive integer, got {r!r}.")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"LoRA `alpha` must be a positive number, got {alpha!r}.")
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"LoRA `dropout` must be in [0, 1), got {dropout!r}.")
    if isinstance(target_modules, str):
        if target_modules != "all-linear":
            raise ValueError(f"`target_modules` must be 'all-linear' or a list of module names such as "
                             f"{list(DEFAULT_TARGET_MODULES)}, got the string {target_modules!r}.")
    else:
        target_modules = list(target_modules)
        if not target_modules or not all(isinstance(name, str) and name for name in target_modules):
            raise ValueError(f"`target_modules` must be a non-empty list of module names, got {target_modules!r}.")
    saved = list(modules_to_save or [])
    if train_ssm and SSM_MODULE_NAME not in saved:
        saved.append(SSM_MODULE_NAME)
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=target_modules, lora_dropout=dropout,
                      modules_to_save=saved or None)


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16,
               target_modules: str | Sequence[str] = DEFAULT_TARGET_MODULES, dropout: float = 0.0,
               train_ssm: bool = False, modules_to_save: Sequence[str] | None = None) -> PeftModel:
    """Wrap an SFDLM model with LoRA adapters (`peft.get_peft_model`); only adapter weights train.

    Args:
        model: an `SFDLMForDiffusionLM` (from `hf_sfdlm` or loaded with `trust_remote_code`). It is
            modified in place, as PEFT does.
        r, alpha, dropout: LoRA rank, scaling numerator (`alpha / r`) and dropout.
        target_modules: `"all-linear"` (every linear layer except the tied output head) or a list of
            module-name suffixes from `LORA_TARGET_MODULES`. Every name must match at least one linear
            layer, otherwise `ValueError` (before the model is touched).
        train_ssm: also train the SSM parameters in full, through `modules_to_save=["mixer"]`.
        modules_to_save: further modules trained in full and saved with the adapter.

    Returns:
        The `PeftModel`, carrying the base fingerprint that `save_adapter` stores.
    """
    _check_sfdlm(model)
    config = lora_config(r, alpha, target_modules, dropout, train_ssm, modules_to_save)
    if config.target_modules != "all-linear":
        targets = sorted(config.target_modules)
        if "lm_head" in targets and model.config.tie_word_embeddings:
            raise ValueError("`lm_head` is tied to the input embedding in this model; merging a LoRA on it "
                             "would also change the embedding. Leave it out of `target_modules`.")
        missing = _unmatched(model, targets, (nn.Linear, nn.Conv1d, nn.Embedding))
        if missing:
            raise ValueError(f"LoRA target module(s) {missing} match no linear layer of this SFDLM model "
                             f"(attention names such as q_proj/v_proj do not exist here). Available: "
                             f"{sorted(LORA_TARGET_MODULES)}, or target_modules='all-linear'.")
    missing = _unmatched(model, sorted(config.modules_to_save or []), None)
    if missing:
        raise ValueError(f"`modules_to_save` name(s) {missing} match no module of this SFDLM model.")
    fingerprint = base_fingerprint(model)
    peft_model = get_peft_model(model, config)
    if not peft_model.targeted_module_names:
        raise ValueError(f"LoRA with target_modules={config.target_modules!r} wrapped no module.")
    peft_model.sfdlm_base_fingerprint = fingerprint
    return peft_model


def trainable_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters that will receive gradients."""
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


@torch.no_grad()
def base_fingerprint(model: nn.Module) -> dict:
    """Architecture fields and a fixed sample of every base weight: what an adapter was made for.

    Each tensor contributes `_SAMPLES_PER_TENSOR` evenly spaced elements and its RMS, which is
    cheap for any model size and tells apart any two checkpoints that are not the same weights.
    """
    _check_sfdlm(model)
    if isinstance(model, PeftModel):
        raise TypeError("Take the fingerprint of the base model before wrapping it with PEFT.")
    architecture = {field: _json_value(getattr(model.config, field, None)) for field in ARCHITECTURE_FIELDS}
    tensors = {}
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        flat = tensor.detach().reshape(-1).double()
        index = torch.linspace(0, flat.numel() - 1, min(_SAMPLES_PER_TENSOR, flat.numel())).round().long()
        tensors[name] = {"shape": list(tensor.shape), "rms": float(flat.square().mean().sqrt()),
                         "samples": flat[index.to(flat.device)].tolist()}
    return {"architecture": architecture, "tensors": tensors}


def _json_value(value):
    return list(value) if isinstance(value, tuple) else value


def compare_fingerprints(expected: dict, actual: dict) -> str | None:
    """The first difference between two `base_fingerprint`s, in words, or None when they agree."""
    for field, value in expected["architecture"].items():
        if actual["architecture"].get(field) != value:
            return f"config.{field} is {actual['architecture'].get(field)!r}, the adapter was made for {value!r}"
    for name, want in expected["tensors"].items():
        have = actual["tensors"].get(name)
        if have is None:
            return f"the base has no weight {name!r}"
        if have["shape"] != want["shape"]:
            return f"weight {name!r} has shape {have['shape']}, the adapter was made for {want['shape']}"
        scale = max(want["rms"], 1e-12)
        worst = max(abs(a - b) for a, b in zip(have["samples"], want["samples"]))
        if not math.isfinite(worst) or worst > _FINGERPRINT_RTOL * scale:
            return (f"weight {name!r} holds different values (sampled entries differ by {worst:.3g}, "
                    f"scale {scale:.3g}): a different checkpoint of the same architecture")
    return None


def save_adapter(peft_model: PeftModel, output_dir: str | os.PathLike, **kwargs) -> None:
    """`peft_model.save_pretrained(output_dir)` plus `sfdlm_adapter.json` (the base fingerprint).

    The adapter config's `auto_mapping` names `transformers.AutoModel` as the base class, so
    `peft.AutoPeftModel.from_pretrained(output_dir, trust_remote_code=True)` loads base and adapter with
    PEFT's default import allowlist, whether the base comes from remote code or from this package (PEFT
    itself would record the model's own module, `hf_sfdlm...` or `transformers_modules...`, which its
    allowlist refuses and which a fresh process may not be able to import).
    """
    fingerprint = getattr(peft_model, "sfdlm_base_fingerprint", None)
    if fingerprint is None:
        raise ValueError("This PeftModel was not made by `apply_lora` or `load_adapter`, so the base it "
                         "belongs to is unknown; wrap the model with `hf_sfdlm.lora.apply_lora`.")
    peft_model.save_pretrained(output_dir, **kwargs)
    finish_adapter_config(peft_model, output_dir)
    with open(os.path.join(output_dir, ADAPTER_METADATA_FILE), "w", encoding="utf-8") as handle:
        json.dump(fingerprint, handle)
    from .integrity import write_checksums

    write_checksums(output_dir)  # checksums.json: SHA-256 of adapter_model.safetensors, verified on load


def finish_adapter_config(peft_model: PeftModel, output_dir: str | os.PathLike) -> None:
    """Make the `adapter_config.json` files PEFT just wrote into `output_dir` load from anywhere.

    Every path that saves an adapter calls this after `save_pretrained` (`save_adapter`, and the trainer's
    `save_model`, which `sfdlm finetune` uses):

    * `auto_mapping` names `transformers.AutoModel` (PEFT would record the model's own module,
      `hf_sfdlm...` or `transformers_modules...`, which `AutoPeftModel`'s import allowlist refuses and a
      fresh process may not be able to import); task-typed adapters load through `AutoPeftModelFor<Task>`
      and are left as they are;
    * a base recorded as a relative local folder (`models/tiny`) becomes its absolute path, so the adapter
      finds its base from any working directory instead of asking the Hub for a repo of that name (a Hub
      id, or a name that is no local folder, is kept; `sfdlm push --base-model` replaces a local path by
      the base's Hub id).
    """
    output_dir = os.fspath(output_dir)
    for name, config in peft_model.peft_config.items():
        folder = output_dir if name == "default" else os.path.join(output_dir, name)
        path = os.path.join(folder, "adapter_config.json")
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as handle:
            saved = json.load(handle)
        if config.task_type is None:
            saved["auto_mapping"] = {"base_model_class": "AutoModel", "parent_library": "transformers"}
        base = saved.get("base_model_name_or_path")
        if isinstance(base, str) and base and os.path.isdir(os.path.expanduser(base)):
            saved["base_model_name_or_path"] = os.path.abspath(os.path.expanduser(base))
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(saved, handle, indent=2, sort_keys=True)


def _adapter_weight_shapes(adapter_dir: str) -> dict[str, tuple[int, ...]]:
    path = os.path.join(adapter_dir, "adapter_model.safetensors")
    if not os.path.isfile(path):
        return {}
    with safe_open(path, framework="pt") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}


def check_adapter_matches_base(base_model: nn.Module, adapter_dir: str | os.PathLike) -> None:
    """Raise `ValueError` naming the difference when the adapter in `adapter_dir` was not made for
    `base_model`: a different architecture, different base weights, or adapter tensors whose shapes
    do not fit the base's layers."""
    _check_sfdlm(base_model)
    adapter_dir = os.fspath(adapter_dir)
    if not os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")):
        raise ValueError(f"{adapter_dir!r} is not a PEFT adapter folder: it has no adapter_config.json.")
    metadata_path = os.path.join(adapter_dir, ADAPTER_METADATA_FILE)
    if os.path.isfile(metadata_path):
        with open(metadata_path, encoding="utf-8") as handle:
            expected = json.load(handle)
        difference = compare_fingerprints(expected, base_fingerprint(base_model))
        if difference:
            raise ValueError(f"The adapter in {adapter_dir!r} was made for a different base model: {difference}.")
    modules = dict(base_model.named_modules())
    parameters = dict(base_model.named_parameters())
    for key, shape in _adapter_weight_shapes(adapter_dir).items():
        name = re.sub(r"^base_model\.model\.", "", key)
        lora = re.fullmatch(r"(.+)\.lora_([AB])\.weight", name)
        if lora:
            layer = modules.get(lora.group(1))
            if not isinstance(layer, nn.Linear):
                raise ValueError(f"The adapter in {adapter_dir!r} was made for a different base model: it adapts "
                                 f"{lora.group(1)!r}, which is not a linear layer of this model.")
            wanted = layer.in_features if lora.group(2) == "A" else layer.out_features
            have = shape[1] if lora.group(2) == "A" else shape[0]
            if have != wanted:
                raise ValueError(f"The adapter in {adapter_dir!r} was made for a different base model: {key} has "
                                 f"shape {shape}, which does not fit {lora.group(1)!r} "
                                 f"({layer.in_features} -> {layer.out_features}).")
        elif name in parameters and tuple(parameters[name].shape) != shape:
            raise ValueError(f"The adapter in {adapter_dir!r} was made for a different base model: {name} has shape "
                             f"{shape}, the base has {tuple(parameters[name].shape)}.")


def load_adapter(base_model: nn.Module, adapter_dir: str | os.PathLike, is_trainable: bool = False,
                 **kwargs) -> PeftModel:
    """Check that the adapter belongs to `base_model`, then `PeftModel.from_pretrained` it onto the base."""
    check_adapter_matches_base(base_model, adapter_dir)
    fingerprint = base_fingerprint(base_model)
    peft_model = PeftModel.from_pretrained(base_model, os.fspath(adapter_dir), is_trainable=is_trainable, **kwargs)
    peft_model.sfdlm_base_fingerprint = fingerprint
    return peft_model


__all__ = [
    "DEFAULT_TARGET_MODULES",
    "LORA_TARGET_MODULES",
    "apply_lora",
    "base_fingerprint",
    "check_adapter_matches_base",
    "compare_fingerprints",
    "finish_adapter_config",
    "load_adapter",
    "lora_config",
    "save_adapter",
    "trainable_parameter_names",
]
