"""Checkpoint I/O: atomic saves, weights-only loading, URL download, and the mismatch message."""

import argparse
import functools
import http.server
import os
import pathlib
import shutil
import threading
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn as nn

import asl.checkpoint as checkpoint
from asl.state_dict import clean_state_dict
from asl.checkpoint import CheckpointError, load_checkpoint, make_model_checkpoint, save_checkpoint
from asl.models.loading import load_model_state


def tiny_model(num_classes=3, hidden=8):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def assert_state_equal(a, b):
    assert list(a.keys()) == list(b.keys())
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------------------------------------------- saving

def test_save_is_atomic_and_round_trips(tmp_path, monkeypatch):
    model = tiny_model()
    target = tmp_path / "new" / "dir" / "model.pth"  # parent directories are created
    replaced = []
    real_replace = os.replace

    def spy_replace(src, dst):
        replaced.append((os.fspath(src), os.fspath(dst)))
        assert os.path.getsize(src) > 0 and not os.path.exists(dst)  # complete temp file, target not yet there
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", spy_replace)
    ckpt = make_model_checkpoint(model.state_dict(), 3, {0: "a", 1: "b", 2: "c"}, epoch=4)
    save_checkpoint(ckpt, target)

    assert len(replaced) == 1
    temp, final = replaced[0]
    assert final == str(target) and os.path.dirname(temp) == str(target.parent)  # same directory
    assert os.listdir(target.parent) == ["model.pth"]  # no temporary file left
    loaded = load_checkpoint(target)
    assert loaded["num_classes"] == 3 and loaded["idx_to_class"] == {0: "a", 1: "b", 2: "c"}
    assert loaded["epoch"] == 4
    assert_state_equal(loaded["model"], model.state_dict())


@pytest.mark.faults
def test_failed_save_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "model.pth"
    save_checkpoint({"model": {"w": torch.ones(2)}}, target)
    before = target.read_bytes()
    with pytest.raises(CheckpointError, match="could not save checkpoint to .*model.pth"):
        save_checkpoint({"model": {"w": torch.zeros(2)}, "bad": lambda: 0}, target)  # lambdas do not pickle
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.pth"]


def test_saved_file_gets_normal_permissions(tmp_path):
    target = tmp_path / "model.pth"
    save_checkpoint({"model": {}}, target)
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


# ------------------------------------------------------------------------------------------------------ loading

def test_official_format_loads(tmp_path):
    # Written with plain torch.save, as the model-zoo files were.
    model = tiny_model(num_classes=2)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"model": state, "num_classes": 2, "idx_to_class": {0: "cat", 1: "dog"}}, tmp_path / "zoo.pth")
    loaded = load_checkpoint(str(tmp_path / "zoo.pth"))
    assert loaded["num_classes"] == 2 and loaded["idx_to_class"] == {0: "cat", 1: "dog"}
    fresh = tiny_model(num_classes=2)
    load_model_state(fresh, loaded["model"], "tiny")
    assert_state_equal({k: fresh.state_dict()[k] for k in state}, state)


def test_bare_state_dict_and_state_dict_key_are_wrapped(tmp_path):
    state = tiny_model().state_dict()
    torch.save(state, tmp_path / "bare.pth")
    loaded = load_checkpoint(tmp_path / "bare.pth")
    assert set(loaded) == {"model"}
    assert_state_equal(loaded["model"], state)

    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "other.pth")
    loaded = load_checkpoint(tmp_path / "other.pth")
    assert set(loaded) == {"model", "epoch"}
    assert_state_equal(loaded["model"], state)


def test_not_a_checkpoint_is_refused(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="not a checkpoint dict"):
        load_checkpoint(tmp_path / "list.pth")
    torch.save({"epoch": 1}, tmp_path / "nomodel.pth")
    with pytest.raises(CheckpointError, match="no 'model' or 'state_dict'"):
        load_checkpoint(tmp_path / "nomodel.pth")


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "model.pth"
    with pytest.raises(CheckpointError, match=f"not found: {missing}"):
        load_checkpoint(missing)


@pytest.mark.faults
def test_corrupt_file_is_a_checkpoint_error(tmp_path):
    good = tmp_path / "good.pth"
    save_checkpoint({"model": {"w": torch.ones(100)}}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="truncated.pth"):
        load_checkpoint(truncated)


class Payload:
    """Unpickling this creates a file: proof that code from the checkpoint ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.faults
def test_malicious_pickle_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.ones(1)}, "extra": Payload(marker)}, evil)

    with pytest.raises(CheckpointError) as info:
        load_checkpoint(evil)
    message = str(info.value)
    assert "refusing to unpickle" in message and "not a plain weights file" in message
    assert str(evil) in message and "\n" not in message
    assert not marker.exists()

    # The file really is an exploit: a full unpickle runs the payload (this is what we refuse to do).
    loaded = torch.load(evil, weights_only=False)
    loaded["extra"].close()
    assert marker.exists()


# -------------------------------------------------------------------------------------------------------- URLs

class _CountingHandler(http.server.SimpleHTTPRequestHandler):
    requests = []

    def do_GET(self):
        type(self).requests.append(self.path)
        super().do_GET()

    def log_message(self, *args):  # keep the test output clean
        pass


@pytest.fixture
def http_root(tmp_path, monkeypatch):
    root = tmp_path / "served"
    root.mkdir()
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    handler = type("Handler", (_CountingHandler,), {"requests": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}", handler.requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _cached(name_stem: str) -> list:
    return sorted((pathlib.Path(torch.hub.get_dir()) / "checkpoints").glob(f"{name_stem}-*.pth"))


def test_url_is_downloaded_once_into_the_hub_cache(http_root):
    root, base_url, requests = http_root
    model = tiny_model()
    save_checkpoint(make_model_checkpoint(model.state_dict(), 3, {0: "a", 1: "b", 2: "c"}), root / "remote.pth")

    loaded = load_checkpoint(f"{base_url}/remote.pth")
    assert_state_equal(loaded["model"], model.state_dict())
    assert len(_cached("remote")) == 1
    assert requests == ["/remote.pth"]

    again = load_checkpoint(f"{base_url}/remote.pth")  # served from the cache
    assert requests == ["/remote.pth"]
    assert again["num_classes"] == 3


@pytest.mark.faults
def test_the_cache_is_keyed_by_the_whole_url(http_root):
    root, base_url, requests = http_root
    for folder, classes in (("x", 3), ("y", 5)):
        (root / folder).mkdir()
        torch.save({"model": {}, "num_classes": classes, "idx_to_class": {}}, root / folder / "good.pth")
    assert load_checkpoint(f"{base_url}/x/good.pth")["num_classes"] == 3
    assert load_checkpoint(f"{base_url}/y/good.pth")["num_classes"] == 5  # not x's file from the cache
    assert requests == ["/x/good.pth", "/y/good.pth"] and len(_cached("good")) == 2


@pytest.mark.faults
def test_an_interrupted_download_is_not_cached(tmp_path, monkeypatch):
    class HalfBody(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"x" * 500)  # then the connection closes

        def log_message(self, *args):
            pass

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("no_proxy", "*")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HalfBody)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(CheckpointError, match="incomplete download .* 500 of 1000 bytes"):
            load_checkpoint(f"http://127.0.0.1:{server.server_address[1]}/half.pth")
    finally:
        server.shutdown()
        server.server_close()
    folder = pathlib.Path(torch.hub.get_dir()) / "checkpoints"
    assert not folder.exists() or not any(folder.iterdir())


def _serve_once(handler_body):
    """A loopback server whose GET runs ``handler_body(handler)``; returns (server, base URL)."""
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def do_GET(self):
            handler_body(self)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def _load_served(handler_body, name: str) -> tuple[str, CheckpointError]:
    """(base URL, the CheckpointError) of loading ``name`` from a loopback server answering with ``handler_body``."""
    server, base = _serve_once(handler_body)
    try:
        with pytest.raises(CheckpointError) as exc:
            load_checkpoint(f"{base}/{name}")
    finally:
        server.shutdown()
        server.server_close()
    return base, exc.value


def _good_checkpoint_bytes(tmp_path) -> bytes:
    torch.save({"model": {"w": torch.arange(2000.0)}, "num_classes": 2, "idx_to_class": {}}, tmp_path / "good.pth")
    return (tmp_path / "good.pth").read_bytes()


def _no_cache_entry() -> bool:
    folder = pathlib.Path(torch.hub.get_dir()) / "checkpoints"
    return not folder.exists() or not any(folder.iterdir())


@pytest.mark.faults
@pytest.mark.parametrize("case", ["cut_without_length", "longer_than_length", "html_with_200", "empty"])
def test_a_broken_download_is_never_cached(case, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("no_proxy", "*")
    good = _good_checkpoint_bytes(tmp_path)
    html = b"<!DOCTYPE html><html><body>Sign in to continue</body></html>"

    def body(h):
        h.send_response(200)
        if case == "longer_than_length":
            h.send_header("Content-Length", str(len(good) // 2))  # the client stops there: a truncated file
        h.end_headers()
        h.wfile.write({"cut_without_length": good[: len(good) // 2], "longer_than_length": good,
                       "html_with_200": html, "empty": b""}[case])

    base, exc = _load_served(body, "model.pth")
    message = str(exc)
    assert "\n" not in message and "nothing was cached" in message and f"{base}/model.pth" in message
    assert "refusing to unpickle" not in message  # no false alarm of a malicious file
    if case == "html_with_200":
        assert "HTML page" in message
    assert _no_cache_entry()


@pytest.mark.faults
def test_a_silent_server_ends_the_download_with_one_line(tmp_path, monkeypatch):
    import asl.download

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("no_proxy", "*")
    release = threading.Event()
    server, base = _serve_once(lambda h: release.wait(30))  # accepts, then never answers
    try:
        with pytest.raises(CheckpointError, match=r"no answer from 127\.0\.0\.1 within 0\.5 s"):
            asl.download.download(f"{base}/model.pth", timeout=0.5)
    finally:
        release.set()
        server.shutdown()
        server.server_close()
    assert asl.download.DOWNLOAD_TIMEOUT_S <= 60  # the default: a silent server ends a run within 2 minutes
    assert _no_cache_entry()


@pytest.mark.faults
def test_a_cached_file_that_no_longer_loads_names_the_file_to_delete(http_root):
    root, base_url, _ = http_root
    torch.save({"model": {"w": torch.ones(3)}}, root / "m.pth")
    load_checkpoint(f"{base_url}/m.pth")
    [cached] = _cached("m")
    cached.write_bytes(cached.read_bytes()[:100])  # damaged after it was cached (a full disk, a crash)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(f"{base_url}/m.pth")
    assert f"delete {cached} to fetch it again" in str(exc.value)


@pytest.mark.faults
def test_sha256_is_checked_given_or_from_the_file_name(http_root, tmp_path):
    import hashlib

    root, base_url, _ = http_root
    torch.save({"model": {}, "num_classes": 2, "idx_to_class": {}}, root / "m.pth")
    digest = hashlib.sha256((root / "m.pth").read_bytes()).hexdigest()
    with pytest.raises(CheckpointError, match="does not match the expected SHA-256"):
        load_checkpoint(f"{base_url}/m.pth", sha256="0" * 64)
    assert _cached("m") == []
    assert load_checkpoint(f"{base_url}/m.pth", sha256=digest)["num_classes"] == 2
    shutil.copy(root / "m.pth", root / f"named-{digest[:10]}.pth")  # torch hub's hash-prefix convention
    assert load_checkpoint(f"{base_url}/named-{digest[:10]}.pth")["num_classes"] == 2
    shutil.copy(root / "m.pth", root / "named-deadbeef00.pth")
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint(f"{base_url}/named-deadbeef00.pth")
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint(root / "m.pth", sha256="f" * 64)  # local files too
    with pytest.raises(CheckpointError, match="64 hexadecimal digits"):
        load_checkpoint(f"{base_url}/m.pth", sha256="abc")


@pytest.mark.faults
def test_plain_http_to_another_machine_warns(caplog, monkeypatch, tmp_path):
    import asl.download

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def refuse(url, **kwargs):
        raise OSError("no network in tests")

    monkeypatch.setattr(asl.download.urllib.request, "urlopen", refuse)
    with caplog.at_level("WARNING"), pytest.raises(CheckpointError, match="could not download"):
        load_checkpoint("http://example.com/m.pth")
    assert "plain http" in caplog.text


def test_url_errors_are_checkpoint_errors(http_root):
    root, base_url, _ = http_root
    with pytest.raises(CheckpointError, match="could not download .*: HTTP 404 .*MODEL_ZOO.md"):
        load_checkpoint(f"{base_url}/absent.pth")
    assert _cached("absent") == []

    torch.save({"model": {"w": torch.ones(1)}, "extra": Payload(root / "ran")}, root / "evil.pth")
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_checkpoint(f"{base_url}/evil.pth")
    assert not (root / "ran").exists() and _cached("evil") == []


# ------------------------------------------------------------------------------------------- checkpoint content

def test_make_model_checkpoint_is_weights_only_loadable(tmp_path):
    args = argparse.Namespace(lr=1e-4, data=pathlib.Path("/data/coco"), device=torch.device("cpu"), sizes=(224, 448))
    ckpt = make_model_checkpoint(tiny_model().state_dict(), np.int64(3), {"0": "a", 1: "b", 2.0: "c"},
                                 args=args, mAP=np.float32(86.5), epoch=7, history=[np.arange(3)])
    assert ckpt["num_classes"] == 3 and type(ckpt["num_classes"]) is int
    assert ckpt["idx_to_class"] == {0: "a", 1: "b", 2: "c"}
    assert ckpt["args"] == {"lr": 1e-4, "data": "/data/coco", "device": "cpu", "sizes": (224, 448)}
    assert isinstance(ckpt["mAP"], float)
    path = tmp_path / "ours.pth"
    save_checkpoint(ckpt, path)
    raw = torch.load(path, weights_only=True)  # the plain torch loader accepts it
    assert raw["args"]["data"] == "/data/coco"
    assert torch.equal(raw["history"][0], torch.arange(3))


def test_make_model_checkpoint_rejects_objects_that_would_not_load():
    with pytest.raises(CheckpointError, match=r"args\['fn'\].*function"):
        make_model_checkpoint({}, 1, {0: "a"}, args={"fn": lambda: 0})
    with pytest.raises(CheckpointError, match="set by the named arguments"):
        make_model_checkpoint({}, 1, {0: "a"}, **{"model": {}})


# ------------------------------------------------------------------------------------------- load_model_state

def test_load_checkpoint_strips_wrapper_prefixes_once_and_counters_are_ignored(tmp_path):
    source = tiny_model()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)
    wrapped = OrderedDict(("module._orig_mod." + k, v) for k, v in source.state_dict().items()
                          if not k.endswith("num_batches_tracked"))
    save_checkpoint({"model": wrapped, "num_classes": 3}, tmp_path / "ddp.pth")
    loaded = load_checkpoint(tmp_path / "ddp.pth")
    assert sorted(loaded["model"]) == sorted(k for k in source.state_dict() if not k.endswith("num_batches_tracked"))
    target = tiny_model()
    load_model_state(target, loaded["model"], "tiny")
    for key, value in source.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(target.state_dict()[key], value), key
    # A whole checkpoint dict is accepted too.
    load_model_state(tiny_model(), loaded, "tiny")


def test_clean_state_dict():
    cleaned = clean_state_dict({"module._orig_mod.a.weight": 1, "b": 2, "module.c": 3})
    assert list(cleaned.items()) == [("a.weight", 1), ("b", 2), ("c", 3)]


def test_wrong_class_count_gives_one_clear_message():
    ckpt = tiny_model(num_classes=5).state_dict()
    with pytest.raises(CheckpointError) as info:
        load_model_state(tiny_model(num_classes=3), ckpt, "tiny_net")
    assert str(info.value) == ("checkpoint does not fit tiny_net (3 classes): "
                               "shape mismatch 3.weight: ckpt (5, 8) vs model (3, 8); "
                               "3.bias: ckpt (5,) vs model (3,)")


def test_wrong_architecture_names_missing_and_unexpected_keys():
    torch.manual_seed(0)
    other = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    model = tiny_model(num_classes=3)
    with pytest.raises(CheckpointError) as info:
        load_model_state(model, other.state_dict(), "tiny_net")
    message = str(info.value)
    assert message.startswith("checkpoint does not fit tiny_net (3 classes): ")
    # missing: 1.weight, 1.bias, 1.running_mean, 1.running_var, 3.weight, 3.bias (1.num_batches_tracked ignored)
    assert "missing keys ['1.weight', '1.bias', '1.running_mean'] (+3 more)" in message
    assert "unexpected ['2.weight', '2.bias', '4.weight'] (+1 more)" in message
    assert "shape mismatch" not in message and "\n" not in message
    # Nothing was loaded.
    assert_state_equal(model.state_dict(), tiny_model(num_classes=3).state_dict())


def test_old_checkpoints_with_numpy_scalars_load_as_plain_python(tmp_path):
    model = tiny_model()
    path = tmp_path / "old.pth"
    torch.save({"model": model.state_dict(), "num_classes": np.int64(3), "mAP": np.float64(81.5),
                "idx_to_class": {0: np.str_("a"), 1: np.str_("b"), 2: np.str_("c")}}, path)
    ckpt = load_checkpoint(path)
    assert ckpt["num_classes"] == 3 and type(ckpt["num_classes"]) is int
    assert type(ckpt["mAP"]) is float and ckpt["idx_to_class"] == {0: "a", 1: "b", 2: "c"}
    assert all(type(v) is str for v in ckpt["idx_to_class"].values())
    assert_state_equal(ckpt["model"], model.state_dict())


@pytest.mark.faults
@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_download_names_its_status_and_the_model_zoo(status, tmp_path, monkeypatch):
    """The authors' bucket answers 403 Forbidden: the line says so and where the weights are now."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("no_proxy", "*")

    def refuse(h):
        h.send_response(status)
        h.end_headers()

    _, exc = _load_served(refuse, "MS_COCO_TRresNet_L_448_86.6.pth")
    assert f"HTTP {status}" in str(exc) and "MODEL_ZOO.md" in str(exc)
    assert _no_cache_entry()
