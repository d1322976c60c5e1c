"""train.py --config FILE.yaml (timm's convention): keys are option dests, the file sets, the command line overrides,
args.json records; configs/ holds the README's recipes."""
import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from asl.apps import train
from asl.apps.train_options import TrainOptions, read_config
from asl.cli import run_main

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_every_option_is_a_field_of_train_options_and_back():
    parser = train.build_parser()
    dests = {a.dest for a in parser._actions if a.dest != "help"}
    assert dests == {f.name for f in dataclasses.fields(TrainOptions)}


def test_configs_hold_one_recipe_per_readme_row():
    names = {path.stem for path in CONFIGS}
    assert {"coco_tresnet_l_448", "coco_tresnet_xl_640", "coco_tresnet_m_224", "voc_tresnet_l_448",
            "voc_tresnet_xl_448", "nus_wide_tresnet_l_448", "openimages_tresnet_l_448",
            "coco_ml_decoder_tresnet_m_224", "coco_ml_decoder_tresnet_v2_l_448",
            "openimages_ml_decoder_tresnet_m_224"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_loads_through_the_parser_and_names_only_real_options(path):
    parser = train.build_parser()
    values = read_config(str(path), parser)
    raw = yaml.safe_load(path.read_text())
    assert set(values) == set(raw)  # every key is an option dest (read_config refuses any other)
    parser.set_defaults(**values)
    args = parser.parse_args(["DATA"])
    for key, value in raw.items():
        assert getattr(args, key) == value, key
    assert args.model_path.startswith("hf-hub:timm/tresnet_") or args.model_path.endswith("model-highest.pth")


def test_the_coco_recipe_is_the_original_train_py():
    values = yaml.safe_load(Path(CONFIGS[0].parent / "coco_tresnet_l_448.yaml").read_text())
    original = {"model_name": "tresnet_l", "image_size": 448, "lr": 1e-4, "weight_decay": 1e-4, "epochs": 80,
                "stop_epoch": 40, "ema_decay": 0.9997, "gamma_neg": 4, "gamma_pos": 0, "clip": 0.05,
                "batch_size": 128}
    assert {k: values[k] for k in original} == original


@pytest.mark.parametrize("text, message", [
    ("lr_rate: 0.1\n", "unknown key 'lr_rate'"),
    ("epochs: many\n", "epochs: expected an integer >= 1, got 'many'"),
    ("lr: [1, 2]\n", "lr: expected one value"),
    ("compile: 3\n", "compile: expected true or false"),
    ("head: transformer\n", "head: expected one of ml-decoder"),
    ("lr: 0.1\n  bad: indent\n", "not valid YAML at line"),
    ("- lr\n", "expected a mapping"),
])
def test_a_bad_config_is_one_line_and_exit_code_2(tmp_path, capsys, text, message):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    code = run_main(train.main, [str(tmp_path), "--dataset", "synthetic", "--config", str(config)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0] and str(config) in err[0], err


def test_yaml_values_go_through_the_options_types(tmp_path):
    config = tmp_path / "types.yaml"
    # YAML reads 1e-4 as a string and 2 as an int: argparse's types make them the floats the options hold.
    config.write_text("lr: 1e-4\ngamma_neg: 2\ndataset_option: {num_train: 8}\nchannels_last: false\n")
    options = train.parse_options([str(tmp_path / "d"), "--dataset", "synthetic", "--config", str(config)])
    assert options.lr == 1e-4 and isinstance(options.lr, float)
    assert options.gamma_neg == 2.0 and isinstance(options.gamma_neg, float)
    assert options.dataset_option == ("num_train=8",) and options.channels_last is False


@pytest.mark.usefixtures("one_thread")
def test_the_command_line_overrides_the_file_and_args_json_records_the_merge(tmp_path, make_synthetic, capsys):
    data = make_synthetic(8, 4, 32)
    out = tmp_path / "run"
    config = tmp_path / "tiny.yaml"
    config.write_text(f"data: {data}\ndataset: synthetic\nmodel_name: timm/test_resnet\nimage_size: 32\n"
                      f"batch_size: 4\nworkers: 0\nepochs: 1\nstop_epoch: 0\nmax_steps_per_epoch: 1\nlr: 2\n"
                      f"gamma_neg: 3\ndevice: cpu\noutput_dir: {tmp_path / 'ignored'}\n")
    code = run_main(train.main, ["--config", str(config), "--lr", "1e-3", "--output-dir", str(out)])
    assert code == 0, capsys.readouterr().err[-2000:]
    recorded = json.loads((out / "args.json").read_text())
    assert recorded["lr"] == 1e-3 and recorded["output_dir"] == str(out)  # the command line won
    assert recorded["gamma_neg"] == 3.0 and recorded["image_size"] == 32 and recorded["data"] == str(data)
    assert recorded["config"] == str(config) and recorded["model_name"] == "timm/test_resnet"
    assert not (tmp_path / "ignored").exists()
    assert all(not isinstance(v, (dict, list)) or k == "dataset_option" for k, v in recorded.items())


def test_every_config_the_docs_name_exists():
    import re

    repo = CONFIGS[0].parents[1]
    docs = [repo / "README.md", repo / "MODEL_ZOO.md", repo / "Datasets.md", *sorted((repo / "docs").glob("*.md"))]
    named = {m for doc in docs if doc.is_file() for m in re.findall(r"configs/[\w.-]+\.ya?ml", doc.read_text())}
    assert all((repo / name).is_file() for name in named), sorted(n for n in named if not (repo / n).is_file())
