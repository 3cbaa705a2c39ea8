"""A tiny two-tower model and its adapter, for pipeline tests independent of any model library.

Each tower is a stack of residual blocks with q/k/v/out and fc1/fc2 linears (the shape of a
transformer block without attention weights), so the pipeline sees the same layer kinds and
shared-input patterns (q/k/v read one tensor) as in CLIP.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from vlmpress.adapters import register_adapter
from vlmpress.adapters.base import TargetLayer, VisionLanguageAdapter, weight_matrix


class Block(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        h = self.out(torch.tanh(self.q(x)) * torch.sigmoid(self.k(x)) + self.v(x))
        x = x + h
        return x + self.fc2(torch.relu(self.fc1(x)))


class Tower(nn.Module):
    def __init__(self, d_in: int, d: int, hidden: int, layers: int, d_out: int):
        super().__init__()
        self.embed = nn.Linear(d_in, d)
        self.blocks = nn.ModuleList(Block(d, hidden) for _ in range(layers))
        self.proj = nn.Linear(d, d_out, bias=False)

    def forward(self, x, valid=None):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        if valid is None:
            return self.proj(x.mean(1))
        w = valid.float().unsqueeze(-1)
        return self.proj((x * w).sum(1) / w.sum(1).clamp_min(1))


class ToyCLIP(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = dict(cfg)
        self.visual = Tower(cfg["patch_dim"], cfg["width_v"], cfg["hidden_v"], cfg["layers_v"], cfg["embed"])
        self.text = Tower(cfg["token_dim"], cfg["width_t"], cfg["hidden_t"], cfg["layers_t"], cfg["embed"])


DEFAULT_CFG = dict(patch_dim=12, width_v=24, hidden_v=48, layers_v=2, token_dim=10, width_t=16, hidden_t=40, layers_t=2, embed=8, seq=6)


def _to_patches(item):
    """PIL image -> (5, 12) tensor (5 rows of 4 RGB pixels); tensors pass through."""
    if isinstance(item, torch.Tensor):
        return item
    import numpy as np

    return torch.from_numpy(np.asarray(item.convert("RGB").resize((4, 5)), dtype=np.float32) / 255.0).reshape(5, 12)


def _token_features(text: str, dim: int, seq: int) -> tuple[torch.Tensor, int]:
    """Deterministic per-word features; the number of valid positions is the word count."""
    words = text.split()[:seq]
    feats = torch.zeros(seq, dim)
    for i, word in enumerate(words):
        seed = int(hashlib.sha256(word.encode()).hexdigest()[:8], 16)
        feats[i] = torch.randn(dim, generator=torch.Generator().manual_seed(seed))
    return feats, len(words)


@register_adapter
class ToyAdapter(VisionLanguageAdapter):
    family = "toy"

    def __init__(self, model: ToyCLIP, spec: str):
        super().__init__(model, spec)
        self.preprocess = _to_patches

    @classmethod
    def accepts(cls, spec: str) -> bool:
        return spec.startswith("toy:")

    @classmethod
    def load(cls, spec: str, *, device="cpu", **kwargs):
        seed = int(spec.split(":", 1)[1] or 0)
        torch.manual_seed(seed)
        return cls(ToyCLIP(DEFAULT_CFG).to(device).eval(), spec)

    def spec_config(self) -> dict:
        return {"cfg": self.model.cfg}

    @classmethod
    def build_from_spec_config(cls, config: dict, *, device="cpu", preprocessing_dir: Path | None = None):
        return cls(ToyCLIP(config["cfg"]).to(device).eval(), "toy:rebuilt")

    def target_layers(self) -> list[TargetLayer]:
        out = []
        for group, tower in (("vision", "visual"), ("text", "text")):
            for i, _ in enumerate(getattr(self.model, tower).blocks):
                for name, kind in (("q", "attn"), ("k", "attn"), ("v", "attn"), ("out", "attn"), ("fc1", "mlp"), ("fc2", "mlp")):
                    path = f"{tower}.blocks.{i}.{name}"
                    out.append(TargetLayer(path, group, kind, self.model.get_submodule(path)))
        return out

    def tokenize(self, texts):
        cfg = self.model.cfg
        pairs = [_token_features(t, cfg["token_dim"], cfg["seq"]) for t in texts]
        feats = torch.stack([p[0] for p in pairs])
        valid = torch.arange(cfg["seq"]).unsqueeze(0) < torch.tensor([p[1] for p in pairs]).unsqueeze(1)
        return {"features": feats, "valid": valid}

    def encode_image(self, pixels):
        return self.model.visual(pixels.to(self.device))

    def encode_text(self, tokens):
        return self.model.text(tokens["features"].to(self.device), tokens["valid"].to(self.device))

    def calibration_forward(self, group, batch, collector):
        if group == "vision":
            self.encode_image(batch)
        else:
            tokens = self.tokenize(batch)
            with collector.mask(tokens["valid"]):
                self.encode_text(tokens)

    def export_dense(self, out_dir):
        from vlmpress.core.lowrank import LowRankLinear

        state = {}
        for name, module in self.model.named_modules():
            if isinstance(module, (nn.Linear, LowRankLinear)):
                state[f"{name}.weight"] = weight_matrix(module).detach().clone() if isinstance(module, nn.Linear) else (module.A @ module.B).detach()
                if module.bias is not None:
                    state[f"{name}.bias"] = module.bias.detach().clone()
        torch.save(state, Path(out_dir) / "dense.pt")


def toy_calibration(n_images: int = 20, n_captions: int = 20, seed: int = 0):
    from vlmpress.data.calibration import CalibrationSet

    g = torch.Generator().manual_seed(seed)
    images = [torch.randn(5, DEFAULT_CFG["patch_dim"], generator=g) for _ in range(n_images)]
    words = "red green blue small large dog cat car tree house".split()
    captions = [" ".join(words[(i * 3 + j) % len(words)] for j in range(1 + i % 5)) for i in range(n_captions)]
    return CalibrationSet(images, captions, "random tensors", "synthetic captions")
