"""The zoo as timm models: timm's model API, features_only, timm's pretrained path, and annealing."""

import pytest
import timm
import torch
import torch.nn as nn
from timm.data import resolve_data_config

import kernelwarehouse as kw
from conftest import SHARED

ZOO = [
    "kw_resnet18",
    "kw_resnet50",
    "kw_mobilenetv2_100",
    "kw_mobilenetv2_050",
    "kw_convnext_tiny",
    "kw_deit_tiny",
    "kw_deit_small",
]
FIXTURES = SHARED / "fixtures" / "official"


def small(name, **kwargs):
    """A model of the zoo for 32x32 images (DeiT with 4x4 patches)."""
    return timm.create_model(name, small_input=True, **kwargs)


def test_every_kw_model_is_a_timm_model_with_a_cfg():
    assert set(ZOO) <= set(timm.list_models("kw_*")) and set(ZOO) <= set(kw.list_models())
    model = timm.create_model("kw_mobilenetv2_100", num_classes=10)
    static = timm.create_model("mobilenetv2_100")
    assert type(model) is type(static) and model.num_classes == 10
    config = resolve_data_config(model=model)
    assert config["input_size"] == (3, 224, 224) and config["crop_pct"] == 0.875
    assert config["mean"] == static.pretrained_cfg["mean"]
    cfg = model.pretrained_cfg
    assert cfg["architecture"] == "kw_mobilenetv2_100" and not cfg.get("url") and not cfg.get("hf_hub_id")
    assert cfg["first_conv"] + ".weight" in model.state_dict() and cfg["classifier"] == "classifier"


@pytest.mark.parametrize("name", ZOO)
def test_timm_model_methods(name):
    model = small(name, num_classes=7).eval()
    assert len(kw.kw_layers(model)) > 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
        features = model.forward_features(x)
        pooled = model.forward_head(features, pre_logits=True)
        torch.testing.assert_close(model.forward_head(features), logits)
    assert logits.shape == (2, 7) and pooled.shape == (2, model.num_features)
    assert model.get_classifier().out_features == 7
    model.reset_classifier(3)
    assert model.num_classes == 3 and model.eval()(x).shape == (2, 3)
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)
    final, intermediates = model.forward_intermediates(x)
    assert len(intermediates) >= 3 and final.shape == features.shape


@pytest.mark.parametrize("name", ZOO)
def test_features_only(name):
    model = small(name, features_only=True).eval()
    with torch.no_grad():
        features = model(torch.randn(1, 3, 32, 32))
    assert [f.shape[1] for f in features] == model.feature_info.channels()
    if "deit" not in name:  # spatial maps shrink as the reductions say
        assert [32 // f.shape[-1] for f in features] == model.feature_info.reduction()
    layers = kw.kw_layers(model)
    assert layers, "the feature extractor lost its KernelWarehouse layers"


def test_features_only_keeps_warehouses_shared():
    model = timm.create_model("kw_resnet18", features_only=True, out_indices=(1, 2, 3, 4))
    assert model.feature_info.channels() == [64, 128, 256, 512] and model.feature_info.reduction() == [
        4,
        8,
        16,
        32,
    ]
    features = model.eval()(torch.randn(2, 3, 64, 64))
    assert [tuple(f.shape) for f in features] == [
        (2, 64, 16, 16),
        (2, 128, 8, 8),
        (2, 256, 4, 4),
        (2, 512, 2, 2),
    ]
    layers = dict(kw.kw_layers(model))
    assert len(layers) == 19 and len({id(layer.warehouse) for layer in layers.values()}) == 4
    assert layers["layer2.0.conv1"].warehouse is layers["layer1.1.conv2"].warehouse
    assert timm.create_model(
        "kw_resnet18", features_only=True, small_input=True
    ).feature_info.reduction() == [1, 1, 2, 4, 8]


def test_grad_checkpointing_gives_the_same_output_and_gradients():
    torch.manual_seed(0)
    model = small("kw_resnet18", num_classes=5)
    kw.set_temperature(model, 0.5)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    expected = model(x)
    model.set_grad_checkpointing(True)
    out = model(x)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert model.layer3[0].conv2.warehouse.weight.grad.abs().sum() > 0


def test_fx_feature_extraction():
    from timm.models import create_feature_extractor  # timm's FX helper: KernelWarehouse layers are leaves

    model = small("kw_resnet18").eval()
    extractor = create_feature_extractor(model, {"layer2": "mid", "layer4": "last"})
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out = extractor(x)
        torch.testing.assert_close(out["last"], model.forward_features(x))
    assert out["mid"].shape == (1, 128, 16, 16) and out["last"].shape == (1, 512, 4, 4)


def test_static_timm_weights_warm_start_a_kw_model_exactly(tmp_path):
    static = timm.create_model("resnet18", num_classes=10, zero_init_last=False).eval()
    with torch.no_grad():  # non-trivial norms, so that a mix-up of layers shows
        for module in static.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "resnet18.pth"
    torch.save(static.state_dict(), path)
    model = timm.create_model(
        "kw_resnet18",
        budget=1,
        num_classes=10,
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path), num_classes=10),
    ).eval()
    assert kw.get_temperature(model) == 1.0
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), static(x), rtol=1e-4, atol=1e-4)
    # the same through the function, and our own checkpoints pass through unchanged
    again = kw.create_model("kw_resnet18", budget=1, num_classes=10).eval()
    kw.load_static_state_dict(again, static.state_dict())
    torch.save(again.state_dict(), tmp_path / "ours.pth")
    # (a checkpoint's cfg names its classes; with another count timm leaves the classifier untrained)
    ours = timm.create_model(
        "kw_resnet18",
        budget=1,
        num_classes=10,
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(tmp_path / "ours.pth"), num_classes=10),
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), model(x))
    with pytest.raises(KeyError, match="no weight for the KernelWarehouse layer"):
        kw.load_static_state_dict(again, {k: v for k, v in static.state_dict().items() if "layer1" not in k})


@pytest.mark.parametrize(
    "name,arch,budget",
    [("kw1x_mobilenetv2_050.pt", "kw_mobilenetv2_050", 1), ("kw1d4x_resnet18.pt", "kw_resnet18", "1/4")],
)
def test_reference_checkpoints_load_through_timms_pretrained_path(tmp_path, name, arch, budget):
    path = FIXTURES / name
    if not path.exists():
        pytest.skip(f"reference fixture {path} is not present")
    fixture = torch.load(path, weights_only=False)
    checkpoint = tmp_path / "checkpoint.pth"
    torch.save({"state_dict": fixture["state_dict"]}, checkpoint)
    model = timm.create_model(
        arch, budget=budget, pretrained=True, pretrained_cfg_overlay=dict(file=str(checkpoint))
    )
    model = model.double().eval()
    for tau, expected in fixture["logits"].items():
        kw.set_temperature(model, tau)
        with torch.no_grad():
            out = model(fixture["input"].double())
        assert (out - expected).abs().max() / expected.abs().max() < 1e-6
    # a 10-class model takes everything but the classifier
    ten = timm.create_model(
        arch,
        budget=budget,
        num_classes=10,
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(checkpoint)),
    )
    assert ten.get_classifier().out_features == 10


# --- the temperature anneals itself ------------------------------------------------------------


def tiny_step(model, optimizer=None):
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad()


def test_anneal_counts_training_forward_passes_and_resumes_from_the_state_dict():
    model = small("kw_resnet18", num_classes=4).train()
    kw.anneal(model, steps=4)
    taus = []
    for _ in range(6):
        tiny_step(model)
        taus.append(kw.get_temperature(model))
    assert taus == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    model.eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))  # evaluation is not a training step
    assert int(model.temperature_annealing.steps_done) == 6
    # resume: a new model annealed the same way continues where the saved one was
    fresh = small("kw_resnet18", num_classes=4)
    kw.anneal(fresh, steps=8)
    state = small("kw_resnet18", num_classes=4)
    kw.anneal(state, steps=8)
    for _ in range(3):
        tiny_step(state)
    fresh.load_state_dict(state.state_dict())
    tiny_step(fresh.train())
    assert kw.get_temperature(fresh) == 1 - 3 / 8


def test_anneal_with_an_optimizer_counts_optimizer_steps():
    model = small("kw_resnet18", num_classes=4).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    kw.anneal(model, steps=2, optimizer=optimizer)
    model(torch.randn(2, 3, 32, 32))  # forward passes alone do not count
    assert kw.get_temperature(model) == 1.0
    tiny_step(model, optimizer)
    assert kw.get_temperature(model) == 0.5
    tiny_step(model, optimizer)
    tiny_step(model, optimizer)
    assert kw.get_temperature(model) == 0.0


def test_anneal_as_a_create_model_option_and_errors():
    model = timm.create_model("kw_resnet18", small_input=True, num_classes=4, anneal_steps=10)
    assert isinstance(model.temperature_annealing, kw.TemperatureAnnealing)
    tiny_step(model.train())
    tiny_step(model)
    assert kw.get_temperature(model) == pytest.approx(0.9)
    assert (
        kw.create_model("kw_deit_tiny", small_input=True, anneal_steps=5).temperature_annealing.anneal_steps
        == 5
    )
    with pytest.raises(ValueError, match="already annealed"):
        kw.anneal(model, steps=3)
    with pytest.raises(ValueError, match="no KernelWarehouse layers"):
        kw.anneal(nn.Linear(2, 2), steps=3)
    with pytest.raises(ValueError, match="integer >= 0"):
        kw.anneal(small("kw_resnet18"), steps=-1)
    with pytest.raises(ValueError, match="no temperature to anneal"):
        kw.create_model("resnet18", anneal_steps=3)


def test_a_narrow_resnet_has_a_stem_of_its_width():
    narrow = kw.create_model(
        "kw_resnet18", budget=1, small_input=True, channels=(8, 16, 32, 64), stem_width=8
    )
    assert narrow.conv1.out_channels == narrow.bn1.num_features == narrow.layer1[0].conv1.in_channels == 8
    assert narrow.layer1[0].downsample is None  # 8 -> 8 at stride 1: an identity shortcut
    assert narrow.eval()(torch.randn(2, 3, 8, 8)).shape == (2, 1000)
    bottleneck = kw.create_model("resnet50", channels=(8, 16, 32, 64), stem_width=8)
    assert bottleneck.layer1[0].downsample[0].in_channels == 8 and bottleneck.feature_info[0]["num_chs"] == 8
    assert bottleneck.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 1000)
