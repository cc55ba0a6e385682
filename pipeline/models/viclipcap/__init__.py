"""ViCLIPCap: frozen CLIP embedding -> trained mapping network (`mapper`) -> frozen Vietnamese GPT-2 (`lm`).

`captioner` joins them into one caption model and registers it as "viclipcap".
"""

from pipeline.models.viclipcap.captioner import Captioner

__all__ = ["Captioner"]
