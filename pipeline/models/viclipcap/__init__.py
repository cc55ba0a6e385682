"""ViCLIPCap: frozen CLIP embedding -> trained mapping network (`mapper`) -> frozen Vietnamese GPT-2 (`lm`).

`captioner` joins them into one caption model and registers it as "viclipcap"; `variants` registers the
same captioner under other settings (retrieval, SCST, the published setting).
"""

from pipeline.models.viclipcap import variants  # noqa: F401  (registers the variants)
from pipeline.models.viclipcap.captioner import Captioner

__all__ = ["Captioner"]
