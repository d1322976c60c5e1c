"""Issue 29, the apps' part: what reaches a user from the model card, pictures, validate.py's console and infer.py's
thresholds. Small inputs throughout: model cards and thresholds as plain data, pictures of a few pixels."""
from __future__ import annotations

from asl.apps.export_hf import model_card
from asl.sources import config_from_checkpoint


def test_model_card_shows_hostile_class_names_as_text():
    names = ["<script>alert(1)</script>", "two\nlines", "```", "a|b", "plain"]
    config = config_from_checkpoint({"model_name": "tresnet_m<b>"}, names, 64)
    card = model_card(config, {"mAP": 50.0, "dataset": "coco</td>", "split": "val\n# heading", "num_images": 3})
    lines = card.splitlines()
    assert "<script>" not in card and "<b>" not in card and "</td>" not in card
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in card
    # The card's own code block is the only one: the class name ``` is escaped, so no fence opens.
    assert [line for line in lines if line.startswith("```")] == ["```", "```"]
    assert "\\`\\`\\`" in card
    classes = [line for line in lines if line.startswith("- classes:")]
    # rendered, the backslash before n is literal: the page reads two\nlines on one line
    assert len(classes) == 1 and "two\\\\nlines" in classes[0] and "a\\|b" in classes[0]
    assert not any(line.startswith("# heading") for line in lines)
    assert lines[6] == "# tresnet\\_m&lt;b&gt;, multi-label, 5 classes"
