"""``shards.py``: write a dataset split as WebDataset shards, for ``--dataset webdataset`` in train.py, validate.py
and ablate.py.

    python shards.py /data/coco --dataset coco --split val2014 --output /data/coco-shards
    python shards.py /data/openimages --dataset openimages --split train --output oi-shards --max-side 512

Writes ``OUTPUT/SPLIT-000000.tar``, ``OUTPUT/SPLIT-000001.tar``, ... and, last, ``OUTPUT/SPLIT.json``. A killed
run leaves no shard that looks finished; the same command again goes on after the last complete shard. Format
and guarantees: :mod:`asl.data.shards_write`; how each dataset becomes shards: Datasets.md.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

from tqdm import tqdm

from asl.cli import ArgumentParser, check_folder, nonnegative_int, positive_int, run_main, setup_logging
from asl.data import DATASET_NAMES, canonical_name, create_dataset, default_split
from asl.data.shards_format import check_shard_name
from asl.data.shards_write import check_not_written, write_shards
from asl.errors import UsageError

from .options import add_max_pixels, check_data, check_pixel_limit, cpu_cores, dataset_options

#: dataset options that shards.py sets from its own flags
_SET_BY_SHARDS = {"split": "--split", "seed": None}


def build_parser() -> ArgumentParser:
    workers = min(8, cpu_cores())
    p = ArgumentParser(prog="shards.py", description="Write a dataset split as WebDataset shards (tar files).")
    p.add_argument("data", type=str, metavar="DATA", help="dataset root (layouts: Datasets.md)")
    p.add_argument("--dataset", type=str, required=True,
                   help=f"one of {', '.join(n for n in DATASET_NAMES if n != 'webdataset')}")
    p.add_argument("--split", type=str, default=None,
                   help="the split to write (default: the dataset's training split, e.g. train2014 for coco)")
    p.add_argument("--output", type=str, required=True, metavar="DIR", help="folder of the shards and SPLIT.json")
    p.add_argument("--shard-size", type=positive_int, default=1000, help="samples per shard")
    p.add_argument("--max-side", type=positive_int, default=None, metavar="S",
                   help="re-encode pictures whose longer side is above S (JPEG, aspect kept); default: the files' "
                        "own bytes")
    p.add_argument("-j", "--workers", type=nonnegative_int, default=workers,
                   help=f"processes decoding the pictures (default: min(8, CPU cores) = {workers})")
    p.add_argument("--dataset-option", type=str, action="append", default=[], metavar="KEY=VALUE",
                   help="extra dataset option, as in train.py (e.g. difficult=positive for a voc training split)")
    add_max_pixels(p)
    p.add_argument("--verbose", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit code: 0, 2 for bad input (one line), 1 for a bug (traceback)."""
    return run_main(run, argv, prog="shards.py")


def run(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    name = canonical_name(args.dataset)
    if name == "webdataset":
        raise UsageError("--dataset webdataset: shards.py writes shards from a dataset's own files; give the "
                         "dataset they came from (coco, voc, nus-wide, openimages, csv, synthetic)")
    options = dataset_options(args.dataset_option, "shards.py", _SET_BY_SHARDS)
    split = args.split or default_split(name, train=True)
    check_shard_name(f"{split}.json", "--split")
    check_data(args.data, name)
    check_folder("--output", Path(args.output))
    check_not_written(args.output, split)  # before the dataset is read
    check_pixel_limit()
    # Evaluation targets (train=False): not-annotated labels stay -1; training from shards decides what they mean.
    # The image size is unused: the shards keep encoded pictures.
    dataset = create_dataset(name, args.data, split, 1, train=False, **options)
    print(f"{name} {split}: {len(dataset)} images, {dataset.num_classes} classes -> {args.output}", flush=True)
    with tqdm(total=len(dataset), unit="img", desc=split, disable=None) as bar:
        result = write_shards(dataset, args.data, args.output, split, shard_size=args.shard_size,
                              max_side=args.max_side, workers=args.workers, dataset_name=name, on_item=bar.update)
    meta = result.meta
    kept = f" ({result.kept} kept from an earlier run)" if result.kept else ""
    skipped = f"; skipped {len(meta.skipped)} unreadable image(s)" if meta.skipped else ""
    print(f"wrote {meta.count} samples in {len(meta.shards)} shard(s){kept}{skipped}; index: "
          f"{Path(args.output) / f'{split}.json'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
