"""Table-driven fault campaign for the CLI: every bad input exits 2 with one line, no traceback.

Each case builds an argv from small on-disk fixtures (a toy two-tower model, a tiny open_clip CLIP,
a tiny Llama, image folders, caption files, checkpoints with one corruption each). The module
prints its tallies (cases, clean one-line errors, tracebacks, silent exits) at the end.
"""

from __future__ import annotations

import json
import re
import shutil
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from PIL import Image

import tally
import toy_adapter  # noqa: F401  (registers the "toy" adapter family)
from toy_adapter import ToyAdapter
from vlmpress.pipeline.checkpoint import save_compressed
from vlmpress.cli import main
from vlmpress.pipeline.compress import compress
from vlmpress.pipeline.config import CompressionConfig
from vlmpress.reference.lm import TINY_TEXT, save_tiny_causal_lm

pytestmark = pytest.mark.usefixtures("one_thread")

TALLY = {"cases": 0, "exit2_one_line": 0, "traceback": 0, "silent": 0, "other": 0}
_PROGRESS = re.compile(r"\d+%\||\d+/\d+ \[|\?(it|layer|batch)/s")
_LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR) ")


class Env:
    """Lazily built fixtures shared by the cases (one per test module)."""

    def __init__(self, root: Path):
        self.root = root
        self._n = 0

    def fresh(self, name: str) -> Path:
        self._n += 1
        return self.root / f"{name}-{self._n}"

    # ---------------------------------------------------------------- images and text
    def images(self) -> Path:
        d = self.root / "imgs"
        if not d.exists():
            for cls in ("cat", "dog"):
                (d / cls).mkdir(parents=True)
                for i in range(3):
                    Image.new("RGB", (8, 8), (i * 40, 100, 200)).save(d / cls / f"{i}.png")
        return d

    def broken_images(self) -> Path:
        d = self.root / "broken_imgs"
        if not d.exists():
            (d / "cat").mkdir(parents=True)
            good = self.images() / "cat" / "0.png"
            (d / "cat" / "truncated.png").write_bytes(good.read_bytes()[:40])
            (d / "cat" / "notes.jpg").write_text("this is not an image")
        return d

    def text(self, name: str, data: bytes) -> Path:
        p = self.root / name
        p.write_bytes(data)
        return p

    # ---------------------------------------------------------------- models and checkpoints
    def llm(self) -> Path:
        d = self.root / "llm"
        if not d.exists():
            save_tiny_causal_lm(d, "llama", seed=0, layers=2)
        return d

    def nan_llm(self) -> Path:
        d = self.root / "nan_llm"
        if not d.exists():
            from safetensors.torch import load_file, save_file

            shutil.copytree(self.llm(), d)
            state = load_file(str(d / "model.safetensors"))
            key = next(k for k in state if "layers.1.mlp.up_proj.weight" in k)
            state[key][0, 0] = float("nan")
            save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
        return d

    def calib_text(self) -> Path:
        p = self.root / "calib.txt"
        if not p.exists():
            p.write_text(TINY_TEXT)
        return p

    def toy_checkpoint(self) -> Path:
        d = self.root / "toy_ckpt"
        if not d.exists():
            adapter = ToyAdapter.load("toy:11")
            report = compress(adapter, CompressionConfig(method="svd", ratio=0.5, device="cpu"))
            save_compressed(adapter, d, report)
        return d

    def clip_checkpoint(self) -> Path:
        d = self.root / "clip_ckpt"
        if not d.exists():
            from vlmpress.testing import tiny_open_clip

            adapter = tiny_open_clip()
            report = compress(adapter, CompressionConfig(method="svd", ratio=0.5, device="cpu"))
            save_compressed(adapter, d, report)
        return d

    def corrupt(self, base: Path, edit: Callable[[dict], None]) -> Path:
        d = self.fresh("corrupt")
        shutil.copytree(base, d)
        cfg = json.loads((d / "vlmpress_config.json").read_text())
        edit(cfg)
        (d / "vlmpress_config.json").write_text(json.dumps(cfg))
        return d

    def flipped_weights(self) -> Path:
        d = self.fresh("flipped")
        shutil.copytree(self.toy_checkpoint(), d)
        path = d / "model.safetensors"
        data = bytearray(path.read_bytes())
        start = len(data) // 2
        for i in range(start, min(len(data), start + 1000)):
            data[i] ^= 0xFF
        path.write_bytes(bytes(data))
        return d

    def existing_output(self) -> Path:
        d = self.root / "existing_out"
        if not d.exists():
            assert main([*self.compress_toy(d), "--eps", "0.5", "-q"]) == 0
        return d

    def results_dir(self, name: str, lines: list[bytes]) -> Path:
        d = self.root / name
        d.mkdir(exist_ok=True)
        (d / "results.jsonl").write_bytes(b"\n".join(lines) + b"\n")
        return d

    def good_record(self, **changes) -> bytes:
        rec = {"model": "m", "dataset": "d", "split": "s", "metrics": {"top1": 0.5, "top5": 0.9, "mean_per_class_recall": 0.5},
               "n_images": 10, "n_classes": 2, "top1_stderr": 0.1, "seconds": 1.0, **changes}
        return json.dumps(rec).encode()

    def bomb_image_folder(self) -> Path:
        """A 20000x20000 PNG header in a few bytes: PIL refuses it as a decompression bomb."""
        import struct
        import zlib

        d = self.root / "bomb_imgs"
        if not d.exists():  # explicit train/ + test/ layout: the bomb is certainly evaluated
            shutil.copytree(self.images(), d / "train")
            shutil.copytree(self.images(), d / "test")
            ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
            chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))  # noqa: E731
            png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
            (d / "test" / "cat" / "bomb.png").write_bytes(png)
        return d

    def truncated_image_folder(self) -> Path:
        d = self.root / "trunc_imgs"
        if not d.exists():
            shutil.copytree(self.images(), d)
            (d / "dog" / "zz.png").write_bytes((d / "dog" / "0.png").read_bytes()[:40])
        return d

    def eval_folder(self, folder: Path, *extra: str) -> list[str]:
        return ["eval", "--model", str(self.toy_checkpoint()), "--datasets", f"imagefolder:{folder}", "--out",
                str(self.fresh("res")), "--no-progress", "--device", "cpu", *extra]

    # ---------------------------------------------------------------- argv builders
    def compress_toy(self, out: Path | None = None, model: str = "toy:0") -> list[str]:
        return ["compress", "--model", model, "--calib-images", str(self.images()), "--out", str(out or self.fresh("out")),
                "--als-iters", "1"]

    def user_folder(self) -> Path:
        d = self.root / "user_folder"
        d.mkdir(exist_ok=True)
        (d / "notes.txt").write_text("mine")
        return d

    def compress_llm_to(self, out: Path) -> list[str]:
        argv = self.compress_llm()
        argv[argv.index("--out") + 1] = str(out)
        return argv

    def compress_llm(self, model: Path | None = None) -> list[str]:
        return ["compress", "--model", f"hf:{model or self.llm()}", "--calib-text", str(self.calib_text()), "--out",
                str(self.fresh("llm_out")), "--n-samples", "2", "--seq-len", "16", "--als-iters", "1", "--device", "cpu"]

    def eval_clip(self, model: Path) -> list[str]:
        return ["eval", "--model", str(model), "--datasets", f"imagefolder:{self.images()}", "--out", str(self.fresh("res")),
                "--no-progress", "--device", "cpu"]


@dataclass
class Case:
    id: str
    argv: Callable[[Env], list[str]]
    expect: str  # substring of the one error line


def _set(key, value):
    def edit(cfg):
        cfg[key] = value
    return edit


def _first_rank(value):
    def edit(cfg):
        cfg["ranks"][next(iter(cfg["ranks"]))] = value
    return edit


def _spec_cfg(value):
    def edit(cfg):
        cfg["spec_config"]["model_cfg"] = value
    return edit


def _toy_spec_cfg(cfg):
    cfg["spec_config"]["cfg"] = "not a config"


def _nonlinear_rank(cfg):
    cfg["ranks"]["visual.blocks"] = 2
    cfg["layer_shapes"]["visual.blocks"] = [24, 24]


def _unknown_layer_rank(cfg):
    cfg["ranks"] = {"no.such.layer": 2}
    cfg["layer_shapes"] = {"no.such.layer": [8, 8]}


CASES = [
    # ------------------------------------------------ devices (compress and eval)
    Case("compress-device-tpu", lambda e: e.compress_toy() + ["--eps", "0.5", "--device", "tpu"], "unknown device 'tpu'"),
    Case("compress-device-empty", lambda e: e.compress_toy() + ["--eps", "0.5", "--device", ""], "device must be a non-empty string"),
    Case("compress-device-cuda-index", lambda e: e.compress_toy() + ["--eps", "0.5", "--device", "cuda:99"], "cuda:99"),
    Case("compress-device-meta", lambda e: e.compress_toy() + ["--eps", "0.5", "--device", "meta"], "unsupported device 'meta'"),
    Case("eval-device-tpu", lambda e: e.eval_clip(e.toy_checkpoint()) + ["--device", "tpu"], "unknown device 'tpu'"),
    Case("eval-device-empty", lambda e: e.eval_clip(e.toy_checkpoint()) + ["--device", ""], "device must be a non-empty string"),
    Case("eval-llm-device-tpu", lambda e: ["eval", "--model", f"hf:{e.llm()}", "--perplexity", str(e.calib_text()),
                                            "--out", str(e.fresh("r")), "--device", "tpu"], "unknown device 'tpu'"),
    # ------------------------------------------------ calibration data
    Case("calib-all-images-unreadable", lambda e: e.compress_toy() + ["--eps", "0.5", "--calib-images", str(e.broken_images())],
         "none of the 2 image files"),
    Case("captions-latin1", lambda e: e.compress_toy() + ["--eps", "0.5", "--calib-captions",
                                                          str(e.text("latin1.txt", "café au lait\n".encode("latin-1")))], "not valid UTF-8"),
    Case("captions-binary", lambda e: e.compress_toy() + ["--eps", "0.5", "--calib-captions",
                                                          str(e.text("binary.txt", bytes(range(256))))], "is binary"),
    Case("captions-missing", lambda e: e.compress_toy() + ["--eps", "0.5", "--calib-captions", "/no/such/captions.txt"], "caption file not found"),
    Case("llm-text-latin1", lambda e: e.compress_llm() + ["--eps", "0.5", "--calib-text",
                                                          str(e.text("latin1_llm.txt", "café au lait\n".encode("latin-1") * 50))], "UTF-8"),
    # ------------------------------------------------ outputs
    Case("out-under-a-file", lambda e: e.compress_toy(out=e.text("a_file", b"x") / "ckpt") + ["--eps", "0.5"], "not writable"),
    Case("out-is-a-file", lambda e: e.compress_toy(out=e.text("b_file", b"x")) + ["--eps", "0.5"], "exists and is not a directory"),
    Case("out-read-only-fs", lambda e: e.compress_toy(out=Path("/proc/vlmpress-test-out")) + ["--eps", "0.5"], "not writable"),
    Case("out-same-model-no-overwrite", lambda e: e.compress_toy(out=e.existing_output()) + ["--eps", "0.5"],
         "already holds a compressed checkpoint of the same model"),
    # ------------------------------------------------ tolerances, proportions, ratios, targets
    Case("solve-batch-size-zero", lambda e: e.compress_toy() + ["--eps", "0.5", "--solve-batch-size", "0"],
         "solve_batch_size must be a whole number >= 1"),
    Case("eps-nan", lambda e: e.compress_toy() + ["--eps", "nan"], "eps must be a relative error in [0, 1]"),
    Case("eps-inf", lambda e: e.compress_toy() + ["--eps-v", "inf", "--eps-t", "0.3"], "eps-v must be a relative error"),
    Case("ratio-nan", lambda e: e.compress_toy() + ["--method", "svd", "--ratio", "nan"], "ratio must be a fraction"),
    Case("target-nan", lambda e: e.compress_toy() + ["--target-reduction", "nan"], "target-reduction must be a fraction"),
    Case("proportion-nan", lambda e: e.compress_toy() + ["--target-reduction", "0.3", "--allocation", "proportion",
                                                         "--eps-proportion", "vision=nan,text=1"], "eps-proportion must map"),
    Case("proportion-inf", lambda e: e.compress_toy() + ["--target-reduction", "0.3", "--allocation", "proportion",
                                                         "--eps-proportion", "vision=inf,text=1"], "eps-proportion must map"),
    Case("proportion-zero", lambda e: e.compress_toy() + ["--target-reduction", "0.3", "--allocation", "proportion",
                                                          "--eps-proportion", "vision=0,text=1"], "eps-proportion must map"),
    Case("proportion-garbage", lambda e: e.compress_toy() + ["--target-reduction", "0.3", "--eps-proportion", "vision"],
         "expected KEY=VALUE pairs"),
    Case("target-unreachable-pgsvd", lambda e: e.compress_toy() + ["--target-reduction", "0.99"], "reachable range"),
    Case("target-unreachable-ratio", lambda e: e.compress_toy() + ["--method", "svd_llm", "--target-reduction", "0.99"],
         "reachable range"),
    Case("eps-attn-alone-llm", lambda e: e.compress_llm() + ["--eps-attn", "0.3"], "--eps-mlp"),
    Case("rank-multiple-zero", lambda e: e.compress_toy() + ["--eps", "0.5", "--rank-multiple", "0"], "rank_multiple must be a positive"),
    Case("batch-size-zero", lambda e: e.compress_toy() + ["--eps", "0.5", "--batch-size", "0"], "batch-size must be >= 1"),
    Case("targets-bad-regex", lambda e: e.compress_toy() + ["--eps", "0.5", "--targets", "("], "not a valid regular expression"),
    Case("yaml-int-as-string", lambda e: e.compress_toy() + ["--eps", "0.5", "--config",
                                                             str(e.text("r.yaml", b"n_images: lots\n"))], "n-images must be an integer"),
    Case("yaml-device-tpu", lambda e: e.compress_toy() + ["--eps", "0.5", "--config", str(e.text("d.yaml", b"device: tpu\n"))],
         "unknown device 'tpu'"),
    Case("resume-without-sequential", lambda e: e.compress_toy() + ["--eps", "0.5", "--resume"],
         "--resume applies to --mode sequential"),
    Case("eval-save-predictions-zero", lambda e: e.eval_clip(e.toy_checkpoint()) + ["--save-predictions", "0"],
         "--save-predictions K must be a positive"),
    # ------------------------------------------------ model weights
    Case("nan-weight-before-calibration", lambda e: e.compress_llm(e.nan_llm()) + ["--eps", "0.5"],
         "layer 'model.layers.1.mlp.up_proj' holds 1 NaN/inf"),
    # ------------------------------------------------ checkpoint configs (schema at load)
    Case("ckpt-format-version-string", lambda e: e.eval_clip(e.corrupt(e.toy_checkpoint(), _set("format_version", "1"))),
         "'format_version' must be a positive integer"),
    Case("ckpt-format-version-null", lambda e: e.eval_clip(e.corrupt(e.toy_checkpoint(), _set("format_version", None))),
         "'format_version' must be a positive integer"),
    Case("ckpt-format-version-newer", lambda e: e.eval_clip(e.corrupt(e.toy_checkpoint(), _set("format_version", 99))),
         "newer vlmpress"),
    Case("ckpt-ranks-string", lambda e: e.eval_clip(e.corrupt(e.toy_checkpoint(), _set("ranks", "abc"))), "'ranks' must map"),
    Case("ckpt-ranks-list", lambda e: e.eval_clip(e.corrupt(e.toy_checkpoint(), _set("ranks", [1, 2]))), "'ranks' must map"),
    Case("ckpt-rank-x", lambda e: e.eval_clip(e.corrupt(e.toy_checkpoint(), _first_rank("x"))), "ranks are positive integers"),
    Case("ckpt-rank-null", lambda e: e.eval_clip(e.corrupt(e.toy_checkpoint(), _first_rank(None))), "ranks are positive integers"),
    Case("ckpt-rank-zero", lambda e: e.eval_clip(e.corrupt(e.toy_checkpoint(), _first_rank(0))), "ranks are positive integers"),
    Case("ckpt-rank-bool", lambda e: e.eval_clip(e.corrupt(e.toy_checkpoint(), _first_rank(True))), "ranks are positive integers"),
    Case("ckpt-rank-too-large", lambda e: e.eval_clip(e.corrupt(e.toy_checkpoint(), _first_rank(10_000))), "exceeds its shape"),
    Case("ckpt-rank-non-linear", lambda e: e.eval_clip(e.corrupt(e.toy_checkpoint(), _nonlinear_rank)), "ranks apply to linear layers only"),
    Case("ckpt-rank-unknown-layer", lambda e: e.eval_clip(e.corrupt(e.toy_checkpoint(), _unknown_layer_rank)),
         "does not have"),
    Case("ckpt-family-list", lambda e: e.eval_clip(e.corrupt(e.toy_checkpoint(), _set("family", ["toy"]))), "'family' must be a non-empty string"),
    Case("ckpt-family-unknown", lambda e: e.eval_clip(e.corrupt(e.toy_checkpoint(), _set("family", "nosuch"))), "unknown adapter family"),
    Case("ckpt-spec-config-list", lambda e: e.eval_clip(e.corrupt(e.toy_checkpoint(), _set("spec_config", []))), "'spec_config' must be a mapping"),
    Case("ckpt-toy-spec-config-bad", lambda e: e.eval_clip(e.corrupt(e.toy_checkpoint(), _toy_spec_cfg)), "does not describe a buildable"),
    Case("ckpt-model-cfg-bad", lambda e: e.eval_clip(e.corrupt(e.clip_checkpoint(), _spec_cfg({"embed_dim": "x", "vision_cfg": 5}))),
         "'spec_config' is refused: 'model_cfg.vision_cfg' must be a mapping"),
    Case("ckpt-model-cfg-types", lambda e: e.eval_clip(e.corrupt(e.clip_checkpoint(), _spec_cfg({"embed_dim": "x", "vision_cfg": {},
                                                                                                  "text_cfg": {}}))),
         "does not describe a buildable"),
    Case("ckpt-model-cfg-string", lambda e: e.eval_clip(e.corrupt(e.clip_checkpoint(), _spec_cfg("nonsense"))),
         "'model_cfg' must be a mapping"),
    Case("ckpt-config-not-object", lambda e: e.eval_clip(e.corrupt(e.toy_checkpoint(), lambda c: c.clear())), "is incomplete"),
    Case("ckpt-hash-bad", lambda e: e.eval_clip(e.corrupt(e.toy_checkpoint(), _set("file_sha256", {"model.safetensors": "0" * 63}))),
         "'file_sha256' has an invalid entry"),
    Case("ckpt-flipped-weight-bytes", lambda e: e.eval_clip(e.flipped_weights()), "does not match the SHA-256"),
    # ------------------------------------------------ round 2: text inputs that are not UTF-8
    Case("yaml-latin1", lambda e: e.compress_toy() + ["--eps", "0.5", "--config", str(e.text("l1.yaml", "seed: 1 # café\n".encode("latin-1")))],
         "not valid UTF-8"),
    Case("split-file-latin1", lambda e: e.eval_clip(e.toy_checkpoint()) + ["--split-file", str(e.text("split.txt", "cat/café.png\n".encode("latin-1")))],
         "split file"),
    Case("report-jsonl-latin1", lambda e: ["report", str(e.results_dir("res_latin1", ["{\"model\": \"café\"}".encode("latin-1")]))],
         "no readable result records"),
    Case("report-jsonl-nan-metric", lambda e: ["report", str(e.results_dir("res_nan", [e.good_record(metrics={"top1": float("nan"), "top5": 0.5, "mean_per_class_recall": 0.5})]))],
         "no readable result records"),
    Case("report-jsonl-deep", lambda e: ["report", str(e.results_dir("res_deep", [b"[" * 100000 + b"]" * 100000]))], "no readable result records"),
    Case("report-jsonl-huge-int", lambda e: ["report", str(e.results_dir("res_int", [e.good_record(n_images=10**400)]))],
         "no readable result records"),
    # ------------------------------------------------ YAML values of the wrong type or absurd size
    Case("yaml-method-list", lambda e: e.compress_toy() + ["--eps", "0.5", "--config", str(e.text("m.yaml", b"method: [pgsvd]\n"))],
         "method must be one of"),
    Case("yaml-400-digit-eps", lambda e: e.compress_toy() + ["--config", str(e.text("e.yaml", b"eps: 1" + b"0" * 400 + b"\n"))],
         "eps must be a relative error"),
    Case("yaml-batch-size-huge", lambda e: e.compress_toy() + ["--eps", "0.5", "--config", str(e.text("b.yaml", b"batch_size: 1000000000000000000000000000000\n"))],
         "batch-size must be at most"),
    Case("yaml-n-samples-float", lambda e: e.compress_toy() + ["--eps", "0.5", "--config", str(e.text("n.yaml", b"n_samples: 1.0e10\n"))],
         "n-samples must be an integer"),
    Case("yaml-alias-bomb", lambda e: e.compress_toy() + ["--eps", "0.5", "--config", str(e.text("bomb.yaml", (
        "a: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
        "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\ntargets: [*e,*e,*e,*e,*e,*e,*e,*e,*e]\n").encode()))],
         "expansion bomb"),
    Case("yaml-duplicate-key", lambda e: e.compress_toy() + ["--config", str(e.text("dup.yaml", b"eps: 0.5\neps: 0.9\n"))], "appears twice"),
    Case("yaml-deep", lambda e: e.compress_toy() + ["--eps", "0.5", "--config", str(e.text("deep.yaml", b"targets: " + b"[" * 5000 + b"]" * 5000))],
         "nested too deeply"),
    Case("yaml-targets-huge-list", lambda e: e.compress_toy() + ["--eps", "0.5", "--config", str(e.text("t.yaml", b"targets: [" + b"1," * 20 + b"]\n"))],
         "targets must be a list of regular expressions"),
    # ------------------------------------------------ sizes checked before allocation, loops bounded
    Case("n-samples-1e10", lambda e: e.compress_llm() + ["--eps", "0.5", "--n-samples", "10000000000"], "n-samples must be at most"),
    Case("n-samples-sci", lambda e: e.compress_llm() + ["--eps", "0.5", "--n-samples", "1e10"], "invalid int value"),
    Case("als-iters-1e9", lambda e: e.compress_toy() + ["--eps", "0.5", "--als-iters", "1000000000"], "als-iters must be at most"),
    Case("device-map-garbage", lambda e: e.compress_llm() + ["--eps", "0.5", "--device-map", "{'model': 0}"], "device-map must be one of"),
    Case("device-map-path", lambda e: e.compress_llm() + ["--eps", "0.5", "--device-map", "/etc/passwd"], "device-map must be one of"),
    Case("eval-batch-size-zero", lambda e: e.eval_clip(e.toy_checkpoint()) + ["--batch-size", "0"], "--batch-size must be in"),
    Case("eval-llm-batch-size-zero", lambda e: ["eval", "--model", f"hf:{e.llm()}", "--perplexity", str(e.calib_text()),
                                                 "--out", str(e.fresh("r")), "--batch-size", "0"], "--batch-size must be in"),
    Case("eval-max-tokens-negative", lambda e: ["eval", "--model", f"hf:{e.llm()}", "--perplexity", str(e.calib_text()),
                                                 "--out", str(e.fresh("r")), "--max-tokens", "-5"], "--max-tokens must be in"),
    Case("eval-num-workers-huge", lambda e: e.eval_clip(e.toy_checkpoint()) + ["--num-workers", "100000"], "--num-workers must be in"),
    # ------------------------------------------------ images that do not decode
    Case("eval-decompression-bomb", lambda e: e.eval_folder(e.bomb_image_folder()), "decompression bomb"),
    Case("eval-truncated-image", lambda e: e.eval_folder(e.truncated_image_folder()), "cannot be decoded"),
    Case("eval-truncated-image-workers", lambda e: e.eval_folder(e.truncated_image_folder(), "--num-workers", "1"), "cannot be decoded"),
    # ------------------------------------------------ calibration split files
    Case("calib-split-file-lists-nothing", lambda e: e.compress_toy() + ["--eps", "0.5", "--calib-split-file", str(e.text("none.txt", b"bird/1.png\n"))],
         "lists none of the images"),
    Case("calib-split-file-lists-all", lambda e: e.compress_toy() + ["--eps", "0.5", "--calib-split-file", str(e.text("all.txt", "".join(
        f"{c}/{i}.png\n" for c in ("cat", "dog") for i in range(3)).encode()))], "nothing is left"),
    # ------------------------------------------------ outputs never replaced by surprise
    Case("overwrite-user-folder", lambda e: e.compress_toy(out=e.user_folder()) + ["--eps", "0.5", "--overwrite"], "holds no vlmpress checkpoint"),
    Case("overwrite-input-model", lambda e: e.compress_llm_to(e.llm()) + ["--eps", "0.5", "--overwrite"], "is (or contains) the input model"),
    Case("export-dense-is-out", lambda e: e.compress_toy(out=e.root / "same") + ["--eps", "0.5", "--export-dense", str(e.root / "same")], "overlaps --out"),
]


@pytest.fixture(scope="module")
def env(tmp_path_factory, request):
    yield Env(tmp_path_factory.mktemp("bad_inputs"))
    line = (
        f"CLI bad-input suite: {TALLY['cases']} cases, {TALLY['exit2_one_line']} exit 2 with one clear line, "
        f"{TALLY['traceback']} tracebacks, {TALLY['silent']} silent (exit 0), {TALLY['other']} other"
    )
    tally.LINES.append(line)  # printed at the end of the run (conftest.pytest_terminal_summary)


def _error_lines(err: str) -> list[str]:
    """stderr lines that are not log records, progress bars or argparse's usage block."""
    out = []
    for raw in err.splitlines():
        for line in raw.split("\r"):  # progress bars redraw with carriage returns
            line = line.strip(" ") if _PROGRESS.search(line) is None else ""
            if not line.strip() or _LOG_LINE.match(line) or line.startswith("usage:") or raw.startswith(" "):
                continue
            out.append(line)
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, env, capsys):
    argv = case.argv(env)
    capsys.readouterr()  # fixture building output is not the command's
    TALLY["cases"] += 1
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    except Exception:  # noqa: BLE001 - a traceback is exactly what this suite hunts
        TALLY["traceback"] += 1
        pytest.fail(f"{case.id}: traceback\n{traceback.format_exc()}")
    err = capsys.readouterr().err
    lines = _error_lines(err)
    if code == 0:
        TALLY["silent"] += 1
        pytest.fail(f"{case.id}: accepted silently (exit 0)\n{err}")
    ok = code == 2 and len(lines) == 1 and case.expect in lines[0] and "Traceback" not in err
    TALLY["exit2_one_line" if ok else "other"] += 1
    assert ok, f"{case.id}: exit {code}, expected one line containing {case.expect!r}, got:\n{err}"


def test_unreadable_images_are_skipped_and_recorded(env, capsys, tmp_path):
    """Some unreadable calibration files: a warning (count + first file), the report records them."""
    mixed = tmp_path / "mixed"
    shutil.copytree(env.images(), mixed)
    (mixed / "cat" / "zz_truncated.png").write_bytes((mixed / "cat" / "0.png").read_bytes()[:30])
    out = tmp_path / "ckpt"
    code = main(["compress", "--model", "toy:3", "--calib-images", str(mixed), "--out", str(out), "--eps", "0.6",
                 "--als-iters", "1", "-q"])
    assert code == 0
    calib = json.loads((out / "compression_report.json").read_text())["summary"]["calibration"]
    assert calib["skipped_images"] == 1 and calib["first_skipped_image"].endswith("zz_truncated.png")
    assert calib["n_images"] == 6
