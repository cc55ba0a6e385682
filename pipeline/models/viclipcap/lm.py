"""The frozen Vietnamese GPT-2 and its tokenizer, whichever convention the checkpoint follows.

Two conventions are in circulation (FACTS.md): gpt2news-style (`<s> <pad> </s>`,
pad is not id 0, tokenizer.json only) and NlpHUST-style (`<|endoftext|>` only,
no pad token). The loader finds the end-of-text token either way; padding
never reaches the loss (labels -100), so a missing pad token costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import logging as hf_logging
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from pipeline.errors import ViclipError

END_OF_TEXT_CANDIDATES = ("</s>", "<|endoftext|>")


@dataclass
class LanguageModel:
    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    eos_token_id: int

    @property
    def width(self) -> int:
        return self.model.get_input_embeddings().embedding_dim

    @property
    def vocab_size(self) -> int:
        """Rows of the embedding matrix; the tokenizer may know more ids than this."""
        return self.model.get_input_embeddings().num_embeddings

    def encode(self, captions: list[str]) -> list[list[int]]:
        """Token ids of each caption, closed by end-of-text so decoding learns where to stop."""
        ids = self.tokenizer(captions, add_special_tokens=False)["input_ids"]
        encoded = [tokens + [self.eos_token_id] for tokens in ids]
        for caption, tokens in zip(captions, encoded):
            if max(tokens) >= self.vocab_size:
                raise ViclipError(
                    f"lm.name {self.name}: caption {caption!r} has token id {max(tokens)} "
                    f"beyond the model's {self.vocab_size} embeddings"
                )
        return encoded

    def decode(self, tokens: list[int]) -> str:
        if self.eos_token_id in tokens:
            tokens = tokens[: tokens.index(self.eos_token_id)]
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()


def _end_of_text_id(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> int | None:
    """The tokenizer's own eos, else a token named like one, else the model config's, and
    only an id with an embedding row: a tokenizer loaded from tokenizer.json alone may
    invent an eos token the model never saw."""
    rows = model.get_input_embeddings().num_embeddings
    vocab = tokenizer.get_vocab()
    named = [vocab.get(name) for name in (tokenizer.eos_token, *END_OF_TEXT_CANDIDATES) if name]
    configured = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else None
    return next((i for i in (*named, configured) if i is not None and i < rows), None)


def load_lm(name: str, device: torch.device) -> LanguageModel:
    """Load and freeze: no gradients, eval mode (no dropout)."""
    hf_logging.disable_progress_bar()  # one summary line per stage, not a bar per weight file
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise ViclipError(
            f"could not load the language model {name!r} ({str(error).splitlines()[0]}); "
            "download it elsewhere and set lm.name in params.yaml to its local directory"
        ) from None
    eos = _end_of_text_id(tokenizer, model)
    if eos is None:
        raise ViclipError(f"lm.name {name}: the tokenizer has no end-of-text token")
    model.requires_grad_(False).eval().to(device)
    return LanguageModel(name, model, tokenizer, eos)
