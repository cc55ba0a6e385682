"""The frozen LM as real checkpoints behave: it never learned end-of-text, its tokenizer and embedding
matrix differ in size, it may be saved in half precision, and a model directory only loads with the LM
it was trained against."""

from __future__ import annotations

import json
import shutil
from contextlib import chdir

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from transformers.activations import NewGELUActivation

from pipeline.core import paths
from pipeline.core.config import dump_config, load_config
from pipeline.core.errors import ViclipError
from pipeline.data.datasets import load_splits
from pipeline.data.features import open_store
from pipeline.decoding.beam import beam_search
from pipeline.demo import mean_length
from pipeline.demo.synthetic import caption_groups
from pipeline.demo.tiny import make_tiny_lm, news_documents
from pipeline.models import load_model
from pipeline.models.viclipcap import Captioner
from pipeline.models.viclipcap.lm import load_lm
from tests.conftest import invoke

CPU = torch.device("cpu")


def use_lm(project, directory, stop=".") -> None:
    params = load_config(project / "params.yaml").model_dump()
    params["lm"].update(name=str(directory), stop=stop)
    (project / "params.yaml").write_text(dump_config(params))


def test_the_tiny_lm_learned_sentences_not_end_of_text(tiny, tiny_config):
    """The stand-in has a real news LM's quirk: nothing in its pre-training ended with end-of-text."""
    lm = load_lm(tiny_config.lm.name, None, CPU)
    documents = news_documents(caption_groups(tiny_config.data.root))
    specials = set(lm.tokenizer.all_special_tokens)
    assert not any(token in document for document in documents for token in specials)
    assert documents[0].endswith(". ") and documents[0].count(". ") == 3

    dot = load_lm(str(tiny / tiny_config.lm.name), ".", CPU).stop_id
    ids = torch.tensor([lm.tokenizer("có một hình tròn màu đỏ ở bên trái", add_special_tokens=False)["input_ids"]])
    following = lm.model(input_ids=ids).logits[0, -1].softmax(-1)
    assert following[dot] > 0.3 and following[lm.stop_id] < 1e-3, (following[dot], following[lm.stop_id])


def test_captions_stop_with_an_lm_that_never_saw_end_of_text(demo, config):
    """The demo's ViCLIPCap (lm.stop ".") stops, at about the references' length."""
    metrics = json.loads((demo / "artifacts/metrics/viclipcap.json").read_text())
    assert metrics["unfinished"] <= 0.05 * metrics["images"]
    captions = json.loads((demo / "artifacts/metrics/viclipcap.captions.json").read_text())
    with chdir(demo):
        references = load_splits(config.data)["test"]
    ours = mean_length(c["caption"] for c in captions)
    theirs = mean_length(c for r in references for c in r.captions)
    assert theirs / 1.5 <= ours <= 1.5 * theirs, (ours, theirs)
    assert not any(c["caption"].endswith(".") for c in captions)  # the stop is removed from the output


def test_waiting_for_end_of_text_never_stops(demo, config, tmp_path):
    """Why lm.stop exists: the same LM trained to end on its end-of-text token (lm.stop null) runs on."""
    from pipeline.core.config import parse_config
    from pipeline.decoding.beam import caption_features
    from stages import train

    raw = config.model_dump()
    raw["lm"]["stop"] = None
    raw["train"]["viclipcap"].update(epochs=5, patience=5)
    raw["train"]["out"] = str(tmp_path)
    with chdir(demo):
        train.run(parse_config(raw))
        model, _ = load_model(tmp_path / "viclipcap", CPU)
        features = torch.from_numpy(open_store(paths.store_path(config, "test"), {}).embeddings[:16])
    captions = caption_features(model, features, config.score)
    assert captions.unfinished >= 12, captions


@pytest.mark.parametrize("stop", ["hình tròn", ".!"])
def test_a_stop_text_of_more_than_one_token_is_refused(tiny, tiny_config, stop):
    with pytest.raises(ViclipError, match="exactly one token"):
        load_lm(str(tiny / tiny_config.lm.name), stop, CPU)


def test_a_caption_ending_with_the_stop_gets_it_once(tiny, tiny_config):
    lm = load_lm(str(tiny / tiny_config.lm.name), ".", CPU)
    plain, ended, spaced = lm.encode(["có một hình tròn", "có một hình tròn.", "có một hình tròn ."])
    assert plain == ended == spaced and plain[-1] == lm.stop_id and plain.count(lm.stop_id) == 1
    assert lm.decode(plain) == "có một hình tròn"


@pytest.mark.parametrize("convention, eos", [("gpt2news", "</s>"), ("nlphust", "<|endoftext|>")])
def test_the_vocabularys_own_end_of_text_beats_one_the_tokenizer_made_up(tmp_path, convention, eos):
    directory = make_tiny_lm([["có một hình tròn màu đỏ", "một hình tròn đỏ"]] * 10, tmp_path, convention, steps=1)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["eos_token"] = "<eos>"  # a token the vocabulary lacks: the tokenizer adds it, past its own ids
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    lm = load_lm(str(directory), None, CPU)
    assert len(lm.tokenizer) < lm.vocab_size  # the padded matrix has a row for the invented token's id
    assert lm.tokenizer.convert_ids_to_tokens(lm.stop_id) == eos


def boosted_lm(demo, config, tmp_path):
    """The demo's LM with every banned row (special tokens, rows past the tokenizer) made the likeliest
    next token: with tied embeddings, a row along the LM's typical last hidden state, scaled up,
    outscores every other row wherever the hidden state looks typical."""
    lm = load_lm(str(demo / config.lm.name), ".", CPU)
    model = AutoModelForCausalLM.from_pretrained(demo / config.lm.name)
    with torch.no_grad():
        ids = torch.tensor([lm.encode(["có hai hình vuông màu vàng ở bên phải của bức ảnh"])[0]])
        typical = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0].mean(0)
        model.get_input_embeddings().weight[list(lm.banned_ids)] = 50 * typical / typical.norm() ** 2
    model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    return load_lm(str(tmp_path), ".", CPU)


@torch.inference_mode()
def test_special_tokens_and_unmapped_rows_are_never_produced(demo, config, tmp_path):
    lm = boosted_lm(demo, config, tmp_path)
    banned = set(lm.banned_ids)
    tokenizer_ids = set(lm.tokenizer.get_vocab().values())
    assert set(lm.tokenizer.all_special_ids) - {lm.stop_id} <= banned
    assert set(range(lm.vocab_size)) - tokenizer_ids <= banned and len(tokenizer_ids) < lm.vocab_size
    with chdir(demo):
        trained, _ = load_model(paths.model_dir(config), CPU)
        features = torch.from_numpy(open_store(paths.store_path(config, "test"), {}).embeddings[:8])
    captioner = Captioner(trained.mapper, lm)
    produced = {t for tokens in beam_search(captioner, features, 3, 12, 1.0).tokens for t in tokens}
    assert produced and not produced & banned

    captioner.banned_ids = ()  # the same search without the mask: the boosted rows win, so the mask is what held
    unmasked = {t for tokens in beam_search(captioner, features, 3, 12, 1.0).tokens for t in tokens}
    assert unmasked & banned


def test_a_half_precision_lm_checkpoint_trains_and_decodes_in_fp32(tiny, project, tmp_path):
    half = tmp_path / "lm-bf16"
    model = AutoModelForCausalLM.from_pretrained(tiny / "models/lm", dtype=torch.bfloat16)
    model.save_pretrained(half)
    load_lm(str(tiny / "models/lm"), ".", CPU).tokenizer.save_pretrained(half)
    assert next(iter(load_file(str(half / "model.safetensors")).values())).dtype == torch.bfloat16

    lm = load_lm(str(half), ".", CPU)
    assert {p.dtype for p in lm.model.parameters()} == {torch.float32}
    use_lm(project, half)
    for command in ("extract", "train", "score"):
        result = invoke(command)
        assert result.exit_code == 0, (command, result.output)


def test_an_lm_that_does_not_match_the_model_directory_is_refused(tiny, project):
    local = project / "lm"
    shutil.copytree(tiny / "models/lm", local)
    use_lm(project, local)
    assert invoke("extract").exit_code == 0 and invoke("train").exit_code == 0
    recorded = json.loads((project / "artifacts/models/viclipcap/config.json").read_text())["fingerprints"]["lm"]
    assert recorded["stop"] == "." and recorded["embedding_rows"] % 64 == 0

    # The same path now holds another LM (a new download, another revision): another tokenizer.
    shutil.rmtree(local)
    make_tiny_lm([["một hình vuông màu xanh", "hai hình tròn"]] * 40, local, steps=1)  # more text than one 128-token block
    for args in (("score",), ("caption", str(project / "ktvic/public-test-images/100000.jpg"))):
        result = invoke(*args)
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert "trained against another lm" in result.output and "tokenizer was" in result.output


def test_loaded_lms_have_fused_activations_and_the_stock_models_outputs_and_gradients(tmp_path):
    directory = make_tiny_lm([["có một hình tròn màu đỏ", "một hình tròn đỏ"]] * 10, tmp_path, steps=20)
    ours = load_lm(str(directory), ".", CPU).model
    stock = AutoModelForCausalLM.from_pretrained(directory).eval()
    assert not any(isinstance(m, NewGELUActivation) for m in ours.modules())
    assert sum(isinstance(m, NewGELUActivation) for m in stock.modules()) == stock.config.n_layer
    inputs = 3 * torch.randn(2, 7, stock.config.n_embd)  # wide activations: GELU's tails and its middle
    results = []
    for model in (ours, stock):
        embeds = inputs.clone().requires_grad_(True)
        logits = model(inputs_embeds=embeds).logits
        (logits.logsumexp(-1).sum()).backward()
        results.append((logits, embeds.grad))
    (ours_logits, ours_grad), (stock_logits, stock_grad) = results
    assert torch.allclose(ours_logits, stock_logits, rtol=1e-5, atol=1e-5)
    assert torch.allclose(ours_grad, stock_grad, rtol=1e-4, atol=1e-6)
