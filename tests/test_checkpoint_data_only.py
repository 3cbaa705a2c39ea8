"""A checkpoint is data: crafted checkpoints cannot run code, read outside their directory, or load
unverified bytes -- even when the attacker recomputes every hash in the config.

Each case starts from a real tiny checkpoint written by ``save_compressed`` and changes one thing.
Code planted in the checkpoint writes a marker file when imported; the tests assert the marker
never appears. Reads outside the checkpoint are shown impossible by putting usable files only
outside it (the load must then fail) and by link targets outside it (refused).
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import toy_adapter  # noqa: F401  (registers the "toy" adapter family)
from toy_adapter import ToyAdapter
from vlmpress.errors import CheckpointError
from vlmpress.pipeline.checkpoint import file_sha256, load_compressed, save_compressed
from vlmpress.pipeline.compress import compress
from vlmpress.pipeline.config import CompressionConfig

pytestmark = pytest.mark.usefixtures("one_thread")

EVIL_MODULE = """
import pathlib
pathlib.Path({marker!r}).write_text("code from the checkpoint ran")
class EvilTokenizer:  # pragma: no cover - must never be imported
    pass
"""


def _save(adapter, out: Path) -> Path:
    report = compress(adapter, CompressionConfig(method="svd", ratio=0.5, device="cpu"))
    return save_compressed(adapter, out, report)


@pytest.fixture(scope="module")
def toy_ckpt(tmp_path_factory) -> Path:
    return _save(ToyAdapter.load("toy:7"), tmp_path_factory.mktemp("toy") / "ckpt")


@pytest.fixture(scope="module")
def clip_ckpt(tmp_path_factory) -> Path:
    from vlmpress.testing import tiny_hf_clip

    root = tmp_path_factory.mktemp("hfclip")
    return _save(tiny_hf_clip(root / "model"), root / "ckpt")


@pytest.fixture(scope="module")
def open_clip_ckpt(tmp_path_factory) -> Path:
    from vlmpress.testing import tiny_open_clip

    return _save(tiny_open_clip(), tmp_path_factory.mktemp("oc") / "ckpt")


def _copy(base: Path, tmp_path: Path, name: str = "crafted") -> Path:
    dst = tmp_path / name
    shutil.copytree(base, dst, symlinks=True)
    return dst


def _config(d: Path) -> dict:
    return json.loads((d / "vlmpress_config.json").read_text())


def _write_config(d: Path, cfg: dict, *, rehash: bool = True) -> None:
    """Write the config back; ``rehash`` recomputes every listed file's hash (the attacker's move)."""
    if rehash:
        cfg["file_sha256"] = {name: file_sha256(d / name) for name in cfg["file_sha256"] if (d / name).exists()}
    (d / "vlmpress_config.json").write_text(json.dumps(cfg))


def _refused(base: Path, tmp_path: Path, edit, match: str) -> None:
    """Copy ``base``, ``edit`` its config, recompute every hash (the attacker's move): loading is refused."""
    d = _copy(base, tmp_path)
    cfg = _config(d)
    edit(cfg)
    _write_config(d, cfg)
    with pytest.raises(CheckpointError, match=match):
        load_compressed(d)


def _list(d: Path, cfg: dict, *names: str) -> None:
    for name in names:
        cfg["file_sha256"][name] = file_sha256(d / name)


# ------------------------------------------------------------------------------------------ no code
@pytest.mark.parametrize("where", ["spec_config.config", "spec_config.config.text_config", "recipe", "top"])
def test_trust_remote_code_is_refused_at_any_depth(clip_ckpt, tmp_path, where):
    d = _copy(clip_ckpt, tmp_path)
    cfg = _config(d)
    target = {"spec_config.config": cfg["spec_config"]["config"], "top": cfg, "recipe": cfg["recipe"],
              "spec_config.config.text_config": cfg["spec_config"]["config"]["text_config"]}[where]
    target["trust_remote_code"] = True
    _write_config(d, cfg)
    with pytest.raises(CheckpointError, match="trust_remote_code.*data only"):
        load_compressed(d)


def test_auto_map_in_a_tokenizer_file_never_imports_planted_code(clip_ckpt, tmp_path):
    d = _copy(clip_ckpt, tmp_path)
    marker = tmp_path / "MARKER"
    (d / "evil_tok.py").write_text(EVIL_MODULE.format(marker=str(marker)))
    tok = json.loads((d / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": ["evil_tok.EvilTokenizer", None]}
    tok["tokenizer_class"] = "EvilTokenizer"
    (d / "tokenizer_config.json").write_text(json.dumps(tok))
    cfg = _config(d)
    _write_config(d, cfg)  # hashes match the crafted files
    with pytest.raises(CheckpointError, match="auto_map"):
        load_compressed(d)
    assert not marker.exists()
    # listing the module itself is refused too, whatever its hash
    cfg = _config(d)
    _list(d, cfg, "evil_tok.py")
    _write_config(d, cfg, rehash=False)
    with pytest.raises(CheckpointError, match="code or pickle file"):
        load_compressed(d)
    assert not marker.exists()


def test_auto_map_in_the_model_config_is_refused(clip_ckpt, tmp_path):
    _refused(clip_ckpt, tmp_path, lambda c: c["spec_config"]["config"].__setitem__("auto_map", {"AutoModel": "evil.Model"}), "auto_map")


def test_hub_attention_kernels_are_refused(clip_ckpt, tmp_path):
    _refused(clip_ckpt, tmp_path, lambda c: c["spec_config"]["config"].__setitem__("_attn_implementation", "kernels-community/flash-attn"),
             "not a built-in attention implementation")


@pytest.mark.parametrize("options, expect", [
    ({"trust_remote_code": True}, "trust_remote_code"),
    ({"bpe_path": "/etc/passwd"}, "has the option 'bpe_path'"),
    ({"clean": "nonsense"}, "is not accepted"),
])
def test_open_clip_tokenizer_options_are_allow_listed(open_clip_ckpt, tmp_path, options, expect):
    _refused(open_clip_ckpt, tmp_path, lambda c: c["spec_config"]["model_cfg"]["text_cfg"].__setitem__("tokenizer_kwargs", options), expect)


@pytest.mark.parametrize("edit, expect", [
    (lambda c: c["spec_config"].__setitem__("loader", "evil"), "unknown key"),
    (lambda c: c["spec_config"]["model_cfg"]["vision_cfg"].__setitem__("timm_model_pretrained", True), "never downloads"),
    (lambda c: c["spec_config"]["model_cfg"]["vision_cfg"].__setitem__("timm_model_name", "hf-hub:org/evil"), "plain timm model name"),
    (lambda c: c["spec_config"]["model_cfg"].__setitem__("pretrained_path", "/x"), "unknown key"),
])
def test_open_clip_spec_config_is_allow_listed(open_clip_ckpt, tmp_path, edit, expect):
    _refused(open_clip_ckpt, tmp_path, edit, expect)


def test_open_clip_hf_tokenizer_name_is_never_read(open_clip_ckpt, tmp_path):
    """A config naming a transformers tokenizer elsewhere (here: a usable one) fails instead of reading it."""
    from vlmpress.testing.factories import tiny_clip_tokenizer

    outside = tmp_path / "outside-tokenizer"
    tiny_clip_tokenizer().save_pretrained(outside)
    _refused(open_clip_ckpt, tmp_path, lambda c: c["spec_config"]["model_cfg"]["text_cfg"].__setitem__("hf_tokenizer_name", str(outside)),
             "holds no tokenizer/ files")


# ------------------------------------------------------------------------------------------ nothing outside
def test_missing_tokenizer_files_fail_instead_of_reading_the_saved_name(clip_ckpt, tmp_path):
    """The HF CLIP config names a directory holding a usable tokenizer: loading still fails."""
    d = _copy(clip_ckpt, tmp_path)
    cfg = _config(d)
    assert Path(cfg["spec_config"]["name"]).is_dir()  # the original model, tokenizer included
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (d / name).unlink()
        cfg["file_sha256"].pop(name)
    _write_config(d, cfg, rehash=False)
    with pytest.raises(CheckpointError, match="tokenizer/image processor files are missing or unreadable"):
        load_compressed(d)


def test_unlisted_files_are_never_read(clip_ckpt, tmp_path):
    """A file in the directory but not in the hash list is invisible to the loaders (here: one that
    would break the tokenizer if it were read)."""
    d = _copy(clip_ckpt, tmp_path)
    (d / "added_tokens.json").write_text("{ this is not json")
    (d / "special_tokens_map.json").write_text('{"bos_token": 12345}')
    adapter = load_compressed(d)
    assert adapter.tokenize(["a cat"])["input_ids"].shape[0] == 1


def test_symlink_leaving_the_checkpoint_is_refused(clip_ckpt, tmp_path):
    d = _copy(clip_ckpt, tmp_path)
    outside = tmp_path / "outside.json"
    shutil.copy(d / "tokenizer.json", outside)
    (d / "tokenizer.json").unlink()
    (d / "tokenizer.json").symlink_to(outside)  # same bytes, so the recorded hash still matches
    with pytest.raises(CheckpointError, match="outside the checkpoint"):
        load_compressed(d)


def test_symlinked_checkpoint_directory_and_inner_links_load(toy_ckpt, tmp_path):
    d = _copy(toy_ckpt, tmp_path)
    (d / "report-link.json").symlink_to(d / "compression_report.json")  # inside: harmless
    link = tmp_path / "link-to-ckpt"
    link.symlink_to(d)
    assert isinstance(load_compressed(link), ToyAdapter)


@pytest.mark.parametrize("name", ["../outside.json", "/etc/passwd", "sub/../../x.json", ".hidden.json"])
def test_hash_list_paths_stay_inside(toy_ckpt, tmp_path, name):
    d = _copy(toy_ckpt, tmp_path)
    cfg = _config(d)
    cfg["file_sha256"][name] = "0" * 64
    _write_config(d, cfg, rehash=False)
    with pytest.raises(CheckpointError, match="invalid entry"):
        load_compressed(d)


# ------------------------------------------------------------------------------------------ hashes mandatory
def _flip(d: Path) -> None:
    data = bytearray((d / "model.safetensors").read_bytes())
    data[-5] ^= 0x01
    (d / "model.safetensors").write_bytes(bytes(data))


def test_hash_list_is_mandatory(toy_ckpt, tmp_path):
    d = _copy(toy_ckpt, tmp_path)
    _flip(d)
    cfg = _config(d)
    del cfg["file_sha256"]
    _write_config(d, cfg, rehash=False)
    with pytest.raises(CheckpointError, match="'file_sha256' entry is missing"):
        load_compressed(d)


def test_weights_entry_is_mandatory(toy_ckpt, tmp_path):
    d = _copy(toy_ckpt, tmp_path)
    _flip(d)
    cfg = _config(d)
    cfg["file_sha256"] = {"compression_report.json": file_sha256(d / "compression_report.json")}
    _write_config(d, cfg, rehash=False)
    with pytest.raises(CheckpointError, match="no entry for model.safetensors"):
        load_compressed(d)


def test_layer_shapes_are_mandatory(toy_ckpt, tmp_path):
    d = _copy(toy_ckpt, tmp_path)
    cfg = _config(d)
    cfg["layer_shapes"].pop(next(iter(cfg["ranks"])))
    _write_config(d, cfg)
    with pytest.raises(CheckpointError, match="no entry in 'layer_shapes'"):
        load_compressed(d)


def test_format_1_lists_top_level_files_only(toy_ckpt, tmp_path):
    d = _copy(toy_ckpt, tmp_path)
    (d / "sub").mkdir()
    (d / "sub" / "x.json").write_text("{}")
    cfg = _config(d)
    cfg["format_version"] = 1
    _list(d, cfg, "sub/x.json")
    _write_config(d, cfg, rehash=False)
    with pytest.raises(CheckpointError, match="format 1 lists top-level files only"):
        load_compressed(d)


def test_save_hashes_every_file_the_loader_can_read(open_clip_ckpt, clip_ckpt):
    for d in (open_clip_ckpt, clip_ckpt):
        cfg = _config(d)
        on_disk = {p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()}
        unlisted = on_disk - set(cfg["file_sha256"])
        assert unlisted <= {"vlmpress_config.json", "compression_report.json", "compression_report.md",
                            "compression_report.csv"}, unlisted
        assert cfg["format_version"] == 2


# ------------------------------------------------------------------------------------------ tensors and duplicates
@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.int64])
def test_integer_tensor_in_place_of_a_factor_is_refused(toy_ckpt, tmp_path, dtype):
    d = _copy(toy_ckpt, tmp_path)
    state = load_file(str(d / "model.safetensors"))
    key = next(k for k in state if k.endswith(".A"))
    state[key] = torch.ones_like(state[key]).to(dtype)
    save_file(state, str(d / "model.safetensors"))
    _write_config(d, _config(d))
    with pytest.raises(CheckpointError, match=f"tensor '{key}' is {str(dtype)[6:]}.*holds float32"):
        load_compressed(d)


def test_factor_with_the_wrong_rank_is_refused(toy_ckpt, tmp_path):
    d = _copy(toy_ckpt, tmp_path)
    state = load_file(str(d / "model.safetensors"))
    key = next(k for k in state if k.endswith(".A"))
    state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] + 1)
    save_file(state, str(d / "model.safetensors"))
    _write_config(d, _config(d))
    with pytest.raises(CheckpointError, match="has shape"):
        load_compressed(d)


def _with_duplicate_header_key(path: Path) -> None:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = data[8:8 + n].decode().rstrip()
    first = json.loads(header)
    key = next(k for k in first if k != "__metadata__")
    entry = json.dumps({key: first[key]})[1:-1]
    new_header = header[:-1] + "," + entry + "}"
    new_header += " " * ((8 - len(new_header) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(new_header)) + new_header.encode() + data[8 + n:])


def test_duplicate_safetensors_header_key_is_refused(toy_ckpt, tmp_path):
    d = _copy(toy_ckpt, tmp_path)
    _with_duplicate_header_key(d / "model.safetensors")
    _write_config(d, _config(d))
    with pytest.raises(CheckpointError, match="appears twice"):
        load_compressed(d)


def test_duplicate_config_key_is_refused(toy_ckpt, tmp_path):
    d = _copy(toy_ckpt, tmp_path)
    text = (d / "vlmpress_config.json").read_text()
    (d / "vlmpress_config.json").write_text(text.replace('"family":', '"family": "other", "family":', 1))
    with pytest.raises(CheckpointError, match="'family' appears twice"):
        load_compressed(d)


def test_duplicate_key_in_a_listed_tokenizer_file_is_refused(clip_ckpt, tmp_path):
    d = _copy(clip_ckpt, tmp_path)
    text = (d / "tokenizer_config.json").read_text()
    (d / "tokenizer_config.json").write_text(text.replace("{", '{"model_max_length": 1, ', 1))
    _write_config(d, _config(d))
    with pytest.raises(CheckpointError, match="appears twice"):
        load_compressed(d)


@pytest.mark.parametrize("payload, expect", [
    ("[" * 5000 + "]" * 5000, "nested too deeply"),
    ('{"format_version": ' + "9" * 500 + "}", "digits"),
])
def test_hostile_json_is_one_error(toy_ckpt, tmp_path, payload, expect):
    d = _copy(toy_ckpt, tmp_path)
    (d / "vlmpress_config.json").write_text(payload)
    with pytest.raises(CheckpointError, match=expect):
        load_compressed(d)


def test_untouched_checkpoints_still_load(toy_ckpt, clip_ckpt, open_clip_ckpt):
    assert isinstance(load_compressed(toy_ckpt), ToyAdapter)
    clip = load_compressed(clip_ckpt)
    assert clip.tokenize(["a dog"])["input_ids"].shape[0] == 1
    oc = load_compressed(open_clip_ckpt)
    assert oc.tokenize(["a dog"]).shape[0] == 1
