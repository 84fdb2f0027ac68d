"""Model cards for SFDLM checkpoints and LoRA adapters, rendered through `huggingface_hub.ModelCard`.

`write_model_card(output_dir, model, eval_results=..., training_info=...)` renders
`model_cards/sfdlm_template.md` into `output_dir/README.md`: YAML metadata (`library_name`,
`pipeline_tag`, `license`, `datasets`, `tags`, `base_model` for fine-tunes and adapters, and a
`model-index` holding the evaluation results the run measured), then the architecture and diffusion
settings, training data and budget, how to generate and infill, intended use and limitations, and the
SFDLM citation. Training and fine-tuning runs call it at the end; `hf_sfdlm.hub.push_model` calls it
when the folder has no SFDLM card yet.

Everything a card is rendered from is also saved next to it (`.sfdlm_card.json`, never uploaded), so a
card regenerated later (`sfdlm push --base-model ...`) keeps every field the run recorded. The usage
examples are built from the model's own tokenizer and a held-out line of its training text
(`card_examples`), and show what this checkpoint generates for them. Metadata never holds local paths:
a local dataset or base model is described in the text.

`validate_model_card(path)` parses a card back with `ModelCard.load` and checks its metadata locally
(the Hub's own validator, `ModelCard.validate`, needs the network).
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from safetensors import safe_open

def _template_path() -> Path:
    """The card template: `model_cards/` of the repository, shipped in wheels as `hf_sfdlm.model_cards`."""
    checkout = Path(__file__).resolve().parent.parent / "model_cards" / "sfdlm_template.md"
    if checkout.is_file():
        return checkout
    from importlib.resources import files

    return Path(str(files("hf_sfdlm.model_cards") / "sfdlm_template.md"))


TEMPLATE_PATH = _template_path()
CARD_FILE = "README.md"
CARD_RECORD = ".sfdlm_card.json"  # hidden: push never uploads it
PIPELINE_TAG = "text-generation"
BASE_TAGS = ("sfdlm", "diffusion", "discrete-diffusion", "text-diffusion", "attention-free", "custom_code")
ADAPTER_TAGS = ("peft", "lora")
REQUIRED_METADATA = ("library_name", "pipeline_tag", "license", "tags")
_EVAL_RESULT_FIELDS = ("task_type", "dataset_type", "dataset_name", "metric_type", "metric_value", "task_name",
                       "dataset_config", "dataset_split", "dataset_revision", "dataset_args", "metric_name",
                       "metric_config", "metric_args", "verified", "verify_token", "source_name", "source_url")


def eval_result(metric_type: str, value: float, dataset_name: str, *, dataset_type: str | None = None,
                split: str = "test", metric_name: str | None = None, dataset_config: str | None = None,
                task_type: str = PIPELINE_TAG) -> EvalResult:
    """One measured number for the card's `model-index` (validated as `as_eval_results` does)."""
    return as_eval_results([dict(task_type=task_type, dataset_type=dataset_type or dataset_slug(dataset_name),
                                 dataset_name=dataset_name, dataset_split=split, dataset_config=dataset_config,
                                 metric_type=metric_type, metric_name=metric_name or metric_type,
                                 metric_value=value)])[0]


def as_eval_results(results: Iterable[EvalResult | Mapping] | None) -> list[EvalResult]:
    """`EvalResult`s from `EvalResult`s or mappings of its fields (`task_type` defaults to text-generation).

    Raises `ValueError` for unknown fields, missing required fields or a value that is not a finite number.
    """
    if results is None:
        return []
    if isinstance(results, (EvalResult, Mapping, str)):
        raise TypeError(f"`eval_results` must be a list of EvalResult or mappings, got {type(results).__name__}.")
    converted = []
    for item in results:
        if isinstance(item, Mapping):
            unknown = sorted(set(item) - set(_EVAL_RESULT_FIELDS))
            if unknown:
                raise ValueError(f"Unknown eval result field(s) {unknown}; expected fields of "
                                 f"huggingface_hub.EvalResult: {list(_EVAL_RESULT_FIELDS)}.")
            missing = [name for name in ("dataset_type", "dataset_name", "metric_type", "metric_value")
                       if item.get(name) is None]
            if missing:
                raise ValueError(f"Eval result {dict(item)!r} lacks required field(s) {missing}.")
            item = EvalResult(**{"task_type": PIPELINE_TAG, **{k: v for k, v in item.items() if v is not None}})
        elif not isinstance(item, EvalResult):
            raise TypeError(f"Each eval result must be an EvalResult or a mapping, got {type(item).__name__}.")
        value = item.metric_value
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"Eval result {item.metric_type!r} on {item.dataset_name!r} must have a finite number "
                             f"as metric_value, got {value!r}.")
        converted.append(item)
    return converted


# ------------------------------------------------------------------------------ what the card describes
def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _count_safetensors_parameters(folder: Path, pattern: str) -> int | None:
    files = sorted(folder.glob(pattern))
    if not files:
        return None
    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                total += math.prod(handle.get_slice(key).get_shape())
    return total


def describe(model=None, folder: str | os.PathLike | None = None) -> dict:
    """What the card needs to know: the SFDLM config (as a dict), parameter counts, adapter settings.

    From a live model (an `SFDLMForDiffusionLM` or a PEFT model around one) or, when `model` is None,
    from a saved folder (`config.json`, or `adapter_config.json` + `sfdlm_adapter.json`).
    """
    if model is not None:
        peft_config = getattr(model, "peft_config", None)
        base = model.get_base_model() if peft_config else model
        config = getattr(base, "config", None)
        if getattr(config, "model_type", None) != "sfdlm":
            raise TypeError(f"Expected an SFDLM model (config.model_type == 'sfdlm'), got {type(model).__name__}.")
        info = {"config": config.to_dict(), "num_parameters": sum(p.numel() for p in base.parameters()),
                "adapter": None}
        if peft_config:
            adapter = peft_config[getattr(model, "active_adapter", "default")]
            # Counted by name: an EMA copy of a PEFT model has every parameter frozen.
            info["adapter"] = {**adapter.to_dict(), "trainable_parameters": sum(
                p.numel() for n, p in model.named_parameters() if ".lora_" in n or ".modules_to_save." in n)}
            info["num_parameters"] = sum(p.numel() for n, p in base.named_parameters() if ".lora_" not in n)
        return info
    if folder is None:
        raise ValueError("Pass a model or the folder it was saved to.")
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"Model folder {str(folder)!r} does not exist.")
    if (folder / "adapter_config.json").is_file():
        adapter = _read_json(folder / "adapter_config.json")
        metadata = folder / "sfdlm_adapter.json"
        architecture = _read_json(metadata)["architecture"] if metadata.is_file() else {"model_type": "sfdlm"}
        adapter["trainable_parameters"] = _count_safetensors_parameters(folder, "adapter_model*.safetensors")
        return {"config": architecture, "num_parameters": None, "adapter": adapter}
    if not (folder / "config.json").is_file():
        raise ValueError(f"Model folder {str(folder)!r} has no config.json (nor adapter_config.json): "
                         "save the model with `save_pretrained` first.")
    config = _read_json(folder / "config.json")
    if config.get("model_type") != "sfdlm":
        raise ValueError(f"{str(folder / 'config.json')!r} has model_type {config.get('model_type')!r}, expected 'sfdlm'.")
    return {"config": config, "num_parameters": _count_safetensors_parameters(folder, "*.safetensors"),
            "adapter": None}


def _format(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and abs(value) >= 10_000:
        return f"{value:,}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_format(v) for v in value) if value else "-"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={_format(v)}" for k, v in value.items())
    return str(value).replace("|", "\\|").replace("\n", " ")


def _human_count(count: int | None) -> str:
    if count is None:
        return "unknown"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.3g}{unit} ({count:,})"
    return str(count)


def _architecture_rows(config: Mapping, num_parameters: int | None) -> list[tuple[str, str]]:
    get = config.get
    if get("ssm_mode", "diagonal") == "diagonal":
        mixer = f"bidirectional diagonal SSM (S4D), state size {get('ssm_state_size')}"
    else:
        mixer = f"depthwise convolution, kernel {get('conv_kernel_size')}"
    rows = [("Parameters", _human_count(num_parameters)), ("Vocabulary size", get("vocab_size")),
            ("Hidden size", get("hidden_size")), ("U-Net stage depths (down..., bottleneck)", get("stage_depths")),
            ("Pooling factors between stages", get("pool_factors")), ("Sequence mixer", mixer),
            ("Complex Fourier MLP width", get("fourier_intermediate_size")),
            ("Noise-level conditioning", "adaLN (shift, scale, gate)" if get("time_conditioning") else "none"),
            ("Tied input/output embeddings", get("tie_word_embeddings")),
            ("Longest sequence accepted", get("max_position_embeddings"))]
    return [(name, _format(value)) for name, value in rows if value is not None]


def _diffusion_rows(config: Mapping) -> list[tuple[str, str]]:
    get = config.get
    process = get("process")
    if process == "absorbing":
        process = f"absorbing / masked (mask token id {get('mask_token_id')})"
    elif process == "uniform":
        process = "uniform (tokens resampled from the whole vocabulary)"
    schedule = get("noise_schedule")
    if schedule == "linear":
        schedule = f"linear beta, beta in [{get('linear_beta_min')}, {get('linear_beta_max')}]"
    elif schedule == "geometric":
        schedule = f"geometric, sigma in [{get('geometric_sigma_min')}, {get('geometric_sigma_max')}]"
    if "num_timesteps" not in config:
        steps = None  # not recorded (e.g. an adapter's metadata): say nothing rather than guess
    else:
        timesteps = get("num_timesteps")
        steps = "continuous time" if timesteps is None else f"{timesteps} discrete steps"
    objective = {"elbo": "NELBO (a bound on -log p)", "ce": "cross-entropy of x0 at a random noise level",
                 "score_entropy": "score entropy (SEDD)"}.get(get("objective"), get("objective"))
    rows = [("Corruption process", process), ("Noise schedule", schedule), ("Diffusion time", steps),
            ("Training objective", objective)]
    return [(name, _format(value)) for name, value in rows if value is not None]


def _adapter_rows(adapter: Mapping | None) -> list[tuple[str, str]]:
    if not adapter:
        return []
    rows = [("Method", peft_method_name(adapter.get("peft_type", "LORA"))), ("Rank r", adapter.get("r")),
            ("Alpha", adapter.get("lora_alpha")), ("Dropout", adapter.get("lora_dropout")),
            ("Target modules", sorted(adapter["target_modules"]) if isinstance(adapter.get("target_modules"),
                                                                             (list, set, tuple))
             else adapter.get("target_modules")),
            ("Trained in full (modules_to_save)", adapter.get("modules_to_save") or "-"),
            ("Trainable parameters", adapter.get("trainable_parameters"))]
    return [(name, _format(value)) for name, value in rows if value is not None]


_PEFT_METHODS = {"LORA": "LoRA (low-rank adaptation)", "ADALORA": "AdaLoRA", "LOHA": "LoHa", "LOKR": "LoKr",
                 "IA3": "(IA)\u00b3", "DORA": "DoRA"}


def peft_method_name(peft_type) -> str:
    """`PeftType.LORA` / `"LORA"` -> `"LoRA (low-rank adaptation)"`."""
    key = str(getattr(peft_type, "value", peft_type)).rsplit(".", 1)[-1].upper()
    return _PEFT_METHODS.get(key, key)


def dataset_slug(name: str) -> str:
    """A short model-index dataset `type` for `name`: a Hub id stays as it is, a local file becomes its
    stem (`../data/ptb/ptb.train.txt` -> `ptb-train`), a sentence becomes a hyphenated label."""
    import re

    if is_hub_dataset(name):
        return name
    base = os.path.basename(os.path.normpath(str(name))) or str(name)
    base = re.sub(r"\.(txt|jsonl?|csv|parquet|raw|tokens)$", "", base, flags=re.IGNORECASE)
    base = re.sub(r"\(.*?\)", "", base)
    return re.sub(r"[^a-z0-9]+", "-", base.lower()).strip("-")[:48].strip("-") or "dataset"


def is_local_path(value) -> bool:
    """Whether `value` names something on this machine (an existing path, or an absolute or relative
    path with a folder part that is not a Hub id)."""
    if not isinstance(value, (str, os.PathLike)):
        return False
    value = os.fspath(value)
    if os.path.exists(value) or os.path.isabs(value) or value.startswith(("./", "../", "~")):
        return True
    return value.count("/") > 1 or "\\" in value


def is_hub_dataset(name) -> bool:
    """A Hub dataset id (`org/name` or a canonical `name`) rather than a local file or a description."""
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(name, str) or is_local_path(name) or " " in name:
        return False
    try:
        validate_repo_id(name)
    except ValueError:
        return False
    return True


def _public(value):
    """`value` for the card's text: a local path shortened to its last component."""
    if isinstance(value, (list, tuple)):
        return [_public(v) for v in value]
    if isinstance(value, (str, os.PathLike)) and is_local_path(value):
        return f"{os.path.basename(os.path.normpath(os.fspath(value)))} (local)"
    return value


def _eval_rows(results: list[EvalResult]) -> list[dict]:
    return [{"dataset": _format(r.dataset_name), "split": _format(r.dataset_split or "-"),
             "metric": _format(r.metric_name or r.metric_type), "value": _format(float(r.metric_value))}
            for r in results]


def is_repo_id(name) -> bool:
    """Whether `name` is a valid Hub repo id (huggingface_hub's validator) and not a local folder (which,
    as for `from_pretrained`, takes precedence: `"base"` next to you is a folder, not a repo)."""
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except ValueError:
        return False
    return isinstance(name, str) and bool(name) and not os.path.isabs(name) and not os.path.isdir(name)


def _as_list(value) -> list:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


# ------------------------------------------------------------------------------------------ examples
GENERIC_EXAMPLE = "The history of the city begins with a small village by the river"


def _split_lines(ids: list[int], tokenizer) -> list[list[int]]:
    """Token ids cut at EOS tokens and newlines, special tokens dropped: the lines of a held-out block."""
    eos = getattr(tokenizer, "eos_token_id", None)
    special = set(getattr(tokenizer, "all_special_ids", ()))
    lines, line = [], []
    for token in ids:
        if token == eos or "\n" in tokenizer.decode([token]):
            lines.append(line)
            line = []
        elif token not in special:
            line.append(token)
    lines.append(line)
    return [line for line in lines if line]


def example_from_ids(tokenizer, ids: list[int], max_tokens: int = 24) -> dict | None:
    """A prompt (the first third of a line) and an infilling input (the line with a middle span masked)
    from a tokenized held-out line, or None when the line is too short or its text does not tokenize
    back to the same tokens without unknown tokens."""
    ids = list(ids)
    if len(ids) > max_tokens:  # end at a sentence end inside the window when there is one
        ends = [i for i in range(6, max_tokens + 1) if tokenizer.decode(ids[i - 1:i]).strip() in (".", "!", "?")]
        ids = ids[:ends[-1] if ends else max_tokens]
    mask = getattr(tokenizer, "mask_token", None)
    unk = getattr(tokenizer, "unk_token_id", None)
    if len(ids) < 6 or unk in ids:
        return None
    cut = max(2, len(ids) // 3)
    start, stop = len(ids) // 3, len(ids) // 3 + min(8, max(2, len(ids) // 3))
    decode = lambda part: tokenizer.decode(part, skip_special_tokens=True)  # noqa: E731
    example = {"line": decode(ids).strip(), "prompt": decode(ids[:cut]).strip(), "masked_tokens": stop - start,
               "before": decode(ids[:start]).rstrip(), "after": decode(ids[stop:])}
    if example["after"] and not example["after"][0].isspace() and " " in example["line"]:
        example["after"] = " " + example["after"]
    example["span"] = decode(ids[start:stop]).strip()
    if mask is not None:
        text = example["before"] + mask * example["masked_tokens"] + example["after"]
        again = tokenizer(text, add_special_tokens=False)["input_ids"]
        if again.count(tokenizer.mask_token_id) != example["masked_tokens"] or unk in again:
            return None
    if unk in tokenizer(example["prompt"], add_special_tokens=False)["input_ids"]:
        return None
    return example


def card_examples(model, tokenizer, held_out: Iterable[list[int]], *, seed: int = 0, steps: int = 16,
                  new_tokens: int = 16) -> dict:
    """Usage examples from a held-out text, with what `model` generates for them.

    The first held-out line (6 tokens or more, no unknown token) gives a prompt and an infilling input
    (a middle span of up to 8 tokens masked); the model then continues the prompt, fills the span and
    draws one unconditional sample (all seeded), so the card shows this checkpoint's real behaviour.
    """
    import torch

    from .streaming import decode_visible

    example = None
    for ids in held_out:
        for line in _split_lines(list(ids), tokenizer):
            example = example_from_ids(tokenizer, line)
            if example:
                break
        if example:
            break
    if example is None:
        return {}
    model = model.get_base_model() if hasattr(model, "get_base_model") and getattr(model, "peft_config", None) \
        else model
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)

    def run(input_ids, **kwargs):
        with torch.no_grad():
            out = model.generate(input_ids, steps=steps, generator=generator, **kwargs)
        return decode_visible(tokenizer, out[0].tolist())

    try:
        prompt = torch.tensor([tokenizer(example["prompt"], add_special_tokens=False)["input_ids"]], device=device)
        example["prompt_output"] = run(prompt, max_new_tokens=new_tokens)
        mask_id = getattr(tokenizer, "mask_token_id", None)
        if mask_id is not None and getattr(model.config, "block_size", None) is None:  # block models do not infill
            text = example["before"] + tokenizer.mask_token * example["masked_tokens"] + example["after"]
            masked = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]], device=device)
            example["infill_output"] = run(masked, mask_token_id=mask_id)
        example["sample"] = run(None, max_new_tokens=2 * new_tokens)
        example["steps"], example["new_tokens"], example["seed"] = steps, new_tokens, seed
    finally:
        model.train(was_training)
    return example


def default_examples(folder: str | os.PathLike | None) -> dict:
    """Examples when the run recorded none: generic English, unless the tokenizer saved in `folder` maps
    it to unknown tokens, in which case the first words of the tokenizer's own vocabulary."""
    example = {"prompt": "The history of the city", "before": "The history of the", "masked_tokens": 3,
               "after": " by the river", "line": GENERIC_EXAMPLE, "generic": True}
    if folder is None or not (Path(folder) / "tokenizer.json").is_file() and \
            not (Path(folder) / "tokenizer_config.json").is_file():
        return example
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError):
        return example
    ids = tokenizer(GENERIC_EXAMPLE, add_special_tokens=False)["input_ids"]
    if getattr(tokenizer, "unk_token_id", None) not in ids:
        return example
    special = set(tokenizer.all_special_ids)
    words = [t for t, i in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]) if i not in special]
    made = example_from_ids(tokenizer, tokenizer(" ".join(words[:12]), add_special_tokens=False)["input_ids"])
    return {**made, "generic": True} if made else example


def _example_literals(example: Mapping) -> dict:
    """The example strings as Python literals for the card's code blocks."""
    example = dict(example)
    for key in ("prompt", "before", "after"):
        example[f"{key}_literal"] = repr(example.get(key, ""))
    return example


# ------------------------------------------------------------------------------------------ rendering
def render_model_card(model=None, *, folder: str | os.PathLike | None = None,
                      eval_results: Iterable[EvalResult | Mapping] | None = None,
                      training_info: Mapping | None = None, repo_id: str | None = None,
                      license: str | None = None, datasets: Iterable[str] | str | None = None,
                      language: str | list[str] | None = None, base_model: str | None = None,
                      model_summary: str | None = None, tags: Iterable[str] = (),
                      template_path: str | os.PathLike | None = None, examples: Mapping | None = None,
                      headline: str | None = None) -> ModelCard:
    """Render the SFDLM card for `model` (or the saved `folder`) without writing it.

    Arguments left unset are taken from the record a previous `write_model_card` left in `folder`
    (`.sfdlm_card.json`), so a regenerated card keeps what the run measured.

    Args:
        eval_results: what the run measured, as `EvalResult`s or mappings of their fields
            (see `eval_result`); they become the `model-index` and the Evaluation table.
        training_info: free-form facts about the run, shown as the "Training data and budget" table;
            its `datasets` and `base_model` entries (if any) also go into the metadata.
        repo_id: the name used in the title and the usage snippets (defaults to the folder name).
        license, datasets, language, base_model, tags: metadata (base_model: what was fine-tuned). Only
            Hub ids go into the metadata; local datasets and base folders are named in the text.
        examples: usage examples from `card_examples` (default: generic text, checked against the tokenizer
            in `folder` if there is one).
        headline: one Markdown line with the run's main result (e.g. NELBO / entropy rate).
    """
    record = read_card_record(folder) if folder is not None else {}
    eval_results = eval_results if eval_results is not None else record.get("eval_results")
    training_info = training_info if training_info is not None else record.get("training_info")
    repo_id = repo_id or record.get("repo_id")
    license = license or record.get("license") or "apache-2.0"
    datasets = datasets if datasets is not None else record.get("datasets")
    language = language or record.get("language")
    base_model = base_model or record.get("base_model")
    model_summary = model_summary or record.get("model_summary")
    tags = list(tags) or list(record.get("tags") or [])
    examples = examples if examples is not None else record.get("examples")
    headline = headline or record.get("headline")
    results = as_eval_results(eval_results)
    training_info = dict(training_info or {})
    if not isinstance(license, str) or not license or " " in license:
        raise ValueError(f"`license` must be a Hub license id such as 'apache-2.0', got {license!r}.")
    info = describe(model, folder)
    adapter = info["adapter"]
    base_model = base_model or training_info.get("base_model") or (adapter or {}).get("base_model_name_or_path")
    if base_model and (not is_repo_id(base_model) or is_local_path(base_model)):
        # A local folder is no Hub metadata: say it in the text, leave it out of the YAML.
        training_info["base_model"] = (f"{_public(base_model)}; its Hub id was not recorded "
                                       "(`sfdlm push --base-model org/name` fills it in)")
        base_model = None
    elif base_model:
        training_info["base_model"] = base_model
    hub_datasets = [d for d in _as_list(datasets) or _as_list(training_info.get("datasets")) if is_hub_dataset(d)]
    name = repo_id or training_info.get("repo_id")
    if name is None:
        name = Path(folder).resolve().name if folder is not None else "sfdlm-model"
    all_tags = list(BASE_TAGS) + (list(ADAPTER_TAGS) if adapter else []) + list(tags)
    process = info["config"].get("process")
    if process:
        all_tags.append("masked-diffusion" if process == "absorbing" else "uniform-diffusion")
    card_data = ModelCardData(
        library_name="peft" if adapter else "transformers", pipeline_tag=PIPELINE_TAG, license=license,
        language=language, datasets=hub_datasets or None,
        base_model=base_model, tags=all_tags, model_name=name, eval_results=results or None,
    )
    if base_model and not adapter:
        card_data.base_model_relation = "finetune"
    training_rows = [(str(key).replace("_", " "), _format(_public(value))) for key, value in training_info.items()
                     if value is not None and key != "repo_id"]
    size_note = ("A small research checkpoint: expect fluent local structure at best, not reliable knowledge."
                 if info["num_parameters"] is not None and info["num_parameters"] < 100_000_000 else
                 "Quality depends on the training budget above; compare with autoregressive baselines "
                 "of the same size before relying on it.")
    return ModelCard.from_template(
        card_data, template_path=str(template_path or TEMPLATE_PATH), model_id=name, repo_id=name,
        model_summary=model_summary, is_adapter=bool(adapter), base_model=base_model, process=process,
        architecture_rows=_architecture_rows(info["config"], info["num_parameters"]),
        diffusion_rows=_diffusion_rows(info["config"]), adapter_rows=_adapter_rows(adapter),
        training_rows=training_rows, eval_rows=_eval_rows(results), size_note=size_note,
        examples=_example_literals(examples or default_examples(folder)), headline=headline,
    )


def write_model_card(output_dir: str | os.PathLike, model=None,
                     eval_results: Iterable[EvalResult | Mapping] | None = None,
                     training_info: Mapping | None = None, **kwargs) -> Path:
    """Render the card (see `render_model_card`) and save it as `output_dir/README.md`; returns the path.

    With `model=None` the card describes what is saved in `output_dir`. The card is checked with
    `validate_model_card` before it replaces any existing README.md.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise ValueError(f"Output folder {str(output_dir)!r} does not exist.")
    card = render_model_card(model, folder=output_dir, eval_results=eval_results,
                             training_info=training_info, **kwargs)
    check_card_data(card.data)
    path = output_dir / CARD_FILE
    card.save(path)
    record = read_card_record(output_dir)
    record.update({key: value for key, value in kwargs.items() if value is not None and key in _RECORDED})
    if eval_results is not None:
        record["eval_results"] = [_eval_result_dict(r) for r in as_eval_results(eval_results)]
    if training_info is not None:
        record["training_info"] = {k: _jsonable(v) for k, v in dict(training_info).items()}
    (output_dir / CARD_RECORD).write_text(json.dumps(record, indent=1), encoding="utf-8")
    return path


_RECORDED = ("repo_id", "license", "datasets", "language", "base_model", "model_summary", "tags", "examples",
             "headline")


def _jsonable(value):
    try:
        json.dumps(value)
        return value
    except TypeError:
        return str(value)


def _eval_result_dict(result: EvalResult) -> dict:
    return {name: getattr(result, name) for name in _EVAL_RESULT_FIELDS if getattr(result, name, None) is not None}


def read_card_record(folder: str | os.PathLike | None) -> dict:
    """What the last `write_model_card` into `folder` was given (empty if none)."""
    if folder is None or not (Path(folder) / CARD_RECORD).is_file():
        return {}
    try:
        return _read_json(Path(folder) / CARD_RECORD)
    except (OSError, ValueError):
        return {}


# ------------------------------------------------------------------------------------------ training runs
def eval_results_from_metrics(metrics: Mapping[str, float], dataset_name: str, *, split: str = "validation",
                              tokenizer_name: str | None = None, dataset_type: str | None = None,
                              bytes_per_token: float | None = None) -> list[EvalResult]:
    """Card entries for the held-out metrics a `DiffusionTrainer.evaluate` returns: `eval/nelbo` (nats per
    scored token, an upper bound on the NLL), `eval/perplexity` = exp(NELBO) and, given the held-out text's
    UTF-8 bytes per token, bits per byte; all three are upper bounds. Metric types use the Hub's names
    (`perplexity`, `bits_per_byte`) where one exists; the tokenizer goes into the card's text, not here.
    Other keys are ignored."""
    del tokenizer_name  # named in the card's text (a local tokenizer path is no metadata)
    name = _short_dataset_name(dataset_name)
    kind = dataset_type or dataset_slug(dataset_name)
    results = []
    nelbo = metrics.get("eval/nelbo")
    if nelbo is not None:
        results.append(eval_result("nelbo", float(nelbo), name, split=split, dataset_type=kind,
                                   metric_name="NELBO (nats/token, upper bound)"))
    if metrics.get("eval/perplexity") is not None:
        results.append(eval_result("perplexity", float(metrics["eval/perplexity"]), name, split=split,
                                   dataset_type=kind, metric_name="Perplexity (upper bound, exp NELBO)"))
    if nelbo is not None and bytes_per_token:
        results.append(eval_result("bits_per_byte", float(nelbo) / math.log(2) / bytes_per_token, name, split=split,
                                   dataset_type=kind, metric_name="Bits per byte (upper bound)"))
    return results


def _short_dataset_name(name: str) -> str:
    return name if is_hub_dataset(name) else os.path.basename(os.path.normpath(str(name))) or str(name)


def hardware_description() -> str:
    """The device a run used, e.g. `1 x NVIDIA H100 80GB HBM3` or `CPU: AMD EPYC 7B13, 2 cores, 1 torch thread`."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    name = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            name = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), None)
    except OSError:
        pass
    import platform

    threads = torch.get_num_threads()
    return (f"CPU: {name or platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{threads} torch thread{'s' if threads != 1 else ''}")


def _held_out_ids(trainer, limit: int = 64) -> list[list[int]]:
    """Token ids of up to `limit` held-out examples of a trainer (its evaluation data)."""
    loader = getattr(trainer, "eval_loader", None)
    dataset = getattr(loader, "dataset", None)
    if dataset is None:
        return []
    from itertools import islice

    items = (dataset[i] for i in range(min(limit, len(dataset)))) if hasattr(dataset, "__len__") \
        else islice(iter(dataset), limit)
    rows = []
    for item in items:
        ids = item.get("input_ids") if isinstance(item, Mapping) else None
        if ids is not None:
            rows.append([int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)])
    return rows


def bytes_per_token(tokenizer, rows: list[list[int]]) -> float | None:
    """UTF-8 bytes per token of the text `rows` decode to (special tokens not counted)."""
    special = set(getattr(tokenizer, "all_special_ids", ()))
    tokens = sum(1 for row in rows for i in row if i not in special)
    if not tokens:
        return None
    text_bytes = sum(len(tokenizer.decode(row, skip_special_tokens=True).encode("utf-8")) for row in rows)
    return text_bytes / tokens


class ModelCardCallback:
    """A `hf_sfdlm.trainer.TrainerCallback` that writes the model card into every folder the trainer saves
    (the final model and `best/`), with the latest held-out metrics as the model-index.

    At each save it also records the hardware and wall time, builds the usage examples from the
    trainer's held-out data (`card_examples`) and, given the corpus's `entropy_rate`, the NELBO / entropy
    rate headline.

    Args:
        dataset_name: what the held-out metrics were measured on (shown in the card and the model-index).
        training_info: static facts about the run (data, method, base model, ...); the step count, tokens
            seen and the main optimisation settings are added from the trainer at each save.
        tokenizer_name: named in the card's text.
        dataset_type: the model-index dataset `type` (default: a short label made from `dataset_name`).
        entropy_rate: the exact entropy rate of the training source in nats/token, when known (synthetic
            corpus): the card then states NELBO / entropy rate.
        extra_files: `{file name: callable(model) -> str}` written next to the card (e.g. adapter metadata).
        card_kwargs: passed to `write_model_card` (`repo_id`, `license`, `base_model`, `datasets`, ...).
    """

    def __init__(self, dataset_name: str, training_info: Mapping | None = None, tokenizer_name: str | None = None,
                 extra_files: Mapping | None = None, *, dataset_type: str | None = None,
                 entropy_rate: float | None = None, **card_kwargs):
        self.dataset_name = dataset_name
        self.dataset_type = dataset_type
        self.training_info = dict(training_info or {})
        self.tokenizer_name = tokenizer_name
        self.entropy_rate = entropy_rate
        self.extra_files = dict(extra_files or {})
        self.card_kwargs = card_kwargs
        self.metrics: dict[str, float] = {}
        self._start: float | None = None
        self._examples: dict | None = None
        self._held_out: list[list[int]] | None = None
        self._bytes_per_token: float | None = None

    def on_train_begin(self, trainer) -> None:
        import time

        self._start = time.monotonic()

    def on_step_end(self, trainer, step: int, loss: float) -> None: ...

    def on_evaluate(self, trainer, metrics: Mapping[str, float]) -> None:
        self.metrics = dict(metrics)

    def on_train_end(self, trainer, result) -> None: ...

    def headline(self) -> str | None:
        nelbo = self.metrics.get("eval/nelbo")
        if nelbo is None or not self.entropy_rate:
            return None
        return (f"**Held-out NELBO / entropy rate = {nelbo / self.entropy_rate:.3f}**: NELBO {nelbo:.4f} nats/token "
                f"against the corpus's exact entropy rate h = {self.entropy_rate:.4f} nats/token (1.0 is the best "
                "any model can do; the NELBO is an upper bound on the model's negative log-likelihood).")

    def eval_results(self, trainer=None) -> list[EvalResult]:
        if trainer is not None and self._bytes_per_token is None and trainer.tokenizer is not None:
            self._bytes_per_token = bytes_per_token(trainer.tokenizer, _held_out_ids(trainer))
        return eval_results_from_metrics(self.metrics, self.dataset_name, dataset_type=self.dataset_type,
                                         bytes_per_token=self._bytes_per_token)

    def run_info(self, trainer) -> dict:
        """The card's "Training data and budget" facts at this point of the run."""
        import time

        args = trainer.args
        info = {**self.training_info, "tokenizer": self.tokenizer_name or self.training_info.get("tokenizer"),
                "optimizer_steps": trainer.state.step, "tokens_seen": trainer.state.tokens,
                "batch_size_sequences": args.batch_size, "learning_rate": args.learning_rate,
                "lr_schedule": f"{args.lr_scheduler}, {args.warmup_steps} warm-up steps",
                "mixed_precision": args.mixed_precision,
                "weights_saved": f"EMA, decay {args.ema_decay}" if args.ema_decay else "final (no EMA)",
                "hardware": hardware_description()}
        if self._start is not None:
            info["wall_time"] = f"{time.monotonic() - self._start:.0f} s"
        return info

    def on_save(self, trainer, directory: Path) -> None:
        args = trainer.args
        model = trainer.eval_model()
        for name, make in self.extra_files.items():
            (Path(directory) / name).write_text(make(model), encoding="utf-8")
        if trainer.tokenizer is not None:  # again at every save: the outputs are this checkpoint's
            if self._held_out is None:
                self._held_out = _held_out_ids(trainer)
            self._examples = card_examples(model, trainer.tokenizer, self._held_out, seed=args.seed)
        # `directory` is a temporary folder: name the card after the run's output folder unless told otherwise.
        card_kwargs = {"repo_id": Path(args.output_dir).resolve().name, **self.card_kwargs}
        write_model_card(directory, model, eval_results=self.eval_results(trainer), training_info=self.run_info(trainer),
                         examples=self._examples or None, headline=self.headline(), **card_kwargs)


# ------------------------------------------------------------------------------------------ checking
def check_card_data(data: ModelCardData) -> None:
    """Raise `ValueError` listing every problem of an SFDLM card's metadata (local checks only)."""
    problems = [f"missing `{key}`" for key in REQUIRED_METADATA if not getattr(data, key, None)]
    if getattr(data, "pipeline_tag", None) not in (None, PIPELINE_TAG):
        problems.append(f"pipeline_tag {data.pipeline_tag!r} is not {PIPELINE_TAG!r}")
    tags = getattr(data, "tags", None) or []
    if "sfdlm" not in tags:
        problems.append("tags lack 'sfdlm'")
    base = getattr(data, "base_model", None)
    if base is not None and not all(isinstance(b, str) and is_repo_id(b) for b in _as_list(base)):
        problems.append(f"base_model {base!r} is not a Hub repo id")
    try:
        as_eval_results(getattr(data, "eval_results", None) or [])
    except (TypeError, ValueError) as error:
        problems.append(str(error))
    if problems:
        raise ValueError("Invalid SFDLM model card metadata: " + "; ".join(problems) + ".")


def validate_model_card(path: str | os.PathLike) -> ModelCard:
    """Parse a card back with `ModelCard.load` (which checks the YAML and the model-index) and check
    the metadata an SFDLM card must have; returns the parsed card."""
    path = Path(path)
    if path.is_dir():
        path = path / CARD_FILE
    if not path.is_file():
        raise ValueError(f"No model card at {str(path)!r}.")
    card = ModelCard.load(path)  # ValueError on malformed YAML or model-index
    check_card_data(card.data)
    return card


def is_sfdlm_card(path: str | os.PathLike) -> bool:
    """Whether `path` (a README.md or its folder) holds a valid SFDLM card (not, e.g., PEFT's placeholder)."""
    try:
        validate_model_card(path)
    except ValueError:
        return False
    return True


__all__ = [
    "ModelCardCallback",
    "TEMPLATE_PATH",
    "as_eval_results",
    "check_card_data",
    "describe",
    "eval_result",
    "eval_results_from_metrics",
    "is_sfdlm_card",
    "render_model_card",
    "validate_model_card",
    "write_model_card",
]
