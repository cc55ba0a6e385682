"""viclip: Vietnamese image captioning with a frozen CLIP, a frozen GPT-2 and a trained mapping network."""

__version__ = "0.1.0"
