"""Model sources (asl.sources): one meaning of --model-path everywhere. safetensors files, Hub-layout folders,
hf-hub ids through huggingface_hub's own cache (offline, built here in its documented layout), timm's Hub configs,
export.py --format hf read back by validate.py and as a pretrained backbone, and one-line errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from asl.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from asl.models import convert_timm_tresnet, create_model
from asl.sources import checkpoint_entries, parse_hub_id

timm = pytest.importorskip("timm")
safetensors_torch = pytest.importorskip("safetensors.torch")


def _timm_tresnet_hub_folder(folder: Path, num_classes: int = 7) -> torch.nn.Module:
    """A folder laid out like timm's Hub repositories (timm/tresnet_m.miil_in21k): model.safetensors with timm's
    BatchNorm layout and config.json with ``architecture`` and ``pretrained_cfg``."""
    torch.manual_seed(0)
    model = timm.create_model("tresnet_m", num_classes=num_classes).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.0)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    safetensors_torch.save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "architecture": "tresnet_m", "num_classes": num_classes, "num_features": 2048,
        "pretrained_cfg": {"tag": "miil_in21k", "input_size": [3, 224, 224], "mean": [0, 0, 0], "std": [1, 1, 1],
                           "num_classes": num_classes, "classifier": "head.fc"}}))
    return model


def test_a_timm_hub_folder_loads_as_a_tresnet_with_timms_logits(tmp_path):
    from asl.models.loading import load_model

    reference = _timm_tresnet_hub_folder(tmp_path / "repo")
    loaded = load_model(tmp_path / "repo", prepare=False)
    assert (loaded.model_name, loaded.num_classes, loaded.image_size) == ("tresnet_m", 7, 224)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected, got = reference(x), loaded.model(x)
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-5


def test_a_safetensors_file_alone_and_as_a_pretrained_backbone(tmp_path):
    reference = _timm_tresnet_hub_folder(tmp_path / "repo")
    ckpt = load_checkpoint(tmp_path / "repo" / "model.safetensors")
    assert set(ckpt["model"]) == set(reference.state_dict())
    model = create_model("tresnet_m", 3, pretrained=str(tmp_path / "repo"))  # the classifier is skipped
    converted = convert_timm_tresnet(reference.state_dict())
    body = [k for k in converted if k.startswith("body.") and not k.endswith("num_batches_tracked")]
    assert all(torch.equal(model.state_dict()[k], converted[k]) for k in body)


def _hub_cache(home: Path, repo: str, files: dict[str, Path]) -> None:
    """huggingface_hub's cache layout: models--ORG--NAME/{refs/main, snapshots/<commit>/<files>}."""
    cache = home / "hub" / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (cache / "refs").mkdir(parents=True)
    (cache / "refs" / "main").write_text(commit)
    snapshot = cache / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, source in files.items():
        shutil.copy(source, snapshot / name)


def test_hf_hub_ids_read_huggingface_hubs_cache_offline(tmp_path, monkeypatch):
    """In-process: the Hub's cache folder and offline mode are read from the environment when a source is resolved.
    The failures of the offline cache (nothing cached, only a .bin, a refused connection) are in
    tests/test_sources_failures.py."""
    _timm_tresnet_hub_folder(tmp_path / "repo")
    home = tmp_path / "hf-home"
    _hub_cache(home, "timm/tresnet_m.miil_in21k", {n: tmp_path / "repo" / n for n in ("model.safetensors",
                                                                                      "config.json")})
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from asl.models.loading import load_model

    loaded = load_model("hf-hub:timm/tresnet_m.miil_in21k", prepare=False)
    assert (loaded.model_name, loaded.num_classes, loaded.image_size) == ("tresnet_m", 7, 224)
    # The same id as a pretrained start (train.py --model-path): the backbone is timm's, the classifier is new.
    model = create_model("tresnet_m", 3, pretrained="hf-hub:timm/tresnet_m.miil_in21k").eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.body(x), loaded.model.body(x))


@pytest.mark.slow
def test_export_hf_round_trip_through_validate_infer_and_a_backbone(tmp_path, make_synthetic, capsys):
    from asl.apps import export, validate
    from asl.checkpoint import make_model_checkpoint, save_checkpoint
    from asl.cli import run_main
    from asl.data import create_dataset

    # A checkpoint as train.py writes it (train.py's own round trip is tests/test_round_trip.py).
    data = make_synthetic(8, 8, 32)
    run = tmp_path / "run"
    classes = create_dataset("synthetic", data, "val", 32, train=False).idx_to_class()
    torch.manual_seed(0)
    save_checkpoint(make_model_checkpoint(create_model("tresnet_m", len(classes)).state_dict(), len(classes), classes,
                                          model_name="tresnet_m", image_size=32), run / "model-highest.pth")
    metrics = tmp_path / "val.json"
    assert run_main(validate.main, [str(data), "--dataset", "synthetic", "--model-path", str(run / "model-highest.pth"),
                                    "-j", "0", "--device", "cpu", "--output-json", str(metrics)]) == 0
    expected_map = json.loads(metrics.read_text())["mAP"]
    folder = tmp_path / "published"
    assert run_main(export.main, ["--model-path", str(run / "model-highest.pth"), "--format", "hf", "--output",
                                  str(folder), "--metrics-json", str(metrics), "--threshold", "0.6"]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["asl"]["image_size"] == 32 and config["asl"]["threshold"] == 0.6
    assert config["pretrained_cfg"]["mean"] == [0.0, 0.0, 0.0] and len(config["label_names"]) == 6
    assert f"{expected_map:.2f}" in (folder / "README.md").read_text()
    capsys.readouterr()

    # The folder, and its safetensors file alone, evaluate to the same mAP at the stored size.
    for source in (folder, folder / "model.safetensors"):
        assert run_main(validate.main, [str(data), "--dataset", "synthetic", "--model-path", str(source),
                                        "-j", "0", "--device", "cpu"]) == 0
        last = capsys.readouterr().out.strip().splitlines()[-1]
        assert float(last.split(":")[1]) == pytest.approx(expected_map, abs=1e-6)
    create_model("tresnet_m", 3, pretrained=str(folder))  # a backbone source too


def test_source_errors_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="folder without weights"):
        load_checkpoint(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="hf-hub:ORG/NAME"):
        parse_hub_id("hf-hub:no-slash")
    assert parse_hub_id("hf-hub:org/name@v1.0") == ("org/name", "v1.0")
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="safetensors file"):
        load_checkpoint(tmp_path / "broken.safetensors")
    save_checkpoint({"model": {"w": torch.ones(1)}}, tmp_path / "m.pth")
    assert load_checkpoint(tmp_path / "m.pth")["model"]["w"].item() == 1.0


def test_timm_configs_become_checkpoint_entries():
    entries = checkpoint_entries({"architecture": "resnet50", "num_classes": 3, "label_names": ["a", "b", "c"],
                                  "pretrained_cfg": {"input_size": [3, 288, 288]}})
    assert entries == {"model_name": "timm/resnet50", "num_classes": 3, "image_size": 288,
                       "idx_to_class": {0: "a", 1: "b", 2: "c"}}
    # timm's TResNets are named as timm's too; asl.models.loading builds them as ours
    assert checkpoint_entries({"architecture": "tresnet_m"})["model_name"] == "timm/tresnet_m"
