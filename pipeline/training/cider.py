"""CIDEr-D of many candidates at once, for self-critical training's rewards.

Self-critical sequence training rewards each sampled caption by its CIDEr-D against its image's
references, with document frequencies from a fixed corpus (the training references, one document per
image) rather than from the batch being scored. The scores equal pycocoevalcap 1.2's CiderScorer
(tests/test_cider.py holds them to it), quirks included:

- n-grams of 1 to 4 tokens (tokens: the caption split on whitespace); an n-gram's document frequency
  counts each image once, however many of its references hold it; its weight is term frequency times
  log(documents) - log(max(1, df)), so an n-gram the corpus never saw weighs log(documents);
- per n, a candidate and a reference meet by the clipped dot product sum(min(v_cand, v_ref) * v_ref)
  over the candidate's n-grams, divided by both vectors' norms (left undivided when either norm is
  0, when the product is 0 anyway), times the Gaussian penalty exp(-delta**2 / (2 * 6**2));
- delta is the difference of the two captions' lengths in tokens (pycocoevalcap counts bigrams,
  one fewer on each side; an empty caption, where the two differ, scores 0 whatever delta is);
- a candidate's score is 10 times the mean over n of the sum over its image's references, divided
  by the number of references. An empty candidate scores 0.

The corpus's references are turned into integer n-gram ids, weights and norms once; a call then
looks every (candidate n-gram, reference) pair up in one sorted array of (reference, n-gram) keys,
so only the candidates' own n-grams are counted in Python.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from itertools import chain, repeat

import numpy as np

ORDERS = 4  # n-grams of 1..ORDERS tokens
SIGMA = 6.0  # the length penalty's standard deviation, in tokens


def _ngrams(caption: str) -> Counter[tuple[str, ...]]:
    words = caption.split()
    return Counter(tuple(words[i:i + n]) for n in range(1, ORDERS + 1) for i in range(len(words) - n + 1))


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """starts[k], starts[k] + 1, .., starts[k] + counts[k] - 1 for each k, concatenated."""
    return np.arange(counts.sum()) + np.repeat(starts - (np.cumsum(counts) - counts), counts)


class CiderD:
    """CIDEr-D with document frequencies from a fixed corpus of references (one document per image)."""

    def __init__(self, references: Sequence[Sequence[str]]):
        """references[i]: image i's reference captions (at least one), each already tokenised and
        space-joined ("một con mèo")."""
        if empty := [i for i, refs in enumerate(references) if not refs]:
            raise ValueError(f"CiderD: images {empty[:5]} have no references")
        counted = [[_ngrams(ref) for ref in refs] for refs in references]
        # Document frequency: an image counts once for an n-gram however many of its references hold it.
        frequency = Counter(ngram for refs in counted for ngram in set().union(*refs))
        self.ids = {ngram: id_ for id_, ngram in enumerate(frequency)}  # n-gram -> id, 0..V-1; V: unseen
        ref_len = np.log(float(len(references)))  # log(documents)
        # (V + 1,): log(documents) - log(df); the last is an unseen n-gram's (df 0 counts as 1).
        self.idf = ref_len - np.log(np.fromiter([*frequency.values(), 1], np.float64, len(frequency) + 1))

        # Every image's references in one run: image i's are rows first[i] .. first[i] + count[i] - 1.
        self.count = np.array([len(refs) for refs in references], dtype=np.int64)  # (I,)
        self.first = np.cumsum(self.count) - self.count  # (I,)
        self.ref_lengths = np.array([len(ref.split()) for refs in references for ref in refs], np.float64)  # (R,)
        # (E,) each, and (R, ORDERS): every reference's n-grams.
        rows, ngram_ids, _, weight, self.ref_norms = self._entries([c for refs in counted for c in refs])
        # (reference, n-gram) keys, sorted, for np.searchsorted, and the weights in the same order; a last
        # key that no lookup reaches, so that every search lands on a key.
        keys = rows * len(self.ids) + ngram_ids
        sort = np.argsort(keys)
        self.keys = np.append(keys[sort], np.iinfo(np.int64).max)  # (E + 1,)
        self.weights = np.append(weight[sort], 0.0)  # (E + 1,)

    def _entries(self, counted: list[Counter[tuple[str, ...]]]) -> tuple[np.ndarray, ...]:
        """Captions' n-grams as entries, each (N,): the caption's index, the n-gram's id (V: not in the
        corpus), n - 1, tf-idf weight; and the captions' norms by n, (len(counted), ORDERS)."""
        ngrams = list(chain.from_iterable(counted))
        caption = np.repeat(np.arange(len(counted)), [len(c) for c in counted])
        ids = np.fromiter(map(self.ids.get, ngrams, repeat(len(self.ids))), np.int64, len(ngrams))
        order = np.fromiter(map(len, ngrams), np.int64, len(ngrams)) - 1
        tf = np.fromiter(chain.from_iterable(c.values() for c in counted), np.float64, len(ngrams))
        weight = tf * self.idf[ids]
        norms = np.sqrt(np.bincount(caption * ORDERS + order, weight**2, minlength=len(counted) * ORDERS))
        return caption, ids, order, weight, norms.reshape(-1, ORDERS)

    def scores(self, candidates: Sequence[str], images: Sequence[int] | np.ndarray) -> np.ndarray:
        """(len(candidates),) float64: candidates[j] (tokenised, space-joined; may be empty) scored
        against references[images[j]]. An image may appear any number of times."""
        images = np.asarray(images, dtype=np.int64)
        if images.shape != (len(candidates),):
            raise ValueError(f"CiderD.scores: {len(candidates)} candidates but images of shape {images.shape}")
        if images.size and not 0 <= images.min() <= images.max() < len(self.count):
            raise ValueError(f"CiderD.scores: images must lie in 0..{len(self.count) - 1}")
        if not candidates:
            return np.zeros(0)
        # (H,) each: the candidates' n-grams; (C, ORDERS): their norms.
        cand, ngram_ids, order, weight, norms = self._entries([_ngrams(c) for c in candidates])

        # Pairs (candidate j, one of its image's references), candidate-major: candidate j's are pairs
        # pair_first[j] .. pair_first[j] + per_cand[j] - 1; pair p is cand_of[p] with reference row ref_of[p].
        per_cand = self.count[images]  # (C,)
        pair_first = np.cumsum(per_cand) - per_cand
        cand_of = np.repeat(np.arange(len(candidates)), per_cand)  # (P,)
        ref_of = _ranges(self.first[images], per_cand)  # (P,)

        # Each candidate entry the corpus knows, once per pair of its candidate, looked up by key.
        known = np.flatnonzero(ngram_ids < len(self.ids))
        entry = np.repeat(known, per_cand[cand[known]])  # (Q,)
        pair = _ranges(pair_first[cand[known]], per_cand[cand[known]])  # (Q,)
        keys = ref_of[pair] * len(self.ids) + ngram_ids[entry]
        found = np.searchsorted(self.keys, keys)
        hit = self.keys[found] == keys
        entry, pair, ref_weight = entry[hit], pair[hit], self.weights[found[hit]]
        dots = np.bincount(pair * ORDERS + order[entry], np.minimum(weight[entry], ref_weight) * ref_weight,
                           minlength=len(cand_of) * ORDERS).reshape(-1, ORDERS)  # (P, ORDERS)

        denominator = norms[cand_of] * self.ref_norms[ref_of]  # (P, ORDERS)
        # pycocoevalcap leaves the dot product undivided where a norm is 0, and there it is 0.
        cosine = np.divide(dots, denominator, out=np.zeros_like(denominator), where=denominator != 0)
        lengths = np.array([len(c.split()) for c in candidates], dtype=np.float64)  # (C,)
        delta = lengths[cand_of] - self.ref_lengths[ref_of]  # (P,)
        penalised = cosine * np.exp(-(delta**2) / (2 * SIGMA**2))[:, None]
        summed = np.add.reduceat(penalised, pair_first, axis=0)  # (C, ORDERS): every candidate has a pair
        return 10.0 * summed.mean(axis=1) / per_cand
