"""Instruction-tuning data for diffusion LMs (LLaDA-style SFT): the prompt conditions, the response is learned.

Records are JSON lines, either

    {"prompt": "...", "response": "..."}
    {"messages": [{"role": "user", "content": "..."}, ..., {"role": "assistant", "content": "..."}]}

Chat records are rendered with the tokenizer's chat template: the prompt is every message before the
last one rendered with `add_generation_prompt=True`, the response is what the full conversation adds
after it (so earlier turns condition, only the final assistant turn is learned).

Each example becomes `input_ids` = prompt + response + EOS and `labels` = -100 on the prompt, the ids on
the response and its EOS. `SFDLMForDiffusionLM.forward` never corrupts nor scores a position whose label
is -100, so the prompt stays clean and conditions every prediction, exactly as at generation time.

Prompts, responses and message contents are encoded as text (`hf_sfdlm.data.encode_plain_text`): a record that
mentions "[MASK]", "[PAD]" or "[EOS]" means those characters, never a position to fill or a control token; a
chat template's own markup keeps its special tokens. A file that cannot be read is named with its line.

Padding is marked by position (`attention_mask` 0, label -100), never by token value: with
`pad_token == eos_token` (common, and what LLaDA pads with) the response's own EOS is still learned and
the padding EOS tokens are neither seen nor counted in the loss.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .data import DiffusionCollator, _has_content, _refuse_binary, encode_plain_text, read_error

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
SFT_COLUMNS = ("prompt", "response", "messages")


def sft_example(record: Mapping[str, Any], tokenizer, max_length: int | None = None,
                use_chat_template: bool = False) -> dict[str, list[int]] | None:
    """Tokenise one record into `input_ids` and `labels` (see the module docstring).

    Args:
        record: `{"prompt", "response"}` or `{"messages"}`.
        max_length: longest example; a longer response is cut (and then has no EOS: it does not end
            there). A prompt that leaves no room for a response token returns `None` (skip it).
        use_chat_template: render prompt/response records as a user/assistant exchange as well.

    Raises:
        ValueError: naming what is wrong with the record or the tokenizer.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("The tokenizer has no EOS token; SFT responses must end with one so the model learns "
                         "where to stop (see hf_sfdlm.data.prepare_tokenizer).")
    messages = record.get("messages")
    if messages is None and use_chat_template:
        prompt, response = _prompt_response(record)
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    if messages is not None:
        prompt_ids, response_ids = _chat_ids(messages, tokenizer)
    else:
        prompt, response = _prompt_response(record)
        prompt_ids = encode_plain_text(tokenizer, [prompt], add_special_tokens=True)[0]
        response_ids = encode_plain_text(tokenizer, [response])[0]
    if not response_ids or response_ids[-1] != eos:
        response_ids = response_ids + [eos]
    if max_length is not None:
        if len(prompt_ids) >= max_length:
            return None
        response_ids = response_ids[: max_length - len(prompt_ids)]
    return {"input_ids": prompt_ids + response_ids,
            "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids}


def _prompt_response(record: Mapping[str, Any]) -> tuple[str, str]:
    prompt, response = record.get("prompt"), record.get("response")
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise ValueError(f"An SFT record needs string fields 'prompt' and 'response' (or a 'messages' list), "
                         f"got keys {sorted(k for k, v in record.items() if v is not None)}.")
    if not response.strip():
        raise ValueError(f"Empty 'response' in the SFT record with prompt {prompt[:60]!r}.")
    return prompt, response


def _chat_ids(messages, tokenizer) -> tuple[list[int], list[int]]:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("'messages' records need a tokenizer with a chat template (tokenizer.chat_template is "
                         "None); use prompt/response records or set a template.")
    if not isinstance(messages, Sequence) or len(messages) < 2 or not all(
            isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise ValueError("'messages' must be a list of at least two {'role': str, 'content': str} dicts "
                         f"(the context, then the assistant's reply), got {messages!r:.200}.")
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"The last message must be the assistant's reply (the part that is learned), got role "
                         f"{messages[-1]['role']!r}.")
    prompt_ids = _chat_template_ids(tokenizer, messages[:-1], add_generation_prompt=True)
    full_ids = _chat_template_ids(tokenizer, messages, add_generation_prompt=False)
    if full_ids[: len(prompt_ids)] != prompt_ids or len(full_ids) == len(prompt_ids):
        raise ValueError("The chat template does not render the conversation as the prompt (with the generation "
                         "prompt) followed by the reply, so the reply's tokens cannot be told apart.")
    return prompt_ids, full_ids[len(prompt_ids):]


def _chat_template_ids(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    """The chat template's ids, with the messages' contents read as ordinary text.

    The template's own markup may hold special tokens; the contents must not turn into any (a user who writes
    "[MASK]" means the text). Contents that hold no special-token string are rendered exactly as
    `apply_chat_template(tokenize=True)` renders them. Otherwise the template is rendered with a placeholder per
    content; the markup between placeholders is tokenised with its special tokens, each content with
    `encode_plain_text`, and the pieces are concatenated (tokens never merge across a content's edges then).
    """
    specials = [token for token in tokenizer.all_special_tokens if token]
    if not any(token in m["content"] for m in messages for token in specials):
        return _ids(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt))
    marks = [f"\ue000{index}\ue001" for index in range(len(messages))]
    template = tokenizer.apply_chat_template([dict(m, content=mark) for m, mark in zip(messages, marks)],
                                             tokenize=False, add_generation_prompt=add_generation_prompt)
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    parts = re.split("\ue000(\\d+)\ue001", template)
    markup, indices = parts[0::2], [int(i) for i in parts[1::2]]
    contents = [messages[i]["content"] for i in indices]
    if "".join(m + c for m, c in zip(markup, contents + [""])) != rendered:
        raise ValueError("A message holds special-token text (e.g. '[MASK]'), and the chat template changes the "
                         "message contents as it renders them, so that text cannot be kept as ordinary text.")
    ids: list[int] = []
    content_ids = encode_plain_text(tokenizer, contents)
    for index, text in enumerate(markup):
        if text:
            ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if index < len(content_ids):
            ids.extend(content_ids[index])
    return ids


def _ids(rendered) -> list[int]:
    # apply_chat_template(tokenize=True) returns a list of ids, or a BatchEncoding in some versions.
    if isinstance(rendered, Mapping):
        rendered = rendered["input_ids"]
    return list(rendered)


def is_sft_file(path: str | os.PathLike) -> bool:
    """Whether a .json/.jsonl file holds SFT records (its first record has prompt/response or messages)."""
    import json

    if not str(path).endswith((".json", ".jsonl")) or not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8", errors="replace") as handle:  # a bad file is named when it is read
        for line in handle:
            if line.strip():
                try:
                    first = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(first, dict) and ("messages" in first or {"prompt", "response"} <= set(first))
    return False


def load_sft_dataset(path: str | os.PathLike, tokenizer, max_length: int | None = None,
                     use_chat_template: bool = False, num_proc: int | None = None):
    """Read SFT JSON lines with `datasets` and tokenise them (`sft_example`); returns a `datasets.Dataset`
    with `input_ids` and `labels`. Records whose prompt fills `max_length` are dropped (and counted in
    the log); a malformed record raises `ValueError` naming its line."""
    from datasets import load_dataset

    if not os.path.isfile(path):
        raise ValueError(f"SFT data file {os.fspath(path)!r} does not exist.")
    if not _has_content(Path(path)):
        raise ValueError(f"SFT data file {os.fspath(path)!r} is empty.")
    _refuse_binary(Path(path))
    try:
        raw = load_dataset("json", data_files=os.fspath(path), split="train")
    except Exception as error:  # DatasetGenerationError, ArrowInvalid...: say which line
        raise read_error([Path(path)], "json", error) from error
    if not set(raw.column_names) & set(SFT_COLUMNS):
        raise ValueError(f"{os.fspath(path)!r} has columns {raw.column_names}; SFT records need 'prompt' and "
                         "'response', or 'messages'.")

    def encode(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out = {"input_ids": [], "labels": []}
        for offset, index in enumerate(indices):
            record = {name: batch[name][offset] for name in batch}
            try:
                example = sft_example(record, tokenizer, max_length, use_chat_template)
            except ValueError as error:
                raise ValueError(f"{os.fspath(path)!r}, record {index + 1}: {error}") from None
            if example is not None:
                out["input_ids"].append(example["input_ids"])
                out["labels"].append(example["labels"])
        return out

    dataset = raw.map(encode, batched=True, with_indices=True, remove_columns=raw.column_names,
                      num_proc=num_proc, desc="Tokenizing SFT records")
    dropped = len(raw) - len(dataset)
    if dropped:
        logger.warning("Dropped %d of %d SFT records whose prompt leaves no room in max_length=%s.",
                       dropped, len(raw), max_length)
    if len(dataset) == 0:
        raise ValueError(f"No usable SFT record in {os.fspath(path)!r} (max_length={max_length}).")
    return dataset


class SFTCollator(DiffusionCollator):
    """Right-pad SFT examples: `input_ids` with `pad_token_id` (EOS is fine), `attention_mask` 0 and
    `labels` -100 at padding, the examples' own labels (-100 on the prompt) elsewhere. Padding is found by
    length, never by comparing ids with the pad id. Every example must carry `labels`."""

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        missing = [row for row, example in enumerate(examples) if "labels" not in example]
        if missing:
            raise ValueError(f"SFT examples {missing} have no `labels` (build them with `sft_example`).")
        return super().__call__(examples)


__all__ = ["IGNORE_INDEX", "SFTCollator", "is_sft_file", "load_sft_dataset", "sft_example"]
