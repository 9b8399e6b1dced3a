import os
import pathlib

import pytest
import torch

# The suite runs the fixed rule (no clock decides a path); tests of the measured choice switch it on
# with fake timings (tests/test_choice.py). No test writes the user's path cache.
os.environ.setdefault("KERNELWAREHOUSE_PATH_CHOICE", "rule")
os.environ.setdefault("KERNELWAREHOUSE_PATH_CACHE", "0")

torch.set_num_threads(int(os.environ.get("KW_TEST_THREADS", "1")))

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
