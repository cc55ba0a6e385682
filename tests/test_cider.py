"""pipeline.training.cider.CiderD gives pycocoevalcap's CIDEr-D, with document frequencies from the batch or a corpus."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.cider.cider_scorer import CiderScorer

from benchmarks.cider import captions, corpus
from pipeline.training.cider import CiderD


def with_edge_cases(references: list[list[str]], candidates: list[str]) -> list[str]:
    """The candidates with the first few replaced by the cases that CIDEr-D's arithmetic treats apart."""
    return [
        "",  # stops at once: no n-grams, norms 0
        references[1][0],  # one of its references, word for word
        " ".join(references[2] * 2),  # longer than any of its references: the length penalty bites
        "mèo",  # one token: no bigram, so pycocoevalcap's length is 0
        "một con kỳ lân   bay qua   cầu vồng",  # n-grams no reference has; runs of spaces
        references[5][-1] + " " + references[5][-1],  # every n-gram twice: clipped by the reference's counts
        *candidates[6:],
    ]


def pycocoevalcap_with_corpus_df(references: list[list[str]], candidates: list[str],
                                 images: np.ndarray) -> np.ndarray:
    """pycocoevalcap's own CiderScorer, with document frequencies and log(documents) from `references`:
    each round scores the whole corpus (so its df and ref_len are the corpus's) with at most one
    candidate per image; the other images get an empty candidate, whose score is not used."""
    scores = np.full(len(candidates), np.nan)
    pending = list(range(len(candidates)))
    while pending:
        this_round = {}  # image -> candidate index
        for j in pending:
            this_round.setdefault(int(images[j]), j)
        scorer = CiderScorer(n=4, sigma=6.0)
        for image, refs in enumerate(references):
            scorer += (candidates[this_round[image]] if image in this_round else "", refs)
        per_image = scorer.compute_score()[1]
        for image, j in this_round.items():
            scores[j] = per_image[image]
        pending = [j for j in pending if j not in this_round.values()]
    return scores


def test_scores_equal_pycocoevalcaps_cider_with_df_from_the_scored_references():
    references = corpus(300, references=(1, 7), seed=0)  # 1 to 7 references an image
    references[1].append("")  # an empty reference: no n-grams, but one of the image's references
    candidates = with_edge_cases(references, captions(np.random.default_rng(1), len(references)))
    gts = {i: refs for i, refs in enumerate(references)}
    res = {i: [candidate] for i, candidate in enumerate(candidates)}
    mean, per_image = Cider().compute_score(gts, res)

    ours = CiderD(references).scores(candidates, range(len(references)))

    assert ours.shape == (len(references),) and ours.dtype == np.float64
    np.testing.assert_allclose(ours, per_image, rtol=0, atol=1e-6)
    assert ours.mean() == pytest.approx(mean, abs=1e-6)
    assert ours[0] == 0.0 and ours[1] > 1.0 and ours[2] < ours[1]
    assert np.count_nonzero(ours) > len(ours) // 2  # the corpus shares enough n-grams to score


def test_scores_equal_pycocoevalcaps_with_df_from_a_larger_corpus():
    references = corpus(200, references=(2, 6), seed=2)
    rng = np.random.default_rng(3)
    images = np.repeat(rng.choice(len(references), 12, replace=False), 5)  # as SCST samples: 5 an image
    candidates = captions(rng, len(images))
    candidates[0], candidates[6], candidates[7] = "", references[images[6]][0], references[images[7]][-1]

    ours = CiderD(references).scores(candidates, images)

    theirs = pycocoevalcap_with_corpus_df(references, candidates, images)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
    batch_df = Cider().compute_score({j: references[i] for j, i in enumerate(images)},
                                     {j: [c] for j, c in enumerate(candidates)})[1]
    assert not np.allclose(ours, batch_df, atol=1e-6)  # the corpus's df, not the batch's


def test_repeated_images_and_empty_candidates():
    references = corpus(50, references=(1, 5), seed=4)
    cider = CiderD(references)
    candidates = ["", "   ", references[3][0], references[3][0], captions(np.random.default_rng(5), 1)[0], ""]
    images = [3, 3, 3, 3, 3, 7]

    scores = cider.scores(candidates, images)

    np.testing.assert_array_equal(scores[[0, 1, 5]], 0.0)
    assert scores[2] == scores[3] > 0
    alone = [cider.scores([candidate], [image])[0] for candidate, image in zip(candidates, images)]
    np.testing.assert_allclose(scores, alone, rtol=0, atol=1e-12)  # each score is independent of the batch
    np.testing.assert_array_equal(cider.scores(candidates, np.array(images)), scores)
    assert cider.scores([], []).shape == (0,)
    with pytest.raises(ValueError, match="2 candidates"):
        cider.scores(candidates[:2], images)
    with pytest.raises(ValueError, match="0..49"):
        cider.scores(candidates[:1], [-1])
    with pytest.raises(ValueError, match=r"images \[1\] have no references"):
        CiderD([["một con mèo"], []])


def test_benchmark_command_runs_at_a_tiny_size():
    done = subprocess.run([sys.executable, "-m", "benchmarks.cider", "--corpus", "30", "--images", "4",
                           "--samples", "3", "--repeats", "1"], capture_output=True, text=True)

    assert done.returncode == 0, done.stderr
    assert "12 candidates (4 images x 3)" in done.stdout and "ratio" in done.stdout
