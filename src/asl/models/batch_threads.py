"""CPU inference with the batch split between threads, each running the whole network on its share single-threaded.

torch's usual CPU parallelism splits every operation between the threads. Each pass over memory then reads much
of what the previous pass wrote on another core. On our 2-vCPU machine that traffic is cheap at some times and 3x
to 5x slower at others (where the host places the virtual CPUs, we believe; BENCHMARKS.md), and the Winograd
transforms, which are such passes, made the prepared TResNet-M swing between about 1.3x and 0.86x timm's speed
(batch 8 at 224). With the batch split, each image stays on one core from the first layer to the last and only the
read-only weights are shared: 1.30x to 1.43x in each of nine processes. Single-threaded work also suits the
layers' own choices: the Winograd transforms pay off on narrower layers with one thread
(``benchmarks/bench_winograd.py --threads 1``).

The threads are made per call and each sets torch's thread count to 1 for itself (``torch.set_num_threads``
applies to the calling thread's OpenMP and MKL settings); the caller's count is put back before returning. The
split happens only for plain fp32 CPU inference of a batch of at least two (see
:func:`~asl.models.fastpath.plain_cpu_inference`), with as many shares as torch has threads, at most one image each.
"""
from __future__ import annotations

import threading

import torch
import torch.nn as nn

from .fastpath import plain_cpu_inference

__all__ = ["BatchThreads"]


class BatchThreads(nn.Module):
    """Runs ``module`` on slices of the batch in parallel threads and concatenates the outputs (tensors)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        threads = torch.get_num_threads()
        if not isinstance(x, torch.Tensor) or threads < 2 or x.dim() == 0 or x.shape[0] < 2 \
                or not plain_cpu_inference(self.module, x):
            return self.module(x)
        shares = x.tensor_split(min(threads, x.shape[0]))
        outputs: list = [None] * len(shares)
        errors: list = []
        inference = torch.is_inference_mode_enabled()

        def run(i: int) -> None:
            # Grad and inference modes are per thread: a new thread starts with gradients on.
            try:
                torch.set_num_threads(1)
                with torch.inference_mode(inference), torch.no_grad():
                    outputs[i] = self.module(shares[i])
            except BaseException as error:  # handed to the caller's thread, which raises it
                errors.append(error)

        workers = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(1, len(shares))]
        for worker in workers:
            worker.start()
        try:
            run(0)
        finally:
            for worker in workers:
                worker.join()
            torch.set_num_threads(threads)
        if errors:
            raise errors[0]
        if not all(isinstance(out, torch.Tensor) for out in outputs):
            raise TypeError(f"BatchThreads needs a module that returns a tensor, got {type(outputs[0]).__name__}")
        return torch.cat(outputs)
