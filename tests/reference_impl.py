"""Slow, loop-based restatements of the method, written independently of the package, for tests."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F


def attention_by_formula(layer, pooled: torch.Tensor) -> torch.Tensor:
    """a_ij = (1 - tau) z_ij / (sum_p |z_ip| + 1e-3) + tau beta_ij, zero cell dropped; one sample at
    a time."""
    att = layer.attention
    tau = float(att.temperature)
    tau_beta = float(
        torch.tensor(tau, dtype=torch.float32)
    )  # tau * beta is formed in float32, as the reference does
    m, n = att.num_cells, att.num_slots
    rows = []
    for b in range(pooled.shape[0]):
        h = att.fc1(pooled[b : b + 1])
        h = torch.relu(att.norm(h))
        z = att.fc2(h)[0]
        if att.num_basis:
            z = z.reshape(m, -1)
            local, basis, zero = z[:, : att.num_local], z[:, att.num_local : -1], z[:, -1:]
            others = basis @ att.fc3.weight.T
            s = att.local_start
            z = torch.cat([others[:, :s], local, others[:, s:], zero], 1).reshape(-1) + att.basis_bias
        z = z.reshape(m, n + 1)
        a = torch.empty(m, n, dtype=z.dtype)
        for i in range(m):
            denom = sum(abs(z[i, p]) for p in range(n + 1)) + 1e-3
            for j in range(n):
                a[i, j] = (1 - tau) * z[i, j] / denom + tau_beta * att.beta[i, j]
        rows.append(a)
    return torch.stack(rows)


def weight_by_loops(layer, mixture: torch.Tensor) -> torch.Tensor:
    """Build one sample's W from its (m, n) mixture: cell (s, o, i) fills block (o, i) at position s."""
    cells = layer.warehouse.weight
    c_out, c_in = cells.shape[1:3]
    cell_k = cells.shape[3:]
    shape = layer.weight_shape
    kernel = shape[2:]
    W = torch.zeros(shape, dtype=cells.dtype)
    spatial_blocks = list(itertools.product(*[range(k // ck) for k, ck in zip(kernel, cell_k)]))
    spatial, out_blocks, in_blocks = layer.grid
    assert len(spatial_blocks) == spatial
    t = 0
    for s in spatial_blocks:
        for o in range(out_blocks):
            for i in range(in_blocks):
                cell = sum(mixture[t, j] * cells[j] for j in range(cells.shape[0]))
                index = [slice(o * c_out, (o + 1) * c_out), slice(i * c_in, (i + 1) * c_in)]
                index += [slice(p * ck, (p + 1) * ck) for p, ck in zip(s, cell_k)]
                W[tuple(index)] = cell
                t += 1
    return W


def conv_layer_by_loops(layer, x: torch.Tensor) -> torch.Tensor:
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[x.dim() - 2]
    pooled = x.flatten(2).mean(-1)
    mixture = attention_by_formula(layer, pooled)
    outs = []
    for b in range(x.shape[0]):
        W = weight_by_loops(layer, mixture[b])
        xb = x[b : b + 1]
        padding = layer.padding
        if layer.padding_mode != "zeros":
            xb = F.pad(xb, layer._pad, mode=layer.padding_mode)
            padding = 0
        outs.append(conv(xb, W, layer.bias, layer.stride, padding, layer.dilation, layer.groups))
    return torch.cat(outs)


def linear_layer_by_loops(layer, x: torch.Tensor) -> torch.Tensor:
    tokens = x.reshape(x.shape[0], -1, x.shape[-1])
    mixture = attention_by_formula(layer, tokens.mean(1))
    outs = []
    for b in range(x.shape[0]):
        W = weight_by_loops(layer, mixture[b])[..., 0]
        outs.append(F.linear(tokens[b], W, layer.bias))
    return torch.stack(outs).reshape(*x.shape[:-1], -1)
