"""The one refusal for a transformers model no adapter takes: what it is, why, and how to add it.

Shared by the registry (no adapter accepted the spec) and the causal-LM adapter (its structure rules
found no decoder), so the user reads the same three bases and the same entry-point group everywhere.
"""

from __future__ import annotations

from vlmpress.errors import UnknownModelSpecError

#: entry-point group through which installed packages provide adapters
ENTRY_POINT_GROUP = "vlmpress.adapters"


class UnsupportedArchitectureError(UnknownModelSpecError):
    """An ``hf:`` checkpoint whose architecture no vlmpress adapter can compress."""


def unsupported_message(spec: str, model_type: str | None, reason: str) -> str:
    """One line: the model, why it is refused, the three bases to subclass and the entry-point group."""
    return (
        f"model '{spec}' has architecture '{model_type}', which no installed vlmpress adapter supports: {reason}. "
        "To add it, subclass the base that fits -- vlmpress.adapters.HFDualEncoderAdapter (dual encoders, CLIP-style), "
        "vlmpress.adapters.HFGenerativeVLMAdapter (generative vision-language models) or "
        "vlmpress.adapters.HFCausalLMAdapter (text-only causal LMs) -- and register it under the entry-point group "
        f"'{ENTRY_POINT_GROUP}' (docs/llms.md: 'When the rules miss a family')"
    )


__all__ = ["ENTRY_POINT_GROUP", "UnsupportedArchitectureError", "unsupported_message"]
