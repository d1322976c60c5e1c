"""Evaluation precision: fp32 by default in validate.py and infer.py (the original has no autocast there),
AMP in training, one flag spelling everywhere."""
import argparse
from pathlib import Path

import pytest
import torch

from asl.precision import amp_dtype_arg, autocast, cpu_has_native_bf16, resolve_amp_dtype

REPO = Path(__file__).resolve().parents[1]


from asl.apps import infer  # noqa: E402
from asl.apps import train  # noqa: E402
from asl.apps import validate  # noqa: E402


@pytest.mark.parametrize("module, default", [(validate, None), (infer, None), (train, torch.float16)])
def test_defaults_fp32_for_evaluation_and_fp16_amp_for_training_on_cuda(module, default):
    if module is infer:
        args = module.build_parser().parse_args(["--model-path", "m.pth", "--pic-path", "x.jpg"])
    elif module is validate:
        args = module.build_parser().parse_args(["DATA", "--model-path", "m.pth"])
    else:
        args = module.build_parser().parse_args(["DATA"])
    assert resolve_amp_dtype(args.amp_dtype, torch.device("cuda")) is default
    assert resolve_amp_dtype(args.amp_dtype, torch.device("cpu")) is None


@pytest.mark.parametrize("name, dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_an_explicit_dtype_applies_on_the_cpu_too(name, dtype):
    assert resolve_amp_dtype(name, torch.device("cpu")) is dtype


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16\n")
    assert cpu_has_native_bf16(info) is True
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2\n")
    assert cpu_has_native_bf16(info) is False
    info.write_text("Features\t: fp asimd bf16\n")
    assert cpu_has_native_bf16(info) is True
    assert cpu_has_native_bf16(tmp_path / "absent") is None


def test_bf16_on_a_cpu_without_it_says_so(monkeypatch, caplog):
    import asl.precision as precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level("WARNING"):
        assert resolve_amp_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16
    assert "without native bf16" in caplog.text


@pytest.mark.parametrize("module", [validate, infer, train])
@pytest.mark.parametrize("flag", ["--amp-dtype", "--amp_dtype"])
def test_reduced_precision_is_the_same_opt_in_flag_everywhere(module, flag):
    base = {infer: ["--model-path", "m.pth", "--pic-path", "x.jpg"], validate: ["DATA", "--model-path", "m.pth"],
            train: ["DATA"]}[module]
    args = module.build_parser().parse_args(base + [flag, "bfloat16"])
    assert resolve_amp_dtype(args.amp_dtype, torch.device("cuda")) is torch.bfloat16


def test_flag_values():
    assert amp_dtype_arg("fp32") == amp_dtype_arg("none") == "none"
    assert amp_dtype_arg("FP16") == "float16"
    with pytest.raises(argparse.ArgumentTypeError):
        amp_dtype_arg("int8")


def test_no_amp_dtype_means_no_autocast():
    x = torch.rand(4, 4)
    with autocast(torch.device("cpu"), None):
        assert not torch.is_autocast_enabled("cpu")
        assert (x @ x).dtype == torch.float32
    with autocast(torch.device("cpu"), torch.bfloat16):
        assert (x @ x).dtype == torch.bfloat16


def test_infer_keeps_the_old_no_amp_spelling():
    args = infer.build_parser().parse_args(["--model-path", "m.pth", "--pic-path", "x.jpg", "--no-amp"])
    assert resolve_amp_dtype(args.amp_dtype, torch.device("cuda")) is None
