"""The precision policy for every GPU a user has, decided by compute capability (faked here), and
the fp16 path with its gradient scaler, run on the CPU."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pipeline.core import devices
from pipeline.core.errors import ViclipError
from pipeline.training import optimisation
from tests.conftest import invoke

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def no_override(monkeypatch):
    """The policy itself, whatever VICLIP_PRECISION the shell running the tests has set."""
    monkeypatch.delenv("VICLIP_PRECISION", raising=False)


@pytest.mark.parametrize("capability, policy", [
    ((9, 0), "bf16"),  # H100
    ((8, 0), "bf16"),  # A100
    ((8, 6), "bf16"),  # RTX 30
    ((7, 5), "fp16"),  # T4: is_bf16_supported() says True there, through emulation
    ((7, 0), "fp16"),  # V100
    ((6, 0), "fp32"),  # P100
])
def test_the_policy_follows_compute_capability_not_is_bf16_supported(monkeypatch, capability, policy):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert devices.precision(CUDA) == policy


def test_extraction_follows_the_policy_on_a_gpu_and_stays_fp32_on_the_cpu(monkeypatch):
    from pipeline.encoders.base import encoding_precision

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert encoding_precision(CUDA) == "fp16"
    monkeypatch.setattr(devices, "native_bf16", lambda device: True)
    assert encoding_precision(torch.device("cpu")) == "fp32"


@pytest.mark.parametrize("probes, policy", [((False, False), "fp32"), ((True, False), "bf16"), ((False, True), "bf16")])
def test_a_cpu_gets_bf16_only_with_avx512_bf16_or_amx(monkeypatch, probes, policy):
    avx512, amx = probes
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert devices.precision(torch.device("cpu")) == policy


@pytest.mark.parametrize("value", ["fp32", "bf16", "fp16"])
def test_viclip_precision_overrides_the_policy(monkeypatch, value):
    monkeypatch.setattr(devices, "native_bf16", lambda device: True)  # the policy alone would say bf16
    monkeypatch.setenv("VICLIP_PRECISION", value)
    assert devices.precision(torch.device("cpu")) == value
    monkeypatch.setenv("VICLIP_PRECISION", "")  # set but empty: the policy
    assert devices.precision(torch.device("cpu")) == "bf16"


def test_a_bad_viclip_precision_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("VICLIP_PRECISION", "float32")
    with pytest.raises(ViclipError, match=r"^VICLIP_PRECISION='float32': expected one of bf16, fp16, fp32$"):
        devices.precision(torch.device("cpu"))


@pytest.mark.parametrize("policy, recorded", [("fp16", "fp16 autocast, gradient scaler"), ("fp32", "fp32")])
def test_training_under_each_policy(project, monkeypatch, policy, recorded):
    """fp16 as on a T4 (autocast, a gradient scaler, clipping after unscaling), here on the CPU."""
    monkeypatch.setattr(optimisation, "precision", lambda device: policy)
    built = []
    real_build = optimisation.Optimisation.build.__func__

    def build(cls, *args):
        built.append(real_build(cls, *args))
        return built[-1]

    monkeypatch.setattr(optimisation.Optimisation, "build", classmethod(build))
    for args in (("extract",), ("extract", "--store", "cnn")):
        assert invoke(*args).exit_code == 0
    for model in ("viclipcap", "cnn_lstm"):  # the baseline clips its gradients: unscaled first
        result = invoke("train", "--model", model)
        assert result.exit_code == 0, result.output
        config = json.loads((project / f"artifacts/models/{model}/config.json").read_text())
        assert config["training"]["precision"] == recorded and math.isfinite(config["training"]["val_loss"])
    assert [o.scaler.is_enabled() for o in built] == [policy == "fp16"] * 2
