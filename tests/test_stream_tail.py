"""One-line corpora (text8-style: no line breaks) hold out the stream's tail, train and evaluate."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hf_sfdlm.data import DataConfig, build_datasets, load_text_dataset, split_heldout
from hf_sfdlm.synthetic import SyntheticGrammar, word_level_tokenizer


def one_line(tmp_path, sentences=400, seed=3):
    text = " ".join(SyntheticGrammar().sample_sentences(sentences, generator=seed))
    path = tmp_path / "stream.txt"
    path.write_text(text)  # no line break at all, not even a final one
    return path, text


def test_a_single_line_holds_out_its_tail_cut_before_a_word(tmp_path):
    path, text = one_line(tmp_path)
    config = DataConfig(dataset=str(path), validation_fraction=0.1)
    raw = load_text_dataset(config)
    assert len(raw["train"]) == 1
    train, held = split_heldout(raw, config)
    head, tail = "".join(train["text"]), "".join(held["text"])
    assert head + tail == text  # nothing lost, nothing shared
    assert 0.09 < len(tail) / len(text) < 0.11
    assert tail[0] == " " and tail[1] != " " and head[-1] != " "  # the cut falls before a word
    assert train["_document_end"] == [False]  # no EOS after the cut piece


def test_the_tokenised_splits_are_the_stream_without_an_eos_at_the_cut(tmp_path):
    path, text = one_line(tmp_path)
    words = word_level_tokenizer()
    config = DataConfig(dataset=str(path), validation_fraction=0.1, block_size=8, add_eos=True)
    train, held = build_datasets(config, words)
    assert len(train) > 5 * len(held) > 0
    stream = [i for block in train["input_ids"] for i in block] + [i for block in held["input_ids"] for i in block]
    expected = words(text.split(), is_split_into_words=True, add_special_tokens=False)["input_ids"]
    assert words.eos_token_id not in stream[:len(train) * 8]  # the training part ends mid-document
    # the blocks are the stream's prefix of each part (packing drops each part's remainder)
    flat_train = [i for block in train["input_ids"] for i in block]
    assert flat_train == expected[:len(flat_train)]


def test_too_short_or_explicit_sizes_raise(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("word")
    config = DataConfig(dataset=str(path))
    with pytest.raises(ValueError, match="too short"):
        split_heldout(load_text_dataset(config), config)
    path, _ = one_line(tmp_path, sentences=20)
    config = DataConfig(dataset=str(path), validation_size=1)
    with pytest.raises(ValueError, match="Cannot hold out 1 of 1 examples.*unset it"):
        split_heldout(load_text_dataset(config), config)


def test_one_line_corpus_trains_and_evaluates_end_to_end(tmp_path):
    from accelerate.state import AcceleratorState

    from hf_sfdlm.commands.train import main

    torch.set_num_threads(1)
    AcceleratorState._reset_state()
    path, _ = one_line(tmp_path, sentences=300)
    out = tmp_path / "run"
    assert main(["--data", str(path), "--output-dir", str(out), "--max-steps", "3", "--num-samples", "0",
                 "tokenizer_vocab_size=300", "model.process=absorbing", "model.hidden_size=32",
                 "model.fourier_intermediate_size=64", "data.block_size=16", "training.batch_size=8",
                 "training.eval_max_sequences=8", "training.progress_bar=false", "training.log_with=[]"]) == 0
    report = json.loads((out / "train_report.json").read_text())
    assert report["steps"] == 3 and math.isfinite(report["eval_nelbo"])
