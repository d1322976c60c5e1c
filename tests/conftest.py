"""Shared fixtures: one intra-op thread, generated datasets, small NUS-WIDE / Open Images / CSV sets in their
native formats, a runner for the repository's scripts, and the source of a train.py that kills itself (fault
injection)."""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """Under pytest-xdist (``make test``) each worker gets one intra-op thread: the workers already fill the cores,
    and two spinning OpenMP pools per core would slow every worker down."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


#: files a test leaves in its tmp_path above this size (checkpoints of full TResNets) are deleted when it ends
LARGE_FILE_BYTES = 8 * 2**20


@pytest.fixture(autouse=True)
def _drop_large_files(request):
    """Deletes the large files a test wrote into its ``tmp_path`` once it has run: a TResNet-M ``last.pth`` is
    about 460 MB, and with two workers the suite would otherwise hold several GB at its peak."""
    yield
    tmp = request.node.funcargs.get("tmp_path") if hasattr(request.node, "funcargs") else None
    if tmp is None or not tmp.is_dir():
        return
    for path in tmp.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink() and path.stat().st_size > LARGE_FILE_BYTES:
                path.unlink()
        except OSError:
            pass  # a file the test made unreadable on purpose: it is small anyway


@pytest.fixture
def one_thread():
    """One intra-op thread for tests that train tiny models: on a shared 2-core machine two spinning OpenMP
    threads per process can slow such a run down tenfold, while one thread costs little when it is idle."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def make_synthetic(tmp_path_factory):
    """``make_synthetic(num_train, num_val, image_size, seed=0)`` -> the root of a generated COCO-layout set,
    made once per session for each combination."""
    from asl.data import generate_synthetic_coco

    made = {}

    def make(num_train: int, num_val: int, image_size: int, seed: int = 0) -> Path:
        key = (num_train, num_val, image_size, seed)
        if key not in made:
            made[key] = generate_synthetic_coco(tmp_path_factory.mktemp("syn"), num_train=num_train,
                                                num_val=num_val, image_size=image_size, seed=seed)
        return made[key]

    return make


def _positive_vectors(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.0)
    return model


@pytest.fixture(scope="session")
def positive_vectors():
    """``positive_vectors(model)``: every 1-D parameter (norm scales and biases, SE and classifier biases) drawn
    from U(0.5, 1) with torch's global generator. No norm scale is near 0, so every parameter gets a gradient."""
    return _positive_vectors


def _write_image(path, colour=(200, 30, 30), size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _write_csv(path, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


@pytest.fixture(scope="session")
def write_image():
    """``write_image(path, colour=(200, 30, 30), size=(40, 30))``: a plain RGB picture, folders created."""
    return _write_image


@pytest.fixture(scope="session")
def write_csv():
    """``write_csv(path, rows)``: rows (lists of cells) as a CSV file."""
    return _write_csv


def _colour(k: int) -> tuple[int, int, int]:
    # A different picture for each image, so that a model's scores rank them rather than tie.
    return (40 * k, 200 - 30 * k, 90 + 25 * k)


@pytest.fixture
def nus_root(tmp_path):
    """NUS-WIDE as MIIL's CSV: 4 training rows (one image missing), 2 validation rows."""
    root = tmp_path / "nus"
    for k, name in enumerate(["a.jpg", "b.jpg", "d.jpg", "v1.jpg", "v2.jpg"]):
        _write_image(root / "images" / name, _colour(k))
    _write_csv(root / "nus_wid_data.csv", [
        ["filepath", "label", "split_name"],
        ["images/a.jpg", "['clouds', 'sky']", "train"],
        ["images/b.jpg", "['water']", "train"],
        ["images/c_missing.jpg", "['sky', 'animal']", "train"],
        ["images/d.jpg", "[]", "train"],
        ["images/v1.jpg", "['animal', 'water', 'sky']", "val"],
        ["images/v2.jpg", "['zebra']", "val"],
    ])
    return root


@pytest.fixture
def oi_root(tmp_path):
    """Open Images as MIIL released it: classes.csv (MID, display name) and data.csv (positive and verified
    negative MIDs); 3 training and 2 test images."""
    root = tmp_path / "oi"
    for k, name in enumerate(["train/t1.jpg", "train/t2.jpg", "train/t3.jpg", "test/e1.jpg", "test/e2.jpg"]):
        _write_image(root / name, _colour(k))
    _write_csv(root / "classes.csv", [["LabelName", "DisplayName"], ["/m/01", "Cat"], ["/m/02", "Dog"],
                                      ["/m/03", "Car"], ["/m/04", "Tree"]])
    _write_csv(root / "data.csv", [
        ["ImageID", "positive", "negative", "split"],
        ["t1.jpg", "['/m/01', '/m/03']", "['/m/02']", "train"],
        ["t2", "['/m/04']", "[]", "train"],                      # no extension: .jpg is appended
        ["t3.jpg", "[]", "['/m/01', '/m/99']", "train"],        # /m/99 is not a class: ignored
        ["e1.jpg", "['/m/02']", "['/m/04', '/m/03']", "test"],
        ["e2.jpg", "['/m/01', '/m/02']", "[]", "test"],
    ])
    return root


def _csv_copy(synthetic: Path, folder: Path, val_labels: bool) -> Path:
    rows = ["image,labels,split"]
    for split in ("train", "val"):
        coco = json.loads((synthetic / "annotations" / f"instances_{split}.json").read_text())
        names = {c["id"]: c["name"] for c in coco["categories"]}
        labels = {}
        for a in coco["annotations"]:
            labels.setdefault(a["image_id"], set()).add(names[a["category_id"]])
        (folder / split).mkdir(parents=True)
        for image in coco["images"]:
            shutil.copy(synthetic / split / image["file_name"], folder / split / image["file_name"])
            kept = labels.get(image["id"], set()) if split == "train" or val_labels else set()
            rows.append(f"{split}/{image['file_name']},{'|'.join(sorted(kept))},{split}")
    (folder / "classes.txt").write_text("\n".join(sorted(names.values())) + "\n")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture(scope="session")
def csv_copy():
    """``csv_copy(synthetic, folder, val_labels)``: a generated COCO-layout set (``make_synthetic``) as a csv
    dataset in ``folder`` (labels.csv, classes.txt); the validation rows keep their labels or get none."""
    return _csv_copy


@pytest.fixture
def refuse_model_load(monkeypatch):
    """``refuse_model_load(app_module)``: the app's ``load_model`` fails the run with a message (a test sees it,
    rather than a silent load) and is recorded; returns the list of the calls."""
    from asl.errors import UsageError

    def install(module):
        calls = []

        def refuse(*args, **kwargs):
            calls.append(args)
            raise UsageError("the model was loaded")

        monkeypatch.setattr(module, "load_model", refuse)
        return calls

    return install


@pytest.fixture(scope="session")
def run_script():
    """``run_script(['train.py', ...], cwd=None, env=None, unset=(), timeout=240)``: a root script (or ``-c CODE``,
    ``-m module``) in a fresh interpreter, one OpenMP thread, unbuffered, with ``env`` added and the variables in
    ``unset`` removed; returns the CompletedProcess with text output."""

    def run(args, cwd=None, env=None, unset=(), timeout=240) -> subprocess.CompletedProcess:
        full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        full_env.update(env or {})
        for name in unset:
            full_env.pop(name, None)
        argv = [str(REPO / a) if str(a).endswith(".py") and i == 0 else str(a) for i, a in enumerate(args)]
        return subprocess.run([sys.executable, *argv], cwd=cwd or REPO, env=full_env, capture_output=True,
                              text=True, timeout=timeout)

    return run


_SELF_KILLING_TRAIN = r"""
import asl.training.loop
from asl.apps import train

original = asl.training.loop.train_one_epoch


def killing(*args, **kwargs):
    on_step = kwargs["on_step"]

    def hook(info):
        on_step(info)
        if should_die(info):
            os.kill(os.getpid(), signal.SIGKILL)

    kwargs["on_step"] = hook
    return original(*args, **kwargs)


asl.training.loop.train_one_epoch = killing
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.fixture(scope="session")
def self_killing_train():
    """``self_killing_train(should_die)`` -> the source of a train.py (run it with ``python -c`` or as a file)
    that SIGKILLs itself right after the step for which ``should_die(info)`` is true. ``should_die`` is Python
    source defining that function (``os``, ``signal`` and ``sys`` are imported; it may read ``sys.argv``)."""
    return lambda should_die: "import os, signal, sys\n" + should_die + _SELF_KILLING_TRAIN
