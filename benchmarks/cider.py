"""`python -m benchmarks.cider`: one self-critical step's rewards, pipeline.training.cider.CiderD against
pycocoevalcap's CiderScorer.

The step scores 40 images x 5 sampled captions against a corpus the size of KTVIC's training split
(3,769 images x 5 references), both synthetic Vietnamese captions of about 11 to 20 syllables drawn from
shared phrases. CiderD builds the corpus's n-gram tables once (timed apart) and takes document
frequencies from the corpus. CiderScorer is what a step would otherwise run: one scorer over the 200
(candidate, references) pairs, which counts n-grams and document frequencies anew on every call, the
latter from the batch's 200 documents (each image's references once per sample). Each figure is the
median of several runs in this process.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import numpy as np
import torch
from pycocoevalcap.cider.cider_scorer import CiderScorer

from benchmarks.measure import measure
from pipeline.training.cider import CiderD

COUNTS = ("một", "hai", "ba", "nhiều", "một nhóm", "một vài")
THINGS = ("người đàn ông", "người phụ nữ", "đứa trẻ", "cô gái", "cậu bé", "chiếc xe máy", "con chó", "chiếc thuyền",
          "người bán hàng", "chiếc xe đạp", "con mèo", "người đi đường", "chiếc ô tô", "cụ già", "du khách")
LOOKS = ("", "mặc áo trắng", "đội mũ bảo hiểm", "màu đỏ", "nhỏ", "mặc áo dài", "đeo kính", "màu xanh", "cũ")
ACTIONS = ("đang đứng", "đang ngồi", "đang đi bộ", "đang bán hàng", "đang chạy", "đang chờ", "đang nói chuyện",
           "đỗ", "đang chơi đùa", "đang nấu ăn", "đang chụp ảnh", "đang băng qua đường")
PLACES = ("trên đường phố", "bên cạnh", "trong", "trên vỉa hè", "trước", "dưới", "bên bờ", "gần", "ở giữa")
SITES = ("một cửa hàng", "khu chợ", "một ngôi nhà", "một tán cây", "con sông", "công viên", "một chiếc xe buýt",
         "ngã tư", "một quán cà phê", "một ngôi chùa", "bãi biển", "một cây cầu")
DETAILS = ("", "vào ban ngày", "vào buổi tối", "đông đúc", "với nhiều cây xanh", "có nhiều xe cộ qua lại",
           "trong một ngày nắng", "dưới trời mưa")


def _pick(rng: np.random.Generator, phrases: tuple[str, ...]) -> str:
    """The first phrases far more often than the last, as common words are."""
    return phrases[min(int(rng.geometric(0.2)) - 1, len(phrases) - 1)]


def captions(rng: np.random.Generator, count: int) -> list[str]:
    """`count` captions, syllables joined by spaces, of phrases that recur across captions."""
    pools = (COUNTS, THINGS, LOOKS, ACTIONS, PLACES, SITES, DETAILS)
    return [" ".join(filter(None, (_pick(rng, pool) for pool in pools))) for _ in range(count)]


def corpus(images: int, references: tuple[int, int] = (5, 5), seed: int = 0) -> list[list[str]]:
    """`images` images' references, between references[0] and references[1] of them each."""
    rng = np.random.default_rng(seed)
    return [captions(rng, int(rng.integers(references[0], references[1] + 1))) for _ in range(images)]


def median_seconds(work: Callable[[], object], repeats: int) -> float:
    return statistics.median(measure(work, torch.device("cpu"))["seconds"] for _ in range(repeats))


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cider", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=int, default=3_769, help="Images in the corpus (5 references each).")
    parser.add_argument("--images", type=int, default=40, help="Images in the step.")
    parser.add_argument("--samples", type=int, default=5, help="Sampled captions per image.")
    parser.add_argument("--repeats", type=int, default=7, help="Runs of each; the median is reported.")
    args = parser.parse_args(argv)

    references = corpus(args.corpus)
    rng = np.random.default_rng(1)
    images = np.repeat(rng.choice(args.corpus, args.images, replace=False), args.samples)
    candidates = captions(rng, len(images))

    def pycocoevalcap() -> None:
        scorer = CiderScorer(n=4, sigma=6.0)
        for candidate, image in zip(candidates, images):
            scorer += (candidate, references[image])
        scorer.compute_score()

    cider = CiderD(references)
    figures = {
        "build": median_seconds(lambda: CiderD(references), max(args.repeats // 3, 1)),
        "viclip": median_seconds(lambda: cider.scores(candidates, images), args.repeats),
        "pycocoevalcap": median_seconds(pycocoevalcap, args.repeats),
    }
    figures["ratio"] = figures["pycocoevalcap"] / figures["viclip"]
    print(f"CIDEr-D of {len(candidates)} candidates ({args.images} images x {args.samples}), "
          f"corpus {args.corpus:,} images x 5 references, median of {args.repeats} runs:\n"
          f"  pipeline.training.cider.CiderD.scores (df from the corpus)      {figures['viclip'] * 1e3:8.2f} ms\n"
          f"  pycocoevalcap CiderScorer (df from the batch)          {figures['pycocoevalcap'] * 1e3:8.2f} ms\n"
          f"  ratio                                                  {figures['ratio']:8.1f}x\n"
          f"  CiderD(corpus), once before training                   {figures['build']:8.2f} s")
    return figures


if __name__ == "__main__":
    main()
