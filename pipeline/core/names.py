"""The models and feature stores by name: the lists the CLI checks a name against without importing torch.

The registries (`pipeline.models`, `pipeline.encoders`) hold the same names; tests/test_layout.py holds
them equal.
"""

# ViCLIPCap (cross-entropy, LM frozen), the CNN+LSTM baseline, then ViCLIPCap's variants: each a model of its own,
# with its own model directory, metrics file and DVC stages (pipeline.models.viclipcap.variants).
MODELS = ("viclipcap", "cnn_lstm", "viclipcap_rag", "viclipcap_scst", "viclipcap_published")
# Feature stores, each named after the params section of its encoder; the encoder family it runs (clip or cnn).
ENCODERS = {"clip": "clip", "cnn": "cnn", "clip_published": "clip"}
MODEL, ENCODER = MODELS[0], "clip"
