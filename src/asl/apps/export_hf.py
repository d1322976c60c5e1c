"""``export.py --format hf``: a folder the Hugging Face Hub serves as it is, and every script reads back.

``model.safetensors`` holds the model in the official layout (the config also rides in its metadata, so the file
alone is enough); ``config.json`` holds timm's keys and ours under ``asl`` (:func:`asl.sources.config_from_checkpoint`);
``README.md`` is a model card, with the metrics of a ``validate.py --output-json`` file when one is given.
``hf upload ORG/NAME FOLDER`` publishes it, and ``--model-path hf-hub:ORG/NAME`` loads it back.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Optional

from asl.atomic import atomic_write_bytes, atomic_write_text
from asl.errors import UsageError
from asl.evaluation.report import markdown_text
from asl.models.loading import LoadedModel
from asl.sources import CONFIG_FILE, config_from_checkpoint

__all__ = ["FILES", "export_hf", "read_json_file"]

#: what export_hf writes in its folder
FILES = ("model.safetensors", CONFIG_FILE, "README.md")


def read_json_file(path: Optional[str], flag: str) -> Optional[dict]:
    """A small JSON object given on the command line (metrics, thresholds), or None; bad files are one line."""
    if not path:
        return None
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"{flag} {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise UsageError(f"{flag} {path} is not a JSON file ({str(exc)[:80]})") from None
    if not isinstance(document, dict):
        raise UsageError(f"{flag} {path} must hold a JSON object")
    return document


def export_hf(loaded: LoadedModel, output: Path, image_size: int, metrics: Optional[Mapping[str, Any]] = None,
              thresholds: Optional[Mapping[str, float]] = None, threshold: Optional[float] = None) -> None:
    """Writes ``output/model.safetensors``, ``config.json`` and ``README.md`` (each file atomically)."""
    from safetensors.torch import save

    ckpt = {"model_name": loaded.model_name, "bottleneck_head": loaded.bottleneck_head, "head": loaded.head}
    if loaded.head == "ml-decoder":
        ckpt.update(num_of_groups=loaded.num_of_groups, decoder_embedding=loaded.decoder_embedding)
    config = config_from_checkpoint(ckpt, loaded.class_names, image_size, thresholds, threshold)
    # Contiguous copies: safetensors stores plain row-major tensors and refuses shared storage.
    state = {k: v.detach().cpu().contiguous().clone() for k, v in loaded.model.state_dict().items()}
    output.mkdir(parents=True, exist_ok=True)
    weights, config_file, card = (output / name for name in FILES)
    atomic_write_bytes(weights, save(state, metadata={"format": "pt", "asl": json.dumps(config["asl"])}))
    atomic_write_text(config_file, json.dumps(config, indent=2) + "\n")
    atomic_write_text(card, model_card(config, metrics))


def _number(value: Any) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(float(value)) else None


def model_card(config: Mapping[str, Any], metrics: Optional[Mapping[str, Any]]) -> str:
    """The model card (``README.md``). Class names, the model name and the metrics file's words come from files
    anyone can write: they go in as Markdown text (:func:`~asl.evaluation.report.markdown_text`, as on the
    validate.py report), so none can open HTML, a code block, or a new line of the card."""
    asl = config["asl"]
    lines = [
        "---",
        "library_name: asl",
        "tags: [image-classification, multi-label, asymmetric-loss]",
        "license: mit",
        "---",
        "",
        f"# {markdown_text(asl['model_name'])}, multi-label, {asl['num_classes']} classes",
        "",
        "Trained with the Asymmetric Loss (ASL, Ben-Baruch, Ridnik et al., ICCV 2021) with the ASL reproduction's",
        "`train.py`. Load it with that repository's scripts:",
        "",
        "```",
        "python validate.py DATA --model-path hf-hub:ORG/NAME",
        "python infer.py --model-path hf-hub:ORG/NAME --pic-path picture.jpg",
        "```",
        "",
        f"- input: RGB in [0, 1], resized (squished) to {asl['image_size']} x {asl['image_size']}, no mean/std "
        "normalisation;",
        "- output: one logit per class; a sigmoid gives the probabilities;",
        f"- classes: `config.json` (`label_names`), first: {', '.join(map(markdown_text, asl['class_names'][:5]))}"
        + (" ..." if len(asl["class_names"]) > 5 else ""),
    ]
    if "threshold" in asl or "thresholds" in asl:
        lines.append(f"- thresholds: {'one per class' if 'thresholds' in asl else asl['threshold']} "
                     f"(`config.json`, `asl`)")
    if metrics:
        lines += ["", "## Evaluation", "", "| metric | value |", "| --- | --- |"]
        for key in ("mAP", "P_C", "R_C", "F_C", "P_O", "R_O", "F_O"):
            value = _number(metrics.get(key))
            if value is not None:
                lines.append(f"| {'partial mAP' if key == 'mAP' and metrics.get('metric') == 'partial_mAP' else key}"
                             f" | {value:.2f} |")
        where = ", ".join(markdown_text(metrics[k]) for k in ("dataset", "split", "num_images") if k in metrics)
        if where:
            lines += ["", f"Measured by `validate.py --output-json` on {where} (images), at "
                          f"{markdown_text(metrics.get('image_size', asl['image_size']))} px."]
    return "\n".join(lines) + "\n"
