"""Stage 4: the two models side by side, as Markdown tables (one per scoring protocol) and a bar chart."""

from __future__ import annotations

from pipeline import paths
from pipeline.config import Config
from pipeline.io import read_json, write_text
from pipeline.metrics import shared_protocols
from pipeline.models import read_spec
from pipeline.report import bar_chart, comparison_markdown, display_order


def run(config: Config) -> str:
    names = display_order(paths.MODELS)
    metrics = {m: read_json(paths.metrics_path(config, m), f"run `viclip score --model {m}`") for m in names}
    models = {m: read_spec(paths.model_dir(config, m)).to_json() for m in names}
    chart = paths.chart_path(config)
    bar_chart(metrics, chart)
    write_text(paths.report_path(config), comparison_markdown(metrics, models, chart=chart.name))
    shared, _ = shared_protocols(metrics)  # as the report's tables, which refused any disagreement above
    cider = "; ".join(f"{protocol} " + ", ".join(f"{m} {block['cider']:.4f}" for m, block in held.items())
                      for protocol, held in shared.items())
    return f"compare: CIDEr {cider} -> {paths.report_path(config)}, {chart}"
