"""Every LM family as the frozen decoder, one code path: GPT-2, Llama, Qwen2, BLOOM and MPT, each a tiny
checkpoint built once for the run with its family's quirks (a sentencepiece tokenizer with byte fallback that
puts <s> first, a chat tokenizer with its special tokens after the vocabulary and more embedding rows than
tokens, ALiBi with no position limit, `max_seq_len`, a bf16-saved checkpoint), pre-trained on running text
with no end-of-text target. Each trains (lora and full) through the real epoch loop, saves and reloads to the
same captions; and as a user runs it, trains (frozen, SCST, retrieval with lora), scores with captions that
stop, captions, and answers through the service."""

from __future__ import annotations

import json
import shutil
from contextlib import chdir
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM, Gemma2Config

from pipeline.core.config import LoraSettings, dump_config, load_config, parse_config
from pipeline.core.errors import ViclipError
from pipeline.decoding.beam import beam_search
from pipeline.demo import demo_params
from pipeline.demo.synthetic import caption_groups
from pipeline.demo.tiny import chat_tokenizer, make_tiny_lm, sentencepiece_tokenizer
from pipeline.models import CONFIG, load_model
from pipeline.models.viclipcap import Captioner
from pipeline.models.viclipcap import captioner as captioner_module
from pipeline.models.viclipcap.lm import LanguageModel, context_length, load_lm, set_up_lm
from pipeline.models.viclipcap.mapper import build_mapper
from pipeline.models.viclipcap.static_steps import StaticSteps
from pipeline.serve import create_app, load_served
from tests.conftest import built_once, invoke, make_project
from tests.test_lm_train import GROUPS, config_for, outputs, save, train

CPU = torch.device("cpu")
FAMILIES = ("llama", "qwen2", "bloom", "mpt")
BLOCK = 128  # the tiny LMs' context (a retrieval prompt fills most of it), which BLOOM's config does not state
LORA = LoraSettings(rank=2, alpha=4, dropout=0.0)


@pytest.fixture(scope="session")
def family_lms(tiny, shared) -> dict[str, Path]:
    """A tiny checkpoint of each family, built once for the run, pre-trained on the demo's captions and the
    unit tests' (GROUPS); Qwen2's saved in bf16, as its hub checkpoints are."""
    def build(folder: Path) -> None:
        texts = GROUPS * 4 + caption_groups(tiny / "data/ktvic")
        for family in FAMILIES:
            make_tiny_lm(texts, folder / family, family=family, steps=80, block=BLOCK,
                         dtype=torch.bfloat16 if family == "qwen2" else torch.float32)

    folder = built_once(shared, "family_lms", build)
    return {family: folder / family for family in FAMILIES}


@pytest.fixture(scope="module")
def extracted(tiny, tmp_path_factory) -> Path:
    """A small project whose feature stores are written."""
    project = make_project(tiny, tmp_path_factory.mktemp("project"))
    with chdir(project):
        assert invoke("extract").exit_code == 0
    return project


def positions(family: str) -> int | None:
    return BLOCK if family == "bloom" else None


def test_each_family_loads_with_its_context_its_first_token_and_its_stop(family_lms):
    seen = {}
    for family, directory in family_lms.items():
        lm = load_lm(str(directory), ".", CPU, max_positions=positions(family))
        assert lm.max_positions == BLOCK and next(lm.model.parameters()).dtype == torch.float32
        assert lm.tokenizer.convert_ids_to_tokens([lm.stop_id]) == ["."]
        # A character no caption had comes back whole: byte-level BPE, or Llama's byte fallback (not <unk>).
        assert lm.decode(lm.tokenizer("ỹ", add_special_tokens=False)["input_ids"]) == "ỹ"
        seen[family] = (lm.bos_id is not None, lm.tokenizer.convert_ids_to_tokens([load_lm(str(directory), None, CPU,
                        max_positions=positions(family)).stop_id])[0])
    # Llama's tokenizer puts <s> before every text; the others none. With lm.stop null, the end of text:
    # Qwen's <|endoftext|>, not its chat eos_token <|im_end|>.
    assert seen == {"llama": (True, "</s>"), "qwen2": (False, "<|endoftext|>"), "bloom": (False, "</s>"),
                    "mpt": (False, "</s>")}


def test_an_lm_whose_config_states_no_context_needs_lm_max_positions(family_lms):
    with pytest.raises(ViclipError) as refused:
        load_lm(str(family_lms["bloom"]), ".", CPU)
    assert str(refused.value) == (f"lm.name {family_lms['bloom']}: its config states no context length (bloom "
                                  "positions have no limit); set lm.max_positions to the length it was trained on")
    llama = load_lm(str(family_lms["llama"]), ".", CPU)
    assert context_length("x", llama.model.config, 64) == 64  # less than the config's, where asked
    assert context_length("x", llama.model.config, 4096) == BLOCK  # never more


def adapted(lm: LanguageModel) -> set[str]:
    return {name.split(".lora_")[0].rsplit(".", 1)[-1] for name, p in lm.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family, targets, other", [
    ("llama", {"q_proj", "v_proj"}, "k_proj"), ("qwen2", {"q_proj", "v_proj"}, "k_proj"),
    ("bloom", {"query_key_value"}, "dense"), ("mpt", {"Wqkv"}, "out_proj"),
])
def test_lora_adapts_each_familys_attention(family_lms, family, targets, other):
    lm = load_lm(str(family_lms[family]), ".", CPU, "lora", LORA, positions(family))
    assert adapted(lm) == targets
    assert lm.adapters.peft_config["default"].fan_in_fan_out is False  # nn.Linear: (out, in), as peft expects
    override = load_lm(str(family_lms[family]), ".", CPU, "lora", LORA.model_copy(update={"targets": [other]}),
                       positions(family))
    assert adapted(override) == {other}
    with pytest.raises(ViclipError, match=r"^lm.lora.targets: .* has no layer named c_attn$"):
        load_lm(str(family_lms[family]), ".", CPU, "lora", LORA.model_copy(update={"targets": ["c_attn"]}),
                positions(family))


def test_a_first_token_the_tokenizer_always_puts_goes_before_the_prefix(family_lms, tmp_path):
    config = config_for(family_lms["llama"], "frozen")
    model, _, _ = train(config, tmp_path, epochs=1)
    embeddings = torch.randn(2, 16)
    bos = model.lm.model.get_input_embeddings().weight[model.lm.bos_id]
    context, _ = model.context(embeddings)
    assert context.shape[1] == 1 + config.mapper.prefix_length and torch.equal(context[0, 0], bos)
    assert model.max_tokens == BLOCK - 1 - config.mapper.prefix_length
    assert model.lm.fingerprint()["bos_id"] == model.lm.bos_id


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_each_family_trains_what_it_should_and_reloads_to_the_same_captions(family_lms, tmp_path, family, mode):
    config = config_for(family_lms[family], mode)
    config = config.model_copy(update={"lm": config.lm.model_copy(update={"max_positions": positions(family)})})
    model, _, before = train(config, tmp_path)
    trained = {name for name, p in model.lm.model.named_parameters() if p.requires_grad}
    assert trained == (set(before) if mode == "full" else {n for n in trained if ".lora_" in n}) and trained
    reloaded, _ = load_model(save(model, config, tmp_path / "model"), CPU)
    ours, theirs = outputs(model, tmp_path), outputs(reloaded, tmp_path)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1]) and ours[2] == theirs[2]


def test_a_stop_text_the_tokenizer_merges_into_some_syllables_is_refused_naming_one_that_works():
    # "phải." is frequent enough to become one piece, and "i." too ("trái." is "▁tr á i."); after "một", the
    # syllable the stop id is first worked out after, "." stays a token of its own. " ." (a piece "▁.")
    # follows every caption as one token.
    texts = ["hình vuông nằm bên phải. ", "hai người phải. ", "hình tròn nằm bên trái . ", "một . "] * 40
    tokenizer = sentencepiece_tokenizer(texts, vocab_size=120, split_punctuation=False)
    assert tokenizer.convert_ids_to_tokens(tokenizer("bên phải.", add_special_tokens=False)["input_ids"])[-1] == "▁phải."
    stop_id = tokenizer("một.", add_special_tokens=False)["input_ids"][-1]
    rows = SimpleNamespace(get_input_embeddings=lambda: SimpleNamespace(num_embeddings=len(tokenizer)))
    lm = LanguageModel("sp", rows, tokenizer, ".", stop_id, (), BLOCK)
    captions = ["hình vuông nằm bên phải.", "hình tròn nằm bên trái."]
    with pytest.raises(ViclipError) as refused:
        lm.check_stop(captions)
    assert str(refused.value) == (
        f"lm.stop '.': the tokenizer of sp joins it to the syllable before in some of the training captions, not as "
        f"token {stop_id}; lm.stop ' .' ends every one as one token")
    # The suggestion works: " ." ends every caption as one token.
    suggested = tokenizer("trái .", add_special_tokens=False)["input_ids"][-1]
    LanguageModel("sp", rows, tokenizer, " .", suggested, (), BLOCK).check_stop(captions)


# What each family runs end to end, in order: the plain model (frozen LM), SCST from it, retrieval with LoRA.
RUNS = (("viclipcap", "frozen"), ("viclipcap_scst", "frozen"), ("viclipcap_rag", "lora"))
SERVED = ("viclipcap", "viclipcap_rag")


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_trains_scores_captions_and_serves_with_captions_that_stop(family_lms, extracted, tmp_path,
                                                                                family, monkeypatch):
    project = tmp_path / "project"
    shutil.copytree(extracted, project)
    monkeypatch.chdir(project)
    params = load_config("params.yaml").model_dump()
    params["lm"].update(name=str(family_lms[family]), max_positions=positions(family))
    params["train"]["viclipcap"]["epochs"] = 3
    for model, mode in RUNS:
        params["lm"]["train"] = mode
        (project / "params.yaml").write_text(dump_config(params))
        for command in ("train", "score"):
            result = invoke(command, "--model", model)
            assert result.exit_code == 0, result.output
        metrics = json.loads((project / f"artifacts/metrics/{model}.json").read_text())
        assert metrics["unfinished"] == 0 and metrics["images"] == 4, (model, metrics)

    image = next((project / "ktvic").rglob("*.jpg"))
    captions = {}
    for model in SERVED:
        result = invoke("caption", "--model", model, "--json", str(image))
        assert result.exit_code == 0, result.output
        captions[model] = json.loads(result.stdout)[0]["caption"]
    with TestClient(create_app(load_served(load_config("params.yaml"), list(SERVED)))) as client:
        response = client.post("/v1/captions", files=[("images", (image.name, image.read_bytes()))])
    assert response.status_code == 200, response.text
    assert response.json()["images"][0]["captions"] == captions and all(captions.values()), captions


def test_an_lm_that_caps_its_logits_is_trained_on_its_own_logits(tmp_path):
    """Gemma 2 soft-caps its logits (tanh(x / c) * c): the frozen-head loss, which applies the head to the
    last hidden state itself, would train against logits the LM never gives."""
    tokenizer = chat_tokenizer([c for group in GROUPS for c in group] * 4)
    config = Gemma2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=BLOCK,
                          final_logit_softcapping=0.01)  # below random weights' logits, so it matters
    torch.manual_seed(0)
    lm = set_up_lm("gemma2", AutoModelForCausalLM.from_config(config), tokenizer, ".", CPU)
    assert not lm.plain_head
    model = Captioner(build_mapper(config_for(Path("unused"), "frozen").mapper, 16, lm.width), lm).eval()
    embeddings = torch.randn(2, 16)
    tokens = torch.tensor(tokenizer(["một hình tròn.", "hai hình vuông xanh."], add_special_tokens=False,
                                    padding=True)["input_ids"])
    mask = tokens != tokenizer.pad_token_id
    with torch.no_grad():
        inputs = torch.cat([model.prefix(embeddings), lm.model.get_input_embeddings()(tokens)], dim=1)
        attention = torch.cat([mask.new_ones(2, model.mapper.prefix_length), mask], dim=1).long()
        out = lm.model(inputs_embeds=inputs, attention_mask=attention, output_hidden_states=True)
        caption = slice(model.mapper.prefix_length - 1, -1)
        own = F.cross_entropy(out.logits[:, caption][mask], tokens[mask])
        uncapped = F.cross_entropy(lm.model.get_output_embeddings()(out.hidden_states[-1][:, caption][mask]), tokens[mask])
        assert torch.allclose(model.loss(embeddings, tokens, mask), own, atol=1e-5)
    assert not torch.allclose(own, uncapped, atol=1e-2)


def test_params_and_model_directories_written_before_the_families_still_load(family_lms, tmp_path):
    raw = demo_params()
    del raw["lm"]["max_positions"], raw["lm"]["lora"]["targets"]
    parsed = parse_config(raw)
    assert parsed.lm.max_positions is None and parsed.lm.lora.targets is None

    config = config_for(family_lms["mpt"], "frozen")  # a family with no first token, as GPT-2 has none
    model, _, _ = train(config, tmp_path, epochs=1)
    directory = save(model, config, tmp_path / "model")
    written = json.loads((directory / CONFIG).read_text())
    del written["sections"]["lm"]["max_positions"], written["sections"]["lm"]["lora"]["targets"]
    assert "bos_id" not in written["fingerprints"]["lm"]
    (directory / CONFIG).write_text(json.dumps(written))
    reloaded, _ = load_model(directory, CPU)
    ours, theirs = outputs(model, tmp_path), outputs(reloaded, tmp_path)
    assert torch.equal(ours[0], theirs[0]) and ours[2] == theirs[2]


def test_decoding_starts_from_the_last_prefix_positions_logits_only(family_lms):
    """The other positions' logits would be (B, P, V): 2.4 GB for BLOOM's vocabulary at batch 64, prefix 40."""
    lm = load_lm(str(family_lms["bloom"]), ".", CPU, max_positions=BLOCK)
    model = Captioner(build_mapper(config_for(Path("unused"), "frozen").mapper, 16, lm.width), lm).eval()
    shapes = []
    lm.model.get_output_embeddings().register_forward_hook(lambda module, inputs, output: shapes.append(output.shape))
    with torch.no_grad():
        first, _ = model.start_decoding(torch.randn(3, 16), 2)
    assert shapes == [(3, 1, lm.vocab_size)] and first.shape[-1] == lm.vocab_size


def stepped_logits(model: Captioner, features: torch.Tensor, beams: int, steps: int) -> list[torch.Tensor]:
    """The first logits and `steps` steps', each step reordering the rows at random (as beams that survive or
    not reorder them, but harder) and feeding random tokens."""
    generator = torch.Generator().manual_seed(2)
    rows = len(features) * beams
    with torch.no_grad():
        first, step = model.start_decoding(features, beams, steps)
        return [first] + [step(torch.randperm(rows, generator=generator),
                               torch.randint(first.shape[-1], (rows,), generator=generator)) for _ in range(steps)]


@pytest.mark.parametrize("family", ["gpt2", *FAMILIES])
def test_each_family_decodes_on_a_static_cache_what_it_decodes_on_a_growing_one(family_lms, tiny, family, monkeypatch):
    """The compiled decoding step's cache (`static_steps`), here uncompiled: each step's logits those of the
    growing cache, and the same captions in fp32; batches of 5 and 7 images padded to 8 share one cache, and a
    4-token limit fills its last position. MPT's transformers class does not compile whole: it keeps the growing
    cache."""
    path = tiny / "models/lm" if family == "gpt2" else family_lms[family]
    lm = load_lm(str(path), ".", CPU, max_positions=positions(family))
    torch.manual_seed(0)
    model = Captioner(build_mapper(config_for(Path("unused"), "frozen").mapper, 16, lm.width), lm).eval()
    features = torch.randn(7, 16, generator=torch.Generator().manual_seed(1))
    runs = [(features[:5], 20), (features, 20), (features[:3], 4)]
    growing = [beam_search(model, batch, 3, length, 1.0) for batch, length in runs]
    growing_logits = stepped_logits(model, features[:5], 3, 6)

    monkeypatch.setattr(captioner_module, "compiling", lambda device: True)
    monkeypatch.setattr(StaticSteps, "compile", lambda steps: steps)
    torch.testing.assert_close(stepped_logits(model, features[:5], 3, 6), growing_logits, rtol=1e-4, atol=1e-4)
    assert [beam_search(model, batch, 3, length, 1.0) for batch, length in runs] == growing
    prefix = model.mapper.prefix_length + (lm.bos_id is not None)
    shapes = [(8, 3, prefix + 6), (8, 3, prefix + 20), (4, 3, prefix + 4)]
    assert list(model.static) == ([] if family == "mpt" else shapes)
