"""SPICE run directly: the command viclip builds, and every way it can fail turning into `spice: null`
with its reason while the other metrics stand. No CoreNLP here, so success is checked with a stand-in
`java` that answers as SPICE does."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from pipeline.core import devices
from pipeline.evaluation import metrics, spice
from pipeline.evaluation.metrics import score_tokenized

GTS = {1: ["một con mèo nằm trên ghế", "con mèo trên ghế"], 2: ["hai người đi trên phố", "người đi bộ"]}
RES = {1: ["một con mèo trên ghế"], 2: ["hai người đi bộ"]}

# Answers as SpiceScorer does: reads the input JSON, writes one {"image_id", "scores"} per image to -out.
# It refuses the invocations that fail on today's Java (`-jar` ignoring -cp, `-cache`).
STAND_IN = """#!{python}
import json, sys
args = sys.argv[1:]
if "-jar" in args or "-cache" in args or "{main}" not in args:
    sys.exit("stand-in java: unexpected command " + " ".join(args))
data = json.load(open(args[args.index("{main}") + 1], encoding="utf-8"))
scores = {scores}
json.dump([{{"image_id": item["image_id"], "scores": {{"All": {{"f": f, "pr": f, "re": f}}}}}}
           for item, f in zip(data, scores)], open(args[args.index("-out") + 1], "w"))
"""


def stand_in_java(folder: Path, scores: list) -> Path:
    """A `java` on PATH that answers with `scores` (one F-score per image; "NaN" allowed)."""
    folder.mkdir(parents=True, exist_ok=True)
    java = folder / "java"
    java.write_text(STAND_IN.format(python=sys.executable, main=spice.MAIN_CLASS, scores=json.dumps(scores)))
    java.chmod(java.stat().st_mode | stat.S_IXUSR)
    return folder


@pytest.fixture
def corenlp(tmp_path, monkeypatch) -> Path:
    """A folder holding files named as CoreNLP's jars, and VICLIP_CORENLP naming it."""
    folder = tmp_path / "corenlp"
    folder.mkdir()
    for name in spice.CORENLP_JARS:
        (folder / name).write_bytes(b"not a jar")
    monkeypatch.setenv(spice.CORENLP_ENV, str(folder))
    return folder


def test_the_command_names_the_class_path_and_main_class_without_cache(tmp_path):
    home, corenlp = spice.spice_home(), tmp_path / "jars"
    command = spice.command(tmp_path / "in.json", tmp_path / "out.json", home, corenlp, 3000)
    assert command[:2] == ["java", "-Xmx3000m"] and "-Dfile.encoding=UTF-8" in command
    assert "-jar" not in command and "-cache" not in command  # -jar ignores -cp; -cache fails on Java >= 16
    class_path = command[command.index("-cp") + 1].split(os.pathsep)
    assert class_path[0] == str(home / "spice-1.0.jar")
    assert class_path[-2:] == [str(corenlp / name) for name in spice.CORENLP_JARS]
    assert str(home / "lib" / "SceneGraphParser-1.0.jar") in class_path  # SPICE's own dependencies
    assert not any("stanford-corenlp" in p for p in class_path[:-2])  # CoreNLP only from the named folder
    main = command.index(spice.MAIN_CLASS)
    assert command[main + 1:] == [str(tmp_path / "in.json"), "-out", str(tmp_path / "out.json"), "-subset", "-silent"]


@pytest.mark.parametrize("memory, heap", [(1024, 768), (3072, 2048), (6144, 3072), (65536, 8192)])
def test_the_heap_fits_the_machine(memory, heap):
    assert spice.heap_mb(memory) == heap


def test_a_containers_memory_limit_counts_not_the_hosts(tmp_path, monkeypatch):
    limited, unlimited = tmp_path / "memory.max", tmp_path / "v1.limit"
    limited.write_text(f"{3 * 2**30}\n")
    unlimited.write_text("max\n")
    monkeypatch.setattr(devices, "CGROUP_LIMITS", (unlimited, limited, tmp_path / "absent"))
    host_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    assert devices.memory_mb() == min(3072, host_mb)


def test_corenlp_comes_from_the_named_folder_else_from_pycocoevalcap(monkeypatch, tmp_path):
    monkeypatch.delenv(spice.CORENLP_ENV, raising=False)
    assert spice.corenlp_dir() == spice.spice_home() / "lib"
    monkeypatch.setenv(spice.CORENLP_ENV, str(tmp_path))
    assert spice.corenlp_dir() == tmp_path


def test_spice_is_the_mean_f_score_and_writes_nothing_beside_the_package(corenlp, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"{stand_in_java(tmp_path / 'bin', [0.25, 0.5])}{os.pathsep}{os.environ['PATH']}")
    before = sorted(p.name for p in spice.spice_home().iterdir())
    assert spice.spice(GTS, RES) == pytest.approx(0.375)
    assert sorted(p.name for p in spice.spice_home().iterdir()) == before  # no tmp/ or cache/ in site-packages


def test_an_undefined_f_score_counts_zero_not_nan(corenlp, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"{stand_in_java(tmp_path / 'bin', [0.25, 'NaN'])}{os.pathsep}{os.environ['PATH']}")
    assert spice.spice(GTS, RES) == pytest.approx(0.125)


def test_a_hung_jvm_is_stopped(corenlp, tmp_path, monkeypatch):
    hung = tmp_path / "bin" / "java"
    hung.parent.mkdir()
    hung.write_text("#!/bin/sh\nexec sleep 30\n")
    hung.chmod(0o755)
    monkeypatch.setenv("PATH", f"{hung.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(spice, "TIMEOUT_S", 1)
    with pytest.raises(spice.SpiceFailed, match="SPICE ran past 1 s and was stopped"):
        spice.spice(GTS, RES)


@pytest.mark.parametrize("case, reason", [
    ("unusable jars", "SPICE exited with code 1: Exception in thread \"main\" java.lang.NoClassDefFoundError"),
    ("missing jars", "SPICE needs Stanford CoreNLP 3.6.0 (stanford-corenlp-3.6.0.jar, "
                     "stanford-corenlp-3.6.0-models.jar) in"),
    ("no java", "SPICE runs a Java jar and no `java` is on PATH"),
    ("java crashes", "SPICE exited with code 3: java.lang.OutOfMemoryError: Java heap space"),
])
def test_a_failing_spice_gives_null_with_its_reason_and_every_other_metric(case, reason, corenlp, tmp_path,
                                                                          monkeypatch):
    if case == "missing jars":
        for jar in corenlp.iterdir():
            jar.unlink()
    elif case == "no java":
        monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    elif case == "java crashes":
        metrics._meteor_jar.cache_clear()  # a METEOR started earlier in this process would still answer
        crashing = tmp_path / "bin" / "java"
        crashing.parent.mkdir()
        crashing.write_text("#!/bin/sh\necho 'parsing...'; echo 'java.lang.OutOfMemoryError: Java heap space' >&2; exit 3\n")
        crashing.chmod(0o755)
        monkeypatch.setenv("PATH", f"{crashing.parent}{os.pathsep}{os.environ['PATH']}")
    # "unusable jars": the real spice-1.0.jar on the real JVM, with files that are not CoreNLP's jars.
    scores, notes = score_tokenized(GTS, RES)
    assert scores["spice"] is None and notes["spice"].startswith(reason)
    assert all(scores[m] is not None for m in ("bleu_1", "bleu_4", "rouge_l", "cider"))
    if case in ("no java", "java crashes"):  # METEOR needs the same java, and fails with a reason of its own
        assert scores["meteor"] is None and notes["meteor"].startswith("METEOR")
    else:
        assert scores["meteor"] is not None and "meteor" not in notes
