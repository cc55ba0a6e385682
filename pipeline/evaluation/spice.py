"""SPICE 1.0, run directly on the JVM rather than through pycocoevalcap's wrapper.

The wrapper fails on today's machines: it passes `-cache`, whose serialiser throws
InaccessibleObjectException on Java 16 and newer; it asks for an 8 GB heap; it downloads
Stanford CoreNLP into site-packages on first use and writes its cache there. Here SPICE
runs without the cache, with a heap that fits the machine, its input and output in a
temporary folder, and a class path named in full: `java -jar` would ignore `-cp`, so the
main class is named instead. CoreNLP 3.6.0 comes from the folder that `VICLIP_CORENLP`
names, else from where pycocoevalcap downloads it. Nothing is ever downloaded.

SPICE parses captions with CoreNLP's English parser: on Vietnamese text it is weak
evidence, as the published table's SPICE is.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.core.devices import memory_mb

CORENLP_ENV = "VICLIP_CORENLP"
CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
MAIN_CLASS = "edu.anu.spice.SpiceScorer"
MAX_HEAP_MB = 8192  # what SPICE's authors ask for; more buys nothing
MIN_HEAP_MB = 2048  # CoreNLP's parser models alone take about 1 GB
TIMEOUT_S = 3600  # parsing KTVIC's test split takes minutes; a JVM silent for an hour has hung


class SpiceFailed(Exception):
    """Why SPICE gave no score; it becomes the metric's note, never a traceback."""


def spice_home() -> Path:
    """pycocoevalcap's SPICE folder: spice-1.0.jar, its lib/ of dependencies, and CoreNLP once downloaded."""
    from pycocoevalcap import spice

    return Path(spice.__file__).parent


def corenlp_dir() -> Path:
    configured = os.environ.get(CORENLP_ENV)
    return Path(configured) if configured else spice_home() / "lib"


def heap_mb(memory: int) -> int:
    """Half of `memory` (MB), between SPICE's needs and its authors' 8 GB, and never past three quarters."""
    return min(max(MIN_HEAP_MB, min(MAX_HEAP_MB, memory // 2)), memory * 3 // 4)


def class_path(home: Path, corenlp: Path) -> list[Path]:
    """spice-1.0.jar, its own dependencies (not CoreNLP, which may live elsewhere), then CoreNLP."""
    own = sorted(p for p in (home / "lib").glob("*.jar") if p.name not in CORENLP_JARS)
    return [home / "spice-1.0.jar", *own, *(corenlp / name for name in CORENLP_JARS)]


def command(in_file: Path, out_file: Path, home: Path, corenlp: Path, heap: int) -> list[str]:
    """The JVM command line: no `-cache` (Java 16+ cannot serialise it), UTF-8 whatever the locale."""
    return [
        "java", f"-Xmx{heap}m", "-Dfile.encoding=UTF-8",
        "-cp", os.pathsep.join(str(p) for p in class_path(home, corenlp)),
        MAIN_CLASS, str(in_file), "-out", str(out_file), "-subset", "-silent",
    ]


def _check_inputs(home: Path, corenlp: Path) -> None:
    if shutil.which("java") is None:
        raise SpiceFailed("SPICE runs a Java jar and no `java` is on PATH")
    if not (home / "spice-1.0.jar").is_file():
        raise SpiceFailed(f"no spice-1.0.jar in {home}")
    absent = [name for name in CORENLP_JARS if not (corenlp / name).is_file()]
    if absent:
        raise SpiceFailed(
            f"SPICE needs Stanford CoreNLP 3.6.0 ({', '.join(absent)}) in {corenlp}: put the two jars in a folder "
            f"and set {CORENLP_ENV} to it (it cannot be fetched offline)"
        )


def error_line(output: str) -> str:
    """The line of a JVM's output that says what went wrong: its first exception, else its last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    raised = [line for line in lines if "Exception" in line or "Error" in line]
    if raised:
        return raised[0][:300]
    return lines[-1][:300] if lines else "no output"


def _mean_f(out_file: Path, images: int) -> float:
    try:
        results = json.loads(out_file.read_text(encoding="utf-8"))
        scores = [float(item["scores"]["All"]["f"]) for item in results]
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise SpiceFailed(f"SPICE wrote no readable results ({type(error).__name__}: {error})") from None
    if len(scores) != images:
        raise SpiceFailed(f"SPICE scored {len(scores)} of {images} images")
    # SPICE leaves F undefined where a caption yields no scene-graph tuple (an empty caption, say):
    # such a caption matches nothing, so it counts 0 rather than making the whole split's mean NaN.
    return sum(0.0 if math.isnan(s) else s for s in scores) / len(scores)


def spice(gts: Mapping[Any, list[str]], res: Mapping[Any, list[str]]) -> float:
    """The mean SPICE F-score of one tokenised candidate per image against its references (pycocoevalcap's
    figure, an undefined F counted 0); raises SpiceFailed saying why when there is none."""
    home, corenlp = spice_home(), corenlp_dir()
    _check_inputs(home, corenlp)
    data = [{"image_id": str(i), "test": res[i][0], "refs": gts[i]} for i in sorted(gts)]
    with tempfile.TemporaryDirectory(prefix="viclip-spice-") as folder:
        in_file, out_file = Path(folder) / "input.json", Path(folder) / "output.json"
        in_file.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        try:
            done = subprocess.run(command(in_file, out_file, home, corenlp, heap_mb(memory_mb())),
                                  capture_output=True, text=True, errors="replace", timeout=TIMEOUT_S)
        except OSError as error:
            raise SpiceFailed(f"could not start java ({error})") from None
        except subprocess.TimeoutExpired:
            raise SpiceFailed(f"SPICE ran past {TIMEOUT_S} s and was stopped") from None
        if done.returncode != 0:
            raise SpiceFailed(f"SPICE exited with code {done.returncode}: {error_line(done.stderr + done.stdout)}")
        return _mean_f(out_file, len(data))
