"""End to end on real COCO images: train TResNet-M on tiny_coco (CPU, 32px), its mAP on its own training images
rises clearly above the untrained model's, validate.py gives the saved model-highest.pth the same mAP, and CPU bf16
autocast (validate.py --amp-dtype bfloat16) changes the scores by bf16 rounding only."""
import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "tiny_coco"


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not (DATA / "annotations").is_dir(), reason="../shared/data/tiny_coco is absent")]



SIZE, BATCH = 32, 10  # 49 annotated images: batches of 10 never leave a single image for BatchNorm


def _untrained_map() -> float:
    from asl.data import create_dataset, create_loader
    from asl.evaluation.predictions import evaluate
    from asl.metrics import mAP
    from asl.models import create_model

    ds = create_dataset("coco", DATA, "train2017", SIZE, train=False, with_index=True)
    torch.manual_seed(0)  # train.py initialises the model right after seeding with --seed (0)
    model = create_model("tresnet_m", ds.num_classes)
    out = evaluate(model, create_loader(ds, BATCH), torch.device("cpu"))
    return mAP(out["targets"], out["scores"])


def test_tresnet_m_learns_tiny_coco_and_validate_agrees(tmp_path):
    import train
    import validate

    baseline = _untrained_map()
    out = tmp_path / "out"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = train.main([str(DATA), "--train-split", "train2017", "--val-split", "train2017",
                           "--image-size", str(SIZE), "-b", str(BATCH), "-j", "0", "--epochs", "3",
                           "--stop-epoch", "2", "--lr", "2e-3", "--ema-decay", "0.9", "--device", "cpu",
                           "--output-dir", str(out), "--print-freq", "2"])
    text = stdout.getvalue()
    assert code == 0, text
    assert text.count("current_mAP = ") == 3
    assert "Epoch [0/3], Step [000/005], LR " in text  # the original's progress line
    records = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1, 2]
    for r in records:
        assert {"train_loss", "mAP_regular", "mAP_ema", "lr", "images_per_sec", "skipped_images"} <= set(r)
        assert r["mAP"] == max(r["mAP_regular"], r["mAP_ema"])
    best = max(r["mAP"] for r in records)
    assert best > baseline + 5 and best > 1.5 * baseline, (baseline, [r["mAP"] for r in records])

    ckpt = torch.load(out / "model-highest.pth", weights_only=True)
    assert ckpt["num_classes"] == 80 and len(ckpt["idx_to_class"]) == 80
    assert ckpt["model_name"] == "tresnet_m" and ckpt["image_size"] == SIZE and isinstance(ckpt["args"], dict)
    assert ckpt["mAP"] == pytest.approx(best) and ckpt["weights"] in ("ema", "regular")

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = validate.main([str(DATA), "--model-name", "tresnet_m", "--model-path", str(out / "model-highest.pth"),
                              "--val-split", "train2017", "--image-size", str(SIZE), "-b", str(BATCH), "-j", "0",
                              "--device", "cpu"])
    assert code == 0, stdout.getvalue()
    last = stdout.getvalue().strip().splitlines()[-1]
    assert last.startswith("mAP score:")
    # validate.py folds BatchNorm into the convolutions: the same function up to float rounding
    assert float(last.split(":")[1]) == pytest.approx(best, abs=0.05)

    # CPU bf16 (validate.py --amp-dtype bfloat16 is this evaluation with that dtype): the same mAP within half a
    # point, scores moved by bf16 rounding (not at all would mean the dtype was ignored; more than 0.05 would be
    # more than rounding).
    (fp32, fp32_map), (bf16, bf16_map) = (_scores(out / "model-highest.pth", dtype) for dtype in (None, torch.bfloat16))
    assert fp32_map == pytest.approx(float(last.split(":")[1]), abs=1e-6)
    assert bf16_map == pytest.approx(fp32_map, abs=0.5)
    assert 0 < (fp32 - bf16).abs().max().item() <= 0.05


def _scores(checkpoint: Path, amp_dtype) -> tuple[torch.Tensor, float]:
    """(scores, mAP) of the checkpoint on the training split, as validate.py evaluates it."""
    from asl.data import create_dataset, create_loader
    from asl.evaluation.predictions import evaluate
    from asl.metrics import mAP
    from asl.models.loading import load_model

    ds = create_dataset("coco", DATA, "train2017", SIZE, train=False, with_index=True)
    model = load_model(checkpoint).model
    out = evaluate(model, create_loader(ds, BATCH), torch.device("cpu"), amp_dtype=amp_dtype)
    return torch.as_tensor(out["scores"]), mAP(out["targets"], out["scores"])


def test_pth_to_hub_folder_to_cache_to_hub_id_keeps_the_map_on_real_photos(tmp_path, run_script):
    """export.py --format hf, the folder placed in huggingface_hub's cache layout, then validate.py with the
    hf-hub: id offline: the same mAP on the real tiny_coco photos as the .pth file (fresh weights: only the round
    trip matters here)."""
    import shutil

    import export
    import validate
    from asl.checkpoint import make_model_checkpoint, save_checkpoint
    from asl.data import create_dataset
    from asl.models import create_model

    ds = create_dataset("coco", DATA, "val2017", SIZE, train=False)
    torch.manual_seed(0)
    model = create_model("tresnet_m", ds.num_classes)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.0)
    pth = tmp_path / "model.pth"
    save_checkpoint(make_model_checkpoint(model.state_dict(), ds.num_classes, ds.idx_to_class(),
                                          model_name="tresnet_m", image_size=SIZE), pth)
    folder = tmp_path / "published"
    assert export.main(["--model-path", str(pth), "--format", "hf", "--output", str(folder)]) == 0
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    repo = tmp_path / "hf-home" / "hub" / "models--you--asl-tiny-coco"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)
    env = {"HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1"}

    scores = []
    flags = [str(DATA), "--val-split", "val2017", "-b", "10", "-j", "0", "--device", "cpu", "--model-path"]
    for source in (str(pth), str(folder)):
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            assert validate.main([*flags, source]) == 0
        scores.append(stdout.getvalue())
    # The Hub id in a fresh interpreter: huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when it is imported.
    proc = run_script(["validate.py", *flags, "hf-hub:you/asl-tiny-coco"], env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    scores.append(proc.stdout)
    assert all(f"image size: {SIZE} (stored in the checkpoint)" in text for text in scores)
    maps = [float(text.strip().splitlines()[-1].split(":")[1]) for text in scores]
    assert maps[0] == maps[1] == maps[2]
