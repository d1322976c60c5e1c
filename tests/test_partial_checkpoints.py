"""The CSL Open Images checkpoints' layout (TResNet-M / TResNet-L v2, 512-wide bottleneck head, 9605 classes)
loads unchanged, and computes what timm's TResNet backbone followed by that head computes on the same weights."""
import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")

from asl.models import convert_timm_tresnet, create_model  # noqa: E402
from asl.models.loading import class_names_from_checkpoint, resolve_architecture  # noqa: E402

OPEN_IMAGES_CLASSES, BOTTLENECK = 9605, 512


def randomize_norms(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Give timm's BatchNorms non-trivial statistics and scales, so that the comparison means something."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
                m.weight.copy_(torch.rand(m.num_features, generator=generator) + 0.5)


def csl_state_dict(backbone: torch.nn.Module, num_features: int, generator: torch.Generator) -> dict:
    """What a CSL Open Images file holds under 'model': the official TResNet keys (timm's backbone converted back)
    and the bottleneck head Linear(num_features, 512) -> Linear(512, 9605)."""
    state = convert_timm_tresnet({k: v for k, v in backbone.state_dict().items() if not k.startswith("head.")})
    state["head.fc.embedding_generator.0.weight"] = torch.randn(BOTTLENECK, num_features, generator=generator) * 0.02
    state["head.fc.embedding_generator.0.bias"] = torch.randn(BOTTLENECK, generator=generator) * 0.02
    state["head.fc.FC.weight"] = torch.randn(OPEN_IMAGES_CLASSES, BOTTLENECK, generator=generator) * 0.05
    state["head.fc.FC.bias"] = torch.randn(OPEN_IMAGES_CLASSES, generator=generator) * 0.05
    return state


def test_the_csl_tresnet_m_file_loads_unchanged_and_matches_timms_backbone():
    generator = torch.Generator().manual_seed(0)
    reference = timm.create_model("tresnet_m", num_classes=0).eval()  # pooled 2048 features
    randomize_norms(reference, generator)
    state = csl_state_dict(reference, 2048, generator)

    ours = create_model("tresnet_m", OPEN_IMAGES_CLASSES, bottleneck_head=True).eval()
    ours.load_state_dict(state, strict=True)
    x = torch.rand(2, 3, 64, 64, generator=generator)
    with torch.no_grad():
        embedding = F.linear(reference(x), state["head.fc.embedding_generator.0.weight"],
                             state["head.fc.embedding_generator.0.bias"])
        expected = F.linear(embedding, state["head.fc.FC.weight"], state["head.fc.FC.bias"])
        got = ours(x)
    tolerance = 1e-5 * expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=tolerance)

    # The file as CSL released it: {'model', 'num_classes', 'idx_to_class' (Open Images MIDs)}, no size in its name.
    # What load_model reads from it after torch.load: the architecture, from the shapes alone, and the class names.
    csl_file = {"model": state, "num_classes": OPEN_IMAGES_CLASSES,
                "idx_to_class": {i: f"/m/{i:05x}" for i in range(OPEN_IMAGES_CLASSES)}}
    arch = resolve_architecture(csl_file)
    assert (arch["model_name"], arch["bottleneck_head"], arch["num_classes"]) == \
        ("tresnet_m", True, OPEN_IMAGES_CLASSES)
    assert class_names_from_checkpoint(csl_file, OPEN_IMAGES_CLASSES)[:2] == ["/m/00000", "/m/00001"]


def test_tresnet_v2_l_takes_the_bottleneck_head_in_the_csl_layout():
    """ltresnet_v2_opim_87.34.pth: TResNet-L v2 with the same head; its keys and shapes, from timm's TResNet-L v2
    converted back, are exactly our model's (built without storage)."""
    with torch.device("meta"):
        reference = timm.create_model("tresnet_v2_l", num_classes=0)
        ours = create_model("tresnet_v2_l", OPEN_IMAGES_CLASSES, bottleneck_head=True)
    # Uninitialised storage is enough to convert the keys (only the norm scales are read, to clamp them).
    timm_state = {k: torch.zeros(v.shape) if k.endswith("bn.weight") else torch.empty(v.shape)
                  for k, v in reference.state_dict().items()}
    expected = {k: tuple(v.shape) for k, v in convert_timm_tresnet(timm_state).items()}
    expected.update({"head.fc.embedding_generator.0.weight": (BOTTLENECK, 2048),
                     "head.fc.embedding_generator.0.bias": (BOTTLENECK,),
                     "head.fc.FC.weight": (OPEN_IMAGES_CLASSES, BOTTLENECK), "head.fc.FC.bias": (OPEN_IMAGES_CLASSES,)})
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert got == expected
