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


def _cli_compress_and_eval(spec: str, images, tmp_dir, *, ratio: float = 0.3) -> list[dict]:
    """``vlmpress compress`` (SVD-LLM at ``ratio``) then ``vlmpress eval`` of base + compressed on an image
    folder, through the CLI; returns the two result records."""
    import json
    from pathlib import Path

    from vlmpress.cli import main

    out, results = Path(tmp_dir) / "ckpt", Path(tmp_dir) / "results"
    assert main([
        "compress", "--model", spec, "--method", "svd_llm", "--ratio", str(ratio), "--calib-images", str(images),
        "--device", "cpu", "--out", str(out),
    ]) == 0
    assert main([
        "eval", "--model", spec, str(out), "--datasets", f"imagefolder:{images}", "--out", str(results),
        "--device", "cpu", "--batch-size", "4", "--num-workers", "0", "--no-progress",
    ]) == 0
    return [json.loads(line) for line in (results / "results.jsonl").read_text().splitlines()]


@pytest.fixture()
def cli_compress_and_eval():
    """The CLI path of a generative VLM: compress, then eval base + compressed (returns the records)."""
    return _cli_compress_and_eval
