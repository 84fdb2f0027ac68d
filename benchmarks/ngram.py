"""Count-based baselines for the quality benchmark: a unigram model and interpolated Kneser-Ney n-grams.

Both are exact, closed-vocabulary models over integer token ids `0 .. vocab_size - 1`, written out here
(a few dozen lines) so that the benchmark's anchor needs no extra dependency and can be read:

* `UnigramModel`: maximum-likelihood frequencies of the training ids with add-`alpha` smoothing.
* `KneserNeyModel`: interpolated Kneser-Ney (Chen & Goodman 1998, Eq. 13-14) of any order, one absolute
  discount per order estimated as D = n1 / (n1 + 2 n2) from that order's counts of counts (0.5 where an
  order has no singletons); the highest
  order uses raw counts, lower orders use continuation counts N1+(. h w), and the unigram level is
  interpolated with the uniform distribution so every id has a non-zero probability. (This is the
  classic interpolated KN with one discount per order, not the three-discount "modified" KN behind
  the 141.2 test perplexity that Mikolov & Zweig 2012 report for a 5-gram on PTB; expect a few
  points worse.)

`log_prob(history, token)` is the natural log of p(token | history); `score(ids, reset_every=None)`
sums it over a stream, optionally forgetting the history every `reset_every` tokens (to condition the
n-gram exactly as the neural models, which see one block at a time).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence


class UnigramModel:
    """p(w) = (count(w) + alpha) / (N + alpha * V)."""

    def __init__(self, train_ids: Sequence[int], vocab_size: int, alpha: float = 1.0):
        if vocab_size < 1 or alpha < 0:
            raise ValueError(f"Need vocab_size >= 1 and alpha >= 0, got {vocab_size!r} and {alpha!r}.")
        counts = Counter(train_ids)
        if counts and (min(counts) < 0 or max(counts) >= vocab_size):
            raise ValueError(f"Training ids must lie in [0, {vocab_size}), got [{min(counts)}, {max(counts)}].")
        total = len(train_ids) + alpha * vocab_size
        if total <= 0:
            raise ValueError("An empty training stream needs alpha > 0.")
        self.vocab_size = vocab_size
        self.log_probs = [math.log((counts.get(w, 0) + alpha) / total) if counts.get(w, 0) + alpha > 0
                          else -math.inf for w in range(vocab_size)]

    def log_prob(self, history: Sequence[int], token: int) -> float:
        return self.log_probs[token]

    def score(self, ids: Sequence[int], reset_every: int | None = None) -> float:
        """Total negative log-likelihood (nats) of `ids`."""
        return -sum(self.log_probs[w] for w in ids)


class KneserNeyModel:
    """Interpolated Kneser-Ney n-gram model of order `order` over ids `0 .. vocab_size - 1`."""

    def __init__(self, train_ids: Sequence[int], vocab_size: int, order: int = 5):
        if order < 1:
            raise ValueError(f"`order` must be >= 1, got {order!r}.")
        self.vocab_size, self.order = vocab_size, order
        ids = list(train_ids)
        # counts[k]: how often each k-gram occurs (highest order), or its continuation count N1+(. g)
        # (number of distinct left neighbours) for k < order, as KN prescribes for lower orders. (The
        # first k-gram of the stream has no left neighbour and is not counted at order k: a negligible edge.)
        self.counts: list[dict[tuple, int]] = [dict() for _ in range(order + 1)]
        raw = Counter(tuple(ids[i:i + order]) for i in range(len(ids) - order + 1))
        self.counts[order] = dict(raw)
        for k in range(order - 1, 0, -1):
            continuation = Counter(gram[1:] for gram in self.counts[k + 1])
            self.counts[k] = dict(continuation)
        # Per order: history totals, number of distinct followers of each history, and the discount.
        self.totals: list[dict[tuple, int]] = [dict() for _ in range(order + 1)]
        self.followers: list[dict[tuple, int]] = [dict() for _ in range(order + 1)]
        self.discounts = [0.0] * (order + 1)
        for k in range(1, order + 1):
            totals, followers = defaultdict(int), defaultdict(int)
            for gram, count in self.counts[k].items():
                totals[gram[:-1]] += count
                followers[gram[:-1]] += 1
            self.totals[k], self.followers[k] = dict(totals), dict(followers)
            of_count = Counter(self.counts[k].values())
            n1, n2 = of_count.get(1, 0), of_count.get(2, 0)
            self.discounts[k] = n1 / (n1 + 2 * n2) if n1 > 0 else 0.5  # no singletons: D = 0 would leave no mass for unseen ids

    def prob(self, history: Sequence[int], token: int) -> float:
        """p(token | the last `order - 1` ids of `history`), interpolated down to the uniform distribution."""
        p = 1.0 / self.vocab_size
        history = tuple(history[-(self.order - 1):]) if self.order > 1 else ()
        for k in range(1, self.order + 1):  # from unigrams up to the longest history available
            context = history[len(history) - (k - 1):] if k > 1 else ()
            if k > 1 and len(context) < k - 1:
                break
            total = self.totals[k].get(context, 0)
            if total == 0:
                break  # history never seen at this order: the lower-order estimate stands
            discount = self.discounts[k]
            count = self.counts[k].get(context + (token,), 0)
            p = max(count - discount, 0.0) / total + discount * self.followers[k][context] / total * p
        return p

    def log_prob(self, history: Sequence[int], token: int) -> float:
        return math.log(self.prob(history, token))

    def score(self, ids: Sequence[int], reset_every: int | None = None) -> float:
        """Total negative log-likelihood (nats) of the stream `ids`; the history is emptied every
        `reset_every` tokens when given (blocks scored independently, like the neural models)."""
        total = 0.0
        for i, token in enumerate(ids):
            start = max(0, i - self.order + 1)
            if reset_every:
                start = max(start, i - i % reset_every)
            total -= self.log_prob(ids[start:i], token)
        return total
