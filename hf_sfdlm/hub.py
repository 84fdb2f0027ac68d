"""Push SFDLM checkpoints and LoRA adapters to the Hugging Face Hub, and pull them back.

`push_model(model_dir, repo_id, ...)` sends one commit with everything a user needs: the weights
(safetensors), `config.json` with its `auto_map`, the remote-code files it names, tokenizer and
generation config if saved, and the model card (written first if the folder has no SFDLM card).
`commit_operations(model_dir)` returns the exact `CommitOperationAdd` list it would send, so it can be
inspected (or tested) without the network. Adapter folders (`adapter_config.json`) push the same way.

Before anything is uploaded, `verify_model_folder` checks that the folder loads: every file's integrity
(`hf_sfdlm.integrity`: safetensors headers and sizes, checksums, JSON files, tokenizer), then the model
itself with one tiny forward pass. Only the folder's regular files are sent: a symbolic link (or any other
non-regular file) that is not excluded is refused, never followed. Files other than known model, tokenizer
and card files are uploaded only when allowed (`check_upload_files`: `include_patterns`,
`allow_unknown_files`); secrets and hard links to files outside the folder never are. `dry_run=True` writes
nothing.

`load_pretrained(repo_id_or_dir)` loads a model, or an adapter on its base (`adapter_config.json`, then
`hf_sfdlm.lora.load_adapter`), after the same integrity checks and the consent rules of
`hf_sfdlm.remote_code`: no code from the folder runs unless `trust_remote_code=True`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.utils import filter_repo_objects, validate_repo_id

from . import integrity
from .model_card import (CARD_FILE, CARD_RECORD, check_card_data, is_repo_id, is_sfdlm_card, render_model_card,
                         validate_model_card, write_model_card)
from .remote_code import check_folder_code, check_trust_remote_code

# Never uploaded: training state, logs and caches that may sit next to the final weights in a run's output
# folder, and the other models a run saves there (`best/`, `merged/`: push those folders on their own).
DEFAULT_IGNORE_PATTERNS = (
    ".*", "*/.*", "__pycache__/*", "*.pyc", "*.lock", "checkpoint*/*", "checkpoints/*", "runs/*", "logs/*",
    "optimizer*", "scheduler*", "rng_state*", "training_state*", "trainer_state*", "*.log",
    "best/*", "merged/*", "data/*", "tokenizer/*",
)


# Files `push` uploads without asking: what save_pretrained / save_adapter / tokenizers / `sfdlm train` write at
# the top of a model folder (plus top-level `*.py` files named like a module of hf_sfdlm: the remote code).
# Anything else must be allowed explicitly (`include_patterns` / --include, or `allow_unknown_files`).
KNOWN_FILES = (
    "config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json", "checksums.json",
    "README.md", "adapter_config.json", "sfdlm_adapter.json", "train_report.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "chat_template.jinja", "chat_template.json",
)
# An unknown file at least this large is uploaded only when an `include_patterns` entry names it
# (`allow_unknown_files` is not enough): a stray multi-GiB file is a mistake far more often than not.
MAX_UNKNOWN_FILE_BYTES = 100 * 2**20
# Uploaded only when an `include_patterns` entry names them: code that transformers runs for the repo's users
# (`generate(custom_generate=repo)` runs `custom_generate/generate.py`), other code, and pickles.
CODE_PATTERNS = ("custom_generate/*", "*.py", "*.sh", "*.so", "*.dll", "*.dylib", "*.exe", "*.pkl", "*.pickle",
                 "*.bin", "*.pt", "*.pth", "*.ckpt")
# Never uploaded: private keys and credential files (by name, and by content for the first bytes of a file).
SECRET_PATTERNS = ("id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*", "*.pem", "*.key", "*.p12", "*.pfx", "*.keystore",
                   "*.jks", ".netrc", "*.netrc", "credentials*", "*.kdbx", "*_token", "token")
_SECRET_CONTENT = (b"PRIVATE KEY-----", b"-----BEGIN PGP PRIVATE", b"PuTTY-User-Key-File")


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


# Weight files in pickle formats: loading one can run code, so no loader here opens them.
PICKLE_WEIGHT_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")


def check_safetensors_weights(folder: str | os.PathLike) -> None:
    """Refuse (`ValueError`, naming the files) a model or adapter folder whose weights are only in a pickle
    format (`pytorch_model.bin`, `adapter_model.bin`, ...): unpickling can run code, so they are never
    loaded; convert them to safetensors first."""
    folder = Path(folder)
    pickles = sorted(path.name for pattern in PICKLE_WEIGHT_PATTERNS for path in folder.glob(pattern)
                     if path.is_file())
    if pickles and not list(folder.glob("*.safetensors")):
        raise ValueError(f"{str(folder)!r} holds its weights as pickle file(s) {pickles}, which hf_sfdlm never loads "
                         "(unpickling can run code); save them as safetensors (`save_pretrained` does by default).")


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
    config = integrity.read_json(folder / "config.json")
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


def _adapter_config_for_push(adapter_dir: Path, base_model: str | None) -> tuple[str, bytes | None]:
    """The Hub repo id of an adapter's base, and the adapter_config.json to upload if it must change.

    The base is `base_model` if given (then also written into the uploaded adapter_config.json, so
    `load_pretrained` and `AutoPeftModel` find the base from the Hub), else the adapter's
    `base_model_name_or_path`, which must then be a repo id rather than a local folder."""
    config = integrity.read_json(adapter_dir / "adapter_config.json")
    recorded = config.get("base_model_name_or_path")
    chosen = base_model or recorded
    if not chosen or not is_repo_id(chosen):
        raise ValueError(f"The adapter's base model {chosen!r} is not a Hub repo id, so nobody could load the "
                         "pushed adapter: name the base's repo with base_model='org/name' (`--base-model`).")
    if chosen == recorded:
        return chosen, None
    config["base_model_name_or_path"] = chosen
    return chosen, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _card_is_current(path: Path, base_model: str | None) -> bool:
    if not is_sfdlm_card(path):
        return False
    return base_model is None or validate_model_card(path).data.base_model == base_model


# An absolute path in text: `/first/...` (or `~/...`, `C:\...`, `C:/...`) that does not continue a word, a
# relative path or a URL's host (`3/4`, `tokens/s`, `../x`, `https://host/x` are not paths), whatever markup
# surrounds it (`*/x*`, `_/x_`, `<code>/x</code>`, `[a](/x)`, quotes, table bars), and the path of a `file:`
# URL (`file:///home/...`, `file://localhost/home/...`).
_PATH_IN_TEXT = re.compile(r"""(?:file://[^/\s]*|(?<![A-Za-z0-9./\\-]))((?:/|~/|[A-Za-z]:[\\/])[^\s`'")\]|,<>*]+)""",
                           re.MULTILINE)
# Markup or punctuation that may follow a path and is not part of it.
_PATH_TRAILERS = ".;:_~"


def _is_local_path(value: str) -> bool:
    """An absolute local path: `/x/...` whose top folder exists on this machine, `~/...`, or `C:\\...`."""
    if value.startswith("~") or re.match(r"^[A-Za-z]:[\\/]", value):
        return True
    if not value.startswith("/") or value.startswith("//"):
        return False
    top = value.strip("/").split("/", 1)[0]
    return bool(top) and os.path.exists("/" + top)


def local_paths_in_card(text: str) -> list[str]:
    """The absolute local paths a model card's text (metadata and prose) carries."""
    found = [match.group(1).rstrip(_PATH_TRAILERS) for match in _PATH_IN_TEXT.finditer(text)]
    found = [re.sub(r"^/(?=[A-Za-z]:[\\/])", "", path) for path in found]  # file:///C:/... names C:/...
    return sorted({path for path in found if _is_local_path(path)})


def _card_bytes(folder: Path, repo_id: str, card_kwargs: dict) -> bytes:
    card = render_model_card(folder=folder, repo_id=repo_id, **card_kwargs)
    check_card_data(card.data)
    return str(card).encode("utf-8")


def _folder_entries(folder: Path) -> tuple[list[str], dict[str, str]]:
    """The folder's regular files (relative POSIX paths, sorted), and every other entry (symbolic links
    to files or folders, FIFOs, ...) with what it is. Symbolic links to folders are not entered."""
    files, others = [], {}
    for root, dirs, names in os.walk(folder):  # followlinks=False
        base = Path(root)
        for name in dirs:
            if (base / name).is_symlink():
                others[(base / name).relative_to(folder).as_posix() + "/*"] = f"a link to {os.readlink(base / name)!r}"
        for name in names:
            path = base / name
            relative = path.relative_to(folder).as_posix()
            if path.is_symlink():
                others[relative] = f"a symbolic link to {os.readlink(path)!r}"
            elif path.is_file():
                files.append(relative)
            else:
                others[relative] = "not a regular file"
    return sorted(files), others


def commit_operations(model_dir: str | os.PathLike, allow_patterns: Sequence[str] | None = None,
                      ignore_patterns: Sequence[str] | None = None,
                      generated: dict[str, bytes] | None = None) -> list[CommitOperationAdd]:
    """The exact `CommitOperationAdd`s `push_model` sends: every regular file of the folder (recursively,
    sorted), minus `DEFAULT_IGNORE_PATTERNS` and `ignore_patterns`, restricted to `allow_patterns` if given.
    `generated` (`{name: bytes}`) adds or replaces files with in-memory contents (what a dry run would write).

    A symbolic link, or any other entry that is not a regular file, which the patterns do not exclude is
    refused with a `ValueError`: push never follows links (one could point at a token outside the folder).
    """
    folder = Path(model_dir)
    check_model_folder(folder)
    generated = dict(generated or {})
    files, others = _folder_entries(folder)
    ignore = list(DEFAULT_IGNORE_PATTERNS) + list(ignore_patterns or [])
    refused = [f"{name.removesuffix('/*')} ({what})" for name, what in others.items()
               if name not in generated and list(filter_repo_objects([name], allow_patterns=allow_patterns,
                                                                     ignore_patterns=ignore))]
    if refused:
        raise ValueError(f"{str(folder)!r} holds entries that are not regular files: {'; '.join(refused)}. "
                         "Push uploads only the folder's regular files and never follows links: replace each by a "
                         "copy, remove it, or exclude it with ignore_patterns.")
    names = sorted(set(files) | set(generated))
    kept = filter_repo_objects(names, allow_patterns=allow_patterns, ignore_patterns=ignore)
    return [CommitOperationAdd(path_in_repo=name, path_or_fileobj=generated.get(name, str(folder / name)))
            for name in kept]


def _matches(name: str, patterns: Sequence[str]) -> bool:
    import fnmatch

    base = name.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(base, pattern) and "/" not in pattern
               for pattern in patterns)


def is_known_file(name: str) -> bool:
    """Whether `push` uploads the file at the relative path `name` without asking: a top-level file of
    `KNOWN_FILES`, or a top-level `*.py` named like a module of the installed hf_sfdlm (remote code)."""
    import fnmatch

    from .remote_code import PACKAGE_DIR

    if "/" in name:
        return False
    if name.endswith(".py"):
        return (PACKAGE_DIR / name).is_file()
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in KNOWN_FILES)


def _holds_a_secret(path: Path, head: int = 1 << 16) -> bool:
    if path.suffix == ".safetensors":
        return False
    with open(path, "rb") as handle:
        start = handle.read(head)
    return any(marker in start for marker in _SECRET_CONTENT)


def check_upload_files(folder: str | os.PathLike, names: Sequence[str], include_patterns: Sequence[str] = (),
                       allow_unknown_files: bool = False) -> None:
    """Refuse (`ValueError`, listing every file at fault and what to do) an upload of `names` (relative paths
    under `folder`) that holds:

    * a private key or credential file (by name, `SECRET_PATTERNS`, or by content), never uploaded;
    * a hard link whose other names lie outside the folder (its content is a file elsewhere);
    * files that are not known model, tokenizer or card files (`is_known_file`), unless an `include_patterns`
      entry names them or `allow_unknown_files`; code (`custom_generate/`, `*.py` not of hf_sfdlm, pickles,
      `CODE_PATTERNS`) and unknown files of `MAX_UNKNOWN_FILE_BYTES` or more need an `include_patterns` entry.
    """
    folder = Path(folder)
    inside: dict[tuple[int, int], int] = {}  # names of each multiply linked file anywhere in the folder
    for name in _folder_entries(folder)[0]:
        info = (folder / name).stat()
        if info.st_nlink > 1:
            inside[(info.st_dev, info.st_ino)] = inside.get((info.st_dev, info.st_ino), 0) + 1
    problems = []
    secrets = [name for name in names if _matches(name, SECRET_PATTERNS) or _holds_a_secret(folder / name)]
    if secrets:
        problems.append(f"private key or credential file(s) {secrets}, which are never uploaded: move them out "
                        "of the folder")
    outside = []
    for name in names:
        info = (folder / name).stat()
        if info.st_nlink > inside.get((info.st_dev, info.st_ino), 1):
            outside.append(name)
    if outside:
        problems.append(f"hard link(s) {outside} to files outside the folder (push uploads only the folder's own "
                        "files): replace each by a copy, or exclude it")
    unknown = [name for name in names if not is_known_file(name) and name not in secrets and name not in outside]
    included = [name for name in unknown if _matches(name, include_patterns)]
    code = [name for name in unknown if name not in included and _matches(name, CODE_PATTERNS)]
    huge = [name for name in unknown if name not in included and name not in code
            and (folder / name).stat().st_size >= MAX_UNKNOWN_FILE_BYTES]
    if code:
        problems.append(f"code or pickle file(s) {code} that are not a model's files (transformers runs "
                        "`custom_generate/` code for the repo's users); upload them only by naming them with "
                        "--include PATTERN (`include_patterns`)")
    if huge:
        sizes = ", ".join(f"{name} ({(folder / name).stat().st_size / 2**20:,.0f} MiB)" for name in huge)
        problems.append(f"large file(s) that are not a model's files: {sizes}; name them with --include PATTERN "
                        "(`include_patterns`) to upload them")
    rest = [name for name in unknown if name not in included and name not in code and name not in huge]
    if rest and not allow_unknown_files:
        shown = ", ".join(rest[:10]) + (f" and {len(rest) - 10} more" if len(rest) > 10 else "")
        problems.append(f"file(s) that are not known model, tokenizer or card files: {shown}; upload them with "
                        "--include PATTERN (`include_patterns`) or --allow-unknown-files (`allow_unknown_files=True`), "
                        "or leave them out with --exclude PATTERN (`ignore_patterns`)")
    if problems:
        raise ValueError(f"Push of {str(folder)!r} refused, nothing was uploaded: " + "; ".join(problems) + ".")


def _tiny_forward(model, folder: Path) -> None:
    """One forward pass on a few tokens at noise level 0.5; `ValueError` on a NaN or +inf logit."""
    import torch

    config = model.config
    length = 2 * math.prod(getattr(config, "pool_factors", None) or [1])
    ids = torch.arange(length, device=model.device).remainder(config.vocab_size).unsqueeze(0)
    with torch.no_grad():
        logits = model(input_ids=ids, timesteps=torch.full((1,), 0.5, device=model.device)).logits
    if torch.isnan(logits).any() or torch.isposinf(logits).any():
        raise ValueError(f"The model in {str(folder)!r} loads but its forward pass gives NaN or inf logits: its "
                         "weights are corrupt (or were saved after training diverged).")


def verify_model_folder(model_dir: str | os.PathLike, trust_remote_code: bool = False) -> str:
    """Check that a folder would load for its users; returns its kind. Runs `hf_sfdlm.integrity.check_folder`
    (safetensors headers and sizes, `checksums.json`, every JSON file, tokenizer files); for a model, also
    loads it with `load_pretrained` (consent rules included; on the CPU) and runs one
    tiny forward pass, and loads its tokenizer when it has one. An adapter's base is not loaded (it may
    live only on the Hub): adapters get the file checks only."""
    folder = Path(model_dir)
    kind = check_model_folder(folder)
    if kind == "adapter":
        integrity.check_folder(folder)
    else:  # load_pretrained runs the same file checks first
        _tiny_forward(load_pretrained(folder, trust_remote_code=trust_remote_code).eval(), folder)
        if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
            try:
                load_tokenizer(folder, trust_remote_code=trust_remote_code)
            except (OSError, ValueError, TypeError) as error:
                raise ValueError(f"The tokenizer in {str(folder)!r} does not load: {error}") from error
    return kind


def push_model(model_dir: str | os.PathLike, repo_id: str, *, private: bool | None = None,
               revision: str | None = None, create_pr: bool = False, commit_message: str | None = None,
               token: str | None = None, write_card: bool = True, allow_patterns: Sequence[str] | None = None,
               ignore_patterns: Sequence[str] | None = None, api: HfApi | None = None, dry_run: bool = False,
               trust_remote_code: bool = False, include_patterns: Sequence[str] = (),
               allow_unknown_files: bool = False, **card_kwargs):
    """Upload a saved SFDLM model or adapter folder to the Hub in one commit.

    Everything is checked before the first request and before anything is written: the repo id
    (huggingface_hub's validator), the revision, the folder (config, auto_map and remote code, safetensors
    weights; only regular files, see `commit_operations`), that it loads (`verify_model_folder`: file
    integrity, the model and one tiny forward, the tokenizer), that every file is a known model, tokenizer or
    card file or explicitly allowed, none a secret or a hard link to a file elsewhere (`check_upload_files`),
    and that the card carries no local absolute path. If the folder has no valid SFDLM model card, one is rendered (`render_model_card`, `card_kwargs`
    passed on) and written into the folder, except with `dry_run`, which writes nothing anywhere.

    Args:
        model_dir: a `save_pretrained` folder, or an adapter folder from `hf_sfdlm.lora.save_adapter`.
        repo_id: `"org/name"` (or `"name"` for your own namespace); created if it does not exist.
        private: visibility of a newly created repo (ignored when it exists).
        revision: branch to commit to (created from the default branch if needed); None: default branch.
        card_kwargs: for `render_model_card` (`license`, `datasets`, ...). For an adapter, `base_model` names
            the base's Hub repo (required when adapter_config.json records a local folder).
        create_pr: open a pull request with the commit instead of committing to the branch.
        api: an `HfApi` to use (defaults to `HfApi(token=token)`).
        dry_run: stop before the first request and return the commit operations; nothing is written.
        trust_remote_code: allow loading a folder whose code differs from the installed hf_sfdlm's for the
            verification (see `hf_sfdlm.remote_code`).
        include_patterns: glob patterns of files that are not known model/tokenizer/card files to upload too
            (`check_upload_files`: code such as `custom_generate/` and large stray files need one).
        allow_unknown_files: upload every other unknown file too (not code, large files or secrets).

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
    check_trust_remote_code(trust_remote_code)
    folder = Path(model_dir)
    kind = check_model_folder(folder)
    names = [op.path_in_repo for op in commit_operations(folder, allow_patterns, ignore_patterns)]  # refuses links
    check_upload_files(folder, names, include_patterns, allow_unknown_files)  # before any slower check
    verify_model_folder(folder, trust_remote_code=trust_remote_code)
    generated: dict[str, bytes] = {}
    if kind == "adapter":
        card_kwargs["base_model"], adapter_config = _adapter_config_for_push(folder, card_kwargs.get("base_model"))
        if adapter_config is not None:
            generated["adapter_config.json"] = adapter_config
    if write_card and not _card_is_current(folder / CARD_FILE, card_kwargs.get("base_model")):
        generated[CARD_FILE] = _card_bytes(folder, repo_id, card_kwargs)
    card_text = generated[CARD_FILE].decode("utf-8") if CARD_FILE in generated else \
        (folder / CARD_FILE).read_text(encoding="utf-8", errors="replace") if (folder / CARD_FILE).is_file() else ""
    paths = local_paths_in_card(card_text)
    if paths:
        raise ValueError(f"The model card {str(folder / CARD_FILE)!r} carries local absolute path(s) {paths}, which "
                         f"would be published: replace them (e.g. by a dataset's Hub id or file name) in the card and "
                         f"in {CARD_RECORD}, from which a fresh card would be rendered.")
    if not dry_run:
        if "adapter_config.json" in generated:
            (folder / "adapter_config.json").write_bytes(generated["adapter_config.json"])
        if CARD_FILE in generated:  # the same rendering, saved with its record (`model_card.CARD_RECORD`)
            write_model_card(folder, repo_id=repo_id, **card_kwargs)
        generated = {}
    operations = commit_operations(folder, allow_patterns, ignore_patterns, generated=generated)
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


# Files `load_pretrained` takes from a Hub repo: what transformers reads, and what the checks read.
_LOAD_PATTERNS = ["*.json", "*.py", "*.safetensors", "*.txt", "*.model"]


def _local_files(name_or_path: str | os.PathLike, revision: str | None, cache_dir) -> tuple[Path, str | None]:
    """The local folder to check and load: the folder itself, or the Hub snapshot of a repo id (the cache
    only when offline). Returns it with the snapshot's commit hash (None for a local folder)."""
    local = Path(name_or_path)
    if str(name_or_path) and local.is_dir():
        return local, None
    from huggingface_hub import snapshot_download

    check_repo_id(str(name_or_path))
    with not_local_either(name_or_path):
        snapshot = Path(snapshot_download(str(name_or_path), revision=revision, cache_dir=cache_dir,
                                          allow_patterns=_LOAD_PATTERNS))
    return snapshot, snapshot.name


@contextlib.contextmanager
def not_local_either(name: str | os.PathLike):
    """Around a Hub load of `name`: when it fails (`OSError`: offline, no such repo, no access, no network),
    the error also says that no local folder of that name exists, from which working directory, since a
    mistyped local path such as `outputs/sfdlm-tny` has the shape of a Hub id and the Hub's own message
    never mentions the local folder the user meant."""
    try:
        yield
    except OSError as error:
        message = " ".join(str(error).split()) or type(error).__name__
        raise OSError(f"{str(name)!r} is not a local folder (nothing at {os.path.abspath(os.path.expanduser(name))!r}) "
                      f"and could not be loaded from the Hub as a repo id: {message}") from error


def _load_model(name_or_path, folder: Path, commit: str | None, cache_dir, trust_remote_code: bool, kwargs):
    from transformers import AutoModel

    config = integrity.read_json(folder / "config.json")
    trust = check_folder_code(folder, config, trust_remote_code, name=str(name_or_path))
    # A repo id is loaded at the commit that was checked, not whatever the branch points to a moment later.
    return AutoModel.from_pretrained(str(name_or_path) if commit else str(folder), revision=commit,
                                     trust_remote_code=trust, cache_dir=cache_dir, **kwargs)


def load_pretrained(name_or_path: str | os.PathLike, *, revision: str | None = None, is_trainable: bool = False,
                    cache_dir: str | os.PathLike | None = None, trust_remote_code: bool = False, **kwargs):
    """Load an SFDLM model, or an adapter on its base, from a local folder or a Hub repo id.

    A local folder is used as it is; a repo id is validated and its snapshot resolved by huggingface_hub
    (cache first; `HF_HUB_OFFLINE=1` uses only the cache). Before loading, every file is checked
    (`hf_sfdlm.integrity.check_folder`: errors name the file) and no code from the folder runs unless
    `trust_remote_code=True` (`hf_sfdlm.remote_code.check_folder_code`: SFDLM folders load with the
    installed classes; one whose code differs from the installed package's is refused). The same applies
    to an adapter's base. `kwargs` go to `from_pretrained` (e.g. `dtype`).
    """
    check_trust_remote_code(trust_remote_code)
    folder, commit = _local_files(name_or_path, revision, cache_dir)
    kind = folder_kind(folder)
    check_safetensors_weights(folder)
    integrity.check_folder(folder)
    if kind == "model":
        return _load_model(name_or_path, folder, commit, cache_dir, trust_remote_code, kwargs)
    from .lora import load_adapter

    base_name = integrity.read_json(folder / "adapter_config.json").get("base_model_name_or_path")
    if not base_name:
        raise ValueError(f"The adapter {str(name_or_path)!r} does not name its base model "
                         "(base_model_name_or_path is empty in adapter_config.json).")
    base_folder, base_commit = _local_files(base_name, None, cache_dir)
    if folder_kind(base_folder) != "model":
        raise ValueError(f"The base {base_name!r} of the adapter {str(name_or_path)!r} is itself an adapter.")
    check_safetensors_weights(base_folder)
    integrity.check_folder(base_folder)
    base = _load_model(base_name, base_folder, base_commit, cache_dir, trust_remote_code, kwargs)
    return load_adapter(base, folder, is_trainable=is_trainable)


def load_tokenizer(name_or_path: str | os.PathLike, *, trust_remote_code: bool = False, **kwargs):
    """`AutoTokenizer.from_pretrained`, after checking a local folder's tokenizer files
    (`hf_sfdlm.integrity.check_tokenizer_files`: a truncated tokenizer.json is refused naming the file)."""
    from transformers import AutoTokenizer

    from . import register_auto_classes

    check_trust_remote_code(trust_remote_code)
    register_auto_classes()  # AutoTokenizer reads an SFDLM folder's config.json: model_type 'sfdlm' must resolve
    if str(name_or_path) and Path(name_or_path).is_dir():
        integrity.check_tokenizer_files(name_or_path)
        return AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code, **kwargs)
    with not_local_either(name_or_path):
        return AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code, **kwargs)


__all__ = [
    "DEFAULT_IGNORE_PATTERNS",
    "check_model_folder",
    "check_repo_id",
    "check_revision",
    "check_safetensors_weights",
    "check_upload_files",
    "is_known_file",
    "commit_operations",
    "folder_kind",
    "load_pretrained",
    "load_tokenizer",
    "local_paths_in_card",
    "push_model",
    "verify_model_folder",
]
