"""A process whose DataLoader workers outlive their loader still exits: the workers ignore SIGTERM (so that a
signal to the whole process group reaches the main process, which saves), and multiprocessing's exit handler,
which terminates daemonic children with SIGTERM and waits for them, would otherwise wait forever."""
import subprocess
import sys

CODE = """
import torch
from torch.utils.data import TensorDataset
from asl.data import create_loader

data = TensorDataset(torch.zeros(64, 3, 4, 4, dtype=torch.uint8), torch.zeros(64, 2))
loader = create_loader(data, 4, num_workers=2, persistent_workers=True)
batches = iter(loader)
next(batches)
cycle = {"batches": batches}
cycle["self"] = cycle  # kept alive past the end, as an exception's frames keep a failed run's loaders
print("done", flush=True)
"""


def test_live_loader_workers_do_not_block_the_exit():
    proc = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "done", proc.stderr[-2000:]
