"""Training data for diffusion language models: corpora, tokenizers, blocks and batches.

One pipeline, built on `datasets`, from a source name to batches the model can read:

    load_text_dataset   local text / JSON lines / CSV / Parquet files or folders, Hub dataset names, streaming,
                        or the embedded synthetic grammar corpus; checked before anything expensive runs; a file
                        that cannot be read (binary, bad UTF-8, bad JSON line, malformed CSV) is named with its
                        line, also mid-stream (`find_bad_line`)
    split_heldout       an existing validation split, or a held-out slice of the training split
    tokenize_dataset    documents longer than `MAX_PIECE_CHARS` cut into pieces at whitespace (bounded memory
                        whatever the line length), text encoded as text (`encode_plain_text`: a literal "[MASK]"
                        is never the mask token), batched `map` (cached on disk for file-backed datasets), then
                        either packing into fixed-length blocks with EOS separators or one padded example per
                        document
    DiffusionCollator   batches with `attention_mask` and `labels` (-100 at padding: never corrupted, never scored)

and the tokenizer side:

    load_tokenizer          any `AutoTokenizer`, the synthetic corpus's word-level tokenizer, or a byte-level BPE
                            trained on the corpus (`train_bpe_tokenizer`, also behind `sfdlm train-tokenizer`)
    prepare_tokenizer       adds mask and pad (and EOS) tokens when missing
    align_model_with_tokenizer  resizes a model's embeddings to the tokenizer and syncs its special-token ids
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from itertools import chain
from pathlib import Path
from typing import Any

import torch

SYNTHETIC = "synthetic"
# File extensions that `datasets` reads with a packaged builder, and the builder's name.
FILE_BUILDERS = {".txt": "text", ".text": "text", ".tokens": "text", ".raw": "text", ".json": "json",
                 ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
DEFAULT_SPECIAL_TOKENS = {"pad_token": "[PAD]", "mask_token": "[MASK]", "eos_token": "[EOS]"}
# Documents longer than this many characters are cut into pieces (just before a whitespace character) before
# tokenisation, so memory per `map` batch stays bounded whatever the length of a line (see `split_long_text`).
MAX_PIECE_CHARS = 4096
# Characters handed to the tokenizer in one call (its intermediate encodings take ~100 bytes per character).
TOKENIZER_CHARS_PER_CALL = 1 << 18
DOCUMENT_END = "_document_end"  # column of split documents: whether a piece is its document's last


@dataclass
class DataConfig:
    """Where the training text comes from and how it becomes blocks of token ids.

    Args:
        dataset: `"synthetic"` (the embedded grammar corpus of `hf_sfdlm.synthetic`), a local file or folder
            (`.txt`/`.tokens`/`.raw` one example per line, `.json`/`.jsonl`, `.csv`, `.parquet`), or a Hub
            dataset name such as `"Salesforce/wikitext"`.
        dataset_config: configuration name of a Hub dataset (e.g. `"wikitext-2-raw-v1"`).
        text_column: column holding the text.
        train_split: split to train on.
        validation_split: existing split to evaluate on; `None` holds out part of the training split.
        validation_fraction: fraction of the training examples held out when there is no validation split.
        validation_size: number of examples held out instead of a fraction (required when streaming: the
            first `validation_size` examples of the stream are held out, the rest are trained on).
        block_size: length of every training sequence (packing) or the longest one (no packing).
        packing: concatenate documents (EOS between them) and cut fixed-length blocks; otherwise one example
            per document (longer ones split into `block_size` pieces), padded per batch with an attention mask.
        add_eos: append the EOS token after every document. `None`: yes, except for the synthetic corpus, whose
            `"."` already ends every sentence, so its token stream is exactly the grammar's word stream.
        streaming: read the source lazily (corpora larger than memory; C4-style Hub datasets).
        shuffle_buffer: shuffle buffer of a streamed dataset.
        num_proc: processes for tokenisation (`None`: one).
        synthetic_sentences: sentences of the synthetic corpus (training + held out).
        synthetic_seed: seed of the synthetic corpus.
        cache_dir: `datasets` cache folder (`None`: the `datasets` default).
    """

    dataset: str = SYNTHETIC
    dataset_config: str | None = None
    text_column: str = "text"
    train_split: str = "train"
    validation_split: str | None = None
    validation_fraction: float = 0.05
    validation_size: int | None = None
    block_size: int = 64
    packing: bool = True
    add_eos: bool | None = None
    streaming: bool = False
    shuffle_buffer: int = 10_000
    num_proc: int | None = None
    synthetic_sentences: int = 20_000
    synthetic_seed: int = 0
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        check_field_types(self, "data")
        if not isinstance(self.dataset, str) or not self.dataset.strip():
            raise ValueError(f"`data.dataset` must be 'synthetic', a file/folder path or a Hub name, got {self.dataset!r}.")
        for name in ("block_size", "shuffle_buffer", "synthetic_sentences"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`data.{name}` must be a positive integer, got {value!r}.")
        if self.block_size < 2:
            raise ValueError(f"`data.block_size` must be at least 2, got {self.block_size}.")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(f"`data.validation_fraction` must be in (0, 1), got {self.validation_fraction}.")
        if self.validation_size is not None and (not isinstance(self.validation_size, int) or self.validation_size < 1):
            raise ValueError(f"`data.validation_size` must be a positive integer or None, got {self.validation_size!r}.")
        if self.streaming and self.validation_split is None and self.validation_size is None:
            raise ValueError("A streamed dataset has no length to take a fraction of: set `data.validation_split` "
                             "or `data.validation_size` (examples held out from the head of the stream).")
        if self.streaming and self.dataset == SYNTHETIC:
            raise ValueError("The synthetic corpus is generated in memory-sized files; `data.streaming` must be false.")

    @property
    def is_synthetic(self) -> bool:
        return self.dataset == SYNTHETIC

    @property
    def separate_documents(self) -> bool:
        """Whether an EOS token follows each document (see `add_eos`)."""
        return (not self.is_synthetic) if self.add_eos is None else bool(self.add_eos)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DataConfig":
        reject_unknown_keys(values, cls, "Unknown `data` option(s)")
        return cls(**values)


def reject_unknown_keys(values: dict[str, Any], dataclass_type, what: str) -> None:
    """Raise a ValueError naming the keys of `values` that are not fields of `dataclass_type`."""
    known = {f.name for f in fields(dataclass_type)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{what} {unknown}; expected some of {sorted(known)}.")


# Seeds go to `random`, numpy (which takes at most 32 bits) and torch.
MAX_SEED = 2**32 - 1
_TYPE_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
               "None": "null", "list[str]": "a list of strings"}


def _has_type(value: Any, name: str) -> bool | None:
    """Whether `value` is of the annotated type `name` (None for an annotation not checked here)."""
    checks = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              "bool": lambda v: isinstance(v, bool), "str": lambda v: isinstance(v, str),
              "None": lambda v: v is None,
              "list[str]": lambda v: isinstance(v, list) and all(isinstance(item, str) for item in v)}
    return checks[name](value) if name in checks else None


def check_field_types(config, section: str) -> None:
    """Raise a ValueError naming `section.field` for a field of the dataclass `config` whose value does not
    have its annotated type (`int`, `float`, `bool`, `str`, `None`, `list[str]` and unions of them; a bool
    is not an int, an int is a float), or for a `*seed` field outside [0, 2**32 - 1]."""
    for item in fields(config):
        value = getattr(config, item.name)
        names = [name.strip() for name in str(item.type).split("|")]
        verdicts = [_has_type(value, name) for name in names]
        if None not in verdicts and not any(verdicts):
            expected = " or ".join(_TYPE_NAMES[name] for name in names)
            raise ValueError(f"`{section}.{item.name}` must be {expected}, got {value!r}.")
        if item.name.endswith("seed") and isinstance(value, int) and not 0 <= value <= MAX_SEED:
            raise ValueError(f"`{section}.{item.name}` must be an integer in [0, 2**32 - 1], got {value!r}.")


# ---------------------------------------------------------------------------------------------- sources
def synthetic_corpus_path(config: DataConfig, directory: str | os.PathLike) -> Path:
    """Write (once) and return the synthetic grammar corpus for `config` under `directory`."""
    from .synthetic import write_corpus

    path = Path(directory) / f"synthetic-seed{config.synthetic_seed}-n{config.synthetic_sentences}.txt"
    if not path.exists():
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        write_corpus(tmp, num_sentences=config.synthetic_sentences, seed=config.synthetic_seed)
        os.replace(tmp, path)  # a concurrent or interrupted writer never leaves a partial corpus behind
    return path


def _looks_like_path(name: str) -> bool:
    """Local paths exist, start like a path, nest deeper than `org/name` or end in a data-file extension."""
    return (os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") > 1
            or Path(name).suffix.lower() in FILE_BUILDERS)


def _check_local_files(path: Path) -> list[Path]:
    """The data files under `path`; raises when there are none or all are empty."""
    if not path.exists():
        raise FileNotFoundError(f"Data file or folder {str(path)!r} does not exist.")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()
                                                 and p.suffix.lower() in FILE_BUILDERS)
    if not files:
        raise ValueError(f"Data folder {str(path)!r} holds no readable data file "
                         f"(expected extensions {sorted(FILE_BUILDERS)}).")
    if path.is_file() and path.suffix.lower() not in FILE_BUILDERS:
        raise ValueError(f"Cannot tell the format of data file {str(path)!r}: expected one of the extensions "
                         f"{sorted(FILE_BUILDERS)}.")
    if not any(_has_content(f) for f in files):
        raise ValueError(f"Data {str(path)!r} is empty (no non-blank text in {len(files)} file(s)).")
    for file in files:
        if FILE_BUILDERS[file.suffix.lower()] != "parquet":
            _refuse_binary(file)
    return files


def _refuse_binary(path: Path, sniff: int = 8192) -> None:
    """Refuse a text/JSON/CSV file whose first `sniff` bytes hold a NUL byte (as git tells binary files)."""
    with open(path, "rb") as handle:
        head = handle.read(sniff)
    if b"\0" in head:
        line = head[:head.index(b"\0")].count(b"\n") + 1
        raise ValueError(f"Data file {str(path)!r}, line {line}: a NUL byte; this looks like a binary file, not text.")


def _decoded_lines(handle) -> Iterator[tuple[int, str]]:
    """(line number, text) of a binary file handle; raises `ValueError` at the first NUL byte or bad UTF-8."""
    for number, raw in enumerate(handle, 1):
        if b"\0" in raw:
            raise ValueError(f"line {number}: a NUL byte; this looks like a binary file, not text")
        try:
            yield number, raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"line {number}, byte {error.start + 1} of the line: not valid UTF-8 ({error.reason}); "
                             "convert the file to UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from None


def find_bad_line(path: str | os.PathLike, builder: str) -> str | None:
    """The first reason `datasets`' `builder` ("text", "json", "csv", "parquet") cannot read `path`, as
    "line N: ..." (None when no line is at fault). Reads line by line: memory follows the longest line."""
    import csv

    if builder == "parquet":
        import pyarrow.parquet as pq

        try:
            pq.read_metadata(path)
        except Exception as error:  # noqa: BLE001 - any failure means "not Parquet"
            return f"not a readable Parquet file ({error})"
        return None
    try:
        with open(path, "rb") as handle:
            lines = _decoded_lines(handle)
            if builder == "json":
                return _find_bad_json_line(path, lines)
            if builder == "csv":
                reader = csv.reader((text for _, text in lines), strict=True)
                width = None
                try:
                    for row in reader:
                        if width is None:
                            width = len(row)
                        elif len(row) > width:
                            return f"line {reader.line_num}: {len(row)} fields, but the header has {width}"
                except csv.Error as error:
                    return f"line {reader.line_num}: malformed CSV ({error})"
                return None
            for _ in lines:
                pass
    except ValueError as error:
        return str(error)
    return None


def _find_bad_json_line(path, lines: Iterator[tuple[int, str]]) -> str | None:
    """JSON lines: each non-blank line an object. A file whose first line opens an array is one JSON document."""
    import json

    first = True
    for number, text in lines:
        if not text.strip():
            continue
        try:
            value = json.loads(text.rstrip("\r\n"))
        except json.JSONDecodeError as error:
            if first and text.lstrip().startswith("["):  # one JSON document (an array) spread over lines
                try:
                    with open(path, encoding="utf-8") as handle:
                        json.load(handle)
                    return None
                except json.JSONDecodeError as whole:
                    return f"line {whole.lineno}, column {whole.colno}: invalid JSON ({whole.msg})"
            return f"line {number}, column {error.colno}: invalid JSON ({error.msg})"
        if not isinstance(value, (dict, list)) or not first and not isinstance(value, dict):
            return (f"line {number}: a JSON {type(value).__name__}, but each line must be an object such as "
                    '{"text": ...}')
        first = False
    return None


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object"}.get(
        type(value), type(value).__name__)


def find_bad_text_value(path: str | os.PathLike, column: str) -> str | None:
    """JSON data: the first record whose `column` is not a string (null, a number, a list, an object, or
    missing), as "line N: ..." (or "record N: ..." for a file holding one JSON array); None when every record's
    `column` is a string. `datasets` would otherwise keep such a record as None or turn the column into
    numbers, and the text of that record would be dropped silently."""
    import json

    def verdict(record: Any) -> str | None:
        if not isinstance(record, dict):
            return None  # reported by `find_bad_line`
        if column not in record:
            return f"no {column!r} field (each record needs its text there)"
        value = record[column]
        if isinstance(value, str):
            return None
        shown = "" if value is None else f" ({json.dumps(value)[:40]})"
        return f"{column!r} is {_json_kind(value)}{shown}, not a string"

    with open(path, "rb") as handle:
        for number, text in _decoded_lines(handle):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError:
                break  # not JSON lines: one JSON document, read whole below
            reason = verdict(record)
            if reason:
                return f"line {number}: {reason}"
        else:
            return None
    with open(path, encoding="utf-8") as handle:
        document = json.load(handle)
    for index, record in enumerate(document if isinstance(document, list) else [document], 1):
        reason = verdict(record)
        if reason:
            return f"record {index}: {reason}"
    return None


def check_json_text_column(split, files: list[Path], column: str) -> None:
    """Refuse (`ValueError` naming the file and line) JSON data whose `column` holds anything but strings in
    some record. Free when the loaded column is all strings (Arrow knows its type and null count); the files
    are read again only to find the record at fault."""
    feature = split.features.get(column) if split.features is not None else None
    if getattr(feature, "dtype", None) in ("string", "large_string") and split.data.column(column).null_count == 0:
        return
    for file in files:
        reason = find_bad_text_value(file, column)
        if reason is not None:
            raise ValueError(f"Data file {str(file)!r}, {reason}.")


def read_error(files: list[Path], builder: str, error: Exception, text_column: str | None = None) -> ValueError:
    """A `ValueError` naming the file and line that made `datasets` fail to read `files` (or the files and the
    original error when no line is at fault). With `text_column`, JSON records whose text is not a string
    (Arrow refuses a column that changes from string to number) are found too."""
    for file in files:
        reason = find_bad_line(file, builder)
        if reason is None and builder == "json" and text_column is not None:
            reason = find_bad_text_value(file, text_column)
        if reason is not None:
            return ValueError(f"Data file {str(file)!r}, {reason}.")
    names = [str(f) for f in files]
    return ValueError(f"Could not read {builder} data {names[0] if len(names) == 1 else names}: "
                      f"{type(error).__name__}: {error}")


def _load_local(builder: str, files: list[Path], split: str, streaming: bool, cache_dir: str | None,
                text_column: str | None = None):
    """`datasets.load_dataset` of local files whose read errors name the file and line; a stream is wrapped so
    the same holds when the error surfaces mid-iteration. JSON data whose `text_column` is not a string in
    every record is refused naming the line (not for a stream, which is read only once, lazily)."""
    import datasets

    data_files = {split: [str(f) for f in files]}
    if streaming:
        stream = datasets.IterableDataset.from_generator(
            _guarded_rows, gen_kwargs={"files": [str(f) for f in files], "builder": builder, "split": split})
        return datasets.IterableDatasetDict({split: stream})
    try:
        raw = datasets.load_dataset(builder, data_files=data_files, cache_dir=cache_dir)
        for split_data in raw.values():
            split_data.data.validate(full=True)  # Arrow's JSON reader keeps invalid UTF-8 that fails only on use
    except Exception as error:  # DatasetGenerationError, ArrowInvalid, UnicodeDecodeError, ParserError...
        raise read_error(files, builder, error, text_column) from error
    if builder == "json" and text_column is not None and text_column in (raw[split].column_names or []):
        check_json_text_column(raw[split], files, text_column)
    return raw


def _guarded_rows(files: list[str], builder: str, split: str) -> Iterator[dict]:
    """Rows of a streamed local dataset (one shard per file list), errors explained by `read_error`."""
    import datasets

    stream = datasets.load_dataset(builder, data_files={split: files}, streaming=True)[split]
    try:
        yield from stream
    except Exception as error:  # noqa: BLE001 - re-raised with the file and line
        raise read_error([Path(f) for f in files], builder, error) from error


def _has_content(path: Path, chunk: int = 1 << 16) -> bool:
    """Whether a file holds anything but whitespace (reads only as far as the first non-blank byte)."""
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            if block.strip():
                return True
    return False


def load_text_dataset(config: DataConfig, work_dir: str | os.PathLike | None = None):
    """Load the raw text of `config` as a `DatasetDict` (or `IterableDatasetDict` when streaming).

    The result has a `"train"` split and, when the source has one, the validation split under
    `"validation"`. `work_dir` receives the synthetic corpus. Raises before any heavy work when a
    local file is missing or empty, or when `text_column` does not exist.
    """
    import datasets

    if config.is_synthetic:
        path = synthetic_corpus_path(config, work_dir or Path.cwd())
        raw = datasets.load_dataset("text", data_files={"train": str(path)}, cache_dir=config.cache_dir)
    elif _looks_like_path(config.dataset):
        path = Path(config.dataset).expanduser()
        files = _check_local_files(path)
        builders = {FILE_BUILDERS[f.suffix.lower()] for f in files}
        if len(builders) > 1:
            raise ValueError(f"Data folder {str(path)!r} mixes formats {sorted(builders)}; keep one format per folder.")
        raw = _load_local(builders.pop(), files, config.train_split, config.streaming, config.cache_dir,
                          config.text_column)
    else:
        try:
            raw = datasets.load_dataset(config.dataset, config.dataset_config, streaming=config.streaming,
                                        cache_dir=config.cache_dir)
        except Exception as error:  # offline, misspelt name, gated dataset...: say which source failed
            raise ValueError(f"Could not load dataset {config.dataset!r} (config {config.dataset_config!r}) "
                             f"from the Hub or the local cache: {error}") from error
    train_name = config.train_split if not config.is_synthetic else "train"
    if train_name not in raw:
        raise ValueError(f"Dataset {config.dataset!r} has no split {train_name!r}; available: {sorted(raw)}.")
    if config.validation_split is not None and config.validation_split not in raw:
        raise ValueError(f"Dataset {config.dataset!r} has no split {config.validation_split!r} "
                         f"(`data.validation_split`); available: {sorted(raw)}.")
    result = {"train": raw[train_name]}
    if config.validation_split is not None:
        result["validation"] = raw[config.validation_split]
    for name, split in result.items():
        _check_text_column(split, config, name)
    return (datasets.IterableDatasetDict if config.streaming else datasets.DatasetDict)(result)


def _check_text_column(split, config: DataConfig, split_name: str) -> None:
    columns = split.column_names
    if columns is None:  # a stream whose features are unknown until read: look at the first example
        first = next(iter(split), None)
        if first is None:
            raise ValueError(f"Split {split_name!r} of {config.dataset!r} is empty.")
        columns = list(first)
    if config.text_column not in columns:
        raise ValueError(f"Dataset {config.dataset!r} (split {split_name!r}) has no column "
                         f"{config.text_column!r} (`data.text_column`); its columns are {columns}.")
    if not config.streaming and len(split) == 0:
        raise ValueError(f"Split {split_name!r} of {config.dataset!r} is empty.")


def split_heldout(raw, config: DataConfig, seed: int = 0):
    """Return `(train, validation)` raw splits: the source's own validation split, or a held-out part of
    the training split (a seeded random `validation_fraction`/`validation_size`, or the head of a stream)."""
    if "validation" in raw:
        return raw["train"], raw["validation"]
    train = raw["train"]
    if config.streaming:
        return train.skip(config.validation_size), train.take(config.validation_size)
    size = config.validation_size or max(1, round(config.validation_fraction * len(train)))
    if size >= len(train) and config.validation_size is None:
        return split_stream_tail(train, config)  # a one-line corpus (text8): hold out the stream's tail
    if size >= len(train):
        raise ValueError(f"Cannot hold out {size} of {len(train)} examples of {config.dataset!r}: lower "
                         "`data.validation_size` (or unset it: the last `validation_fraction` of the text is then "
                         "held out) or provide more data.")
    if config.is_synthetic:  # a contiguous tail keeps the held-out text a stretch of the same stream
        return train.select(range(len(train) - size)), train.select(range(len(train) - size, len(train)))
    parts = train.train_test_split(test_size=size, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def split_stream_tail(train, config: DataConfig):
    """`(train, validation)` of a corpus with too few examples to hold whole ones out (one line without line
    breaks, text8-style): the last `validation_fraction` of its characters, cut before a word (at the last
    whitespace before the cut point, if any), is held out. The training part's cut piece is flagged as not
    ending its document (no EOS after it); the held-out part starts mid-document."""
    import datasets

    texts = [text if isinstance(text, str) else "" for text in train[config.text_column]]
    total = sum(len(text) for text in texts)
    cut = round(total * (1 - config.validation_fraction))
    row = 0
    while row < len(texts) - 1 and cut > len(texts[row]):
        cut -= len(texts[row])
        row += 1
    text = texts[row]
    space = max(text.rfind(" ", 0, cut), text.rfind("\n", 0, cut))
    cut = space if space > 0 else cut
    head, tail = text[:cut], text[cut:]
    held_out_empty = not (tail.strip() or any(t.strip() for t in texts[row + 1:]))
    train_empty = not (head.strip() or any(t.strip() for t in texts[:row]))
    if held_out_empty or train_empty:
        raise ValueError(f"Cannot hold out the last {config.validation_fraction:.0%} of {config.dataset!r}: the text "
                         f"({total} characters) is too short to split; provide more data or a validation split.")
    column = config.text_column
    kept = texts[:row] + [head]
    training = datasets.Dataset.from_dict({column: kept, DOCUMENT_END: [True] * row + [False]})
    held_out = datasets.Dataset.from_dict({column: [tail] + texts[row + 1:]})
    return training, held_out


# ---------------------------------------------------------------------------------------------- tokenising
def tokenize_dataset(dataset, tokenizer, config: DataConfig, desc: str = "Tokenizing"):
    """Token ids of each document, then packed blocks (`config.packing`) or padded-later documents.

    Packed examples all have exactly `block_size` tokens (the remainder of each `map` batch is dropped);
    unpacked examples have at most `block_size`. Blank documents are dropped. For file-backed datasets
    both `map`s are cached on disk by `datasets` (fingerprinted on the tokenizer and the settings).
    """
    eos_id = tokenizer.eos_token_id
    if config.separate_documents and eos_id is None:
        raise ValueError("`data.add_eos` needs a tokenizer with an EOS token; call `prepare_tokenizer` first.")
    add_eos = config.separate_documents
    column = config.text_column
    block = config.block_size
    streaming = config.streaming
    map_kwargs = {} if streaming else {"num_proc": config.num_proc, "desc": desc}

    def encode(batch: dict[str, list]) -> dict[str, list]:
        ends = batch.get(DOCUMENT_END) or [True] * len(batch[column])
        kept = [(text, end) for text, end in zip(batch[column], ends) if isinstance(text, str) and text.strip()]
        ids = encode_plain_text(tokenizer, [text for text, _ in kept])
        docs = (doc + [eos_id] if add_eos and end else doc for doc, (_, end) in zip(ids, kept))
        return {"input_ids": [doc for doc in docs if doc]}

    def pack(batch: dict[str, list]) -> dict[str, list]:
        stream = list(chain.from_iterable(batch["input_ids"]))
        usable = len(stream) // block * block
        return {"input_ids": [stream[i:i + block] for i in range(0, usable, block)]}

    def split_long(batch: dict[str, list]) -> dict[str, list]:
        return {"input_ids": [doc[i:i + block] for doc in batch["input_ids"] for i in range(0, len(doc), block)]}

    dataset = split_long_documents(dataset, column, streaming, map_kwargs)
    columns = dataset.column_names
    if columns is None:  # a stream with unknown features: read them off the first example
        columns = list(next(iter(dataset), {}))
    ids = dataset.map(encode, batched=True, remove_columns=columns, **map_kwargs)
    shaped = ids.map(pack if config.packing else split_long, batched=True,
                     **({} if streaming else {"num_proc": config.num_proc,
                                                 "desc": "Packing" if config.packing else "Splitting"}))
    if not streaming and len(shaped) == 0:
        raise ValueError(f"{config.dataset!r} yields no {'block' if config.packing else 'example'} of "
                         f"{block} tokens: the text is shorter than `data.block_size`={block}.")
    return shaped


def split_long_text(text: str, limit: int | None = None) -> list[str]:
    """Cut `text` into pieces of at most `limit` (default `MAX_PIECE_CHARS`) characters.

    Each cut falls just before the last whitespace character of the window that is followed by a non-space
    (the start of the next word), so tokenizers that split on whitespace first (byte-level BPE such as GPT-2's,
    whose pre-tokenizer keeps one space with the next word; word-level; Metaspace) give the pieces exactly the
    ids of the whole text. A window without such a whitespace character (e.g. unbroken CJK or binary-like text)
    is cut hard at `limit`.
    """
    limit = MAX_PIECE_CHARS if limit is None else limit
    if len(text) <= limit:
        return [text]
    pieces, start = [], 0
    while len(text) - start > limit:
        # Reversed window text[start + 1 .. start + limit]: "\S\s" there is a whitespace followed by a word here.
        window = text[start + 1:start + limit + 1][::-1]
        match = _WORD_AFTER_SPACE.search(window)
        cut = start + limit if match is None else start + limit - 1 - match.start()
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


_WORD_AFTER_SPACE = re.compile(r"\S\s")


def split_long_documents(dataset, column: str, streaming: bool, map_kwargs: dict):
    """Rows longer than `MAX_PIECE_CHARS` become several rows (`split_long_text`) with a `_document_end` flag on
    each document's last piece, so one huge line never meets the tokenizer (or a `map` batch) whole. A file-backed
    dataset without such rows is returned unchanged (checked with one Arrow pass, nothing cached)."""
    if not streaming:
        import pyarrow as pa
        import pyarrow.compute as pc

        texts = dataset.data.column(column) if column in dataset.column_names else None
        if texts is None or not (pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type)):
            return dataset  # no text to split (`encode` skips what is not a string)
        longest = pc.max(pc.utf8_length(texts)).as_py() if len(dataset) else None
        if longest is None or longest <= MAX_PIECE_CHARS:
            return dataset

    def split(batch: dict[str, list]) -> dict[str, list]:
        texts, ends = [], []
        given = batch.get(DOCUMENT_END) or [True] * len(batch[column])  # False: a piece cut by `split_stream_tail`
        for text, end in zip(batch[column], given):
            if isinstance(text, str) and text.strip():
                pieces = split_long_text(text)
                texts.extend(pieces)
                ends.extend([False] * (len(pieces) - 1) + [bool(end)])
        return {column: texts, DOCUMENT_END: ends}

    columns = dataset.column_names
    if columns is None:
        columns = list(next(iter(dataset), {}))
    kwargs = dict(map_kwargs, desc="Splitting long lines") if not streaming else map_kwargs
    return dataset.map(split, batched=True, remove_columns=columns, **kwargs)


def encode_plain_text(tokenizer, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
    """Token ids of `texts` read as ordinary text.

    Special-token strings inside the text ("[MASK]", "[PAD]", "[EOS]", ...) are encoded as the characters they
    are, never as control tokens (`split_special_tokens=True`): a literal "[MASK]" in a corpus or a prompt is
    not a position to fill. A tokenizer whose own vocabulary maps such a string to a special id anyway (a
    word-level vocabulary that lists "[MASK]" as a word) gets its unknown token there instead.
    `add_special_tokens=True` adds what the tokenizer's post-processor adds (BOS, ...) around the text.
    Texts are sent to the tokenizer in groups of at most `TOKENIZER_CHARS_PER_CALL` characters.
    """
    ids: list[list[int]] = []
    group: list[str] = []
    size = 0
    for text in [*texts, None]:
        if text is None or (group and size + len(text) > TOKENIZER_CHARS_PER_CALL):
            if group:
                ids.extend(tokenizer(group, add_special_tokens=False, split_special_tokens=True)["input_ids"])
            group, size = [], 0
        if text is not None:
            group.append(text)
            size += len(text)
    special = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
    if special and any(i in special for doc in ids for i in doc):
        if tokenizer.unk_token_id is None:
            raise ValueError(f"{type(tokenizer).__name__} encodes special-token text as control tokens even with "
                             "`split_special_tokens=True` and has no unknown token to use instead.")
        ids = [[tokenizer.unk_token_id if i in special else i for i in doc] for doc in ids]
    if add_special_tokens:
        ids = [_with_added_special_tokens(tokenizer, text, doc) for text, doc in zip(texts, ids)]
    return ids


def _with_added_special_tokens(tokenizer, text: str, plain: list[int]) -> list[int]:
    """`plain` inside the special tokens the tokenizer adds around `text` (e.g. BOS)."""
    full = tokenizer(text, add_special_tokens=True, split_special_tokens=True)["input_ids"]
    plain_raw = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain_raw) + 1):
        if full[start:start + len(plain_raw)] == plain_raw:
            return full[:start] + plain + full[start + len(plain_raw):]
    return full


def build_datasets(config: DataConfig, tokenizer, seed: int = 0, work_dir: str | os.PathLike | None = None):
    """`(train, validation)` tokenised datasets for `config` (see `load_text_dataset`, `tokenize_dataset`)."""
    raw = load_text_dataset(config, work_dir)
    train_raw, eval_raw = split_heldout(raw, config, seed=seed)
    train = tokenize_dataset(train_raw, tokenizer, config, desc="Tokenizing train")
    evaluation = tokenize_dataset(eval_raw, tokenizer, config, desc="Tokenizing validation")
    if config.streaming:
        train = train.shuffle(seed=seed, buffer_size=config.shuffle_buffer)
    return train, evaluation


@dataclass
class DiffusionCollator:
    """Pad token-id lists into a batch for `SFDLMForDiffusionLM.forward`.

    Returns `input_ids`, `attention_mask` (0 at padding) and `labels` (the example's own `labels` when it
    has them, e.g. -100 on an SFT prompt, else the ids; always -100 at padding, so padding is never
    corrupted nor scored). Packed blocks have no padding, so the mask is all ones. Padding is on the right
    and uses `pad_token_id` (EOS is fine: padding is found by length, never by comparing ids with the pad
    id); `pad_to_multiple_of` rounds the padded length up.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("Cannot collate an empty list of examples.")
        lengths = [len(example["input_ids"]) for example in examples]
        width = max(lengths)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), width), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, (example, length) in enumerate(zip(examples, lengths)):
            example_labels = example.get("labels", example["input_ids"])
            if len(example_labels) != length:
                raise ValueError(f"Example {row}: {len(example_labels)} labels for {length} input ids.")
            input_ids[row, :length] = torch.as_tensor(example["input_ids"], dtype=torch.long)
            labels[row, :length] = torch.as_tensor(example_labels, dtype=torch.long)
            attention_mask[row, :length] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# ---------------------------------------------------------------------------------------------- tokenizers
def prepare_tokenizer(tokenizer, special_tokens: dict[str, str] | None = None) -> int:
    """Add the special tokens a diffusion LM needs when the tokenizer lacks them; return how many were added.

    The mask token is the absorbing state, the pad token fills unpacked batches and the EOS token separates
    packed documents (a tokenizer with a SEP but no EOS token, such as BERT's, uses SEP as EOS).
    """
    wanted = dict(DEFAULT_SPECIAL_TOKENS, **(special_tokens or {}))
    if tokenizer.eos_token is None and getattr(tokenizer, "sep_token", None) is not None:
        tokenizer.eos_token = tokenizer.sep_token
    missing = {name: token for name, token in wanted.items() if getattr(tokenizer, name, None) is None}
    return tokenizer.add_special_tokens(missing) if missing else 0


def align_model_with_tokenizer(model, tokenizer) -> None:
    """Make `model` read every id of `tokenizer`: resize its embeddings when the tokenizer is larger and copy
    the tokenizer's mask/pad/EOS/BOS ids into its config. An SFDLM's diffusion process (whose uniform prior
    and absorbing state depend on them) is rebuilt to match."""
    config = model.config
    if len(tokenizer) > config.vocab_size:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    for name in ("mask_token_id", "pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            setattr(config, name, value)
    if hasattr(model, "diffusion"):
        from .diffusion import DiscreteDiffusion

        model.diffusion = DiscreteDiffusion.from_config(config)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2,
                        special_tokens: dict[str, str] | None = None):
    """Train a byte-level BPE tokenizer (GPT-2 style, `tokenizers`) and wrap it as `PreTrainedTokenizerFast`.

    `texts` is any iterable of strings (streamed once). The special tokens (default `[PAD]`, `[MASK]`,
    `[EOS]`) get the first ids. Byte-level BPE never maps text to an unknown token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"`vocab_size` must be a positive integer, got {vocab_size!r}.")
    specials = dict(DEFAULT_SPECIAL_TOKENS, **(special_tokens or {}))
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials):
        raise ValueError(f"`vocab_size`={vocab_size} is too small for byte-level BPE: it needs at least "
                         f"{len(alphabet) + len(specials)} ids (256 bytes + {len(specials)} special tokens).")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(specials.values()), initial_alphabet=alphabet,
                                  show_progress=False)
    seen = _count_texts(texts)
    backend.train_from_iterator(seen, trainer=trainer)
    if seen.count == 0:
        raise ValueError("Cannot train a tokenizer on an empty corpus (no non-blank text).")
    return PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False, **specials)


class _count_texts:
    """Iterate non-blank strings and count them (to tell an empty corpus apart after training)."""

    def __init__(self, texts: Iterable[str]):
        self.texts, self.count = texts, 0

    def __iter__(self) -> Iterator[str]:
        for text in self.texts:
            if isinstance(text, str) and text.strip():
                self.count += 1
                yield from split_long_text(text)  # the trainer's memory follows the longest string it sees


def load_tokenizer(name_or_path: str | None, data: DataConfig, raw_train=None, vocab_size: int = 4096,
                   save_dir: str | os.PathLike | None = None):
    """The tokenizer of a run, with mask/pad/EOS tokens ensured (see `prepare_tokenizer`).

    `name_or_path`: an `AutoTokenizer` name or folder; `None` picks the synthetic corpus's word-level
    tokenizer for `dataset="synthetic"` and otherwise trains a byte-level BPE of `vocab_size` on `raw_train`
    (the raw training split, whose `text_column` is read once), saved under `save_dir` and reused from there.
    """
    from transformers import AutoTokenizer

    if name_or_path is not None:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    elif data.is_synthetic:
        from .synthetic import word_level_tokenizer

        tokenizer = word_level_tokenizer()
    elif save_dir is not None and (Path(save_dir) / "tokenizer.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(save_dir)
    else:
        if raw_train is None:
            raise ValueError("Training a tokenizer needs the raw training split (`raw_train`).")
        tokenizer = train_bpe_tokenizer((row[data.text_column] for row in raw_train), vocab_size=vocab_size)
        if save_dir is not None:
            tokenizer.save_pretrained(save_dir)
    prepare_tokenizer(tokenizer)
    return tokenizer


__all__ = [
    "DataConfig",
    "DiffusionCollator",
    "SYNTHETIC",
    "align_model_with_tokenizer",
    "build_datasets",
    "load_text_dataset",
    "encode_plain_text",
    "load_tokenizer",
    "prepare_tokenizer",
    "split_heldout",
    "split_stream_tail",
    "split_long_text",
    "synthetic_corpus_path",
    "tokenize_dataset",
    "train_bpe_tokenizer",
]
