"""One train.py run per output folder: a second run is refused by name, a dead run's lock never blocks, and a
finished run's folder can be resumed."""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from process_group import free_port

from asl.apps import train
from asl.errors import UsageError
from asl.training import run_lock
from asl.training.run_folder import RunFolder
from asl.training.run_lock import LOCK_NAME, PID_NAME, RunLock

pytestmark = pytest.mark.usefixtures("one_thread")

HOST = socket.gethostname()
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synthetic(make_synthetic):
    return make_synthetic(16, 8, 40)


def _flags(data, out, *extra):
    return [str(data), "--dataset", "synthetic", "--model-name", "timm/test_resnet", "--image-size", "32",
            "-b", "8", "-j", "0", "--epochs", "2", "--stop-epoch", "0", "--device", "cpu",
            "--output-dir", str(out), *extra]


def _holder(folder, then=""):
    """A process that takes the folder's lock, prints its PID, runs ``then`` and waits for its stdin to close."""
    code = textwrap.dedent(f"""
        import os, signal, sys, time
        from asl.training.run_lock import RunLock
        lock = RunLock.acquire({str(folder)!r})
        print(os.getpid(), flush=True)
    """) + textwrap.dedent(then) + "\nsys.stdin.read()\nlock.release()\n"
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.strip().isdigit(), line
    return proc


def _locked_elsewhere(folder) -> bool:
    """Whether another process finds the folder held (a process's own record locks never block itself)."""
    code = (f"from asl.training.run_lock import RunLock\nfrom asl.errors import UsageError\n"
            f"try:\n    RunLock.acquire({str(folder)!r}).release()\nexcept UsageError:\n    print('held')\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout == "held\n"


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_run_is_refused_naming_the_first_and_the_folder_is_free_once_it_ends(tmp_path, synthetic,
                                                                                     capsys):
    out = tmp_path / "o"
    out.mkdir()
    first = _holder(out)
    try:
        assert train.main(_flags(synthetic, out)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "Traceback" not in err[0]
        assert f"is in use by another train.py run (PID {first.pid} on {HOST}, since " in err[0]
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # the refused run wrote nothing
    finally:
        first.communicate("", timeout=60)
    assert first.returncode == 0
    assert train.main(_flags(synthetic, out)) == 0
    assert train.main(_flags(synthetic, out, "--stop-epoch", "1", "--resume", "auto")) == 0
    assert [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()] == [0, 1]
    assert not (out / LOCK_NAME).exists() and not (out / PID_NAME).exists()


def test_two_train_processes_into_one_folder(tmp_path, synthetic, capsys):
    """A real train.py process holds the folder while it trains (a training step of it waits until the second run
    has ended); the second, in this process, is refused naming it."""
    out, go = tmp_path / "o", tmp_path / "go"
    waiting_first = textwrap.dedent(f"""
        import os, sys, time
        import asl.training.loop
        from asl.apps import train
        original = asl.training.loop.train_one_epoch

        def waiting(*args, **kwargs):
            print("training", os.getpid(), flush=True)
            while not os.path.exists({str(go)!r}):
                time.sleep(0.05)
            return original(*args, **kwargs)

        asl.training.loop.train_one_epoch = waiting
        sys.exit(train.main(sys.argv[1:]))
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen([sys.executable, "-c", waiting_first, *_flags(synthetic, out)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = first.stdout.readline()
        assert line.startswith("training"), (line, first.stderr.read() if first.poll() is not None else "")
        capsys.readouterr()
        assert train.main(_flags(synthetic, out, "--seed", "1")) == 2
        err = capsys.readouterr().err.strip()
        assert err.splitlines() == [err] and f"in use by another train.py run (PID {first.pid} on {HOST}" in err
    finally:
        go.touch()
        stdout, stderr = first.communicate(timeout=240)
    assert first.returncode == 0, stderr
    assert json.loads((out / "args.json").read_text())["seed"] == 0  # the first run's, not the second's
    assert len((out / "log.txt").read_text().splitlines()) == 1


def test_one_process_cannot_hold_a_folder_twice_and_keeps_its_lock_when_refused(tmp_path):
    lock = RunLock.acquire(tmp_path)
    try:
        with pytest.raises(UsageError, match=f"in use by another train.py run \\(PID {os.getpid()} on "):
            RunLock.acquire(tmp_path)
        # Record locks are dropped when the process closes any descriptor of the file: the refusal must not.
        assert _locked_elsewhere(tmp_path)
    finally:
        lock.release()
    assert not _locked_elsewhere(tmp_path)
    with RunLock.acquire(tmp_path) as again:
        assert again.held
    assert not again.held and not (tmp_path / LOCK_NAME).exists()


@pytest.mark.faults
@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX: forked workers")
def test_the_lock_of_a_killed_run_does_not_block_even_while_its_workers_live(tmp_path):
    # A forked child, as a DataLoader worker is, lives on after its parent is killed: it must not hold the lock.
    fork_then_die = """
        if os.fork() == 0:
            print(os.getpid(), flush=True)
            time.sleep(120)
            os._exit(0)
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)
    """
    holder = _holder(tmp_path, then=fork_then_die)
    child = int(holder.stdout.readline())
    try:
        holder.wait(timeout=60)
        assert holder.returncode == -signal.SIGKILL
        os.kill(child, 0)  # the child is still alive
        text = json.loads((tmp_path / LOCK_NAME).read_text())
        assert (text["pid"], text["host"]) == (holder.pid, HOST)  # the dead run's file is still there
        with RunLock.acquire(tmp_path) as lock:
            assert lock.held
    finally:
        os.kill(child, signal.SIGKILL)
        holder.stdout.close()


def test_a_stale_lock_file_of_a_dead_process_does_not_block(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": _dead_pid(), "host": HOST}) + "\n")
    with RunLock.acquire(tmp_path) as lock:
        assert lock.held
    assert not (tmp_path / LOCK_NAME).exists()


@pytest.fixture
def pid_files_only(monkeypatch):
    """The fallback where the platform has no file locks."""
    monkeypatch.setattr(run_lock, "fcntl", None)
    monkeypatch.setattr(run_lock, "msvcrt", None)


@pytest.mark.parametrize("whose", ["a dead process", "an earlier process with this PID"])
def test_without_file_locks_a_pid_file_of_a_dead_process_of_this_host_is_replaced(tmp_path, pid_files_only, whose):
    pid = _dead_pid() if whose == "a dead process" else os.getpid()
    (tmp_path / PID_NAME).write_text(json.dumps({"pid": pid, "host": HOST}) + "\n")
    lock = RunLock.acquire(tmp_path)
    assert json.loads((tmp_path / PID_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / PID_NAME).exists()


@pytest.mark.parametrize("who", ["a live process", "another host"])
def test_without_file_locks_a_pid_file_of_a_live_run_blocks_and_names_the_file(tmp_path, pid_files_only, who):
    alive = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        pid, host = (alive.pid, HOST) if who == "a live process" else (_dead_pid(), "elsewhere.example")
        (tmp_path / PID_NAME).write_text(json.dumps({"pid": pid, "host": host}) + "\n")
        with pytest.raises(UsageError) as err:
            RunLock.acquire(tmp_path)
        assert f"(PID {pid} on {host})" in str(err.value)
        assert str(err.value).endswith(f"if no run uses it, delete {tmp_path / PID_NAME}")
        assert (tmp_path / PID_NAME).exists()
    finally:
        alive.communicate(b"", timeout=60)


def test_a_file_system_without_locks_falls_back_to_the_pid_file(tmp_path, monkeypatch):
    def refused(fd):
        raise run_lock._LocksUnsupported("Function not implemented")

    monkeypatch.setattr(run_lock, "_try_lock", refused)
    with RunLock.acquire(tmp_path):
        assert json.loads((tmp_path / PID_NAME).read_text())["pid"] == os.getpid()
        with pytest.raises(UsageError, match=f"PID {os.getpid()} on "):
            RunLock.acquire(tmp_path)
    assert not (tmp_path / PID_NAME).exists()


@pytest.mark.skipif(run_lock.fcntl is None, reason="played with POSIX record locks")
def test_the_windows_lock_keeps_the_text_readable_and_blocks_another_process(tmp_path):
    """msvcrt's lock, played by a record lock on the same byte, in processes without fcntl."""
    fake_windows = textwrap.dedent("""
        import fcntl, os, sys, types
        from asl.training import run_lock

        def locking(fd, mode, nbytes):
            command = fcntl.LOCK_UN if mode == 0 else fcntl.LOCK_EX | fcntl.LOCK_NB
            fcntl.lockf(fd, command, nbytes, os.lseek(fd, 0, os.SEEK_CUR))

        run_lock.msvcrt = types.SimpleNamespace(locking=locking, LK_UNLCK=0, LK_NBLCK=2)
        run_lock.fcntl = None
    """)
    hold = fake_windows + textwrap.dedent(f"""
        from asl.training.run_lock import RunLock
        lock = RunLock.acquire({str(tmp_path)!r})
        print(os.getpid(), flush=True)
        sys.stdin.read()
        lock.release()
    """)
    try_it = fake_windows + textwrap.dedent(f"""
        from asl.training.run_lock import RunLock
        from asl.errors import UsageError
        try:
            RunLock.acquire({str(tmp_path)!r}).release()
            print("acquired")
        except UsageError as exc:
            print(exc)
    """)
    holder = subprocess.Popen([sys.executable, "-c", hold], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        pid = int(holder.stdout.readline())
        other = subprocess.run([sys.executable, "-c", try_it], capture_output=True, text=True, timeout=60)
        assert f"in use by another train.py run (PID {pid} on {HOST}" in other.stdout, other
    finally:
        holder.communicate("", timeout=60)
    other = subprocess.run([sys.executable, "-c", try_it], capture_output=True, text=True, timeout=60)
    assert other.stdout == "acquired\n", other
    assert not (tmp_path / LOCK_NAME).exists()


def test_only_the_main_process_locks(tmp_path):
    """Under torchrun rank 0 alone holds the folder: the other ranks' prepare takes no lock."""
    with RunFolder.prepare(tmp_path, is_main=False):
        assert not (tmp_path / LOCK_NAME).exists()
        with RunFolder.prepare(tmp_path, is_main=True):
            assert _locked_elsewhere(tmp_path)
    assert not _locked_elsewhere(tmp_path)


def test_a_refused_run_leaves_the_holders_save_in_progress_alone(tmp_path):
    """The clean-up of temporary files left by killed saves runs only once the folder is ours."""
    in_progress = tmp_path / ".last.pth.123.abcd1234.tmp"
    first = _holder(tmp_path)
    try:
        in_progress.write_bytes(b"the holder is writing this")
        with pytest.raises(UsageError, match="in use by another train.py run"):
            RunFolder.prepare(tmp_path, is_main=True)
        assert in_progress.exists()
    finally:
        first.communicate("", timeout=60)


@pytest.mark.slow
def test_under_torchrun_every_rank_learns_that_the_folder_is_taken(tmp_path, synthetic, run_script):
    """Rank 0 alone takes the lock; its refusal reaches the other rank, so that no process waits for ever."""
    port = free_port()
    out = tmp_path / "o"
    out.mkdir()
    first = _holder(out)
    try:
        proc = run_script(["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                           f"--master_port={port}", REPO / "train.py", *_flags(synthetic, out)], timeout=180)
    finally:
        first.communicate("", timeout=60)
    # Ended, not hung; each rank may print the refusal (torchrun stops the other once one exits), and the two
    # processes' lines can interleave on the shared stderr.
    assert proc.returncode != 0
    assert f"train.py: error: {out} is in use by another train.py run (PID {first.pid} on {HOST}" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == []
