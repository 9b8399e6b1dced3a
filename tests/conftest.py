import os
import pathlib

import pytest
import torch

torch.set_num_threads(int(os.environ.get("KW_TEST_THREADS", "1")))

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
