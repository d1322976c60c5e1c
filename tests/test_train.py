"""train.py's command line: flag spellings and types, bad input (one line, exit code 2), SIGINT, NaN loss."""
import json
import os
import signal

import pytest
import torch

from asl.apps import train
from asl.cli import ArgumentParser, run_main  # noqa: E402
from asl.errors import ModelError  # noqa: E402



pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def synthetic(make_synthetic):
    return make_synthetic(16, 8, 40)


def _flags(data, out, *extra):
    return [str(data), "--dataset", "synthetic", "--model-name", "timm/test_resnet", "--image-size", "32",
            "-b", "8", "-j", "0", "--epochs", "2", "--stop-epoch", "1", "--device", "cpu",
            "--output-dir", str(out), *extra]


def _cores() -> int:
    """The cores this process may use (DESIGN: -j defaults to min(8, CPU cores))."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def test_parser_accepts_both_spellings_and_types_every_flag():
    parser = train.build_parser()
    a = parser.parse_args(["d", "--model-path", "x.pth", "--stop_epoch", "3", "--num_classes", "20",
                           "--batch-size", "64", "--ema_decay", "0.5", "--image_size", "448"])
    assert (a.model_path, a.stop_epoch, a.num_classes, a.batch_size, a.ema_decay, a.image_size) == \
        ("x.pth", 3, 20, 64, 0.5, 448)
    b = parser.parse_args(["d", "--model_path", "", "-b", "16"])
    assert b.model_path == "" and b.batch_size == 16 and b.stop_epoch == 40
    defaults = parser.parse_args(["d"])
    assert (defaults.lr, defaults.batch_size, defaults.workers, defaults.image_size, defaults.epochs,
            defaults.stop_epoch, defaults.ema_decay, defaults.seed, defaults.output_dir, defaults.dataset,
            defaults.model_name, defaults.gamma_neg, defaults.gamma_pos, defaults.clip, defaults.weight_decay) == \
        (1e-4, 128, min(8, _cores()), 224, 80, 40, 0.9997, 0, "models", "coco", "tresnet_m", 4.0, 0.0, 0.05, 1e-4)
    for action in parser._actions:
        if action.option_strings and action.nargs != 0:
            assert action.type is not None or action.choices is not None, action.option_strings
    with pytest.raises(TypeError):
        ArgumentParser().add_argument("--untyped")


def test_required_option_is_satisfied_by_either_spelling(capsys):
    parser = ArgumentParser(prog="p")
    parser.add_argument("--model-path", type=str, required=True)
    assert parser.parse_args(["--model_path", "a"]).model_path == "a"
    assert parser.parse_args(["--model-path=b"]).model_path == "b"
    with pytest.raises(SystemExit) as err:
        parser.parse_args([])
    assert err.value.code == 2
    assert "required: --model-path" in capsys.readouterr().err


def test_bad_input_is_one_line_and_a_bug_keeps_its_traceback(capsys):
    def bad_input(argv):
        raise ModelError("unknown model 'x'\nsecond line")

    def bug(argv):
        raise ValueError("boom")  # a ValueError from deep inside is a bug, not the user's mistake

    assert run_main(bad_input, [], prog="p") == 2
    assert _one_error_line(capsys) == "p: error: unknown model 'x' second line"
    assert run_main(bug, [], prog="p") == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and err.strip().endswith("ValueError: boom")


def test_missing_data_dir(tmp_path, capsys):
    assert train.main([str(tmp_path / "nope"), "--output-dir", str(tmp_path / "o")]) == 2
    assert "data directory not found" in _one_error_line(capsys)


def test_coco_folder_without_annotations(tmp_path, capsys):
    assert train.main([str(tmp_path), "--output-dir", str(tmp_path / "o"), "--device", "cpu"]) == 2
    assert "annotation" in _one_error_line(capsys).lower()


def test_unknown_dataset_and_model(tmp_path, synthetic, capsys):
    assert train.main(_flags(synthetic, tmp_path / "o", "--dataset", "imagenet")) == 2
    assert "unknown dataset" in _one_error_line(capsys)
    assert train.main(_flags(synthetic, tmp_path / "o", "--model-name", "tresnet_q")) == 2
    assert "unknown model" in _one_error_line(capsys)


def test_num_classes_contradicting_the_dataset(tmp_path, synthetic, capsys):
    assert train.main(_flags(synthetic, tmp_path / "o", "--num-classes", "80")) == 2
    line = _one_error_line(capsys)
    assert "--num-classes 80" in line and "6 classes" in line


def test_unwritable_output_dir(tmp_path, synthetic, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert train.main(_flags(synthetic, blocker / "out")) == 2
    assert "output directory is not writable" in _one_error_line(capsys)


def test_pretrained_file_that_does_not_fit(tmp_path, synthetic, capsys):
    bad = tmp_path / "other.pth"
    torch.save({"model": {"conv.weight": torch.zeros(3, 3)}}, bad)
    assert train.main(_flags(synthetic, tmp_path / "o", "--model-path", str(bad))) == 2
    assert "not fit" in _one_error_line(capsys)
    assert train.main(_flags(synthetic, tmp_path / "o", "--model-path", str(tmp_path / "missing.pth"))) == 2
    assert "not found" in _one_error_line(capsys)


@pytest.mark.faults
def test_sigint_finishes_the_step_saves_and_exits_cleanly_then_resumes(tmp_path, synthetic, monkeypatch, capsys):
    import asl.training.loop

    original = asl.training.loop.train_one_epoch

    def interrupting(*args, **kwargs):
        on_step = kwargs["on_step"]

        def hook(state):
            on_step(state)
            if state["epoch"] == 0 and state["step"] == 0:
                os.kill(os.getpid(), signal.SIGINT)  # delivered to the handler train.py installed

        kwargs["on_step"] = hook
        return original(*args, **kwargs)

    monkeypatch.setattr(asl.training.loop, "train_one_epoch", interrupting)
    out = tmp_path / "o"
    # -b 4: 4 steps per epoch. The signal arrives between steps 0 and 1 (after step 0 polled the flag), so
    # step 1 is the "current step": it completes, then the run saves and stops, mid-epoch.
    before = signal.getsignal(signal.SIGINT)
    assert train.main(_flags(synthetic, out, "-b", "4")) == 0
    assert "interrupted at epoch 0, step 2" in capsys.readouterr().out
    saved = torch.load(out / "last.pth", weights_only=True)
    assert (saved["epoch"], saved["step"]) == (0, 2)
    assert signal.getsignal(signal.SIGINT) is before  # the handler is restored
    monkeypatch.setattr(asl.training.loop, "train_one_epoch", original)
    assert train.main(_flags(synthetic, out, "-b", "4", "--resume", "auto")) == 0
    assert torch.load(out / "last.pth", weights_only=True)["epoch"] == 2


@pytest.mark.faults
def test_a_second_ctrl_c_during_the_save_exits_130_with_last_pth_intact(tmp_path, synthetic, monkeypatch, capsys):
    import asl.training.loop

    original_epoch, original_save = asl.training.loop.train_one_epoch, torch.save
    out = tmp_path / "o"
    armed = []

    def interrupting(*args, **kwargs):
        on_step = kwargs["on_step"]

        def hook(state):
            on_step(state)
            if state["epoch"] == 1 and state["step"] == 0:
                armed.append((out / "last.pth").read_bytes())  # the epoch-0 state, saved at the epoch's end
                os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: finish the step, then save

        kwargs["on_step"] = hook
        return original_epoch(*args, **kwargs)

    def slow_save(obj, f, *args, **kwargs):
        if armed and getattr(f, "name", "").endswith(".tmp"):
            f.write(b"half a checkpoint")
            os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C, in the middle of writing last.pth
        return original_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(asl.training.loop, "train_one_epoch", interrupting)
    monkeypatch.setattr(torch, "save", slow_save)
    assert train.main(_flags(synthetic, out, "-b", "4")) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "train.py: error: interrupted"
    assert (out / "last.pth").read_bytes() == armed[0]
    assert not list(out.glob(".*.tmp"))


@pytest.mark.faults
def test_non_finite_loss_stops_non_zero_and_keeps_the_last_good_checkpoint(tmp_path, synthetic, monkeypatch,
                                                                          capsys):
    out = tmp_path / "o"
    assert train.main(_flags(synthetic, out, "--stop-epoch", "0")) == 0
    good = (out / "last.pth").read_bytes()

    class Diverged(train.AsymmetricLoss):
        def forward(self, logits, targets, **kwargs):
            return super().forward(logits, targets, **kwargs) * float("nan")

    monkeypatch.setattr(train, "AsymmetricLoss", Diverged)
    capsys.readouterr()
    code = train.main(_flags(synthetic, out, "--resume", "auto"))
    assert code == 2  # a diverged run is reported like bad input: one line that names the fix
    err = capsys.readouterr().err
    assert "Traceback" not in err and "non-finite loss" in err.strip().splitlines()[-1]
    assert (out / "last.pth").read_bytes() == good


@pytest.mark.faults
def test_a_five_step_schedule_trains(tmp_path, make_synthetic):
    data = make_synthetic(5, 3, 40)
    flags = _flags(data, tmp_path / "o", "-b", "1", "--epochs", "1", "--stop-epoch", "0", "--image-size", "64")
    assert train.main(flags) == 0
    assert torch.load(tmp_path / "o" / "last.pth", weights_only=True)["steps_per_epoch"] == 5


@pytest.mark.faults
def test_diverged_weights_are_never_saved_and_the_message_is_true(tmp_path, synthetic, capsys):
    out = tmp_path / "o"
    assert train.main(_flags(synthetic, out, "--lr", "1e10")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("train.py: error: ") and "diverged" in err and "no checkpoint was written yet" in err
    assert not (out / "last.pth").exists() and not (out / "model-highest.pth").exists()


def test_a_new_run_in_an_old_folder_starts_a_new_log_and_never_claims_the_old_checkpoint(tmp_path, synthetic,
                                                                                          capsys):
    out = tmp_path / "o"
    one_epoch = ["--epochs", "1", "--stop-epoch", "0"]
    assert train.main(_flags(synthetic, out, *one_epoch)) == 0
    assert train.main(_flags(synthetic, out, *one_epoch, "--seed", "1")) == 0
    assert "holds an earlier run: this new run replaces it" in capsys.readouterr().err
    assert [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()] == [0]
    # A diverging new run there: the earlier run's last.pth is not "the last good state" of this one.
    assert train.main(_flags(synthetic, out, "--lr", "1e10")) == 2
    assert "no checkpoint was written yet" in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.faults
def test_learning_rates_out_of_range_are_refused_and_the_largest_accepted_one_fails_cleanly(tmp_path, synthetic,
                                                                                             capsys):
    for flag, value, message in [("--lr", "1e38", "expected a learning rate within (0, 1e+30]"),
                                 ("--lr", "0", "expected a learning rate"), ("--clip", "1", "within [0, 1)"),
                                 ("--gamma-neg", "-1", "expected a number >= 0"),
                                 ("--weight-decay", "-0.1", "expected a number >= 0")]:
        assert run_main(train.main, _flags(synthetic, tmp_path / "o", flag, value)) == 2
        assert message in capsys.readouterr().err
    # Adam at the largest --lr: the weights blow up but stay representable, so the run stops with the divergence
    # message, not with float32 overflow inside the optimizer (where --lr 1e38 would end up).
    code = run_main(train.main, _flags(synthetic, tmp_path / "o", "--lr", "1e30"))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "training diverged" in err.strip().splitlines()[-1]


@pytest.mark.faults
def test_validate_refuses_a_checkpoint_with_non_finite_weights(tmp_path, capsys):
    from asl.apps import validate
    from asl.models import create_model

    data = tmp_path / "voc"
    model = create_model("tresnet_m", 6)
    with torch.no_grad():
        model.head.fc.bias.fill_(float("nan"))
    torch.save({"model": model.state_dict(), "num_classes": 6, "idx_to_class": dict(enumerate("abcdef"))},
               tmp_path / "nan.pth")
    from asl.data import generate_synthetic_coco
    generate_synthetic_coco(data, num_train=2, num_val=4, image_size=32)
    code = validate.main([str(data), "--dataset", "synthetic", "--val-split", "val", "--model-path",
                          str(tmp_path / "nan.pth"), "--image-size", "32", "-j", "0", "--device", "cpu"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "head.fc.bias" in err[-1] and "NaN" in err[-1] and "mAP score" not in "".join(err)


def test_a_validation_set_without_positive_labels_is_named_and_never_gives_a_best_model(tmp_path, synthetic,
                                                                                       csv_copy, capsys):
    warning = "the validation set has no positive label in any image: its mAP (0.00) means nothing"
    data = csv_copy(synthetic, tmp_path / "blank", val_labels=False)
    out = tmp_path / "o"
    flags = _flags(data, out, "--dataset", "csv", "--train-split", "train", "--val-split", "val")
    assert train.main(flags) == 0
    err = capsys.readouterr().err
    assert err.count(warning) == 1  # once per run, not once per epoch
    assert [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()] == [0, 1]
    assert not (out / "model-highest.pth").exists()
    # The same pictures with their labels: no warning, and a best model.
    data = csv_copy(synthetic, tmp_path / "labelled", val_labels=True)
    assert train.main(_flags(data, tmp_path / "o2", "--dataset", "csv", "--train-split", "train",
                             "--val-split", "val")) == 0
    assert "no positive label" not in capsys.readouterr().err
    assert (tmp_path / "o2" / "model-highest.pth").is_file()


def test_splits_with_as_many_classes_under_other_names_are_refused(tmp_path, write_image, capsys):
    """One csv per split and no classes.txt: each split lists its own classes. Two of them each way would have
    trained with the validation's 'c' scored as the training's 'b'."""
    for k in range(4):
        write_image(tmp_path / f"{k}.jpg", (60 * k, 20, 200 - 40 * k))
    (tmp_path / "train.csv").write_text("image,labels\n0.jpg,a\n1.jpg,b\n")
    (tmp_path / "val.csv").write_text("image,labels\n2.jpg,a\n3.jpg,c\n")
    assert train.main(_flags(tmp_path, tmp_path / "o", "--dataset", "csv")) == 2
    assert _one_error_line(capsys).endswith("the train and val splits disagree on the classes (2 vs 2, first "
                                            "difference 'b' vs 'c'); give both one class list (csv: classes.txt, "
                                            "see Datasets.md)")


def test_which_validation_targets_can_give_a_meaningful_map():
    import numpy as np

    from asl.training.loop import has_positive_labels

    assert not has_positive_labels(np.zeros((4, 3)))
    assert not has_positive_labels(np.array([[0, -1], [-1, 0]]))  # only negatives and "not annotated"
    assert not has_positive_labels(np.zeros((0, 3)))
    assert has_positive_labels(np.array([[0, 0], [0, 1]]))
    assert has_positive_labels(torch.tensor([[0.0, 1.0]]))


@pytest.mark.faults
def test_a_full_disk_mid_run_is_one_line_that_names_the_folder_and_keeps_last_pth(tmp_path, synthetic, monkeypatch,
                                                                                 capsys):
    out = tmp_path / "o"
    assert train.main(_flags(synthetic, out, "--stop-epoch", "0")) == 0
    good = (out / "last.pth").read_bytes()

    def full(obj, f, *args, **kwargs):
        f.write(b"part of a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 453798272 vs 453798160")

    monkeypatch.setattr(torch, "save", full)
    capsys.readouterr()
    assert train.main(_flags(synthetic, out, "--resume", "auto")) == 2
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert "Traceback" not in err and "unexpected pos" not in err
    assert line.startswith("train.py: error: disk full: could not save ") and f" in {out} (" in line
    assert f"{out / 'last.pth'} holds the last good state (once there is room, continue with --resume auto)" in line
    assert (out / "last.pth").read_bytes() == good and not list(out.glob(".*.tmp"))
