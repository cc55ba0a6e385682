"""benchmarks/memory.py's arithmetic against what it estimates: parameter counts against transformers' own models
(built on the meta device, no memory), the mapper against the mapper module, and the bytes a frozen layer keeps
for the backward against what autograd saves on the CPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import (
    AutoModelForCausalLM, BloomConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig, MptConfig, PretrainedConfig,
    Qwen2Config,
)

from benchmarks import memory
from benchmarks.memory import GIB, GPUS, LMS, LmShape, Setup
from pipeline.models.viclipcap.lm import fuse_activations, hold
from pipeline.models.viclipcap.mapper import MLPMapper, TransformerMapper

SETUP = Setup("transformer", prefix_length=40, clip_length=40, mapper_layers=8, mapper_heads=8, batch=40,
              caption_tokens=32, images=64, beams=5, max_length=67)


def hf_config(lm: LmShape) -> PretrainedConfig:
    """transformers' config for `lm`'s shape, as the model's config.json on the hub states it."""
    W, L, H = lm.width, lm.layers, lm.heads
    if lm.family == "gpt2":
        return GPT2Config(n_embd=W, n_layer=L, n_head=H, n_inner=lm.intermediate, vocab_size=lm.vocab,
                          n_positions=lm.positions, bos_token_id=lm.vocab - 1, eos_token_id=lm.vocab - 1)
    if lm.family in ("qwen2", "llama"):
        config = Qwen2Config if lm.family == "qwen2" else LlamaConfig
        return config(hidden_size=W, num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=lm.kv_heads,
                      intermediate_size=lm.intermediate, vocab_size=lm.vocab, tie_word_embeddings=lm.tied)
    assert lm.intermediate == 4 * W  # transformers' BLOOM and MPT blocks are 4 W wide whatever the config says
    if lm.family == "bloom":
        return BloomConfig(hidden_size=W, n_layer=L, n_head=H, vocab_size=lm.vocab)
    return MptConfig(d_model=W, n_layers=L, n_heads=H, vocab_size=lm.vocab)


def meta_parameters(config: PretrainedConfig) -> int:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())  # a tied weight once


def test_gpt2_small_counts_124_4m_as_transformers_builds_it():
    with torch.device("meta"):
        gpt2 = GPT2LMHeadModel(GPT2Config())
    built = sum(p.numel() for p in gpt2.parameters())
    assert memory.parameters(LMS["gpt2-small"]) == built
    assert abs(built - 124.4e6) / 124.4e6 < 0.01


@pytest.mark.parametrize("name", list(LMS))
def test_parameter_count_matches_transformers_model_on_the_meta_device(name):
    lm = LMS[name]
    if lm.family == "mpt":
        # transformers' MPT has no biases; PhoGPT's own code (no_bias: false) has them in every projection
        # and norm: exact without them, a hair more with.
        assert memory.parameters(dataclasses.replace(lm, biases=False)) == meta_parameters(hf_config(lm))
        assert 0 < memory.parameters(lm) - meta_parameters(hf_config(lm)) < 0.001 * memory.parameters(lm)
    else:
        assert memory.parameters(lm) == meta_parameters(hf_config(lm))


def test_published_parameter_counts():
    assert abs(memory.parameters(LMS["qwen2.5-0.5b"]) - 494e6) / 494e6 < 0.01  # "494M" (Qwen2.5 report)
    assert abs(memory.parameters(LMS["phogpt-4b"]) - 3.7e9) / 3.7e9 < 0.01  # "exactly 3.7B" (PhoGPT README)
    assert abs(memory.parameters(LMS["llama-2-7b"]) - 6.74e9) / 6.74e9 < 0.01


@pytest.mark.parametrize("width", [768, 896, 4096])
def test_mapper_parameters_match_the_mapper_modules(width):
    with torch.device("meta"):
        transformer = TransformerMapper(512, width, prefix_length=40, clip_length=40, num_layers=8, num_heads=8)
        mlp = MLPMapper(512, width, prefix_length=10)
    assert memory.mapper_parameters(SETUP, width) == sum(p.numel() for p in transformer.parameters())
    mlp_setup = dataclasses.replace(SETUP, mapper="mlp", prefix_length=10)
    assert memory.mapper_parameters(mlp_setup, width) == sum(p.numel() for p in mlp.parameters())


def test_weight_bytes_are_parameters_times_the_dtypes_bytes():
    for lm in LMS.values():
        assert memory.estimate(lm, SETUP, 2).weights == 2 * memory.parameters(lm)
        assert memory.estimate(lm, SETUP, 4).weights == 4 * memory.parameters(lm)


def test_what_fits_where():
    t4 = dict((name, gib) for name, gib, _ in GPUS)["T4"]
    llama = memory.estimate(LMS["llama-2-7b"], SETUP, 4)
    assert llama.weights + memory.CONTEXT_GIB * GIB > t4 * GIB  # a 7B LM's fp32 weights alone overflow a T4
    gpt2 = memory.estimate(LMS["gpt2-small"], SETUP, 2)
    assert all(memory.fits(gpt2, gib) == (True, True) for _, gib, _ in GPUS)
    # The default mapper grows as 64 W^2: in front of a 7B LM it is 1.16B trained parameters, and with AdamW its
    # state alone overflows an L4 beside the 16-bit weights.
    assert memory.estimate(LMS["llama-2-7b"], SETUP, 2).mapper_parameters > 1e9
    assert memory.fits(memory.estimate(LMS["llama-2-7b"], SETUP, 2), 24) == (False, False)


def test_the_kv_cache_counts_key_value_heads():
    qwen = LMS["qwen2.5-1.5b"]  # 2 key/value heads of 12
    grouped = memory.estimate(qwen, SETUP, 2).kv_cache
    assert memory.estimate(dataclasses.replace(qwen, kv_heads=qwen.heads), SETUP, 2).kv_cache == 6 * grouped
    positions = SETUP.prefix_length + SETUP.max_length
    assert grouped == (qwen.layers + 1) * 2 * 2 * 128 * positions * SETUP.images * SETUP.beams * 2


def small(lm: LmShape, layers: int) -> LmShape:
    """`lm`'s family at a width a CPU test can run (key/value heads grouped where `lm`'s are)."""
    return dataclasses.replace(lm, width=256, layers=layers, heads=4, kv_heads=4 if lm.kv_heads == lm.heads else 2,
                               intermediate=lm.intermediate * 256 // lm.width, vocab=512,
                               positions=min(lm.positions, 128))


def saved_bytes(lm: LmShape, batch: int, positions: int, dtype: torch.dtype) -> int:
    """Bytes autograd saves through the frozen LM's layers, set up as load_lm sets up an LM: activations
    fused, no gradients, 16-bit weights held (norms in fp32) and autocast where `dtype` is 16-bit; the
    inputs are prefix-like embeddings that need gradients and a padded batch."""
    torch.manual_seed(0)
    model = fuse_activations(AutoModelForCausalLM.from_config(hf_config(lm))).requires_grad_(False).eval()
    hold(model, dtype)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()  # a view keeps its whole storage
        return tensor

    inputs = torch.randn(batch, positions, lm.width, requires_grad=True)
    mask = torch.ones(batch, positions, dtype=torch.long)
    mask[0, -4:] = 0  # a caption shorter than the batch's longest
    with (torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32),
          torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)):
        model.base_model(inputs_embeds=inputs, attention_mask=mask)
    return sum(kept.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["gpt2-small", "qwen2.5-0.5b", "bloomz-1b7", "phogpt-4b", "llama-2-7b"])
def test_layer_activations_match_what_autograd_saves(name, dtype):
    batch, positions = 2, 72
    one, two = (saved_bytes(small(LMS[name], layers), batch, positions, dtype) for layers in (1, 2))
    measured = (two - one) / (batch * positions)  # a layer's bytes per token
    estimated = memory.activation_bytes_per_layer(small(LMS[name], 1), positions, dtype.itemsize)
    assert abs(estimated - measured) / measured < 0.05, (estimated, measured)


def test_calibration_reads_the_measured_peaks_and_the_arithmetic_stays_below_them():
    """A process's peak holds more than the arithmetic counts (Python, libraries, allocator slack), but not
    twice as much: the fp32 estimate lands between half the measured peak and the peak."""
    for key, path in memory.MEASURED.items():
        name, peak = memory.measured_peak(path)
        assert name == key
        ours = memory.estimate(LMS[name], SETUP, 4).train
        assert peak / 2 < ours < peak, (name, ours / GIB, peak / GIB)
    assert memory.measured_peak(memory.MEASURED["gpt2-small"])[1] == round(4985.359375 * 2**20)


def test_command_prints_labelled_estimates_one_row_per_lm(capsys):
    memory.main([])
    out = capsys.readouterr().out
    assert "Estimates from arithmetic, not measurements" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "`" in line]
    assert [row.split("`")[1] for row in rows] == [lm.config for lm in LMS.values()]
    assert out.count("the arithmetic is") == len(memory.MEASURED)


def test_the_readme_table_is_the_commands_and_a_smaller_mapper_needs_less(capsys):
    """README's table is what `python -m benchmarks.memory` prints; `--mapper mlp --prefix-length 10` (also in
    the README) estimates less for every LM, and fits PhoGPT-4B's training on an L4."""
    memory.main([])
    default = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "`" in line]
    assert all(row in memory.PROJECT.joinpath("README.md").read_text() for row in default)
    memory.main(["--mapper", "mlp", "--prefix-length", "10"])
    small = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "`" in line]
    column = 6  # the training step's figure
    assert all(float(s.split("|")[column]) < float(d.split("|")[column]) for s, d in zip(small, default))
    assert "PhoGPT" in small[4] and small[4].split("|")[9].strip().startswith("✓")
