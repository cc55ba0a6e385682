"""Stage 4: the models side by side, as Markdown tables (one per scoring protocol) and a bar chart.

It reports every registered model that has been scored: a model with a metrics file is
in the report, one without (trained but not scored, or not trained) is left out and named in
the summary. A metrics file whose model directory is missing is an error, not a skip: the report
would show figures it cannot trace to a trained model, nor give that model's costs.
"""

from __future__ import annotations

from pipeline.core import paths
from pipeline.core.config import Config
from pipeline.core.errors import ViclipError
from pipeline.core.io import read_json, write_text
from pipeline.core.registry import MODELS
from pipeline.evaluation.metrics import shared_protocols
from pipeline.evaluation.report import bar_chart, comparison_markdown, display_order
from pipeline.models import read_spec


def run(config: Config) -> str:
    names = display_order(paths.scored_models(config))
    for model in names:
        if not paths.model_dir(config, model).is_dir():
            raise ViclipError(f"{paths.metrics_path(config, model)} has no model directory "
                              f"{paths.model_dir(config, model)}: run `viclip train --model {model}` again, "
                              "or delete the metrics file")
    metrics = {m: read_json(paths.metrics_path(config, m)) for m in names}
    models = {m: read_spec(paths.model_dir(config, m)).to_json() for m in names}
    chart = paths.chart_path(config)
    bar_chart(metrics, chart)
    write_text(paths.report_path(config), comparison_markdown(metrics, models, chart=chart.name))
    shared, _ = shared_protocols(metrics)  # as the report's tables, which refused any disagreement above
    cider = "; ".join(f"{protocol} " + ", ".join(f"{m} {block['cider']:.4f}" for m, block in held.items())
                      for protocol, held in shared.items())
    unscored = [m for m in MODELS if m not in names]
    left_out = f" (not scored, so left out: {', '.join(unscored)})" if unscored else ""
    return f"compare: CIDEr {cider}{left_out} -> {paths.report_path(config)}, {chart}"
