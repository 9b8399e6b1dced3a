"""The zoo through timm: create_model, features_only, feature_info."""
import pytest
import torch

import kernelwarehouse as kw

timm = pytest.importorskip("timm")


def test_zoo_is_registered_with_timm():
    names = set(timm.list_models("kw_*"))
    assert {n for n in kw.list_models() if n.startswith("kw_")} <= names
    assert "deit_tiny" in timm.list_models()


def test_create_model_through_timm_matches_ours():
    model = timm.create_model("kw_resnet18", budget=1, num_classes=10)
    ours = kw.create_model("kw_resnet18", budget=1, num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ours.parameters())
    assert len(kw.kw_layers(model)) == len(kw.kw_layers(ours)) > 0
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    quarter = timm.create_model("kw_resnet18", budget="1/4")
    assert kw.plan_of(quarter).warehouses[0].config.cell_num_ratio == 0.25
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("kw_resnet18", pretrained=True)


def test_features_only_resnet18():
    model = timm.create_model("kw_resnet18", budget=1, features_only=True, out_indices=(1, 2, 3, 4))
    assert model.feature_info.channels() == [64, 128, 256, 512]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    features = model.eval()(torch.randn(2, 3, 64, 64))
    assert [tuple(f.shape) for f in features] == [(2, 64, 16, 16), (2, 128, 8, 8), (2, 256, 4, 4), (2, 512, 2, 2)]
    # the warehouses survive the wrapper: one per stage, shared by the layers of that stage
    layers = kw.kw_layers(model)
    assert len(layers) == 19 and len({id(layer.warehouse) for _, layer in layers}) == 4
    assert dict(layers)["body.layer2.0.conv1"].warehouse is dict(layers)["body.layer1.1.conv2"].warehouse
    assert isinstance(model["body"].fc, torch.nn.Identity)           # no classifier in a feature extractor


def test_features_only_other_models():
    small = timm.create_model("kw_resnet18", features_only=True, small_input=True)
    assert small.feature_info.reduction() == [1, 1, 2, 4, 8]
    mobile = timm.create_model("kw_mobilenetv2_100", features_only=True)
    assert mobile.feature_info.reduction() == [2, 4, 8, 16, 32]
    assert mobile.feature_info.channels() == [16, 24, 32, 96, 1280]
    with pytest.raises(ValueError, match="features_only is not supported"):
        timm.create_model("kw_deit_tiny", features_only=True)
