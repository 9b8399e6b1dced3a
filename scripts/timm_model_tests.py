"""Run timm's own model test suite (``tests/test_models.py`` of pytorch-image-models) on the zoo.

    python scripts/timm_model_tests.py PATH/TO/pytorch-image-models [--budgets] [pytest options]

The upstream test file is copied into a temporary folder beside a conftest that imports
kernelwarehouse (which registers every ``kw_*`` model with timm) and, with ``--budgets``, registers
each paper budget as a model of its own (``kw_resnet18_b1d4`` is ``kw_resnet18`` at budget 1/4),
so that every test that timm parametrizes over model names runs on them. Only the ``kw_*``
cases are selected, the TorchScript ones included (``torch.jit.script`` compiles the zoo). timm routes its
ViTs to its test for non-standard models by name, so the DeiTs are also registered as
``deit_kw_tiny`` / ``deit_kw_small`` and take that test in place of the standard one. Nothing is
downloaded: the tests build models without weights.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CONFTEST = """
import fnmatch

import timm
from timm.models import get_pretrained_cfg, register_model

import kernelwarehouse as kw
from kernelwarehouse.models import format_budget, model_entry

BUDGETS = {budgets}
# timm checks its ViTs (names ``deit*``, ``vit_*``, ...) with its test for non-standard models, whose
# features are tokens; the zoo's DeiTs take that test under names it recognises
VIT_ALIASES = {{"kw_deit_tiny": "deit_kw_tiny", "kw_deit_small": "deit_kw_small"}}
default_cfgs = {{}}


def _register(base, name, **options):
    def create(pretrained=False, **kwargs):
        return timm.create_model(base, pretrained=pretrained, **options, **kwargs)
    create.__name__ = create.__qualname__ = name
    cfg = get_pretrained_cfg(base).to_dict()
    default_cfgs[name] = {{k: v for k, v in cfg.items() if k not in ("architecture", "tag")}}
    register_model(create)


for base, alias in VIT_ALIASES.items():
    _register(base, alias)
if BUDGETS:
    for name in kw.list_models():
        entry = model_entry(name)
        if entry.kind != "kw":
            continue
        for budget in entry.budgets:
            suffix = format_budget(budget).replace("/", "d").rstrip("x")
            _register(name, f"{{name}}_b{{suffix}}", budget=budget)


def pytest_collection_modifyitems(config, items):
    standard_vit = [item for item in items if item.originalname == "test_model_default_cfgs"
                    and any(fnmatch.fnmatch(item.name, f"*-{{vit}}*]") for vit in VIT_ALIASES)]
    if standard_vit:
        config.hook.pytest_deselected(items=standard_vit)
        items[:] = [item for item in items if item not in standard_vit]
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("timm_repo", type=Path, help="a checkout of pytorch-image-models")
    parser.add_argument("--budgets", action="store_true", help="also every paper budget of every model")
    args, pytest_args = parser.parse_known_args(argv)
    source = args.timm_repo / "tests" / "test_models.py"
    if not source.is_file():
        parser.error(f"{source} not found: give the root of a pytorch-image-models checkout")
    with tempfile.TemporaryDirectory(prefix="kw-timm-tests-") as folder:
        shutil.copy(source, Path(folder) / "test_models.py")
        (Path(folder) / "conftest.py").write_text(CONFTEST.format(budgets=bool(args.budgets)))
        command = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            folder,
            "-o",
            "addopts=",
            "-W",
            "ignore::pytest.PytestUnknownMarkWarning",
            "-k",
            "kw_",
            str(Path(folder) / "test_models.py"),
            *pytest_args,
        ]
        # the fixed rule picks paths: one-off test shapes are not worth timing
        env = {"KERNELWAREHOUSE_PATH_CHOICE": "rule", **os.environ}
        return subprocess.call(command, cwd=folder, env=env)


if __name__ == "__main__":
    sys.exit(main())
