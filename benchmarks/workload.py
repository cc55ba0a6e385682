"""A KTVIC-shaped workload: full-size models with random weights, synthetic images and captions.

Weights don't change speed, so the models are the real architectures at full
size, randomly initialised: open_clip's ViT-B-32, a GPT-2 of GPT-2-small shape
(124M parameters, 50,257-token vocabulary; or another LM, `LMS`) and the default
mapper from params.yaml. Captions are token-id sequences as long as KTVIC's (15 to 25
syllables, about 1.25 byte-level BPE tokens per Vietnamese syllable), five per
image; images are JPEG files of KTVIC's typical size. Where text must be
written or read (retrieval prompts, SCST's sampled captions), a byte-level BPE
tokenizer trained on synthetic Vietnamese captions splits them at that rate.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from transformers import PretrainedConfig, PreTrainedTokenizerFast

from pipeline.core.config import LmTrain, load_config
from pipeline.core.devices import frozen_dtype
from pipeline.data.annotations import ImageRecord
from pipeline.demo.tiny import train_tokenizer
from pipeline.encoders.clip import ClipEncoder
from pipeline.models.viclipcap import Captioner
from pipeline.models.viclipcap.lm import LanguageModel, context_length, fuse_activations, hold, set_up_lm
from pipeline.models.viclipcap.mapper import build_mapper
from pipeline.models.viclipcap.retrieval import Datastore

CAPTIONS_PER_IMAGE = 5
TEST_IMAGES = 558  # KTVIC's test split
IMAGE_SIZE = (640, 480)
TOKENS = (19, 32)  # caption length in BPE tokens, the stop included: 15-25 syllables
TRAIN_IMAGES = 3_769  # KTVIC's train split: the retrieval datastore, and the CIDEr-D corpus of SCST's rewards
# Entries of the tokenizer trained on synthetic retrieval prompts (tokenizer()): at 460 it splits them at
# 1.25 tokens a syllable, as the Vietnamese GPT-2's tokenizer splits KTVIC's captions.
TOKENIZER_ENTRIES = 460
PROJECT = Path(__file__).resolve().parents[1]


def params():
    """The project's params.yaml: the defaults a real run uses."""
    return load_config(PROJECT / "params.yaml")


def clip_encoder(device: torch.device) -> ClipEncoder:
    import open_clip

    config = params().clip
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(config.model, pretrained=None, device=device)
    return ClipEncoder.frozen(model, preprocess, config.normalize, device)


def _gpt2(layers: int = 12, width: int = 768) -> PretrainedConfig:
    from transformers import GPT2Config

    return GPT2Config(n_layer=layers, n_embd=width, n_head=max(width // 64, 1))


def _qwen2(layers: int = 24, width: int = 896) -> PretrainedConfig:
    """Qwen2.5-0.5B's shape: grouped-query attention (2 key-value heads), RoPE, SwiGLU, tied embeddings and a
    151,936-row vocabulary (494M parameters, 136M of them the embedding)."""
    from transformers import Qwen2Config

    heads = max(width // 64, 1)
    return Qwen2Config(num_hidden_layers=layers, hidden_size=width, num_attention_heads=heads,
                       num_key_value_heads=2 if heads % 2 == 0 else 1, intermediate_size=width * 38 // 7,
                       vocab_size=151_936, max_position_embeddings=32_768, tie_word_embeddings=True,
                       bos_token_id=151_643, eos_token_id=151_643)


# The LMs the suite can time (`python -m benchmarks --lm NAME`, BENCH_LM in each case's process), each a
# config at full size (a test's may have fewer blocks or a narrower width, one head each 64 wide).
LMS: dict[str, Callable[..., PretrainedConfig]] = {"gpt2-small": _gpt2, "qwen2.5-0.5b": _qwen2}
BENCH_LM = "VICLIP_BENCH_LM"


def lm_name() -> str:
    return os.environ.get(BENCH_LM, next(iter(LMS)))


def language_model(device: torch.device, impl: str = "viclip", tokenizer: PreTrainedTokenizerFast | None = None,
                   layers: int | None = None, width: int | None = None, train: LmTrain = "frozen") -> LanguageModel:
    """The LM `lm_name()` names, at full size with random weights, viclip's with its activations fused as
    `load_lm` fuses them, the reference's as Hugging Face builds it.

    Without a tokenizer it is frozen, and random weights never stop (the worst case): the stop is
    end-of-text, and no token is banned. With one (prompts to write, samples to read), it is set up as
    `load_lm` sets up a loaded LM (`set_up_lm`): the stop is `lm.stop`, rows no entry of the tokenizer maps
    to are banned (random weights then draw the stop about once in TOKENIZER_ENTRIES tokens), and what of
    it trains is `train` (lm.train, with lm.lora's adapters)."""
    from transformers import AutoModelForCausalLM

    name = lm_name()
    shape = {key: value for key, value in (("layers", layers), ("width", width)) if value is not None}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LMS[name](**shape))
    name += "-shape"
    if tokenizer is not None:
        settings = params().lm
        return set_up_lm(name, model, tokenizer, settings.stop, device, train, settings.lora, settings.max_positions)
    if impl == "viclip":
        fuse_activations(model)
    # viclip holds the frozen weights as the device's policy says; the reference keeps ClipCap's fp32.
    held = frozen_dtype(device) if impl == "viclip" else torch.float32
    originals = hold(model.requires_grad_(False).eval(), held)
    model.to(device)
    return LanguageModel(name, model, tokenizer=None, stop_text=None, stop_id=model.config.eos_token_id, banned_ids=(),
                         max_positions=context_length(name, model.config, None), held=held, originals=originals)


def tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of TOKENIZER_ENTRIES entries trained on `texts` (synthetic Vietnamese)."""
    return train_tokenizer(texts, vocab_size=TOKENIZER_ENTRIES)


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


def datastore(embeddings: np.ndarray, captions: list[str], device: torch.device) -> Datastore:
    """A retrieval datastore of these images' embeddings (N, D), each lending its caption to prompts."""
    source = {"split": "train", "images": len(captions), "store": "synthetic"}
    return Datastore(torch.from_numpy(embeddings).to(device), list(range(len(captions))), captions, source)
