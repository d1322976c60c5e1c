"""Inference throughput of ``prepare_for_inference`` against timm's TResNet in eval mode, all in one process on the
same weights and inputs, interleaved, median of the repeats; also checks that the outputs agree with timm's.

The prepared model folds the norms into the convolutions and runs channels_last; on the CPU it also computes the 3x3
convolutions as Winograd F(4x4, 3x3) or F(5x5, 3x3), keeps the other convolutions' weights reordered for oneDNN,
and splits each batch between threads that run the whole network single-threaded. Beside it: our plain model, the
prepared model with direct convolutions (``winograd=False``), and with torch's usual threading, each operation
split between the threads (``batch_threads=False``).

    python benchmarks/bench_inference.py --model-name tresnet_m --image-size 224 -b 8 --repeats 7
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from asl.cli import positive_int
from asl.models import convert_timm_tresnet, create_model, prepare_for_inference


def _seconds(model: torch.nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        model(x)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-name", default="tresnet_m")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("-b", "--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--flops", action="store_true",
                        help="also print the convolutions' share of the time and the GFLOP/s they reach")
    args = parser.parse_args(argv)
    import timm

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    reference = timm.create_model(args.model_name, num_classes=80).eval().to(device)
    plain = create_model(args.model_name, 80).eval()
    plain.load_state_dict(convert_timm_tresnet(reference.state_dict()))
    plain = plain.to(device)
    models = {"timm (eval)": reference, "ours, plain": plain,
              "prepared, direct conv": prepare_for_inference(plain, winograd=False),
              "prepared, op threads": prepare_for_inference(plain, batch_threads=False),
              "prepare_for_inference": prepare_for_inference(plain)}
    x = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=device)
    with torch.inference_mode():
        expected = reference(x)
        err = {name: ((models[name](x) - expected).abs().max() / expected.abs().max()).item()
               for name in list(models)[2:]}
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            times[name].append(_seconds(model, x))
    ref = statistics.median(times["timm (eval)"])
    print(f"{args.model_name} {args.image_size}px batch {args.batch_size} on {device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"{name:<23} {args.batch_size / med:8.1f} images/s  {ref / med:5.2f}x timm")
    for name, value in err.items():
        print(f"{name}: max relative difference of the logits from timm's {value:.1e}")
    if args.flops:
        print_conv_share(models["prepared, direct conv"], x, statistics.median(times["prepared, direct conv"]))
    return 0


def print_conv_share(model: torch.nn.Module, x: torch.Tensor, seconds: float) -> None:
    """How far the prepared model with direct convolutions is from the machine's limit: the share of its time spent
    in convolutions (torch profiler) and the rate of multiply-adds they reach (2 FLOPs each, from the layer
    shapes)."""
    from torch.profiler import ProfilerActivity, profile

    flops = []

    def count(module, inputs, output):
        kernel = module.weight.shape[1] * module.weight.shape[2] * module.weight.shape[3]
        flops.append(2 * output.numel() * kernel)

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.inference_mode():
        model(x)
    for h in hooks:
        h.remove()
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(x)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    conv = sum(e.self_cpu_time_total for e in events if "convolution" in e.key)
    print(f"prepared model: {sum(flops) / 1e9:.1f} GFLOP per batch in convolutions, {100 * conv / total:.0f}% of "
          f"its time; {sum(flops) / 1e9 / seconds:.0f} GFLOP/s over the whole forward")


if __name__ == "__main__":
    raise SystemExit(main())
