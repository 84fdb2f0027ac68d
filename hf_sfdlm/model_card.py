"""Model cards for SFDLM checkpoints and LoRA adapters, rendered through `huggingface_hub.ModelCard`.

`write_model_card(output_dir, model, eval_results=..., training_info=...)` renders
`model_cards/sfdlm_template.md` into `output_dir/README.md`: YAML metadata (`library_name`,
`pipeline_tag`, `license`, `datasets`, `tags`, `base_model` for fine-tunes and adapters, and a
`model-index` holding the evaluation results the run measured), then the architecture and diffusion
settings, training data and budget, how to generate and infill, intended use and limitations, and the
SFDLM citation. Training and fine-tuning runs call it at the end; `hf_sfdlm.hub.push_model` calls it
when the folder has no SFDLM card yet.

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
    return as_eval_results([dict(task_type=task_type, dataset_type=dataset_type or dataset_name,
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
    timesteps = get("num_timesteps", "unknown")
    steps = "continuous time" if timesteps is None else f"{timesteps} discrete steps"
    objective = {"elbo": "NELBO (a bound on -log p)", "ce": "cross-entropy of x0 at a random noise level",
                 "score_entropy": "score entropy (SEDD)"}.get(get("objective"), get("objective"))
    rows = [("Corruption process", process), ("Noise schedule", schedule), ("Diffusion time", steps),
            ("Training objective", objective)]
    return [(name, _format(value)) for name, value in rows if value is not None]


def _adapter_rows(adapter: Mapping | None) -> list[tuple[str, str]]:
    if not adapter:
        return []
    rows = [("Method", adapter.get("peft_type", "LORA")), ("Rank r", adapter.get("r")),
            ("Alpha", adapter.get("lora_alpha")), ("Dropout", adapter.get("lora_dropout")),
            ("Target modules", sorted(adapter["target_modules"]) if isinstance(adapter.get("target_modules"),
                                                                             (list, set, tuple))
             else adapter.get("target_modules")),
            ("Trained in full (modules_to_save)", adapter.get("modules_to_save") or "-"),
            ("Trainable parameters", adapter.get("trainable_parameters"))]
    return [(name, _format(value)) for name, value in rows if value is not None]


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


# ------------------------------------------------------------------------------------------ rendering
def render_model_card(model=None, *, folder: str | os.PathLike | None = None,
                      eval_results: Iterable[EvalResult | Mapping] | None = None,
                      training_info: Mapping | None = None, repo_id: str | None = None,
                      license: str = "apache-2.0", datasets: Iterable[str] | str | None = None,
                      language: str | list[str] | None = None, base_model: str | None = None,
                      model_summary: str | None = None, tags: Iterable[str] = (),
                      template_path: str | os.PathLike | None = None) -> ModelCard:
    """Render the SFDLM card for `model` (or the saved `folder`) without writing it.

    Args:
        eval_results: what the run measured, as `EvalResult`s or mappings of their fields
            (see `eval_result`); they become the `model-index` and the Evaluation table.
        training_info: free-form facts about the run, shown as the "Training data and budget" table;
            its `datasets` and `base_model` entries (if any) also go into the metadata.
        repo_id: the name used in the title and the usage snippets (defaults to the folder name).
        license, datasets, language, base_model, tags: metadata (base_model: what was fine-tuned).
    """
    results = as_eval_results(eval_results)
    training_info = dict(training_info or {})
    if not isinstance(license, str) or not license or " " in license:
        raise ValueError(f"`license` must be a Hub license id such as 'apache-2.0', got {license!r}.")
    info = describe(model, folder)
    adapter = info["adapter"]
    base_model = base_model or training_info.get("base_model") or (adapter or {}).get("base_model_name_or_path")
    if base_model and not is_repo_id(base_model):
        # A local folder is no Hub metadata: say it in the text, leave it out of the YAML.
        training_info.setdefault("base_model", base_model)
        base_model = None
    name = repo_id or training_info.get("repo_id")
    if name is None:
        name = Path(folder).resolve().name if folder is not None else "sfdlm-model"
    all_tags = list(BASE_TAGS) + (list(ADAPTER_TAGS) if adapter else []) + list(tags)
    process = info["config"].get("process")
    if process:
        all_tags.append("masked-diffusion" if process == "absorbing" else "uniform-diffusion")
    card_data = ModelCardData(
        library_name="peft" if adapter else "transformers", pipeline_tag=PIPELINE_TAG, license=license,
        language=language, datasets=_as_list(datasets) or _as_list(training_info.get("datasets")) or None,
        base_model=base_model, tags=all_tags, model_name=name, eval_results=results or None,
    )
    if base_model and not adapter:
        card_data.base_model_relation = "finetune"
    training_rows = [(str(key).replace("_", " "), _format(value)) for key, value in training_info.items()
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
    return path


# ------------------------------------------------------------------------------------------ training runs
def eval_results_from_metrics(metrics: Mapping[str, float], dataset_name: str, *, split: str = "validation",
                              tokenizer_name: str | None = None, dataset_type: str | None = None) -> list[EvalResult]:
    """Card entries for the held-out metrics a `DiffusionTrainer.evaluate` returns (`eval/nelbo`, nats per
    scored token, and `eval/perplexity` = exp(NELBO), both upper bounds); other keys are ignored."""
    unit = f"token-level, {tokenizer_name} tokens" if tokenizer_name else "token-level"
    results = []
    if metrics.get("eval/nelbo") is not None:
        results.append(eval_result("nelbo", float(metrics["eval/nelbo"]), dataset_name, split=split,
                                   dataset_type=dataset_type, metric_name=f"NELBO, nats/token ({unit})"))
    if metrics.get("eval/perplexity") is not None:
        results.append(eval_result("perplexity", float(metrics["eval/perplexity"]), dataset_name, split=split,
                                   dataset_type=dataset_type,
                                   metric_name=f"Perplexity upper bound exp(NELBO) ({unit})"))
    return results


class ModelCardCallback:
    """A `hf_sfdlm.trainer.TrainerCallback` that writes the model card into every folder the trainer saves
    (the final model and `best/`), with the latest held-out metrics as the model-index.

    Args:
        dataset_name: what the held-out metrics were measured on (shown in the card and the model-index).
        training_info: static facts about the run (data, method, base model, ...); the step count, tokens
            seen and the main optimisation settings are added from the trainer at each save.
        extra_files: `{file name: callable(model) -> str}` written next to the card (e.g. adapter metadata).
        card_kwargs: passed to `write_model_card` (`repo_id`, `license`, `base_model`, `datasets`, ...).
    """

    def __init__(self, dataset_name: str, training_info: Mapping | None = None, tokenizer_name: str | None = None,
                 extra_files: Mapping | None = None, **card_kwargs):
        self.dataset_name = dataset_name
        self.training_info = dict(training_info or {})
        self.tokenizer_name = tokenizer_name
        self.extra_files = dict(extra_files or {})
        self.card_kwargs = card_kwargs
        self.metrics: dict[str, float] = {}

    def on_train_begin(self, trainer) -> None: ...

    def on_step_end(self, trainer, step: int, loss: float) -> None: ...

    def on_evaluate(self, trainer, metrics: Mapping[str, float]) -> None:
        self.metrics = dict(metrics)

    def on_train_end(self, trainer, result) -> None: ...

    def on_save(self, trainer, directory: Path) -> None:
        args = trainer.args
        info = {**self.training_info, "optimizer_steps": trainer.state.step, "tokens_seen": trainer.state.tokens,
                "batch_size_sequences": args.batch_size, "learning_rate": args.learning_rate,
                "lr_schedule": f"{args.lr_scheduler}, {args.warmup_steps} warm-up steps",
                "mixed_precision": args.mixed_precision,
                "weights_saved": f"EMA, decay {args.ema_decay}" if args.ema_decay else "final (no EMA)"}
        model = trainer.eval_model()
        for name, make in self.extra_files.items():
            (Path(directory) / name).write_text(make(model), encoding="utf-8")
        tokenizer_name = self.tokenizer_name or getattr(trainer.tokenizer, "name_or_path", None) or None
        results = eval_results_from_metrics(self.metrics, self.dataset_name, tokenizer_name=tokenizer_name)
        # `directory` is a temporary folder: name the card after the run's output folder unless told otherwise.
        card_kwargs = {"repo_id": Path(args.output_dir).resolve().name, **self.card_kwargs}
        write_model_card(directory, model, eval_results=results, training_info=info, **card_kwargs)


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
