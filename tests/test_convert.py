"""kw.convert on models we did not write: warm start, parameter bound, grouping, bad input."""

import copy
import importlib.util
import math
import pathlib
import re
import warnings

import pytest
import torch
import torch.nn as nn

import kernelwarehouse as kw
from kernelwarehouse.core.layers import KWLayer

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

# the models, their initialisation and inputs behind the README's conversion table
_spec = importlib.util.spec_from_file_location(
    "convert_table", pathlib.Path(__file__).resolve().parents[1] / "scripts" / "convert_table.py"
)
convert_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert_table)
WARM_START_MODELS, build, sample = convert_table.MODELS, convert_table.build, convert_table.sample


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", WARM_START_MODELS)
def test_warm_start_is_exact_at_tau_one(name):
    model = build(name)
    x = sample(name)
    with torch.no_grad():
        expected = model(x)
    paths = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    original = params(model)
    conversion = kw.plan_conversion(model)

    assert kw.convert(model, budget=1, warm_start=True) is model
    converted = dict(kw.kw_layers(model))
    assert set(converted) == {layer.name for layer in conversion.plan.layers}
    assert set(converted) <= paths  # same module paths
    assert conversion.coverage >= 0.8
    assert params(model) == conversion.num_parameters
    assert params(model) <= 1.3 * original
    assert kw.get_temperature(model) == 1.0
    model.eval()
    with torch.no_grad():
        assert rel_err(model(x), expected) < 1e-4
        kw.set_temperature(model, 0.5)
        assert rel_err(model(x), expected) > 1e-3  # the dynamic part is live


def test_plan_shows_warehouses_cells_and_attention():
    model = build("mobilenet_v3_large")
    conversion = kw.plan_conversion(model)
    text = str(conversion)
    for w in conversion.plan.warehouses:
        assert w.name in text and "x".join(map(str, w.cell_shape)) in text
    assert "reduction" in text and "static:" in text
    # every warehouse keeps the part of its attention that grows with n within max_attention
    for w in conversion.plan.warehouses:
        layers = [p for p in conversion.plan.layers if p.warehouse == w.name]
        weights = sum(math.prod(p.spec.weight_shape) for p in layers)
        assert sum(p.attention_parameters for p in layers) <= 0.25 * weights
    kw.convert(model)
    assert [p.name for p in kw.plan_of(model).layers] == [p.name for p in conversion.plan.layers]


def test_stages_follow_resolution_changes():
    model = torchvision.models.resnet18()
    plan = kw.plan_conversion(model).plan
    warehouse = {p.name: p.warehouse for p in plan.layers}
    assert "conv1" not in warehouse  # 3-channel stem stays static
    assert warehouse["layer1.0.conv1"] == warehouse["layer1.1.conv2"]
    assert warehouse["layer2.0.conv1"] == warehouse["layer2.0.downsample.0"] == warehouse["layer2.1.conv2"]
    assert (
        len(
            {
                warehouse["layer1.0.conv1"],
                warehouse["layer2.0.conv1"],
                warehouse["layer3.0.conv1"],
                warehouse["layer4.0.conv1"],
            }
        )
        == 4
    )


@pytest.mark.parametrize("budget", [4, 1.5])
def test_warm_start_exact_above_one(budget):
    model = torchvision.models.resnet18().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        kw.convert(model, budget=budget, warm_start=True, include="layer3")
        assert rel_err(model.eval()(x), expected) < 1e-4
    assert all(name.startswith("layer3.") for name, _ in kw.kw_layers(model))


def test_warm_start_below_one_warns_and_approximates():
    model = torchvision.models.resnet18().eval()
    static = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="not exact"):
        kw.convert(model, budget="1/2", warm_start=True)
    layer = dict(model.named_modules())["layer2.1.conv1"]
    plan = layer.plan
    assert any(slot == -1 for slot in plan.beta)
    kept = [t for t, slot in enumerate(plan.beta) if slot != -1]
    cells = kw.core.execution.split_into_cells(
        static.layer2[1].conv1.weight, plan.grid, layer.warehouse.cell_shape
    )
    for t in kept:
        torch.testing.assert_close(layer.warehouse.weight[plan.beta[t]], cells[t])


def test_include_exclude_and_paths():
    model = torchvision.models.resnet18()
    kw.convert(model, exclude=["layer1", "*.downsample.*"])
    names = [n for n, _ in kw.kw_layers(model)]
    assert names and not any(n.startswith("layer1.") or ".downsample." in n for n in names)
    # a hook or an optimizer group found by path reaches the new layer
    layer = model.get_submodule("layer4.1.conv2")
    assert isinstance(layer, KWLayer)
    seen = []
    layer.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    model.eval()(torch.randn(1, 3, 32, 32))
    assert seen == [torch.Size([1, 512, 1, 1])]


def test_include_forces_costly_layers():
    model = torchvision.models.resnet18()
    assert "conv1" not in {p.name for p in kw.plan_conversion(model).plan.layers}
    kw.convert(model, include=["conv1"])
    assert [n for n, _ in kw.kw_layers(model)] == ["conv1"]


def test_sharing_modes():
    model = torchvision.models.resnet18()
    layer = kw.plan_conversion(model, sharing="layer").plan
    assert len(layer.warehouses) == len(layer.layers)
    kind = kw.plan_conversion(model, sharing="kind").plan
    assert all(p.warehouse.startswith(re.sub(r"\.\d+", "", p.name)) for p in kind.layers)
    assert kind.warehouse("layer2.conv2").layers == ("layer2.0.conv2", "layer2.1.conv2")
    custom = kw.plan_conversion(model, sharing=lambda n: "deep" if n.startswith("layer4") else None).plan
    assert {p.name.split(".")[0] for p in custom.layers} == {"layer4"}
    assert all(w.name.startswith("deep") for w in custom.warehouses)


def test_transformer_converts_block_linears():
    model = build("deit_tiny_patch16_224")
    plan = kw.plan_conversion(model).plan
    names = {p.name for p in plan.layers}
    assert names == {
        f"blocks.{i}.{k}" for i in range(12) for k in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    }
    by_kind = kw.plan_conversion(model, sharing="kind").plan
    assert sorted(w.name for w in by_kind.warehouses) == [
        "blocks.attn.proj",
        "blocks.attn.qkv",
        "blocks.mlp.fc1",
        "blocks.mlp.fc2",
    ]


def test_conv1d_and_conv3d_models_and_probe_input():
    model = nn.Sequential(
        nn.Conv1d(16, 64, 3, padding=1),
        nn.ReLU(),
        nn.Conv1d(64, 64, 3, padding=1),
        nn.Conv1d(64, 128, 3, stride=2, padding=1),
    ).eval()
    x = torch.randn(2, 16, 40)
    expected = model(x)
    kw.convert(model, warm_start=True, example_input=torch.randn(1, 16, 40))
    assert len(kw.kw_layers(model)) == 3
    assert rel_err(model(x), expected) < 1e-4
    volume = nn.Sequential(nn.Conv3d(4, 16, 3, padding=1), nn.Conv3d(16, 16, 3, padding=1)).eval()
    x = torch.randn(2, 4, 6, 6, 6)
    expected = volume(x)
    kw.convert(volume, warm_start=True, include="*", example_input=x)
    assert rel_err(volume(x), expected) < 1e-4


def test_modes_of_submodules_survive_the_probe():
    model = torchvision.models.resnet18().train()
    model.layer1[0].bn1.eval()
    model.layer4.eval()
    kw.convert(model)
    assert model.training and not model.layer1[0].bn1.training and model.layer2.training
    assert model.layer3[0].conv1.training and model.layer3[0].conv1.attention.norm.training
    assert not model.layer4[0].conv1.training and not model.layer4[0].conv1.attention.norm.training


def test_eval_model_stays_in_eval():
    model = torchvision.models.resnet18().eval()
    kw.convert(model, warm_start=True)
    assert not any(m.training for m in model.modules())
    model(torch.randn(1, 3, 32, 32))  # batch of 1: attention BN in eval


def test_torchvision_vit_mlp_linears_are_found():
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=3, num_heads=2, hidden_dim=128, mlp_dim=512, num_classes=10
    ).eval()
    nn.init.normal_(model.heads.head.weight)  # torchvision starts it at zero
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    conversion = kw.plan_conversion(model, example_input=x)
    assert {p.name for p in conversion.plan.layers} == {
        f"encoder.layers.encoder_layer_{i}.mlp.{j}" for i in range(3) for j in (0, 3)
    }
    assert any("NonDynamicallyQuantizableLinear" in reason for _, reason in conversion.skipped)
    kw.convert(model, warm_start=True, example_input=x)
    assert rel_err(model(x), expected) < 1e-4


def test_unrunnable_model_falls_back_with_a_warning():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(32, 64, 3, padding=1)
            self.b = nn.Conv2d(64, 64, 3, stride=2, padding=1)

        def forward(self, x, y):
            return self.b(self.a(x) + y)

    model = TwoInputs()
    with pytest.warns(UserWarning, match="probe"):
        kw.convert(model)
    assert [n for n, _ in kw.kw_layers(model)] == ["a", "b"]


def test_temperature_schedule_in_a_plain_training_loop():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 4),
    )
    kw.convert(model, warm_start=True, include=["2", "4"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    schedule = kw.TemperatureSchedule(model, anneal_steps=4)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
    taus, before = [], model[2].warehouse.weight.detach().clone()
    for _ in range(6):
        taus.append(schedule.step())
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert taus == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    assert kw.get_temperature(model) == 0.0 and math.isfinite(loss.item())
    assert not torch.equal(model[2].warehouse.weight, before)
    resumed = kw.TemperatureSchedule(model, anneal_steps=99)
    resumed.load_state_dict({**schedule.state_dict(), "steps_done": 2})
    assert resumed.step() == 0.5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"include": "nothing*"}, "matches no convertible layer"),
        ({"exclude": ["layer9"]}, "matches no module"),
        ({"exclude": "*"}, "leaves no layer"),
        ({"include": "conv1", "cell_outplane_ratio": 0.3}, "cannot be cut into cells"),
        ({"budget": 0}, "budget must be > 0"),
        ({"sharing": "blocks"}, "sharing must be one of"),
        ({"norm": "instance"}, "norm must be one of"),
    ],
)
def test_bad_input_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        kw.convert(torchvision.models.resnet18(), **kwargs)


def test_nothing_to_convert():
    with pytest.raises(ValueError, match="nothing to convert"):
        kw.convert(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3)))
    with pytest.raises(ValueError, match="nothing to convert"):  # only costly layers: none worth it
        kw.convert(nn.Sequential(nn.Conv2d(3, 4, 7)))
    with pytest.raises(TypeError, match="budget="):
        kw.convert(torchvision.models.resnet18(), cell_num_ratio=2)


def test_layer_no_cell_fits_is_reported():
    model = nn.Sequential(nn.Conv2d(64, 128, 3, padding=1), nn.Conv2d(128, 75, 3, padding=1))
    with pytest.warns(UserWarning, match=r"stay static because no cell .* 1 \(cannot be cut"):
        kw.convert(model, cell_outplane_ratio=0.5, example_input=torch.randn(1, 64, 8, 8))
    assert [n for n, _ in kw.kw_layers(model)] == ["0"]


def test_no_silent_noop_on_already_converted_model():
    model = torchvision.models.resnet18()
    kw.convert(model, include="layer1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kw.convert(model, include="layer2")
    assert {n.split(".")[0] for n, _ in kw.kw_layers(model)} == {"layer1", "layer2"}
    with pytest.raises(ValueError, match="matches no convertible layer"):
        kw.convert(model, include="layer1")
    kw.convert(model, include="layer3.0")
    kw.convert(model, include="layer3.1")  # same stage, its own warehouse
    plan = kw.plan_of(model)
    assert len(plan.warehouses) == 4 and len({w.name for w in plan.warehouses}) == 4
    assert model.layer3[0].conv1.warehouse is not model.layer3[1].conv1.warehouse


def test_readme_example_runs(capsys):
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Use it in your model") :]
    code = section[section.index("```python") + len("```python") :]
    exec(compile(code[: code.index("```")], "README.md", "exec"), {})
    assert "warehouse" in capsys.readouterr().out
