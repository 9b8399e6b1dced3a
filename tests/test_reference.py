"""The reference implementation's outputs (fixtures in ../shared), compared in float64."""

import pytest
import torch

import kernelwarehouse as kw
from conftest import SHARED

FIXTURES = SHARED / "fixtures" / "official"
NAMES = ["kw1x_mobilenetv2_050.pt", "kw1d4x_resnet18.pt"]


def load_fixture(name):
    path = FIXTURES / name
    if not path.exists():
        pytest.skip(f"reference fixture {path} is not present (shared/ is not beside this checkout)")
    return torch.load(path, weights_only=False)


@pytest.mark.parametrize("name", NAMES)
def test_fixture_logits_are_reproduced_in_float64(name):
    fixture = load_fixture(name)
    model = kw.model_from_reference_config(fixture["config"])
    report = kw.load_reference_state_dict(model, fixture["state_dict"])
    assert report.ok and not report.unexpected
    model = model.double().eval()
    for tau, expected in fixture["logits"].items():
        kw.set_temperature(model, tau)
        with torch.no_grad():
            out = model(fixture["input"].double())
        error = (out - expected).abs().max() / expected.abs().max()
        assert error < 1e-6, f"tau={tau}: relative error {error:.3g}"


def test_fixture_models_match_the_stored_shapes():
    fixture = load_fixture("kw1d4x_resnet18.pt")
    model = kw.model_from_reference_config(fixture["config"])
    warehouses = [tuple(shape) for key, shape in fixture["keys"] if key.startswith("warehouse_manager")]
    assert warehouses == [(w.num_cells, *w.cell_shape) for w in kw.plan_of(model).warehouses]


def test_mapping_reports_what_did_not_map():
    fixture = load_fixture("kw1d4x_resnet18.pt")
    state = dict(fixture["state_dict"])
    state["extra.weight"] = torch.zeros(3)
    del state["layer2.1.conv1.attention.fc2.bias"]
    model = kw.model_from_reference_config(fixture["config"])
    with pytest.raises(
        KeyError, match=r"missing \(1\): layer2.1.conv1.attention.fc2.bias; unexpected \(1\): extra.weight"
    ):
        kw.load_reference_state_dict(model, state)
    report = kw.load_reference_state_dict(model, state, strict=False)
    assert report.missing == ["layer2.1.conv1.attention.fc2.bias"] and report.unexpected == ["extra.weight"]
    state["warehouse_manager.weights.0"] = torch.zeros(5, 2)
    report = kw.load_reference_state_dict(model, state, strict=False)
    assert report.mismatched and "warehouse_manager.weights.0" in report.mismatched[0]
