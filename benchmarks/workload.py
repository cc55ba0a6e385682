"""A KTVIC-shaped workload: full-size models with random weights, synthetic images and captions.

Weights don't change speed, so the models are the real architectures at full
size, randomly initialised: open_clip's ViT-B-32, a GPT-2 of GPT-2-small shape
(124M parameters, 50,257-token vocabulary) and the default mapper from
params.yaml. Captions are token-id sequences as long as KTVIC's (15 to 25
syllables, about 1.25 byte-level BPE tokens per Vietnamese syllable), five per
image; images are JPEG files of KTVIC's typical size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.models.viclipcap import Captioner
from pipeline.encoders.base import encoding_precision
from pipeline.encoders.clip import ClipEncoder
from pipeline.config import load_config
from pipeline.data import ImageRecord
from pipeline.models.viclipcap.lm import LanguageModel, fuse_activations
from pipeline.models.viclipcap.mapper import build_mapper

CAPTIONS_PER_IMAGE = 5
TEST_IMAGES = 558  # KTVIC's test split
IMAGE_SIZE = (640, 480)
TOKENS = (19, 32)  # caption length in BPE tokens, the stop included: 15-25 syllables
PROJECT = Path(__file__).resolve().parents[1]


def params():
    """The project's params.yaml: the defaults a real run uses."""
    return load_config(PROJECT / "params.yaml")


def clip_encoder(device: torch.device) -> ClipEncoder:
    import open_clip

    config = params().clip
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(config.model, pretrained=None, device=device)
    return ClipEncoder(model.requires_grad_(False).eval(), preprocess, config.normalize, encoding_precision(device))


def language_model(device: torch.device, impl: str = "viclip") -> LanguageModel:
    """GPT-2 small's shape (124M parameters), frozen as the pipeline freezes it; viclip's with its
    activations fused as `load_lm` fuses them, the reference's as Hugging Face builds it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config())
    if impl == "viclip":
        fuse_activations(model)
    model.requires_grad_(False).eval().to(device)
    # Random weights never stop (the worst case): the stop is end-of-text, and no token is banned.
    return LanguageModel("gpt2-small-shape", model, tokenizer=None, stop_text=None,
                         stop_id=model.config.eos_token_id, banned_ids=())


def captioner(device: torch.device, impl: str = "viclip") -> Captioner:
    lm = language_model(device, impl)
    torch.manual_seed(0)
    mapper = build_mapper(params().mapper, 512, lm.width).to(device)
    return Captioner(mapper, lm)


def write_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """JPEG files of KTVIC's typical size: smooth colour fields with noise, so they compress like photos."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width, height = IMAGE_SIZE
    files = []
    for i in range(count):
        base = rng.integers(0, 256, size=(height // 16, width // 16, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize(IMAGE_SIZE, Image.BILINEAR)
        noisy = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, size=(height, width, 3))
        path = folder / f"{i:06d}.jpg"
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        files.append(path)
    return files


@dataclass
class Captions:
    """Stored image embeddings and their captions, as the train stage sees them."""

    records: list[ImageRecord]
    embeddings: np.ndarray  # (N, 512)
    tokens: dict[str, list[int]]  # caption text -> token ids (the stop included)

    def encode(self, captions: list[str]) -> list[list[int]]:
        return [self.tokens[c] for c in captions]


def captions(images: int, vocab: int = 50257, eos: int = 50256, seed: int = 0) -> Captions:
    rng = np.random.default_rng(seed)
    records, tokens = [], {}
    for image_id in range(images):
        texts = []
        for n in range(CAPTIONS_PER_IMAGE):
            text = f"{image_id}/{n}"
            length = int(rng.integers(TOKENS[0], TOKENS[1] + 1))
            tokens[text] = rng.integers(0, vocab - 1, size=length - 1).tolist() + [eos]
            texts.append(text)
        records.append(ImageRecord(image_id, Path(f"{image_id}.jpg"), tuple(texts)))
    embeddings = rng.standard_normal((images, 512)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    return Captions(records, embeddings, tokens)
