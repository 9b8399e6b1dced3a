"""Inference-time folding: a BatchNorm that follows a convolution goes into the convolution.

For a static convolution that is the usual Conv+BN folding (:func:`torch.nn.utils.fusion.fuse_conv_bn_eval`).
A KernelWarehouse layer's cells are shared by several layers, so the BatchNorm's scale cannot go into
them: it becomes the layer's ``out_scale``, a scale per output channel applied to the *assembled*
weight (in exported graphs, see the ``conv`` path of :mod:`kernelwarehouse.core.paths`) or, in eager
mode, to the output in the same pass as the bias; the BatchNorm's shift goes into the bias. The
BatchNorm inside each KernelWarehouse attention branch folds into the linear layer before it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.fx
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from .core.attention import KWAttention
from .core.layers import KWLayer, _KWConvNd

__all__ = ["fuse_for_inference"]


class _ConvLeaves(torch.fx.Tracer):
    """Traces a model down to its convolutions and BatchNorms, which stay whole."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (KWLayer, _ConvNd, _BatchNorm)) or super().is_leaf_module(m, qualname)


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    if not isinstance(bn, _BatchNorm) or bn.running_mean is None:
        return False
    if isinstance(conv, _KWConvNd) or (isinstance(conv, _ConvNd) and not conv.transposed):
        return conv.out_channels == bn.num_features
    return False


def _pairs_by_graph(model: nn.Module) -> list[tuple[str, str]] | None:
    """(convolution, BatchNorm) names where the BatchNorm's only input is the convolution's output and
    that output has no other use, from a symbolic trace; None if the model cannot be traced."""
    try:
        graph = _ConvLeaves().trace(model)
    except Exception:  # noqa: BLE001 - any untraceable forward: the caller falls back to nn.Sequential order
        return None
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        source = node.args[0]
        if not isinstance(source, torch.fx.Node) or source.op != "call_module" or len(source.users) != 1:
            continue
        if (
            calls[node.target] == 1
            and calls[source.target] == 1
            and _foldable(modules[source.target], modules[node.target])
        ):
            pairs.append((source.target, node.target))
    return pairs


def _pairs_in_sequence(model: nn.Module) -> list[tuple[str, str]]:
    """(convolution, BatchNorm) names of neighbours in an ``nn.Sequential``."""
    pairs = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Sequential):
            children = list(module.named_children())
            for (conv_name, conv), (bn_name, bn) in zip(children, children[1:]):
                if _foldable(conv, bn):
                    prefix = f"{name}." if name else ""
                    pairs.append((prefix + conv_name, prefix + bn_name))
    return pairs


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _fold_into_kw(layer: _KWConvNd, bn: _BatchNorm) -> None:
    with torch.no_grad():
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = -bn.running_mean * scale
        if bn.bias is not None:
            shift = shift + bn.bias
        previous = layer.out_scale if layer.out_scale is not None else torch.ones_like(scale)
        bias = layer.bias.detach() if layer.bias is not None else torch.zeros_like(scale)
        layer.out_scale = (previous * scale).detach().clone()
        layer.bias = nn.Parameter((bias * scale + shift).detach().clone(), requires_grad=False)


def _after_norm(bn: nn.Module) -> nn.Module:
    """What stays of a folded BatchNorm: nothing, or what a norm-and-activation layer (timm's
    ``BatchNormAct2d``: dropout, then activation) applies after normalising."""
    rest = list(bn.children())
    return nn.Sequential(*rest) if rest else nn.Identity()


def fuse_for_inference(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm that directly follows a convolution (static or KernelWarehouse) into it,
    in place, replacing the BatchNorm by ``nn.Identity`` (or by the activation of a norm-and-activation
    layer); returns ``model``, in eval mode. The
    attention branches' BatchNorms fold into their first linear layers.

    A pair is folded where the BatchNorm's only input is the convolution's output and that output
    has no other use, read from a symbolic trace of ``model`` (``torch.fx``) or, where the model cannot
    be traced, from the order of an ``nn.Sequential``. Exact in eval mode (up to float rounding): the
    BatchNorm uses its running statistics there. The folded model is for inference only.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse_for_inference expects an nn.Module, got {type(model).__name__}")
    model.eval()
    pairs = _pairs_by_graph(model)
    if pairs is None:
        pairs = _pairs_in_sequence(model)
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if isinstance(conv, _KWConvNd):
            _fold_into_kw(conv, bn)
        else:
            _set(model, conv_name, fuse_conv_bn_eval(conv, bn))
        _set(model, bn_name, _after_norm(bn))
    for attention in [m for m in model.modules() if isinstance(m, KWAttention)]:
        if isinstance(attention.norm, nn.BatchNorm1d) and attention.norm.running_mean is not None:
            attention.fc1 = fuse_linear_bn_eval(attention.fc1, attention.norm)
            attention.norm = nn.Identity()
    return model
