"""Write the README's export table: KW models exported to ONNX against their static counterparts,
timed in onnxruntime on the CPU.

    PYTHONPATH=src python benchmarks/onnx.py                       # 2 intra-op threads (the README's setting)
    PYTHONPATH=src python benchmarks/onnx.py --models kw_resnet18 --batch-sizes 1 --repeats 9

Static counterparts: torchvision's ``resnet18`` and ``mobilenet_v2`` (random weights, nothing is
downloaded), exported with ``torch.onnx.export`` at the same opset with a dynamic batch axis; every
graph runs in a session with the same options (onnxruntime's full graph optimization, which folds
the static models' BatchNorms into their convolutions). The KW models are exported by
``kw.export_onnx`` in each form (``grouped`` with the batch fixed at the timed one), BatchNorms
folded. Every figure is a median over interleaved rounds; a ratio is the median of the per-round
ratios to the static model timed in the same round, which keeps it steady under background load.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
import warnings

# this file's name shadows the onnx package for modules imported from this folder: search it last
sys.path.append(sys.path.pop(0))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from run import machine  # noqa: E402

import kernelwarehouse as kw  # noqa: E402

STATIC = {
    "kw_resnet18": ("torchvision resnet18", torchvision.models.resnet18),
    "kw_mobilenetv2_100": ("torchvision mobilenet_v2", torchvision.models.mobilenet_v2),
}
NAMES = {"kw_resnet18": "KW-ResNet18 1x", "kw_mobilenetv2_100": "KW-MobileNetV2 1.0 1x"}


def session(path: str, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def export_static(model: torch.nn.Module, path: str, x: torch.Tensor, opset: int) -> str:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (x,),
            path,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
    return path


def time_rounds(
    sessions: dict[str, ort.InferenceSession], x: np.ndarray, repeats: int
) -> dict[str, list[float]]:
    """Seconds per run of each session, interleaved: one run of each per round, after a warm-up."""
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for s in sessions.values():
        s.run(None, {"input": x})
    for _ in range(repeats):
        for name, s in sessions.items():
            start = time.perf_counter()
            s.run(None, {"input": x})
            times[name].append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="kw_resnet18,kw_mobilenetv2_100")
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--forms", default="grouped,loop,unfold")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--opset", type=int, default=17)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    forms = args.forms.split(",")
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    print(
        f"onnxruntime {ort.__version__}, CPU, {args.threads} intra-op threads, opset {args.opset}, "
        f"{args.image_size}x{args.image_size}, medians of {args.repeats}; {when}; {machine()}\n"
    )
    print("| model | static counterpart | batch | static ms | form | KW ms | ratio |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models.split(","):
            torch.manual_seed(0)
            model = kw.create_model(name, budget=1).eval()
            label, build = STATIC[name]
            static = build().eval()
            for batch in map(int, args.batch_sizes.split(",")):
                x = torch.randn(batch, 3, args.image_size, args.image_size)
                paths = {"static": export_static(static, os.path.join(folder, "static.onnx"), x, args.opset)}
                for form in forms:
                    paths[form] = kw.export_onnx(
                        model,
                        os.path.join(folder, f"{form}.onnx"),
                        x,
                        form=form,
                        dynamic_batch=form != "grouped",
                        opset_version=args.opset,
                    )
                sessions = {key: session(path, args.threads) for key, path in paths.items()}
                times = time_rounds(sessions, x.numpy(), args.repeats)
                base = statistics.median(times["static"]) * 1e3
                for form in forms:
                    ratio = statistics.median(t / s for t, s in zip(times[form], times["static"]))
                    kind = "fixed batch" if form == "grouped" else "dynamic batch"
                    print(
                        f"| {NAMES[name]} | {label} | {batch} | {base:.1f} | {form} ({kind}) | "
                        f"{statistics.median(times[form]) * 1e3:.1f} | {ratio:.2f}x |",
                        flush=True,
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
