"""Data pipeline (hf_sfdlm.data): sources, held-out split, tokenisation, packing, padding, tokenizers."""

from __future__ import annotations

import json
import math
import os
from itertools import chain

import pytest
import torch
from conftest import SHARED_DATA, tiny_config

from hf_sfdlm import SFDLMForDiffusionLM
from hf_sfdlm.data import (
    DataConfig,
    DiffusionCollator,
    align_model_with_tokenizer,
    build_datasets,
    load_text_dataset,
    load_tokenizer,
    prepare_tokenizer,
    split_heldout,
    tokenize_dataset,
    train_bpe_tokenizer,
)
from hf_sfdlm.synthetic import SyntheticGrammar, word_level_tokenizer

LINES = [
    "the small dog sees a red ball .",
    "",  # blank lines are dropped
    "nina sleeps quietly because the farmer builds her boat .",
    "tom finds a cake .",
    "a big bird sings .",
    "the teacher reads a letter near the river .",
]


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(LINES) + "\n")
    return path


@pytest.fixture(scope="module")
def words():
    return word_level_tokenizer()


def _block_stream(dataset) -> list[int]:
    return list(chain.from_iterable(dataset["input_ids"]))


# ---------------------------------------------------------------------------------------------- packing
def test_packing_is_the_document_stream_with_eos_cut_into_blocks(text_file, words):
    config = DataConfig(dataset=str(text_file), block_size=5, add_eos=True)
    raw = load_text_dataset(config)
    blocks = tokenize_dataset(raw["train"], words, config)
    # Independent recomputation: every non-blank line's ids, each followed by EOS, concatenated.
    stream = []
    for line in LINES:
        if line.strip():
            stream += words(line, add_special_tokens=False)["input_ids"] + [words.eos_token_id]
    usable = len(stream) // 5 * 5
    assert all(len(block) == 5 for block in blocks["input_ids"])
    assert _block_stream(blocks) == stream[:usable]


def test_synthetic_corpus_stream_has_no_separators_and_one_token_per_word(tmp_path, words):
    config = DataConfig(block_size=16, synthetic_sentences=40, synthetic_seed=3)
    assert not config.separate_documents
    raw = load_text_dataset(config, work_dir=tmp_path)
    blocks = tokenize_dataset(raw["train"], words, config)
    text = " ".join(SyntheticGrammar().sample_sentences(40, generator=3))
    ids = words(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.split())  # one word = one token
    assert _block_stream(blocks) == ids[: len(ids) // 16 * 16]
    assert words.eos_token_id not in _block_stream(blocks)


def test_unpacked_mode_keeps_documents_and_splits_long_ones(text_file, words):
    config = DataConfig(dataset=str(text_file), block_size=6, packing=False, add_eos=True)
    examples = tokenize_dataset(load_text_dataset(config)["train"], words, config)["input_ids"]
    expected = []
    for line in LINES:
        if line.strip():
            doc = words(line, add_special_tokens=False)["input_ids"] + [words.eos_token_id]
            expected += [doc[i:i + 6] for i in range(0, len(doc), 6)]
    assert examples == expected


def test_collator_pads_with_mask_and_never_scores_padding():
    collate = DiffusionCollator(pad_token_id=0, pad_to_multiple_of=4)
    batch = collate([{"input_ids": [5, 6, 7]}, {"input_ids": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7, -100], [8, -100, -100, -100]]


# ---------------------------------------------------------------------------------------------- sources
def test_json_lines_with_a_named_column(tmp_path, words):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": line, "id": i}) + "\n" for i, line in enumerate(LINES)))
    config = DataConfig(dataset=str(path), text_column="body", block_size=4)
    raw = load_text_dataset(config)
    assert raw["train"].column_names == ["body", "id"]
    blocks = tokenize_dataset(raw["train"], words, config)
    assert len(blocks) > 0 and set(blocks.column_names) == {"input_ids"}


def test_missing_column_names_the_column_and_the_available_ones(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"body": "a dog ."}) + "\n")
    with pytest.raises(ValueError, match=r"no column 'text'.*\['body'\]"):
        load_text_dataset(DataConfig(dataset=str(path)))


def test_missing_and_empty_files_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_text_dataset(DataConfig(dataset=str(tmp_path / "nope.txt")))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_text_dataset(DataConfig(dataset=str(empty)))
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\t\n")
    with pytest.raises(ValueError, match="empty"):
        load_text_dataset(DataConfig(dataset=str(blank)))


def test_text_shorter_than_one_block_is_refused(text_file, words):
    config = DataConfig(dataset=str(text_file), block_size=1000)
    with pytest.raises(ValueError, match="block_size"):
        tokenize_dataset(load_text_dataset(config)["train"], words, config)


def test_bad_data_config_values():
    with pytest.raises(ValueError, match="block_size"):
        DataConfig(block_size=1)
    with pytest.raises(ValueError, match="validation_fraction"):
        DataConfig(validation_fraction=1.5)
    with pytest.raises(ValueError, match="validation_size"):
        DataConfig(dataset="c4", streaming=True)
    with pytest.raises(ValueError, match="Unknown `data` option"):
        DataConfig.from_dict({"blocksize": 3})


def test_offline_hub_name_fails_with_the_name():
    with pytest.raises(ValueError, match="no-such-org/no-such-dataset"):
        load_text_dataset(DataConfig(dataset="no-such-org/no-such-dataset"))


def test_real_text_with_gpt2_tokenizer(tmp_path):
    source = os.path.join(SHARED_DATA, "ptb", "ptb.valid.txt")
    if not os.path.exists(source):
        pytest.skip("shared benchmark data not available")
    path = tmp_path / "ptb-head.txt"  # the first 400 lines keep the test quick
    with open(source) as handle:
        path.write_text("".join(line for _, line in zip(range(400), handle)))
    gpt2 = load_tokenizer(os.path.join(SHARED_DATA, "gpt2-tokenizer"), DataConfig())
    train, held_out = build_datasets(DataConfig(dataset=str(path), block_size=64, validation_fraction=0.1), gpt2,
                                     seed=0)
    assert len(train) > 5 * len(held_out) > 0
    stream = _block_stream(train)
    assert max(stream) < len(gpt2) and stream.count(gpt2.eos_token_id) > 100


# ---------------------------------------------------------------------------------------------- splits and cache
def test_heldout_split_is_disjoint_seeded_and_sized(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_text("".join(f"line {i}\n" for i in range(200)))
    config = DataConfig(dataset=str(path), validation_fraction=0.1)
    raw = load_text_dataset(config)
    train, held = split_heldout(raw, config, seed=1)
    assert len(held) == 20 and len(train) == 180
    assert not set(train["text"]) & set(held["text"])
    again_train, again_held = split_heldout(raw, config, seed=1)
    assert again_held["text"] == held["text"]
    assert split_heldout(raw, config, seed=2)[1]["text"] != held["text"]


def test_existing_validation_split_is_used(tmp_path):
    (tmp_path / "train.txt").write_text("a b c\n")
    config = DataConfig(dataset=str(tmp_path / "train.txt"), validation_split="validation")
    with pytest.raises(ValueError, match="no split 'validation'"):
        load_text_dataset(config)


def test_tokenisation_is_cached_on_disk(text_file, words):
    config = DataConfig(dataset=str(text_file), block_size=4)
    first = tokenize_dataset(load_text_dataset(config)["train"], words, config)
    second = tokenize_dataset(load_text_dataset(config)["train"], words, config)
    files = [f["filename"] for f in first.cache_files]
    assert files and files == [f["filename"] for f in second.cache_files]
    assert all(os.path.exists(f) for f in files)


def test_streaming_matches_the_in_memory_pipeline(tmp_path, words):
    path = tmp_path / "lines.txt"
    sentences = SyntheticGrammar().sample_sentences(60, generator=0)
    path.write_text("\n".join(sentences) + "\n")
    common = dict(dataset=str(path), block_size=8, validation_size=10)
    streamed = build_datasets(DataConfig(streaming=True, shuffle_buffer=1, **common), words, seed=0)
    held_stream = [ex["input_ids"] for ex in streamed[1]]
    # The held-out part of a stream is its head: the first 10 documents, packed.
    head = list(chain.from_iterable(words(s, add_special_tokens=False)["input_ids"] + [words.eos_token_id]
                                    for s in sentences[:10]))
    assert list(chain.from_iterable(held_stream)) == head[: len(head) // 8 * 8]
    train_blocks = [ex["input_ids"] for ex in streamed[0]]
    assert train_blocks and all(len(b) == 8 for b in train_blocks)


# ---------------------------------------------------------------------------------------------- tokenizers
def test_prepare_tokenizer_adds_mask_and_pad_to_gpt2():
    path = os.path.join(SHARED_DATA, "gpt2-tokenizer")
    if not os.path.exists(path):
        pytest.skip("shared GPT-2 tokenizer not available")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.mask_token is None and tokenizer.pad_token is None
    before = len(tokenizer)
    assert prepare_tokenizer(tokenizer) == 2
    assert len(tokenizer) == before + 2
    assert {tokenizer.mask_token_id, tokenizer.pad_token_id} == {before, before + 1}
    assert tokenizer.eos_token == "<|endoftext|>"
    assert prepare_tokenizer(tokenizer) == 0  # idempotent


def test_align_model_resizes_embeddings_and_rebuilds_the_diffusion(words):
    model = SFDLMForDiffusionLM(tiny_config(vocab_size=32, process="uniform"))
    align_model_with_tokenizer(model, words)
    assert model.config.vocab_size == len(words)
    assert model.get_input_embeddings().weight.shape[0] == len(words)
    assert model.lm_head.weight.shape[0] == len(words)
    assert model.diffusion.vocab_size == len(words)
    assert model.config.mask_token_id == words.mask_token_id
    ids = torch.tensor([[5, len(words) - 1, 7, 8]])
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


def test_bpe_tokenizer_round_trips_and_saves(tmp_path):
    from transformers import AutoTokenizer

    texts = SyntheticGrammar().sample_sentences(300, generator=0) + ["Zürich, naïve café ☕ 42!"]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=400)
    assert len(tokenizer) <= 400
    assert [tokenizer.pad_token_id, tokenizer.mask_token_id, tokenizer.eos_token_id] == [0, 1, 2]
    for text in texts[:5] + texts[-1:]:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    # Frequent words become single tokens (merges were learned).
    assert len(tokenizer(" the dog")["input_ids"]) < len(" the dog")
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(texts[0])["input_ids"] == tokenizer(texts[0])["input_ids"]
    with pytest.raises(ValueError, match="empty corpus"):
        train_bpe_tokenizer(["", "  "], vocab_size=400)
    with pytest.raises(ValueError, match="too small"):
        train_bpe_tokenizer(texts, vocab_size=100)


def test_train_tokenizer_command(tmp_path, text_file):
    from transformers import AutoTokenizer

    from hf_sfdlm.cli import main

    out = tmp_path / "tok"
    assert main(["train-tokenizer", "--data", str(text_file), "--vocab-size", "300", "--output-dir", str(out)]) == 0
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.mask_token == "[MASK]" and tokenizer.pad_token == "[PAD]"
    assert tokenizer.decode(tokenizer(LINES[0])["input_ids"]) == LINES[0]


# ---------------------------------------------------------------------------------------------- bad files
BAD_FILES = {
    # name: (bytes, the line the error must name)
    "binary.txt": (b"a first line\n\x89PNG\r\n\x1a\n\x00\x00\xff\xfe\n", 4),
    "nul.txt": (b"\x00\x00\x00hello\n", 1),
    "latin1.txt": ("first line\nna\u00efve caf\u00e9\n".encode("latin-1"), 2),
    "broken.jsonl": (b'{"text": "a"}\n{"text": "b"\n{"text": "c"}\n', 2),
    "scalar.jsonl": (b'{"text": "a"}\n"just a string"\n', 2),
    "badutf8.jsonl": (b'{"text": "a"}\n{"text": "\xff"}\n', 2),
    "extra_field.csv": (b'text,label\nhello,1\n"a, b",2\nx,y,z\n', 4),
    "open_quote.csv": (b'text\nfine\n"never closed\nline two\n', 4),
}


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_unreadable_data_names_the_file_and_the_line(tmp_path, name, streaming):
    content, line = BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(content)
    config = DataConfig(dataset=str(path), streaming=streaming, validation_size=1 if streaming else None)
    with pytest.raises(ValueError, match=rf"{name}'.*line {line}\b") as caught:
        raw = load_text_dataset(config)
        list(raw["train"]) if streaming else None  # a stream reads lazily: the error may come mid-iteration
    assert "DatasetGenerationError" not in str(caught.value)


def test_a_bad_line_deep_in_a_stream_is_named_when_reached(tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(3000)) + "{oops\n")
    with pytest.raises(ValueError, match=r"long.jsonl', line 3001, column 2: invalid JSON"):
        for _ in load_text_dataset(DataConfig(dataset=str(path), streaming=True, validation_size=1))["train"]:
            pass  # datasets parses JSON in 10 MB chunks: here the error comes with the first example


def test_a_json_array_document_is_still_read(tmp_path, words):
    path = tmp_path / "array.json"
    path.write_text(json.dumps([{"text": line} for line in LINES if line], indent=2))
    raw = load_text_dataset(DataConfig(dataset=str(path)))
    assert raw["train"]["text"] == [line for line in LINES if line]


def test_an_empty_sft_file_and_a_binary_one_are_named(tmp_path):
    from hf_sfdlm.sft import is_sft_file, load_sft_dataset

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl' is empty"):
        load_sft_dataset(empty, word_level_tokenizer())
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b'{"prompt": "a", "response": "b"}\n\xff\xfe\x00\x01\n')
    assert is_sft_file(binary)  # sniffing the first record never raises
    with pytest.raises(ValueError, match=r"binary.jsonl', line 2: a NUL byte"):
        load_sft_dataset(binary, word_level_tokenizer())
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": }\n')
    with pytest.raises(ValueError, match=r"broken.jsonl', line 2, column \d+: invalid JSON"):
        load_sft_dataset(broken, word_level_tokenizer())


# ---------------------------------------------------------------------------------------------- long lines
def test_pieces_tokenise_exactly_like_the_whole_text():
    from transformers import AutoTokenizer

    from hf_sfdlm.data import split_long_text

    gpt2 = AutoTokenizer.from_pretrained(os.path.join(SHARED_DATA, "gpt2-tokenizer"))
    text = open(os.path.join(SHARED_DATA, "wikitext-2-raw", "wiki.valid.raw"), encoding="utf-8").read()[:60_000]
    whole = gpt2(text, add_special_tokens=False)["input_ids"]
    for limit in (40, 333, 4096):
        pieces = split_long_text(text, limit)
        assert "".join(pieces) == text and max(map(len, pieces)) <= limit
        assert [i for piece in pieces for i in gpt2(piece, add_special_tokens=False)["input_ids"]] == whole
    # No whitespace at all: cut hard, nothing lost.
    assert split_long_text("x" * 10, 4) == ["xxxx", "xxxx", "xx"]


@pytest.mark.parametrize("streaming", [False, True])
def test_a_very_long_line_is_split_before_tokenising_and_packs_like_the_whole(tmp_path, words, monkeypatch,
                                                                              streaming):
    import hf_sfdlm.data as data

    monkeypatch.setattr(data, "MAX_PIECE_CHARS", 64)
    long_line = " ".join([LINES[0], LINES[2], LINES[3]] * 40)  # ~3,800 characters, one line
    path = tmp_path / "long.txt"
    path.write_text(LINES[4] + "\n" + long_line + "\n" + LINES[5] + "\n")
    config = DataConfig(dataset=str(path), block_size=7, add_eos=True, streaming=streaming,
                        validation_size=1 if streaming else None)
    raw = load_text_dataset(config)["train"]
    seen = []
    real_call = type(words).__call__

    def spy(self, text, *args, **kwargs):
        seen.extend([text] if isinstance(text, str) else text)
        return real_call(self, text, *args, **kwargs)

    monkeypatch.setattr(type(words), "__call__", spy)
    blocks = _block_stream(tokenize_dataset(raw, words, config))
    assert seen and max(map(len, seen)) <= 64  # the tokenizer never saw the long line whole
    monkeypatch.undo()
    expected = list(chain.from_iterable(words(line, add_special_tokens=False)["input_ids"] + [words.eos_token_id]
                                        for line in (LINES[4], long_line, LINES[5])))
    assert blocks == expected[:len(expected) // 7 * 7]  # one EOS per document, none inside the split line


# ---------------------------------------------------------------------------------------------- literal special tokens
def test_literal_special_token_text_in_a_corpus_is_ordinary_text(tmp_path):
    corpus = [f"line {i} says [MASK] and [PAD] then [EOS] as plain words" for i in range(50)]
    tokenizer = train_bpe_tokenizer(corpus, vocab_size=300)
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(corpus) + "\n")
    config = DataConfig(dataset=str(path), block_size=8, add_eos=True)
    ids = _block_stream(tokenize_dataset(load_text_dataset(config)["train"], tokenizer, config))
    assert tokenizer.mask_token_id not in ids and tokenizer.pad_token_id not in ids
    assert ids.count(tokenizer.eos_token_id) in (len(corpus) - 1, len(corpus))  # only the separators
    assert "[MASK]" in tokenizer.decode(ids)
    # A word-level vocabulary that lists "[MASK]" as a word maps the literal to its unknown token instead.
    from hf_sfdlm.data import encode_plain_text

    words = word_level_tokenizer()
    plain = encode_plain_text(words, ["the [MASK] dog [PAD]"])[0]
    assert plain == words("the [UNK] dog [UNK]", add_special_tokens=False)["input_ids"]


def test_a_corpus_line_containing_mask_trains(tmp_path, monkeypatch, capsys):
    """Issue 10 item 6: a literal "[MASK]" anywhere in a pretraining corpus used to stop an absorbing run."""
    from accelerate.state import AcceleratorState

    from hf_sfdlm.commands.train import main

    torch.set_num_threads(1)
    AcceleratorState._reset_state()
    sentences = SyntheticGrammar().sample_sentences(300, generator=3)
    sentences[::7] = [s + " Fill the [MASK] here, [PAD] and [EOS] too." for s in sentences[::7]]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(sentences) + "\n")
    out = tmp_path / "run"
    assert main(["--data", str(corpus), "--output-dir", str(out), "--max-steps", "4", "--num-samples", "1",
                 "--sample-steps", "2", "tokenizer_vocab_size=400", "model.process=absorbing", "model.hidden_size=32",
                 "model.fourier_intermediate_size=64", "data.block_size=16", "training.batch_size=8",
                 "training.eval_max_sequences=8", "training.progress_bar=false", "training.log_with=[jsonl]"]) == 0
    report = json.loads((out / "train_report.json").read_text())
    assert report["steps"] == 4 and math.isfinite(report["eval_nelbo"])
    losses = [json.loads(line)["train/loss"] for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()
              if "train/loss" in line]
    assert losses and all(math.isfinite(loss) for loss in losses)
    AcceleratorState._reset_state()
