"""The prepared GPU benchmark runs end to end on the CPU (``--dry-run``), so a GPU session only has to launch it.
In-process: what is tested is the script's code paths, not a process boundary."""
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_benchmark_dry_run(tmp_path, one_thread, capsys):
    spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "benchmarks" / "bench_gpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--dry-run", "--output-dir", str(tmp_path)]) == 0, capsys.readouterr().err[-3000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    [row] = report["throughput"]
    for key in ("asl train img/s", "timm train img/s", "asl eval img/s", "timm eval img/s"):
        assert row[key] > 0, key
    assert [r["amp"] for r in report["gradients"]] == ["none", "float16", "bfloat16"]
    assert report["smoke"]["exit code"] == 0
    table = (tmp_path / "gpu.md").read_text()
    assert "| model, size, batch | amp |" in table and "train.py smoke run: exit code 0" in table
