"""Export KernelWarehouse models to ONNX and TorchScript with a free batch size.

Per-sample weights are usually applied with one convolution of ``groups = B``, which fixes the batch
size in an exported graph. Under export and tracing the layers take the ``unfold`` path of
:mod:`kernelwarehouse.core.execution` instead: shifted input views and a batched matrix product,
whose graph holds for any batch size.
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn as nn


def export_onnx(model: nn.Module, path: str | os.PathLike, example_input: torch.Tensor, *,
                opset_version: int = 17, dynamic_batch: bool = True) -> str:
    """Write ``model`` (in eval mode) to an ONNX file at ``path``, with a dynamic batch axis on the
    input ``"input"`` and the output ``"output"``; returns the path."""
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be a tensor, got {type(example_input).__name__}")
    axes = {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notices
            torch.onnx.export(model, (example_input,), str(path), input_names=["input"],
                              output_names=["output"], dynamic_axes=axes, opset_version=opset_version,
                              dynamo=False)
    finally:
        model.train(was_training)
    return str(path)


def trace(model: nn.Module, example_input: torch.Tensor) -> torch.jit.ScriptModule:
    """A TorchScript trace of ``model`` (eval mode) that runs at any batch size."""
    model.eval()
    with torch.no_grad():
        return torch.jit.trace(model, (example_input,), check_trace=False)
