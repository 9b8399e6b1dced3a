"""The measured choice of execution path (``auto``): fastest candidate wins, cached, reloaded, a
damaged cache ignored, the deterministic switch. Timings are fake: no test depends on a clock."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import kernelwarehouse as kw
import kernelwarehouse.core.choice as choice
from kernelwarehouse.core.paths import LayerCall, candidates, rule_choice


@pytest.fixture
def measured(monkeypatch, tmp_path):
    """Measured mode, a private cache, an empty table, and fake timings: ``fake[name]`` seconds
    (default 1.0); every timed candidate is logged in ``timed``."""
    monkeypatch.setenv("KERNELWAREHOUSE_CACHE", str(tmp_path))
    monkeypatch.setenv("KERNELWAREHOUSE_PATH_CACHE", "1")
    monkeypatch.setattr(choice, "_disk", None)
    fake: dict[str, float] = {}
    timed: list[str] = []

    def time_candidate(run, device, name, best):
        run()  # every candidate must run; the clock is fake
        timed.append(name)
        return fake.get(name, 1.0)

    monkeypatch.setattr(choice, "time_candidate", time_candidate)
    kw.clear_path_choices()
    with kw.path_choice("measured"):
        yield fake, timed
    kw.clear_path_choices()


def relative(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def layer_and_input(grad: bool):
    torch.manual_seed(0)
    layer = kw.KWConv2d(16, 16, 3, padding=1, cell_num_ratio=2).double()
    layer.train(grad)
    x = torch.randn(3, 16, 6, 6, dtype=torch.float64, requires_grad=grad)
    return layer, x


def test_fastest_candidate_wins_and_is_reused(measured):
    fake, timed = measured
    layer, x = layer_and_input(grad=False)
    fake["mix"] = 0.1
    with torch.no_grad():
        out = layer(x)
        assert layer.last_path == "mix"
        assert sorted(timed) == sorted(["grouped", "unfold", "mix", "loop", "patches"])
        with kw.execution_path("reference"):
            assert relative(out, layer(x)) < 1e-12
        timed.clear()
        layer(x)
    assert not timed  # decided once per geometry
    assert list(kw.path_choices().values()) == ["mix"]
    assert kw.chosen_paths(nn.Sequential(layer)) == {"0": "mix"}


def test_training_chooses_a_backward_form_and_timing_leaves_no_trace(measured):
    fake, timed = measured
    layer, x = layer_and_input(grad=True)
    fake["loop:sample"] = 0.1
    layer(x).square().sum().backward()
    assert layer.last_path == "loop:sample"
    assert {
        "loop:slices",
        "loop:sample",
        "loop:mix",
        "patches:slices",
        "patches:sample",
        "patches:mix",
        "grouped",
        "unfold",
        "mix",
    } == set(timed)
    measured_grads = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    # the same step with the choice already made: timing added nothing to any gradient
    layer.zero_grad()
    x.grad = None
    timed.clear()
    layer(x).square().sum().backward()
    assert not timed
    for got, want in zip([x.grad] + [p.grad for p in layer.parameters()], measured_grads):
        assert torch.equal(got, want)
    with kw.execution_path("reference"):
        layer.zero_grad()
        x.grad = None
        layer(x).square().sum().backward()
    for got, want in zip([x.grad] + [p.grad for p in layer.parameters()], measured_grads):
        assert relative(want, got) < 1e-10


def test_choices_persist_and_reload(measured, tmp_path):
    fake, timed = measured
    layer, x = layer_and_input(grad=False)
    fake["unfold"] = 0.1
    with torch.no_grad():
        layer(x)
    files = list(tmp_path.glob("paths-*.json"))
    assert files == [choice.cache_file()]
    saved = json.loads(files[0].read_text())
    assert [v["path"] for v in saved["choices"].values()] == ["unfold"]
    assert saved["machine"]["cpu"]
    # a new process (fresh table, file read again) takes the cached choice without timing
    kw.clear_path_choices()
    choice._disk = None
    timed.clear()
    fake["unfold"], fake["mix"] = 1.0, 0.01
    with torch.no_grad():
        layer(x)
    assert not timed and layer.last_path == "unfold"


def test_damaged_cache_is_ignored_with_a_warning(measured):
    fake, timed = measured
    path = choice.cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{not json")
    layer, x = layer_and_input(grad=False)
    fake["grouped"] = 0.1
    with pytest.warns(RuntimeWarning, match="damaged path cache"), torch.no_grad():
        layer(x)
    assert layer.last_path == "grouped" and timed
    assert [v["path"] for v in json.loads(path.read_text())["choices"].values()] == ["grouped"]


def test_cache_can_be_switched_off(measured, monkeypatch, tmp_path):
    monkeypatch.setenv("KERNELWAREHOUSE_PATH_CACHE", "0")
    layer, x = layer_and_input(grad=False)
    with torch.no_grad():
        layer(x)
    assert choice.cache_file() is None and not list(tmp_path.glob("paths-*"))


def test_rule_switch_decides_without_timing(measured):
    fake, timed = measured
    layer, x = layer_and_input(grad=True)
    with kw.path_choice("rule"):
        layer(x).sum().backward()
    assert not timed and not kw.path_choices()
    mixture = torch.zeros(3, 1, 1, requires_grad=True)
    assert layer.last_path == rule_choice(LayerCall.of(x, mixture, layer.warehouse.weight, layer._geometry))
    with pytest.raises(ValueError, match="path choice must be one of"):
        kw.set_path_choice("fastest")


def test_rule_switch_from_the_environment():
    code = "import kernelwarehouse as kw; print(kw.get_path_choice())"
    env = {**os.environ, "KERNELWAREHOUSE_PATH_CHOICE": "rule"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "rule"
    env["KERNELWAREHOUSE_PATH_CHOICE"] = "sometimes"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "KERNELWAREHOUSE_PATH_CHOICE must be one of" in out.stderr


def test_loaded_choices_win_over_timing_and_are_checked(measured):
    fake, timed = measured
    layer, x = layer_and_input(grad=False)
    with torch.no_grad():
        layer(x)
    saved = kw.path_choices()
    kw.clear_path_choices()
    kw.load_path_choices({k: "loop" for k in saved})
    timed.clear()
    with torch.no_grad():
        layer(x)
    assert not timed and layer.last_path == "loop"
    with pytest.raises(ValueError, match="execution path must be"):
        kw.load_path_choices({"some call": "fastest"})


def test_candidates_are_pruned_by_what_applies():
    depthwise = kw.KWConv2d(8, 8, 3, padding=1, groups=8)
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    mixture = torch.zeros(2, 1, 1, requires_grad=True)
    train = candidates(LayerCall.of(x, mixture, depthwise.warehouse.weight, depthwise._geometry))
    assert "mix" not in train and "loop:mix" not in train and "loop:slices" not in train
    assert (
        "loop:sample" in train
        and "reference" not in train
        and not any(c.startswith("patches") for c in train)
    )
    linear = kw.KWLinear(8, 8)
    tokens = torch.randn(2, 3, 8)
    with torch.no_grad(), kw.native.enabled(False):
        assert candidates(LayerCall.of(tokens, mixture, linear.warehouse.weight, linear._geometry)) == [
            "grouped"
        ]


@pytest.mark.skipif(not kw.native.available(), reason="the fused path runs on the native kernels")
def test_fused_path_is_timed_with_its_own_backward_only():
    layer = kw.KWConv2d(8, 16, 3, padding=1)
    x = torch.randn(2, 8, 5, 5)
    mixture = torch.zeros(2, 9, 1)
    with torch.no_grad():
        infer = candidates(LayerCall.of(x, mixture, layer.warehouse.weight, layer._geometry))
    train = candidates(LayerCall.of(x.requires_grad_(), mixture, layer.warehouse.weight, layer._geometry))
    assert "fused" in infer and "fused@torch" not in infer
    assert [c for c in train if c.startswith("fused")] == ["fused:tiles"]
    assert "patches:slices" in train and "loop:sample" in train


def test_linear_layer_needs_no_timing(measured):
    fake, timed = measured
    with torch.no_grad(), kw.native.enabled(False):  # (with the kernels: they and PyTorch's products compete)
        kw.KWLinear(8, 8)(torch.randn(2, 8))
    assert not timed and list(kw.path_choices().values()) == ["grouped"]


def test_call_key_names_what_the_choice_depends_on():
    layer = kw.KWConv2d(4, 4, 3, padding=1)
    x = torch.randn(2, 4, 5, 5)
    mixture = torch.zeros(2, 1, 1)
    with torch.no_grad():
        infer = LayerCall.of(x, mixture, layer.warehouse.weight, layer._geometry)
        bigger = LayerCall.of(torch.randn(3, 4, 5, 5), mixture, layer.warehouse.weight, layer._geometry)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            amp = LayerCall.of(x, mixture, layer.warehouse.weight, layer._geometry)
    train = LayerCall.of(x.requires_grad_(), mixture, layer.warehouse.weight, layer._geometry)
    keys = {c.key() for c in (infer, bigger, amp, train)}
    assert len(keys) == 4
    assert "bfloat16" in amp.key() and "train" in train.key() and f"{torch.get_num_threads()}t" in infer.key()


DDP_SCRIPT = """
import json, os, sys
import torch, torch.distributed as dist
import kernelwarehouse as kw
import kernelwarehouse.core.choice as choice

dist.init_process_group("gloo")
rank = dist.get_rank()
preferred = ["grouped", "unfold"][rank]          # each rank's fake clock favours another path
choice.time_candidate = lambda run, device, name, best: 0.1 if name == preferred else 1.0
kw.set_path_choice("measured")
torch.manual_seed(0)
layer = kw.KWConv2d(8, 8, 3, padding=1)
x = torch.randn(2, 8, 5, 5)
layer(x).sum().backward()
trained = layer.last_path
layer.eval()
with torch.no_grad():                             # inference: each rank decides, shapes may differ
    layer(torch.randn(1 + rank, 8, 5, 5))
json.dump({"train": trained, "infer": layer.last_path}, open(sys.argv[1] + f"/{rank}.json", "w"))
dist.destroy_process_group()
"""


def test_under_torch_distributed_rank_zero_decides_training_paths(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KERNELWAREHOUSE_PATH_CACHE": "0"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
        str(tmp_path),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["train"] == ranks[1]["train"] == "grouped"
    assert ranks[0]["infer"] == "grouped" and ranks[1]["infer"] == "unfold"


def test_training_prunes_paths_that_would_hold_more_than_a_chunk(monkeypatch):
    from kernelwarehouse import tuning

    layer = kw.KWConv2d(16, 16, 3, padding=1, cell_num_ratio=2)
    x = torch.randn(4, 16, 6, 6, requires_grad=True)
    mixture = torch.zeros(4, 1, 1, requires_grad=True)
    call = LayerCall.of(x, mixture, layer.warehouse.weight, layer._geometry)
    assert {"mix", "unfold", "patches:sample"} <= set(candidates(call))
    monkeypatch.setattr(tuning, "CHUNK_ELEMENTS", 4 * 16 * 9 * 36 - 1)  # less than the batch's patches
    pruned = candidates(call)
    assert "mix" not in pruned and "unfold" not in pruned and "grouped" in pruned and "loop:sample" in pruned
    with torch.no_grad():  # inference holds them for an instant only: not pruned
        assert {"mix", "unfold"} <= set(
            candidates(LayerCall.of(x, mixture, layer.warehouse.weight, layer._geometry))
        )


def test_timing_keeps_the_fastest_run_and_stops_a_candidate_that_cannot_win(monkeypatch):
    from kernelwarehouse import tuning

    clock = [0.0]
    monkeypatch.setattr(choice.time, "perf_counter", lambda: clock[0])  # a fake clock the runs advance
    costs, calls = iter([9.0, 5.0, 3.0, 4.0, 9.0, 9.0, 9.0, 9.0]), []

    def run():
        calls.append(1)
        clock[0] += next(costs)

    assert choice.time_candidate(run, "cpu", "a") == 3.0  # warm-up (9) untimed, then the best of 5, 3, 4
    assert len(calls) == 1 + tuning.MEASURE_REPEATS
    calls.clear()
    assert (
        choice.time_candidate(run, "cpu", "b", best=3.0) == 9.0 and len(calls) == 2
    )  # over 2x the best: one run
    calls.clear()
    costs = iter([13.0])
    assert (
        choice.time_candidate(run, "cpu", "c", best=3.0) == 13.0 and len(calls) == 1
    )  # a warm-up over 4x the best: no timed run at all


@pytest.mark.skipif(not kw.native.available(), reason="native kernels not built on this machine")
def test_pytorch_products_compete_with_the_native_kernels_forward_and_backward(measured, monkeypatch):
    fake, timed = measured
    torch.manual_seed(0)
    layer = kw.KWConv2d(32, 32, 3, padding=1).train()
    x = torch.randn(4, 32, 8, 8, requires_grad=True)
    fake["loop:sample@torch"] = 0.1
    with kw.native.enabled(True):
        layer(x).square().sum().backward()  # measured: native and PyTorch-product variants both timed
        assert "loop:sample" in timed and "loop:sample@torch" in timed and "mix@torch" not in timed
        assert layer.last_path == "loop:sample@torch"
        want = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]

        def refuse(*args, **kwargs):
            raise AssertionError("native kernel called for a @torch choice")

        monkeypatch.setattr(kw.native, "mix_rows", refuse)
        monkeypatch.setattr(kw.native, "rows_gradient", refuse)
        layer.zero_grad()
        x.grad = None
        layer(x).square().sum().backward()  # the choice is made: forward and backward on PyTorch's products
    for got, expected in zip([x.grad] + [p.grad for p in layer.parameters()], want):
        assert torch.equal(got, expected)
