"""Test-wide settings: no network (hub offline, wandb offline), quiet progress bars."""

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
sys.path.insert(0, str(Path(__file__).parent))  # tests/fakes.py


import pytest


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory):
    """A mutualkd run directory holding a one-peer cifar_resnet14 trained 2 epochs on digits (~2 s)."""
    from teaching import train_teacher

    return train_teacher(tmp_path_factory.mktemp("teacher") / "run")
