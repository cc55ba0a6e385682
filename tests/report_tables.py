"""The comparison report's tables read back, for tests to check what the report says."""

from __future__ import annotations

from pipeline.evaluation.report import MISSING_REPORTED, MISSING_RUN, ROWS


def _parse_cell(cell: str) -> float | None:
    text = cell.strip().strip("*").strip()
    return None if text in (MISSING_RUN, MISSING_REPORTED) else float(text)


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def read_markdown_table(markdown: str, protocol: str = "syllable") -> dict[str, dict[str, float | None]]:
    """One protocol's comparison table: {column display name: {metric key: value}}."""
    lines = markdown.splitlines()
    heading = f"## {protocol.capitalize()} protocol"
    section = next((i for i, line in enumerate(lines) if line == heading), None)
    start = None if section is None else next(
        (i for i, line in enumerate(lines) if i > section and line.startswith("| Metric |")), None)
    if start is None:
        raise LookupError(f"no table with a '| Metric |' header under {heading!r}")
    columns = _cells(lines[start])[1:]
    keys = {label: key for key, label in ROWS}
    table: dict[str, dict[str, float | None]] = {column: {} for column in columns}
    for line in lines[start + 2:]:  # past the header and its |---| line
        if not line.startswith("|"):
            break
        label, *values = _cells(line)
        for column, value in zip(columns, values):
            table[column][keys[label]] = _parse_cell(value)
    return table
