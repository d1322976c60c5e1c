"""Shared fixtures: one intra-op thread, generated datasets, a runner for the repository's scripts, and the
source of a train.py that kills itself (fault injection)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def one_thread():
    """One intra-op thread for tests that train tiny models: on a shared 2-core machine two spinning OpenMP
    threads per process can slow such a run down tenfold, while one thread costs little when it is idle."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def make_synthetic(tmp_path_factory):
    """``make_synthetic(num_train, num_val, image_size, seed=0)`` -> the root of a generated COCO-layout set,
    made once per session for each combination."""
    from asl.data import generate_synthetic_coco

    made = {}

    def make(num_train: int, num_val: int, image_size: int, seed: int = 0) -> Path:
        key = (num_train, num_val, image_size, seed)
        if key not in made:
            made[key] = generate_synthetic_coco(tmp_path_factory.mktemp("syn"), num_train=num_train,
                                                num_val=num_val, image_size=image_size, seed=seed)
        return made[key]

    return make


@pytest.fixture(scope="session")
def run_script():
    """``run_script(['train.py', ...], cwd=None, env=None, unset=(), timeout=240)``: a root script (or ``-c CODE``,
    ``-m module``) in a fresh interpreter, one OpenMP thread, unbuffered, with ``env`` added and the variables in
    ``unset`` removed; returns the CompletedProcess with text output."""

    def run(args, cwd=None, env=None, unset=(), timeout=240) -> subprocess.CompletedProcess:
        full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        full_env.update(env or {})
        for name in unset:
            full_env.pop(name, None)
        argv = [str(REPO / a) if str(a).endswith(".py") and i == 0 else str(a) for i, a in enumerate(args)]
        return subprocess.run([sys.executable, *argv], cwd=cwd or REPO, env=full_env, capture_output=True,
                              text=True, timeout=timeout)

    return run


_SELF_KILLING_TRAIN = r"""
import asl.training.loop
from asl.apps import train

original = asl.training.loop.train_one_epoch


def killing(*args, **kwargs):
    on_step = kwargs["on_step"]

    def hook(info):
        on_step(info)
        if should_die(info):
            os.kill(os.getpid(), signal.SIGKILL)

    kwargs["on_step"] = hook
    return original(*args, **kwargs)


asl.training.loop.train_one_epoch = killing
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.fixture(scope="session")
def self_killing_train():
    """``self_killing_train(should_die)`` -> the source of a train.py (run it with ``python -c`` or as a file)
    that SIGKILLs itself right after the step for which ``should_die(info)`` is true. ``should_die`` is Python
    source defining that function (``os``, ``signal`` and ``sys`` are imported; it may read ``sys.argv``)."""
    return lambda should_die: "import os, signal, sys\n" + should_die + _SELF_KILLING_TRAIN
