import copy
import io
import pickle

import pytest
import torch

import kernelwarehouse as kw
from reference_impl import conv_layer_by_loops, linear_layer_by_loops

CONV_CASES = [
    # (cls, in, out, kernel, kwargs, input spatial, ratios)
    (kw.KWConv1d, 6, 8, 3, dict(padding=1), (11,), {}),
    (kw.KWConv1d, 4, 6, 5, dict(stride=2, dilation=2, padding=3), (17,), dict(cell_num_ratio=2)),
    (kw.KWConv2d, 8, 12, 3, dict(padding=1), (7, 9), {}),
    (kw.KWConv2d, 8, 12, 3, dict(stride=2, padding=(1, 0), bias=False), (9, 8), dict(cell_num_ratio=4)),
    (
        kw.KWConv2d,
        8,
        8,
        3,
        dict(padding="same", dilation=2),
        (6, 7),
        dict(cell_num_ratio=0.5, cell_inplane_ratio=0.5, cell_outplane_ratio=0.5),
    ),
    (
        kw.KWConv2d,
        12,
        6,
        (3, 1),
        dict(groups=3, padding=(1, 0)),
        (5, 5),
        dict(cell_num_ratio=0.25, cell_inplane_ratio=0.5),
    ),
    (kw.KWConv2d, 6, 6, 5, dict(groups=6, padding=2), (5, 6), {}),  # depthwise
    (kw.KWConv2d, 6, 12, 3, dict(groups=6, padding=1, padding_mode="reflect"), (5, 6), {}),
    (kw.KWConv2d, 5, 7, 3, dict(padding=1), (5, 5), dict(spatial_partition=False)),
    (kw.KWConv2d, 8, 8, 3, dict(padding=1), (4, 4), dict(cell_num_ratio=1.5)),
    (kw.KWConv2d, 8, 8, 3, dict(padding=1), (4, 4), dict(cell_num_ratio=0.3)),
    (kw.KWConv3d, 4, 6, 3, dict(padding=1, stride=(1, 2, 2)), (3, 5, 4), {}),
    (kw.KWConv3d, 6, 6, (1, 3, 3), dict(groups=2, padding="same"), (2, 4, 4), dict(cell_num_ratio=2)),
]


def _randomise(layer):
    """Make every parameter and buffer non-trivial, so the comparison exercises all of them."""
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
        norm = layer.attention.norm
        if isinstance(norm, torch.nn.BatchNorm1d):
            norm.running_mean.normal_()
            norm.running_var.uniform_(0.5, 2.0)
    return layer


@pytest.mark.parametrize("tau", [0.0, 0.4, 1.0])
@pytest.mark.parametrize(
    "case",
    CONV_CASES,
    ids=lambda c: f"{c[0].__name__}-{c[1]}-{c[2]}-{c[3]}-{sorted(c[4].items())}-{sorted(c[6].items())}",
)
def test_conv_matches_per_sample_loops(case, tau):
    cls, cin, cout, k, kwargs, spatial, ratios = case
    layer = _randomise(cls(cin, cout, k, **kwargs, **ratios)).double().eval()
    kw.set_temperature(layer, tau)
    for batch in (3, 1):
        x = torch.randn(batch, cin, *spatial, dtype=torch.float64)
        expected = conv_layer_by_loops(layer, x)
        out = layer(x)
        assert out.shape == expected.shape
        torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("shape", [(3, 10), (2, 5, 10), (2, 3, 4, 10)])
@pytest.mark.parametrize(
    "ratios", [{}, dict(cell_num_ratio=4), dict(cell_num_ratio=0.5, cell_inplane_ratio=0.5)]
)
def test_linear_matches_per_sample_loops(shape, ratios):
    layer = _randomise(kw.KWLinear(10, 6, **ratios)).double().eval()
    kw.set_temperature(layer, 0.3)
    x = torch.randn(*shape, dtype=torch.float64)
    torch.testing.assert_close(layer(x), linear_layer_by_loops(layer, x), rtol=1e-9, atol=1e-9)
    assert layer(x[:1]).shape == (1, *shape[1:-1], 6)


def test_training_mode_uses_batch_statistics_like_the_loops():
    layer = _randomise(kw.KWConv2d(4, 6, 3, padding=1, norm="layer")).double().train()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(layer(x), conv_layer_by_loops(layer, x))


@pytest.mark.parametrize("norm", ["batch", "layer", "group", "none"])
def test_gradcheck_input_warehouse_and_attention(norm):
    layer = _randomise(kw.KWConv2d(4, 4, 3, padding=1, groups=2, norm=norm, cell_num_ratio=2)).double()
    kw.set_temperature(layer, 0.25)
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    names = ["warehouse.weight", "attention.fc1.weight", "attention.fc2.weight", "attention.fc2.bias"]
    params = {n: p.detach().clone().requires_grad_() for n, p in layer.named_parameters() if n in names}

    def f(x, *values):
        return torch.func.functional_call(layer, dict(zip(params, values)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params.values()), eps=1e-6, atol=1e-5)


def test_gradcheck_nonlocal_basis_and_linear():
    conv = kw.KWConv1d(
        8, 8, 1, cell_num_ratio=0.5, cell_inplane_ratio=0.5, nonlocal_basis_ratio=0.5, norm="layer"
    ).double()
    lin = kw.KWLinear(6, 4, norm="none", cell_num_ratio=2).double()
    for layer, x in (
        (conv, torch.randn(2, 8, 3, dtype=torch.float64)),
        (lin, torch.randn(3, 2, 6, dtype=torch.float64)),
    ):
        _randomise(layer)
        kw.set_temperature(layer, 0.5)
        names = [n for n, _ in layer.named_parameters()]
        values = [p.detach().clone().requires_grad_() for _, p in layer.named_parameters()]

        def f(x, *values, layer=layer, names=names):
            return torch.func.functional_call(layer, dict(zip(names, values)), (x,))

        assert torch.autograd.gradcheck(f, (x.requires_grad_(), *values), eps=1e-6, atol=1e-5)


def test_batchnorm_attention_rejects_training_on_one_sample():
    layer = kw.KWConv2d(4, 4, 3).train()
    with pytest.raises(ValueError, match="batch of 1.*model.eval\\(\\).*norm='layer'"):
        layer(torch.randn(1, 4, 5, 5))
    layer.eval()(torch.randn(1, 4, 5, 5))
    kw.KWConv2d(4, 4, 3, norm="layer").train()(torch.randn(1, 4, 5, 5))


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="cell_num_ratio must be a number > 0"):
        kw.KWConv2d(4, 4, 3, cell_num_ratio=0)
    with pytest.raises(ValueError, match="norm must be one of"):
        kw.KWConv2d(4, 4, 3, norm="instance")
    with pytest.raises(ValueError, match="groups=3 must divide"):
        kw.KWConv2d(4, 6, 3, groups=3)
    with pytest.raises(ValueError, match="padding='same' is not supported for strided"):
        kw.KWConv2d(4, 4, 3, stride=2, padding="same")
    with pytest.raises(ValueError, match="padding_mode"):
        kw.KWConv2d(4, 4, 3, padding_mode="mirror")
    with pytest.raises(
        ValueError,
        match=r"expects a batched 4-d input \(B, 16, \.\.\., \.\.\.\) with 16 channels, "
        r"got shape \(2, 8, 8, 8\)",
    ):
        kw.KWConv2d(16, 32, 3)(torch.randn(2, 8, 8, 8))
    with pytest.raises(ValueError, match="expects a batched 4-d input"):
        kw.KWConv2d(4, 4, 3).eval()(torch.randn(4, 5, 5))
    with pytest.raises(ValueError, match="cannot be cut into cells"):
        kw.KWConv2d(6, 6, 3, cell_inplane_ratio=0.7)


def test_module_behaviour_state_dict_copy_pickle_dtype():
    layer = kw.KWConv2d(6, 8, 3, padding=1, cell_num_ratio=0.5, cell_inplane_ratio=0.5).eval()
    kw.set_temperature(layer, 0.7)
    x = torch.randn(2, 6, 5, 5)
    out = layer(x)
    state = layer.state_dict()
    assert {"attention.beta", "attention.temperature", "warehouse.weight"} <= set(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    fresh = kw.KWConv2d(6, 8, 3, padding=1, cell_num_ratio=0.5, cell_inplane_ratio=0.5).eval()
    assert not torch.equal(fresh(x), out)
    fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    assert torch.equal(fresh(x), out)
    assert float(fresh.attention.temperature) == pytest.approx(0.7)
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert torch.equal(clone(x), out)
    half = copy.deepcopy(layer).to(torch.bfloat16)
    assert half.warehouse.weight.dtype == torch.bfloat16 and half(x.bfloat16()).dtype == torch.bfloat16
    assert half.attention.beta.dtype == torch.bfloat16
    text = repr(layer)
    assert "warehouse='conv'" in text and f"cells={layer.plan.num_cells}" in text
    assert "Warehouse('conv'" in text


def test_shared_warehouse_survives_copy_and_dtype_change():
    model = kw.create_model("kw_resnet18", budget=1, num_classes=10)
    a, b = model.layer2[1].conv1, model.layer2[1].conv2
    assert a.warehouse is b.warehouse
    for m in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)), copy.deepcopy(model).double()):
        assert m.layer2[1].conv1.warehouse is m.layer2[1].conv2.warehouse
        assert m.layer2[1].conv1.warehouse is not a.warehouse
    ids = [id(p) for p in model.parameters()]
    assert len(ids) == len(set(ids))


def test_set_temperature_validates_and_counts():
    model = kw.create_model("kw_resnet18", budget=1, num_classes=10)
    assert kw.set_temperature(model, 0.5) == len(kw.kw_layers(model)) == 19
    assert kw.get_temperature(model) == 0.5
    for bad in (-0.1, 1.5, "0.5", True):
        with pytest.raises(ValueError, match="temperature must be a number in \\[0, 1\\]"):
            kw.set_temperature(model, bad)


def test_tau_one_gives_the_beta_assignment_exactly():
    layer = kw.KWConv2d(8, 8, 3, padding=1, cell_num_ratio=2).double().eval()
    kw.set_temperature(layer, 1.0)
    mixture = layer.attention(torch.randn(3, 8, dtype=torch.float64))
    expected = layer.attention.beta[:, :-1].expand(3, -1, -1)
    assert torch.equal(mixture, expected)


def test_temperature_schedule_in_a_plain_loop():
    model = kw.KWConv2d(4, 4, 3, norm="layer")
    schedule = kw.TemperatureSchedule(model, anneal_steps=4)
    assert kw.get_temperature(model) == 1.0
    seen = [schedule.step() for _ in range(6)]
    assert seen == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    restored = kw.TemperatureSchedule(kw.KWConv2d(4, 4, 3), anneal_steps=4)
    restored.load_state_dict({**schedule.state_dict(), "steps_done": 2, "tau": 0.75})
    assert restored.step() == 0.5
