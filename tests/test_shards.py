"""WebDataset shards: written from real COCO photos (tiny_coco) and generated data, read back tensor by tensor equal
to the folder route (the independent reference: the dataset read from its files), split across ranks and workers
as documented, resumed after a kill, served over loopback HTTP and a ``pipe:`` command, and refused with one line
when broken."""
from __future__ import annotations

import functools
import http.server
import json
import socket
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from process_group import free_port

from asl.data import create_dataset
from asl.data.base import stop_loader_workers
from asl.data.shards_format import parse_split_meta
from asl.data.shards_read import batches_per_worker, create_shard_loader, resume_plan, slot_portions
from asl.data.shards_source import ShardError
from asl.data.shards_write import progress_path, write_shards
from asl.errors import DatasetError, UsageError

REPO = Path(__file__).resolve().parents[1]
TINY_COCO = REPO.parent / "shared" / "data" / "tiny_coco"
needs_coco = pytest.mark.skipif(not (TINY_COCO / "annotations").is_dir(), reason="shared/data/tiny_coco absent")
SIZE = 32


@pytest.fixture(scope="module")
def coco_shards(tmp_path_factory):
    """tiny_coco val2017 (48 annotated photos) as shards of 20: 20 + 20 + 8 samples."""
    out = tmp_path_factory.mktemp("coco_shards")
    folder = create_dataset("coco", TINY_COCO, "val2017", SIZE, train=False)
    write_shards(folder, TINY_COCO, out, "val2017", shard_size=20, dataset_name="coco")
    return out


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    """A generated set (30 training pictures) and its training split as shards of 7: 7, 7, 7, 7, 2 samples."""
    from asl.data import generate_synthetic_coco

    root = generate_synthetic_coco(tmp_path_factory.mktemp("syn"), num_train=30, num_val=6, image_size=24)
    out = root.parent / "shards"
    write_shards(create_dataset("synthetic", root, "train", SIZE, train=False), root, out, "train", shard_size=7)
    return root, out


def _items(loader):
    out = {}
    for batch in loader:
        for image, target, index in zip(batch.images, batch.targets, batch.indices.tolist()):
            assert index not in out
            out[index] = (image, target)
    return out


# ------------------------------------------------------------------------------------------ writing

@needs_coco
def test_coco_shards_hold_the_files_bytes_and_targets(coco_shards):
    meta = parse_split_meta((coco_shards / "val2017.json").read_bytes(), "val2017.json")
    folder = create_dataset("coco", TINY_COCO, "val2017", SIZE, train=False)
    assert meta.count == 48 and [s.count for s in meta.shards] == [20, 20, 8]
    assert list(meta.classes) == folder.classes and len(meta.classes) == 80
    index = json.loads((coco_shards / "val2017.json").read_text())
    assert index["idx_to_class"]["0"] == "person"
    with tarfile.open(coco_shards / "val2017-000001.tar") as tar:
        names = tar.getnames()
        assert names[:2] == ["000000020.jpg", "000000020.json"]
        record = json.loads(tar.extractfile("000000020.json").read())
        data = tar.extractfile("000000020.jpg").read()
    assert data == Path(folder.image_path(20)).read_bytes()  # the original bytes
    assert record["index"] == 20 and record["source"] == str(Path("val2017") / Path(folder.image_path(20)).name)
    assert record["positive"] == np.flatnonzero(folder.target(20).numpy() == 1).tolist()


def test_max_side_reencodes_large_pictures_only(tmp_path, write_image):
    from PIL import Image

    from asl.data.shards_write import _Encoded

    class Two:
        classes = ["a"]

        def __init__(self):
            write_image(tmp_path / "big.png", size=(80, 40))
            write_image(tmp_path / "small.png", size=(20, 10))

        def __len__(self):
            return 2

        def image_path(self, i):
            return str(tmp_path / ("big.png", "small.png")[i])

        def target(self, i):
            return torch.ones(1)

    encoded = _Encoded(Two(), 0, 32)
    _, big, ext, _, _ = encoded[0]
    assert ext == "jpg" and Image.open(__import__("io").BytesIO(big)).size == (32, 16)
    _, small, ext, _, _ = encoded[1]
    assert ext == "png" and small == (tmp_path / "small.png").read_bytes()


def test_unreadable_image_is_skipped_and_counted(tmp_path):
    from asl.data import generate_synthetic_coco

    root = generate_synthetic_coco(tmp_path / "syn", num_train=5, num_val=1, image_size=16)
    folder = create_dataset("synthetic", root, "train", SIZE, train=False)
    Path(folder.image_path(2)).write_bytes(b"not a picture")
    result = write_shards(folder, root, tmp_path / "out", "train", shard_size=10)
    assert result.meta.count == 4 and len(result.meta.skipped) == 1
    assert result.meta.skipped[0].endswith(Path(folder.image_path(2)).name)
    read = create_dataset("webdataset", tmp_path / "out", "train", SIZE, train=False, with_index=True)
    got = _items(create_shard_loader(read, 10))
    # the indices run without a gap; sample 2 is the folder's item 3
    assert sorted(got) == [0, 1, 2, 3] and torch.equal(got[2][0], folder[3][0])


def test_killed_write_leaves_no_finished_looking_shard_and_resumes(syn, tmp_path):
    root, reference = syn
    folder = create_dataset("synthetic", root, "train", SIZE, train=False)

    def stop_after(limit):
        seen = [0]

        def on_item(n):
            seen[0] += n
            if seen[0] > limit:
                raise KeyboardInterrupt

        return on_item

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        write_shards(folder, root, out, "train", shard_size=7, on_item=stop_after(17))
    # two shards done (14 samples), the third was being written: no tar of it, no index
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["train-000000.tar",
                                                                                    "train-000001.tar"]
    assert progress_path(out, "train").is_file() and not (out / "train.json").exists()
    # a shard damaged since: checked, and written again
    (out / "train-000001.tar").write_bytes((out / "train-000001.tar").read_bytes()[:1000])
    result = write_shards(folder, root, out, "train", shard_size=7)
    assert result.kept == 1 and result.written == 4
    for name in ["train.json"] + [f"train-00000{k}.tar" for k in range(5)]:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert not progress_path(out, "train").exists()
    with pytest.raises(UsageError, match="exists"):
        write_shards(folder, root, out, "train", shard_size=7)


# ------------------------------------------------------------------------------------------ reading

@needs_coco
@pytest.mark.parametrize("world", [1, 2, 4])
def test_evaluation_reads_every_sample_once_equal_to_the_folder(coco_shards, world):
    folder = create_dataset("coco", TINY_COCO, "val2017", SIZE, train=False)
    got = {}
    for rank in range(world):
        shards = create_dataset("webdataset", coco_shards, "val2017", SIZE, train=False, with_index=True)
        loader = create_shard_loader(shards, 8, rank=rank, world_size=world)
        part = _items(loader)
        assert not set(part) & set(got)
        got.update(part)
        assert len(loader) == -(-len(part) // 8)
    assert sorted(got) == list(range(len(folder)))
    for i in range(len(folder)):
        image, target = folder[i]
        assert torch.equal(got[i][0], image) and torch.equal(got[i][1], target)


@needs_coco
def test_training_augmentation_equals_the_folder_route(coco_shards):
    folder = create_dataset("coco", TINY_COCO, "val2017", SIZE, train=True, seed=3)
    shards = create_dataset("webdataset", coco_shards, "val2017", SIZE, train=True, seed=3, with_index=True)
    loader = create_shard_loader(shards, 16)
    folder.set_epoch(2)
    shards.set_epoch(2)
    got = _items(loader)
    assert sorted(got) == list(range(48))
    for i in (0, 17, 47):
        assert torch.equal(got[i][0], folder[i][0])


def test_slot_assignment_by_hand():
    assert slot_portions(5, 2, 0) == [type(slot_portions(1, 1, 0)[0])(j) for j in (0, 2, 4)]
    # 2 shards, 5 slots: shard 0 is shared by slots 0, 2, 4 (every 3rd sample), shard 1 by slots 1, 3
    assert [(p.shard, p.stride, p.offset) for s in range(5) for p in slot_portions(2, 5, s)] == \
        [(0, 3, 0), (1, 2, 0), (0, 3, 1), (1, 2, 1), (0, 3, 2)]
    # rank 0 has 3 + 1 batches, rank 1 only 2: it reads 2 whole batches again, from its worker that holds samples
    assert batches_per_worker([[9, 1], [5, 0]], 3) == [[3, 1], [4, 0]]
    with pytest.raises(ShardError):
        batches_per_worker([[3], [0]], 2)
    # a DataLoader takes a batch from each worker in turn, passing over finished ones: batches 0-4 come from
    # workers 0, 1, 2, 0, 2; the 6th from worker 0
    assert resume_plan([3, 1, 2], 5) == ([2, 1, 2], 0)
    assert resume_plan([3, 1, 2], 3) == ([1, 1, 1], 0)
    assert resume_plan([3, 2], 3) == ([2, 1], 1)  # next: worker 1's second batch, then worker 0's third
    assert resume_plan([3, 1, 2], 0) == ([0, 0, 0], 0)


@pytest.mark.parametrize("world,workers", [(1, 1), (1, 3), (2, 1), (3, 2), (4, 3)])
def test_training_ranks_stay_in_lockstep_and_one_process_sees_each_sample_once(syn, world, workers):
    """Shards of 7, 7, 7, 7, 2 samples. Each rank's workers are simulated in turn, in the DataLoader's order."""
    _, out = syn
    batch = 4
    per_rank = []
    for rank in range(world):
        ds = create_dataset("webdataset", out, "train", 16, train=True, with_index=True, shuffle_buffer=5)
        ds.partition(rank, world, workers, batch)
        ds.set_epoch(1)
        streams = [list(_worker_items(ds, w, workers)) for w in range(workers)]
        batches = [len(range(0, len(s), batch)) for s in streams]
        assert sum(batches) == ds.batches_per_epoch() and sum(len(s) for s in streams) == ds.items_per_epoch()
        per_rank.append((sum(batches), [i for s in streams for i in s]))
    assert len({n for n, _ in per_rank}) == 1  # lockstep: the same number of batches everywhere
    seen = [i for _, items in per_rank for i in items]
    assert set(seen) == set(range(30))
    if world == 1:
        assert sorted(seen) == list(range(30))


def _worker_items(ds, worker, workers):
    import torch.utils.data as tud

    class Info:
        id, num_workers = worker, workers

    original = tud.get_worker_info
    from asl.data import shards_read

    shards_read.get_worker_info = lambda: Info
    try:
        return [item[2] for item in ds]
    finally:
        shards_read.get_worker_info = original


def test_mid_epoch_skip_drops_exactly_the_batches_done(syn):
    _, out = syn
    ds = create_dataset("webdataset", out, "train", 16, train=True, with_index=True, shuffle_buffer=5)
    # 2 workers (16 and 14 samples, 4 batches each, taken in turn): after 3 batches the next is worker 1's 2nd
    loader = create_shard_loader(ds, 4, num_workers=2, persistent_workers=True)
    ds.set_epoch(0)
    full = [b.indices.tolist() for b in loader]
    ds.set_start(3)
    assert len(loader) == len(full) - 3  # train_one_epoch counts the steps left by it
    assert [b.indices.tolist() for b in loader] == full[3:]
    ds.set_epoch(1)
    assert [b.indices.tolist() for b in loader] != full  # another epoch, another order


# ------------------------------------------------------------------------------------------ other sources

@pytest.fixture
def http_base(syn):
    _, out = syn
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(out))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _eval_items(data, split="train", **options):
    ds = create_dataset("webdataset", data, split, 16, train=False, with_index=True, **options)
    return _items(create_shard_loader(ds, 8))


def test_http_and_pipe_read_what_the_folder_reads(syn, http_base):
    _, out = syn
    local = _eval_items(out)
    for data in (http_base, http_base + "/", f"pipe:cat {out}/{{name}}"):
        got = _eval_items(data)
        assert sorted(got) == sorted(local) == list(range(30))
        assert all(torch.equal(got[i][0], local[i][0]) for i in local)


def test_remote_failures_are_one_line_naming_the_url(syn, http_base):
    with pytest.raises(ShardError, match=r"/val\.json: HTTP 404"):
        create_dataset("webdataset", http_base, "val", 16, train=False)
    port = free_port()  # nothing listens there
    with pytest.raises(ShardError, match=f"127.0.0.1:{port}/train.json is unreachable"):
        create_dataset("webdataset", f"http://127.0.0.1:{port}", "train", 16, train=False)


def test_a_failing_pipe_command_is_one_line(syn):
    _, out = syn
    with pytest.raises(ShardError, match="exit 1"):
        create_dataset("webdataset", f"pipe:cat {out}/missing-{{name}} 2>/dev/null", "train", 16, train=False)
    with pytest.raises(DatasetError, match="needs {name}"):
        create_dataset("webdataset", f"pipe:cat {out}/train.json", "train", 16, train=False)


def test_a_stalled_server_gives_up():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)  # accepts connections and never answers
    try:
        with pytest.raises(ShardError, match="no answer within 0.5 s"):
            create_dataset("webdataset", f"http://127.0.0.1:{listener.getsockname()[1]}", "train", 16,
                           train=False, timeout=0.5)
    finally:
        listener.close()


# ------------------------------------------------------------------------------------------ broken input

def _copy(out: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    copy.mkdir(parents=True)
    for f in out.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    return copy


def test_broken_index_and_missing_or_truncated_shards_are_refused(syn, tmp_path):
    copy = _copy(syn[1], tmp_path)
    index = json.loads((copy / "train.json").read_text())

    def refused(match):
        with pytest.raises(DatasetError, match=match):
            create_dataset("webdataset", copy, "train", 16, train=False)

    (copy / "train.json").write_text("{not json")
    refused(r"train\.json is not JSON")
    for bad, match in ((dict(index, count=31), "shards hold 30"), (dict(index, shards=[{"name": "../x.tar",
                       "count": 30}]), "not a plain file name"),
                       (dict(index, shards=[{"name": "a;rm -rf x.tar", "count": 30}]), "not a plain file name")):
        (copy / "train.json").write_text(json.dumps(bad))
        refused(match)
    (copy / "train.json").write_text(json.dumps(index))
    (copy / "train-000003.tar").rename(copy / "moved.tar")
    refused(r"train-000003\.tar not found")
    (copy / "train-000003.tar").write_bytes((copy / "moved.tar").read_bytes()[:-1024])
    refused(r"train-000003\.tar has \d+ bytes but its index records \d+")


def _overwrite(shard: Path, member_name: str, header: bool) -> None:
    """Zeros over a member's header or data, the file keeping its size."""
    with tarfile.open(shard) as tar:
        member = tar.getmember(member_name)
        start, size = (member.offset, 512) if header else (member.offset_data, member.size)
    with open(shard, "r+b") as f:
        f.seek(start)
        f.write(b"\x07" * size)


def test_a_shard_broken_inside_is_named_and_a_bad_picture_is_skipped(syn, tmp_path):
    copy = _copy(syn[1], tmp_path)
    _overwrite(copy / "train-000001.tar", "000000010.json", header=True)
    with pytest.raises(ShardError, match=r"train-000001\.tar is broken: sample '000000010' has no labels"):
        _eval_items(copy)
    _overwrite(copy / "train-000001.tar", "000000010.jpg", header=True)
    ds = create_dataset("webdataset", copy, "train", 16, train=False, with_index=True)
    with pytest.raises(ShardError, match=r"train-000001\.tar holds 3 samples but its index records 7") as caught:
        _items(create_shard_loader(ds, 8, num_workers=1))  # raised in a worker, still one line
    assert "\n" not in str(caught.value) and str(caught.value).startswith(str(copy))
    # As the apps do after a failed run: the failed loader's worker, kept alive by the exception's frames, would
    # otherwise stall a later garbage collection for 10 s (torch's join timeouts; the worker ignores SIGTERM).
    stop_loader_workers()
    # a picture that does not decode: skipped and counted, as in the folder route
    copy = _copy(syn[1], tmp_path / "second")
    _overwrite(copy / "train-000000.tar", "000000003.jpg", header=False)
    ds = create_dataset("webdataset", copy, "train", 16, train=False, with_index=True)
    got = 0
    skipped = 0
    for batch in create_shard_loader(ds, 8):
        got += batch.images.shape[0]
        skipped += batch.skipped
    assert (got, skipped, ds.num_unreadable()) == (29, 1, 1)
    # read again in a second epoch, by two workers: still one picture, as the folder route counts
    ds.set_epoch(1)
    assert sum(b.skipped for b in create_shard_loader(ds, 8, num_workers=2)) == 1 and ds.num_unreadable() == 1


def test_shards_app_writes_then_refuses_to_write_over(tmp_path, capsys):
    from asl.apps import shards as shards_app

    out = tmp_path / "out"
    argv = [str(tmp_path / "syn"), "--dataset", "synthetic", "--split", "val", "--output", str(out), "--shard_size",
            "3", "-j", "0", "--dataset-option", "num_train=2", "--dataset-option", "num_val=7",
            "--dataset-option", "synthetic_size=8"]
    assert shards_app.main(argv) == 0
    assert "wrote 7 samples in 3 shard(s)" in capsys.readouterr().out
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == ["val-000000.tar", "val-000001.tar", "val-000002.tar", "val.json"]
    assert shards_app.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "val.json exists" in err[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_open_images_keeps_unknown_labels_and_training_decides(oi_root, tmp_path):
    folder = create_dataset("openimages", oi_root, "train", 16, train=False)
    write_shards(folder, oi_root, tmp_path / "oi", "train", shard_size=2)
    expected = torch.stack([folder.target(i) for i in range(len(folder))])
    assert (expected == -1).any()  # not-annotated labels, kept as -1 by evaluation
    got = _eval_items(tmp_path / "oi")
    assert torch.equal(torch.stack([got[i][1] for i in range(len(folder))]), expected)
    for unannotated, unknown in (("negative", 0.0), ("ignore", -1.0)):
        ds = create_dataset("webdataset", tmp_path / "oi", "train", 16, train=True, with_index=True,
                            unannotated=unannotated, shuffle_buffer=0)
        trained = _items(create_shard_loader(ds, 8))
        want = torch.where(expected == -1, torch.tensor(unknown), expected)
        assert torch.equal(torch.stack([trained[i][1] for i in range(len(folder))]), want)
