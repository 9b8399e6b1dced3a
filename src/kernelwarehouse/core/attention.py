"""The contrasting-driven attention function (CAF) of KernelWarehouse (Li & Yao, ICML 2024, Sec. 3.3).

For each of a layer's m cells it produces n mixture weights
``a = (1 - tau) * z / (sum|z| + eps) + tau * beta``, where the sum runs over the n warehouse cells
and one extra *zero cell*, which is dropped afterwards.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .plan import ZERO_CELL, LayerPlan

EPS = 1e-3


def _norm_layer(kind: str, width: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm1d(width)
    if kind == "layer":
        return nn.LayerNorm(width)
    if kind == "group":
        return nn.GroupNorm(next(g for g in (16, 8, 4, 2, 1) if width % g == 0), width)
    return nn.Identity()


def beta_matrix(plan: LayerPlan) -> torch.Tensor:
    """The (m, n + 1) one-hot temperature initialisation; column n is the zero cell."""
    beta = torch.zeros(plan.num_cells, plan.warehouse_cells + 1)
    for cell, slot in enumerate(plan.beta):
        beta[cell, plan.warehouse_cells if slot == ZERO_CELL else slot] = 1.0
    return beta


class KWAttention(nn.Module):
    """Pooled input -> Linear -> norm -> ReLU -> Linear -> per-cell normalisation and temperature.

    ``forward`` takes the pooled input (B, C_in) and returns mixture weights (B, m, n); the same code
    runs eagerly and under ``torch.jit.script``.
    With a nonlocal basis (``plan.num_basis > 0``) the second linear gives, per cell, the layer's own
    slots, a small basis and the zero cell; ``fc3`` maps the basis onto the other layers' slots.
    """

    def __init__(self, plan: LayerPlan) -> None:
        super().__init__()
        cfg = plan.config
        self.num_cells, self.num_slots = plan.num_cells, plan.warehouse_cells
        self.local_start, self.num_local, self.num_basis = plan.slots[0], plan.num_local, plan.num_basis
        self.fc1 = nn.Linear(plan.spec.in_channels, plan.hidden, bias=cfg.norm != "batch")
        self.norm = _norm_layer(cfg.norm, plan.hidden)
        self.batch_norm = cfg.norm == "batch"
        self.eps = EPS  # an attribute, as TorchScript reads no float globals
        # fc3 and basis_bias are None without a basis (a TorchScript-typed way to say "absent")
        self.fc3: nn.Linear | None = None
        self.basis_bias: nn.Parameter | None = None
        if self.num_basis:
            self.fc2 = nn.Linear(plan.hidden, plan.attention_outputs, bias=False)
            self.fc3 = nn.Linear(self.num_basis, plan.num_nonlocal, bias=False)
            self.basis_bias = nn.Parameter(torch.zeros(self.num_cells * (self.num_slots + 1)))
        else:
            self.fc2 = nn.Linear(plan.hidden, plan.attention_outputs)
        self.register_buffer("beta", beta_matrix(plan))
        self.register_buffer("temperature", torch.zeros(()))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for fc in (self.fc1, self.fc2, self.fc3):
            if fc is not None and fc.weight.numel():
                nn.init.kaiming_normal_(fc.weight, mode="fan_out", nonlinearity="relu")
                if fc.bias is not None:
                    nn.init.zeros_(fc.bias)
        if isinstance(self.norm, (nn.BatchNorm1d, nn.LayerNorm, nn.GroupNorm)):
            nn.init.ones_(self.norm.weight)
            nn.init.zeros_(self.norm.bias)
        if self.basis_bias is not None:
            nn.init.zeros_(self.basis_bias)

    def logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """The raw z of shape (B, m, n + 1), before normalisation."""
        if self.training and self.batch_norm and pooled.shape[0] == 1:
            raise ValueError(
                "KernelWarehouse attention with BatchNorm cannot train on a batch of 1: "
                "call model.eval(), or build the model with norm='layer'"
            )
        z = self.fc2(F.relu(self.norm(self.fc1(pooled))))
        batch = pooled.shape[0]
        if self.fc3 is not None and self.basis_bias is not None:  # a nonlocal basis
            z = z.reshape(batch * self.num_cells, -1)
            local = z[:, : self.num_local]
            others = self.fc3(z[:, self.num_local : -1])
            start = self.local_start
            z = torch.cat([others[:, :start], local, others[:, start:], z[:, -1:]], dim=1)
            z = z.reshape(batch, -1) + self.basis_bias
        return z.reshape(batch, self.num_cells, self.num_slots + 1)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        z = self.logits(pooled)
        z = z / (z.abs().sum(dim=-1, keepdim=True) + self.eps)
        tau = self.temperature
        # The reference forms tau * beta in float32 whatever the model's dtype. Doing the same keeps
        # float64 runs equal to it: the 1e-8 difference of 0.3 in float32 grows to 1e-3 in logits.
        mixed = (1 - tau.to(z.dtype)) * z + (tau.float() * self.beta.float()).to(z.dtype)
        return mixed[..., :-1]

    def extra_repr(self) -> str:
        basis = f", basis={self.num_basis}" if self.num_basis else ""
        return f"cells={self.num_cells}, slots={self.num_slots}{basis}"
