"""kw train, eval, inspect, demo and recipes from the command line, and every bad input they refuse."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from kernelwarehouse.cli import main
from kernelwarehouse.models import create_model
from kernelwarehouse.bench import count_macs
from kernelwarehouse.train import load_checkpoint

TRAIN = [
    "train",
    "--data",
    "digits",
    "--epochs",
    "2",
    "--batch-size",
    "16",
    "--limit-train",
    "96",
    "--limit-val",
    "48",
    "--model-kwargs",
    "channels=(4,8,16,32)",
    "stem_width=4",
    "--device",
    "cpu",
    "--temp-epochs",
    "1",
]


def run_kw(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def digest(folder) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny KW ResNet18 (1/2x) trained 2 epochs on digits, and a static one."""
    root = tmp_path_factory.mktemp("runs")
    assert (
        main([*TRAIN, "--model", "kw_resnet18", "--budget", "1/2", "--output", str(root / "kw"), "--ema"])
        == 0
    )
    assert main([*TRAIN, "--model", "resnet18", "--output", str(root / "static"), "--epochs", "1"]) == 0
    return root


def test_train_writes_checkpoints_metrics_and_prints_epochs(trained, capsys):
    run = trained / "kw"
    assert {"last.pt", "best.pt", "metrics.csv", "metrics.json", "steps.csv", "config.json"} <= set(
        digest(run)
    )
    state = load_checkpoint(run / "last.pt")
    assert (
        state["config"]["model_kwargs"] == {"channels": (4, 8, 16, 32), "stem_width": 4}
        and state["config"]["ema"] is True
    )
    assert state["epoch"] == 2 and state["data_info"]["num_classes"] == 10
    assert state["params"] == sum(
        p.numel()
        for p in create_model(
            "kw_resnet18",
            budget=0.5,
            num_classes=10,
            in_chans=1,
            small_input=True,
            channels=(4, 8, 16, 32),
            stem_width=4,
        ).parameters()
    )


def test_eval_reports_accuracy_params_and_macs(trained, capsys):
    code, out, err = run_kw(
        capsys, "eval", "--checkpoint", str(trained / "kw" / "last.pt"), "--limit-val", "48", "--json"
    )
    assert code == 0, err
    result = json.loads(out)
    last = json.loads((trained / "kw" / "metrics.json").read_text())[-1]
    assert result["samples"] == 48 and result["epoch"] == 2
    assert result["top1"] == pytest.approx(last["val_top1"]) and result["top5"] == pytest.approx(
        last["val_top5"]
    )
    assert result["loss"] == pytest.approx(last["val_loss"], rel=1e-4)
    model = create_model(
        "kw_resnet18",
        budget=0.5,
        num_classes=10,
        in_chans=1,
        small_input=True,
        channels=(4, 8, 16, 32),
        stem_width=4,
    )
    static = create_model(
        "resnet18", num_classes=10, in_chans=1, small_input=True, channels=(4, 8, 16, 32), stem_width=4
    )
    assert result["params"] == sum(p.numel() for p in model.parameters())
    assert result["macs"] == count_macs(model, (1, 8, 8)).total > count_macs(static, (1, 8, 8)).total
    code, out, _ = run_kw(capsys, "eval", "--checkpoint", str(trained / "kw" / "last.pt"), "--ema")
    assert code == 0 and "top-1" in out and "MACs" in out and "360 samples" in out


def test_inspect_plots_attentions_and_summarises(trained, capsys, tmp_path):
    code, out, err = run_kw(
        capsys,
        "inspect",
        "--checkpoint",
        str(trained / "kw" / "last.pt"),
        "--output",
        str(tmp_path / "inspect"),
        "--samples",
        "64",
    )
    assert code == 0, err
    files = set(digest(tmp_path / "inspect"))
    assert {
        "summary.txt",
        "warehouse_usage.png",
        "attention_stage0_layer_conv.png",
        "attention_stage3_layer_conv.png",
    } <= files
    summary = (tmp_path / "inspect" / "summary.txt").read_text()
    for layer in ("layer1.0.conv1", "layer4.1.conv2", "layer2.0.downsample.0"):
        assert layer in summary
    assert "temperature tau = 0.0000" in summary  # annealed to 0 within the first epoch
    assert "epoch 2" in summary
    code, _, err = run_kw(
        capsys,
        "inspect",
        "--checkpoint",
        str(trained / "static" / "last.pt"),
        "--output",
        str(tmp_path / "static"),
    )
    assert code == 2 and "no KernelWarehouse layers" in err and len(err.strip().splitlines()) == 1


def test_inspect_statistics_are_computed_from_the_attention(trained):
    from kernelwarehouse.cli.eval import load_trained
    from kernelwarehouse.train.data import load_data
    from kernelwarehouse.train.inspection import attention_statistics

    model, _, _ = load_trained(str(trained / "kw" / "last.pt"))
    _, val, _ = load_data("digits")
    images = torch.stack([val[i][0] for i in range(20)])
    stats = attention_statistics(model, images, batch_size=7)
    layer = model.layer1[0].conv1
    captured = []
    handle = layer.attention.register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        model(images)
    handle.remove()
    a = captured[0]
    first = stats[0]
    assert first.name == "layer1.0.conv1"
    assert torch.allclose(first.mean, a.mean(0), atol=1e-6)
    assert first.negative == pytest.approx(float((a < 0).float().mean()))
    assert first.usage.shape == (layer.plan.warehouse_cells,)


def test_demo_compares_static_and_kw_budgets(capsys, tmp_path):
    out_dir = tmp_path / "demo"
    code, out, err = run_kw(
        capsys,
        "demo",
        "--output",
        str(out_dir),
        "--runs",
        "resnet18",
        "kw_resnet18@1/2",
        "kw_resnet18@4",
        "--width",
        "4",
        "--epochs",
        "1",
        "--limit-train",
        "64",
        "--limit-val",
        "32",
        "--batch-size",
        "16",
    )
    assert code == 0, err
    results = json.loads((out_dir / "results.json").read_text())
    rows = results["runs"]
    assert [(r["model"], r["budget"]) for r in rows] == [
        ("resnet18", "static"),
        ("kw_resnet18", "1/2x"),
        ("kw_resnet18", "4x"),
    ]
    assert rows[1]["params"] < rows[2]["params"]
    assert all(0 <= r["top1"] <= 100 and r["time"] > 0 for r in rows)
    assert {c["seed"] for c in results["configs"]} == {0} and {c["lr"] for c in results["configs"]} == {0.1}
    table = (out_dir / "results.md").read_text()
    assert table.count("\n") == 5 and "| kw_resnet18" in table and table in out
    for name in ("accuracy.png", "loss.png", "temperature.png", "curves.png"):
        assert (out_dir / name).read_bytes()[:4] == b"\x89PNG"
    code, _, err = run_kw(capsys, "demo", "--output", str(out_dir), "--runs", "resnet18")
    assert code == 2 and "already holds a run" in err


def test_recipes_list_the_papers_recipes(capsys):
    code, out, _ = run_kw(capsys, "recipes", "--json")
    recipes = json.loads(out)
    assert code == 0
    assert (
        recipes["resnet"]["epochs"],
        recipes["resnet"]["lr"],
        recipes["resnet"]["batch_size"],
        recipes["resnet"]["weight_decay"],
        recipes["resnet"]["temp_epochs"],
    ) == (100, 0.1, 256, 1e-4, 20)
    assert (recipes["mobilenetv2"]["epochs"], recipes["mobilenetv2"]["temp_epochs"]) == (150, 15)
    assert (recipes["convnext"]["epochs"], recipes["convnext"]["optimizer"]) == (300, "adamw")
    assert (recipes["deit"]["epochs"], recipes["deit"]["mixup"], recipes["deit"]["ema"]) == (300, 0.8, False)
    code, out, _ = run_kw(capsys, "recipes")
    assert code == 0 and "resnet" in out and "convnext" in out


def test_a_recipe_runs_on_an_image_folder(tmp_path, capsys):
    from test_data import write_image_folder

    root = write_image_folder(tmp_path / "images", per_class=4)
    code, out, err = run_kw(
        capsys,
        "train",
        "--recipe",
        "resnet",
        "--model",
        "resnet18",
        "--data",
        str(root),
        "--image-size",
        "16",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--model-kwargs",
        "channels=(4,8,16,32)",
        "stem_width=4",
        "--output",
        str(tmp_path / "run"),
        "--device",
        "cpu",
    )
    assert code == 0, err
    config = load_checkpoint(tmp_path / "run" / "last.pt")["config"]
    assert (config["recipe"], config["scheduler"], config["weight_decay"], config["epochs"]) == (
        "resnet",
        "step",
        1e-4,
        1,
    )


def test_the_convnext_recipe_regularises_with_timms_pipeline(tmp_path, capsys):
    from test_data import write_image_folder

    root = write_image_folder(tmp_path / "images", per_class=4)
    code, out, err = run_kw(
        capsys,
        "train",
        "--recipe",
        "convnext",
        "--model",
        "kw_resnet18",
        "--budget",
        "1",
        "--data",
        str(root),
        "--image-size",
        "72",
        "--epochs",
        "1",
        "--batch-size",
        "3",
        "--lr",
        "1e-3",
        "--model-kwargs",
        "channels=(4,8,16,32)",
        "stem_width=4",
        "--output",
        str(tmp_path / "run"),
        "--device",
        "cpu",
    )
    assert code == 0, err
    config = load_checkpoint(tmp_path / "run" / "last.pt")["config"]
    assert (
        config["mixup"],
        config["cutmix"],
        config["random_erasing"],
        config["rand_augment"],
        config["ema"],
    ) == (0.8, 1.0, 0.25, "rand-m9-mstd0.5-inc1", True)
    code, _, err = run_kw(
        capsys,
        "train",
        "--model",
        "resnet18",
        "--data",
        "digits",
        "--rand-augment",
        "rand-m9-mstd0.5-inc1",
        "--epochs",
        "1",
        "--output",
        str(tmp_path / "bad"),
    )
    assert code == 2 and "apply to ImageFolder data" in err


def test_resume_continues_a_finished_run_for_more_epochs(trained, tmp_path, capsys):
    import shutil

    run = tmp_path / "more"
    shutil.copytree(trained / "static", run)
    code, out, err = run_kw(capsys, "train", "--resume", str(run), "--epochs", "2")
    assert code == 0, err
    assert "epoch 2/2" in out and "epoch 1/2" not in out
    assert load_checkpoint(run / "last.pt")["epoch"] == 2


def _corrupt(path):
    path.write_bytes(b"PK\x03\x04 definitely not a checkpoint" * 10)
    return path


def _foreign(path):
    torch.save({"state_dict": {"w": torch.ones(1)}}, path)
    return path


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "no_such_net"], "unknown model 'no_such_net'"),
        (["--model", "kw_resnet18", "--budget", "0"], "budget must be > 0"),
        (["--model", "kw_resnet18", "--budget", "-2"], "budget must be > 0"),
        (["--model", "kw_resnet18", "--budget", "lots"], "budget must be a number"),
        (["--model", "resnet18", "--budget", "1"], "static model"),
        (["--model", "kw_resnet18", "--data", "{tmp}/nowhere"], "does not exist"),
        (["--model", "kw_resnet18", "--data", "{tmp}"], "neither a CIFAR"),
        (
            ["--model", "kw_resnet18", "--batch-size", "1"],
            "batch-size 1 cannot train KernelWarehouse attention",
        ),
        (["--model", "resnet18", "--batch-size", "1"], "batch-size 1 cannot train a model with BatchNorm"),
        (["--model", "kw_resnet18", "--epochs", "0"], "--epochs is out of range"),
        (["--model", "kw_resnet18", "--model-kwargs", "width"], "key=value"),
        (["--model", "kw_resnet18", "--model-kwargs", "no_such_option=3"], "rejects its options"),
        (["--model", "kw_resnet18", "--recipe", "imagenet-ish"], "unknown recipe"),
        (["--budget", "1"], "--model is required"),
    ],
)
def test_bad_training_input_gives_one_line(argv, message, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, out, err = run_kw(capsys, *TRAIN, "--output", str(tmp_path / "out"), *argv)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("kw train: error:") and message in err
    assert "Traceback" not in err + out
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["corrupt", "foreign", "text", "missing"])
def test_bad_checkpoints_are_refused(kind, tmp_path, capsys):
    path = tmp_path / "ckpt.pt"
    if kind == "corrupt":
        _corrupt(path)
    elif kind == "foreign":
        _foreign(path)
    elif kind == "text":
        path.write_text("hello")
    before = digest(tmp_path)
    for argv in (
        ["train", "--resume", str(path)],
        ["eval", "--checkpoint", str(path)],
        ["inspect", "--checkpoint", str(path), "--output", str(tmp_path / "i")],
    ):
        code, out, err = run_kw(capsys, *argv)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert ("does not exist" if kind == "missing" else "checkpoint") in err
    assert digest(tmp_path) == before


@pytest.mark.parametrize(
    "change, named",
    [
        (["--budget", "4"], "budget: '1/2' -> '4'"),
        (["--model", "kw_mobilenetv2_050"], "model: 'kw_resnet18' -> 'kw_mobilenetv2_050'"),
        (["--data", "{cifar}"], "data: 'digits'"),
        (["--model-kwargs", "stem_width=8"], "model_kwargs"),
    ],
)
def test_resume_with_a_changed_run_is_refused_and_damages_nothing(trained, change, named, tmp_path, capsys):
    from test_data import write_cifar

    cifar = write_cifar(tmp_path / "cifar")
    run = trained / "kw"
    before = digest(run)
    argv = [a.replace("{cifar}", str(cifar)) for a in change]
    code, out, err = run_kw(capsys, "train", "--resume", str(run / "last.pt"), *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1 and named in err and "differs" in err
    assert digest(run) == before


def test_a_new_run_does_not_overwrite_an_old_one(trained, capsys):
    run = trained / "kw"
    before = digest(run)
    code, _, err = run_kw(capsys, *TRAIN, "--model", "kw_resnet18", "--output", str(run))
    assert code == 2 and "already holds a run" in err and len(err.strip().splitlines()) == 1
    assert digest(run) == before


def test_eval_refuses_data_of_another_shape(trained, tmp_path, capsys):
    from test_data import write_cifar

    cifar = write_cifar(tmp_path / "cifar", num_classes=100)
    code, _, err = run_kw(
        capsys, "eval", "--checkpoint", str(trained / "kw" / "last.pt"), "--data", str(cifar)
    )
    assert code == 2 and "100 classes" in err and len(err.strip().splitlines()) == 1


def test_demo_compare_adds_the_baselines_on_the_same_recipe(capsys, tmp_path):
    out_dir = tmp_path / "compare"
    code, out, err = run_kw(
        capsys,
        "demo",
        "--output",
        str(out_dir),
        "--runs",
        "resnet18",
        "--compare",
        "--width",
        "4",
        "--epochs",
        "1",
        "--limit-train",
        "64",
        "--limit-val",
        "32",
        "--batch-size",
        "16",
        "--temp-epochs",
        "2",
    )
    assert code == 0, err
    results = json.loads((out_dir / "results.json").read_text())
    assert [r["model"] for r in results["runs"]] == [
        "resnet18",
        "condconv_resnet18",
        "dyconv_resnet18",
        "odconv_resnet18",
    ]
    assert [r["budget"] for r in results["runs"]] == ["static", "K=4", "K=4", "K=4"]
    assert len({(c["lr"], c["epochs"], c["seed"], c["batch_size"]) for c in results["configs"]}) == 1
    for name in ("condconv_resnet18", "dyconv_resnet18", "odconv_resnet18"):
        checkpoint = load_checkpoint(out_dir / name / "last.pt")
        assert checkpoint["step"] == 4 and checkpoint["config"]["model"] == name


def test_baseline_temperature_is_annealed_by_the_trainer(tmp_path):
    from kernelwarehouse.baselines.temperature import baseline_temperature
    from kernelwarehouse.train import TrainConfig, Trainer

    config = TrainConfig(
        model="odconv_resnet18",
        data="digits",
        epochs=1,
        batch_size=16,
        limit_train=64,
        limit_val=32,
        temp_epochs=2,
        output=str(tmp_path / "od"),
        model_kwargs={"channels": (4, 8, 16, 32), "stem_width": 4},
    )
    trainer = Trainer(config)
    trainer.fit()
    layer = trainer.model.layer1[0].conv1
    assert layer.temperature == pytest.approx(baseline_temperature(3, 8)) and 1 < layer.temperature < 30


def test_an_unreadable_image_is_named_and_the_last_checkpoint_kept(tmp_path, capsys):
    from test_data import write_image_folder

    root = write_image_folder(tmp_path / "images", per_class=4)
    args = [
        "--model",
        "resnet18",
        "--data",
        str(root),
        "--image-size",
        "16",
        "--batch-size",
        "4",
        "--model-kwargs",
        "channels=(4,8,16,32)",
        "stem_width=4",
        "--device",
        "cpu",
    ]
    code, _, err = run_kw(capsys, "train", *args, "--epochs", "1", "--output", str(tmp_path / "run"))
    assert code == 0, err
    before = digest(tmp_path / "run")
    broken = sorted((root / "train" / "dog").iterdir())[1]
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    code, _, err = run_kw(capsys, "train", "--resume", str(tmp_path / "run"), "--epochs", "2")
    assert code == 2 and str(broken) in err and "--skip-unreadable" in err and err.count("\n") == 1
    assert digest(tmp_path / "run")["last.pt"] == before["last.pt"]
    # opted in: the run goes on without it and counts it
    code, out, err = run_kw(
        capsys, "train", *args, "--epochs", "1", "--skip-unreadable", "--output", str(tmp_path / "skipping")
    )
    assert code == 0, err
    assert "unreadable images skipped: 1 train, 0 val" in out
    metrics = json.loads((tmp_path / "skipping" / "metrics.json").read_text())
    assert metrics[-1]["train_unreadable"] == 1 and metrics[-1]["val_unreadable"] == 0


def test_progress_lines_when_the_output_is_not_a_terminal(tmp_path, capsys, monkeypatch):
    from kernelwarehouse.train import progress

    monkeypatch.setattr(progress, "PROGRESS_LINE_SECONDS", 0.0)
    code, out, err = run_kw(
        capsys,
        *TRAIN,
        "--model",
        "kw_resnet18",
        "--budget",
        "1/2",
        "--epochs",
        "1",
        "--output",
        str(tmp_path / "run"),
    )
    assert code == 0, err
    lines = [line for line in out.splitlines() if " step " in line]
    assert lines and lines[0].startswith("epoch 1/1  step 1/6  ")
    for word in ("img/s", "loss", "lr", "tau", "epoch ends in"):
        assert word in lines[0]


def test_demo_baselines_anneal_their_temperature_over_the_whole_run():
    from kernelwarehouse.cli import build_parser
    from kernelwarehouse.cli.demo import demo_configs

    configs = {
        c.model: c for c in demo_configs(build_parser().parse_args(["demo", "--compare", "--epochs", "6"]))
    }
    assert (
        configs["odconv_resnet18"].baseline_temp_epochs == 6
        and configs["dyconv_resnet18"].baseline_temp_epochs == 6
    )
    assert configs["kw_resnet18"].baseline_temp_epochs is None and configs["kw_resnet18"].temp_epochs == 2
    chosen = demo_configs(build_parser().parse_args(["demo", "--compare", "--baseline-temp-epochs", "1"]))
    assert {c.baseline_temp_epochs for c in chosen if c.model.startswith("odconv")} == {1}
