"""Push SFDLM checkpoints and LoRA adapters to the Hugging Face Hub, and pull them back.

`push_model(model_dir, repo_id, ...)` sends one commit with everything a user needs: the weights
(safetensors), `config.json` with its `auto_map`, the remote-code files it names, tokenizer and
generation config if saved, and the model card (written first if the folder has no SFDLM card).
`commit_operations(model_dir)` returns the exact `CommitOperationAdd` list it would send, so it can be
inspected (or tested) without the network. Adapter folders (`adapter_config.json`) push the same way.

`load_pretrained(repo_id_or_dir)` is `AutoModel.from_pretrained(..., trust_remote_code=True)`, which
also understands adapter repos (base from `adapter_config.json`, then `hf_sfdlm.lora.load_adapter`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.utils import filter_repo_objects, validate_repo_id

from .model_card import CARD_FILE, is_repo_id, is_sfdlm_card, validate_model_card, write_model_card

# Never uploaded: training state, logs and caches that may sit next to the final weights in a run's output
# folder, and the other models a run saves there (`best/`, `merged/`: push those folders on their own).
DEFAULT_IGNORE_PATTERNS = (
    ".*", "*/.*", "__pycache__/*", "*.pyc", "*.lock", "checkpoint*/*", "checkpoints/*", "runs/*", "logs/*",
    "optimizer*", "scheduler*", "rng_state*", "training_state*", "trainer_state*", "*.log",
    "best/*", "merged/*", "data/*", "tokenizer/*",
)


def check_repo_id(repo_id: str) -> str:
    """Return `repo_id` if huggingface_hub accepts it as a model repo id, else raise `ValueError`."""
    if not isinstance(repo_id, str):
        raise TypeError(f"`repo_id` must be a string such as 'org/name', got {type(repo_id).__name__}.")
    try:
        validate_repo_id(repo_id)  # HFValidationError is a ValueError
    except ValueError as error:
        raise ValueError(f"Invalid Hub repo id {repo_id!r}: {error}") from error
    return repo_id


def check_revision(revision: str | None) -> str | None:
    """A branch name for the commit (or None for the default branch)."""
    if revision is None:
        return None
    if not isinstance(revision, str) or not revision.strip() or any(c.isspace() for c in revision) \
            or ".." in revision or revision.startswith(("/", "-")) or revision.endswith(("/", ".lock")):
        raise ValueError(f"`revision` must be a branch name such as 'main' or 'v1', got {revision!r}.")
    return revision


def folder_kind(model_dir: str | os.PathLike) -> str:
    """`"model"` (a `save_pretrained` folder) or `"adapter"` (a PEFT adapter folder); `ValueError` otherwise."""
    folder = Path(model_dir)
    if not folder.is_dir():
        raise ValueError(f"Model folder {str(folder)!r} does not exist.")
    if (folder / "adapter_config.json").is_file():
        return "adapter"
    if (folder / "config.json").is_file():
        return "model"
    raise ValueError(f"Model folder {str(folder)!r} has no config.json (nor adapter_config.json): save the model "
                     "with `save_pretrained` (or the adapter with `hf_sfdlm.lora.save_adapter`) first.")


def check_model_folder(model_dir: str | os.PathLike) -> str:
    """Check that a folder holds a loadable SFDLM model or adapter; return its kind.

    A model needs `config.json` with model_type 'sfdlm' and an `auto_map` whose remote-code files are
    present, and safetensors weights; an adapter needs `adapter_model.safetensors`.
    """
    folder = Path(model_dir)
    kind = folder_kind(folder)
    if kind == "adapter":
        if not (folder / "adapter_model.safetensors").is_file():
            raise ValueError(f"Adapter folder {str(folder)!r} has no adapter_model.safetensors.")
        return kind
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{str(folder / 'config.json')!r} is not valid JSON: {error}") from error
    if config.get("model_type") != "sfdlm":
        raise ValueError(f"{str(folder / 'config.json')!r} has model_type {config.get('model_type')!r}, expected 'sfdlm'.")
    auto_map = config.get("auto_map") or {}
    missing = [name for name in ("AutoConfig", "AutoModel") if name not in auto_map]
    if missing:
        raise ValueError(f"{str(folder / 'config.json')!r} has no auto_map entry for {missing}: without it "
                         "`from_pretrained(..., trust_remote_code=True)` cannot find the model code. Save the "
                         "model with `SFDLMForDiffusionLM.save_pretrained`.")
    for reference in auto_map.values():
        module = str(reference).split("--")[-1].rsplit(".", 1)[0]
        if not (folder / f"{module}.py").is_file():
            raise ValueError(f"auto_map names {reference!r} but {module}.py is missing from {str(folder)!r}.")
    if not list(folder.glob("*.safetensors")):
        raise ValueError(f"Model folder {str(folder)!r} has no safetensors weights.")
    return kind


def _adapter_base_repo(adapter_dir: str | os.PathLike, base_model: str | None) -> str:
    """The Hub repo id of an adapter's base: `base_model` if given (then also written into
    adapter_config.json, so `load_pretrained` and `AutoPeftModel` find the base from the Hub), else the
    adapter's `base_model_name_or_path`, which must then be a repo id rather than a local folder."""
    path = Path(adapter_dir) / "adapter_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    recorded = config.get("base_model_name_or_path")
    chosen = base_model or recorded
    if not chosen or not is_repo_id(chosen):
        raise ValueError(f"The adapter's base model {chosen!r} is not a Hub repo id, so nobody could load the "
                         "pushed adapter: name the base's repo with base_model='org/name' (`--base-model`).")
    if chosen != recorded:
        config["base_model_name_or_path"] = chosen
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return chosen


def _card_is_current(path: Path, base_model: str | None) -> bool:
    if not is_sfdlm_card(path):
        return False
    return base_model is None or validate_model_card(path).data.base_model == base_model


def commit_operations(model_dir: str | os.PathLike, allow_patterns: Sequence[str] | None = None,
                      ignore_patterns: Sequence[str] | None = None) -> list[CommitOperationAdd]:
    """The exact `CommitOperationAdd`s `push_model` sends: every file of the folder (recursively, sorted),
    minus `DEFAULT_IGNORE_PATTERNS` and `ignore_patterns`, restricted to `allow_patterns` if given."""
    folder = Path(model_dir)
    check_model_folder(folder)
    files = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    kept = filter_repo_objects(files, allow_patterns=allow_patterns,
                               ignore_patterns=list(DEFAULT_IGNORE_PATTERNS) + list(ignore_patterns or []))
    return [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in kept]


def push_model(model_dir: str | os.PathLike, repo_id: str, *, private: bool | None = None,
               revision: str | None = None, create_pr: bool = False, commit_message: str | None = None,
               token: str | None = None, write_card: bool = True, allow_patterns: Sequence[str] | None = None,
               ignore_patterns: Sequence[str] | None = None, api: HfApi | None = None, dry_run: bool = False,
               **card_kwargs):
    """Upload a saved SFDLM model or adapter folder to the Hub in one commit.

    Everything is checked before the first request: the repo id (huggingface_hub's validator), the
    revision, the folder (config, auto_map and remote code, safetensors weights). If the folder has no
    valid SFDLM model card, one is written into it first (`write_model_card`, `card_kwargs` passed on).

    Args:
        model_dir: a `save_pretrained` folder, or an adapter folder from `hf_sfdlm.lora.save_adapter`.
        repo_id: `"org/name"` (or `"name"` for your own namespace); created if it does not exist.
        private: visibility of a newly created repo (ignored when it exists).
        revision: branch to commit to (created from the default branch if needed); None: default branch.
        card_kwargs: for `write_model_card` (`license`, `datasets`, ...). For an adapter, `base_model` names
            the base's Hub repo (required when adapter_config.json records a local folder).
        create_pr: open a pull request with the commit instead of committing to the branch.
        api: an `HfApi` to use (defaults to `HfApi(token=token)`).
        dry_run: stop before the first request and return the commit operations.

    Returns:
        The `CommitInfo` of `HfApi.create_commit` (its `pr_url` is set when `create_pr`), or with
        `dry_run` the list of `CommitOperationAdd` that would be sent.
    """
    check_repo_id(repo_id)
    check_revision(revision)
    if not isinstance(create_pr, bool):
        raise TypeError(f"`create_pr` must be a bool, got {create_pr!r}.")
    if private is not None and not isinstance(private, bool):
        raise TypeError(f"`private` must be a bool or None, got {private!r}.")
    kind = check_model_folder(model_dir)
    if kind == "adapter":
        card_kwargs["base_model"] = _adapter_base_repo(model_dir, card_kwargs.get("base_model"))
    if write_card and not _card_is_current(Path(model_dir) / CARD_FILE, card_kwargs.get("base_model")):
        write_model_card(model_dir, repo_id=repo_id, **card_kwargs)
    operations = commit_operations(model_dir, allow_patterns, ignore_patterns)
    if dry_run:
        return operations
    api = api or HfApi(token=token)
    repo_id = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True).repo_id
    if revision is not None:
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    return api.create_commit(
        repo_id, operations=operations, repo_type="model", revision=revision, create_pr=create_pr,
        commit_message=commit_message or f"Upload SFDLM {kind} with hf_sfdlm",
    )


def load_pretrained(name_or_path: str | os.PathLike, *, revision: str | None = None, is_trainable: bool = False,
                    cache_dir: str | os.PathLike | None = None, **kwargs):
    """Load an SFDLM model, or an adapter on its base, from a local folder or a Hub repo id.

    A local folder is checked first (missing config: `ValueError`); a repo id is validated and then
    resolved by transformers/huggingface_hub (cache first; `HF_HUB_OFFLINE=1` uses only the cache).
    `trust_remote_code=True` is implied: the model code comes from the checkpoint. `kwargs` go to
    `from_pretrained` (e.g. `dtype`).
    """
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    from transformers import AutoModel

    local = Path(name_or_path)
    is_local = bool(str(name_or_path)) and local.is_dir()
    if is_local:
        kind = folder_kind(local)
        adapter_config = local / "adapter_config.json" if kind == "adapter" else None
    else:
        check_repo_id(str(name_or_path))
        try:
            adapter_config = Path(hf_hub_download(str(name_or_path), "adapter_config.json", revision=revision,
                                                  cache_dir=cache_dir))
        except (EntryNotFoundError, LocalEntryNotFoundError):
            adapter_config = None
    if adapter_config is None:
        return AutoModel.from_pretrained(str(name_or_path), revision=revision, trust_remote_code=True,
                                         cache_dir=cache_dir, **kwargs)
    from .lora import load_adapter

    base_name = json.loads(adapter_config.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base_name:
        raise ValueError(f"The adapter {str(name_or_path)!r} does not name its base model "
                         "(base_model_name_or_path is empty in adapter_config.json).")
    base = AutoModel.from_pretrained(base_name, trust_remote_code=True, cache_dir=cache_dir, **kwargs)
    if is_local:
        adapter_dir = str(local)
    else:
        adapter_dir = snapshot_download(str(name_or_path), revision=revision, cache_dir=cache_dir,
                                        allow_patterns=["adapter_*", "sfdlm_adapter.json"])
    return load_adapter(base, adapter_dir, is_trainable=is_trainable)


__all__ = [
    "DEFAULT_IGNORE_PATTERNS",
    "check_model_folder",
    "check_repo_id",
    "check_revision",
    "commit_operations",
    "folder_kind",
    "load_pretrained",
    "push_model",
]
