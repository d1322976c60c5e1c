"""TResNet + ASL on one GPU, against timm's TResNet: one command (benchmarks/gpu.sh) that reports

- training forward+backward images/s and peak memory, TResNet-M at 224 and TResNet-L at 448, for ours eager, ours
  under ``torch.compile`` and timm's, each under AMP fp16 (with GradScaler) and bf16;
- inference images/s of ``prepare_for_inference`` against timm's eval model;
- the memory-saving norm's gradients on the GPU against plain autograd's, under fp32, fp16 and bf16 autocast
  (the error of each against the fp32 gradients; tests/test_amp.py states the same criterion on the CPU);
- a 50-step ``train.py`` smoke run on generated data with the recipe's defaults (AMP on CUDA).

It writes ``OUT/gpu.json`` (every figure) and ``OUT/gpu.md`` (a Markdown table for BENCHMARKS.md). ``--dry-run`` runs
the same code on the CPU with tiny sizes, to check the script without a GPU (tests/test_benchmarks.py).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from asl.losses import AsymmetricLoss
from asl.models import create_model, prepare_for_inference
from asl.precision import AMP_DTYPES, autocast

FULL = {"configs": [("tresnet_m", 224, 128), ("tresnet_l", 448, 64)], "steps": 10, "warmup": 3,
        "amps": ["float16", "bfloat16"], "compile": True, "smoke_steps": 50, "smoke_size": 224, "smoke_batch": 32,
        "smoke_images": (256, 64), "smoke_workers": 2, "gradient_size": 64}
DRY = {"configs": [("tresnet_m", 32, 2)], "steps": 1, "warmup": 0, "amps": ["bfloat16"], "compile": False,
       "smoke_steps": 2, "smoke_size": 32, "smoke_batch": 4, "smoke_images": (8, 4), "smoke_workers": 0,
       "gradient_size": 32}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _variants(name: str, device: torch.device, compile_: bool) -> dict[str, nn.Module]:
    import timm

    torch.manual_seed(0)
    ours = create_model(name, 80).to(device, memory_format=torch.channels_last)
    variants = {"asl": ours, "timm": timm.create_model(name, num_classes=80).to(device,
                                                                                 memory_format=torch.channels_last)}
    if compile_:
        variants["asl compiled"] = torch.compile(copy.deepcopy(ours))
    return variants


def train_throughput(model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: str, steps: int,
                     warmup: int) -> tuple[float, Optional[float]]:
    """(images/s, peak GiB) of the recipe's step: autocast forward, fp32 summed ASL, scaled backward, Adam."""
    device = x.device
    dtype = AMP_DTYPES[amp]
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    criterion = AsymmetricLoss(gamma_neg=4, gamma_pos=0, clip=0.05, disable_torch_grad_focal_loss=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for step in range(warmup + steps):
        if step == warmup:
            _sync(device)
            start = time.perf_counter()
        with autocast(device, dtype):
            out = model(x).float()
        loss = criterion(out, y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    _sync(device)
    elapsed = time.perf_counter() - start
    peak = round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None
    return x.shape[0] * steps / elapsed, peak


@torch.inference_mode()
def eval_throughput(model: nn.Module, x: torch.Tensor, amp: str, steps: int, warmup: int) -> float:
    model.eval()
    start = time.perf_counter()
    for step in range(warmup + steps):
        if step == warmup:
            _sync(x.device)
            start = time.perf_counter()
        with autocast(x.device, AMP_DTYPES[amp]):
            model(x)
    _sync(x.device)
    return x.shape[0] * steps / (time.perf_counter() - start)


def throughput_rows(device: torch.device, plan: dict) -> list[dict]:
    rows = []
    for name, size, batch in plan["configs"]:
        x = torch.rand(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
        y = (torch.rand(batch, 80, device=device) < 0.05).float()
        variants = _variants(name, device, plan["compile"])
        prepared = prepare_for_inference(create_model(name, 80).to(device))
        for amp in plan["amps"]:
            row = {"model": name, "size": size, "batch": batch, "amp": amp, "device": str(device)}
            for label, model in variants.items():
                ips, peak = train_throughput(model, x, y, amp, plan["steps"], plan["warmup"])
                row[f"{label} train img/s"], row[f"{label} peak GiB"] = round(ips, 1), peak
            row["asl eval img/s"] = round(eval_throughput(prepared, x, amp, plan["steps"], plan["warmup"]), 1)
            row["timm eval img/s"] = round(eval_throughput(variants["timm"], x, amp, plan["steps"], plan["warmup"]),
                                           1)
            print(json.dumps(row), flush=True)
            rows.append(row)
        del variants, prepared
    return rows


def gradient_rows(device: torch.device, size: int) -> list[dict]:
    """The memory-saving norm against plain autograd under each autocast dtype, both measured against fp32."""
    torch.manual_seed(0)
    base = create_model("tresnet_m", 5).to(device).train()
    with torch.no_grad():
        for p in base.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.0)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, size, size, generator=g).to(device)
    y = (torch.rand(4, 5, generator=g) > 0.5).float().to(device)

    def grads(memory_efficient: bool, dtype) -> dict:
        model = copy.deepcopy(base)
        for module in model.modules():
            if hasattr(module, "memory_efficient"):
                module.memory_efficient = memory_efficient
        with autocast(device, dtype):
            out = model(x)
        AsymmetricLoss(4, 0, 0.05)(out.float(), y).backward()
        return {n: p.grad.double() for n, p in model.named_parameters()}

    reference = grads(False, None)
    rows = []
    for amp in ("none", "float16", "bfloat16"):
        row = {"amp": amp}
        for memory_efficient in (False, True):
            got = grads(memory_efficient, AMP_DTYPES[amp])
            errors = [((got[n] - r).abs().max() / r.abs().max()).item() for n, r in reference.items()]
            label = "memory-saving" if memory_efficient else "plain"
            row[f"{label} median"], row[f"{label} worst"] = statistics.median(errors), max(errors)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def smoke_run(device: torch.device, plan: dict) -> dict:
    """train.py's defaults on generated data for a few steps: it runs, and how fast."""
    from asl.apps import train

    with tempfile.TemporaryDirectory() as tmp:
        num_train, num_val = plan["smoke_images"]
        argv = [str(Path(tmp) / "data"), "--dataset", "synthetic", "--dataset-option", f"num_train={num_train}",
                "--dataset-option", f"num_val={num_val}", "--image-size", str(plan["smoke_size"]), "-b",
                str(plan["smoke_batch"]), "-j", str(plan["smoke_workers"]), "--epochs", "1", "--stop-epoch", "0", "--max-steps-per-epoch",
                str(plan["smoke_steps"]), "--device", device.type, "--output-dir", str(Path(tmp) / "run")]
        start = time.perf_counter()
        code = train.main(argv)
        elapsed = time.perf_counter() - start
        log = Path(tmp) / "run" / "log.txt"
        record = json.loads(log.read_text().splitlines()[-1]) if log.is_file() else {}
    row = {"exit code": code, "seconds": round(elapsed, 1), "mAP": record.get("mAP"),
           "images/s": record.get("images_per_sec")}
    print(json.dumps({"smoke": row}), flush=True)
    return row


def markdown(report: dict) -> str:
    lines = ["| model, size, batch | amp | train img/s: asl / compiled / timm | peak GiB: asl / compiled / timm | "
             "eval img/s: asl / timm |", "| --- | --- | --- | --- | --- |"]
    for r in report["throughput"]:
        lines.append(f"| {r['model']}, {r['size']}, {r['batch']} | {r['amp']} | {r['asl train img/s']} / "
                     f"{r.get('asl compiled train img/s', '-')} / {r['timm train img/s']} | {r['asl peak GiB']} / "
                     f"{r.get('asl compiled peak GiB', '-')} / {r['timm peak GiB']} | {r['asl eval img/s']} / "
                     f"{r['timm eval img/s']} |")
    lines += ["", "| autocast | gradient error vs fp32, plain: median / worst | memory-saving: median / worst |",
              "| --- | --- | --- |"]
    for r in report["gradients"]:
        lines.append(f"| {r['amp']} | {r['plain median']:.2e} / {r['plain worst']:.2e} | "
                     f"{r['memory-saving median']:.2e} / {r['memory-saving worst']:.2e} |")
    smoke = report["smoke"]
    lines += ["", f"train.py smoke run: exit code {smoke['exit code']}, {smoke['seconds']} s, "
                  f"{smoke['images/s']} images/s, mAP {smoke['mAP']}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path("benchmarks/gpu_results"))
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled rows (each compile costs minutes)")
    parser.add_argument("--dry-run", action="store_true", help="the CPU, tiny sizes, one step, no compile")
    args = parser.parse_args(argv)
    plan = dict(DRY if args.dry_run else FULL)
    if args.no_compile:
        plan["compile"] = False
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "throughput": throughput_rows(device, plan),
              "gradients": gradient_rows(device, plan["gradient_size"]), "smoke": smoke_run(device, plan)}
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "gpu.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (args.output_dir / "gpu.md").write_text(table)
    print("\n" + table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
