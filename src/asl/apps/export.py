"""Export a checkpoint to ONNX with a dynamic batch axis (asked for in the original's issues #73 and #86), or to a
Hugging Face Hub folder (:mod:`asl.apps.export_hf`).

    python export.py --model-path MS_COCO_TRresNet_L_448_86.6.pth --format onnx --output tresnet_l_448.onnx
    python export.py --model-path models/model-highest.pth --format hf --output my-asl-model \
        --metrics-json val.json --thresholds thresholds.json

The graph takes ``input``: float32 RGB in [0, 1], shape (batch, 3, S, S), no mean/std normalisation (resize the
picture to S x S first, as validate.py does), and returns ``logits`` (batch, num_classes); apply a sigmoid for
probabilities. The class names are stored in the model's metadata (``class_names``, JSON).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch

from asl.cli import ArgumentParser, check_folder, check_writable, positive_int, probability, run_main, setup_logging
from asl.errors import UsageError
from asl.evaluation.thresholds import load_thresholds
from asl.models.loading import load_model

from .export_hf import FILES as HF_FILES, export_hf, read_json_file
from .options import MODEL_SOURCE_HELP, model_options

logger = logging.getLogger("export")

FORMATS = ("onnx", "hf")
#: every model of this package exports at this opset (tests/test_export.py); others may lack an operator
DEFAULT_OPSET = 17


def build_parser() -> ArgumentParser:
    parents = [model_options(MODEL_SOURCE_HELP, required=True, num_classes=True)]
    parser = ArgumentParser(prog="export.py", parents=parents,
                            description="Export an ASL checkpoint (official model-zoo file or ours) to ONNX, or to a "
                                        "Hugging Face Hub folder (--format hf).")
    parser.add_argument("--format", type=str, default="onnx", choices=FORMATS,
                        help="onnx: one .onnx file; hf: a folder with model.safetensors, config.json and README.md")
    parser.add_argument("--output", type=str, default=None,
                        help="output file or folder (default: the checkpoint's name with .onnx, or the name alone for "
                             "hf, in the current folder)")
    parser.add_argument("--opset", type=positive_int, default=DEFAULT_OPSET, help="ONNX opset version")
    parser.add_argument("--metrics-json", type=str, default=None, metavar="FILE",
                        help="hf: the validate.py --output-json file whose metrics go into the model card")
    parser.add_argument("--thresholds", type=str, default=None, metavar="FILE",
                        help="hf: the validate.py --save-thresholds file, stored in config.json")
    parser.add_argument("--threshold", "--thre", "--th", type=probability, default=None, metavar="T",
                        help="hf: one default threshold for every class, stored in config.json")
    parser.add_argument("--verbose", action="store_true")
    return parser


def export_onnx(model: torch.nn.Module, output: Path, image_size: int, opset: int) -> None:
    """Writes ``model`` as ONNX with a dynamic batch axis.

    The TorchScript-based exporter (``dynamo=False``) is used because it needs nothing beyond torch and onnx and
    works offline; the torch.export-based one additionally needs the ``onnxscript`` package. If a future torch
    drops the former, we fall back to the latter.
    """
    dummy = torch.zeros(2, 3, image_size, image_size)
    output.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # The tracer warns about Python-level shape checks and the exporter about its own deprecation; neither
        # affects a graph whose only dynamic axis is the batch.
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (dummy,), str(output), dynamo=False, opset_version=opset,
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        except TypeError:  # no legacy exporter in this torch: use torch.export with a symbolic batch
            batch = torch.export.Dim("batch")
            torch.onnx.export(model, (dummy,), str(output), dynamo=True, opset_version=opset,
                              input_names=["input"], output_names=["logits"],
                              dynamic_shapes=({0: batch},))


def _add_metadata(path: Path, metadata: dict) -> None:
    import onnx

    proto = onnx.load(str(path))
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


def check_output(output: Path, hf: bool) -> None:
    """The place to write, checked before a large checkpoint is loaded: a file name for ONNX; for hf a folder that
    is new, empty or an earlier export (a Hub upload sends the whole folder, so other files would go with it)."""
    if not hf:
        check_writable("--output", output)
        return
    if os.path.lexists(output) and not os.path.isdir(output):
        raise UsageError(f"--output {output} is a file; --format hf writes a folder")
    check_folder("--output", output)
    if os.path.isdir(output):
        try:
            others = sorted(set(os.listdir(output)) - set(HF_FILES))
        except OSError as exc:
            raise UsageError(f"--output {output}: {exc.strerror or exc}") from None
        if others:
            shown = ", ".join(others[:3]) + (" ..." if len(others) > 3 else "")
            raise UsageError(f"--output {output} already holds other files ({shown}); give a new or empty folder, "
                             f"since a Hub upload of the folder would publish them too")


def _export_onnx(model: torch.nn.Module, output: Path, image_size: int, opset: int) -> None:
    try:
        export_onnx(model, output, image_size, opset)
    except RuntimeError as exc:  # torch.onnx's errors are RuntimeErrors (OnnxExporterError among them)
        # A chosen opset that torch or the model's operators do not support is the user's choice; at the default
        # opset every model exports, so a failure there is a bug and keeps its traceback.
        if opset == DEFAULT_OPSET or not (isinstance(exc, torch.onnx.errors.OnnxExporterError)
                                          or "opset" in str(exc).lower()):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--opset {opset}: cannot export this model at that opset ({first[:160]}); the default "
                         f"{DEFAULT_OPSET} works") from exc


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit code: 0, 2 for bad input (one line), 1 for a bug (traceback)."""
    return run_main(run, argv, prog="export.py")


def run(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    hf = args.format == "hf"
    stray = [flag for flag, value in (("--metrics-json", args.metrics_json), ("--thresholds", args.thresholds),
                                      ("--threshold", args.threshold)) if value is not None]
    if stray and not hf:
        raise UsageError(f"{' and '.join(stray)}: for --format hf only (config.json and the model card); an ONNX "
                         f"file has no place for them")
    if not hf:
        try:
            import onnx  # noqa: F401  (torch.onnx needs it; say so before loading a large checkpoint)
        except ImportError:
            raise UsageError("ONNX export needs the 'onnx' package: pip install -e '.[onnx]'") from None
    # Read before the model: a mistyped file fails at once.
    metrics = read_json_file(args.metrics_json, "--metrics-json")
    stem = Path(args.model_path.rstrip("/").split("@")[0].split(":")[-1]).stem or "model"
    output = Path(args.output) if args.output else Path(stem if hf else stem + ".onnx")
    check_output(output, hf)
    # The hf folder keeps the official layout (unfolded) so that it loads strictly into a fresh model.
    loaded = load_model(args.model_path, args.model_name, num_classes=args.num_classes, device="cpu",
                        channels_last=False, prepare=not hf, sha256=args.model_sha256)
    args.image_size, size_from = loaded.input_size(args.image_size)
    logger.info("image size %d (%s)", args.image_size, size_from)
    if hf:
        thresholds = None
        if args.thresholds:
            values = load_thresholds(args.thresholds, loaded.class_names)  # checked against the model's classes
            thresholds = dict(zip(loaded.class_names, values.tolist()))
        export_hf(loaded, output, args.image_size, metrics, thresholds, args.threshold)
        print(f"wrote {output}/ (model.safetensors, config.json, README.md: {loaded.model_name}, "
              f"{loaded.num_classes} classes, {args.image_size} px); publish it with: hf upload "
              f"ORG/NAME {output}")
        return 0
    _export_onnx(loaded.model, output, args.image_size, args.opset)
    _add_metadata(output, {
        "class_names": json.dumps(loaded.class_names),
        "model_name": loaded.model_name,
        "image_size": str(args.image_size),
        "preprocessing": "RGB, Resize((S, S)) squish, float in [0, 1], no mean/std normalisation",
        "output": "logits; sigmoid gives per-class probabilities",
    })
    print(f"wrote {output} ({loaded.model_name}, {loaded.num_classes} classes, input (batch, 3, "
          f"{args.image_size}, {args.image_size}))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
