"""A tiny probabilistic grammar of English-like sentences with exactly known entropy.

This is the library's embedded default training corpus.  The grammar is a
*deterministic probabilistic automaton*: in every state each word that can be
emitted leads to exactly one next state.  Hence the word sequence determines
the state path, and the entropy per word of the stationary stream is exactly

    h = sum_s mu(s) * H(next word | state s),

where ``mu`` is the stationary distribution of the state chain.  A language
model trained on this stream cannot do better than ``h`` nats per word, which
makes it a yardstick for training.

Sentences are concatenated into one continuous stream: the word ``"."`` ends a
sentence and sends the automaton back to the start state.  Sentences look like

    the small dog sees a red ball near the house .
    nina sleeps quietly because the farmer builds her boat .

Every adjective and noun begins with a consonant, so ``"a"`` is always right.

The nine states and their hand-set class probabilities are listed in
``_STATES``; within a word class, the words follow a Zipf law (the k-th word
listed has probability proportional to ``1 / k``), so the entropy is not that
of a uniform choice.
"""

from __future__ import annotations

import bisect
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = ["SyntheticGrammar", "write_corpus", "word_level_tokenizer", "SPECIAL_TOKENS"]

# ---------------------------------------------------------------------------
# Word classes (all lowercase, disjoint).  Order matters: earlier words are
# more frequent (Zipf).
# ---------------------------------------------------------------------------
_WORDS: dict[str, tuple[str, ...]] = {
    "det": (
        "the", "a", "this", "that", "every", "each",
        "my", "your", "his", "her", "our", "their",
    ),
    "name": (
        "tom", "nina", "paul", "rosa", "max", "lena",
        "sam", "mira", "ben", "kate", "leo", "vera",
    ),
    "adj": (
        "small", "big", "red", "green", "blue", "brown", "black", "white",
        "tall", "short", "happy", "sad", "quiet", "loud", "bright", "dark",
        "warm", "cold", "soft", "heavy", "light", "new", "young", "quick",
        "slow", "funny", "strange", "gentle", "tiny", "huge", "busy", "lazy",
        "clever", "brave", "proud", "sleepy", "shiny", "wooden", "golden",
        "round", "narrow", "wide", "dusty", "noisy", "friendly",
    ),
    "noun": (
        "dog", "cat", "bird", "horse", "fish", "mouse", "farmer", "teacher",
        "doctor", "child", "baker", "sailor", "king", "queen", "girl", "boy",
        "man", "woman", "friend", "neighbor", "ball", "house", "tree",
        "garden", "river", "table", "chair", "window", "door", "box", "book",
        "letter", "cake", "bread", "cup", "lamp", "car", "boat", "train",
        "bridge", "hill", "road", "park", "city", "village", "market",
        "school", "kitchen", "forest", "field", "stone", "flower", "key",
        "hat", "coat", "bag", "bottle", "basket", "rope", "wall", "fence",
        "shop", "tower", "ship", "candle", "picture",
    ),
    "tverb": (
        "sees", "finds", "likes", "takes", "holds", "follows", "watches",
        "carries", "pushes", "pulls", "loves", "hates", "helps", "visits",
        "paints", "builds", "opens", "closes", "buys", "sells", "wants",
        "needs", "brings", "drops", "catches", "throws", "cleans", "fixes",
        "chases", "reads",
    ),
    "iverb": (
        "sleeps", "runs", "walks", "sings", "waits", "smiles", "laughs",
        "jumps", "swims", "falls", "dances", "rests", "works", "plays",
        "cries", "sits", "stays", "shines", "wanders", "hides",
    ),
    "prep": (
        "near", "behind", "under", "over", "beside", "inside", "into",
        "across", "through", "around", "toward", "past", "with", "without",
        "from", "beyond",
    ),
    "adv": (
        "quickly", "slowly", "quietly", "loudly", "happily", "sadly",
        "carefully", "gently", "softly", "again", "today", "yesterday",
        "later", "together", "often", "early", "away", "badly", "well",
        "twice", "once", "there",
    ),
    "conj": ("and", "but", "so", "while", "because"),
    "end": (".",),
}

# ---------------------------------------------------------------------------
# The automaton: state -> [(word class, probability, next state), ...].
# Word classes are disjoint, so each (state, word) has one next state.
# ---------------------------------------------------------------------------
_STATES: dict[str, list[tuple[str, float, str]]] = {
    # Subject: a determiner (then modifiers and noun) or a name.
    "START": [("det", 0.85, "SUBJ_MOD"), ("name", 0.15, "VERB")],
    "SUBJ_MOD": [("adj", 0.25, "SUBJ_MOD"), ("noun", 0.75, "VERB")],
    "VERB": [("tverb", 0.6, "OBJ_DET"), ("iverb", 0.4, "TAIL")],
    # Object of a transitive verb.
    "OBJ_DET": [("det", 0.8, "OBJ_MOD"), ("name", 0.2, "TAIL")],
    "OBJ_MOD": [("adj", 0.25, "OBJ_MOD"), ("noun", 0.75, "TAIL")],
    # Prepositional phrase.
    "PP_DET": [("det", 0.9, "PP_MOD"), ("name", 0.1, "TAIL")],
    "PP_MOD": [("adj", 0.2, "PP_MOD"), ("noun", 0.8, "TAIL")],
    # After a complete phrase: end, extend, or join another clause.
    "TAIL": [("end", 0.5, "START"), ("prep", 0.25, "PP_DET"),
             ("adv", 0.15, "ADV_TAIL"), ("conj", 0.1, "START")],
    "ADV_TAIL": [("end", 0.7, "START"), ("prep", 0.15, "PP_DET"),
                 ("conj", 0.15, "START")],
}

_START = "START"

#: Special tokens of :func:`word_level_tokenizer`, in id order (ids 0..3).
SPECIAL_TOKENS: dict[str, str] = {
    "pad_token": "[PAD]",
    "mask_token": "[MASK]",
    "eos_token": "[EOS]",
    "unk_token": "[UNK]",
}


def _zipf(n: int) -> np.ndarray:
    """Zipf probabilities ``p_k ∝ 1/k`` for ``k = 1..n``."""
    weights = 1.0 / np.arange(1, n + 1)
    return weights / weights.sum()


def _entropy(p: np.ndarray) -> float:
    """Shannon entropy in nats of a probability vector (0 log 0 = 0)."""
    p = np.asarray(p, dtype=np.float64)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def _as_generator(generator: np.random.Generator | int | None, default: int) -> np.random.Generator:
    """Accept a Generator, an integer seed, or None (use ``default``)."""
    if isinstance(generator, np.random.Generator):
        return generator
    return np.random.default_rng(default if generator is None else generator)


class SyntheticGrammar:
    """The fixed probabilistic grammar; an exactly analysable word source.

    The grammar itself is deterministic and identical for every instance;
    ``seed`` is only the default seed used by the sampling methods when they
    are given no generator/seed.

    Attributes of interest: :attr:`vocabulary`, :attr:`states`,
    :meth:`emissions`, :meth:`stationary_distribution`, :meth:`entropy_rate`.
    """

    def __init__(self, seed: int = 0) -> None:
        """Build the automaton tables; ``seed`` is the default sampling seed."""
        self.seed = seed
        self._state_names = list(_STATES)
        index = {name: i for i, name in enumerate(self._state_names)}
        # Per state: parallel lists of words, probabilities, next-state indices.
        self._words: list[list[str]] = []
        self._probs: list[np.ndarray] = []
        self._next: list[list[int]] = []
        for name in self._state_names:
            words, probs, nxt = [], [], []
            for cls, p_cls, target in _STATES[name]:
                members = _WORDS[cls]
                words += members
                probs += list(p_cls * _zipf(len(members)))
                nxt += [index[target]] * len(members)
            assert len(set(words)) == len(words), f"state {name} emits a word twice"
            assert abs(sum(probs) - 1.0) < 1e-12, f"state {name} probabilities do not sum to 1"
            self._words.append(words)
            self._probs.append(np.array(probs))
            self._next.append(nxt)
        self._start = index[_START]
        # Cumulative probabilities (plain lists: bisect is fast on them).
        self._cum = [list(np.cumsum(p)) for p in self._probs]
        self._mu = self._solve_stationary()
        self._mu_cum = list(np.cumsum(self._mu))

    # -- structure ---------------------------------------------------------
    @property
    def vocabulary(self) -> list[str]:
        """All words the grammar can emit, sorted (includes ``"."``)."""
        return sorted({w for words in _WORDS.values() for w in words})

    @property
    def states(self) -> list[str]:
        """Names of the automaton states; index ``i`` is state ``i`` everywhere."""
        return list(self._state_names)

    @property
    def start_state(self) -> str:
        """The state in which every sentence begins (and to which ``"."`` returns)."""
        return _START

    def emissions(self, state: str) -> dict[str, tuple[float, str]]:
        """Map each word emittable in ``state`` to ``(probability, next state)``."""
        i = self._state_names.index(state)
        return {
            w: (float(p), self._state_names[j])
            for w, p, j in zip(self._words[i], self._probs[i], self._next[i])
        }

    def transition_matrix(self) -> np.ndarray:
        """Row-stochastic state transition matrix ``T[s, s'] = P(next state s' | s)``."""
        n = len(self._state_names)
        t = np.zeros((n, n))
        for i in range(n):
            np.add.at(t[i], self._next[i], self._probs[i])
        return t

    def _solve_stationary(self) -> np.ndarray:
        """Solve ``mu T = mu``, ``sum(mu) = 1`` exactly (one linear system)."""
        t = self.transition_matrix()
        n = t.shape[0]
        a = t.T - np.eye(n)
        a[-1, :] = 1.0  # replace one (redundant) balance equation by normalisation
        b = np.zeros(n)
        b[-1] = 1.0
        return np.linalg.solve(a, b)

    def stationary_distribution(self) -> np.ndarray:
        """Stationary distribution ``mu`` over :attr:`states` (a copy)."""
        return self._mu.copy()

    # -- exact entropies -----------------------------------------------------
    def state_entropies(self) -> np.ndarray:
        """``H(next word | state)`` in nats for each state."""
        return np.array([_entropy(p) for p in self._probs])

    def entropy_rate(self) -> float:
        """Exact entropy per word (nats) of the stationary stream.

        ``h = sum_s mu(s) H(W | S = s)``.  Because the automaton is
        deterministic, the state is a function of the initial state and the
        words so far, so this is the entropy rate of the word process itself
        (and, with :func:`word_level_tokenizer`, the entropy per token).
        """
        return float(self._mu @ self.state_entropies())

    def stationary_state_entropy(self) -> float:
        """``H(S_1)``: entropy (nats) of the stationary state distribution."""
        return _entropy(self._mu)

    def block_entropy_lower_bound(self, n: int) -> float:
        """Lower bound ``n * h`` on the entropy of ``n`` consecutive stationary words.

        For a stationary process ``H(W_1..W_n) = sum_t H(W_t | W_<t)`` and each
        term is at least the entropy rate ``h`` (conditioning on a longer past
        only lowers it, and the limit is ``h``).
        """
        return n * self.entropy_rate()

    def block_entropy_upper_bound(self, n: int) -> float:
        """Upper bound ``H(S_1) + n * h`` on the entropy of ``n`` stationary words.

        A block starting mid-stream does not reveal its starting state, so the
        exact block entropy needs a sum over exponentially many sequences.
        But ``H(W_1..W_n) <= H(S_1, W_1..W_n) = H(S_1) + sum_t H(W_t | S_t)``:
        given ``S_1`` and the words before ``t`` the state ``S_t`` is known and
        ``W_t`` depends only on it, and each ``H(W_t | S_t) = h`` by
        stationarity.  So the true value lies within ``H(S_1)`` nats of
        :meth:`block_entropy_lower_bound`.
        """
        return self.stationary_state_entropy() + n * self.entropy_rate()

    # -- sampling --------------------------------------------------------------
    def _walk(self, state: int, rng: np.random.Generator, stop) -> list[str]:
        """Emit words from ``state`` until ``stop(words_so_far, word)`` is true."""
        out: list[str] = []
        while True:
            cum = self._cum[state]
            k = min(bisect.bisect_right(cum, rng.random()), len(cum) - 1)
            word = self._words[state][k]
            out.append(word)
            state = self._next[state][k]
            if stop(out, word):
                return out

    def sample_words(self, num_words: int, generator: np.random.Generator | int | None = None) -> list[str]:
        """Sample ``num_words`` consecutive words of the *stationary* stream.

        The first state is drawn from :meth:`stationary_distribution` (not the
        start state), so the stream may begin mid-sentence and the average
        ``-log P(word | state)`` is an unbiased estimate of
        :meth:`entropy_rate`.  ``generator`` is a numpy Generator or an integer
        seed (``None``: this grammar's ``seed``).
        """
        if num_words <= 0:
            return []
        rng = _as_generator(generator, self.seed)
        state = min(bisect.bisect_right(self._mu_cum, rng.random()), len(self._mu) - 1)
        return self._walk(state, rng, lambda out, _w: len(out) >= num_words)

    def sample_sentences(self, num_sentences: int, generator: np.random.Generator | int | None = None) -> list[str]:
        """Sample ``num_sentences`` whole sentences from the start state.

        Each sentence is its words joined by single spaces and ends with ``" ."``.
        Consecutive sentences form a contiguous stretch of the stream.
        """
        rng = _as_generator(generator, self.seed)
        sentences = []
        for _ in range(num_sentences):
            words = self._walk(self._start, rng, lambda _out, w: w == ".")
            sentences.append(" ".join(words))
        return sentences

    def sample_text(self, num_sentences: int, seed: np.random.Generator | int | None = None) -> str:
        """Sample ``num_sentences`` sentences as text: one per line, words separated by one space."""
        return "\n".join(self.sample_sentences(num_sentences, seed)) + "\n"

    def write_corpus(self, path: str | Path, num_sentences: int, seed: int | None = None) -> Path:
        """Write :meth:`sample_text` to ``path`` (UTF-8), creating parent folders; return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.sample_text(num_sentences, seed), encoding="utf-8")
        return path


def write_corpus(path: str | Path, num_sentences: int = 10_000, seed: int = 0,
                 grammar: SyntheticGrammar | None = None) -> Path:
    """Write a corpus of ``num_sentences`` sampled sentences, one per line, to ``path``.

    Uses ``grammar`` (default: a new :class:`SyntheticGrammar`) with ``seed``;
    the same arguments always give the same file.  Returns the path.
    """
    return (grammar or SyntheticGrammar()).write_corpus(path, num_sentences, seed)


def word_level_tokenizer(grammar: SyntheticGrammar | None = None) -> PreTrainedTokenizerFast:
    """A fast word-level tokenizer for the grammar: one word = one token.

    Vocabulary: ids 0..3 are ``[PAD]``, ``[MASK]``, ``[EOS]``, ``[UNK]`` (set as
    ``pad_token``, ``mask_token``, ``eos_token``, ``unk_token``), followed by
    :attr:`SyntheticGrammar.vocabulary` in sorted order.  Text is split on
    whitespace only; no special tokens are added on encoding.  Decoding joins
    tokens with single spaces, so a sampled sentence round-trips exactly and
    the grammar's entropy per word is its entropy per token.

    Returns a ``transformers.PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    grammar = grammar or SyntheticGrammar()
    tokens = list(SPECIAL_TOKENS.values()) + grammar.vocabulary
    vocab = {tok: i for i, tok in enumerate(tokens)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        clean_up_tokenization_spaces=False,  # keep "house ." rather than "house."
        **SPECIAL_TOKENS,
    )
