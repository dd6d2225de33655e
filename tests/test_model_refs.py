"""Model references resolve offline; a hub id without a network fails fast with the fix."""

from __future__ import annotations

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


def test_smollm2_converts_once_from_the_packaged_gguf(tmp_path, monkeypatch, capsys):
    import json

    monkeypatch.setattr(refs, "HOME", tmp_path)
    # tokenizing needs no weights: the tokenizer alone comes out of the GGUF without the model's conversion
    alone = refs.resolve_model("smollm2-135m", weights=False)
    assert alone.path is None and (alone.tokenizer_path / "tokenizer.json").is_file()
    assert not (tmp_path / "models" / "smollm2-135m").exists() and "converting" not in capsys.readouterr().err
    key = refs.tokenizer_fingerprint("smollm2-135m")
    ref = refs.resolve_model("smollm2-135m")
    assert ref.path == tmp_path / "models" / "smollm2-135m" and (ref.path / "model.safetensors").is_file()
    written = (ref.path / "model.safetensors").stat().st_mtime_ns
    assert refs.resolve_model("smollm2-135m").path == ref.path
    assert (ref.path / "model.safetensors").stat().st_mtime_ns == written  # no second conversion
    assert capsys.readouterr().err.count("converting") == 1
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    config = AutoConfig.from_pretrained(ref.path)
    assert config.model_type == "llama" and config.num_hidden_layers == 30 and config.hidden_size == 576
    assert len(AutoTokenizer.from_pretrained(ref.path)) == 49152
    # after the conversion the tokenizer is read from the model's folder, with the same cache key
    assert refs.resolve_model("smollm2-135m", weights=False).tokenizer_path == ref.path
    assert refs.tokenizer_fingerprint("smollm2-135m") == key
    # dequantised weights: no GGUF quantization recorded, so models trained from it can be saved
    assert "quantization_config" not in json.loads((ref.path / "config.json").read_text())
    AutoModelForCausalLM.from_pretrained(ref.path).save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "model.safetensors").is_file()

    # a folder converted before the fix is repaired in place on first use
    stale = json.loads((ref.path / "config.json").read_text())
    stale["quantization_config"] = {"quant_method": "gguf", "dequantize": False}
    (ref.path / "config.json").write_text(json.dumps(stale))
    refs.resolve_model("smollm2-135m")
    assert "quantization_config" not in json.loads((ref.path / "config.json").read_text())


def test_hub_id_without_network_fails_with_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the same path users without a network take
    with pytest.raises(PipelineError) as info:
        refs.resolve_model("someone/not-cached-model")
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
