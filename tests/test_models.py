import pytest
import torch

import kernelwarehouse as kw
from kernelwarehouse.models import parse_budget

# sum(p.numel()) of the reference implementation's models, ImageNet heads (SPEC section 3)
REFERENCE_COUNTS = [
    ("resnet18", None, 11689512),
    ("kw_resnet18", "1/4", 4031768),
    ("kw_resnet18", "1/2", 7431044),
    ("kw_resnet18", 1, 11932148),
    ("kw_resnet18", 2, 23242127),
    ("kw_resnet18", 4, 45862085),
    ("resnet50", None, 25557032),
    ("kw_resnet50", "1/2", 17638264),
    ("kw_resnet50", 1, 28052310),
    ("kw_resnet50", 4, 102015144),
    ("mobilenetv2_100", None, 3504872),
    ("kw_mobilenetv2_100", "1/2", 2654396),
    ("kw_mobilenetv2_100", 1, 5168146),
    ("kw_mobilenetv2_100", 4, 11379382),
    ("mobilenetv2_050", None, 1968680),
    ("kw_mobilenetv2_050", "1/2", 1466888),
    ("kw_mobilenetv2_050", 1, 2854522),
    ("kw_mobilenetv2_050", 4, 4648587),
    ("convnext_tiny", None, 28589128),
    ("kw_convnext_tiny", 1, 39370674),
]


@pytest.mark.parametrize("name,budget,expected", REFERENCE_COUNTS)
def test_parameter_counts_equal_the_reference(name, budget, expected):
    model = kw.create_model(name, budget=budget)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_list_models():
    names = kw.list_models()
    for name in (
        "resnet18",
        "resnet50",
        "mobilenetv2_100",
        "mobilenetv2_050",
        "convnext_tiny",
        "kw_resnet18",
        "kw_resnet50",
        "kw_mobilenetv2_100",
        "kw_mobilenetv2_050",
        "kw_convnext_tiny",
    ):
        assert name in names


@pytest.mark.parametrize(
    "name,budget",
    [
        ("kw_resnet18", 0.5),
        ("kw_resnet50", 0.5),
        ("kw_mobilenetv2_050", 0.5),
        ("kw_mobilenetv2_100", 4),
        ("kw_convnext_tiny", 1),
        ("resnet18", None),
    ],
)
def test_models_run_in_float64_and_float32(name, budget):
    model = kw.create_model(name, budget=budget, num_classes=7).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out32 = model(x)
        out64 = model.double()(x.double())
    assert out32.shape == out64.shape == (2, 7) and out64.dtype == torch.float64
    assert torch.isfinite(out64).all()
    torch.testing.assert_close(out32.double(), out64, rtol=1e-3, atol=1e-4)


def test_training_step_updates_warehouses_and_attention():
    model = kw.create_model("kw_resnet18", budget=1, num_classes=5, small_input=True, in_chans=1)
    kw.set_temperature(model, 0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.layer3[0].conv2.warehouse.weight.detach().clone()
    fc2 = model.layer3[0].conv2.attention.fc2.weight.detach().clone()
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 1, 8, 8)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    opt.step()
    assert not torch.equal(before, model.layer3[0].conv2.warehouse.weight)
    assert not torch.equal(fc2, model.layer3[0].conv2.attention.fc2.weight)


def test_state_dict_round_trip_gives_identical_outputs(tmp_path):
    model = kw.create_model("kw_mobilenetv2_050", budget=0.5, num_classes=10).eval()
    kw.set_temperature(model, 0.3)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    state = torch.load(tmp_path / "m.pt")
    assert any(k.endswith("attention.beta") for k in state)
    fresh = kw.create_model("kw_mobilenetv2_050", budget=0.5, num_classes=10).eval()
    fresh.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)
    assert kw.get_temperature(fresh) == pytest.approx(0.3)


def test_overrides_reach_the_plan():
    model = kw.create_model("kw_resnet18", budget=2, norm="layer", reduction=1 / 8, num_classes=10)
    plan = kw.plan_of(model)
    assert {layer.config.norm for layer in plan.layers} == {"layer"}
    assert plan.layer("layer4.1.conv2").hidden == 64
    assert isinstance(model.layer1[0].conv1.attention.norm, torch.nn.LayerNorm)
    shared = kw.plan_of(kw.create_model("kw_resnet18", budget=1, sharing_range=()))
    assert len(shared.warehouses) == len(shared.layers)


def test_bad_model_requests():
    with pytest.raises(ValueError, match="unknown model 'kw_vgg'"):
        kw.create_model("kw_vgg")
    with pytest.raises(ValueError, match="resnet18 is a static model and takes no budget"):
        kw.create_model("resnet18", budget=2)
    for bad in (0, -1, "abc", "0x", True):
        with pytest.raises(ValueError, match="budget must be"):
            kw.create_model("kw_resnet18", budget=bad)


def test_parse_budget():
    assert parse_budget("1/4") == parse_budget(0.25) == parse_budget("0.25x") == parse_budget("1d4")
    assert parse_budget("4x") == 4
