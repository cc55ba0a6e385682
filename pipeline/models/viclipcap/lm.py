"""The LM and its tokenizer, frozen or trained: any causal LM of the GPT-2, Llama, Qwen2, BLOOM or MPT family
that `AutoModelForCausalLM` loads, through one code path. What differs between families is read from the
checkpoint: the context length (whatever its config calls it; BLOOM's ALiBi states none, so lm.max_positions
does), a beginning-of-sequence token the tokenizer puts first (Llama's <s>), the attention projections LoRA
adapts (peft's per-family defaults), and whether the logits are the plain head on the last hidden state.

Vietnamese GPT-2s follow two conventions (docs/conventions.md, "Vietnamese GPT-2 tokenizers"):
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

import contextlib
import hashlib
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import logging as hf_logging
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.activations import NewGELUActivation
from transformers.pytorch_utils import Conv1D

from pipeline.core.config import LmTrain, LoraSettings
from pipeline.core.devices import frozen_dtype
from pipeline.core.errors import ViclipError
from pipeline.core.io import json_digest
from pipeline.models.base import load_weights, save_weights

# The vocabulary's own end of a document, first: what a base LM (Qwen2.5's too) saw between pre-training
# documents. A chat tokenizer's end of turn (Qwen's <|im_end|>, its eos_token) ends replies, not text.
END_OF_TEXT_CANDIDATES = ("</s>", "<|endoftext|>")
# A caption's last syllable: what the stop text follows when the tokenizer meets it; the training captions
# then confirm it (`LanguageModel.check_stop`).
CAPTION_END = "một"
# Stop texts suggested where lm.stop does not end the training captions as one token.
STOP_CANDIDATES = (".", " .", "\n")
# What makes an LM the one a mapper was trained against; not how it was saved (dtype, library
# version), nor defaults that another transformers version may fill in differently.
ARCHITECTURE = ("model_type", "vocab_size", "max_position_embeddings", "hidden_size", "num_hidden_layers",
                "num_attention_heads", "tie_word_embeddings")
# What an LM's config calls its context length, by family: GPT-2 aliases n_positions, MPT says max_seq_len;
# BLOOM (ALiBi) has none.
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx")
# Config keys that change the logits from `head(last hidden state)`: scaled or soft-capped (Gemma 2 and 3,
# Cohere, Granite). The frozen-head loss computes that product itself, so such an LM runs its own head.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
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
    max_positions: int  # the context: prefix, prompt and caption together
    # The token the tokenizer puts before any text (Llama's <s>), which the LM always saw first; None: none.
    bos_id: int | None = None
    train: LmTrain = "frozen"  # lm.train
    # Digest of the weights as loaded, before any training: what trained LM weights sit on. None when frozen.
    base_weights: str | None = None
    # lora: peft's wrapper around `model`. The adapters live inside `model` itself (peft swaps each target
    # layer for one that adds its adapter), so `model` is what runs; the wrapper names the adapters' weights.
    adapters: PeftModel | None = None
    # The dtype the frozen weights are held in (`devices.frozen_dtype`); trained ones, and norms, stay fp32.
    held: torch.dtype = torch.float32
    # fp16 only: each cast weight's fp32 original, on the host, until the first batch shows fp16 holds its
    # activations (`settled`); after an overflow the originals come back and the LM runs in fp32.
    originals: list[tuple[nn.Parameter, torch.Tensor]] | None = field(default=None, repr=False)
    fell_back: bool = False

    def compute(self) -> contextlib.AbstractContextManager:
        """Where the LM runs: under autocast to the dtype its weights are held in (fp32 weights: as the caller
        set it), or in fp32 after an fp16 overflow, whatever the caller's policy."""
        device = self.model.device.type
        if self.fell_back:
            return torch.autocast(device, enabled=False)
        return contextlib.nullcontext() if self.held == torch.float32 else torch.autocast(device, dtype=self.held)

    def inputs(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Input embeddings as `compute` runs the LM: fp32 after a fall-back, whatever autocast made them."""
        return embeddings.float() if self.fell_back else embeddings

    def settled(self, output: torch.Tensor) -> bool:
        """False, once, where fp16 weights overflowed on the first batch (an inf or NaN in `output`; reported
        for Qwen models): the fp32 weights are back and the batch must run again. One host wait, once a run."""
        if self.originals is None:
            return True
        if bool(torch.isfinite(output).all()):
            self.originals = None  # the host copy is freed
            return True
        # Outside inference mode (the first batch may be a validation decode's): weights made inside it could
        # never again be saved for a backward.
        with torch.inference_mode(False), torch.no_grad():
            for weight, original in self.originals:
                weight.data = original.to(weight.device)
        self.originals, self.held, self.fell_back = None, torch.float32, True
        print(f"lm: {self.name} overflowed in fp16 on the first batch (inf or NaN); its weights are held and run "
              "in fp32 for this run", file=sys.stderr)
        return False

    @property
    def width(self) -> int:
        return self.model.get_input_embeddings().embedding_dim

    @property
    def plain_head(self) -> bool:
        """Whether the logits are the output head applied to the last hidden state, and nothing else."""
        return not any(getattr(self.model.config, key, None) not in (None, 1, 1.0) for key in LOGIT_TRANSFORMS)

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

    def check_stop(self, captions: list[str]) -> None:
        """Refuse, in one line, a stop text that the tokenizer does not write as the stop token after every
        training caption (one that merges "." into some syllables): the frozen LM would never emit it there,
        and those captions would never stop. The line names a stop text that would work, if one does."""
        if self.stop_text is None or not captions:
            return
        ends = _ending_ids(self.tokenizer, captions, self.stop_text)
        if ends == {self.stop_id}:
            return
        working = next((text for text in STOP_CANDIDATES if text != self.stop_text
                        and len(ids := _ending_ids(self.tokenizer, captions, text)) == 1
                        and None not in ids and min(ids) < self.vocab_size), None)
        merged = "joins it to the syllable before in some" if None in ends else f"ends them with {len(ends)} tokens"
        suggestion = f"lm.stop {working!r} ends every one as one token" if working else \
            f"none of {', '.join(map(repr, STOP_CANDIDATES))} ends every one as one token; try lm.stop: null"
        raise ViclipError(f"lm.stop {self.stop_text!r}: the tokenizer of {self.name} {merged} of the training "
                          f"captions, not as token {self.stop_id}; {suggestion}")

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
            # Absent where there is none: as directories written before it was recorded.
            **({"bos_id": self.bos_id} if self.bos_id is not None else {}),
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


def lora_targets(name: str, model: PreTrainedModel, lora: LoraSettings) -> list[str]:
    """lm.lora.targets, else peft's attention projections for the LM's family; refused in one line where
    neither names a layer of this LM."""
    targets = lora.targets or TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model.config.model_type)
    if not targets:
        raise ViclipError(f"lm.name {name}: no LoRA targets known for model type {model.config.model_type!r}; "
                          "set lm.lora.targets to the names of its attention projections")
    layers = {module_name.rsplit(".", 1)[-1] for module_name, _ in model.named_modules()}
    missing = sorted(set(targets) - layers)
    if missing:
        raise ViclipError(f"lm.lora.targets: {name} has no layer named {', '.join(missing)}")
    return list(targets)


def add_adapters(name: str, model: PreTrainedModel, lora: LoraSettings) -> PeftModel:
    """LoRA adapters on `model`'s attention, in place; its own weights stay frozen, the adapters train."""
    targets = lora_targets(name, model, lora)
    adapted = [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in targets]
    config = LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
        # transformers' Conv1D (GPT-2's) stores its weight transposed, (in, out); nn.Linear does not.
        fan_in_fan_out=all(isinstance(m, Conv1D) for m in adapted),
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


def context_length(name: str, config: Any, max_positions: int | None) -> int:
    """The positions the LM can read: what its config calls its context length, or lm.max_positions where it
    calls it nothing (ALiBi) or a user wants less of it."""
    stated = next((getattr(config, key) for key in CONTEXT_KEYS if isinstance(getattr(config, key, None), int)), None)
    if stated is None and max_positions is None:
        raise ViclipError(f"lm.name {name}: its config states no context length ({config.model_type} positions "
                          "have no limit); set lm.max_positions to the length it was trained on")
    return min(n for n in (stated, max_positions) if n is not None)


def leading_bos(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The token the tokenizer puts before every text (Llama's `<s>`, `add_bos_token`), or None."""
    plain = tokenizer(CAPTION_END, add_special_tokens=False)["input_ids"]
    full = tokenizer(CAPTION_END)["input_ids"]
    bos = tokenizer.bos_token_id
    return bos if bos is not None and full[:1] == [bos] and full[1:] == plain[: len(full) - 1] else None


def _ending_ids(tokenizer: PreTrainedTokenizerBase, captions: list[str], stop: str) -> set[int | None]:
    """The ids `stop` becomes after each caption; None for a caption after which it is not one token of its own."""
    texts = [c.rstrip().removesuffix(stop).rstrip() for c in captions]
    before = tokenizer(texts, add_special_tokens=False)["input_ids"]
    after = tokenizer([t + stop for t in texts], add_special_tokens=False)["input_ids"]
    return {a[-1] if len(a) == len(b) + 1 and a[: len(b)] == b else None for a, b in zip(after, before)}


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


def hold(model: PreTrainedModel, dtype: torch.dtype) -> list[tuple[nn.Parameter, torch.Tensor]] | None:
    """Cast `model`'s frozen weights to `dtype`, its norms' excepted (they normalise in fp32); trained weights
    stay fp32. For fp16, each weight with its fp32 original, to come back should fp16 overflow
    (`LanguageModel.settled`): by the parameter itself, which LoRA's adapters later wrap under another name."""
    if dtype == torch.float32:
        return None
    norms = {id(p) for m in model.modules() if "norm" in type(m).__name__.lower() for p in m.parameters(recurse=False)}
    originals = []
    for weight in model.parameters():  # a tied weight once
        if not weight.requires_grad and id(weight) not in norms and weight.is_floating_point():
            originals.append((weight, weight.data))
            weight.data = weight.data.to(dtype)
    return originals if dtype == torch.float16 else None


def load_lm(
    name: str, stop: str | None, device: torch.device, train: LmTrain = "frozen", lora: LoraSettings | None = None,
    max_positions: int | None = None,
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
    return set_up_lm(name, model, tokenizer, stop, device, train, lora, max_positions)


def set_up_lm(
    name: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, stop: str | None, device: torch.device,
    train: LmTrain = "frozen", lora: LoraSettings | None = None, max_positions: int | None = None,
) -> LanguageModel:
    """What `load_lm` makes of a loaded LM and its tokenizer (the benchmarks' random-weight LMs too):
    the stop token and the banned ones found, activations fused, set up for `train`, its frozen weights held
    in the device's `frozen_dtype`, on `device`."""
    rows = model.get_input_embeddings().num_embeddings
    if stop is None:
        stop_id = _end_of_text_id(tokenizer, model)
        if stop_id is None:
            raise ViclipError(f"lm.name {name}: the tokenizer has no end-of-text token; set lm.stop to a text such as \".\"")
    else:
        stop_id = _stop_id(name, tokenizer, stop, rows)
    context = context_length(name, model.config, max_positions)
    base_weights = None if train == "frozen" else weights_digest(model)
    fuse_activations(model).requires_grad_(train == "full").eval()
    held = torch.float32 if train == "full" else frozen_dtype(device)
    originals = hold(model, held)  # before the move: the fp32 originals stay on the host
    model.to(device)
    adapters = add_adapters(name, model, lora) if train == "lora" else None  # fp32 adapters (peft's autocast_adapter_dtype)
    return LanguageModel(name, model, tokenizer, stop, stop_id, _banned_ids(tokenizer, rows, stop_id), context,
                         leading_bos(tokenizer), train, base_weights, adapters, held, originals)
