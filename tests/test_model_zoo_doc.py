"""MODEL_ZOO.md lists the original's seven files, and every command in it parses (no download happens)."""
import re
import shlex
import urllib.parse
from pathlib import Path

import pytest

from asl.checkpoint import is_url
from asl.models.loading import stored_image_size

REPO = Path(__file__).resolve().parents[1]


from asl.apps import infer  # noqa: E402
from asl.apps import validate  # noqa: E402

ZOO = "https://miil-public-eu.oss-eu-central-1.aliyuncs.com/model-zoo/ASL/"
# The original MODEL_ZOO.md: six models and the NUS-WIDE split file.
ORIGINAL_FILES = {
    "MS_COCO_TRresNet_M_224_81.8.pth", "MS_COCO_TRresNet_L_448_86.6.pth", "MS_COCO_TResNet_xl_640_88.4.pth",
    "Open_ImagesV6_TRresNet_L_448.pth", "PASCAL_VOC_TResNet_xl_448_96.0.pth", "NUS_WIDE_TRresNet_L_448_65.2.pth",
    "nus_wid_data.csv",
}
TEXT = (REPO / "MODEL_ZOO.md").read_text(encoding="utf-8")


def _urls() -> set[str]:
    return set(re.findall(r"https?://[^\s)\]`'\"]+", TEXT))


def _commands(script: str) -> list[list[str]]:
    """Each ``python <script> ...`` command of the code blocks, with its continuation lines joined."""
    blocks = "\n".join(re.findall(r"```\n(.*?)```", TEXT, flags=re.S)).replace("\\\n", " ")
    return [shlex.split(line)[2:] for line in blocks.splitlines() if line.startswith(f"python {script} ")]


def test_lists_all_seven_files_of_the_original():
    names = {Path(urllib.parse.urlparse(u).path).name for u in _urls() if u.startswith(ZOO)}
    assert names == ORIGINAL_FILES


@pytest.mark.parametrize("url", sorted(u for u in _urls() if u.endswith(".pth")))
def test_every_checkpoint_url_is_accepted_by_validate(url, tmp_path):
    args = validate.build_parser().parse_args([str(tmp_path), "--model-path", url])
    validate.check_args(args)
    assert is_url(args.model_path)


def _image_size(args) -> int:
    """The size a command runs at: its --image-size, else (the original README's spelling leaves it out) the one the
    scripts take for an official file, which names no size inside."""
    return args.image_size if args.image_size is not None else stored_image_size({}, args.model_path)[0]


def test_every_validate_and_infer_command_parses(tmp_path, monkeypatch):
    validate_commands, infer_commands = _commands("validate.py"), _commands("infer.py")
    assert len(validate_commands) >= 6 and len(infer_commands) >= 5
    assert sum(any(name in " ".join(c) for name in ORIGINAL_FILES) for c in validate_commands) >= 6
    monkeypatch.chdir(tmp_path)
    for argv in validate_commands:
        Path(argv[0]).mkdir(exist_ok=True)
        args = validate.build_parser().parse_args(argv)
        validate.check_args(args)
        size = re.search(r"_(224|448|640)[_.]", args.model_path)
        official = any(name in args.model_path for name in ORIGINAL_FILES)
        assert not official or (size and int(size.group(1)) == _image_size(args)), argv
    for argv in infer_commands:
        args = infer.build_parser().parse_args(argv)
        size = re.search(r"_(224|448|640)[_.]", args.model_path)
        assert size and int(size.group(1)) == _image_size(args), argv
        if "Open_Images" in args.model_path:
            assert args.dataset_type == "OpenImages"
            assert infer.default_threshold(args.dataset_type) == 0.995


def test_every_pics_path_exists():
    """A newcomer copies the commands as they are: every picture or folder under pics/ that the page names is in the
    repository (the original's COCO example picture is not, so the page must not name it as a path)."""
    paths = re.findall(r"(?<![\w/.])(?:\./)?pics/[^\s`'\")\]]*", TEXT)
    assert paths
    for path in paths:
        assert (REPO / path).exists(), path


def test_offline_a_copied_hub_cache_serves_its_urls_without_the_network(tmp_path, monkeypatch):
    """What the "Without internet" paragraph promises: a cache folder copied from another machine
    ($TORCH_HOME/hub/checkpoints, entries named <file>-<first 12 hex of the URL's SHA-256>) serves its URLs, and
    the network is never asked."""
    import hashlib

    import torch

    from asl import download

    assert "Without internet" in TEXT and "$TORCH_HOME/hub/checkpoints" in TEXT
    url = ZOO + "MS_COCO_TRresNet_M_224_81.8.pth"
    key = hashlib.sha256(url.encode()).hexdigest()[:12]
    copied = tmp_path / "hub" / "checkpoints" / f"MS_COCO_TRresNet_M_224_81.8-{key}.pth"
    copied.parent.mkdir(parents=True)
    copied.write_bytes(b"weights")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)

    def offline(*args, **kwargs):
        raise AssertionError("the network was asked")

    monkeypatch.setattr(download.urllib.request, "urlopen", offline)
    assert Path(download.download(url)) == copied


def test_the_train_commands_start_from_the_hub_backbones():
    """The dead bucket is said plainly, and every train.py command starts from a Hub id timm publishes."""
    assert "403 Forbidden" in TEXT
    commands = _commands("train.py")
    assert commands
    from asl.apps import train

    for argv in commands:
        args = train.build_parser().parse_args(argv)
        assert args.model_path.startswith("hf-hub:timm/tresnet_"), argv
        import timm

        assert args.model_path[len("hf-hub:timm/"):] in timm.list_pretrained("tresnet*"), argv
