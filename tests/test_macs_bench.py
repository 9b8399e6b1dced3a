"""``kw bench`` and the benchmark's measurements (figures only; timings are never asserted)."""

from __future__ import annotations

import json

import pytest
import torch

import kernelwarehouse.native
from kernelwarehouse.bench import benchmark, peak_memory
from kernelwarehouse.cli import main


def test_peak_memory_sees_a_temporary_tensor():
    def work():
        big = torch.ones(1 << 20)  # 4 MiB, freed before the end
        return float(big.sum())

    assert peak_memory(work, torch.device("cpu")) >= 4 << 20


def test_benchmark_figures_and_ratios():
    result = benchmark("kw_resnet18", "1/2", batch_size=2, image_size=32, repeats=1, memory_batch_size=2)
    figures = result["figures"]
    assert set(figures) == {
        "params",
        "macs",
        "inference b2",
        "inference b1",
        "train step b2",
        "peak train memory b2",
    }
    assert figures["params"]["kw"] == pytest.approx(7.431044) and figures["params"][
        "static"
    ] == pytest.approx(11.689512)
    for fig in figures.values():
        assert fig["kw"] > 0 and fig["static"] > 0
        assert fig["ratio"] == pytest.approx(fig["kw"] / fig["static"])
    with pytest.raises(ValueError, match="static model"):
        benchmark("resnet18")


def test_kw_bench_cli_json(capsys):
    assert (
        main(
            [
                "bench",
                "--model",
                "kw_resnet18",
                "--image-size",
                "32",
                "--batch-size",
                "2",
                "--repeats",
                "1",
                "--memory-batch-size",
                "0",
                "--json",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["static"].endswith("resnet18") and "peak train memory b32" not in result["figures"]
    assert result["figures"]["macs"]["ratio"] > 1
    assert result["native_kernels"] == kernelwarehouse.native.available()


def test_kw_bench_names_the_kernels_and_the_path_of_each_layer(capsys):
    assert (
        main(
            [
                "bench",
                "--model",
                "kw_resnet18",
                "--image-size",
                "32",
                "--batch-size",
                "2",
                "--repeats",
                "1",
                "--memory-batch-size",
                "0",
                "--show-paths",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "paths rule" in out  # the suite runs the fixed rule
    if kernelwarehouse.native.available():
        assert f"native kernels ({kernelwarehouse.native.variant()})" in out
    table = out.split("path of each layer, per figure:")[1].splitlines()
    assert table[1].startswith("| layer | inference b2 | inference b1 | train step b2 |")
    rows = {
        line.split("|")[1].strip(): line.split("|")[2].strip() for line in table[3:] if line.startswith("|")
    }
    assert len(rows) == 19 and rows["layer4.1.conv2"] in kernelwarehouse.core.execution.PATHS + (
        "loop:slices",
    )
    assert main(["bench", "--path", "fastest"]) == 2
    assert "execution path must be 'auto'" in capsys.readouterr().err


def test_kw_bench_without_native_kernels(capsys, monkeypatch):
    used = []
    monkeypatch.setattr(kernelwarehouse.native, "mix_rows", lambda *a, **k: used.append(1))
    assert (
        main(
            [
                "bench",
                "--model",
                "kw_resnet18",
                "--image-size",
                "32",
                "--batch-size",
                "2",
                "--repeats",
                "1",
                "--memory-batch-size",
                "0",
                "--no-native",
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["native_kernels"] is False and not used


def test_kw_bench_cli_errors(capsys):
    assert main(["bench", "--model", "nope"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_benchmark_a_baseline_against_its_static_model():
    result = benchmark("odconv_resnet18", batch_size=2, image_size=32, repeats=1, memory_batch_size=None)
    assert result["budget"] == "K=4" and result["static"].endswith("resnet18")
    params = result["figures"]["params"]
    assert params["ratio"] == pytest.approx(44.90164 / 11.689512, rel=1e-4)
