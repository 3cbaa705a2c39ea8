import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/ helpers such as toy_adapter

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one torch thread avoids OpenMP oversubscription on shared CPUs (10-100x faster)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_terminal_summary(terminalreporter):
    """The fault campaigns' tallies (tests/tally.py), shown at the end of every run, even under -q."""
    import tally

    if tally.LINES:
        terminalreporter.section("vlmpress fault campaigns")
        for line in tally.LINES:
            terminalreporter.write_line(line)
