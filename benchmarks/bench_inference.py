"""Inference speed of ``prepare_for_inference`` against timm's TResNet in eval mode, in one process on the same
weights and inputs, interleaved, median of the repeats; also how far the outputs are from timm's.

Rows: timm (the reference), our unprepared model, the prepared model in each memory layout (``default`` is the one
``prepare_for_inference`` picks for the device), and the prepared model under bf16 autocast (``--amp-dtype
bfloat16`` of validate.py and infer.py). With ``--onnx``, the model exported by export.py's exporter also runs
in onnxruntime and, when it is installed (``pip install openvino``; neither is a dependency of the package), in
OpenVINO, both fp32. The norms get random affine parameters and statistics first, so that the comparison covers the
folding (a freshly initialised timm model has zero norm scales, which InPlaceABN's ``|w| + eps`` cannot express).

    python benchmarks/bench_inference.py --model-name tresnet_m --image-size 224 -b 1 --repeats 9 --onnx
    python benchmarks/bench_inference.py --model-name tresnet_m --image-size 224 -b 8 --repeats 7 --onnx
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from asl.cli import positive_int
from asl.models import convert_timm_tresnet, create_model, default_channels_last, prepare_for_inference


Runner = Callable[[torch.Tensor], torch.Tensor]


def _torch_runner(model: torch.nn.Module, amp: bool) -> Runner:
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            return model(x).float()

    return run


def onnx_runners(model: torch.nn.Module, image_size: int, folder: Path) -> dict[str, Runner]:
    """onnxruntime and, if installed, OpenVINO on the ONNX file export.py writes for ``model``."""
    import onnxruntime as ort

    from asl.apps.export import export_onnx

    path = folder / "model.onnx"
    export_onnx(model, path, image_size, opset=17)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    runners = {"onnxruntime (fp32)": lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])}
    try:
        import openvino as ov
    except ImportError:
        return runners
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    runners["OpenVINO (fp32)"] = lambda x: torch.from_numpy(compiled(x.numpy())[0])
    return runners


def _seconds(run: Runner, x: torch.Tensor) -> float:
    start = time.perf_counter()
    run(x)
    return time.perf_counter() - start


@torch.no_grad()
def randomize_norms(model: torch.nn.Module, generator: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            for t, low, high in ((m.weight, 0.5, 1.5), (m.bias, -0.2, 0.2), (m.running_mean, -0.2, 0.2),
                                 (m.running_var, 0.5, 1.5)):
                t.copy_(torch.empty_like(t).uniform_(low, high, generator=generator))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-name", default="tresnet_m")
    parser.add_argument("--image-size", type=positive_int, default=224)
    parser.add_argument("-b", "--batch-size", type=positive_int, default=8)
    parser.add_argument("--repeats", type=positive_int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--onnx", action="store_true", help="also onnxruntime and OpenVINO on the ONNX export")
    args = parser.parse_args(argv)
    import timm

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    reference = timm.create_model(args.model_name, num_classes=80)
    randomize_norms(reference, torch.Generator().manual_seed(0))
    reference = reference.eval().to(device)
    plain = create_model(args.model_name, 80).eval()
    plain.load_state_dict(convert_timm_tresnet(reference.state_dict()))
    plain = plain.to(device)
    default = "channels_last" if default_channels_last(device) else "NCHW"
    runners = {"timm (eval)": _torch_runner(reference, False), "ours, unprepared": _torch_runner(plain, False),
               "prepared, NCHW": _torch_runner(prepare_for_inference(plain, channels_last=False), False),
               "prepared, channels_last": _torch_runner(prepare_for_inference(plain, channels_last=True), False),
               "prepared, bf16 autocast": _torch_runner(prepare_for_inference(plain), True)}
    folder = tempfile.TemporaryDirectory()
    if args.onnx:
        runners.update(onnx_runners(prepare_for_inference(plain.cpu(), channels_last=False), args.image_size,
                                    Path(folder.name)))
    x = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=device)
    with torch.inference_mode():
        expected = reference(x)
    err = {name: ((run(x) - expected).abs().max() / expected.abs().max()).item() for name, run in runners.items()}
    times: dict[str, list[float]] = {name: [] for name in runners}
    for run in runners.values():
        _seconds(run, x)  # warm-up: oneDNN primitive creation, first-touch allocation
    for _ in range(args.repeats):
        for name, run in runners.items():
            times[name].append(_seconds(run, x))
    ref = statistics.median(times["timm (eval)"])
    print(f"{args.model_name} {args.image_size}px batch {args.batch_size} on {device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}; prepare_for_inference's default: {default}")
    print("| model | images/s | vs timm | max rel. diff. from timm |")
    print("| --- | --- | --- | --- |")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"| {name} | {args.batch_size / med:.1f} | {ref / med:.2f}x | {err[name]:.1e} |")
    folder.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
