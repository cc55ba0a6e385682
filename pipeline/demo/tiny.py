"""Tiny local stand-ins for the hub models, built in seconds on a CPU.

They run the real loading paths (an open_clip architecture registered from
JSON with a local checkpoint; a torchvision CNN from a local checkpoint; a
Hugging Face tokenizer and GPT-2 loaded with `from_pretrained(dir)`), so the
demo and the tests exercise the code a real run uses, at toy size.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import ByteLevelBPETokenizer
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from pipeline.encoders import open_rgb

TINY_CNN = "resnet18"  # torchvision's smallest ResNet, randomly initialised: no ImageNet weights offline
TINY_CLIP = "viclip-tiny-vit"
TINY_CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}

# The two tokenizer conventions of Vietnamese GPT-2 checkpoints (FACTS.md).
CONVENTIONS = {
    "gpt2news": {"specials": ["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                 "roles": {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}},
    "nlphust": {"specials": ["<|endoftext|>"],
                "roles": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}},
}


def make_tiny_clip(
    directory: str | Path, pairs: list[tuple[Path, str]], steps: int = 200, seed: int = 0
) -> tuple[Path, Path]:
    """A tiny ViT CLIP briefly pre-trained contrastively on (image, caption) `pairs`:
    (architecture JSON, safetensors checkpoint).

    A randomly initialised ViT maps every mostly-background synthetic image to
    nearly the same embedding (mean cosine > 0.98); a few contrastive steps
    make "frozen CLIP" carry meaning, as pre-training does for the tiny LM.
    """
    import open_clip
    from open_clip.loss import ClipLoss

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / f"{TINY_CLIP}.json"
    config.write_text(json.dumps(TINY_CLIP_CONFIG, indent=1))
    open_clip.add_model_config(config)
    torch.manual_seed(seed)
    model, preprocess, _ = open_clip.create_model_and_transforms(TINY_CLIP, pretrained=None)
    images = torch.stack([preprocess(open_rgb(path)) for path, _ in pairs])
    texts = open_clip.get_tokenizer(TINY_CLIP)([caption for _, caption in pairs])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = ClipLoss()
    model.train()
    for _ in range(steps):
        batch = torch.randperm(len(pairs))[:64]
        image_features, text_features, scale = model(images[batch], texts[batch])[:3]
        loss = loss_fn(image_features, text_features, scale)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    checkpoint = directory / f"{TINY_CLIP}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint))
    return config, checkpoint


def make_tiny_cnn(directory: str | Path, seed: int = 0) -> Path:
    """A randomly initialised (seeded) torchvision CNN, saved as a local checkpoint file."""
    import torchvision

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = torchvision.models.get_model(TINY_CNN, weights=None)
    checkpoint = directory / f"{TINY_CNN}.safetensors"
    save_file(model.state_dict(), str(checkpoint))
    return checkpoint


def train_tokenizer(texts: list[str], convention: str = "gpt2news", vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`, with the convention's special tokens first."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2,
                            special_tokens=CONVENTIONS[convention]["specials"], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, **CONVENTIONS[convention]["roles"])


def make_tiny_lm(
    caption_groups: list[list[str]], directory: str | Path, convention: str = "gpt2news",
    steps: int = 300, seed: int = 0, width: int = 64, layers: int = 2,
) -> Path:
    """A small GPT-2 pre-trained as a language model, saved with `save_pretrained`.

    Each training text is two captions of one image (`caption_groups` holds an
    image's captions), so the model learns that earlier text tells what comes
    next, as a real LM learns from documents. Trained on lone captions it
    ignores its context, and a frozen LM that ignores context can't be
    steered by a prefix.
    """
    directory = Path(directory)
    torch.manual_seed(seed)
    tokenizer = train_tokenizer([c for group in caption_groups for c in group], convention)
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    encoded = [
        [ids + [eos] for ids in tokenizer(group, add_special_tokens=False)["input_ids"]]
        for group in caption_groups
    ]
    longest = 2 * max(len(ids) for group in encoded for ids in group)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=max(64, longest), n_embd=width, n_layer=layers, n_head=2,
        bos_token_id=eos, eos_token_id=eos,
    )
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        tokens = torch.full((32, longest), eos)
        labels = torch.full((32, longest), -100)
        for row, image in enumerate(torch.randint(len(encoded), (32,)).tolist()):
            first, second = torch.randperm(len(encoded[image]))[:2].tolist()
            text = encoded[image][first] + encoded[image][second]
            tokens[row, : len(text)] = torch.tensor(text)
            labels[row, : len(text)] = torch.tensor(text)
        loss = model(input_ids=tokens, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
