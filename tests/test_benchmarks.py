"""The prepared GPU benchmark runs end to end on the CPU (``--dry-run``), so a GPU session only has to launch it."""
import json

import pytest


@pytest.mark.slow
def test_gpu_benchmark_dry_run(run_script):
    proc = run_script(["benchmarks/bench_gpu.py", "--dry-run"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["channels_last"] for r in rows] == [False, True]
    for row in rows:
        for key in ("asl_train_img_s", "timm_train_img_s", "asl_eval_img_s", "timm_eval_img_s"):
            assert row[key] > 0, key
    assert "| amp | channels_last | compile |" in proc.stdout
