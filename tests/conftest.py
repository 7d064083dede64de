"""Shared test set-up: reference-package stand-ins and small helpers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).parent / "standins"))

torch.set_num_threads(max(1, torch.get_num_threads()))

# The fuzz suites (tests/test_fuzz_*.py) draw the same examples on every run, so that CI is
# repeatable; SEGANY_FUZZ_RANDOM=1 draws new ones each run, to search further by hand.
settings.register_profile("repeatable", derandomize=True, print_blob=True)
settings.register_profile("random", print_blob=True)
settings.load_profile("random" if os.environ.get("SEGANY_FUZZ_RANDOM") else "repeatable")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data set beside the repository (``../shared/data``)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real data not found at {SHARED_DATA}; clone next to shared/")
    return SHARED_DATA


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A MobileSAM-format checkpoint with random weights (architecture detected from it)."""
    from reference import build_mobile_sam, randomize_

    path = tmp_path_factory.mktemp("ckpt") / "mobile_sam_random.pt"
    torch.save(randomize_(build_mobile_sam(), seed=5).state_dict(), path)
    return path


@pytest.fixture(scope="session")
def unwritable_dir(tmp_path_factory) -> Path:
    """A folder in which no file can be created: a read-only one, or (as root, whom
    permissions do not stop) the kernel's read-only /sys."""
    import os

    if os.geteuid() != 0:
        folder = tmp_path_factory.mktemp("read-only")
        folder.chmod(0o500)
        return folder
    try:
        (Path("/sys") / ".segany-probe").touch()
    except OSError:
        return Path("/sys")
    pytest.skip("no unwritable folder available (running as root with a writable /sys)")
