"""train.py, export.py and ablate.py against hostile input: every mistake is one line on stderr and exit code 2,
found before any training or export where it can be.

The data is a generated set of 8 training and 4 validation pictures at 32 px; the network is timm's test_resnet.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from asl.apps import ablate, export, train
from asl.cli import run_main
from asl.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 32


@pytest.fixture(scope="module")
def synthetic(make_synthetic) -> Path:
    return make_synthetic(8, 4, SIZE)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A 6-class test_resnet in the model-zoo format, its architecture and size stored."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "test_resnet.pth"
    torch.save({"model": create_model("timm/test_resnet", 6).state_dict(), "num_classes": 6,
                "model_name": "timm/test_resnet", "image_size": SIZE}, path)
    return path


@pytest.fixture(scope="module")
def finished_run(synthetic, tmp_path_factory) -> Path:
    """The folder of a one-epoch run: last.pth, model-highest.pth, log.txt."""
    out = tmp_path_factory.mktemp("run")
    assert run_main(train.main, train_args(synthetic, out)) == 0
    return out


def train_args(data: Path, out: Path, *extra) -> list[str]:
    return [str(data), "--dataset", "synthetic", "--model-name", "timm/test_resnet", "--image-size", str(SIZE),
            "-b", "4", "-j", "0", "--epochs", "1", "--stop-epoch", "0", "--device", "cpu", "--output-dir", str(out),
            *extra]


def coco_args(data: Path, out: Path, *extra) -> list[str]:
    return train_args(data, out, "--dataset", "coco", "--train-split", "train", "--val-split", "val", *extra)


def one_error_line(capsys, prog: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), lines
    return lines[0]


def last_error_line(capsys, prog: str) -> str:
    """For mistakes found once the run started: its progress lines come first."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"{prog}: error: "), line
    return line


# ----------------------------------------------------------------------------------------------- train.py: data

@pytest.mark.parametrize("kind, words", [
    ("missing", "data directory not found"),
    ("a file", "is a file; give the dataset's folder"),
    ("empty", "COCO annotation file not found"),
    ("truncated json", "is not a usable COCO annotation file (JSONDecodeError"),
    ("not json", "is not a usable COCO annotation file (JSONDecodeError"),
    ("no categories", "has no categories"),
    ("categories not a list", "is not a usable COCO annotation file"),
    ("annotation without id", "is not a usable COCO annotation file (missing or malformed field"),
    ("an array", "is not a usable COCO annotation file (its JSON is an array, not an object)"),
])
def test_a_bad_data_folder_is_one_line(synthetic, tmp_path, kind, words, capsys):
    data = tmp_path / "data"
    annotations = data / "annotations" / "instances_train.json"
    if kind == "a file":
        data.write_text("not a folder")
    elif kind == "empty":
        data.mkdir()
    elif kind != "missing":
        shutil.copytree(synthetic, data)
        whole = annotations.read_text()
        annotations.write_text({
            "truncated json": whole[:len(whole) // 2],
            "not json": "<html>404 Not Found</html>",
            "no categories": json.dumps({"images": [], "annotations": []}),
            "categories not a list": json.dumps({"images": [], "annotations": [], "categories": "cat, dog"}),
            "annotation without id": json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}],
                                                 "annotations": [{"image_id": 1}],
                                                 "categories": [{"id": 1, "name": "a"}]}),
            "an array": "[]",
        }[kind])
    assert run_main(train.main, coco_args(data, tmp_path / "out")) == 2
    line = one_error_line(capsys, "train.py")
    assert words in line and str(data) in line, line


@pytest.mark.parametrize("option, words", [
    ("foo", "--dataset-option expects KEY=VALUE, got 'foo'"),
    ("colour=red", "unknown option(s) for dataset 'synthetic': colour"),
    # Options train.py sets from its own flags: given twice, create_dataset would get two values for one argument.
    ("seed=3", "--dataset-option seed: train.py sets it itself; give --seed instead"),
    ("image-size=16", "--dataset-option image_size: train.py sets it itself; give --image-size instead"),
    ("cache_dir=/tmp/x", "--dataset-option cache_dir: train.py sets it itself; give --cache-dir instead"),
    ("with_index=0", "--dataset-option with_index: train.py sets it itself"),
    ("=1", "--dataset-option expects KEY=VALUE, got '=1' (no key)"),
    # Values the generator cannot draw with: checked before it runs, in terms of the option's name.
    ("num_train=abc", "synthetic option num_train='abc': expected a whole number of at least 0"),
    ("num_val=1.5", "synthetic option num_val=1.5: expected a whole number of at least 0"),
    ("synthetic_size=1", "synthetic option synthetic_size=1: expected a whole number of at least 3"),
])
def test_a_bad_dataset_option_is_one_line(synthetic, tmp_path, option, words, capsys):
    assert run_main(train.main, train_args(synthetic, tmp_path / "out", "--dataset-option", option)) == 2
    assert words in one_error_line(capsys, "train.py")


# ------------------------------------------------------------------------------------------- train.py: flags

@pytest.mark.parametrize("flag, value, words", [
    ("-b", "0", "expected an integer >= 1, got 0"),
    ("-b", "-1", "expected an integer >= 1, got -1"),
    ("--epochs", "0", "expected an integer >= 1, got 0"),
    ("--lr", "0", "expected a learning rate within (0, 1e+30], got 0.0"),
    ("--lr", "-0.5", "expected a learning rate within (0, 1e+30], got -0.5"),
    ("--image-size", "0", "expected an integer >= 1, got 0"),
    ("--image-size", "-32", "expected an integer >= 1, got -32"),
    ("--image-size", "5000", "expected at most 4096 pixels, got 5000"),
    ("--grad-accum-steps", "0", "expected an integer >= 1, got 0"),
    ("--stop-epoch", "-1", "expected an integer >= 0, got -1"),
    ("--amp-dtype", "float8", "expected one of auto, none, float16, bfloat16, got 'float8'"),
    # The data loader seeds a 64-bit generator with --seed + epoch.
    ("--seed", "99999999999999999999", "expected at most 4294967295, got 99999999999999999999"),
    ("--seed", "-1", "expected an integer >= 0, got -1"),
    ("--device", "tpu", "--device 'tpu': expected auto, cpu, cuda or cuda:N"),
])
def test_a_flag_out_of_range_is_one_line(synthetic, tmp_path, flag, value, words, capsys):
    out = tmp_path / "out"
    assert run_main(train.main, train_args(synthetic, out, flag, value)) == 2
    assert words in one_error_line(capsys, "train.py")
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_on_a_machine_without_it_is_one_line(synthetic, tmp_path, capsys):
    assert run_main(train.main, train_args(synthetic, tmp_path / "out", "--device", "cuda")) == 2
    assert one_error_line(capsys, "train.py").endswith("--device cuda: CUDA is not available on this machine "
                                                        "(use --device cpu)")


@pytest.mark.parametrize("extra", [["-b", "4", "--grad-accum-steps", "3"], ["-b", "7"]],
                         ids=["accumulation-leaves-1", "last-batch-of-1"])
def test_a_micro_batch_too_small_for_batchnorm_is_one_line(synthetic, tmp_path, extra, capsys):
    """At 32 px test_resnet's last feature map is 1x1, so one picture gives BatchNorm one value per channel, which
    torch refuses in training. 4 in 3 micro-batches is 2+1+1; 8 pictures in batches of 7 end with one."""
    assert run_main(train.main, train_args(synthetic, tmp_path / "out", *extra)) == 2
    line = last_error_line(capsys, "train.py")
    assert "a micro-batch of 1 picture(s) at 32 px is too small to train BatchNorm" in line
    assert "-b and --grad-accum-steps" in line and "--image-size" in line


def test_a_stop_epoch_beyond_the_schedule_trains_the_schedule(synthetic, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_main(train.main, train_args(synthetic, out, "--epochs", "1", "--stop-epoch", "5")) == 0
    capsys.readouterr()
    assert [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()] == [0]


# ----------------------------------------------------------------------------------------- train.py: output

def test_an_output_dir_that_is_a_file_or_under_one_is_named(synthetic, tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    for out in (blocker, blocker / "run"):
        assert run_main(train.main, train_args(synthetic, out)) == 2
        # The path in the way is named: "File exists" or "Not a directory" alone would leave the user guessing.
        assert one_error_line(capsys, "train.py") == \
            f"train.py: error: output directory is not writable: {out} ({blocker} is a file, not a folder)"


def test_a_read_only_output_dir_is_one_line(synthetic, tmp_path, monkeypatch, capsys):
    out = tmp_path / "ro"
    real = tempfile.NamedTemporaryFile

    def read_only(*args, dir=None, **kwargs):  # as a read-only mount answers (root ignores chmod)
        if Path(dir) == out:
            raise OSError(30, "Read-only file system")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
    assert run_main(train.main, train_args(synthetic, out)) == 2
    assert one_error_line(capsys, "train.py") == \
        f"train.py: error: output directory is not writable: {out} (Read-only file system)"


# ------------------------------------------------------------------------------------ train.py: checkpoints

@pytest.fixture(scope="module")
def broken_files(tmp_path_factory, weights) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("broken")
    whole = weights.read_bytes()
    contents = {"text.pth": b"hello, not a checkpoint", "truncated.pth": whole[:len(whole) // 2], "empty.pth": b"",
                "config.json": b'{"num_classes": 6}'}
    for name, content in contents.items():
        (folder / name).write_bytes(content)
    return {name: folder / name for name in contents}


@pytest.mark.parametrize("name, words", [
    ("missing.pth", "checkpoint not found: "),
    # Not a bare unpickler code, not torch's whole zip message, and not "refusing to unpickle", which would suggest
    # that the file holds code.
    ("text.pth", "not a torch checkpoint, or a damaged (truncated) one"),
    ("truncated.pth", "not a torch checkpoint, or a damaged (truncated) one (PytorchStreamReader failed reading "
                      "zip archive: failed finding central directory.)"),
    ("empty.pth", "the file is empty"),
    ("config.json", "not a torch checkpoint, or a damaged one (byte 123 is no pickle instruction)"),
])
def test_a_model_path_that_is_no_checkpoint_is_one_line(synthetic, tmp_path, broken_files, name, words, capsys):
    path = broken_files.get(name, tmp_path / name)
    assert run_main(train.main, train_args(synthetic, tmp_path / "out", "--model-path", str(path))) == 2
    line = one_error_line(capsys, "train.py")
    assert words in line and str(path) in line, line


def test_a_model_path_of_another_architecture_is_one_line(synthetic, tmp_path, capsys):
    other = tmp_path / "resnet10t.pth"
    torch.save({"model": create_model("timm/resnet10t", 6).state_dict(), "num_classes": 6}, other)
    assert run_main(train.main, train_args(synthetic, tmp_path / "out", "--model-path", str(other))) == 2
    assert "checkpoint does not fit the backbone of test_resnet" in one_error_line(capsys, "train.py")


def test_a_model_path_with_other_classes_gives_its_backbone(synthetic, tmp_path, capsys):
    ten = tmp_path / "ten.pth"
    torch.save({"model": create_model("timm/test_resnet", 10).state_dict(), "num_classes": 10}, ten)
    assert run_main(train.main, train_args(synthetic, tmp_path / "out", "--model-path", str(ten))) == 0
    assert f"backbone initialised from {ten}" in capsys.readouterr().err


@pytest.mark.parametrize("which, words", [
    ("missing", "--resume: checkpoint not found: "),
    ("folder", "is a folder; give its last.pth, or --resume auto with --output-dir "),
    ("model-highest.pth", "not a last.pth written by train.py (use --model-path for pretrained weights)"),
    ("truncated last.pth", "not a torch checkpoint, or a damaged (truncated) one"),
])
def test_a_resume_that_cannot_continue_is_one_line(synthetic, finished_run, tmp_path, which, words, capsys):
    path = {"missing": tmp_path / "last.pth", "folder": finished_run,
            "model-highest.pth": finished_run / "model-highest.pth",
            "truncated last.pth": tmp_path / "cut" / "last.pth"}[which]
    if which == "truncated last.pth":
        path.parent.mkdir()
        whole = (finished_run / "last.pth").read_bytes()
        path.write_bytes(whole[:len(whole) // 3])
    assert run_main(train.main, train_args(synthetic, tmp_path / "out", "--resume", str(path))) == 2
    line = one_error_line(capsys, "train.py")
    assert words in line and str(path) in line, line


def test_resuming_a_finished_run_says_the_schedule_is_done(synthetic, finished_run, tmp_path, capsys):
    out = tmp_path / "again"
    shutil.copytree(finished_run, out)
    assert run_main(train.main, train_args(synthetic, out, "--resume", "auto")) == 0
    err = capsys.readouterr().err
    # Raising --stop-epoch cannot help once --epochs are done, so the message must not suggest it.
    assert "nothing to train: the run has finished its schedule (--epochs 1); a longer one needs a new " \
           "--output-dir" in err
    assert "raise --stop-epoch" not in err


# --------------------------------------------------------------------------------------------------- export.py

@pytest.fixture
def no_model(refuse_model_load):
    return refuse_model_load(export)


@pytest.mark.parametrize("case", ["onnx under a file", "onnx onto a folder", "onnx name too long",
                                  "hf onto a file", "hf under a file", "hf onto a folder with other files",
                                  "thresholds for onnx", "image size 0", "opset 0", "unknown format"])
def test_export_refuses_before_loading_the_model(weights, tmp_path, no_model, case, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    long_name = tmp_path / ("x" * 300 + ".onnx")
    argv, words = {
        "onnx under a file": (["--output", str(blocker / "m.onnx")],
                              f"--output {blocker / 'm.onnx'}: {blocker} is a file, not a folder"),
        "onnx onto a folder": (["--output", str(tmp_path)], f"--output {tmp_path} is a folder; give a file name"),
        "onnx name too long": (["--output", str(long_name)], "is longer than the 255 bytes"),
        "hf onto a file": (["--format", "hf", "--output", str(blocker)],
                           f"--output {blocker} is a file; --format hf writes a folder"),
        "hf under a file": (["--format", "hf", "--output", str(blocker / "hf")],
                            f"{blocker} is a file, not a folder"),
        "hf onto a folder with other files": (
            ["--format", "hf", "--output", str(occupied)],
            f"--output {occupied} already holds other files (notes.txt); give a new or empty folder"),
        "thresholds for onnx": (["--thresholds", str(blocker)], "--thresholds: for --format hf only"),
        "image size 0": (["--image-size", "0"], "expected an integer >= 1, got 0"),
        "opset 0": (["--opset", "0"], "expected an integer >= 1, got 0"),
        "unknown format": (["--format", "tflite"], "invalid choice: 'tflite'"),
    }[case]
    assert run_main(export.main, ["--model-path", str(weights), *argv], prog="export.py") == 2
    assert words in one_error_line(capsys, "export.py")
    assert no_model == []
    assert sorted(p.name for p in occupied.iterdir()) == ["notes.txt"]


def test_export_of_a_broken_checkpoint_is_one_line(broken_files, tmp_path, capsys):
    path = broken_files["truncated.pth"]
    output = tmp_path / "m.onnx"
    assert run_main(export.main, ["--model-path", str(path), "--output", str(output)], prog="export.py") == 2
    assert f"could not read checkpoint {path}: not a torch checkpoint" in one_error_line(capsys, "export.py")
    assert not output.exists()


def test_an_opset_torch_cannot_export_is_one_line(weights, tmp_path, capsys):
    output = tmp_path / "m.onnx"
    code = run_main(export.main, ["--model-path", str(weights), "--output", str(output), "--opset", "999"],
                    prog="export.py")
    assert code == 2
    assert last_error_line(capsys, "export.py") == (
        "export.py: error: --opset 999: cannot export this model at that opset (Unsupported onnx_opset_version: "
        "999); the default 17 works")
    assert not output.exists()


def test_an_hf_export_replaces_its_own_earlier_files(weights, tmp_path, capsys):
    folder = tmp_path / "hf"
    for _ in range(2):
        assert run_main(export.main, ["--model-path", str(weights), "--format", "hf", "--output", str(folder)],
                        prog="export.py") == 0
    capsys.readouterr()
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]


# --------------------------------------------------------------------------------------------------- ablate.py

def test_ablate_output_dir_that_is_not_writable_stops_before_training(tmp_path, monkeypatch, capsys):
    out = tmp_path / "ablation"
    real_access = os.access

    def access(path, mode, *args, **kwargs):  # as a read-only mount answers (root ignores chmod, so it is faked)
        if Path(path) == out / "runs" and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    monkeypatch.setattr(ablate, "run_variant", lambda *a, **k: pytest.fail("a variant was trained"))
    assert run_main(ablate.main, ["--output-dir", str(out)], prog="ablate.py") == 2
    assert one_error_line(capsys, "ablate.py") == f"ablate.py: error: the output folder {out / 'runs'} is not writable"


@pytest.mark.parametrize("argv, prog, words", [
    (["--bogus"], "ablate.py", "unrecognized arguments: --bogus"),
    (["--variants", "ce:0,0,0", "--", "DATA", "--bogus"], "train.py", "unrecognized arguments: --bogus"),
    (["--", "DATA", "-b", "0"], "train.py", "expected an integer >= 1, got 0"),
    (["--", "DATA", "--output-dir", "x"], "ablate.py", "--output-dir is set by ablate.py for each variant"),
    (["--gamma-neg-sweep", "nan"], "ablate.py", "variant 'nan,0,0.05': expected NAME:GAMMA_NEG,GAMMA_POS,CLIP"),
    (["--gamma-neg-sweep", "1", "--sweep-clip", "5"], "ablate.py", "the clip within [0, 1)"),
])
def test_ablate_bad_flags_are_one_line(tmp_path, monkeypatch, argv, prog, words, capsys):
    monkeypatch.chdir(tmp_path)
    assert run_main(ablate.main, ["--output-dir", str(tmp_path / "abl"), *argv], prog="ablate.py") == 2
    assert words in one_error_line(capsys, prog)
    assert not (tmp_path / "abl").exists()
