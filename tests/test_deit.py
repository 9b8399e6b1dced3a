"""DeiT: the static models equal timm's; KernelWarehouse DeiT shares warehouses by layer kind."""

import pytest
import torch

import kernelwarehouse as kw
from kernelwarehouse.core.layers import KWLinear


def params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "name, timm_name", [("deit_tiny", "deit_tiny_patch16_224"), ("deit_small", "deit_small_patch16_224")]
)
def test_static_deit_is_timm_deit(name, timm_name):
    timm = pytest.importorskip("timm")
    reference = timm.create_model(timm_name).eval()
    ours = kw.create_model(name).eval()
    assert type(ours) is type(reference)
    ours.load_state_dict(reference.state_dict(), strict=True)  # same names, same shapes
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("budget", [1, 4])
def test_kw_deit_tiny_layer_assignment_and_size(budget):
    model = kw.create_model("kw_deit_tiny", budget=budget)
    static = kw.create_model("deit_tiny")
    plan = kw.plan_of(model)
    assert [w.name for w in plan.warehouses] == ["qkv", "proj", "fc1", "fc2"]
    cells = {"qkv": 3, "proj": 1, "fc1": 4, "fc2": 4}
    for w in plan.warehouses:
        assert w.cell_shape == (192, 192, 1) and len(w.layers) == 12
        assert w.num_cells == 12 * cells[w.name] * budget
    assert all(isinstance(model.get_submodule(f"blocks.{i}.mlp.fc2"), KWLinear) for i in range(12))
    assert isinstance(model.head, torch.nn.Linear) and isinstance(model.patch_embed.proj, torch.nn.Conv2d)
    block_linears = sum(
        m.weight.numel()
        for n, m in static.named_modules()
        if n.startswith("blocks.") and isinstance(m, torch.nn.Linear)
    )
    assert params(model) == params(static) - block_linears + plan.num_parameters


def test_kw_deit_forward_backward():
    torch.manual_seed(0)
    model = kw.create_model("kw_deit_tiny", budget=1, num_classes=10)
    kw.set_temperature(model, 0.5)
    x = torch.randn(2, 3, 224, 224)
    out = model(x)
    assert out.shape == (2, 10)
    out.square().mean().backward()
    qkv = model.blocks[0].attn.qkv
    assert qkv.warehouse.weight.grad is not None and qkv.warehouse.weight.grad.abs().sum() > 0
    assert qkv.attention.fc1.weight.grad.abs().sum() > 0
    assert qkv.warehouse is model.blocks[11].attn.qkv.warehouse


def test_kw_deit_small_input():
    model = kw.create_model("kw_deit_tiny", budget=1, num_classes=10, small_input=True).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(AssertionError, match="Input height"):  # timm's own check of the input size
        model(torch.randn(2, 3, 64, 64))


@pytest.mark.slow
def test_kw_deit_small_budgets():
    for budget in (1, 4):
        model = kw.create_model("kw_deit_small", budget=budget)
        assert [w.cell_shape for w in kw.plan_of(model).warehouses] == [(384, 384, 1)] * 4
        assert model.eval()(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
