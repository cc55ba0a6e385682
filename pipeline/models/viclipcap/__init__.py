"""ViCLIPCap: frozen CLIP embedding -> trained mapping network (`mapper`) -> frozen Vietnamese GPT-2 (`lm`).

`captioner` joins them into one caption model and registers its architecture as "viclipcap"; viclipcap and
its variants (retrieval, SCST, the published setting) are that architecture under other params sections
(`pipeline.core.registry`).
"""

from pipeline.models.viclipcap.captioner import Captioner

__all__ = ["Captioner"]
