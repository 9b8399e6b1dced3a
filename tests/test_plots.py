"""The demo's plots: one colour per run in every panel."""

import pytest

from kernelwarehouse.train.plots import plot_accuracy, plot_loss, plot_temperature

pytest.importorskip("matplotlib")


def test_every_panel_gives_a_run_the_same_colour():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = [{"epoch": e, "val_top1": 50.0 + e, "train_loss": 1.0 / e, "val_loss": 1.2 / e} for e in (1, 2)]
    runs = {
        "resnet18": {"history": history, "steps": [{"epoch": 1, "tau": None}]},
        "kw_resnet18 1x": {"history": history, "steps": [{"epoch": 1, "tau": 1.0}, {"epoch": 2, "tau": 0.0}]},
        "kw_resnet18 4x": {"history": history, "steps": [{"epoch": 1, "tau": 1.0}, {"epoch": 2, "tau": 0.0}]},
    }
    colours = {}
    for draw in (plot_accuracy, plot_loss, plot_temperature):
        fig, ax = plt.subplots()
        draw(ax, runs)
        for line in ax.lines:
            label = line.get_label().removesuffix(" train").removesuffix(" val")
            colours.setdefault(label, set()).add(line.get_color())
        plt.close(fig)
    assert set(colours) == set(runs)
    assert all(len(c) == 1 for c in colours.values()), colours
    assert len({next(iter(c)) for c in colours.values()}) == 3
