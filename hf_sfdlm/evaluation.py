"""Likelihood and generation-quality evaluation, measured the same way for diffusion and AR models.

Likelihood. A text is tokenized line by line, the ids are cut into blocks of `block_size` tokens and
every block is scored on its own (no context across blocks, the same for every model):

* diffusion models (anything with `nelbo(...)`: `SFDLMForDiffusionLM`, the Transformer denoiser of
  `hf_sfdlm.baselines`) give a Monte Carlo NELBO, an upper bound on -log p(block), with a standard error;
* autoregressive models (`GPT2LMHeadModel` and every other causal LM) give the exact -log p(block),
  each block conditioned on a BOS token only.

The total NLL in nats is then reported three ways, as papers do (always say which):

* token-level perplexity `exp(NLL / tokens)`, which depends on the tokenizer (named in the result);
* word-level perplexity `exp(NLL / words)`, with words counted as whitespace-separated words plus one
  end-of-line token per line: the classic PTB / WikiText-2 convention (82,430 words in PTB test,
  245,569 in WikiText-2 test);
* bits per byte `NLL / (ln 2 * UTF-8 bytes)`, which is tokenizer-free.

`CompactVocabulary` lets a small model predict only the token ids seen in training plus one "other"
id that spreads its probability uniformly over every remaining id of the tokenizer, so that its
likelihoods remain exact likelihoods of the tokenizer's id sequences.

Generation quality: generative perplexity under an AR judge, unigram entropy, distinct-n, and
infilling exact match and NLL of the true span.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import torch

from .diffusion import resolve_estimator
from .diffusion_lm import scored_positions

LN2 = math.log(2.0)


# ---------------------------------------------------------------------------------------------- text
def read_text(source, split: str | None = None, text_column: str = "text", max_lines: int | None = None) -> str:
    """The evaluation text of a file path or a `datasets` dataset, as one string of lines.

    Args:
        source: path of a UTF-8 text file, a `datasets.Dataset`, or a `datasets.DatasetDict` (with `split`).
        split: the split of a `DatasetDict` to read.
        text_column: the column of a dataset holding the text; rows are joined by newlines.
        max_lines: keep only the first `max_lines` lines (a fixed, reproducible subset).
    """
    if max_lines is not None and (isinstance(max_lines, bool) or not isinstance(max_lines, int) or max_lines < 1):
        raise ValueError(f"`max_lines` must be a positive integer or None, got {max_lines!r}.")
    if isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise ValueError(f"Evaluation text file {os.fspath(source)!r} does not exist.")
        lines = _read_utf8_lines(source)
    elif hasattr(source, "column_names"):
        if isinstance(source.column_names, dict):  # DatasetDict
            if split not in source:
                raise ValueError(f"`split`={split!r} is not one of the dataset's splits {sorted(source)}.")
            source = source[split]
        if text_column not in source.column_names:
            raise ValueError(f"`text_column`={text_column!r} is not a column of the dataset {source.column_names}.")
        lines = [row + "\n" for row in source[text_column]]
    else:
        raise TypeError(f"`source` must be a file path or a datasets Dataset/DatasetDict, got {type(source).__name__}.")
    if max_lines is not None:
        lines = lines[:max_lines]
    return "".join(lines)


def _read_utf8_lines(path) -> list[str]:
    """The lines of a UTF-8 text file (newlines kept); `ValueError` naming the file, line and byte offset of
    the first invalid byte sequence."""
    with open(path, "rb") as handle:
        data = handle.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise ValueError(f"{os.fspath(path)!r} is not UTF-8 text: line {line}, byte {column} of the line "
                         f"({error.reason}, byte {data[error.start:error.start + 1]!r}).") from None
    # as text mode's universal newlines read it: \r\n and \r become \n
    return text.replace("\r\n", "\n").replace("\r", "\n").splitlines(keepends=True)


def count_words(text: str) -> int:
    """Words as counted by the classic PTB / WikiText-2 word-level perplexity: whitespace-separated
    words plus one end-of-sentence token per line (a last line without a newline counts too)."""
    if not isinstance(text, str):
        raise TypeError(f"`text` must be a str, got {type(text).__name__}.")
    lines = text.count("\n") + (1 if text and not text.endswith("\n") else 0)
    return len(text.split()) + lines


def count_bytes(text: str) -> int:
    """UTF-8 bytes of `text`: the denominator of bits per byte."""
    if not isinstance(text, str):
        raise TypeError(f"`text` must be a str, got {type(text).__name__}.")
    return len(text.encode("utf-8"))


def tokenize_lines(text: str, tokenizer) -> list[int]:
    """Token ids of `text`, tokenized line by line (newlines kept), without special tokens. Special-token
    strings in the text ("[MASK]", "[EOS]", ...) are read as the characters they are, exactly as training
    and fine-tuning read their data (`hf_sfdlm.data.encode_plain_text`). A line longer than
    `data.MAX_PIECE_CHARS` (a one-line corpus such as text8) is cut before a word (`data.split_long_text`), so
    it never meets the tokenizer whole."""
    from .data import encode_plain_text, split_long_text

    lines = [piece for line in text.splitlines(keepends=True) for piece in split_long_text(line)]
    if not lines:
        return []
    encoded = encode_plain_text(tokenizer, lines)
    return [token for line in encoded for token in line]


def make_blocks(token_ids: Sequence[int], block_size: int) -> list[torch.Tensor]:
    """Consecutive non-overlapping blocks of `block_size` ids; the last one may be shorter."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"`block_size` must be a positive integer, got {block_size!r}.")
    ids = torch.as_tensor(list(token_ids), dtype=torch.long)
    return [ids[i:i + block_size] for i in range(0, len(ids), block_size)]


class CompactVocabulary:
    """A model vocabulary made of some of a tokenizer's ids plus one "other" id for all the rest.

    A small model over a 50k-id tokenizer spends most of its parameters and compute on the output
    layer. Predicting only the ids seen in training (`kept_ids`, in order: compact id k is
    `kept_ids[k]`) plus an `other` id (compact id `len(kept_ids)`) keeps the model honest: the other
    id's probability is spread uniformly over the `full_size - len(kept_ids)` ids not kept, so
    `log p(full ids) = log p(compact ids) - n_other * log(full_size - len(kept_ids))`, where n_other is
    the number of ids mapped to "other". `penalty` returns that second term, in nats.
    """

    def __init__(self, kept_ids: Sequence[int], full_size: int):
        kept = [int(i) for i in kept_ids]
        if isinstance(full_size, bool) or not isinstance(full_size, int) or full_size < 1:
            raise ValueError(f"`full_size` must be a positive integer, got {full_size!r}.")
        if len(set(kept)) != len(kept) or any(not 0 <= i < full_size for i in kept):
            raise ValueError(f"`kept_ids` must be distinct ids in [0, full_size={full_size}).")
        if len(kept) >= full_size:
            raise ValueError(f"`kept_ids` must leave at least one id of {full_size} for the 'other' id.")
        self.kept_ids = kept
        self.full_size = full_size
        self.other_id = len(kept)
        self._to_compact = torch.full((full_size,), self.other_id, dtype=torch.long)
        self._to_compact[torch.tensor(kept, dtype=torch.long)] = torch.arange(len(kept))
        self._to_full = torch.tensor(kept, dtype=torch.long)

    @classmethod
    def from_token_ids(cls, token_ids: Iterable[int], full_size: int, always_keep: Iterable[int] = (),
                       max_kept: int | None = None) -> "CompactVocabulary":
        """Keep the ids occurring in `token_ids` (e.g. the training split), or only the `max_kept` most
        frequent of them (ties: smaller id first), plus `always_keep`; sorted by id."""
        counts = Counter(int(i) for i in token_ids)
        always = set(int(i) for i in always_keep)
        if max_kept is not None:
            if isinstance(max_kept, bool) or not isinstance(max_kept, int) or max_kept < 1:
                raise ValueError(f"`max_kept` must be a positive integer or None, got {max_kept!r}.")
            ranked = sorted((i for i in counts if i not in always), key=lambda i: (-counts[i], i))
            counts = {i: counts[i] for i in ranked[:max(0, max_kept - len(always))]}
        return cls(sorted(set(counts) | always), full_size)

    @property
    def size(self) -> int:
        """Number of compact ids, the "other" id included."""
        return len(self.kept_ids) + 1

    @property
    def other_log_size(self) -> float:
        """log of the number of tokenizer ids the "other" id stands for."""
        return math.log(self.full_size - len(self.kept_ids))

    def encode(self, full_ids: torch.Tensor) -> torch.Tensor:
        """Tokenizer ids -> compact ids (ids not kept become `other_id`)."""
        full_ids = torch.as_tensor(full_ids, dtype=torch.long)
        if full_ids.numel() and (int(full_ids.min()) < 0 or int(full_ids.max()) >= self.full_size):
            raise ValueError(f"Token ids must lie in [0, {self.full_size}), got range "
                             f"[{int(full_ids.min())}, {int(full_ids.max())}].")
        return self._to_compact[full_ids]

    def decode(self, compact_ids: torch.Tensor, other_token_id: int) -> torch.Tensor:
        """Compact ids -> tokenizer ids; the "other" id (and ids beyond it, e.g. a mask) become `other_token_id`."""
        compact_ids = torch.as_tensor(compact_ids, dtype=torch.long)
        known = (compact_ids >= 0) & (compact_ids < self.other_id)
        return torch.where(known, self._to_full[compact_ids.clamp(0, self.other_id - 1)],
                           torch.full_like(compact_ids, other_token_id))

    def penalty(self, full_ids: torch.Tensor) -> float:
        """Nats to add to a compact-vocabulary NLL of `full_ids` to get the NLL of the tokenizer ids."""
        return float((self.encode(full_ids) == self.other_id).sum()) * self.other_log_size

    def to_dict(self) -> dict:
        return {"kept_ids": self.kept_ids, "full_size": self.full_size}


# ---------------------------------------------------------------------------------------------- scoring
def is_diffusion_model(model) -> bool:
    """True for models that estimate a NELBO (`nelbo` method), e.g. SFDLM and the Transformer denoiser."""
    return callable(getattr(model, "nelbo", None))


def is_autoregressive_model(model) -> bool:
    """True for transformers causal language models (GPT-2 and the like)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update([value] if isinstance(value, str) else value)
    return not is_diffusion_model(model) and type(model).__name__ in names


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError, TypeError):
        return torch.device("cpu")


@torch.no_grad()
def autoregressive_nll(model, input_ids: torch.Tensor, bos_token_id: int, labels: torch.Tensor | None = None,
                       attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Exact -log p(scored tokens) per row (B,) in float64 under a causal LM, each row preceded by BOS.

    Positions with `labels == -100` (or `attention_mask == 0`, right padding) condition but are not scored.
    """
    if bos_token_id is None:
        raise ValueError("An autoregressive model needs `bos_token_id` to score the first token of a block, got None.")
    batch = input_ids.shape[0]
    bos = torch.full((batch, 1), int(bos_token_id), dtype=input_ids.dtype, device=input_ids.device)
    inputs = torch.cat([bos, input_ids], dim=1)
    mask = None
    if attention_mask is not None:
        mask = torch.cat([torch.ones_like(attention_mask[:, :1]), attention_mask], dim=1)
    logits = model(input_ids=inputs, attention_mask=mask).logits[:, :-1]
    log_probs = logits.double().log_softmax(-1).gather(-1, input_ids.unsqueeze(-1)).squeeze(-1)
    return -(log_probs * scored_positions(input_ids, labels, attention_mask)).sum(-1)


def sequence_nll_samples(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                         labels: torch.Tensor | None = None, num_samples: int = 16,
                         generator: torch.Generator | None = None, bos_token_id: int | None = None,
                         estimator: str = "auto") -> torch.Tensor:
    """Per-row NLL estimates in nats, shape (B, S), float64.

    Diffusion models: `S = num_samples` single-draw NELBO estimates from `model.nelbo(..., return_samples=True,
    estimator=estimator)` (their mean is the NELBO estimate; the draws are stratified, not independent).
    Autoregressive models: one exact column (`S = 1`).
    """
    if is_diffusion_model(model):
        samples = model.nelbo(input_ids, attention_mask=attention_mask, labels=labels, num_samples=num_samples,
                              generator=generator, return_samples=True, estimator=estimator)
        return samples.double()
    if is_autoregressive_model(model):
        return autoregressive_nll(model, input_ids, bos_token_id, labels, attention_mask).unsqueeze(-1)
    raise TypeError(f"Cannot score a {type(model).__name__}: expected a diffusion model with `nelbo` "
                    "(SFDLMForDiffusionLM, TransformerDenoiserForDiffusionLM) or a transformers causal LM.")


@dataclass
class PerplexityResult:
    """Likelihood of a text under a model, with every common normalisation.

    Attributes:
        total_nll: total negative log-likelihood (an upper bound when `estimator == "nelbo"`), nats.
        total_nll_stderr: Monte Carlo standard error of `total_nll` (0 when exact).
        num_tokens, num_words, num_bytes: denominators (words: PTB/WikiText convention, see `count_words`).
        num_sequences: number of blocks scored. block_size: tokens per block.
        num_samples: noise levels t drawn per block (None when exact).
        tokenizer: name or path of the tokenizer the token-level figures refer to.
        estimator: ``"nelbo"`` (diffusion, Monte Carlo upper bound) or ``"exact"`` (autoregressive).
        num_unk_tokens: tokens of the text the tokenizer mapped to its unknown token (see `unk_share`).
        nelbo_estimator: the noise draws of the NELBO (`hf_sfdlm.diffusion.NELBO_ESTIMATORS`; None when exact).
        num_replicates: independent replicates per block the standard error comes from (None when exact).
    """

    total_nll: float
    total_nll_stderr: float
    num_tokens: int
    num_words: int
    num_bytes: int
    num_sequences: int
    block_size: int
    num_samples: int | None
    tokenizer: str
    estimator: str
    num_unk_tokens: int = 0
    nelbo_estimator: str | None = None
    num_replicates: int | None = None

    @property
    def unk_share(self) -> float:
        """Fraction of the text's tokens that are the unknown token: a model is only scored on what its
        tokenizer can represent, so a large share makes every figure here meaningless."""
        return self.num_unk_tokens / self.num_tokens if self.num_tokens else 0.0

    @property
    def nll_per_token(self) -> float:
        return self.total_nll / self.num_tokens

    @property
    def token_perplexity(self) -> float:
        return math.exp(self.nll_per_token)

    @property
    def word_perplexity(self) -> float:
        return math.exp(self.total_nll / self.num_words)

    @property
    def bits_per_byte(self) -> float:
        return self.total_nll / (LN2 * self.num_bytes)

    @property
    def bits_per_token(self) -> float:
        return self.nll_per_token / LN2

    def stderr(self, name: str) -> float:
        """Standard error of a reported figure (delta method for the perplexities)."""
        per = {"total_nll": 1.0, "nll_per_token": 1 / self.num_tokens, "bits_per_token": 1 / (LN2 * self.num_tokens),
               "bits_per_byte": 1 / (LN2 * self.num_bytes)}
        if name in per:
            return self.total_nll_stderr * per[name]
        if name == "token_perplexity":
            return self.token_perplexity * self.total_nll_stderr / self.num_tokens
        if name == "word_perplexity":
            return self.word_perplexity * self.total_nll_stderr / self.num_words
        raise ValueError(f"No standard error for {name!r}.")

    def to_dict(self) -> dict:
        record = asdict(self)
        for name in ("nll_per_token", "token_perplexity", "word_perplexity", "bits_per_byte", "bits_per_token"):
            record[name] = getattr(self, name)
            record[f"{name}_stderr"] = self.stderr(name)
        record["unk_share"] = self.unk_share
        return record

    def summary(self) -> str:
        kind = "NELBO bound" if self.estimator == "nelbo" else "exact"
        samples = f", {self.num_samples} t samples/block" if self.num_samples else ""
        return (f"{kind} over {self.num_sequences} blocks of {self.block_size} tokens{samples}: "
                f"token ppl ({self.tokenizer}) {self.token_perplexity:.2f} ± {self.stderr('token_perplexity'):.2f}, "
                f"word ppl {self.word_perplexity:.2f} ± {self.stderr('word_perplexity'):.2f}, "
                f"bits/byte {self.bits_per_byte:.4f} ± {self.stderr('bits_per_byte'):.4f}")


def score_blocks(model, blocks: Sequence[torch.Tensor], *, batch_size: int = 16, num_samples: int = 16,
                 seed: int = 0, bos_token_id: int | None = None, progress: bool = False,
                 estimator: str = "auto", num_replicates: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """NLL estimate and its Monte Carlo variance for every block (model-space ids), float64 (N,) each.

    Blocks of equal length are batched together (no padding anywhere). A diffusion block's `num_samples`
    model calls form `num_replicates` independent replicates of `num_samples / num_replicates` stratified
    draws each (`estimator`, see `DiffusionLMMixin.nelbo`); the estimate is their mean and its variance the
    replicates' sample variance over `num_replicates` (unbiased: draws within a replicate are stratified,
    hence not independent, so their own spread is no error bar). `progress` shows a tqdm bar on stderr.
    """
    for name, value in (("batch_size", batch_size), ("num_samples", num_samples), ("num_replicates", num_replicates)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    diffusion = is_diffusion_model(model)
    if diffusion and num_samples < 2:
        raise ValueError("A Monte Carlo NELBO needs `num_samples` >= 2 to estimate its standard error, got "
                         f"{num_samples}.")
    if diffusion and (num_replicates < 2 or num_samples % num_replicates):
        raise ValueError(f"`num_samples` ({num_samples}) must split into `num_replicates` ({num_replicates}) >= 2 "
                         "equal independent replicates (the error bar is their spread).")
    device = _model_device(model)
    generator = torch.Generator().manual_seed(seed)
    totals = torch.zeros(len(blocks), dtype=torch.float64)
    variances = torch.zeros(len(blocks), dtype=torch.float64)
    by_length: dict[int, list[int]] = {}
    for index, block in enumerate(blocks):
        by_length.setdefault(len(block), []).append(index)
    from tqdm.auto import tqdm

    replicates = num_replicates if diffusion else 1
    bar = tqdm(total=len(blocks), desc="scoring", unit="block", disable=not progress, dynamic_ncols=True)
    for indices in by_length.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            ids = torch.stack([blocks[i] for i in chunk]).to(device)
            means = torch.stack([
                sequence_nll_samples(model, ids, num_samples=num_samples // replicates, generator=generator,
                                     bos_token_id=bos_token_id, estimator=estimator).cpu().mean(-1)
                for _ in range(replicates)], dim=-1)
            totals[chunk] = means.mean(-1)
            if replicates > 1:
                variances[chunk] = means.var(-1, unbiased=True) / replicates
            bar.update(len(chunk))
    bar.close()
    return totals, variances


def _tokenizer_name(tokenizer) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def evaluate_perplexity(model, tokenizer, text: str, *, block_size: int = 128, batch_size: int = 16,
                        num_samples: int = 16, seed: int = 0, vocabulary: CompactVocabulary | None = None,
                        bos_token_id: int | None = None, tokenizer_name: str | None = None,
                        progress: bool = False, estimator: str = "auto", num_replicates: int = 2) -> PerplexityResult:
    """Token-level and word-level perplexity and bits per byte of `text` under `model`.

    Args:
        model: a diffusion model with `nelbo` (SFDLM, Transformer denoiser) or a transformers causal LM.
        tokenizer: the tokenizer whose ids the model reads (through `vocabulary`, if given).
        text: the evaluation text (see `read_text`).
        block_size: tokens per independently scored block.
        num_samples: model calls (noise draws) per block for diffusion models (ignored for AR models).
        estimator, num_replicates: the NELBO's noise draws and the independent replicates its standard
            error comes from (see `score_blocks`).
        vocabulary: the `CompactVocabulary` the model was trained on, if any; figures stay those of
            the tokenizer's ids.
        bos_token_id: the model-space id preceding each block for AR models; defaults to the
            tokenizer's BOS (or EOS) token, mapped through `vocabulary`.
        progress: show a tqdm bar while the blocks are scored.

    The result also counts the tokens the tokenizer mapped to its unknown token (`unk_share`).
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError("`text` must be a non-empty string of evaluation text.")
    if bos_token_id is None and is_autoregressive_model(model):
        full_bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if full_bos is None:
            raise ValueError("The tokenizer has neither a BOS nor an EOS token; pass `bos_token_id`.")
        bos_token_id = int(vocabulary.encode(torch.tensor(full_bos))) if vocabulary is not None else full_bos
    full_ids = torch.tensor(tokenize_lines(text, tokenizer), dtype=torch.long)
    model_ids = vocabulary.encode(full_ids) if vocabulary is not None else full_ids
    blocks = make_blocks(model_ids.tolist(), block_size)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        totals, variances = score_blocks(model, blocks, batch_size=batch_size, num_samples=num_samples,
                                         seed=seed, bos_token_id=bos_token_id, progress=progress,
                                         estimator=estimator, num_replicates=num_replicates)
    finally:
        if was_training:
            model.train()
    penalty = vocabulary.penalty(full_ids) if vocabulary is not None else 0.0
    diffusion = is_diffusion_model(model)
    return PerplexityResult(
        total_nll=float(totals.sum()) + penalty,
        total_nll_stderr=float(variances.sum().sqrt()),
        num_tokens=len(full_ids), num_words=count_words(text), num_bytes=count_bytes(text),
        num_sequences=len(blocks), block_size=block_size,
        num_samples=num_samples if diffusion else None,
        tokenizer=tokenizer_name or _tokenizer_name(tokenizer),
        estimator="nelbo" if diffusion else "exact",
        num_unk_tokens=_count_unknown(full_ids, tokenizer),
        nelbo_estimator=resolve_estimator(model.diffusion, estimator) if hasattr(model, "diffusion") else None,
        num_replicates=num_replicates if diffusion else None,
    )


def _count_unknown(token_ids: torch.Tensor, tokenizer) -> int:
    unk = getattr(tokenizer, "unk_token_id", None)
    return 0 if unk is None else int((token_ids == unk).sum())


def load_model(path: str, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
               trust_remote_code: bool = False):
    """Load a saved model for evaluation: SFDLM, the Transformer denoiser, or any transformers causal LM.

    Diffusion models load through `hf_sfdlm.hub.load_pretrained` (file checks, installed classes, no folder
    code without `trust_remote_code=True`); other configurations with `AutoModelForCausalLM`, passing
    `trust_remote_code` on. A LoRA adapter folder (`adapter_config.json`, e.g. from `sfdlm finetune`) loads
    onto the base it names, checked to be the base it was made for (`hf_sfdlm.lora.load_adapter`). Returns
    the model in eval mode.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from . import baselines  # noqa: F401  (registers the Transformer denoiser with the Auto classes)
    from . import register_auto_classes
    from .hub import check_safetensors_weights, load_pretrained, not_local_either

    register_auto_classes()

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`path` must be a local directory or Hub id, got {type(path).__name__}.")
    if os.path.isdir(path):
        check_safetensors_weights(path)  # causal LMs too: no pickle is ever opened
    if os.path.isfile(os.path.join(path, "adapter_config.json")):  # a LoRA adapter (`sfdlm finetune`) on its base
        model = load_pretrained(path, trust_remote_code=trust_remote_code,
                                **({"dtype": dtype} if dtype is not None else {}))
        return (model.to(device) if device is not None else model).eval()
    with contextlib.nullcontext() if os.path.isdir(path) else not_local_either(path):
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    diffusion_types = {"sfdlm", baselines.TransformerDenoiserConfig.model_type}
    loader = load_pretrained if config.model_type in diffusion_types else AutoModelForCausalLM.from_pretrained
    model = loader(path, trust_remote_code=trust_remote_code, **({"dtype": dtype} if dtype is not None else {}))
    if device is not None:
        model.to(device)
    return model.eval()


# ---------------------------------------------------------------------------------------------- generation quality
def _as_rows(sequences) -> list[list[int]]:
    if isinstance(sequences, torch.Tensor):
        if sequences.dim() != 2:
            raise ValueError(f"`sequences` must be a 2-D (batch, length) tensor, got shape {tuple(sequences.shape)}.")
        return sequences.tolist()
    rows = [list(map(int, row)) for row in sequences]
    if not rows:
        raise ValueError("`sequences` is empty.")
    return rows


@torch.no_grad()
def generative_perplexity(judge, sequences: torch.Tensor, bos_token_id: int, batch_size: int = 16,
                          attention_mask: torch.Tensor | None = None) -> float:
    """Perplexity of generated `sequences` (judge-space ids) under an autoregressive `judge`: exp of the
    exact NLL per scored token, each row preceded by `bos_token_id`."""
    if not is_autoregressive_model(judge):
        raise TypeError(f"The judge must be a transformers causal LM, got {type(judge).__name__}.")
    device = _model_device(judge)
    total, count = 0.0, 0
    for start in range(0, sequences.shape[0], batch_size):
        ids = sequences[start:start + batch_size].to(device)
        mask = None if attention_mask is None else attention_mask[start:start + batch_size].to(device)
        total += float(autoregressive_nll(judge, ids, bos_token_id, attention_mask=mask).sum())
        count += int(ids.numel() if mask is None else mask.sum())
    return math.exp(total / count)


def unigram_entropy(sequences) -> float:
    """Mean over rows of the entropy (nats) of each row's empirical token distribution.

    Degenerate repetition drives it towards 0; natural English text of ~1000 GPT-2 tokens sits near 5.6
    (the figure MDLM and Duo report).
    """
    values = []
    for row in _as_rows(sequences):
        if not row:
            continue
        counts = torch.bincount(torch.tensor(row)).double()
        probs = counts[counts > 0] / len(row)
        values.append(float(-(probs * probs.log()).sum()))
    return sum(values) / len(values)


def distinct_n(sequences, n: int) -> float:
    """Corpus-level distinct-n (Li et al., 2016): distinct n-grams / all n-grams over all rows."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"`n` must be a positive integer, got {n!r}.")
    grams = [tuple(row[i:i + n]) for row in _as_rows(sequences) for i in range(len(row) - n + 1)]
    if not grams:
        raise ValueError(f"No {n}-grams: every row is shorter than {n} tokens.")
    return len(set(grams)) / len(grams)


def infilling_exact_match(predictions: torch.Tensor, references: torch.Tensor, span_mask: torch.Tensor) -> dict:
    """Exact match of infilled spans: the share of rows whose every masked position is right, and token accuracy.

    Args:
        predictions, references: (B, L) ids. span_mask: (B, L) bool, True at the positions that were infilled.
    """
    if predictions.shape != references.shape or span_mask.shape != references.shape:
        raise ValueError(f"Shapes differ: predictions {tuple(predictions.shape)}, references "
                         f"{tuple(references.shape)}, span_mask {tuple(span_mask.shape)}.")
    span_mask = span_mask.bool()
    if not bool(span_mask.any(-1).all()):
        raise ValueError("Every row needs at least one infilled position in `span_mask`.")
    correct = (predictions == references) | ~span_mask
    return {"exact_match": float(correct.all(-1).double().mean()),
            "token_accuracy": float(((predictions == references) & span_mask).sum() / span_mask.sum())}


def span_nll(model, input_ids: torch.Tensor, span_mask: torch.Tensor, num_samples: int = 16,
             generator: torch.Generator | None = None, bos_token_id: int | None = None) -> torch.Tensor:
    """NLL (nats, NELBO bound for diffusion models) of the true span tokens given the rest of each row, (B,).

    Diffusion models condition on both sides of the span; an autoregressive model can only condition
    on the left context, and is scored on the span tokens given everything before them.
    """
    labels = torch.where(span_mask.bool(), input_ids, torch.full_like(input_ids, -100))
    samples = sequence_nll_samples(model, input_ids, labels=labels, num_samples=num_samples,
                                   generator=generator, bos_token_id=bos_token_id)
    return samples.mean(-1)


__all__ = [
    "CompactVocabulary",
    "PerplexityResult",
    "autoregressive_nll",
    "count_bytes",
    "count_words",
    "distinct_n",
    "evaluate_perplexity",
    "generative_perplexity",
    "infilling_exact_match",
    "is_autoregressive_model",
    "is_diffusion_model",
    "load_model",
    "make_blocks",
    "read_text",
    "score_blocks",
    "sequence_nll_samples",
    "span_nll",
    "tokenize_lines",
    "unigram_entropy",
]
