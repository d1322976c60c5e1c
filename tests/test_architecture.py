"""The layout promises of the architecture: no prints in the library, honest exit codes. (Function length and
complexity are the linter's, configured in pyproject.toml.)"""
import ast
from pathlib import Path

import pytest

from asl.apps import validate
from asl.cli import run_main

REPO = Path(__file__).resolve().parents[1]


def test_library_code_does_not_print():
    for path in sorted((REPO / "src/asl").rglob("*.py")):
        if "apps" in path.parts or path.name == "cli.py":  # the command-line side prints by design
            continue
        calls = [n for n in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                 if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "print"]
        assert not calls, path


def test_a_bug_inside_an_app_shows_its_traceback_and_exits_1(monkeypatch, tmp_path, capsys):
    def broken(*args, **kwargs):
        raise ValueError("an internal inconsistency")

    (tmp_path / "m.pth").write_bytes(b"")
    monkeypatch.setattr(validate, "load_model", broken)
    assert run_main(validate.main, [str(tmp_path), "--model-path", str(tmp_path / "m.pth"), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "ValueError: an internal inconsistency" in err


def test_bad_input_to_an_app_is_one_line_and_exits_2(tmp_path, capsys):
    assert validate.main([str(tmp_path / "missing"), "--model-path", "m.pth"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"validate.py: error: data directory not found: {tmp_path / 'missing'}"]


@pytest.mark.parametrize("flag", ["--batch-size", "--batch_size"])
def test_range_checks_are_flag_types(flag, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        validate.build_parser().parse_args([str(tmp_path), "--model-path", "m.pth", flag, "0"])
    assert exc.value.code == 2
    assert "expected an integer >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("app, extra", [("validate", ["DATA"]), ("infer", ["--pic-path", "x.jpg"]), ("export", [])])
def test_an_empty_model_path_is_one_line_in_every_app(app, extra, capsys):
    import importlib

    module = importlib.import_module(f"asl.apps.{app}")
    assert module.main([*extra, "--model-path", ""]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{app}.py: error: argument --model-path")
    assert "expected a model source: a checkpoint file, a folder, hf-hub:ORG/NAME or an http(s) URL" in err[0]


@pytest.mark.parametrize("value", ["2", "nan", "-0.1"])
def test_infer_threshold_is_a_probability(value, capsys):
    from asl.apps import infer

    with pytest.raises(SystemExit):
        infer.build_parser().parse_args(["--model-path", "m.pth", "--pic-path", "x.jpg", "--th", value])
    assert "within [0, 1]" in capsys.readouterr().err


def test_validate_output_json_is_checked_before_the_run(tmp_path, capsys):
    assert validate.main([str(tmp_path), "--model-path", "m.pth", "--output-json", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_image_size_has_an_upper_bound(capsys):
    from asl.apps import train

    with pytest.raises(SystemExit):
        train.build_parser().parse_args(["DATA", "--image-size", "100000"])
    assert "expected at most 4096 pixels, got 100000" in capsys.readouterr().err


@pytest.mark.faults
def test_programs_turn_on_mkl_reproducibility_before_torch_and_respect_the_user(run_script):
    code = "import sys, asl.apps, os; print(os.environ['MKL_CBWR'], 'torch' in sys.modules)"
    default = run_script(["-c", code], unset=["MKL_CBWR"])
    assert default.stdout.split() == ["AUTO", "False"]  # set before torch was imported
    chosen = run_script(["-c", code], env={"MKL_CBWR": "OFF"})
    assert chosen.stdout.split()[0] == "OFF"
