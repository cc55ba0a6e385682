"""The project's documents are the project's own: nothing cites a file users never get, and every
`docs/*.md` that the code, the params or the README cite is in the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from pipeline.core.config import parse_config, yaml_parser

ROOT = Path(__file__).resolve().parents[1]
# Spelled in pieces so that this file, once tracked, does not mention them itself.
PRIVATE = ("FAC" + "TS.md", "../" + "shared")
CITING = ("pipeline/", "stages/", "benchmarks/", "params.yaml", "README.md")
DOC = re.compile(r"docs/[\w./-]+?\.md")


def project_files() -> list[str]:
    """Files git tracks, and new ones it does not ignore: what a commit would hand users."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT, capture_output=True, check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return sorted({name for name in listed.decode().split("\0") if name and (ROOT / name).is_file()})


def text(name: str) -> str | None:
    """The file's text; None for a binary file (a NUL byte, or not UTF-8)."""
    data = (ROOT / name).read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def test_no_file_cites_private_notes():
    found = [
        f"{name}:{number}: {line.strip()}"
        for name in project_files()
        if (body := text(name)) is not None
        for number, line in enumerate(body.splitlines(), 1)
        if any(private in line for private in PRIVATE)
    ]
    assert not found, "files users never get are cited:\n" + "\n".join(found)


def test_cited_docs_exist():
    cited = {
        (doc, name)
        for name in project_files()
        if name.startswith(CITING) and (body := text(name)) is not None
        for doc in DOC.findall(body)
    }
    assert "docs/conventions.md" in {doc for doc, _ in cited}
    missing = sorted(f"{name} cites {doc}" for doc, name in cited if not (ROOT / doc).is_file())
    assert not missing, "cited documents missing:\n" + "\n".join(missing)


def test_the_readmes_params_examples_are_valid_params():
    """Each ```yaml block of the README, merged section by section into the project's params.yaml, parses."""
    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S)
    assert len(blocks) >= 2  # Qwen2.5-0.5B and bloomz-560m, at least
    base = yaml_parser().load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    for block in blocks:
        example = yaml_parser().load(block)
        parsed = parse_config({**base, **{name: {**base[name], **section} for name, section in example.items()}})
        for name, section in example.items():
            assert getattr(parsed, name).model_dump().items() >= section.items(), name
