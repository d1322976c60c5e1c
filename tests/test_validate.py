"""validate.py end to end on real COCO images, against an independent reference.

The checkpoint is made here in the official model-zoo layout ``{'model', 'num_classes', 'idx_to_class'}`` from
timm's TResNet-M, converted with ``asl.models.convert_timm_tresnet``. The reference scores come from timm's own
forward on pictures loaded with PIL + torchvision ``Resize((s, s))`` + ``ToTensor``; the reference mAP is
sklearn's ``average_precision_score`` per class, with 0 for a class that has no positive (the original's mAP
divides by ``positives + 1e-8``, so such a class scores 0 and still counts in the mean), averaged over all 80.

Why the weights are shaped: with random weights the scores of different pictures differ by less than the
float32 rounding between two implementations of the same network (~1e-5), so a ranking (and the AP) could flip
on a rounding difference. The test therefore (1) sets the BatchNorm statistics from the pictures, so features
differ between pictures, and (2) solves the classifier so that, within each class, the logits of the pictures
land on a grid 0.1 apart (in a random order biased towards the positives). Every score gap is then ~1000x the
rounding error, and the reference ranking is the only possible one. The reference still runs timm's forward.
"""
from __future__ import annotations

import functools
import http.server
import json
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm")
sklearn_metrics = pytest.importorskip("sklearn.metrics")
from PIL import Image  # noqa: E402
from torchvision import transforms as T  # noqa: E402

from asl.cli import run_main  # noqa: E402
from asl.models import convert_timm_tresnet  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "tiny_coco"
SIZE = 32  # TResNet works down to 32 pixels (1x1 after the last stage); 4x cheaper than 64
SPLIT = "val2017"

pytestmark = pytest.mark.skipif(not (DATA / "annotations" / f"instances_{SPLIT}.json").is_file(),
                                reason=f"shared test data not found at {DATA}")


from asl.apps import validate  # noqa: E402


# ------------------------------------------------------------------------------------------ reference side

def coco_labels(ann_file: Path):
    """Class names (json order), and {file_name: multi-hot} for images with at least one annotation."""
    data = json.loads(ann_file.read_text())
    index = {c["id"]: i for i, c in enumerate(data["categories"])}
    names = [c["name"] for c in data["categories"]]
    files = {im["id"]: im["file_name"] for im in data["images"]}
    labels: dict[str, np.ndarray] = {}
    for ann in data["annotations"]:
        row = labels.setdefault(files[ann["image_id"]], np.zeros(len(names)))
        row[index[ann["category_id"]]] = 1.0
    return names, labels


def load_pictures(folder: Path, names, size: int) -> torch.Tensor:
    tf = T.Compose([T.Resize((size, size)), T.ToTensor()])
    return torch.stack([tf(Image.open(folder / n).convert("RGB")) for n in names])


def reference_ap(t: np.ndarray, s: np.ndarray) -> float:
    """sklearn's AP, times P / (P + 1e-8): the original divides the summed precisions by ``positives + 1e-8``."""
    positives = float(t.sum())
    if positives == 0:
        return 0.0
    return sklearn_metrics.average_precision_score(t, s) * positives / (positives + 1e-8)


def reference_map(targets: np.ndarray, scores: np.ndarray) -> float:
    return 100.0 * float(np.mean([reference_ap(targets[:, k], scores[:, k]) for k in range(targets.shape[1])]))


def reference_threshold_line(targets: np.ndarray, scores: np.ndarray, thre: float) -> list[float]:
    """The original's P_C R_C F_C P_O R_O F_O, written out: F_C is the mean of per-class F1, 0 without a TP."""
    pred = scores > thre
    tp = (pred & (targets == 1)).sum(0).astype(float)
    fp = (pred & (targets == 0)).sum(0).astype(float)
    fn = (~pred & (targets == 1)).sum(0).astype(float)
    p = [100 * tp[k] / (tp[k] + fp[k]) if tp[k] > 0 else 0.0 for k in range(len(tp))]
    r = [100 * tp[k] / (tp[k] + fn[k]) if tp[k] > 0 else 0.0 for k in range(len(tp))]
    f = [2 * p[k] * r[k] / (p[k] + r[k]) if tp[k] > 0 else 0.0 for k in range(len(tp))]
    p_o = 100 * tp.sum() / (tp.sum() + fp.sum()) if tp.sum() + fp.sum() else 0.0
    r_o = 100 * tp.sum() / (tp.sum() + fn.sum()) if tp.sum() + fn.sum() else 0.0
    f_o = 2 * p_o * r_o / (p_o + r_o) if p_o + r_o else 0.0
    return [float(np.mean(p)), float(np.mean(r)), float(np.mean(f)), p_o, r_o, f_o]


def shaped_timm_tresnet(x: torch.Tensor, targets: np.ndarray, seed: int = 0, name: str = "tresnet_m"):
    """timm TResNet with picture-calibrated BatchNorm and a classifier solved for well-separated logits; and the
    pooled features of ``x``."""
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=targets.shape[1])
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                # Scales >= 1e-5 so that the official |w| + 1e-5 parameterisation represents them exactly.
                m.weight.uniform_(0.5, 1.0)
                m.bias.uniform_(-0.1, 0.1)
                m.momentum = None  # cumulative average over the calibration pass
        model.train()
        model(x)
        model.eval()
        feats = model.forward_head(model.forward_features(x), pre_logits=True).double()
        rng = np.random.default_rng(seed)
        ranks = (targets + rng.normal(size=targets.shape)).argsort(0).argsort(0)
        wanted = torch.from_numpy(0.1 * ranks - 0.05 * (len(x) - 1))
        design = torch.cat([feats, torch.ones(len(x), 1, dtype=torch.float64)], 1)
        solution = torch.linalg.lstsq(design, wanted, driver="gelsd").solution
        model.head.fc.weight.copy_(solution[:-1].T.float())
        model.head.fc.bias.copy_(solution[-1].float())
    return model, feats.float()


def official_checkpoint(model, class_names) -> dict:
    return {"model": convert_timm_tresnet(model.state_dict()), "num_classes": len(class_names),
            "idx_to_class": dict(enumerate(class_names))}


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    class_names, labels = coco_labels(DATA / "annotations" / f"instances_{SPLIT}.json")
    files = sorted(labels)
    targets = np.stack([labels[f] for f in files])
    x = load_pictures(DATA / SPLIT, files, SIZE)
    model, feats = shaped_timm_tresnet(x, targets)
    with torch.no_grad():
        # timm's classifier on timm's pooled features: timm's forward, without running the backbone again.
        scores = torch.sigmoid(model.get_classifier()(feats)).double().numpy()
    # The premise of the exact comparison: within each class, every score differs from every other by far more
    # than float32 rounding between two implementations (~1e-5).
    for k in range(scores.shape[1]):
        column = np.sort(scores[:, k])
        assert np.diff(column).min() > 1e-3
    path = tmp_path_factory.mktemp("ckpt") / "MS_COCO_tresnet_m_test.pth"
    torch.save(official_checkpoint(model, class_names), path)
    return {"path": path, "files": files, "targets": targets, "scores": scores, "class_names": class_names,
            "map": reference_map(targets, scores)}


def subset(ref, keep) -> tuple[np.ndarray, np.ndarray]:
    rows = [i for i, f in enumerate(ref["files"]) if f in keep]
    return ref["targets"][rows], ref["scores"][rows]


# --------------------------------------------------------------------------------------------- helpers

def printed_map(stdout: str) -> float:
    last = stdout.strip().splitlines()[-1]
    found = re.fullmatch(r"mAP score: (\S+)", last)
    assert found, f"the output does not end with 'mAP score: X': {last!r}"
    return float(found.group(1))


def check_coverage_lines(stdout: str, targets: np.ndarray, scores: np.ndarray) -> None:
    """validate.py's lines on classes without positives, against the reference: the count, and sklearn's AP
    averaged over the classes that have a positive, on lines before the last."""
    present = [k for k in range(targets.shape[1]) if targets[:, k].sum() > 0]
    missing = targets.shape[1] - len(present)
    assert missing > 0  # 50 real COCO pictures cannot hold every one of the 80 classes
    lines = stdout.strip().splitlines()
    count = next(ln for ln in lines[:-1] if ln.startswith("classes with no positive in the evaluated set: "))
    assert count.startswith(f"classes with no positive in the evaluated set: {missing} of {targets.shape[1]};")
    line = next(ln for ln in lines[:-1] if ln.startswith("mAP over the "))
    found = re.fullmatch(r"mAP over the (\d+) classes present: ([\d.]+) \(over all (\d+) classes: ([\d.]+)\)", line)
    assert found, line
    want = 100.0 * np.mean([reference_ap(targets[:, k], scores[:, k]) for k in present])
    assert int(found.group(1)) == len(present) and int(found.group(3)) == targets.shape[1]
    assert float(found.group(2)) == pytest.approx(want, abs=0.006)
    assert float(found.group(4)) == pytest.approx(reference_map(targets, scores), abs=0.006)


def printed_star_line(stdout: str) -> list[float]:
    line = next(ln for ln in stdout.splitlines() if ln.startswith(" * P_C"))
    return [float(v) for v in re.findall(r"[A-Z]_[A-Z] ([\d.]+)", line)]


def make_dataset_copy(root: Path, keep_files, corrupt=None, split=SPLIT, out_split=None) -> Path:
    """A COCO layout under ``root`` whose json keeps the annotations of ``keep_files`` only (links to the pictures)."""
    out_split = out_split or split
    data = json.loads((DATA / "annotations" / f"instances_{split}.json").read_text())
    ids = {im["id"] for im in data["images"] if im["file_name"] in keep_files}
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in ids]
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / f"instances_{out_split}.json").write_text(json.dumps(data))
    (root / out_split).mkdir()
    for im in data["images"]:
        target = root / out_split / im["file_name"]
        if im["file_name"] == corrupt:
            target.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
        else:
            target.symlink_to(DATA / split / im["file_name"])
    return root


# ----------------------------------------------------------------------------------------------- tests

def test_in_process_original_spelling_matches_reference(ref, tmp_path, capsys):
    out_json = tmp_path / "metrics.json"
    code = run_main(validate.main, [str(DATA), "--model_name=tresnet_m", f"--model_path={ref['path']}",
                                    f"--val_split={SPLIT}", f"--image_size={SIZE}", "--batch_size=16",
                                    "--workers=0", "--print_freq=1", "--thre=0.8", "--per_class",
                                    f"--output_json={out_json}"])
    stdout = capsys.readouterr().out
    assert code == 0
    assert printed_map(stdout) == pytest.approx(ref["map"], abs=1e-9)
    # Per-batch lines as the original: "Test: [i/N] ..." then the cumulative P_C line; 48 images / 16 = 3 batches.
    assert re.search(r"^Test: \[0/3\]\tTime .*Precision .*Recall ", stdout, re.M)
    assert re.search(r"^Test: \[2/3\]", stdout, re.M)
    assert len(re.findall(r"^P_C [\d.]+ R_C [\d.]+ F_C [\d.]+ P_O [\d.]+ R_O [\d.]+ F_O [\d.]+$", stdout, re.M)) == 3
    expected = reference_threshold_line(ref["targets"], ref["scores"], 0.8)
    assert expected[0] > 0  # the threshold is not trivial for these scores
    assert printed_star_line(stdout) == pytest.approx(expected, abs=0.006)
    assert "images/s" in stdout
    assert re.search(r"^\s+0\s+person\s", stdout, re.M)  # --per-class table

    report = json.loads(out_json.read_text())
    assert report["mAP"] == pytest.approx(ref["map"], abs=1e-9) and report["metric"] == "mAP"
    assert report["num_images"] == len(ref["files"]) == 48
    assert [r["class"] for r in report["per_class"]] == ref["class_names"]
    for k, row in enumerate(report["per_class"]):
        t, s = ref["targets"][:, k], ref["scores"][:, k]
        want = 100 * reference_ap(t, s)
        assert row["ap"] == pytest.approx(want, abs=1e-9), row["class"]
        assert row["positives"] == int(t.sum())
    for key, value in zip(["P_C", "R_C", "F_C", "P_O", "R_O", "F_O"], expected):
        assert report[key] == pytest.approx(value, abs=1e-9)


def test_url_without_model_name_detects_architecture(ref, tmp_path, monkeypatch, capsys):
    serve_dir = tmp_path / "www"
    serve_dir.mkdir()
    shutil.copy(ref["path"], serve_dir / "zoo_model.pth")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(serve_dir))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    torch_home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    url = f"http://127.0.0.1:{server.server_address[1]}/zoo_model.pth"
    try:
        code = run_main(validate.main, [str(DATA), "--model-path", url, "--val-split", SPLIT, "--image-size",
                                        str(SIZE), "-b", "32", "-j", "0"])
    finally:
        server.shutdown()
        server.server_close()
    stdout = capsys.readouterr().out
    assert code == 0
    assert printed_map(stdout) == pytest.approx(ref["map"], abs=1e-9)
    assert "model: tresnet_m" in stdout  # the detected architecture is reported
    assert len(list((torch_home / "hub" / "checkpoints").glob("zoo_model-*.pth"))) == 1  # in the hub cache


def test_model_name_contradicting_the_file_is_one_line_error(ref, capsys):
    code = run_main(validate.main, [str(DATA), "--model-name", "tresnet_l", "--model-path", str(ref["path"]),
                                    "--val-split", SPLIT, "--image-size", str(SIZE)], prog="validate.py")
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "tresnet_l" in err and "tresnet_m" in err, err


def test_missing_checkpoint_subprocess_exits_2_without_traceback(tmp_path, run_script):
    proc = run_script(["validate.py", DATA, "--model_path", tmp_path / "nope.pth"])
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "nope.pth" in proc.stderr


@pytest.fixture(scope="module")
def odd_dataset(ref, tmp_path_factory):
    """47 annotated pictures (an odd count: DistributedSampler pads with a duplicate), one of them unreadable."""
    keep = set(ref["files"][:-1])
    corrupt = ref["files"][5]
    root = make_dataset_copy(tmp_path_factory.mktemp("odd_coco"), keep, corrupt=corrupt)
    return root, keep - {corrupt}, corrupt


def test_unreadable_image_is_named_and_the_rest_scored(ref, odd_dataset, capsys):
    root, readable, corrupt = odd_dataset
    code = run_main(validate.main, [str(root), "--model-path", str(ref["path"]), "--val-split", SPLIT,
                                    "--image-size", str(SIZE), "-b", "16", "-j", "0"])
    stdout = capsys.readouterr().out
    assert code == 0
    skipped_line = next(ln for ln in stdout.splitlines() if ln.startswith("skipped"))
    assert corrupt in skipped_line and skipped_line.startswith("skipped 1 ")
    targets, scores = subset(ref, readable)
    assert len(targets) == 46
    assert printed_map(stdout) == pytest.approx(reference_map(targets, scores), abs=1e-9)
    check_coverage_lines(stdout, targets, scores)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_torchrun_two_processes_print_the_single_process_map(ref, odd_dataset, capsys, run_script):
    root, readable, _ = odd_dataset
    args = [str(root), "--model-path", str(ref["path"]), "--val-split", SPLIT, "--image-size", str(SIZE),
            "-b", "8", "-j", "0"]
    assert run_main(validate.main, args) == 0
    single = capsys.readouterr().out.strip().splitlines()[-1]
    proc = run_script(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "validate.py", *args,
                       "--device", "cpu"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == single  # identical text: same images, same order, no duplicate from the padding
    assert sum(ln.startswith("mAP score:") for ln in lines) == 1  # rank 0 alone prints
    assert "46 images in" in proc.stdout and "(2 processes, cpu)" in proc.stdout
    targets, scores = subset(ref, readable)
    assert printed_map(proc.stdout) == pytest.approx(reference_map(targets, scores), abs=1e-9)
    # The classes present are counted on the targets gathered from both ranks, not on rank 0's share.
    check_coverage_lines(proc.stdout, targets, scores)


def test_readme_commands_verbatim(ref, tmp_path, monkeypatch, capsys):
    """The original README's validate.py (plus the DATA it forgot) and infer.py commands, run from a folder laid
    out like its examples, with no display: ./models_local/MS_COCO_TRresNet_L_448_86.6.pth (a TResNet-L made from
    timm's, in the official format) and ./pics/000000000885.jpg. Defaults apply: val2014, 448 pixels, -j 8,
    threshold 0.7 in infer. In-process: main(argv) is what the root scripts run."""
    from asl.apps import infer

    picture = ref["files"][0]
    data = make_dataset_copy(tmp_path / "coco", {picture}, out_split="val2014")
    torch.manual_seed(0)
    model = timm.create_model("tresnet_l", num_classes=80).eval()
    with torch.no_grad():
        for m in model.modules():  # non-zero scales: the conversion is then exact
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.0)
                m.bias.uniform_(-0.2, 0.2)
        model.head.fc.weight.normal_(0.0, 0.1)
    (tmp_path / "models_local").mkdir()
    torch.save(official_checkpoint(model, ref["class_names"]),
               tmp_path / "models_local" / "MS_COCO_TRresNet_L_448_86.6.pth")
    (tmp_path / "pics").mkdir()
    shutil.copy(DATA / SPLIT / picture, tmp_path / "pics" / "000000000885.jpg")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DISPLAY", raising=False)
    capsys.readouterr()
    assert run_main(validate.main, [str(data), "--model_name=tresnet_l",
                                    "--model_path=./models_local/MS_COCO_TRresNet_L_448_86.6.pth"]) == 0
    stdout = capsys.readouterr().out
    assert re.search(r"^ \* P_C [\d.]+ R_C [\d.]+ F_C [\d.]+ P_O [\d.]+ R_O [\d.]+ F_O [\d.]+$", stdout, re.M)
    assert "tresnet_l" in stdout and "1 images" in stdout
    targets = ref["targets"][[0]]
    # One picture: every class with a positive has AP 1 whatever the scores, the others 0.
    assert printed_map(stdout) == pytest.approx(reference_map(targets, np.zeros_like(targets)), abs=1e-9)

    assert run_main(infer.main, ["--dataset_type=MS-COCO", "--model_name=tresnet_l",
                                 "--model_path=./models_local/MS_COCO_TRresNet_L_448_86.6.pth",
                                 "--pic_path=./pics/000000000885.jpg", "--input_size=448"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("pics/000000000885.jpg: ")
    # Which classes pass 0.7 is checked against timm's forward by test_infer.py (at a cheaper size); here: the
    # reported classes are names from the file's idx_to_class, with scores above the MS-COCO default 0.7.
    printed = re.findall(r"(?:^|, )([^,]+?) \((\d\.\d+)\)", line.split(": ", 1)[1])
    assert printed and all(name in ref["class_names"] and float(p) >= 0.7 for name, p in printed), line


def test_open_images_class_order_comes_from_the_checkpoint(tmp_path):
    """A 9605-class model scores right only in its own class order: validate.py takes it from idx_to_class."""
    from asl.models import create_model

    root = tmp_path / "oi"
    (root / "test").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ["e1.jpg", "e2.jpg", "e3.jpg"]:
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / "test" / name)
    (root / "classes.csv").write_text("LabelName,DisplayName\n/m/01,Cat\n/m/02,Dog\n/m/03,Car\n/m/04,Tree\n")
    (root / "data.csv").write_text("ImageID,positive,negative,split\n"
                                   "e1.jpg,\"['/m/02']\",\"['/m/04', '/m/03']\",test\n"
                                   "e2.jpg,\"['/m/01', '/m/02']\",\"['/m/04']\",test\n"
                                   "e3.jpg,\"['/m/04']\",\"['/m/01', '/m/02']\",test\n")
    checkpoint = tmp_path / "oi.pth"
    order = ["Tree", "Car", "Dog", "Cat"]  # not the classes.csv order
    torch.save({"model": create_model("tresnet_m", 4).state_dict(), "num_classes": 4,
                "idx_to_class": dict(enumerate(order))}, checkpoint)
    report = tmp_path / "report.json"
    code = run_main(validate.main, [str(root), "--dataset", "openimages", "--model-path",
                                    str(checkpoint), "--image-size", "32", "-j", "0", "--device", "cpu",
                                    "--output-json", str(report)], prog="validate.py")
    assert code == 0
    rows = json.loads(report.read_text())["per_class"]
    assert [r["class"] for r in rows] == order
    # Supports in the checkpoint's order: Tree is positive once, Car never, Dog twice, Cat once.
    assert [r["positives"] for r in rows] == [1, 0, 2, 1]
    assert [r["negatives"] for r in rows] == [2, 1, 1, 1]


def test_save_thresholds_report_and_reuse(ref, tmp_path, capsys):
    """--save-thresholds picks each class's max-F1 set (checked with sklearn's F1 over every possible set),
    --report writes the page with every class (those without positives as n/a), and --thresholds FILE gives the
    F1 that the first run announced."""
    common = [str(DATA), "--model-path", str(ref["path"]), "--val-split", SPLIT, "--image-size", str(SIZE),
              "-b", "48", "-j", "0"]
    th_file, report = tmp_path / "th.json", tmp_path / "report"
    assert run_main(validate.main, common + ["--save-thresholds", str(th_file), "--report", str(report)]) == 0
    first = capsys.readouterr().out
    chosen = json.loads(th_file.read_text())
    assert list(chosen) == ref["class_names"]
    targets, scores = ref["targets"], ref["scores"]
    for k, name in enumerate(ref["class_names"]):
        t, s = targets[:, k], scores[:, k]
        if t.sum() == 0:
            assert chosen[name] == 1.0, name
            continue
        best = max(sklearn_metrics.f1_score(t, s >= c) for c in s)
        assert sklearn_metrics.f1_score(t, s > chosen[name]) == pytest.approx(best), name
    found = re.search(r"micro F1 \(F_O\) ([\d.]+) -> ([\d.]+), macro F1 \(F_C\) ([\d.]+) -> ([\d.]+)", first)
    assert found, first
    assert float(found.group(1)) == pytest.approx(printed_star_line(first)[5], abs=0.006)

    page = (report / "README.md").read_text()
    rows = [line for line in page.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) == 80
    without = [n for k, n in enumerate(ref["class_names"]) if targets[:, k].sum() == 0]
    assert without and all(re.search(rf"\| {re.escape(n)} \| n/a \| 0 \|", page) for n in without)
    assert {"pr_curves.png", "score_histogram.png", "ap_vs_support.png"} <= {p.name for p in report.iterdir()}

    assert run_main(validate.main, common + ["--thresholds", str(th_file)]) == 0
    second = printed_star_line(capsys.readouterr().out)
    assert second[5] == pytest.approx(float(found.group(2)), abs=0.006)
    assert second[2] == pytest.approx(float(found.group(4)), abs=0.006)


def test_threshold_flag_errors(ref, tmp_path, capsys):
    common = [str(DATA), "--model-path", str(ref["path"]), "--val-split", SPLIT, "--image-size", str(SIZE)]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"person": 0.5}))
    cases = [
        (["--threshold-precision", "0.9"], "--threshold-precision chooses the thresholds of --save-thresholds"),
        (["--thresholds", str(tmp_path / "absent.json")], "no such file"),
        (["--thresholds", str(bad)], "no threshold for 79 of the model's classes"),
        (["--report", str(bad)], "is a file; give a folder"),
        (["--save-thresholds", str(tmp_path)], "is a folder; give a file name"),
    ]
    for extra, message in cases:
        assert run_main(validate.main, common + extra) == 2, extra
        err = capsys.readouterr().err
        assert "Traceback" not in err and message in err.strip().splitlines()[-1], (extra, err)
