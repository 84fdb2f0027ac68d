"""Tests for the embedded synthetic grammar corpus (hf_sfdlm.synthetic)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hf_sfdlm.synthetic import SPECIAL_TOKENS, SyntheticGrammar, word_level_tokenizer, write_corpus

STREAM_LEN = 200_000
BATCH = 2_000  # batch-means blocks: far longer than the chain's mixing time


@pytest.fixture(scope="module")
def grammar() -> SyntheticGrammar:
    return SyntheticGrammar()


@pytest.fixture(scope="module")
def stream(grammar):
    """A long stationary stream, with its state path and per-word NLL recovered by tracking."""
    words = grammar.sample_words(STREAM_LEN, np.random.default_rng(12345))
    table = {s: grammar.emissions(s) for s in grammar.states}
    first = _infer_first_state(grammar, words)
    states, nll = [], []
    state = first
    for w in words:
        p, nxt = table[state][w]  # KeyError would mean the word is impossible here
        states.append(state)
        nll.append(-math.log(p))
        state = nxt
    return words, states, np.array(nll)


def _infer_first_state(grammar, words):
    """The stream starts in an unknown state: keep the candidates consistent with the words."""
    table = {s: grammar.emissions(s) for s in grammar.states}
    alive = {s: s for s in grammar.states}  # start state -> current state
    for w in words:
        alive = {s0: table[cur][w][1] for s0, cur in alive.items() if w in table[cur]}
        if len(set(alive.values())) == 1:
            break
    assert alive, "no state explains the sampled stream"
    # Different start states that merge into the same current state give the same
    # NLL from there on; pick any, but all candidates must agree on the current state.
    assert len(set(alive.values())) == 1
    return sorted(alive)[0]


def _batch_mean_and_se(x: np.ndarray) -> tuple[float, float]:
    """Mean and batch-means standard error (valid for a correlated stationary series)."""
    batches = x[: len(x) // BATCH * BATCH].reshape(-1, BATCH).mean(axis=1)
    return float(x.mean()), float(batches.std(ddof=1) / math.sqrt(len(batches)))


# -- structure ---------------------------------------------------------------------

def test_automaton_is_deterministic_and_normalised(grammar):
    vocab = set(grammar.vocabulary)
    assert 150 <= len(vocab) <= 400
    assert grammar.vocabulary == sorted(vocab)
    assert all(w == w.lower() and " " not in w for w in vocab)
    for s in grammar.states:
        em = grammar.emissions(s)
        assert math.isclose(sum(p for p, _ in em.values()), 1.0, abs_tol=1e-12)
        assert all(p > 0 and nxt in grammar.states for p, nxt in em.values())
        assert set(em) <= vocab
    # "." always returns to the start state.
    for s in grammar.states:
        em = grammar.emissions(s)
        if "." in em:
            assert em["."][1] == grammar.start_state


def test_entropy_rate_in_target_range(grammar):
    h = grammar.entropy_rate()
    assert 2.0 < h < 4.0
    # Independent recomputation from the public emission tables.
    mu = dict(zip(grammar.states, grammar.stationary_distribution()))
    h2 = sum(mu[s] * -sum(p * math.log(p) for p, _ in grammar.emissions(s).values()) for s in grammar.states)
    assert h == pytest.approx(h2, abs=1e-12)


# -- stationary distribution --------------------------------------------------------

def test_stationary_distribution_matches_power_iteration(grammar):
    t = grammar.transition_matrix()
    assert np.allclose(t.sum(axis=1), 1.0)
    mu = grammar.stationary_distribution()
    assert mu.min() > 0 and mu.sum() == pytest.approx(1.0)
    v = np.full(len(mu), 1.0 / len(mu))
    for _ in range(2_000):
        v = v @ t
    np.testing.assert_allclose(v, mu, atol=1e-10)
    np.testing.assert_allclose(mu @ t, mu, atol=1e-12)


def test_stationary_distribution_matches_empirical_state_frequencies(grammar, stream):
    _, states, _ = stream
    states = np.array(states)
    for s, m in zip(grammar.states, grammar.stationary_distribution()):
        mean, se = _batch_mean_and_se((states == s).astype(float))
        assert 0 < se < 0.01
        assert abs(mean - m) < 5 * se, (s, mean, m, se)


def test_stream_starts_from_stationary_distribution(grammar):
    # First word of independent streams ~ sum_s mu(s) P(w | s); check P(first word == ".").
    rng = np.random.default_rng(7)
    n = 5_000
    hits = sum(grammar.sample_words(1, rng)[0] == "." for _ in range(n))
    mu = grammar.stationary_distribution()
    p = sum(m * grammar.emissions(s).get(".", (0.0, None))[0] for s, m in zip(grammar.states, mu))
    se = math.sqrt(p * (1 - p) / n)
    assert abs(hits / n - p) < 5 * se


# -- entropy --------------------------------------------------------------------------

def test_empirical_nll_matches_entropy_rate(grammar, stream):
    _, _, nll = stream
    mean, se = _batch_mean_and_se(nll)
    assert 0 < se < 0.02  # tight enough that a wrong entropy would be caught
    assert abs(mean - grammar.entropy_rate()) < 4 * se, (mean, grammar.entropy_rate(), se)


def _exact_block_entropy(grammar, n):
    """Exact H(W_1..W_n) of the stationary stream by enumeration (small n only)."""
    mu = grammar.stationary_distribution()
    table = {s: grammar.emissions(s) for s in grammar.states}
    paths = {(): [(s, m) for s, m in zip(grammar.states, mu)]}  # prefix -> [(state, prob)]
    for _ in range(n):
        nxt: dict[tuple, dict[str, float]] = {}
        for prefix, alts in paths.items():
            for s, m in alts:
                for w, (p, s2) in table[s].items():
                    d = nxt.setdefault(prefix + (w,), {})
                    d[s2] = d.get(s2, 0.0) + m * p
        paths = {k: list(v.items()) for k, v in nxt.items()}
    probs = np.array([sum(m for _, m in alts) for alts in paths.values()])
    assert probs.sum() == pytest.approx(1.0)
    return float(-(probs * np.log(probs)).sum())


def test_block_entropy_bounds(grammar):
    h = grammar.entropy_rate()
    for n in (1, 2, 10, 100):
        lo, hi = grammar.block_entropy_lower_bound(n), grammar.block_entropy_upper_bound(n)
        assert lo == pytest.approx(n * h)
        assert lo <= hi
        assert hi - lo == pytest.approx(grammar.stationary_state_entropy())
    # The bounds bracket the exact block entropy for small blocks.
    previous = 0.0
    for n in (1, 2):
        exact = _exact_block_entropy(grammar, n)
        assert grammar.block_entropy_lower_bound(n) <= exact <= grammar.block_entropy_upper_bound(n)
        assert exact > previous
        previous = exact


# -- sampling and corpus ----------------------------------------------------------------

def test_sampling_is_deterministic_and_well_formed(grammar, tmp_path):
    text = grammar.sample_text(200, seed=3)
    assert text == SyntheticGrammar().sample_text(200, seed=3)
    assert text != grammar.sample_text(200, seed=4)
    assert grammar.sample_words(500, 9) == grammar.sample_words(500, 9)
    lines = text.splitlines()
    assert len(lines) == 200
    vocab = set(grammar.vocabulary)
    for line in lines:
        words = line.split(" ")
        assert words[-1] == "." and "." not in words[:-1]
        assert set(words) <= vocab
        assert " ".join(words) == line  # single spaces, no stray whitespace
    path = write_corpus(tmp_path / "sub" / "corpus.txt", num_sentences=200, seed=3)
    assert path.read_text(encoding="utf-8") == text


def test_sentences_read_like_english(grammar):
    text = grammar.sample_text(300, seed=0)
    for line in text.splitlines():
        words = line.split()
        assert words[0] not in {".", "and", "but"} and len(words) >= 3
        for a, b in zip(words, words[1:]):
            if a == "a":
                assert b[0] not in "aeiou", line  # never "a old ..."


# -- tokenizer ------------------------------------------------------------------------

def test_word_level_tokenizer(grammar):
    tok = word_level_tokenizer(grammar)
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in SPECIAL_TOKENS.items()}
    assert len(set(ids.values())) == 4
    assert (tok.pad_token, tok.mask_token, tok.eos_token, tok.unk_token) == ("[PAD]", "[MASK]", "[EOS]", "[UNK]")
    assert (tok.pad_token_id, tok.mask_token_id, tok.eos_token_id, tok.unk_token_id) == (
        ids["pad_token"], ids["mask_token"], ids["eos_token"], ids["unk_token"])
    assert len(tok) == len(grammar.vocabulary) + 4
    for sentence in grammar.sample_text(50, seed=1).splitlines():
        enc = tok(sentence, add_special_tokens=True)["input_ids"]
        assert len(enc) == len(sentence.split())
        assert ids["unk_token"] not in enc
        assert tok.decode(enc) == sentence
    # Every vocabulary word is exactly one token.
    vocab_ids = tok.convert_tokens_to_ids(grammar.vocabulary)
    assert len(set(vocab_ids)) == len(grammar.vocabulary) and not set(vocab_ids) & set(ids.values())
    assert tok("zebra")["input_ids"] == [ids["unk_token"]]
