"""A small, reproducible reference LLM trained offline, plus tiny random causal LMs for tests.

No LLM weights can be downloaded here, so compression results on language models need a model
trained on text that exists on every machine: the docstrings of the installed Python standard
library (walked in sorted order, parsed with ``ast``, deduplicated). A deterministic slice of the
documents is held out as test text; the BPE tokenizer is trained on the training text only.
The corpus depends on the Python version, which is recorded with its hash.
"""

from __future__ import annotations

import ast
import hashlib
import logging
import math
import os
import sysconfig
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from vlmpress.errors import ConfigError

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<|endoftext|>", "<pad>")
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__", "lib2to3"}


# ----------------------------------------------------------------------------- corpus


@dataclass
class Corpus:
    """Train / test text of the standard-library docstring corpus and where it came from."""

    train: str
    test: str
    info: dict[str, Any] = field(default_factory=dict)


def stdlib_docstrings(root: str | Path | None = None, min_chars: int = 40) -> list[str]:
    """Module, class and function docstrings of the stdlib (sorted file order, deduplicated)."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    docs: list[str] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for fname in sorted(filenames):
            if not fname.endswith(".py"):
                continue
            try:
                tree = ast.parse(Path(dirpath, fname).read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= min_chars and doc not in seen:
                        seen.add(doc)
                        docs.append(doc)
    return docs


def stdlib_corpus(test_every: int = 20, root: str | Path | None = None) -> Corpus:
    """Every ``test_every``-th document is test text (a deterministic, spread-out held-out slice)."""
    docs = stdlib_docstrings(root)
    if len(docs) < 2 * test_every:
        raise ConfigError(f"found only {len(docs)} docstrings under {root or 'the stdlib'}; need a larger corpus")
    train = [d for i, d in enumerate(docs) if i % test_every != test_every - 1]
    test = [d for i, d in enumerate(docs) if i % test_every == test_every - 1]
    train_text, test_text = "\n\n".join(train), "\n\n".join(test)
    info = {
        "source": "python stdlib docstrings",
        "python": sysconfig.get_python_version(),
        "stdlib": str(root or sysconfig.get_paths()["stdlib"]),
        "documents": len(docs),
        "train_documents": len(train),
        "test_documents": len(test),
        "train_chars": len(train_text),
        "test_chars": len(test_text),
        "sha256": hashlib.sha256((train_text + "\x00" + test_text).encode()).hexdigest()[:16],
    }
    return Corpus(train_text, test_text, info)


# ----------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str] | str, vocab_size: int = 2048, model_max_length: int = 1024):
    """Byte-level BPE trained on ``texts`` with ``tokenizers``, as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if isinstance(texts, str):
        texts = [texts]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS[0],
        eos_token=SPECIAL_TOKENS[0],
        unk_token=None,
        pad_token=SPECIAL_TOKENS[1],
        model_max_length=model_max_length,
    )


TINY_TEXT = (
    "the quick brown fox jumps over the lazy dog. a small model reads a short text and predicts "
    "the next token. low rank factors approximate the weights of every linear layer. "
    "calibration windows are cut from the text at random offsets. "
) * 4


# ----------------------------------------------------------------------------- tiny random models


def tiny_config(model_type: str, vocab_size: int, *, hidden: int = 32, layers: int = 2, max_positions: int = 64, **overrides):
    """A tiny random config of a supported architecture (Llama/Mistral/Qwen2 use GQA: 4 heads, 2 kv;
    Mixtral: 4 experts, top-2)."""
    from transformers import GPT2Config, LlamaConfig, MistralConfig, MixtralConfig, OPTConfig, Qwen2Config

    if model_type == "mixtral":
        cls = MixtralConfig
        kw = dict(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
            num_local_experts=4, num_experts_per_tok=2,
        )
    elif model_type in ("llama", "mistral", "qwen2"):
        cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[model_type]
        kw = dict(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        )
    elif model_type == "gpt2":
        cls = GPT2Config
        kw = dict(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=4, n_positions=max_positions)
    elif model_type == "opt":
        cls = OPTConfig
        kw = dict(
            vocab_size=vocab_size, hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=4, max_position_embeddings=max_positions, word_embed_proj_dim=hidden,
        )
    else:
        raise ConfigError(f"no tiny config for model type '{model_type}'")
    kw.update(overrides)
    return cls(**kw)


def save_tiny_causal_lm(directory: str | Path, model_type: str = "llama", seed: int = 0, **config_overrides) -> Path:
    """Write a tiny random causal LM + a tiny trained BPE tokenizer to ``directory`` (``hf:<dir>`` loads it)."""
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(TINY_TEXT, vocab_size=300)
    config = tiny_config(model_type, len(tokenizer), **config_overrides)
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = config.bos_token_id = tokenizer.eos_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


# ----------------------------------------------------------------------------- reference training


@dataclass
class ReferenceLMConfig:
    """Architecture and schedule of the reference LM (defaults: a 1.3M-parameter Llama, ~7 min on 2 cores).

    ``num_experts > 0`` makes it a mixture of experts (a Mixtral: Llama attention, routed SwiGLU
    experts of width ``intermediate_size``, ``experts_per_token`` of them per token, trained with the
    load-balancing loss weighted ``router_aux_loss_coef``); ``configs/reference/lm-moe.json``.
    """

    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 1500
    lr: float = 3e-3
    warmup: int = 30
    weight_decay: float = 0.1
    seed: int = 0
    threads: int = 2
    test_every: int = 20
    num_experts: int = 0
    experts_per_token: int = 2
    router_aux_loss_coef: float = 0.01

    @classmethod
    def from_json(cls, path: str | Path) -> "ReferenceLMConfig":
        """Fields from a JSON file (unknown keys refused)."""
        import json

        data = json.loads(Path(path).read_text(encoding="utf-8"))
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if not isinstance(data, dict) or unknown:
            raise ConfigError(f"{path}: unknown reference-LM config keys {unknown}; known: {', '.join(sorted(known))}")
        return cls(**data)

    def model_config(self, tokenizer):
        """The transformers config: a Llama, or a Mixtral when ``num_experts > 0``."""
        from transformers import LlamaConfig, MixtralConfig

        common = dict(
            vocab_size=len(tokenizer), hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
            max_position_embeddings=self.seq_len, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
        )
        if self.num_experts <= 0:
            return LlamaConfig(**common)
        if not 1 <= self.experts_per_token <= self.num_experts:
            raise ConfigError(f"experts_per_token must be in 1..num_experts ({self.num_experts}), got {self.experts_per_token}")
        return MixtralConfig(
            **common, num_local_experts=self.num_experts, num_experts_per_tok=self.experts_per_token,
            output_router_logits=True, router_aux_loss_coef=self.router_aux_loss_coef,
        )


def _token_stream(tokenizer, text: str) -> torch.Tensor:
    from vlmpress.data.text_calibration import tokenize_text

    return tokenize_text(tokenizer, text)


def train_reference_lm(out_dir: str | Path, cfg: ReferenceLMConfig | None = None, corpus: Corpus | None = None) -> dict:
    """Train the reference Llama; writes ``model/`` (hf dir), ``train.txt``, ``test.txt``, ``training.json``.

    Deterministic for a given torch build, thread count and Python stdlib (seeded init and batch order).
    """
    cfg = cfg or ReferenceLMConfig()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _train_reference_lm(Path(out_dir), cfg, corpus)
    finally:
        torch.set_num_threads(threads)  # a library call must not change the caller's thread count


def _train_reference_lm(out: Path, cfg: ReferenceLMConfig, corpus: Corpus | None) -> dict:
    from transformers import AutoModelForCausalLM

    from vlmpress.io import atomic_write_json

    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    corpus = corpus or stdlib_corpus(cfg.test_every)
    (out / "train.txt").write_text(corpus.train, encoding="utf-8")
    (out / "test.txt").write_text(corpus.test, encoding="utf-8")
    tokenizer = train_tokenizer(corpus.train, cfg.vocab_size, model_max_length=cfg.seq_len)
    ids = _token_stream(tokenizer, corpus.train)
    test_ids = _token_stream(tokenizer, corpus.test)
    config = cfg.model_config(tokenizer)
    model = AutoModelForCausalLM.from_config(config)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95),
    )

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    g = torch.Generator().manual_seed(cfg.seed)
    n_windows = (ids.numel() - 1) // cfg.seq_len
    windows = ids[: n_windows * cfg.seq_len].view(n_windows, cfg.seq_len)
    order = torch.randperm(n_windows, generator=g)
    cursor = 0
    losses: list[float] = []
    for step in tqdm(range(cfg.steps), desc="train reference LM", unit="step"):
        if cursor + cfg.batch_size > n_windows:
            order, cursor = torch.randperm(n_windows, generator=g), 0
        batch = windows[order[cursor : cursor + cfg.batch_size]]
        cursor += cfg.batch_size
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == cfg.steps - 1:
            logger.info("step %d/%d loss %.4f", step, cfg.steps, losses[-1])
    model.eval()
    model.config.output_router_logits = False  # training only: inference needs no router logits
    model_dir = out / "model"
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    summary = {
        "config": asdict(cfg),
        "corpus": corpus.info,
        "train_tokens": int(ids.numel()),
        "test_tokens": int(test_ids.numel()),
        "epochs": cfg.steps * cfg.batch_size / max(1, n_windows),
        "parameters": sum(p.numel() for p in model.parameters()),
        "first_train_loss": losses[0],
        "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
        "wall_seconds": time.perf_counter() - t_start,
        "threads": cfg.threads,
        "torch": torch.__version__,
    }
    atomic_write_json(out / "training.json", summary)
    return summary


__all__ = [
    "Corpus",
    "ReferenceLMConfig",
    "save_tiny_causal_lm",
    "stdlib_corpus",
    "stdlib_docstrings",
    "tiny_config",
    "train_reference_lm",
    "train_tokenizer",
]
