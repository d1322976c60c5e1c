"""The run's own files: none is written through a symbolic link, a lock file in the way is named, --output-dir ''
is refused; and the help and messages that point the way (defaults shown once, the COCO split found)."""
import os
import re

import pytest
import torch
import torch.nn as nn

from asl.errors import AslError, UsageError
from asl.training.ema import ModelEma
from asl.training.run_folder import HIGHEST, LAST, RunFolder
from asl.training.run_lock import LOCK_NAME, RunLock
from asl.training.state import TrainState
from asl.training.step import create_optimizer

pytestmark = [pytest.mark.faults, pytest.mark.skipif(not hasattr(os, "symlink") or os.name == "nt",
                                                      reason="POSIX symbolic links")]


@pytest.fixture
def victim(tmp_path):
    """A user's file outside the run's folder, and the path of one that does not exist yet."""
    outside = tmp_path / "outside"
    outside.mkdir()
    precious = outside / "precious.txt"
    precious.write_text("the user's data\n")
    return precious, outside / "created-through-a-link"


def _state():
    model = nn.Linear(3, 2)
    return TrainState(model, ModelEma(model, 0.9), create_optimizer(model), None, None)


@pytest.mark.parametrize("dangling", [False, True])
def test_a_lock_file_that_is_a_link_is_refused_by_name_and_nothing_is_written_through_it(tmp_path, victim,
                                                                                        dangling):
    precious, absent = victim
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).symlink_to(absent if dangling else precious)
    with pytest.raises(UsageError) as err:
        with RunFolder.prepare(run, is_main=True):
            pass
    assert str(run / LOCK_NAME) in str(err.value) and "symbolic link" in str(err.value)
    assert precious.read_text() == "the user's data\n" and not absent.exists()


def test_a_folder_in_place_of_the_lock_file_is_named_not_the_output_folder(tmp_path):
    run = tmp_path / "run"
    (run / LOCK_NAME).mkdir(parents=True)
    with pytest.raises(UsageError) as err:
        RunLock.acquire(run)
    assert str(err.value) == f"the run's lock file {run / LOCK_NAME} is a folder: remove it if no train.py run " \
                             f"uses the folder"


def test_the_files_written_whole_replace_a_link_and_leave_its_target_alone(tmp_path, victim):
    precious, absent = victim
    run = tmp_path / "run"
    run.mkdir()
    (run / "args.json").symlink_to(precious)
    (run / LAST).symlink_to(absent)
    (run / HIGHEST).symlink_to(precious)
    folder = RunFolder(run, True, {"num_classes": 2, "idx_to_class": {0: "a", 1: "b"}})
    folder.write_args({"lr": 1e-4})
    state = _state()
    folder.save_last(state)
    folder.save_best(state.model.state_dict(), "regular", 50.0, 0)
    assert precious.read_text() == "the user's data\n" and not absent.exists()
    for name in ("args.json", LAST, HIGHEST):
        assert not (run / name).is_symlink() and (run / name).is_file(), name
    assert torch.load(run / LAST, weights_only=True)["epoch"] == 0


@pytest.mark.parametrize("dangling", [False, True])
def test_log_txt_is_never_appended_through_a_link(tmp_path, victim, dangling):
    precious, absent = victim
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.txt").symlink_to(absent if dangling else precious)
    folder = RunFolder(run, True, {})
    with pytest.raises(UsageError, match=re.escape(f"{run / 'log.txt'} is a symbolic link")):
        folder.begin(resumed=True, args={"lr": 1e-4})  # a resumed run appends: refused before any training
    with pytest.raises(UsageError, match=re.escape(f"{run / 'log.txt'} is a symbolic link")):
        folder.log_epoch({"epoch": 0})
    assert precious.read_text() == "the user's data\n" and not absent.exists()
    folder.begin(resumed=False, args={"lr": 1e-4})  # a new run starts a new log: the link goes, not its target
    folder.log_epoch({"epoch": 0})
    assert not (run / "log.txt").is_symlink() and precious.read_text() == "the user's data\n"


def test_an_empty_output_dir_is_refused(capsys):
    from asl.apps import train
    from asl.cli import run_main

    assert run_main(train.main, ["DATA", "--dataset", "synthetic", "--output-dir", ""]) == 2
    assert "--output_dir: expected a folder, got ''" in capsys.readouterr().err


def _help_entries(text):
    """``{flags: help}`` of an argparse help text (continuation lines joined)."""
    entries, flags = {}, None
    for line in text.splitlines():
        match = re.match(r"^  (-\S.*?)(?:\s{2,}(.*))?$", line)
        if match:
            flags = match.group(1)
            entries[flags] = match.group(2) or ""
        elif flags and line.startswith(" " * 10):
            entries[flags] += " " + line.strip()
    return entries


@pytest.mark.parametrize("app", ["train", "validate", "infer", "export", "ablate"])
def test_help_shows_each_default_once_and_the_threshold_flag_by_its_long_name(app):
    import importlib

    entries = _help_entries(importlib.import_module(f"asl.apps.{app}").build_parser().format_help())
    for flags, text in entries.items():
        assert len(re.findall(r"\(default", text)) <= 1, (flags, text)
        assert "(default: None)" not in text, flags
    thresholds = [flags for flags in entries if "--thre " in flags or flags.startswith("--threshold ")]
    if app in ("validate", "infer", "export"):
        assert thresholds and all(f.startswith("--threshold T, --thre T, --th T") for f in thresholds), thresholds
    if app == "train":
        size = next(text for flags, text in entries.items() if flags.startswith("--image-size"))
        assert size.strip() and "(default: 224)" in size


def test_thre_and_th_stay_accepted_everywhere():
    from asl.apps import export, infer, validate

    assert validate.build_parser().parse_args(["D", "--model-path", "m.pth", "--thre", "0.6"]).thre == 0.6
    assert validate.build_parser().parse_args(["D", "--model-path", "m.pth", "--th", "0.6"]).thre == 0.6
    assert infer.build_parser().parse_args(["--model-path", "m.pth", "--pic-path", "p", "--thre", "0.6"]).th == 0.6
    assert infer.build_parser().parse_args(["--model-path", "m.pth", "--pic-path", "p", "--th", "0.6"]).th == 0.6
    assert export.build_parser().parse_args(["--model-path", "m", "--output", "o", "--thre", "0.6"]).threshold == 0.6


def test_a_coco_split_that_is_not_there_names_the_flag_and_the_splits_found(tmp_path):
    from asl.data import create_dataset

    (tmp_path / "annotations").mkdir()
    for split in ("train2017", "val2017"):
        (tmp_path / "annotations" / f"instances_{split}.json").write_text("{}")
    with pytest.raises(AslError) as err:
        create_dataset("coco", str(tmp_path), "train2014", 32, train=True)
    message = str(err.value)
    assert "instances_train2014.json" in message and "train2017, val2017" in message and "--train-split" in message


def test_the_start_line_names_the_head():
    from asl.apps.train import describe_head
    from asl.models import create_model

    assert describe_head(create_model("timm/test_resnet", 3)) == "the linear head"
    mld = create_model("timm/test_resnet", 3, head="ml-decoder", num_of_groups=3, decoder_embedding=64)
    assert describe_head(mld) == "the ML-Decoder head (3 groups, width 64)"
