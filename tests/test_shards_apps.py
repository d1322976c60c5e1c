"""train.py and validate.py on shards: the folder's mAP from shards (local and over loopback HTTP), a training epoch
that sees every sample once and records it in log.txt, and one line with exit code 2 for broken shards."""
from __future__ import annotations

import functools
import http.server
import json
import re
import threading
from pathlib import Path

import pytest
import torch

from asl.apps import train as train_app
from asl.apps import validate
from asl.data import create_dataset, generate_synthetic_coco
from asl.data.shards_write import write_shards
from asl.models import create_model

REPO = Path(__file__).resolve().parents[1]
TINY_COCO = REPO.parent / "shared" / "data" / "tiny_coco"
needs_coco = pytest.mark.skipif(not (TINY_COCO / "annotations").is_dir(), reason="shared/data/tiny_coco absent")
SIZE = 32


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """tiny_coco val2017 as shards of 20 (20, 20, 8), a loopback HTTP server of them, and a random 80-class
    test_resnet checkpoint."""
    tmp = tmp_path_factory.mktemp("apps")
    shards = tmp / "shards"
    write_shards(create_dataset("coco", TINY_COCO, "val2017", SIZE, train=False), TINY_COCO, shards, "val2017",
                 shard_size=20)
    torch.manual_seed(0)
    checkpoint = tmp / "test_resnet.pth"
    torch.save({"model": create_model("timm/test_resnet", 80).state_dict(), "num_classes": 80,
                "model_name": "timm/test_resnet", "image_size": SIZE}, checkpoint)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(shards)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield {"shards": shards, "checkpoint": checkpoint, "url": f"http://127.0.0.1:{server.server_address[1]}"}
    server.shutdown()
    server.server_close()


def _validate(data, dataset, checkpoint, capsys, *extra) -> tuple[int, str, str]:
    code = validate.main([str(data), "--dataset", dataset, "--val_split", "val2017", "--model-path", str(checkpoint),
                          "--image-size", str(SIZE), "-b", "16", "-j", "0", *extra])
    out, err = capsys.readouterr()
    return code, out, err


def _printed_map(stdout: str) -> float:
    found = re.fullmatch(r"mAP score: (\S+)", stdout.strip().splitlines()[-1])
    assert found, stdout[-500:]
    return float(found.group(1))


@needs_coco
def test_validate_on_shards_gives_the_folders_map(served, capsys):
    code, out, _ = _validate(TINY_COCO, "coco", served["checkpoint"], capsys)
    assert code == 0
    folder_map = _printed_map(out)
    for data in (served["shards"], served["url"]):
        code, out, err = _validate(data, "webdataset", served["checkpoint"], capsys)
        assert code == 0, err
        assert _printed_map(out) == folder_map  # the same tensors, the same scores, the same number
        assert "webdataset val2017: 48 images, 80 classes" in out and "samples that" not in out


@needs_coco
@pytest.mark.parametrize("case", ["missing shard", "truncated shard", "index not JSON", "404", "unreachable"])
def test_validate_refuses_broken_shards_in_one_line(served, tmp_path, capsys, case):
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in served["shards"].iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    data, named = copy, None
    if case == "missing shard":
        (copy / "val2017-000001.tar").unlink()
        named = copy / "val2017-000001.tar"
    elif case == "truncated shard":
        shard = copy / "val2017-000002.tar"
        shard.write_bytes(shard.read_bytes()[:5000])
        named = shard
    elif case == "index not JSON":
        (copy / "val2017.json").write_text('{"format": "asl-shards", ')
        named = copy / "val2017.json"
    elif case == "404":
        data, named = served["url"] + "/elsewhere", served["url"] + "/elsewhere/val2017.json"
    else:
        data, named = "http://127.0.0.1:9", "http://127.0.0.1:9/val2017.json"
    before = {f.name: f.read_bytes() for f in copy.iterdir()}
    code, out, err = _validate(data, "webdataset", served["checkpoint"], capsys)
    assert code == 2
    # the model's loading notes come first; then one line, naming the file, and no traceback
    error = err.strip().splitlines()[-1]
    assert error.startswith("validate.py: error: ") and str(named) in error, err
    assert err.count("error") == 1 and "Traceback" not in err
    assert "mAP score" not in out
    assert {f.name: f.read_bytes() for f in copy.iterdir()} == before  # nothing written over


def test_train_on_shards_sees_every_sample_once_and_logs_images(tmp_path, one_thread):
    root = generate_synthetic_coco(tmp_path / "syn", num_train=19, num_val=6, image_size=16)
    shards = tmp_path / "shards"
    for split in ("train", "val"):
        write_shards(create_dataset("synthetic", root, split, SIZE, train=False), root, shards, split, shard_size=8)
    out = tmp_path / "run"
    argv = [str(shards), "--dataset", "webdataset", "--train-split", "train", "--val-split", "val", "--model-name",
            "timm/test_resnet", "--image-size", str(SIZE), "-b", "8", "-j", "0", "--epochs", "2", "--stop-epoch", "0",
            "--lr", "1e-3", "--output-dir", str(out), "--device", "cpu", "--resume", "auto"]
    assert train_app.main(argv) == 0
    records = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    # shards of 8, 8 and 3 on one process: 1 + 1 + 1 batches of 8, 8, 3, every sample once
    assert [(r["epoch"], r["steps"], r["images"]) for r in records] == [(0, 3, 19)]
    assert torch.load(out / "last.pth", weights_only=True)["steps_per_epoch"] == 3
    argv[argv.index("--stop-epoch") + 1] = "1"
    assert train_app.main(argv) == 0  # --resume auto: on from the finished epoch
    records = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [(r["epoch"], r["images"]) for r in records] == [(0, 19), (1, 19)]
    # the folder route records its images too
    folder_argv = [str(root), "--dataset", "synthetic", *argv[3:]]
    folder_argv[folder_argv.index("--output-dir") + 1] = str(tmp_path / "folder_run")
    folder_argv[folder_argv.index("--stop-epoch") + 1] = "0"
    assert train_app.main(folder_argv) == 0
    record = json.loads((tmp_path / "folder_run" / "log.txt").read_text())
    assert (record["steps"], record["images"]) == (3, 19)


def test_a_shard_broken_during_training_is_one_line_and_leaves_no_worker(tmp_path, capsys, one_thread):
    import multiprocessing
    import tarfile

    root = generate_synthetic_coco(tmp_path / "syn", num_train=12, num_val=4, image_size=16)
    shards = tmp_path / "shards"
    for split in ("train", "val"):
        write_shards(create_dataset("synthetic", root, split, SIZE, train=False), root, shards, split, shard_size=6)
    broken = shards / "train-000001.tar"
    with tarfile.open(broken) as tar:
        header = tar.getmember("000000008.json").offset
    with open(broken, "r+b") as f:  # the same size, so the index check passes and the break shows mid-epoch
        f.seek(header)
        f.write(b"\x07" * 512)
    code = train_app.main([str(shards), "--dataset", "webdataset", "--train-split", "train", "--val-split", "val",
                           "--model-name", "timm/test_resnet", "--image-size", str(SIZE), "-b", "4", "-j", "1",
                           "--epochs", "1", "--stop-epoch", "0", "--output-dir", str(tmp_path / "run"), "--device",
                           "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith(f"train.py: error: {broken} is broken") and "Traceback" not in err
    # the worker that read it ignores SIGTERM: left alive, it would block the interpreter's exit
    assert not [p for p in multiprocessing.active_children() if p.daemon]


@needs_coco
def test_validate_says_when_it_scored_fewer_samples_than_the_index_lists(served, tmp_path, capsys):
    import tarfile

    copy = tmp_path / "copy"
    copy.mkdir()
    for f in served["shards"].iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    with tarfile.open(copy / "val2017-000000.tar") as tar:
        member = tar.getmember("000000003.jpg")
    with open(copy / "val2017-000000.tar", "r+b") as f:  # a picture that no longer decodes, the tar intact
        f.seek(member.offset_data)
        f.write(b"\x00" * member.size)
    code, out, err = _validate(copy, "webdataset", served["checkpoint"], capsys)
    assert code == 0, err
    assert f"skipped 1 unreadable image(s): {copy / 'val2017-000000.tar'}#000000003" in out
    assert "scored 47 of the 48 samples that val2017.json lists" in out
