"""Model sources that are not what they claim, one test per failure: tensors of the wrong kind or broken values,
the offline Hub cache, files that are no regular files, long URL names, sizes that cannot work, stored sizes,
malformed Hub ids, stalled downloads, the format told by the bytes, names that carry no size, damaged heads, the
`hf` command in the docs, and the Hub when offline is evident.

Everything runs on tiny networks (timm's test_resnet) or hand-made state dicts, files in tmp, a loopback server and
a Hub cache laid out by hand."""
import http.server
import json
import logging
import os
import pickle
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from process_group import free_port

from asl.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from asl.errors import ModelError
from asl.models import check_input_size, create_model, detect_head
from asl.models.loading import LoadedModel, load_model, stored_image_size
from asl.models.ml_decoder import ml_decoder_sizes
from asl.sources import parse_hub_id

safetensors_torch = pytest.importorskip("safetensors.torch")

REPO = Path(__file__).resolve().parents[1]
NAME = "timm/test_resnet"


def _tiny_state(num_classes: int = 3) -> dict:
    torch.manual_seed(0)
    return {k: v.clone() for k, v in create_model(NAME, num_classes).state_dict().items()}


def _write(kind: str, folder: Path, state: dict, num_classes: int = 3) -> str:
    """The state as a model source of ``kind``: a .pth, a .safetensors file or a Hub-layout folder."""
    config = {"model_name": NAME, "num_classes": num_classes}
    if kind == "pth":
        save_checkpoint({"model": state, **config}, folder / "m.pth")
        return str(folder / "m.pth")
    if kind == "safetensors":
        safetensors_torch.save_file(state, str(folder / "m.safetensors"), metadata={"asl": json.dumps(config)})
        return str(folder / "m.safetensors")
    out = folder / "hub-folder"
    out.mkdir()
    safetensors_torch.save_file(state, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({"asl": config}))
    return str(out)


# ------------------------------------------------------------------------- 1. weights that are not floats

@pytest.mark.parametrize("kind", ["pth", "safetensors", "folder"])
def test_integer_and_non_finite_tensors_are_refused_naming_the_first(kind, tmp_path):
    state = _tiny_state()
    key = next(k for k, v in state.items() if v.is_floating_point() and v.dim() == 4)
    state[key] = state[key].to(torch.int8)
    with pytest.raises(CheckpointError, match=rf"{key} is int8 where the model holds floats"):
        load_model(_write(kind, tmp_path, state))

    broken = _tiny_state()
    var = next(k for k in broken if k.endswith("running_var"))  # a buffer counts too
    broken[var][0] = float("nan")
    (tmp_path / "b").mkdir()
    with pytest.raises(CheckpointError, match=rf"{var} holds NaN or infinite values"):
        load_model(_write(kind, tmp_path / "b", broken))


def test_bool_weights_and_inf_in_a_pretrained_backbone_are_refused(tmp_path):
    state = _tiny_state()
    key = next(k for k, v in state.items() if v.is_floating_point() and k.endswith("weight") and "fc" not in k)
    state[key] = torch.full_like(state[key], float("inf"))
    with pytest.raises(CheckpointError, match=rf"{key} holds NaN or infinite"):
        create_model(NAME, 5, pretrained=_write("pth", tmp_path, state))
    state = _tiny_state()
    state[key] = state[key] > 0
    with pytest.raises(CheckpointError, match=rf"{key} is bool"):
        create_model(NAME, 5, pretrained=_write("safetensors", tmp_path, state))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_types_are_cast(dtype, tmp_path):
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in _tiny_state().items()}
    model = load_model(_write("safetensors", tmp_path, state), prepare=False).model
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            assert value.dtype == torch.float32
            assert torch.equal(value, state[key].float()), key


# ------------------------------------------------------------------------------- 2, 3, 17. the Hub cache

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _hub_cache(root: Path, repo: str = "org/tiny", files: dict = None, absent=()) -> Path:
    """huggingface_hub's cache layout: refs/main -> commit, snapshots/<commit>/<file> -> ../../blobs/<name>, and
    .no_exist/<commit>/<file> recording files the repository does not have."""
    folder = root / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(COMMIT)
    snapshot = folder / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (folder / "blobs").mkdir()
    for name, data in (files or {}).items():
        blob = folder / "blobs" / f"blob-{name}"
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    for name in absent:
        (folder / ".no_exist" / COMMIT).mkdir(parents=True, exist_ok=True)
        (folder / ".no_exist" / COMMIT / name).touch()
    return snapshot


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def _bin_bytes(tmp_path: Path, obj) -> bytes:
    torch.save(obj, tmp_path / "w.bin")
    return (tmp_path / "w.bin").read_bytes()


@pytest.mark.parametrize("recorded_absent", [True, False])
def test_offline_cache_with_only_pytorch_model_bin_is_used(recorded_absent, offline_hub, tmp_path):
    config = json.dumps({"asl": {"model_name": NAME, "num_classes": 3}}).encode()
    _hub_cache(offline_hub, files={"config.json": config, "pytorch_model.bin": _bin_bytes(tmp_path, _tiny_state())},
               absent=["model.safetensors"] if recorded_absent else [])
    loaded = load_model("hf-hub:org/tiny", prepare=False)
    assert loaded.num_classes == 3 and loaded.model_name == NAME


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("true",))


def test_offline_cached_bin_with_a_code_running_pickle_is_refused_as_such(offline_hub, tmp_path):
    payload = pickle.dumps({"model": {"w": torch.zeros(1)}, "x": _RunsCode()}, protocol=2)
    _hub_cache(offline_hub, files={"pytorch_model.bin": payload}, absent=["model.safetensors"])
    with pytest.raises(CheckpointError, match=r"refusing to unpickle .*run code"):
        load_checkpoint("hf-hub:org/tiny")


def _no_waits(monkeypatch) -> list:
    """The waits asked for through ``time.sleep`` (huggingface_hub's backoff between retries among them), recorded
    and skipped: "at once" is checked as no wait at all, not by the clock of a loaded machine."""
    waits: list = []
    monkeypatch.setattr(time, "sleep", waits.append)
    return waits


def test_offline_with_nothing_cached_fails_at_once_in_one_line(offline_hub, monkeypatch):
    waits = _no_waits(monkeypatch)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint("hf-hub:org/absent")
    assert waits == []
    message = str(info.value)
    assert "HF_HUB_OFFLINE" in message and "hf download" in message and "\n" not in message


@pytest.mark.parametrize("through", ["endpoint", "proxy"])
def test_a_refused_connection_fails_at_once_without_retries(through, tmp_path, monkeypatch, capfd):
    port = free_port()  # nothing listens there
    for var in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy",
                "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    if through == "endpoint":
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    else:
        monkeypatch.setenv("HF_ENDPOINT", "https://hub.example.org")
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    waits = _no_waits(monkeypatch)
    with pytest.raises(CheckpointError, match="unreachable") as info:
        load_checkpoint("hf-hub:org/absent")
    assert waits == []
    assert str(info.value).count("hf-hub:org/absent") == 1
    assert "Retrying" not in capfd.readouterr().err


def test_online_the_first_weights_file_found_is_the_only_one_fetched(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import errors as hub_errors

    import asl.sources

    folder = Path(_write("folder", tmp_path, _tiny_state()))
    asked = []

    def fake_download(repo, filename, **kwargs):
        asked.append(filename)
        if (folder / filename).exists():
            return str(folder / filename)
        absent = getattr(hub_errors, "RemoteEntryNotFoundError", hub_errors.EntryNotFoundError)
        error = absent.__new__(absent)  # the client's own constructor wants an HTTP response
        Exception.__init__(error, f"no {filename}")
        raise error

    monkeypatch.setattr(asl.sources, "_hub_unreachable", lambda: None)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert load_checkpoint("hf-hub:org/tiny")["num_classes"] == 3
    assert asked == ["config.json", "model.safetensors"]
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"hf-hub:org/tiny holds no weights file"):
        load_checkpoint("hf-hub:org/tiny")


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_cached_config_that_is_no_regular_file_is_refused(kind, offline_hub, tmp_path):
    snapshot = _hub_cache(offline_hub, files={"model.safetensors": b""})
    safetensors_torch.save_file(_tiny_state(), str(snapshot / "model.safetensors"))
    if kind == "fifo":
        os.mkfifo(snapshot / "config.json")
    else:
        (snapshot / "config.json").symlink_to("/dev/zero")
    with pytest.raises(CheckpointError, match="config.json is not a regular file"):
        load_checkpoint("hf-hub:org/tiny")


def test_folder_config_and_model_path_that_are_no_regular_files(tmp_path):
    folder = Path(_write("folder", tmp_path, _tiny_state()))
    (folder / "config.json").unlink()
    os.mkfifo(folder / "config.json")
    with pytest.raises(CheckpointError, match="config.json is not a regular file: it is a named pipe"):
        load_checkpoint(folder)
    (folder / "config.json").unlink()
    (folder / "config.json").symlink_to("/dev/zero")
    with pytest.raises(CheckpointError, match="is not a regular file: it is a device"):
        load_checkpoint(folder)
    os.mkfifo(tmp_path / "pipe.pth")
    with pytest.raises(CheckpointError, match=r"pipe.pth is not a regular file: it is a named pipe"):
        load_checkpoint(tmp_path / "pipe.pth")


# ---------------------------------------------------------------------------------- 5, 10. downloads

class _Handler(http.server.BaseHTTPRequestHandler):
    body = b""
    drip = 0.0

    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        try:
            if not self.drip:
                self.wfile.write(self.body)
                return
            for i in range(len(self.body)):
                self.wfile.write(self.body[i:i + 1])
                self.wfile.flush()
                time.sleep(self.drip)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path, monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    handler = type("Handler", (_Handler,), {})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield handler, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_a_url_with_a_250_character_name_is_cached(server, tmp_path):
    handler, base = server
    save_checkpoint({"model": {"w": torch.ones(2)}}, tmp_path / "w.pth")
    handler.body = (tmp_path / "w.pth").read_bytes()
    url = f"{base}/{'a' * 246}.pth"
    assert torch.equal(load_checkpoint(url)["model"]["w"], torch.ones(2))
    cached = list((tmp_path / "torch-home" / "hub" / "checkpoints").iterdir())
    assert len(cached) == 1 and len(cached[0].name.encode()) <= 255 and cached[0].suffix == ".pth"


def test_a_dripping_download_gives_up_when_it_stalls(server):
    from asl.download import download

    handler, base = server
    handler.body, handler.drip = b"x" * 10_000, 0.02
    start = time.monotonic()
    with pytest.raises(CheckpointError, match="stalled"):
        download(f"{base}/slow.pth", stall=(0.5, 1000))
    assert time.monotonic() - start < 60  # the whole body would drip for 200 s


def test_progress_lines_when_the_output_is_no_terminal(server, tmp_path, monkeypatch, caplog):
    import asl.download

    handler, base = server
    handler.body, handler.drip = b"y" * 40, 0.005
    monkeypatch.setattr(asl.download, "PROGRESS_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger="asl.download"):
        asl.download.download(f"{base}/progress.bin")
    assert any("downloading progress.bin: " in r.getMessage() and "%" in r.getMessage() for r in caplog.records)


# -------------------------------------------------------------------------------------- 6, 7, 8. sizes

def test_tresnet_names_the_smallest_size_that_works_and_takes_32():
    with pytest.raises(ModelError, match=r"--image-size 16 cannot work with tresnet_m: .*from 20 px"):
        create_model("tresnet_m", 3, image_size=16)
    model = create_model("tresnet_m", 3, image_size=32)
    for size in (4, 8, 12):
        with pytest.raises(ModelError, match="nearest that works: 20"):
            check_input_size(model, size)
    loaded = LoadedModel(model=model, model_name="tresnet_m", num_classes=3, bottleneck_head=False,
                         class_names=["a", "b", "c"], source="x.pth")
    with pytest.raises(ModelError, match="from 20 px"):
        loaded.input_size(16)  # validate.py, infer.py and export.py ask here
    assert loaded.input_size(32) == (32, "from --image-size")
    with torch.no_grad():
        assert model.eval()(torch.zeros(1, 3, 20, 20)).shape == (1, 3)  # 20 does work


@pytest.mark.parametrize("head", [None, "ml-decoder"])
def test_a_fixed_size_timm_backbone_is_built_for_the_size_asked(head):
    model = create_model("timm/test_vit3", 3, head=head, image_size=64).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 3)
    at_160 = create_model("timm/test_vit3", 3, head=head)
    with pytest.raises(ModelError, match="built for 160 px inputs and takes no other size"):
        check_input_size(at_160, 64)


def test_a_fixed_size_backbone_loads_at_its_stored_size_or_its_only_one(tmp_path):
    vit = "timm/test_vit3"
    save_checkpoint({"model": create_model(vit, 3, image_size=64).state_dict(), "model_name": vit, "num_classes": 3,
                     "image_size": 64}, tmp_path / "at64.pth")
    loaded = load_model(tmp_path / "at64.pth", prepare=False)
    assert loaded.input_size(None) == (64, "stored in the checkpoint")
    with pytest.raises(ModelError, match="built for 64 px inputs"):
        loaded.input_size(128)
    save_checkpoint({"model": create_model(vit, 3).state_dict(), "model_name": vit, "num_classes": 3},
                    tmp_path / "plain.pth")
    assert load_model(tmp_path / "plain.pth", prepare=False).input_size(None) == (160, "the one size the network "
                                                                                       "takes")


def test_a_config_with_a_billion_classes_is_refused_before_building(tmp_path):
    folder = Path(_write("folder", tmp_path, _tiny_state()))
    (folder / "config.json").write_text(json.dumps({"asl": {"model_name": NAME, "num_classes": 1e9}}))
    with pytest.raises(CheckpointError, match=r"does not fit .*1000000000 classes.*shape mismatch"):
        load_model(folder)


def test_decoder_sizes_only_minus_one_means_default_and_width_is_bounded():
    assert ml_decoder_sizes(80, -1, -1) == (80, 768, 1)
    for groups, width in ((-5, 768), (0, 768), (10, -8), (10, 0), (10, 100_000)):
        with pytest.raises(ModelError):
            ml_decoder_sizes(80, groups, width)
    with pytest.raises(ModelError, match="within 1..4096"):
        create_model(NAME, 3, head="ml-decoder", decoder_embedding=100_000)


@pytest.mark.parametrize("stored, expected", [(64.0, 64), ("64", 64), (torch.tensor(64), 64), (64, 64)])
def test_stored_sizes_read_as_whole_numbers(stored, expected):
    assert stored_image_size({"image_size": stored}, "model.pth") == (expected, "stored in the checkpoint")


@pytest.mark.parametrize("stored", [0, -5, 1e9, True, [64], torch.tensor([64, 64]), "big", 64.5])
def test_an_invalid_stored_size_is_named_with_the_size_used(stored):
    size, origin = stored_image_size({"image_size": stored}, "model.pth")
    assert size == 448
    assert "the checkpoint's image_size" in origin and "the default" in origin and "does not say" not in origin
    size, origin = stored_image_size({"image_size": stored}, "MS_COCO_TRresNet_M_224_81.8.pth")
    assert size == 224 and origin.startswith("from the file name")


# ------------------------------------------------------------------------------------- 9. malformed ids

@pytest.mark.parametrize("source", ["hf-hub:no-slash", "hf-hub:org/na me", "hf-hub:a/b/c",
                                    "hf-hub:org/" + "n" * 10_000])
def test_a_malformed_hub_id_is_called_malformed_and_not_echoed_whole(source):
    with pytest.raises(CheckpointError) as info:
        parse_hub_id(source)
    assert str(info.value).startswith("malformed Hub id") and len(str(info.value)) < 300
    with pytest.raises(CheckpointError, match="malformed"):
        load_checkpoint(source)


# ---------------------------------------------------------------------------- 13, 15. bytes and names

def test_a_safetensors_file_named_pth_is_read_as_safetensors(tmp_path):
    safetensors_torch.save_file({"w": torch.arange(3.0)}, str(tmp_path / "weights.pth"))
    assert torch.equal(load_checkpoint(tmp_path / "weights.pth")["model"]["w"], torch.arange(3.0))
    torch.save({"w": torch.ones(1)}, tmp_path / "torch.safetensors")  # and the other way round
    assert torch.equal(load_checkpoint(tmp_path / "torch.safetensors")["model"]["w"], torch.ones(1))


@pytest.mark.parametrize("name, size", [
    ("MS_COCO_TRresNet_L_448_86.6.pth", 448), ("MS_COCO_TResNet_xl_640_88.4.pth", 640),
    ("Open_ImagesV6_TRresNet_L_448.pth", 448), ("tresnet_m_COCO_224_84_2.pth", 224),
    ("tresnet_l_COCO__448_90_0.pth", 448)])
def test_the_model_zoos_names_give_their_size(name, size):
    assert stored_image_size({}, f"https://host/{name}") == (size, "from the file name")


@pytest.mark.parametrize("name", ["asl_coco_2024.pth", "model_epoch_0001.pth", "run_0100_best.pth",
                                  "model_224.pth", "tresnet_m_open_images_200_groups_86_8.pth"])
def test_other_names_give_no_size(name):
    assert stored_image_size({}, name) == (448, "the default, as the checkpoint does not say")


def test_a_damaged_ml_decoder_tensor_is_called_damaged_not_zero_shot():
    damaged = {"head.decoder.query_embed.weight": torch.zeros(10),
               "head.decoder.duplicate_pooling_bias": torch.zeros(3)}
    with pytest.raises(CheckpointError, match=r"damaged: .*query_embed.weight of shape \(10,\)") as info:
        detect_head(damaged)
    assert "zero-shot" not in str(info.value)
    zero_shot = {"head.wordvec_proj.weight": torch.zeros(8, 300), "head.decoder.duplicate_pooling": torch.zeros(8, 1),
                 "head.decoder.duplicate_pooling_bias": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="zero-shot variant"):
        detect_head(zero_shot)


# ------------------------------------------------------------------------------------- 16. the hf command

def test_no_file_names_the_retired_hub_command():
    retired = "huggingface" + "-cli"
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    found = [name for name in files if (REPO / name).is_file()
             and retired in (REPO / name).read_bytes().decode("utf-8", "ignore")]
    assert found == []
