"""Adapters from installed packages: entry-point discovery, --adapter, precedence, stock CLI round trip."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

PLUGIN = '''
"""A third-party adapter: open_clip models under its own spec prefix ``myclip:NAME``."""
from vlmpress.adapters.open_clip import OpenClipAdapter


class MyClipAdapter(OpenClipAdapter):
    family = "myclip"
    priority = 0

    @classmethod
    def accepts(cls, spec):
        return isinstance(spec, str) and spec.startswith("myclip:")

    @classmethod
    def load(cls, spec, *, device="cpu", **kwargs):
        inner = OpenClipAdapter.load("open_clip:" + spec.split(":", 1)[1], device=device, **kwargs)
        return cls(inner.model, spec, model_name=inner.model_name, pretrained=None, preprocess=inner.preprocess,
                   tokenizer=inner.tokenizer, model_cfg=inner.model_cfg)
'''


def install_plugin(site: Path, dist: str = "myclip_plugin") -> Path:
    """A package plus a real ``*.dist-info`` (METADATA + entry_points.txt), as pip would install it."""
    pkg = site / "myclip_plugin"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "adapter.py").write_text(textwrap.dedent(PLUGIN))
    info = site / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[vlmpress.adapters]\nmyclip = myclip_plugin.adapter:MyClipAdapter\n")
    return site


def pip_install_plugin(tmp_path: Path) -> Path:
    """Build the plugin as a real package (pyproject with an entry point) and ``pip install`` it into a
    private ``--target`` directory: exactly what a user's ``pip install`` writes, without touching
    the test environment."""
    src = tmp_path / "plugin-src"
    (src / "myclip_plugin").mkdir(parents=True)
    (src / "myclip_plugin" / "__init__.py").write_text("")
    (src / "myclip_plugin" / "adapter.py").write_text(textwrap.dedent(PLUGIN))
    (src / "pyproject.toml").write_text(textwrap.dedent('''
        [build-system]
        requires = ["setuptools>=61"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "myclip_plugin"
        version = "0.1"

        [project.entry-points."vlmpress.adapters"]
        myclip = "myclip_plugin.adapter:MyClipAdapter"

        [tool.setuptools]
        packages = ["myclip_plugin"]
    '''))
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
         "--no-build-isolation", "--no-index", "--target", str(site), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    if done.returncode != 0:  # e.g. no setuptools in this environment to build with
        pytest.skip(f"pip could not build the plugin package: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    assert list(site.glob("myclip_plugin-0.1.dist-info/entry_points.txt")), "pip wrote no entry points"
    return site


def run_cli(args: list[str], site: Path | None) -> subprocess.CompletedProcess:
    paths = [str(ROOT)] + ([str(site)] if site else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "vlmpress", *args], env=env, capture_output=True, text=True, timeout=300)


def test_plugin_through_the_stock_cli(tmp_path):
    site = pip_install_plugin(tmp_path)
    images = tmp_path / "images"
    for c, cls in enumerate(("cat", "dog")):
        (images / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (12, 10), (90 * c, 30 * i, 60)).save(images / cls / f"{i}.png")
    ckpt = tmp_path / "ckpt"
    done = run_cli(["compress", "--model", "myclip:vlmpress-tiny", "--method", "svd", "--ratio", "0.4",
                    "--calib-images", str(images), "--out", str(ckpt), "-q"], site)
    assert done.returncode == 0, done.stderr
    config = json.loads((ckpt / "vlmpress_config.json").read_text())
    assert config["family"] == "myclip" and config["adapter_origin"] == "plugin:myclip_plugin"
    out = tmp_path / "results"
    done = run_cli(["eval", "--model", str(ckpt), "--datasets", f"imagefolder:{images}", "--num-workers", "0",
                    "--out", str(out), "--no-progress", "-q"], site)
    assert done.returncode == 0, done.stderr
    record = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    assert record["compression"] is not None
    # without the package the checkpoint names what is missing, and nothing is imported from it
    done = run_cli(["eval", "--model", str(ckpt), "--datasets", f"imagefolder:{images}", "--num-workers", "0",
                    "--out", str(out), "--no-progress", "-q"], None)
    assert done.returncode == 2
    assert "adapter family 'myclip'" in done.stderr and "myclip_plugin" in done.stderr
    assert "vlmpress.adapters" in done.stderr


def test_precedence_and_explicit_choice(tmp_path, monkeypatch):
    from vlmpress.adapters import registry as adapters
    from vlmpress.adapters import adapter_for_spec, use_adapter
    from vlmpress.adapters.open_clip import OpenClipAdapter
    from vlmpress.errors import UnknownModelSpecError

    site = install_plugin(tmp_path / "site")
    monkeypatch.syspath_prepend(str(site))
    spec = "myclip:vlmpress-tiny"
    cls = adapter_for_spec(spec)
    assert cls.family == "myclip" and adapters.adapter_origin("myclip") == "plugin:myclip_plugin"

    class Shadow(OpenClipAdapter):  # a plugin-tier adapter claiming open_clip specs too
        family = "shadow"
        priority = 0

    monkeypatch.setitem(adapters._REGISTRY, "shadow", Shadow)
    monkeypatch.setitem(adapters._ORIGIN, "shadow", "plugin:shadow")
    assert adapter_for_spec("open_clip:vlmpress-tiny") is Shadow  # plugin before built-in
    with use_adapter("open_clip"):
        assert adapter_for_spec("open_clip:vlmpress-tiny") is OpenClipAdapter  # explicit wins
    monkeypatch.setattr(OpenClipAdapter, "priority", 10, raising=False)
    assert adapter_for_spec("open_clip:vlmpress-tiny") is OpenClipAdapter  # declared priority wins
    with pytest.raises(UnknownModelSpecError, match="does not accept"):
        adapter_for_spec(spec, adapter="open_clip")
    with pytest.raises(UnknownModelSpecError, match="entry point 'nope' in the group 'vlmpress.adapters'"):
        adapters.get_adapter_class("nope")
    with pytest.raises(UnknownModelSpecError):
        adapters.get_adapter_class("os.path:join")  # never imports a module path


def test_unsupported_hf_model_lists_what_is_supported(tmp_path):
    from transformers import BertConfig, BertModel

    from vlmpress.adapters import adapter_for_spec
    from vlmpress.errors import UnknownModelSpecError

    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path / "bert")
    with pytest.raises(UnknownModelSpecError) as err:
        adapter_for_spec(f"hf:{tmp_path / 'bert'}")
    text = str(err.value)
    assert "architecture 'bert'" in text and "altclip (hf_altclip)" in text and "llama" in text
    assert "vlmpress.adapters" in text


def test_causal_lm_adapter_refuses_configs_with_a_vision_part():
    from vlmpress.adapters.hf_causal_lm import has_vision_part

    assert has_vision_part({"model_type": "llava", "vision_config": {}, "text_config": {"model_type": "llama"}})
    assert has_vision_part({"model_type": "altclip", "vision_config": {"image_size": 224}})
    assert not has_vision_part({"model_type": "llama", "hidden_size": 8})


def test_cli_adapter_flag(tmp_path, capsys):
    from vlmpress.cli import main

    args = ["compress", "--model", "open_clip:vlmpress-tiny", "--method", "svd", "--ratio", "0.4", "--out", str(tmp_path / "o")]
    assert main([*args, "--adapter", "nope"]) == 2
    assert "unknown adapter family 'nope'" in capsys.readouterr().err
    assert main([*args, "--adapter", "hf_clip"]) == 2
    assert "adapter 'hf_clip' does not accept model spec 'open_clip:vlmpress-tiny'" in capsys.readouterr().err


def test_installed_plugin_passes_the_conformance_kit_in_a_fresh_process(tmp_path):
    """docs/adapters.md's kit example on the pip-installed plugin: the kit's fresh interpreter keeps
    the caller's import path (the plugin is importable only through PYTHONPATH here)."""
    site = pip_install_plugin(tmp_path)
    script = textwrap.dedent(f'''
        from myclip_plugin.adapter import MyClipAdapter
        from vlmpress.testing import check_adapter
        info = check_adapter(MyClipAdapter.load("myclip:vlmpress-tiny"), {str(tmp_path / "kit")!r}, fresh_process=True)
        assert info["family"] == "myclip" and set(info["targets"]) == {{"vision", "text"}}, info
    ''')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(site)]), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
