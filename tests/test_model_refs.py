"""Model references resolve offline; a hub id without a network fails fast with the fix."""

from __future__ import annotations

import time

import pytest

from pipeline.errors import PipelineError
from pipeline.model import refs


def test_packaged_minilm_is_a_local_transformers_folder():
    ref = refs.resolve_model("minilm-l6")
    assert ref.source == "packaged" and (ref.path / "config.json").is_file()
    assert (ref.path / "model.safetensors").is_file()
    tok = refs.load_tokenizer("minilm-l6")
    assert tok("hello world")["input_ids"] == [101, 7592, 2088, 102]


@pytest.mark.parametrize("name", sorted(refs.TINY))
def test_tiny_configs_build_two_layer_64_dim_models(name):
    from transformers import AutoConfig, AutoModel
    ref = refs.resolve_model(name)
    assert ref.source == "tiny" and ref.path is None
    config = AutoConfig.for_model(**ref.config)
    model = AutoModel.from_config(config)
    assert config.vocab_size == len(refs.load_tokenizer(name))
    assert sum(p.numel() for p in model.parameters()) < 3_000_000


def test_smollm2_converts_once_from_the_packaged_gguf(tmp_path, monkeypatch):
    monkeypatch.setattr(refs, "HOME", tmp_path)
    start = time.monotonic()
    ref = refs.resolve_model("smollm2-135m")
    assert ref.path == tmp_path / "models" / "smollm2-135m" and (ref.path / "model.safetensors").is_file()
    again = time.monotonic()
    assert refs.resolve_model("smollm2-135m").path == ref.path  # no second conversion
    assert time.monotonic() - again < 1.0 < again - start
    from transformers import AutoConfig, AutoTokenizer
    config = AutoConfig.from_pretrained(ref.path)
    assert config.model_type == "llama" and config.num_hidden_layers == 30 and config.hidden_size == 576
    assert len(AutoTokenizer.from_pretrained(ref.path)) == 49152


def test_hub_id_without_network_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the same path users without a network take
    start = time.monotonic()
    with pytest.raises(PipelineError) as info:
        refs.resolve_model("someone/not-cached-model")
    assert time.monotonic() - start < 30
    (line,) = [str(p) for p in info.value.problems]
    assert line.startswith("model.name: cannot fetch hub model 'someone/not-cached-model'")
    assert "use a local folder or a packaged model (minilm-l6, smollm2-135m)" in line


def test_unknown_and_incomplete_references(tmp_path):
    with pytest.raises(PipelineError, match="unknown model reference 'nope'"):
        refs.resolve_model("nope")
    with pytest.raises(PipelineError, match="has no config.json"):
        refs.resolve_model(str(tmp_path))


def test_tokenizer_fingerprint_is_content_based():
    assert refs.tokenizer_fingerprint("minilm-l6") == refs.tokenizer_fingerprint("tiny-bert")  # same files
    assert len(refs.tokenizer_fingerprint("minilm-l6")) == 16
