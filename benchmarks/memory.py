"""`python -m benchmarks.memory`: GPU memory for a training step and for decoding, in front of each frozen LM.
ESTIMATES FROM ARITHMETIC, not measurements: nothing here runs a model.

The setup is params.yaml's (`Setup.from_params`): the mapper (`mapper`), a training batch of
`train.viclipcap.batch_size` captions, each `mapper.prefix_length` prefix positions and up to
`workload.TOKENS[1]` caption tokens (KTVIC's longest, the stop included; a batch is padded to its
longest), plus Llama's <s> first; decoding `score.batch_size` images x `score.beam_size` beams on a KV
cache of up to prefix + `score.max_length` positions. On a GPU the frozen weights are held in 16-bit (bf16,
fp16 on a T4: `devices.frozen_dtype`) and the step runs under autocast in the same dtype. Bytes:

    training step = LM weights                   parameters x 2 (fp32: x 4); no gradients, no optimiser state
                  + mapper                       its parameters x (4 weights + 4 gradients + 8 AdamW moments
                                                 + 2 for autocast's cached 16-bit copy, none in fp32)
                  + LM activations               tokens x (layers x per_layer + final norm inputs x 4)
                  + backward working set         one layer's activations again (gradients in flight)
                  + mapper activations           mapper tokens x layers x (10 W-wide values + heads x
                                                 its positions) x 4; the MLP mapper: its hidden layer
                  + frozen-head loss             256 positions x vocabulary x (4 + 4 fp32 logits and
                                                 log-probabilities, + 2 for the 16-bit copy)

    per_layer     = 2 W x 4                      the norms' inputs: the residual stream stays fp32 under
                                                 autocast
                  + attention x W x a            what attention keeps for the backward (a = 2, or 4 in fp32):
                                                 SDPA (GPT-2, Qwen2, Llama) q, k, v and the output (4; a
                                                 padding mask makes transformers expand grouped K/V heads),
                                                 GPT-2 6 (its fused c_attn output, which the q, k, v views
                                                 keep whole, and the kernel's copies); eager attention (BLOOM,
                                                 MPT) q, k, v (3) and the softmax, heads x positions x
                                                 (4 + a; 4 in fp32: the fp32 softmax and its 16-bit copy)
                  + mlp x I x a                  the activation's inputs: GELU's (1 x I), SwiGLU's gate, up
                                                 and silu(gate) (3 x I)

    decoding      = LM weights x 2 + mapper weights x 4
                  + KV cache                     layers x 2 x kv_heads x head_dim x positions x sequences x 2,
                                                 and one layer more (reordering copies a layer at a time)
                  + beam search's vocabulary     sequences x vocabulary x (5 x 4 + 2): the 16-bit logits, and
                                                 five fp32 (sequences, vocabulary) tensors alive at once

The frozen LM gets no weight gradients, so autograd keeps none of its linears' inputs: only what the
gradient to the prefix needs (norm inputs, q/k/v, softmax or SDPA output, activation inputs).
`tests/test_memory.py` checks per_layer against the bytes autograd saves on the CPU and the parameter
counts against transformers' models built on the meta device. The step is counted as eager PyTorch runs it
(a compiled step may keep less). A GPU's kernels, the caching allocator's slack and fragmentation come on
top: the figures are a floor to plan with, not a promise. A GPU fits a training step (or decoding) when its
figure plus CONTEXT_GIB of CUDA context fits the GPU's nominal memory.

Calibration: the same arithmetic in fp32 is printed against the CPU peaks that `python -m benchmarks
--only train` measured (benchmarks/results/, BENCHMARKS.md), which also hold the Python process, its
libraries and the allocator's slack.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from benchmarks.workload import PROJECT, TOKENS
from pipeline.core.config import Config, load_config

GIB = 2**30
CONTEXT_GIB = 1.0  # the CUDA context and kernels, about 1 GiB on a recent GPU
LOSS_CHUNK = 256  # positions per chunk of the frozen-head loss (pipeline/models/viclipcap/loss.py CHUNK)
EMBEDDING_DIM = 512  # CLIP ViT-B/32's image embedding
GPUS = (("T4", 16, "fp16"), ("L4", 24, "bf16"), ("A100", 40, "bf16"), ("H100", 80, "bf16"))  # nominal GiB


@dataclass(frozen=True)
class LmShape:
    """A causal LM's shape, from its published config: what the arithmetic needs, nothing else."""

    name: str
    config: str  # the Hugging Face config the numbers come from
    family: Literal["gpt2", "qwen2", "llama", "bloom", "mpt"]  # transformers' model_type
    width: int  # W
    layers: int
    heads: int
    kv_heads: int
    intermediate: int  # I: the MLP's hidden width
    vocab: int  # embedding rows
    tied: bool  # the output head is the input embedding
    positions: int = 0  # learned position rows (GPT-2's wpe); 0 for RoPE or ALiBi
    biases: bool = False  # every projection and norm has a bias (LayerNorm, not RMSNorm)
    qkv_bias: bool = False  # q, k and v alone have biases (Qwen2)
    leading_bos: bool = False  # the tokenizer puts <s> first: one more position (Llama)

    @property
    def swiglu(self) -> bool:
        return self.family in ("qwen2", "llama")

    @property
    def eager(self) -> bool:
        """transformers runs BLOOM's and MPT's attention without SDPA: the softmax is kept for the backward."""
        return self.family in ("bloom", "mpt")


LMS = {
    # imthanhlv/gpt2news (the default lm.name) was made by GPT2Config.from_pretrained("gpt2") (its
    # create_config.py): openai-community/gpt2's shape, n_embd 768, n_layer 12, n_head 12, vocab 50257,
    # n_positions 1024, tied; the NlpHUST Vietnamese GPT-2 is the same shape.
    "gpt2-small": LmShape("GPT-2 small (Vietnamese GPT-2s)", "imthanhlv/gpt2news", "gpt2", width=768, layers=12,
                          heads=12, kv_heads=12, intermediate=3072, vocab=50_257, tied=True, positions=1024,
                          biases=True),
    # Qwen/Qwen2.5-0.5B config.json: hidden_size 896, num_hidden_layers 24, num_attention_heads 14,
    # num_key_value_heads 2, intermediate_size 4864, vocab_size 151936, tie_word_embeddings true.
    "qwen2.5-0.5b": LmShape("Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B", "qwen2", width=896, layers=24, heads=14,
                            kv_heads=2, intermediate=4864, vocab=151_936, tied=True, qkv_bias=True),
    # Qwen/Qwen2.5-1.5B config.json: hidden_size 1536, num_hidden_layers 28, num_attention_heads 12,
    # num_key_value_heads 2, intermediate_size 8960, vocab_size 151936, tie_word_embeddings true.
    "qwen2.5-1.5b": LmShape("Qwen2.5-1.5B", "Qwen/Qwen2.5-1.5B", "qwen2", width=1536, layers=28, heads=12,
                            kv_heads=2, intermediate=8960, vocab=151_936, tied=True, qkv_bias=True),
    # bigscience/bloomz-1b7 is bigscience/bloom-1b7 fine-tuned (xP3), same config: hidden_size 2048, n_layer 24,
    # n_head 16, vocab_size 250880, 4 x hidden MLP, embeddings tied (BloomConfig's default), ALiBi.
    "bloomz-1b7": LmShape("bloomz-1b7", "bigscience/bloomz-1b7", "bloom", width=2048, layers=24, heads=16,
                          kv_heads=16, intermediate=8192, vocab=250_880, tied=True, biases=True),
    # vinai/PhoGPT-4B config.json (MPT): d_model 3072, n_layers 32, n_heads 24, expansion_ratio 4,
    # vocab_size 20480, max_seq_len 8192, no_bias false, ALiBi, learned_pos_emb false; MPT ties its head.
    "phogpt-4b": LmShape("PhoGPT-4B", "vinai/PhoGPT-4B", "mpt", width=3072, layers=32, heads=24, kv_heads=24,
                         intermediate=12_288, vocab=20_480, tied=True, biases=True),
    # meta-llama/Llama-2-7b-hf config.json: hidden_size 4096, num_hidden_layers 32, num_attention_heads 32,
    # num_key_value_heads 32, intermediate_size 11008, vocab_size 32000, tie_word_embeddings false. The 7B
    # shape with full multi-head K/V, the KV cache's worst case (Qwen2.5-7B keeps 4 K/V heads of 28).
    "llama-2-7b": LmShape("Llama-2-7B", "meta-llama/Llama-2-7b-hf", "llama", width=4096, layers=32, heads=32,
                          kv_heads=32, intermediate=11_008, vocab=32_000, tied=False, leading_bos=True),
}

# W-wide tensors per layer that attention keeps for the backward (module docstring).
ATTENTION_SAVED = {"gpt2": 6, "qwen2": 4, "llama": 4, "bloom": 3, "mpt": 3}


def parameters(lm: LmShape) -> int:
    """The LM's parameters, from its shape (a tied head counted once)."""
    W, inner = lm.width, lm.intermediate
    q, kv = lm.width, lm.kv_heads * (lm.width // lm.heads)  # query and key/value widths
    norm = 2 * W if lm.biases else W  # LayerNorm's weight and bias, or RMSNorm's (bias-free LayerNorm's) weight
    attention = W * (q + 2 * kv) + q * W + (q + 2 * kv + W if lm.biases else q + 2 * kv if lm.qkv_bias else 0)
    mlp = (3 if lm.swiglu else 2) * W * inner + (inner + W if lm.biases else 0)
    embedding = (lm.vocab + lm.positions) * W + (norm if lm.family == "bloom" else 0)  # BLOOM: a norm after it
    return embedding + lm.layers * (2 * norm + attention + mlp) + norm + (0 if lm.tied else lm.vocab * W)


@dataclass(frozen=True)
class Setup:
    """What a training step and a decoding batch hold: params.yaml's settings (or others, to ask "what if")."""

    mapper: Literal["transformer", "mlp"]
    prefix_length: int
    clip_length: int  # Transformer mapper: the tokens CLIP's embedding is projected to
    mapper_layers: int
    mapper_heads: int
    batch: int  # captions a training step
    caption_tokens: int  # the longest caption in a batch, the stop included
    images: int  # images decoded at once
    beams: int
    max_length: int  # caption tokens decoding may run to

    @classmethod
    def from_params(cls, config: Config) -> Setup:
        m = config.mapper
        return cls(m.type, m.prefix_length, m.clip_length, m.num_layers, m.num_heads,
                   config.train.viclipcap.batch_size, TOKENS[1], config.score.batch_size, config.score.beam_size,
                   config.score.max_length)


def mapper_parameters(setup: Setup, width: int) -> int:
    """The mapper's trained parameters in front of an LM `width` wide (pipeline/models/viclipcap/mapper.py)."""
    W, k = width, setup.prefix_length
    if setup.mapper == "mlp":  # 512 -> k W / 2 -> k W
        hidden = k * W // 2
        return EMBEDDING_DIM * hidden + hidden + hidden * k * W + k * W
    # project 512 -> c W; k learned constants; each layer: attention 4 W^2 + 4 W, feed-forward (2 W) 4 W^2 + 3 W,
    # two LayerNorms 4 W
    layer = 8 * W * W + 11 * W
    return (EMBEDDING_DIM + 1) * setup.clip_length * W + k * W + setup.mapper_layers * layer


def activation_bytes_per_layer(lm: LmShape, positions: int, dtype_bytes: int) -> int:
    """Bytes a frozen LM layer keeps for the backward, per token (module docstring: per_layer)."""
    a, W = dtype_bytes, lm.width
    attention = ATTENTION_SAVED[lm.family] * W * a
    if lm.eager:  # the fp32 softmax, and under autocast the 16-bit copy the value product reads
        attention += lm.heads * positions * (4 + (a if a < 4 else 0))
    else:  # SDPA's log-sum-exp
        attention += lm.heads * 4
    return 2 * W * 4 + attention + (3 if lm.swiglu else 1) * lm.intermediate * a


@dataclass(frozen=True)
class Estimate:
    """Bytes, by what holds them."""

    lm_parameters: int
    mapper_parameters: int
    weights: int  # the frozen LM's, in the dtype asked for
    mapper_state: int
    activations: int  # the LM's and the mapper's, the backward's working set included
    loss: int
    kv_cache: int
    beam_vocabulary: int

    @property
    def train(self) -> int:
        return self.weights + self.mapper_state + self.activations + self.loss

    @property
    def decode(self) -> int:
        return self.weights + 4 * self.mapper_parameters + self.kv_cache + self.beam_vocabulary


def estimate(lm: LmShape, setup: Setup, dtype_bytes: int = 2) -> Estimate:
    """The arithmetic of the module docstring for `lm`: dtype_bytes 2 for a GPU's 16-bit policy, 4 for fp32."""
    a = dtype_bytes
    sixteen = a == 2
    lm_params, map_params = parameters(lm), mapper_parameters(setup, lm.width)
    W = lm.width
    positions = lm.leading_bos + setup.prefix_length + setup.caption_tokens
    tokens = setup.batch * positions
    layer = activation_bytes_per_layer(lm, positions, a)
    final_norms = (2 if lm.family == "bloom" else 1) * W * 4  # the final norm's input (and BLOOM's embedding norm's)
    lm_activations = tokens * (lm.layers * layer + final_norms) + tokens * layer  # + the backward's working set
    if setup.mapper == "transformer":
        mapper_positions = setup.clip_length + setup.prefix_length
        per_token = 10 * W * 4 + setup.mapper_heads * mapper_positions * 4
        mapper_activations = setup.batch * mapper_positions * setup.mapper_layers * per_token
    else:  # the input and the tanh's output (the second linear's input)
        mapper_activations = setup.batch * (EMBEDDING_DIM + setup.prefix_length * W // 2) * 4
    sequences = setup.images * setup.beams
    cache_positions = lm.leading_bos + setup.prefix_length + setup.max_length
    kv_layer = 2 * lm.kv_heads * (W // lm.heads) * cache_positions * sequences * a
    return Estimate(
        lm_parameters=lm_params,
        mapper_parameters=map_params,
        weights=lm_params * a,
        mapper_state=map_params * (16 + (2 if sixteen else 0)),
        activations=lm_activations + mapper_activations,
        loss=LOSS_CHUNK * lm.vocab * (8 + (2 if sixteen else 0)),
        kv_cache=kv_layer * (lm.layers + 1),
        beam_vocabulary=sequences * lm.vocab * (5 * 4 + a),
    )


def fits(estimate: Estimate, gib: float) -> tuple[bool, bool]:
    """Whether the training step and decoding, each with CONTEXT_GIB of CUDA context, fit `gib` GiB."""
    room = (gib - CONTEXT_GIB) * GIB
    return estimate.train <= room, estimate.decode <= room


def verdict(nbytes: int, gib: float) -> str:
    """✓ fits, ≈ fits with under 10% of the GPU to spare (within these estimates' error), ✗ does not."""
    used = nbytes + CONTEXT_GIB * GIB
    return "✓" if used <= 0.9 * gib * GIB else "≈" if used <= gib * GIB else "✗"


def _gib(n: int) -> str:
    return f"{n / GIB:.1f}"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def table(setup: Setup, lms: dict[str, LmShape] = LMS) -> str:
    """The Markdown table: one row per LM, GiB, 16-bit weights (T4's fp16 is the same bytes as bf16)."""
    gpus = " | ".join(f"{name} {gib} GB ({dtype}): train / decode" for name, gib, dtype in GPUS)
    lines = [f"| LM (config) | LM parameters | mapper parameters | frozen weights 16-bit | frozen weights fp32 "
             f"| training step 16-bit | decoding 16-bit | {gpus} |",
             "|" + "---|" * (7 + len(GPUS))]
    for lm in lms.values():
        half, full = estimate(lm, setup, 2), estimate(lm, setup, 4)
        cells = [f"{verdict(half.train, gib)} / {verdict(half.decode, gib)}" for _, gib, _ in GPUS]
        lines.append(f"| {lm.name} (`{lm.config}`) | {_count(half.lm_parameters)} | {_count(half.mapper_parameters)} "
                     f"| {_gib(half.weights)} | {_gib(full.weights)} | {_gib(half.train)} | {_gib(half.decode)} "
                     f"| {' | '.join(cells)} |")
    return "\n".join(lines)


def preamble(setup: Setup) -> str:
    mapper = (f"ClipCap's Transformer mapper ({setup.mapper_layers} layers, clip length {setup.clip_length}, "
              f"prefix {setup.prefix_length})" if setup.mapper == "transformer"
              else f"ClipCap's MLP mapper (prefix {setup.prefix_length})")
    return (
        "**Estimates from arithmetic, not measurements** (GiB, 2^30 bytes; formula in the docstring of "
        "`benchmarks/memory.py`). Frozen LM weights held in 16-bit (bf16; fp16 on a T4, the same bytes), no "
        "gradients or optimiser state for the LM; the mapper trains in fp32 with AdamW. "
        f"Mapper: {mapper}, in front of each LM at that LM's width. "
        f"Training step: {setup.batch} captions of {setup.prefix_length} prefix + {setup.caption_tokens} caption "
        f"positions (Llama: +1 for <s>); kept for the backward: each layer's norm inputs, attention's q/k/v (and "
        f"softmax or SDPA output), the MLP activation's inputs, none of the linears' inputs; the frozen-head loss "
        f"{LOSS_CHUNK} positions of logits at a time. Decoding: {setup.images} images x beam {setup.beams} = "
        f"{setup.images * setup.beams} sequences, KV cache up to {setup.prefix_length} + {setup.max_length} "
        f"positions. A GPU fits (train / decode) when the figure plus {CONTEXT_GIB:.0f} GiB of CUDA context fits "
        "its nominal memory (≈: with under 10% to spare); allocator slack and kernel workspaces come on top."
    )


# The fp32 CPU training peaks `python -m benchmarks --only train --lm NAME` measured (BENCHMARKS.md, 2026-12-06).
MEASURED = {lm: PROJECT / f"benchmarks/results/cpu-amd-epyc-2-threads-2026-12-06-{lm}.json"
            for lm in ("gpt2-small", "qwen2.5-0.5b")}


def measured_peak(path: Path) -> tuple[str, int]:
    """(the LM it ran, viclip's training peak in bytes) from a results file: MB there are MiB (ru_maxrss / 1024)."""
    result = json.loads(path.read_text())
    row = next(r for r in result["rows"] if r["stage"] == "train" and r["measure"] == "peak memory")
    return result["machine"]["lm"], round(row["viclip"] * 2**20)


def calibration(setup: Setup) -> list[str]:
    """The fp32 arithmetic against the CPU peaks measured at the same setup (fp32 weights, batch 40)."""
    lines = []
    for path in MEASURED.values():
        name, peak = measured_peak(path)
        ours = estimate(LMS[name], setup, 4).train
        lines.append(f"- {LMS[name].name}, fp32 training step: estimate {_gib(ours)} GiB, measured peak "
                     f"{_gib(peak)} GiB ({peak / 2**20:,.0f} MB, `{path.relative_to(PROJECT)}`): the arithmetic "
                     f"is {ours / peak:.0%} of the measurement.")
    return ["Calibration against measurements (CPU, fp32; the process's peak resident set, which also holds "
            "Python and its libraries, the data, the allocator's slack, and what the CPU's attention kernels keep "
            "beyond the formula's):", *lines]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mapper", choices=("transformer", "mlp"), help="the mapper (default: params.yaml's)")
    parser.add_argument("--prefix-length", type=int, help="prefix positions (default: params.yaml's)")
    args = parser.parse_args(argv)
    setup = Setup.from_params(load_config(PROJECT / "params.yaml"))
    calibrated = setup  # the measured runs used params.yaml's mapper
    setup = dataclasses.replace(setup, **{key: value for key, value in
                                          (("mapper", args.mapper), ("prefix_length", args.prefix_length))
                                          if value is not None})
    print(preamble(setup), "", table(setup), "", *calibration(calibrated), sep="\n")


if __name__ == "__main__":
    main()
