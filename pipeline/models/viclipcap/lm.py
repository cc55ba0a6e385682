"""The Vietnamese GPT-2 and its tokenizer, whichever convention the checkpoint follows; frozen, or trained.

Two conventions are in circulation (docs/conventions.md, "Vietnamese GPT-2 tokenizers"):
gpt2news-style (`<s> <pad> </s>`, pad is not id 0, tokenizer.json only) and NlpHUST-style
(`<|endoftext|>` only, no pad token). Padding never reaches the loss (labels -100), so a missing pad
token costs nothing.

What ends a caption is `lm.stop`: a text such as "." that the LM already
predicts at a sentence end, or (null) the LM's end-of-text token. A news LM
pre-trained the standard way (documents concatenated into one stream) never had
end-of-text as a target, and a frozen LM steered by a short prefix cannot learn
to emit a token it never predicts: its captions would never stop.

What training does to the LM is `lm.train`: nothing (frozen, ClipCap's frozen-LM setup), low-rank
adapters on its attention (lora), or every weight (full). A trained LM's part of the model directory is
what was trained (`save`): nothing, the adapters, or the whole LM; it only makes sense on top of the
base weights it was trained from, so their digest is part of the fingerprint.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import logging as hf_logging
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.activations import NewGELUActivation

from pipeline.core.config import LmTrain, LoraSettings
from pipeline.core.errors import ViclipError
from pipeline.core.io import json_digest
from pipeline.models.base import load_weights, save_weights

END_OF_TEXT_CANDIDATES = ("</s>", "<|endoftext|>")
# Any caption's last syllable: what the stop text follows when the tokenizer meets it.
CAPTION_END = "một"
# What makes an LM the one a mapper was trained against; not how it was saved (dtype, library
# version), nor defaults that another transformers version may fill in differently.
ARCHITECTURE = ("model_type", "vocab_size", "max_position_embeddings", "hidden_size", "num_hidden_layers",
                "num_attention_heads", "tie_word_embeddings")
# LoRA's targets: GPT-2's attention projection, query, key and value in one matrix (LoraSettings says why).
LORA_TARGETS = ["c_attn"]
# What a trained LM adds to the model directory, by lm.train.
TRAINED_WEIGHTS = {"full": "lm.safetensors", "lora": "lm_lora.safetensors"}


@dataclass
class LanguageModel:
    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    stop_text: str | None  # lm.stop: the text that ends a caption; None: the end-of-text token
    stop_id: int  # the one token that ends a caption
    banned_ids: tuple[int, ...]  # embedding rows that can never be a caption's token
    train: LmTrain = "frozen"  # lm.train
    # Digest of the weights as loaded, before any training: what trained LM weights sit on. None when frozen.
    base_weights: str | None = None
    # lora: peft's wrapper around `model`. The adapters live inside `model` itself (peft swaps each target
    # layer for one that adds its adapter), so `model` is what runs; the wrapper names the adapters' weights.
    adapters: PeftModel | None = None

    @property
    def width(self) -> int:
        return self.model.get_input_embeddings().embedding_dim

    @property
    def vocab_size(self) -> int:
        """Rows of the embedding matrix; the tokenizer may know more ids, or fewer."""
        return self.model.get_input_embeddings().num_embeddings

    def encode(self, captions: list[str]) -> list[list[int]]:
        """Token ids of each caption, closed by the stop token (once, if the caption already ends with its text)."""
        if self.stop_text is not None:
            captions = [c.rstrip().removesuffix(self.stop_text).rstrip() for c in captions]
        ids = self.tokenizer(captions, add_special_tokens=False)["input_ids"]
        encoded = [tokens + [self.stop_id] for tokens in ids]
        for caption, tokens in zip(captions, encoded):
            if max(tokens) >= self.vocab_size:
                raise ViclipError(
                    f"lm.name {self.name}: caption {caption!r} has token id {max(tokens)} "
                    f"beyond the model's {self.vocab_size} embeddings"
                )
        return encoded

    def decode(self, tokens: list[int]) -> str:
        if self.stop_id in tokens:
            tokens = tokens[: tokens.index(self.stop_id)]
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()

    def fingerprint(self) -> dict[str, Any]:
        """What a trained mapper depends on: recorded in the model directory, checked when it is loaded."""
        config = {key: getattr(self.model.config, key, None) for key in ARCHITECTURE}
        return {
            "tokenizer": "sha256:" + json_digest([sorted(self.tokenizer.get_vocab().items()),
                                                  sorted(self.tokenizer.all_special_tokens)]),
            "config": "sha256:" + json_digest(config),
            "embedding_rows": self.vocab_size,
            "width": self.width,
            "stop": self.stop_text,
            "stop_id": self.stop_id,
            # A trained LM's weights are a change to these ones (absent when frozen: as older directories).
            **({"weights": self.base_weights} if self.base_weights is not None else {}),
        }

    def save(self, directory: Path) -> None:
        """What training changed into `directory`: nothing when frozen, the adapters, or the whole LM."""
        if self.train == "full":
            save_weights(self.model, directory / TRAINED_WEIGHTS["full"])
        elif self.train == "lora":
            # peft's adapter keys: the layer names with the adapter's name taken out.
            save_file({k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(self.adapters).items()},
                      str(directory / TRAINED_WEIGHTS["lora"]))

    def restore(self, directory: Path) -> None:
        """Load what `save` wrote into `directory` onto the base LM."""
        if self.train == "full":
            load_weights(self.model, directory / TRAINED_WEIGHTS["full"])
        elif self.train == "lora":
            load_weights(self.adapters, directory / TRAINED_WEIGHTS["lora"], _load_adapters)


def weights_digest(model: nn.Module) -> str:
    """sha256 over every parameter (name, shape, dtype, bytes), in name order; a tied tensor once.
    Parameters, not the state dict: buffers come and go with transformers versions, weights do not."""
    digest = hashlib.sha256()
    for name, weight in sorted(model.named_parameters()):
        digest.update(f"{name} {tuple(weight.shape)} {weight.dtype}\n".encode())
        digest.update(weight.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return "sha256:" + digest.hexdigest()


def _load_adapters(adapters: PeftModel, path: str) -> None:
    """peft's `set_peft_model_state_dict`, made strict: by itself it loads what matches and says nothing."""
    state, expected = load_file(path), get_peft_model_state_dict(adapters)
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise RuntimeError(f"adapters missing: {missing[:3]}, unexpected: {unexpected[:3]}")
    set_peft_model_state_dict(adapters, state)  # a shape mismatch raises RuntimeError


def add_adapters(model: PreTrainedModel, lora: LoraSettings) -> PeftModel:
    """LoRA adapters on `model`'s attention, in place; its own weights stay frozen, the adapters train."""
    config = LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=LORA_TARGETS,
        fan_in_fan_out=True,  # GPT-2's Conv1D stores its weight transposed, (in, out)
    )
    with warnings.catch_warnings():  # peft 0.21 asks transformers 5 for a renamed attribute
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        return get_peft_model(model, config)


def _end_of_text_id(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> int | None:
    """The vocabulary's own end-of-text token, else the tokenizer's eos, else the model config's, and
    only an id with an embedding row: a tokenizer loaded from tokenizer.json alone may invent an eos
    token the model never saw, and where the embedding matrix is padded past the tokenizer, even
    give it an id that has a (never trained) row."""
    rows = model.get_input_embeddings().num_embeddings
    vocab = tokenizer.get_vocab()
    named = [vocab.get(name) for name in (*END_OF_TEXT_CANDIDATES, tokenizer.eos_token) if name]
    configured = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else None
    return next((i for i in (*named, configured) if i is not None and i < rows), None)


def _stop_id(name: str, tokenizer: PreTrainedTokenizerBase, stop: str, rows: int) -> int:
    """The one token `stop` becomes after a caption. Byte-level BPE gives "." and " ." different ids,
    so the id is the one the tokenizer gives the text where it meets it: right after a syllable."""
    before = tokenizer(CAPTION_END, add_special_tokens=False)["input_ids"]
    after = tokenizer(CAPTION_END + stop, add_special_tokens=False)["input_ids"]
    added = len(after) - len(before)
    if after[: len(before)] != before or added != 1:
        raise ViclipError(
            f"lm.stop {stop!r}: the tokenizer of {name} writes it after a caption as {max(added, 0)} tokens "
            f"({after[len(before):]}); it must be exactly one token"
        )
    if after[-1] >= rows:
        raise ViclipError(f"lm.stop {stop!r}: its token id {after[-1]} has no embedding row in {name}")
    return after[-1]


def _banned_ids(tokenizer: PreTrainedTokenizerBase, rows: int, stop_id: int) -> tuple[int, ...]:
    """Special tokens other than the stop, and embedding rows that no tokenizer entry maps to."""
    special = set(tokenizer.all_special_ids)
    special |= {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    mapped = set(tokenizer.get_vocab().values())
    return tuple(i for i in range(rows) if i != stop_id and (i in special or i not in mapped))


def fuse_activations(model: nn.Module) -> nn.Module:
    """GPT-2's `gelu_new` as one kernel: F.gelu(approximate="tanh") is the same formula, computed in one
    pass where `gelu_new` runs eight element-wise ops forward and more backward (13% of an fp32 training
    step on this project's CPU, against 2% for the one kernel; BENCHMARKS.md)."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, NewGELUActivation):
                setattr(module, name, nn.GELU(approximate="tanh"))
    return model


def load_lm(
    name: str, stop: str | None, device: torch.device, train: LmTrain = "frozen", lora: LoraSettings | None = None,
) -> LanguageModel:
    """Load in fp32 whatever dtype the checkpoint was saved in, fuse its activations, and set it up for
    `train` (lm.train): frozen, no gradients; full, every weight trainable; lora, `lora`'s adapters
    trainable and the rest frozen. Eval mode: a trained LM is put in training mode with its captioner."""
    hf_logging.disable_progress_bar()  # one summary line per stage, not a bar per weight file
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        # transformers 5 loads a checkpoint in its own dtype: a half-precision one would
        # then meet the fp32 mapper, and decode on the CPU in half precision.
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    except (OSError, ValueError) as error:
        raise ViclipError(
            f"could not load the language model {name!r} ({str(error).splitlines()[0]}); "
            "download it elsewhere and set lm.name in params.yaml to its local directory"
        ) from None
    return set_up_lm(name, model, tokenizer, stop, device, train, lora)


def set_up_lm(
    name: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, stop: str | None, device: torch.device,
    train: LmTrain = "frozen", lora: LoraSettings | None = None,
) -> LanguageModel:
    """What `load_lm` makes of a loaded LM and its tokenizer (the benchmarks' random-weight LMs too):
    the stop token and the banned ones found, activations fused, set up for `train`, on `device`."""
    rows = model.get_input_embeddings().num_embeddings
    if stop is None:
        stop_id = _end_of_text_id(tokenizer, model)
        if stop_id is None:
            raise ViclipError(f"lm.name {name}: the tokenizer has no end-of-text token; set lm.stop to a text such as \".\"")
    else:
        stop_id = _stop_id(name, tokenizer, stop, rows)
    base_weights = None if train == "frozen" else weights_digest(model)
    fuse_activations(model).requires_grad_(train == "full").eval().to(device)
    adapters = add_adapters(model, lora) if train == "lora" else None
    return LanguageModel(
        name, model, tokenizer, stop, stop_id, _banned_ids(tokenizer, rows, stop_id), train, base_weights, adapters,
    )
