"""The prepared GPU benchmark runs end to end on the CPU (``--dry-run``), so a GPU session only has to launch it."""
import json

import pytest


@pytest.mark.slow
def test_gpu_benchmark_dry_run(run_script, tmp_path):
    proc = run_script(["benchmarks/bench_gpu.py", "--dry-run", "--output-dir", str(tmp_path)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    [row] = report["throughput"]
    for key in ("asl train img/s", "timm train img/s", "asl eval img/s", "timm eval img/s"):
        assert row[key] > 0, key
    assert [r["amp"] for r in report["gradients"]] == ["none", "float16", "bfloat16"]
    assert report["smoke"]["exit code"] == 0
    table = (tmp_path / "gpu.md").read_text()
    assert "| model, size, batch | amp |" in table and "train.py smoke run: exit code 0" in table
