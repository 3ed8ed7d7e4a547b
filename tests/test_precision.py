"""Precision names and the ``auto`` rule: one place, resolved per device (no GPU needed to test it)."""

from __future__ import annotations

import typing
import warnings

import pytest

from vqpipe.config import ConfigError, ModelConfig, load_config
from vqpipe.encode import precision
from vqpipe.encode.precision import resolve


@pytest.mark.parametrize("requested, device, force_upcast, bf16, expected", [
    ("auto", "cuda", False, True, "fp16"),  # fp16 keeps 3 more mantissa bits than bf16 at the same speed
    ("auto", "cuda", True, True, "bf16"),  # the checkpoint says fp16 overflows
    ("auto", "cuda", True, False, "fp32"),  # ... and the GPU has no bf16
    ("auto", "cpu", False, True, "fp32"),
    ("auto", "cpu", True, True, "fp32"),
    ("tf32", "cuda", False, True, "tf32"),
    ("tf32", "cpu", False, True, "fp32"),  # TF32 is a CUDA tensor-core mode
    ("bf16", "cuda", False, False, "fp32"),
    ("bf16", "cpu", False, True, "bf16"),
    ("fp16", "cpu", False, True, "fp16"),
    ("fp32", "cuda", True, True, "fp32"),
])
def test_auto_rule_per_device_and_checkpoint(requested, device, force_upcast, bf16, expected):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve(requested, device, force_upcast, bf16) == expected


def test_explicit_fp16_on_a_force_upcast_checkpoint_warns_and_uses_bf16():
    with pytest.warns(UserWarning, match="force_upcast"):
        assert resolve("fp16", "cuda", force_upcast=True) == "bf16"


def test_unknown_precision_is_refused_by_name():
    with pytest.raises(ValueError, match="precision='fp8'"):
        resolve("fp8", "cpu", False)


def test_the_config_takes_exactly_the_precision_names(tmp_path):
    hints = typing.get_type_hints(ModelConfig)
    assert typing.get_args(hints["precision"]) == ("auto", *precision.NAMES)
    path = tmp_path / "c.yaml"
    path.write_text("input: {urls: x.tar}\nmodel: {path: demo}\noutput: {path: out}\n")
    assert load_config(path, ["model.precision=tf32"]).model.precision == "tf32"
    with pytest.raises(ConfigError, match="model.precision = 'fp8'"):
        load_config(path, ["model.precision=fp8"])
    with pytest.raises(ConfigError, match="model.min_code_agreement"):
        load_config(path, ["model.min_code_agreement=1.5"])


def test_dtypes_and_the_fallback_chain():
    import torch

    assert precision.autocast_dtype("fp16") == torch.float16 and precision.autocast_dtype("bf16") == torch.bfloat16
    assert precision.autocast_dtype("fp32") is None and precision.autocast_dtype("tf32") is None
    assert [precision.safer(n) for n in ("fp16", "bf16", "tf32", "fp32")] == ["bf16", "fp32", "fp32", None]


def test_tf32_switches_are_set_for_the_pass_and_restored():
    import torch

    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = matmul.allow_tf32, cudnn.allow_tf32
    with precision.compute("tf32", "cuda"):
        assert matmul.allow_tf32 and cudnn.allow_tf32
    with precision.compute("fp32", "cuda"):
        assert not matmul.allow_tf32 and not cudnn.allow_tf32  # fp32 means IEEE fp32, cuDNN included
    assert (matmul.allow_tf32, cudnn.allow_tf32) == before
    with precision.compute("fp16", "cpu"):
        assert (matmul.allow_tf32, cudnn.allow_tf32) == before  # nothing to switch off CUDA
