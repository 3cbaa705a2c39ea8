"""Property-based fuzzing of every file format vlmpress reads: "a clear one-line error or success;
never a traceback, never a file outside the checkpoint, never code from it".

Targets: the recipe schema (dicts), YAML recipe text, report JSONL, the safetensors header of a
checkpoint's weights, the checkpoint config (values replaced at random paths, including
``trust_remote_code`` and paths to a canary directory) and the sequential resume state. An audit
hook records every file opened while a crafted checkpoint loads; none may lie in the canary
directory the fuzzed values point at, and the code planted there must never run. Deterministic
(``derandomize``) and small: the module runs in well under 30 s. Its tally is printed at the end.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import sys
from pathlib import Path

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import tally  # noqa: E402
import toy_adapter  # noqa: E402,F401  (registers the "toy" adapter family)
from toy_adapter import ToyAdapter  # noqa: E402
from vlmpress.errors import VlmpressError  # noqa: E402
from vlmpress.evaluation.results import read_records  # noqa: E402
from vlmpress.pipeline.checkpoint import file_sha256, load_compressed, save_compressed  # noqa: E402
from vlmpress.pipeline.compress import compress  # noqa: E402
from vlmpress.pipeline.config import CompressionConfig  # noqa: E402
from vlmpress.pipeline.sequential_state import SequentialState  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TALLY: dict[str, dict[str, int]] = {}
ERRORS: dict[str, list[str]] = {}
def fuzz(examples: int) -> settings:
    """Deterministic (derandomized, no example database) and sized to keep the module short."""
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])


def _count(target: str, outcome: str) -> None:
    TALLY.setdefault(target, {"examples": 0, "success": 0, "one_line_error": 0, "traceback": 0, "outside": 0})
    TALLY[target]["examples"] += 1
    TALLY[target][outcome] += 1


def _outcome(target: str, fn) -> object:
    """Run ``fn``: success, or a VlmpressError whose message is one bounded line. Anything else (a
    traceback) is counted and fails the test."""
    try:
        result = fn()
    except VlmpressError as err:
        message = str(err)
        assert "\n" not in message and len(message) < 2000, f"{target}: not one clear line: {message[:300]!r}"
        _count(target, "one_line_error")
        ERRORS.setdefault(target, []).append(message[:150])
        return err
    except Exception:
        _count(target, "traceback")
        raise
    _count(target, "success")
    return result


@pytest.fixture(scope="module", autouse=True)
def fuzz_tally():
    yield
    total = {k: sum(t[k] for t in TALLY.values()) for k in ("examples", "success", "one_line_error", "traceback", "outside")}
    tally.LINES.append(
        f"Property-based fuzz suite: {total['examples']} examples, {total['success']} success, "
        f"{total['one_line_error']} exit-2 one-line errors, {total['traceback']} tracebacks, "
        f"{total['outside']} loads that opened a file outside the checkpoint"
    )
    tally.LINES.extend(f"  {name}: {t['examples']} examples, {t['success']} success, {t['one_line_error']} one-line errors"
                       for name, t in sorted(TALLY.items()))


# ------------------------------------------------------------------------------------------ strategies
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30), st.integers(min_value=-5, max_value=300),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["pgsvd", "svd", "auto", "cpu", "cuda:9", "float64", "sequential", "(", "hf:x", "../..", "1e10"]),
)
json_values = st.recursive(scalars, lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=8), kids, max_size=4)),
                           max_leaves=12)
FIELDS = sorted(CompressionConfig.__dataclass_fields__)
plausible = st.sampled_from([0.3, 0.5, 1, 2, 8, 64, 256, None, "auto", "cpu", "float32", "random", "whole", "shared", "compressed",
                             True, [], ["q$"], {"vision": 1.0, "text": 1.0}, 1e-4, 10**6, 10**7, -1, 0])
#: a valid recipe with 0-4 fields replaced by plausible or hostile values
recipes = st.one_of(
    st.dictionaries(st.sampled_from([f for f in FIELDS if f not in ("eps", "method", "ratio", "target_reduction")]), plausible, max_size=3),
    st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=6)), st.one_of(plausible, json_values), max_size=4),
).map(lambda d: {"eps": 0.5, **d})


@fuzz(150)
@given(recipes)
def test_fuzz_recipe_schema(data):
    _outcome("recipe schema", lambda: CompressionConfig.from_dict(data).replace(model=data.get("model") or "toy:0").validate())


yaml_texts = st.one_of(
    recipes.map(lambda d: yaml.safe_dump(d, allow_unicode=True).encode()),
    st.binary(max_size=200),
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=5).map(lambda d: json.dumps(d, default=str).encode()),
    st.lists(st.sampled_from(["a: &a [1,2]\n", "b: [*a,*a]\n", "eps: 0.5\n", "eps: .inf\n", "method: !!python/object:os.system ''\n",
                              "targets: [\n", "? [a]\n: 1\n", "seed: 0x10\n", "n_images: 1e3\n", "\t", "eps: 0.5\n"]),
             max_size=8).map(lambda parts: "".join(parts).encode()),
)


@fuzz(60)
@given(yaml_texts)
def test_fuzz_yaml_recipes(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("yaml") / "recipe.yaml"
    path.write_bytes(text)
    _outcome("YAML recipe", lambda: CompressionConfig.from_yaml(path).replace(model="toy:0").validate())


record = st.fixed_dictionaries(
    {"model": st.text(max_size=5), "dataset": st.text(max_size=5)},
    optional={"metrics": json_values, "n_images": json_values, "split": json_values, "method": json_values, "reduction": json_values,
              "top1_stderr": json_values, "label": json_values, "kind": st.sampled_from(["perplexity", "x"])},
)
jsonl_lines = st.lists(st.one_of(record.map(lambda r: json.dumps(r).encode()), st.binary(max_size=40),
                                 st.just(b"[" * 3000), st.just(b'{"model": 1, "model": 2}')), max_size=6)


@fuzz(60)
@given(jsonl_lines)
def test_fuzz_report_jsonl(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("res") / "results.jsonl"
    path.write_bytes(b"\n".join(lines))
    records = _outcome("report JSONL", lambda: read_records(path))
    if isinstance(records, list):
        for rec in records:  # what is read is never a silently wrong number
            assert all(isinstance(v, (int, float)) and math.isfinite(v) and 0 <= v <= 1
                       for k, v in rec.metrics.items() if k in ("top1", "top5", "mean_per_class_recall"))


# ------------------------------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A real toy checkpoint, a canary directory outside it (with a tokenizer and planted code) and an
    audit hook recording every opened path while ``world['watch']`` is set."""
    root = tmp_path_factory.mktemp("fuzz_ckpt")
    adapter = ToyAdapter.load("toy:9")
    report = compress(adapter, CompressionConfig(method="svd", ratio=0.5, device="cpu"))
    ckpt = save_compressed(adapter, root / "ckpt", report)
    canary = root / "canary"
    canary.mkdir()
    (canary / "evil.py").write_text(f"open({str(root / 'MARKER')!r}, 'w').write('ran')\n")
    (canary / "tokenizer_config.json").write_text("{}")
    state = {"watch": False, "opened": []}

    def hook(event, args):
        if state["watch"] and event == "open" and args and isinstance(args[0], (str, bytes, Path)):
            state["opened"].append(str(args[0]))

    sys.addaudithook(hook)  # cannot be removed; inert while watch is False
    return {"root": root, "ckpt": ckpt, "canary": canary, "state": state, "marker": root / "MARKER"}


def _crafted_load(world, target: str, directory: Path) -> None:
    state = world["state"]
    state["opened"].clear()
    state["watch"] = True
    try:
        result = _outcome(target, lambda: load_compressed(directory))
    finally:
        state["watch"] = False
    canary = str(world["canary"])
    assert any(p.endswith("vlmpress_config.json") for p in state["opened"]), "the audit hook saw no open (it would miss reads)"
    outside = [p for p in state["opened"] if p.startswith(canary)]
    if outside or world["marker"].exists():
        TALLY[target]["outside"] += 1
    assert not outside, f"{target}: opened files outside the checkpoint: {outside}"
    assert not world["marker"].exists(), f"{target}: code from the fuzzed input ran"
    return result


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


def _set(value, path, new):
    if not path:
        return new
    target = value
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = new
    return value


@fuzz(40)
@given(data=st.data())
def test_fuzz_checkpoint_config(world, tmp_path_factory, data):
    d = tmp_path_factory.mktemp("cfg") / "ck"
    shutil.copytree(world["ckpt"], d)
    config = json.loads((d / "vlmpress_config.json").read_text())
    canary = str(world["canary"])
    harmless = data.draw(st.booleans())  # report-only fields: the load must succeed whatever they hold
    report_only = ("compression", "recipe", "versions", "method", "tolerances", "ratio")

    def targets(cfg):
        found = [p for p in _paths(cfg) if p and (not harmless or p[0] in report_only)]
        return found or [()]

    paths = targets(config)
    hostile = json_values if harmless else st.one_of(json_values, st.sampled_from([
        canary, f"{canary}/evil.py", "../canary", {"trust_remote_code": True}, {"auto_map": {"AutoTokenizer": "evil.X"}},
        {"tokenizer_kwargs": {"trust_remote_code": True}}, {"model.safetensors": "0" * 64}, [1, 2], "x" * 300,
    ]))
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        path = data.draw(st.sampled_from(paths))
        config = _set(config, path, data.draw(hostile))
        paths = targets(config)
    if data.draw(st.booleans()) and isinstance(config, dict) and isinstance(config.get("file_sha256"), dict):
        # the attacker recomputes the hashes of the files that exist
        config["file_sha256"] = {k: file_sha256(d / k) if (d / k).is_file() else v for k, v in config["file_sha256"].items()
                                 if isinstance(k, str)}
    (d / "vlmpress_config.json").write_text(json.dumps(config, default=str))
    result = _crafted_load(world, "checkpoint config", d)
    if harmless:
        assert isinstance(result, ToyAdapter), f"a report-only field broke loading: {result}"


@fuzz(40)
@given(data=st.data())
def test_fuzz_safetensors_header(world, tmp_path_factory, data):
    d = tmp_path_factory.mktemp("st") / "ck"
    shutil.copytree(world["ckpt"], d)
    blob = (d / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    names = [k for k in header if k != "__metadata__"]
    choice = data.draw(st.sampled_from(["entry", "dtype", "shape", "offsets", "duplicate", "length", "bytes"]))
    text = None
    if choice == "entry":
        header[data.draw(st.sampled_from(names))] = data.draw(json_values)
    elif choice == "dtype":
        header[data.draw(st.sampled_from(names))]["dtype"] = data.draw(st.sampled_from(["I32", "BOOL", "F64", "F16", "X9", "U8"]))
    elif choice == "shape":
        header[data.draw(st.sampled_from(names))]["shape"] = data.draw(st.lists(st.integers(-2, 40), max_size=3))
    elif choice == "offsets":
        header[data.draw(st.sampled_from(names))]["data_offsets"] = data.draw(st.lists(st.integers(-5, 1 << 40), max_size=3))
    elif choice == "duplicate":
        name = data.draw(st.sampled_from(names))
        text = json.dumps(header)[:-1] + ", " + json.dumps({name: header[name]})[1:]
    if choice in ("length", "bytes"):
        out = bytearray(blob)
        if choice == "length":
            out[:8] = struct.pack("<Q", data.draw(st.integers(0, 1 << 63)))
        else:
            i = data.draw(st.integers(8, 8 + n - 1))
            out[i] = data.draw(st.integers(0, 255))
        new = bytes(out)
    else:
        text = (text or json.dumps(header)).encode()
        text += b" " * ((8 - len(text) % 8) % 8)
        new = struct.pack("<Q", len(text)) + text + blob[8 + n:]
    (d / "model.safetensors").write_bytes(new)
    config = json.loads((d / "vlmpress_config.json").read_text())
    config["file_sha256"]["model.safetensors"] = file_sha256(d / "model.safetensors")  # hashes match the crafted file
    (d / "vlmpress_config.json").write_text(json.dumps(config))
    _crafted_load(world, "safetensors header", d)


# ------------------------------------------------------------------------------------------ resume state
@fuzz(60)
@given(manifest=st.one_of(st.sampled_from(["valid", "valid+block"]), json_values, st.binary(max_size=30).map(lambda b: b.decode("latin-1"))),
       block=st.one_of(json_values, st.binary(max_size=30).map(lambda b: b.decode("latin-1"))))
def test_fuzz_sequential_state(tmp_path_factory, manifest, block):
    from vlmpress.pipeline.sequential_state import fingerprint, inputs_fingerprint

    d = tmp_path_factory.mktemp("state") / "state"
    d.mkdir()
    (d / "block-0000.json").write_text(block if isinstance(block, str) else json.dumps(block, default=str))
    (d / "block-0000.safetensors").write_bytes(b"\x08" + b"\0" * 7 + b"{}      ")
    recipe = {"eps": 0.5}
    if manifest in ("valid", "valid+block"):  # the right run: blocks listed with their true hashes
        blocks = {"0": {"weights_sha256": file_sha256(d / "block-0000.safetensors"), "meta_sha256": file_sha256(d / "block-0000.json")}}
        manifest = {"fingerprint": fingerprint("toy:0", recipe, 2, inputs_fingerprint("toy:0", recipe)),
                    "blocks": blocks if manifest == "valid+block" else {}}
    (d / "manifest.json").write_text(manifest if isinstance(manifest, str) else json.dumps(manifest, default=str))

    def resume():
        state = SequentialState.open(d, "toy:0", recipe, 2, resume=True)
        return [state.load_block(index) for index in state.done_blocks()]

    _outcome("sequential state", resume)
