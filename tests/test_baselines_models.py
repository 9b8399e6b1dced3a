"""The baselines' models: published parameter counts, which layers are dynamic, forward/backward."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import kernelwarehouse as kw
from kernelwarehouse.baselines import CondConv2d, DynamicConv2d, ODConv2d
from kernelwarehouse.baselines.models import PUBLISHED, REFERENCE_PARAMS, build_baseline
from kernelwarehouse.models import create_model, list_models, model_entry

BASELINES = {
    "odconv_resnet18": ODConv2d,
    "odconv_resnet50": ODConv2d,
    "odconv_mobilenetv2_100": ODConv2d,
    "odconv_mobilenetv2_050": ODConv2d,
    "dyconv_resnet18": DynamicConv2d,
    "condconv_resnet18": CondConv2d,
}
ODCONV = [(name, k) for name in BASELINES if name.startswith("odconv") for k in (1, 4)]


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,kernel_num", ODCONV)
def test_odconv_parameter_counts_match_published(name, kernel_num):
    params = count(create_model(name, kernel_num=kernel_num))
    published_m, _ = PUBLISHED[name][kernel_num]
    assert abs(params / 1e6 - published_m) <= 0.005
    assert params == REFERENCE_PARAMS[name][kernel_num]


def test_registry_entries():
    for name in BASELINES:
        assert name in list_models() and model_entry(name).kind == "baseline"
    assert model_entry("resnet18").kind == "static" and model_entry("kw_resnet18").kind == "kw"
    with pytest.raises(ValueError, match="takes no budget; set its number of kernels"):
        create_model("odconv_resnet18", budget=4)
    with pytest.raises(ValueError, match="use kw_resnet18"):
        create_model("resnet18", budget=1)


def test_dynamic_layers_follow_the_odconv_models():
    model = create_model("odconv_resnet50", kernel_num=1)
    dynamic = {n for n, m in model.named_modules() if isinstance(m, ODConv2d)}
    assert len(dynamic) == 16 * 3 and "layer1.0.conv1" in dynamic
    shortcuts = [m for n, m in model.named_modules() if n.endswith("downsample.0")]
    assert len(shortcuts) == 4 and all(type(m) is nn.Conv2d for m in shortcuts)
    assert type(model.conv1) is nn.Conv2d
    mobile = create_model("odconv_mobilenetv2_100", kernel_num=1)
    convs = [n for n, m in mobile.named_modules() if isinstance(m, (nn.Conv2d, ODConv2d))]
    assert [n for n in convs if not isinstance(mobile.get_submodule(n), ODConv2d)] == ["conv_stem"]
    assert isinstance(mobile.get_submodule("conv_head"), ODConv2d)
    assert mobile.get_submodule("blocks.1.0.conv_dw").attention.filter_fc is None  # depthwise


@pytest.mark.parametrize("name", list(BASELINES))
def test_forward_backward_small_input(name):
    torch.manual_seed(0)
    kernel_num = 2 if name == "odconv_resnet50" else 4
    model = create_model(name, kernel_num=kernel_num, num_classes=10, small_input=True, in_chans=1)
    layers = [m for m in model.modules() if isinstance(m, BASELINES[name])]
    assert layers and all(m.num_kernels == kernel_num for m in layers)
    x = torch.randn(2, 1, 12, 12)
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.logsumexp(dim=1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():  # per-sample: a sample's output does not depend on the rest of the batch
        torch.testing.assert_close(model(x)[:1], model(x[:1]), rtol=1e-4, atol=1e-5)


def test_layer_options_pass_through_and_build_baseline_on_any_model():
    model = create_model(
        "odconv_mobilenetv2_050", kernel_num=1, reduction=1 / 4, temperature=30.0, num_classes=3
    )
    layer = model.get_submodule("conv_head")
    assert layer.attention.fc.out_features == 160 / 4 * 1 and layer.temperature == 30.0
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, bias=True).double())
    build_baseline(net, ["2"], "dyconv", kernel_num=3)
    assert (
        isinstance(net[2], DynamicConv2d)
        and net[2].weight.dtype == torch.float64
        and net[2].bias.shape == (3, 8)
    )
    with pytest.raises(ValueError, match="unknown method"):
        build_baseline(net, ["0"], "kwconv")
    with pytest.raises(TypeError, match="only nn.Conv2d"):
        build_baseline(net, ["1"], "odconv")
    with pytest.raises(KeyError, match="no module"):
        build_baseline(net, ["7"], "odconv")
    assert kw.get_temperature(net) is None


def test_mac_count_of_one_odconv_layer():
    from kernelwarehouse.bench import count_macs

    layer = ODConv2d(16, 32, 3, padding=1, bias=False)  # hidden 16, K = 4
    macs = count_macs(layer, (16, 8, 8))
    size = 32 * 16 * 9
    assert macs.layers == 64 * size
    assert macs.assembly == 4 * size + size  # mixing 4 kernels, spatial attention
    assert macs.attention == 16 * (16 + 16 + 32 + 9 + 4) + 16 * 64 + 32 * 64


def test_mac_counts_of_resnet18_static_and_kernelwarehouse():
    from kernelwarehouse.bench import count_macs

    # torchvision's 1.814 GMACs; the cost model's KW 1x 2.199 and 4x 3.354 GMACs (assembly included)
    assert round(count_macs(create_model("resnet18"), (3, 224, 224)).total / 1e9, 3) == 1.814
    assert round(count_macs(create_model("kw_resnet18", budget=1), (3, 224, 224)).total / 1e9, 3) == 2.199
    assert round(count_macs(create_model("kw_resnet18", budget=4), (3, 224, 224)).total / 1e9, 3) == 3.354
    odconv = count_macs(create_model("odconv_resnet18", kernel_num=4), (3, 224, 224))
    assert odconv.layers == count_macs(create_model("resnet18"), (3, 224, 224)).layers and odconv.assembly > 0


def test_kw_models_lists_baselines_by_kernel_count(monkeypatch, capsys):
    from kernelwarehouse.cli import main
    from kernelwarehouse.cli import models as cli_models

    monkeypatch.setattr(
        cli_models, "list_models", lambda: ["resnet18", "odconv_mobilenetv2_050", "dyconv_resnet18"]
    )
    rows = cli_models.model_table()
    assert [(r["model"], r["budget"]) for r in rows] == [
        ("resnet18", "static"),
        ("odconv_mobilenetv2_050", "K=1"),
        ("odconv_mobilenetv2_050", "K=4"),
        ("dyconv_resnet18", "K=4"),
    ]
    assert rows[1]["params"] == 2425537 and rows[1]["matches_reference"] and rows[1]["paper_top1"] == 68.06
    assert rows[3]["paper_params_m"] is None and not rows[3]["matches_reference"]
    assert main(["models"]) == 0
    printed = capsys.readouterr().out
    assert "odconv_mobilenetv2_050     K=4" in printed and "dyconv_resnet18" in printed


@pytest.mark.parametrize(
    "name",
    [
        "odconv_resnet18",
        "odconv_resnet50",
        "odconv_mobilenetv2_100",
        "odconv_mobilenetv2_050",
        "dyconv_resnet18",
        "condconv_resnet18",
    ],
)
def test_one_digits_epoch_through_the_trainer(name, tmp_path):
    from kernelwarehouse.train import TrainConfig, Trainer

    kwargs = {"channels": (8, 16, 32, 64), "stem_width": 8} if "resnet" in name else {}
    config = TrainConfig(
        model=name,
        data="digits",
        epochs=1,
        batch_size=16,
        limit_train=48,
        limit_val=32,
        output=str(tmp_path / name),
        model_kwargs={"kernel_num": 4, **kwargs},
    )
    history = Trainer(config).fit()
    assert (
        len(history) == 1 and math.isfinite(history[0]["train_loss"]) and 0 <= history[0]["val_top1"] <= 100
    )
    assert (tmp_path / name / "last.pt").exists()


def test_convert_with_a_baseline_method_takes_the_same_layers_as_kw():
    import torchvision

    kw_model = kw.convert(torchvision.models.resnet18(num_classes=10), budget=1)
    od_model = kw.convert(torchvision.models.resnet18(num_classes=10), method="odconv", kernel_num=4)
    kw_paths = {name for name, _ in kw.kw_layers(kw_model)}
    od_paths = {name for name, m in od_model.named_modules() if isinstance(m, ODConv2d)}
    assert od_paths == kw_paths and len(od_paths) == 19
    assert od_model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="method must be 'kw' or one of"):
        kw.convert(torchvision.models.resnet18(), method="vgg")
    with pytest.raises(ValueError, match="warm_start is for method='kw'"):
        kw.convert(torchvision.models.resnet18(), method="dyconv", warm_start=True)
