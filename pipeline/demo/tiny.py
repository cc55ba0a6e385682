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
from tokenizers import ByteLevelBPETokenizer, SentencePieceBPETokenizer, Tokenizer, pre_tokenizers
from tokenizers.processors import TemplateProcessing
from transformers import (
    AutoModelForCausalLM, BloomConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig, MptConfig, PretrainedConfig,
    PreTrainedTokenizerFast, Qwen2Config,
)

from pipeline.encoders.images import open_rgb

TINY_CNN = "resnet18"  # torchvision's smallest ResNet, randomly initialised: no ImageNet weights offline
TINY_CLIP = "viclip-tiny-vit"
TINY_CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}

# The two tokenizer conventions of Vietnamese GPT-2 checkpoints (docs/conventions.md, "Vietnamese GPT-2 tokenizers").
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


def news_documents(caption_groups: list[list[str]], seed: int = 0, per_document: int = 3) -> list[str]:
    """Running text, as a news LM is pre-trained on: one short document per image, `per_document` of its
    captions as sentences, each ended by ". ". No special token anywhere."""
    rng = torch.Generator().manual_seed(seed)
    documents = []
    for group in caption_groups:
        chosen = torch.randperm(len(group), generator=rng)[:per_document].tolist()
        documents.append("".join(f"{group[i]}. " for i in chosen))
    return documents


def sentencepiece_tokenizer(texts: list[str], vocab_size: int = 400, split_punctuation: bool = True
                            ) -> PreTrainedTokenizerFast:
    """A Llama-style tokenizer: sentencepiece BPE (words start with "▁") with byte fallback, `<unk> <s> </s>` first, and `<s>` put
    before every text (add_bos_token). Punctuation is a piece of its own, as sentencepiece's default
    split_by_unicode_script makes it; without `split_punctuation`, "." may merge into the syllable before it,
    as in tokenizers trained otherwise."""
    bpe = SentencePieceBPETokenizer()
    if split_punctuation:
        bpe.pre_tokenizer = pre_tokenizers.Sequence([bpe.pre_tokenizer, pre_tokenizers.Punctuation("isolated")])
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=["<unk>", "<s>", "</s>"],
                            show_progress=False)
    # Byte fallback, as Llama's: a character the vocabulary lacks becomes its UTF-8 bytes, <0xE1> <0xBB> ...,
    # rather than <unk>, and decodes back to itself.
    spec = json.loads(bpe._tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    spec["decoder"] = {"type": "Sequence", "decoders": [  # Llama's decoder
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    tokenizer = Tokenizer.from_str(json.dumps(spec))
    tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def chat_tokenizer(texts: list[str], vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A Qwen2-style tokenizer: byte-level BPE with its special tokens after the vocabulary, and a chat
    model's end of turn as eos_token (the end of text is <|endoftext|>)."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)
    tokenizer.add_special_tokens({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                                  "additional_special_tokens": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]})
    return tokenizer


def family_config(family: str, rows: int, width: int, layers: int, block: int, eos: int, bos: int | None) -> PretrainedConfig:
    """A tiny config of each LM family viclip decodes with, each with its way of saying its context length."""
    shared = {"vocab_size": rows, "bos_token_id": bos, "eos_token_id": eos}
    if family == "llama":
        return LlamaConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=2,
                           num_key_value_heads=1, max_position_embeddings=block, **shared)
    if family == "qwen2":
        return Qwen2Config(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=2,
                           num_key_value_heads=1, max_position_embeddings=block, tie_word_embeddings=True, **shared)
    if family == "bloom":  # ALiBi: no position limit in its config
        return BloomConfig(hidden_size=width, n_layer=layers, n_head=2, **shared)
    if family == "mpt":  # max_seq_len, not max_position_embeddings
        return MptConfig(d_model=width, n_layers=layers, n_heads=2, max_seq_len=block, expansion_ratio=2, **shared)
    return GPT2Config(n_positions=block, n_embd=width, n_layer=layers, n_head=2, **shared)


def make_tiny_lm(
    caption_groups: list[list[str]], directory: str | Path, convention: str = "gpt2news",
    steps: int = 300, seed: int = 0, width: int = 64, layers: int = 2, block: int = 128, family: str = "gpt2",
    dtype: torch.dtype = torch.float32,
) -> Path:
    """A small causal LM of `family` (GPT-2, Llama, Qwen2, BLOOM or MPT, each with its tokenizer's conventions)
    pre-trained the way real news LMs are, saved with `save_pretrained` in `dtype`.

    The standard causal-LM recipe: documents of running text (`news_documents`) tokenised,
    concatenated into one stream with nothing between them and cut into blocks, every
    token a target. End-of-text is never one, so the LM
    never learns to emit it (its output row is only ever pushed down), while it does
    learn that a sentence ends with ".". Each document holds captions of one image, so
    earlier text tells what comes next, as in a real LM: one that ignored its context
    could not be steered by a prefix. Blocks fill its whole context, so every position it
    has was trained, as in a real LM (a prompt of retrieved captions reaches far into it).
    The embedding matrix is padded past the tokenizer
    to a multiple of 64, as many checkpoints are: those rows map to no token.
    """
    directory = Path(directory)
    torch.manual_seed(seed)
    documents = news_documents(caption_groups, seed)
    tokenizer = {"llama": sentencepiece_tokenizer, "qwen2": chat_tokenizer}.get(
        family, lambda texts: train_tokenizer(texts, convention))(documents)
    ids = torch.tensor([i for doc in tokenizer(documents, add_special_tokens=False)["input_ids"] for i in doc])
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    # Qwen2's embedding matrix runs well past its tokenizer; the others' to the next multiple of 64.
    rows = -(-len(tokenizer) // 64) * 64 + (64 if family == "qwen2" else 0)
    bos = tokenizer.bos_token_id if family == "llama" else eos if family == "gpt2" else None
    config = family_config(family, rows, width, layers, block, eos, bos)
    model = GPT2LMHeadModel(config) if family == "gpt2" else AutoModelForCausalLM.from_config(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    window = min(block, len(ids) - 1)  # a test's few sentences may be shorter than one block
    for _ in range(steps):
        starts = torch.randint(len(ids) - window, (32,))
        tokens = torch.stack([ids[start : start + window] for start in starts.tolist()])  # (32, window)
        loss = model(input_ids=tokens, labels=tokens).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.to(dtype).save_pretrained(directory)  # a half-precision checkpoint, where `dtype` says
    tokenizer.save_pretrained(directory)
    return directory
