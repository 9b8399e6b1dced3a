import dataclasses

import pytest
import torch
import torch.nn as nn

import kernelwarehouse as kw
from kernelwarehouse.core.plan import ZERO_CELL, CellGrid, LayerSpec, assign_slots, fuse_name, plan_warehouses
from reference_impl import conv_layer_by_loops


def resnet18_plan(budget):
    return kw.plan_of(kw.create_model("kw_resnet18", budget=budget))


@pytest.mark.parametrize("budget,sizes", [(1, [56, 47, 47, 27]), (4, [224, 188, 188, 108])])
def test_resnet18_warehouse_sizes_and_cells(budget, sizes):
    plan = resnet18_plan(budget)
    assert [w.name for w in plan.warehouses] == [f"stage{i}_layer_conv" for i in range(4)]
    assert [w.num_cells for w in plan.warehouses] == sizes
    assert [w.cell_shape for w in plan.warehouses] == [(c, c, 1, 1) for c in (64, 128, 256, 512)]


def test_resnet18_quarter_budget_halves_the_cells():
    plan = resnet18_plan(0.25)
    assert [w.cell_shape[:2] for w in plan.warehouses] == [(32, 32), (64, 64), (128, 128), (256, 256)]
    assert [w.num_cells for w in plan.warehouses] == [56, 47, 47, 27]


def test_stage_handover():
    plan = resnet18_plan(1)
    assert plan.layer("layer2.0.conv1").warehouse == "stage0_layer_conv"  # input width 64
    assert plan.layer("layer2.0.downsample.0").warehouse == "stage0_layer_conv"
    assert plan.layer("layer2.0.conv2").warehouse == "stage1_layer_conv"
    plan50 = kw.plan_of(kw.create_model("kw_resnet50", budget=1))
    names = {layer.name for layer in plan50.layers}
    assert "layer1.0.conv1" not in names and "layer1.0.downsample.0" not in names
    assert "layer2.0.downsample.0" in names


@pytest.mark.parametrize(
    "name,budget",
    [
        ("kw_resnet18", 0.25),
        ("kw_resnet18", 4),
        ("kw_resnet50", 0.5),
        ("kw_mobilenetv2_050", 0.5),
        ("kw_mobilenetv2_100", 1),
        ("kw_convnext_tiny", 1),
        ("kw_resnet18", 1.5),
        ("kw_resnet18", 0.3),
    ],
)
def test_every_slot_owned_exactly_once(name, budget):
    plan = kw.plan_of(kw.create_model(name, budget=budget))
    for w in plan.warehouses:
        members = [layer for layer in plan.layers if layer.warehouse == w.name]
        owned = sorted(slot for layer in members for slot in range(*layer.slots))
        assert owned == list(range(w.num_cells))
        for layer in members:
            targets = [t for t in layer.beta if t != ZERO_CELL]
            assert len(targets) == len(set(targets)) == min(layer.num_cells, layer.num_local)
            assert all(layer.slots[0] <= t < layer.slots[1] for t in targets)


def test_reference_assignment_rules():
    ((slots, beta),) = assign_slots([6], 12, 2.0)
    assert slots == (0, 12) and beta == (0, 2, 4, 6, 8, 10)
    # b = 1/2: cell t takes a slot when t % 2 == (t // 2) % 2, else the zero cell
    (slots, beta), (slots2, beta2) = assign_slots([8, 4], 6, 0.5)
    assert slots == (0, 4) and beta == (0, ZERO_CELL, ZERO_CELL, 1, 2, ZERO_CELL, ZERO_CELL, 3)
    assert slots2 == (4, 6) and beta2 == (4, ZERO_CELL, ZERO_CELL, 5)
    # b = 1/4: one cell in four, on the diagonal of 4x4 blocks
    ((_, beta),) = assign_slots([16], 4, 0.25)
    assert [t for t, s in enumerate(beta) if s != ZERO_CELL] == [0, 5, 10, 15]


def test_general_budgets_share_slots_in_proportion():
    result = assign_slots([4, 4], 12, 1.5)
    assert [r[0] for r in result] == [(0, 6), (6, 12)]
    assert result[0][1] == (0, 1, 3, 4)
    result = assign_slots([10, 10], 6, 0.3)
    assert [r[0] for r in result] == [(0, 3), (3, 6)]
    assert sum(t != ZERO_CELL for t in result[0][1]) == 3


def test_fuse_name():
    assert fuse_name("stage2_layer1_conv0", ("layer", "conv")) == "stage2_layer_conv"
    assert fuse_name("stage2_layer0_conv1", ("layer", "conv")) == "stage2_layer_conv"
    assert fuse_name("stage1_layer3_dwconv0", ("layer", "pwconv")) == "stage1_layer_dwconv0"
    assert fuse_name("stage1_layer3_pwconv1", ("layer",)) == "stage1_layer_pwconv1"


def spec(name, key, cin, cout, k=(3, 3), groups=1):
    return LayerSpec(name, key, cin, cout, k, groups)


def test_bad_plans_name_the_layer_and_numbers():
    with pytest.raises(
        ValueError,
        match=r"layer 'a' \(weight 48x48x3x3\) cannot be cut into cells of 36x24 of "
        r"warehouse 's_l'.*48 output and 48 input channels",
    ):
        plan_warehouses(
            [spec("a", "s_l0", 48, 48), spec("b", "s_l1", 48, 48)],
            ("l",),
            cell_outplane_ratio=0.75,
            cell_inplane_ratio=0.5,
        )
    with pytest.raises(ValueError, match="cell_num_ratio must be a number > 0"):
        plan_warehouses([spec("a", "a", 8, 8)], cell_num_ratio=-1)
    with pytest.raises(ValueError, match="mixes layers of different dimensionality: a .2-d., b .1-d."):
        plan_warehouses([spec("a", "s_l0", 8, 8), spec("b", "s_l1", 8, 8, (3,))], ("l",))
    with pytest.raises(ValueError, match="spatial_partition=False needs one kernel size"):
        plan_warehouses(
            [spec("a", "s_l0", 8, 8), spec("b", "s_l1", 8, 8, (1, 1))], ("l",), spatial_partition=False
        )
    with pytest.raises(ValueError, match="got 3 values for 2 warehouses"):
        plan_warehouses([spec("a", "a", 8, 8), spec("b", "b", 8, 8)], cell_num_ratio=(1, 2, 3))
    with pytest.raises(ValueError, match="no warehouse named"):
        plan_warehouses([spec("a", "a", 8, 8)], cell_num_ratio={"x": 2})
    with pytest.raises(TypeError, match="unknown warehouse option"):
        plan_warehouses([spec("a", "a", 8, 8)], budget=2)
    with pytest.raises(ValueError, match="nothing to plan"):
        plan_warehouses([])


def test_per_warehouse_ratios_by_name_and_order():
    specs = [spec("a", "x_l0", 8, 8), spec("b", "x_l1", 8, 16), spec("c", "y", 16, 16)]
    by_name = plan_warehouses(specs, ("l",), cell_num_ratio={"x_l": 2, "y": 4})
    by_order = plan_warehouses(specs, ("l",), cell_num_ratio=(2, 4))
    assert by_name == by_order
    assert [w.num_cells for w in by_name.warehouses] == [2 * (9 + 18), 4 * 9]


def test_plan_is_a_printable_value():
    plan = resnet18_plan(1)
    text = str(plan)
    assert "stage1_layer_conv" in text and "128x128x1x1" in text and "layer3.1.conv2" in text
    assert plan == resnet18_plan(1)
    model = kw.create_model("kw_resnet18", budget=1)
    counted = sum(p.numel() for n, p in model.named_parameters() if "attention" in n or "warehouse" in n)
    assert plan.num_parameters == counted


class TwoConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(16, 16, 1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        return self.b(self.a(x))


def test_nonlocal_basis_layers_match_loops():
    model = kw.build_kernelwarehouse(
        TwoConvs(),
        {"a": "s_l0", "b": "s_l1"},
        ("l",),
        cell_num_ratio=0.5,
        cell_inplane_ratio=0.5,
        nonlocal_basis_ratio=0.25,
    )
    assert model.a.warehouse is model.b.warehouse
    assert model.a.plan.num_basis == 16 and model.b.attention.fc3.out_features == model.b.plan.num_nonlocal
    model = model.double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    kw.set_temperature(model, 0.3)
    x = torch.randn(2, 16, 4, 4, dtype=torch.float64)
    for layer in (model.a, model.b):
        torch.testing.assert_close(layer(x), conv_layer_by_loops(layer, x))


def test_cell_grid_names_its_parts_and_keeps_the_tuple_text():
    spec = LayerSpec("conv", "conv", 64, 128, (3, 3))
    layer = plan_warehouses([spec], cell_inplane_ratio=0.5, cell_outplane_ratio=0.25).layers[0]
    assert isinstance(layer.grid, CellGrid)
    assert (layer.grid.spatial, layer.grid.out_blocks, layer.grid.in_blocks) == (9, 4, 2)  # 1x1 cells
    assert layer.num_cells == 72 and str(layer.grid) == "(9, 4, 2)"  # path-choice keys are written with it
    rebuilt = dataclasses.replace(layer, grid=(3, 2, 1))  # a plain tuple gets the names
    assert isinstance(rebuilt.grid, CellGrid) and rebuilt.grid.out_blocks == 2 and rebuilt.num_cells == 6


def test_conv_geometry_tells_a_linear_layer_from_a_convolution():
    linear = kw.KWLinear(16, 32)._geometry
    conv = kw.KWConv1d(16, 32, 1)._geometry
    assert linear.linear and linear.dims == 0
    assert not conv.linear and conv.dims == 1 and conv.grid == linear.grid
