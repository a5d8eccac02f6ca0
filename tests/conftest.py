"""Fixtures shared by the whole suite."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Real text fixtures live beside the project root (read-only, also in CI); never copied into the project.
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data`, or skip the test with the reason when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real-data fixtures not found at {SHARED_DATA} (the ../shared folder beside the project)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """Where tests keep evidence worth looking at afterwards (screenshots, plots); gitignored."""
    path = PROJECT_ROOT / "test-artifacts"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread() -> None:
    """Tiny test models gain nothing from intra-op threads, and on a busy 2-core machine two threads make each
    generated token wait for the other core (measured: tiny generate() 8 s with 2 threads vs 0.2 s with 1)."""
    torch.set_num_threads(1)
