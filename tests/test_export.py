"""ONNX export with a dynamic batch axis (checked in onnxruntime) and TorchScript tracing."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import kernelwarehouse as kw

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


def _model(name: str, budget: float) -> torch.nn.Module:
    torch.manual_seed(0)
    model = kw.create_model(name, budget=budget, num_classes=10).eval()
    kw.set_temperature(model, 0.5)
    return model


@pytest.mark.parametrize("name, budget", [("kw_resnet18", 1), ("kw_mobilenetv2_100", 4), ("kw_convnext_tiny", 1)])
def test_onnx_dynamic_batch_matches_pytorch(tmp_path, name, budget):
    model = _model(name, budget)
    path = kw.export_onnx(model, tmp_path / f"{name}.onnx", torch.randn(2, 3, 32, 32))
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run(None, {"input": x.numpy()})[0]
        assert got.shape == (batch, 10)
        assert np.abs(got - expected).max() / np.abs(expected).max() < 1e-4


def test_torchscript_trace_runs_at_any_batch_size(tmp_path):
    model = _model("kw_resnet18", 1)
    traced = kw.trace(model, torch.randn(2, 3, 32, 32))
    traced.save(str(tmp_path / "model.pt"))
    loaded = torch.jit.load(str(tmp_path / "model.pt"))
    for batch in (1, 3):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            expected = model(x)
            got = loaded(x)
        assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-5


def test_export_rejects_non_tensor_input(tmp_path):
    with pytest.raises(TypeError, match="example_input"):
        kw.export_onnx(kw.KWConv2d(3, 4, 3), tmp_path / "x.onnx", [1, 2, 3])
