"""Export KernelWarehouse models to ONNX and TorchScript.

An exported KernelWarehouse layer computes its mixture weights, assembles its weight and applies it.
A convolution whose weight is a graph value cannot have a free batch: ONNX ``Conv``'s ``groups`` is
fixed. :func:`export_onnx` writes one of three graph forms (``form=``):

``"grouped"``  (fixed batch only)
    the ``conv`` execution path (:mod:`kernelwarehouse.core.paths`) traced for the example's batch B:
    each layer's B weights assembled by one matrix product straight into the weight's memory order,
    applied by one ``Conv`` with ``group = B * groups`` (a plain ``Conv`` at B = 1, its bias and a
    folded BatchNorm inside).
``"loop"``  (dynamic or fixed batch)
    an ONNX ``Loop`` over the batch around ``"grouped"`` graphs: chunks of
    :data:`kernelwarehouse.tuning.EXPORT_LOOP_CHUNK` samples through the graph of that batch, the
    rest one sample at a time through the batch-1 graph. Needs a model that treats the samples of a
    batch independently in eval mode (true of every model of the zoo) and the ``onnx`` package.
``"unfold"``  (dynamic or fixed batch)
    the ``unfold`` path: shifted input views and one batched matrix product per layer, a plain
    traced graph for any batch size.

``form="auto"`` takes ``"loop"`` for a dynamic batch and ``"grouped"`` for a fixed one, what
measured fastest in onnxruntime (the measurements: :data:`kernelwarehouse.tuning.EXPORT_LOOP_CHUNK`,
``benchmarks/onnx.py``). With ``fuse=True`` (the default) a copy of the model is exported with its
BatchNorms folded (:func:`kernelwarehouse.fuse_for_inference`; exact in eval mode).
"""

from __future__ import annotations

import copy
import io
import os
import warnings

import torch
import torch.nn as nn

from . import tuning
from .core.per_sample import fixed_batch_export
from .fusion import fuse_for_inference

#: The graph forms of :func:`export_onnx` (besides ``"auto"``).
FORMS = ("loop", "grouped", "unfold")

_INPUT, _OUTPUT = "input", "output"


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_input: torch.Tensor,
    *,
    opset_version: int = 17,
    dynamic_batch: bool = True,
    form: str = "auto",
    fuse: bool = True,
) -> str:
    """Write ``model`` (in eval mode) to an ONNX file at ``path`` with input ``"input"`` and output
    ``"output"``; returns the path.

    With ``dynamic_batch`` the batch axis of both is free, else fixed at ``example_input``'s batch.
    ``form`` is one of :data:`FORMS` or ``"auto"`` (see the module docstring); ``fuse`` folds
    BatchNorms into the convolutions before (in a copy; ``model`` is left as it is)."""
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be a tensor, got {type(example_input).__name__}")
    if form != "auto" and form not in FORMS:
        raise ValueError(f"form must be 'auto' or one of {FORMS}, got {form!r}")
    if form == "auto":
        form = "loop" if dynamic_batch else "grouped"
    if form == "grouped" and dynamic_batch:
        raise ValueError(
            "form 'grouped' fixes the batch size in the graph: pass dynamic_batch=False, "
            "or take form 'loop' or 'unfold' for a free batch"
        )
    original, was_training = model, model.training
    model = fuse_for_inference(copy.deepcopy(model)) if fuse else model.eval()
    try:
        if form == "loop":
            _loop_graph(model, example_input, opset_version, dynamic_batch, str(path))
        elif form == "grouped":
            with fixed_batch_export(example_input.shape[0]):
                _torch_export(model, example_input, str(path), opset_version, False)
        else:
            _torch_export(model, example_input, str(path), opset_version, dynamic_batch)
    finally:
        original.train(was_training)
    return str(path)


def _torch_export(
    model: nn.Module, example_input: torch.Tensor, target, opset_version: int, dynamic_batch: bool
) -> None:
    axes = {_INPUT: {0: "batch"}, _OUTPUT: {0: "batch"}} if dynamic_batch else None
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notices
        torch.onnx.export(
            model,
            (example_input,),
            target,
            input_names=[_INPUT],
            output_names=[_OUTPUT],
            dynamic_axes=axes,
            opset_version=opset_version,
            dynamo=False,
        )


def _fixed_batch_graph(model: nn.Module, example_input: torch.Tensor, batch: int, opset_version: int):
    """The ``"grouped"`` graph of ``model`` for batches of ``batch`` samples, as an ONNX model."""
    import onnx

    example = example_input[:1].expand(batch, *example_input.shape[1:]).contiguous()
    buffer = io.BytesIO()
    with fixed_batch_export(batch):
        _torch_export(model, example, buffer, opset_version, False)
    return onnx.load_from_string(buffer.getvalue())


def _loop_graph(
    model: nn.Module, example_input: torch.Tensor, opset_version: int, dynamic_batch: bool, path: str
) -> None:
    """Write the ``"loop"`` form to ``path``: chunks of ``tuning.EXPORT_LOOP_CHUNK`` samples, then
    single samples, each through a ``"grouped"`` graph inside an ONNX ``Loop``; the outputs
    concatenated."""
    try:
        import onnx
        from onnx import TensorProto, helper
    except ImportError as error:  # pragma: no cover - onnx is an optional dependency
        raise ImportError("export form 'loop' needs the onnx package (pip install onnx)") from error
    chunk = tuning.EXPORT_LOOP_CHUNK
    batch = example_input.shape[0]
    sizes = [1] if chunk <= 1 or (not dynamic_batch and batch < chunk) else [chunk, 1]
    graphs = [_fixed_batch_graph(model, example_input, size, opset_version) for size in sizes]
    first = graphs[0].graph
    initializers = _merge_initializers([g.graph for g in graphs])

    def const(name: str, values: list[int]) -> onnx.NodeProto:
        return helper.make_node(
            "Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [len(values)], values)
        )

    out_dims = [d.dim_value for d in first.output[0].type.tensor_type.shape.dim][1:]
    nodes = [
        helper.make_node("Shape", [_INPUT], ["kw_loop/shape"]),
        const("kw_loop/zero", [0]),
        const("kw_loop/one", [1]),
        helper.make_node("Slice", ["kw_loop/shape", "kw_loop/zero", "kw_loop/one"], ["kw_loop/batch"]),
        helper.make_node(
            "Constant",
            [],
            ["kw_loop/true"],
            value=helper.make_tensor("kw_loop/true", TensorProto.BOOL, [], [True]),
        ),
        const("kw_loop/out_shape", [-1, *out_dims]),
    ]
    outputs, start = [], "kw_loop/zero"
    for index, (size, graph) in enumerate(zip(sizes, graphs)):
        tag = f"kw_loop/{index}"
        nodes.append(const(f"{tag}/size", [size]))
        if index == len(sizes) - 1:  # the rest of the batch
            nodes.append(helper.make_node("Sub", ["kw_loop/batch", start], [f"{tag}/count"]))
        else:
            nodes += [
                helper.make_node("Sub", ["kw_loop/batch", start], [f"{tag}/left"]),
                helper.make_node("Div", [f"{tag}/left", f"{tag}/size"], [f"{tag}/trips"]),
                helper.make_node("Mul", [f"{tag}/trips", f"{tag}/size"], [f"{tag}/count"]),
            ]
        nodes += [
            helper.make_node("Div", [f"{tag}/count", f"{tag}/size"], [f"{tag}/iterations"]),
            helper.make_node("Squeeze", [f"{tag}/iterations", "kw_loop/zero"], [f"{tag}/trip_count"]),
            helper.make_node(
                "Loop",
                [f"{tag}/trip_count", "kw_loop/true"],
                [f"{tag}/stacked"],
                body=_loop_body(graph.graph, tag, start, size, initializers),
            ),
            helper.make_node("Reshape", [f"{tag}/stacked", "kw_loop/out_shape"], [f"{tag}/output"]),
        ]
        outputs.append(f"{tag}/output")
        if index < len(sizes) - 1:
            nodes.append(helper.make_node("Add", [start, f"{tag}/count"], [f"{tag}/end"]))
            start = f"{tag}/end"
    nodes.append(helper.make_node("Concat", outputs, [_OUTPUT], axis=0))
    batch_dim = "batch" if dynamic_batch else batch
    main = helper.make_graph(
        nodes,
        "kernelwarehouse_loop",
        [helper.make_tensor_value_info(_INPUT, TensorProto.FLOAT, [batch_dim, *example_input.shape[1:]])],
        [helper.make_tensor_value_info(_OUTPUT, TensorProto.FLOAT, [batch_dim, *out_dims])],
        list(initializers.values()),
    )
    proto = helper.make_model(
        main, opset_imports=list(graphs[0].opset_import), producer_name=graphs[0].producer_name
    )
    proto.ir_version = graphs[0].ir_version
    onnx.save(proto, path)


def _merge_initializers(graphs) -> dict:
    """The initializers of ``graphs`` by name, for the main graph: one copy of each; a name two
    graphs use for different values is renamed in the later one."""
    merged: dict = {}
    for index, graph in enumerate(graphs):
        renames = {}
        for tensor in graph.initializer:
            known = merged.get(tensor.name)
            if known is not None and known.raw_data == tensor.raw_data and known.dims == tensor.dims:
                continue
            if known is not None:
                renames[tensor.name] = f"kw_loop/{index}/{tensor.name}"
                tensor.name = renames[tensor.name]
            merged[tensor.name] = tensor
        for node in graph.node:
            node.input[:] = [renames.get(name, name) for name in node.input]
        del graph.initializer[:]
    return merged


def _loop_body(graph, tag: str, start: str, size: int, initializers: dict):
    """The body of a ``Loop`` over chunks of ``size`` samples from ``start``: iteration i runs
    ``graph`` on samples ``start + i * size`` to ``start + (i + 1) * size``."""
    from onnx import TensorProto, helper

    step, first, last = f"{tag}/step", f"{tag}/first", f"{tag}/last"
    sample = f"{tag}/samples"
    nodes = [
        helper.make_node("Mul", [f"{tag}/i", f"{tag}/size"], [step]),
        helper.make_node("Add", [start, step], [first]),
        helper.make_node("Add", [first, f"{tag}/size"], [last]),
        helper.make_node("Slice", [_INPUT, first, last, "kw_loop/zero"], [sample]),
    ]
    for node in graph.node:
        node.input[:] = [sample if name == _INPUT else name for name in node.input]
        node.output[:] = [f"{tag}/result" if name == _OUTPUT else name for name in node.output]
        nodes.append(node)
    nodes.append(helper.make_node("Identity", [f"{tag}/condition"], [f"{tag}/condition_out"]))
    return helper.make_graph(
        nodes,
        f"{tag}/body",
        [
            helper.make_tensor_value_info(f"{tag}/i", TensorProto.INT64, []),
            helper.make_tensor_value_info(f"{tag}/condition", TensorProto.BOOL, []),
        ],
        [
            helper.make_tensor_value_info(f"{tag}/condition_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info(f"{tag}/result", TensorProto.FLOAT, None),
        ],
    )


def trace(model: nn.Module, example_input: torch.Tensor) -> torch.jit.ScriptModule:
    """A TorchScript trace of ``model`` (eval mode) that runs at any batch size."""
    model.eval()
    with torch.no_grad():
        return torch.jit.trace(model, (example_input,), check_trace=False)
