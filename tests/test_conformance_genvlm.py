"""The conformance kit on the generative VLM families (tiny random LLaVA and PaliGemma, offline)."""

from __future__ import annotations

import copy

import pytest
import torch

from vlmpress import testing
from vlmpress.adapters.hf_llava import HFLlavaAdapter, HFPaliGemmaAdapter
from vlmpress.testing.genvlm import save_tiny_llava, save_tiny_paligemma

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llava_spec(tmp_path_factory):
    return f"hf:{save_tiny_llava(tmp_path_factory.mktemp('conf-llava') / 'llava', seed=1)}"


@pytest.fixture(scope="module")
def paligemma_spec(tmp_path_factory):
    return f"hf:{save_tiny_paligemma(tmp_path_factory.mktemp('conf-pg') / 'pg', seed=1)}"


def test_llava(llava_spec, tmp_path):
    adapter = HFLlavaAdapter.load(llava_spec)
    info = testing.check_adapter(adapter, tmp_path)  # dispatches on the adapter kind
    # 2 of 3 vision blocks reach the LM (vision_feature_layer=-2) x 6 linears; 2 projector linears;
    # 2 decoder blocks x 7 linears + the untied lm_head
    assert info["targets"] == {"vision": 12, "projector": 2, "text": 15}
    assert info["dense_by_default"] == ["projector"]
    assert info["compressed"]["projector"] == 0 and info["compressed"]["vision"] > 0 and info["compressed"]["text"] > 0
    assert info["exported_spec"] == f"hf:{(tmp_path / 'dense').resolve()}"


def test_paligemma(paligemma_spec, tmp_path):
    info = testing.check_adapter(HFPaliGemmaAdapter.load(paligemma_spec), tmp_path)
    assert info["family"] == "hf_paligemma"
    assert info["targets"]["projector"] == 1 and info["dense_by_default"] == ["projector"]
    assert info["compressed"]["vision"] > 0 and info["compressed"]["text"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llava", "paligemma"])
def test_fresh_process_reload(family, llava_spec, paligemma_spec, tmp_path):
    cls, spec = (HFLlavaAdapter, llava_spec) if family == "llava" else (HFPaliGemmaAdapter, paligemma_spec)
    testing.check_adapter(cls.load(spec), tmp_path, fresh_process=True)


# ------------------------------------------------------------------ the kit catches broken adapters
def test_catches_padding_in_the_text_covariance(llava_spec, tmp_path, monkeypatch):
    adapter = HFLlavaAdapter.load(llava_spec)
    original = HFLlavaAdapter.calibration_forward

    def counts_padding(self, group, batch, collector):
        if group == "text":  # the bug: the attention mask is not handed to the collector
            with collector.mask(None), torch.no_grad():
                self.forward_tokens(batch, logits=True)
            return
        original(self, group, batch, collector)

    monkeypatch.setattr(HFLlavaAdapter, "calibration_forward", counts_padding)
    with pytest.raises(AssertionError, match="padding positions counted in the 'text' covariance"):
        testing.check_adapter(adapter, tmp_path)


def test_catches_a_target_its_group_never_calls(paligemma_spec, tmp_path, monkeypatch):
    adapter = HFPaliGemmaAdapter.load(paligemma_spec)
    layers = adapter.target_layers()
    stray = next(l for l in layers if l.group == "text")
    stray = type(stray)(stray.name, "vision", stray.kind, stray.module)  # an LM layer filed under 'vision'
    monkeypatch.setattr(adapter, "target_layers", lambda: [*layers, stray])
    with pytest.raises(AssertionError, match=r"group 'vision'.*received no input"):
        testing.check_adapter(adapter, tmp_path)


def test_catches_a_preparation_that_changes_the_logits(llava_spec, tmp_path):
    adapter = HFLlavaAdapter.load(llava_spec)
    adapter.prepare_for_compression = lambda: adapter.model.get_input_embeddings().weight.data.mul_(2)
    with pytest.raises(AssertionError, match="prepare_for_compression changed the outputs"):
        testing.check_adapter(adapter, tmp_path)


def test_catches_an_export_that_loses_the_compression(llava_spec, tmp_path, monkeypatch):
    adapter = HFLlavaAdapter.load(llava_spec)
    original = copy.deepcopy(adapter.model)

    def exports_the_original(out_dir):  # the bug: writes the weights from before compression
        original.save_pretrained(str(out_dir))
        adapter.save_preprocessing(out_dir)

    monkeypatch.setattr(adapter, "export_dense", exports_the_original)
    with pytest.raises(AssertionError, match="export_dense -> stock load changed the outputs"):
        testing.check_adapter(adapter, tmp_path)


def test_rejects_an_adapter_of_another_kind(tmp_path):
    from vlmpress.adapters.hf_causal_lm import HFCausalLMAdapter
    from vlmpress.reference.lm import save_tiny_causal_lm

    lm = HFCausalLMAdapter.load(f"hf:{save_tiny_causal_lm(tmp_path / 'lm', 'llama')}")
    with pytest.raises(TypeError, match="check_adapter checks vision-language adapters.*HFCausalLMAdapter"):
        testing.check_adapter(lm, tmp_path / "kit")
