"""The code in README.md and docs/*.md runs, so the documentation cannot rot.

* Every ```python block runs, on tiny models and tiny data (one fresh interpreter per page, blocks
  in page order, in a temporary working directory holding ``images/`` and a ``data/`` root). The
  only edits are the substitutions in :data:`SUBSTITUTIONS` (pretrained model names and absolute
  paths that need downloads or a user's disk). A block preceded by
  ``<!-- doc-test: skip REASON -->`` is not run; the reason is required and skips are counted.
* Every ``vlmpress ...`` line in a ```bash block parses with the real CLI parser: sub-commands
  and flags in the documentation exist.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vlmpress.testing.process import fresh_process_env

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

#: what a documentation example names -> what the offline test runs instead
SUBSTITUTIONS = {
    '"open_clip:ViT-B-16/openai"': '"open_clip:vlmpress-tiny"',
    'root="/data"': 'root="data"',
    '"/tmp/kit"': '"kit"',
}

_BLOCK = re.compile(r"(?:<!--\s*doc-test:\s*skip(?P<reason>[^>]*)-->\s*\n)?```(?P<lang>\w+)\n(?P<code>.*?)```", re.S)

PRELUDE = textwrap.dedent(
    """
    import pathlib, torch
    from PIL import Image
    def _images(root, classes, per_class):
        for c in classes:
            d = pathlib.Path(root) / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                g = torch.Generator().manual_seed(hash((c, i)) % 2**31)
                arr = torch.randint(0, 256, (40, 40, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(arr).save(d / f"image_{i + 1:04d}.jpg")
    _images("images", ["cat", "dog", "bird"], 4)
    _images("data/caltech101/101_ObjectCategories", ["accordion", "airplanes", "anchor", "BACKGROUND_Google"], 4)
    """
)
MAKE_CHECKPOINT = textwrap.dedent(
    """
    import vlmpress as _v
    _a, _r = _v.compress_model("open_clip:vlmpress-tiny", method="svd", ratio=0.4, device="cpu")
    _v.save_compressed(_a, {path!r}, _r)
    """
)


def _blocks(page: Path, lang: str):
    for m in _BLOCK.finditer(page.read_text(encoding="utf-8")):
        if m.group("lang") == lang:
            yield m.group("code"), (m.group("reason") or "").strip() if m.group(0).startswith("<!--") else None


def _python_pages():
    return [p for p in PAGES if any(True for _ in _blocks(p, "python"))]


DRIVER = textwrap.dedent(
    """
    import json, os, sys, traceback
    results = {}
    for name, path in json.loads(sys.argv[1]).items():
        os.makedirs(name, exist_ok=True)
        os.chdir(name)
        try:
            code = compile(open(path, encoding="utf-8").read(), path, "exec")
            exec(code, {"__name__": "__main__"})
            results[name] = None
        except BaseException:
            results[name] = traceback.format_exc()[-3000:]
        os.chdir("..")
    print("DOC-RESULTS " + json.dumps(results))
    """
)


def _page_script(page: Path) -> tuple[str, int]:
    """The page's runnable examples as one script (prelude + substitutions) and its skip count."""
    parts, skipped = [PRELUDE], 0
    for code, skip in _blocks(page, "python"):
        if skip is not None:
            assert skip, f"{page.name}: a skipped example must say why (<!-- doc-test: skip REASON -->)"
            skipped += 1
            continue
        for old, new in SUBSTITUTIONS.items():
            code = code.replace(old, new)
        for ckpt in re.findall(r'load_model\("(out/[\w./-]+)"\)', code):  # an example that loads a user's checkpoint
            parts.append(MAKE_CHECKPOINT.format(path=ckpt))
        parts.append(code)
    return "\n".join(parts), skipped


@pytest.fixture(scope="module")
def example_runs(tmp_path_factory):
    """Every page's examples, run once in one fresh interpreter (each page in its own namespace and
    working directory): page name -> None or the traceback."""
    work = tmp_path_factory.mktemp("doc-examples")
    scripts = {}
    for page in _python_pages():
        name = page.relative_to(ROOT).as_posix().replace("/", "__")
        script, _ = _page_script(page)
        (work / f"{name}.py").write_text(script, encoding="utf-8")
        scripts[name] = str(work / f"{name}.py")
    done = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(scripts)], cwd=work, env=fresh_process_env(),
                          capture_output=True, text=True, timeout=900)
    lines = [line for line in done.stdout.splitlines() if line.startswith("DOC-RESULTS ")]
    assert lines, f"the example driver died:\n{done.stderr[-3000:]}"
    return json.loads(lines[-1][len("DOC-RESULTS "):])


@pytest.mark.parametrize("page", _python_pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_python_examples_run(page, example_runs):
    name = page.relative_to(ROOT).as_posix().replace("/", "__")
    assert example_runs[name] is None, f"{page.name} examples failed:\n{example_runs[name]}"
    _, skipped = _page_script(page)
    assert skipped <= 1, f"{page.name}: {skipped} examples skipped; run them instead"


def _cli_lines(page: Path):
    for code, _ in _blocks(page, "bash"):
        joined = re.sub(r"\\\n\s*", " ", code)
        for line in joined.splitlines():
            line = line.strip()
            for piece in re.split(r"&&|;", line):
                piece = piece.strip()
                if piece.startswith("vlmpress "):
                    yield piece


def test_cli_lines_in_docs_parse():
    from vlmpress.cli import build_parser

    parser = build_parser()
    lines = [(page.name, line) for page in PAGES for line in _cli_lines(page)]
    assert len(lines) >= 20  # README and docs are full of commands; an empty scan means a broken scan
    bad = []
    for name, line in lines:
        words = shlex.split(line, comments=True)[1:]
        try:
            parser.parse_args(words)
        except SystemExit as exc:
            if exc.code not in (0, None):
                bad.append(f"{name}: {line}")
    assert not bad, "documented commands that the CLI refuses:\n" + "\n".join(bad)
