"""Shared fixtures: the embedded tiny models are built once per session into a temporary directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def embedded_dir(tmp_path_factory) -> Path:
    """Point embedded:<name> models at a per-session folder (built on first use, seeded)."""
    path = Path(os.environ.get("WORKBENCH_TEST_EMBEDDED_DIR") or tmp_path_factory.mktemp("embedded"))
    os.environ["WORKBENCH_EMBEDDED_DIR"] = str(path)
    return path


REPO = Path(__file__).resolve().parents[1]
