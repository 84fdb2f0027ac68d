"""Pieces every command shares: where a model comes from, CPU threads, tokenizer coverage warnings.

Nothing here imports torch or transformers at module level, so a command can check its arguments
(a mistyped folder, say) before paying for those imports.
"""

from __future__ import annotations

import difflib
import os
import sys

# Intra-op threads for CPU work when the user sets none: measured with benchmarks/cli_threads.py on the
# 2-core machine (see the README, "Command line"): one thread is as fast or faster for the tiny and
# small models these commands run on CPU, and never stalls when the cores are shared.
DEFAULT_CPU_THREADS = 1
# `sfdlm eval` warns when more of the text than this maps to the unknown token.
UNK_WARNING_SHARE = 0.01


def looks_like_local_path(name: str) -> bool:
    """Whether `name` is meant as a local folder rather than a Hub id: it starts with `.`, `/` or `~`,
    has a backslash or a trailing slash, more than one `/`, or its first component is an existing
    folder (`outputs/sfdlm-tny` when `outputs/` exists)."""
    if name.startswith((".", "/", "~")) or "\\" in name or name.endswith("/") or name.count("/") > 1:
        return True
    return "/" in name and os.path.isdir(name.split("/", 1)[0])


def check_model_location(name: str, option: str = "--model", bare_ids: bool = False) -> str:
    """Fail at once, naming the path, when `name` is neither an existing local folder nor a Hub id of
    the form `org/name` (or, with `bare_ids`, a canonical id such as `gpt2`, as tokenizers often are);
    returns `name` (with `~` expanded for a local path).

    Hub ids are only tried for forms that are not local paths, so a mistyped folder never waits for Hub
    retries.
    """
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        return expanded
    if os.path.exists(expanded):
        raise ValueError(f"{option} {name!r} is a file; expected the folder a model was saved to.")
    if looks_like_local_path(name) or ("/" not in name and not bare_ids):
        parent = os.path.dirname(os.path.abspath(expanded))
        siblings = sorted(os.listdir(parent)) if os.path.isdir(parent) else []
        close = difflib.get_close_matches(os.path.basename(expanded.rstrip("/")), siblings, n=1)
        hint = f"; did you mean {os.path.join(os.path.dirname(name), close[0])!r}?" if close else ""
        kind = "folder" if looks_like_local_path(name) else "local folder, and a Hub id has the form 'org/name'"
        raise ValueError(f"{option} {name!r}: no such {kind}{hint}")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError as error:
        raise ValueError(f"{option} {name!r} is neither a local folder nor a valid Hub id: {error}") from None
    return name


# Seeds of every command: what `random`, numpy (32 bits) and torch all accept, as `training.seed`.
MAX_SEED = 2**32 - 1


def check_seed(seed: int, option: str = "--seed") -> int:
    """`seed` if it is an integer in [0, 2**32 - 1], else `ValueError` naming the option."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"{option} must be an integer in [0, 2**32 - 1], got {seed!r}.")
    return seed


def check_device(name: str | None, option: str = "--device") -> str | None:
    """`name` if torch knows the device and this machine has it (`cpu`, `cuda`, `cuda:1`, `mps`, `xpu`, ...),
    else `ValueError` naming the option and what is available. None stays None (the command's default)."""
    if name is None:
        return None
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{option} {name!r} is not a torch device; expected e.g. 'cpu', 'cuda' or 'cuda:0'.") from None
    if device.type == "cpu":
        return name
    backend = getattr(torch, device.type, None)
    available = backend is not None and hasattr(backend, "is_available") and backend.is_available()
    if not available:
        raise ValueError(f"{option} {name!r}: this machine has no {device.type} device (torch sees none); "
                         "use --device cpu.")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if device.index is not None and device.index >= count:
        raise ValueError(f"{option} {name!r}: this machine has {count} {device.type} device(s), "
                         f"numbered 0 to {count - 1}.")
    return name


def set_cpu_threads(threads: int | None) -> int | None:
    """Apply `--threads` (default `DEFAULT_CPU_THREADS`) to torch's intra-op pool; returns the count set."""
    import torch

    if threads is None:
        threads = DEFAULT_CPU_THREADS
    if threads < 1:
        raise ValueError(f"--threads must be a positive integer, got {threads}.")
    torch.set_num_threads(threads)
    return threads


def add_threads_argument(parser) -> None:
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help=f"CPU intra-op threads (default: {DEFAULT_CPU_THREADS}, the fastest for these model "
                             "sizes on a shared machine; see benchmarks/cli_threads.py)")


def unknown_words(tokenizer, text: str) -> list[str]:
    """The whitespace-separated words of `text` that the tokenizer maps (in part) to its unknown token."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or not text.strip():
        return []
    words = text.split()
    encoded = tokenizer(words, add_special_tokens=False)["input_ids"]
    return [word for word, ids in zip(words, encoded) if unk in ids]


def warn_unknown_words(tokenizer, text: str, what: str = "the prompt") -> list[str]:
    """Print a warning (stderr) naming the words of `text` outside the tokenizer's vocabulary."""
    words = unknown_words(tokenizer, text)
    if words:
        shown = ", ".join(repr(w) for w in dict.fromkeys(words[:10]))
        more = f" and {len(words) - 10} more" if len(words) > 10 else ""
        print(f"warning: {len(words)} word(s) of {what} are not in the tokenizer's vocabulary and read as "
              f"{tokenizer.unk_token}: {shown}{more}", file=sys.stderr)
    return words


def slug(name: str, limit: int = 40) -> str:
    """A short folder-name-safe label for a path or id: `../data/ptb.train.txt` -> `ptb-train`,
    `org/sfdlm-tiny` -> `sfdlm-tiny`."""
    import re

    base = os.path.basename(os.path.normpath(str(name))) or str(name)
    stem = re.sub(r"\.(txt|jsonl?|csv|parquet|raw|tokens)$", "", base, flags=re.IGNORECASE)
    label = re.sub(r"[^A-Za-z0-9]+", "-", stem).strip("-").lower()
    return label[:limit].strip("-") or "data"


def quiet_expected_warnings() -> None:
    """No noise for what a run does on purpose: transformers' weight-loading/-writing bars (the run has its
    own bar), accelerate's "Removed shared tensor" note for the tied embeddings at every checkpoint, and
    transformers' deprecation note when peft wraps the model."""
    import logging
    import warnings

    from transformers.utils import logging as transformers_logging

    # peft asks transformers for a renamed attribute when it wraps the model (transformers 5 deprecation).
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

    transformers_logging.disable_progress_bar()

    class TiedWeights(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "Removed shared tensor {'lm_head.weight'}" not in record.getMessage()

    logging.getLogger("accelerate.utils.other").addFilter(TiedWeights())
