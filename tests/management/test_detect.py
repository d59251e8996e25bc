"""Path confinement, kind detection of Hugging Face folders and the GGUF checks."""
from __future__ import annotations

import json
import os

import pytest

from core.errors import BadRequest
from management.detect import check_framework, check_gguf, confine, detect_kind


@pytest.fixture
def roots(tmp_path):
    models, extra, outside = tmp_path / "weights", tmp_path / "extra", tmp_path / "outside"
    for d in (models, extra, outside):
        d.mkdir()
    return models, extra, outside


def test_paths_inside_the_roots_are_accepted(roots):
    models, extra, _ = roots
    (models / "m").mkdir()
    (extra / "n").mkdir()
    assert confine(str(models / "m"), [models, extra]) == (models / "m").resolve()
    assert confine("m", [models, extra]) == (models / "m").resolve()  # relative: under models_dir
    assert confine(str(extra / "n"), [models, extra]) == (extra / "n").resolve()


@pytest.mark.parametrize("raw", ["/etc/passwd", "/etc", "../outside", "m/../../outside", "", "nope", 7, None,
                                 "a\x00b"])
def test_paths_outside_the_roots_are_refused(roots, raw):
    models, extra, _ = roots
    (models / "m").mkdir()
    with pytest.raises(BadRequest) as exc:
        confine(raw, [models, extra])
    assert exc.value.code == "INVALID_MODEL_PATH" and "/etc" not in exc.value.message


def test_a_symlink_out_of_the_roots_is_refused(roots):
    models, _, outside = roots
    os.symlink(outside, models / "escape")
    with pytest.raises(BadRequest):
        confine(str(models / "escape"), [models])
    with pytest.raises(BadRequest):
        confine("escape", [models])


def _folder(path, config=None, files=()):
    path.mkdir(parents=True)
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    for f in files:
        (path / f).write_text("{}")
    return path


@pytest.mark.parametrize("config,kind", [
    ({"model_type": "qwen2_vl"}, "qwen_vl"), ({"model_type": "qwen2_5_vl"}, "qwen_vl"),
    ({"model_type": "qwen3_vl"}, "qwen_vl"), ({"model_type": "got_ocr2"}, "got_ocr"),
    ({"model_type": "dots_ocr", "architectures": ["DotsOCRForCausalLM"]}, "dots_ocr"),
    ({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}, "causal_lm"),
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "causal_lm"),
])
def test_kinds_are_detected_from_the_files(tmp_path, config, kind):
    assert detect_kind(_folder(tmp_path / "m", config)) == kind


def test_tiny_checkpoints_are_detected(tiny_models_dir):
    want = {"qwen2_5_0_5b": "causal_lm", "qwen_vl_2b": "qwen_vl", "qwen3_vl_2b": "qwen_vl", "got_ocr": "got_ocr",
            "dots_ocr": "dots_ocr"}
    assert {k: detect_kind(tiny_models_dir / k) for k in want} == want


@pytest.mark.parametrize("marker", ["modules.json", "config_sentence_transformers.json"])
def test_a_sentence_transformers_folder_is_an_embedding_model(tmp_path, marker):
    assert detect_kind(_folder(tmp_path / "st", {"model_type": "bert"}, [marker])) == "embedding"


def test_folders_we_cannot_serve_are_refused(tmp_path):
    with pytest.raises(BadRequest) as exc:
        detect_kind(_folder(tmp_path / "a", {"model_type": "bert", "architectures": ["BertModel"]}))
    assert exc.value.code == "UNSUPPORTED_MODEL"
    with pytest.raises(BadRequest):
        detect_kind(_folder(tmp_path / "b"))  # no config.json
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text("[1, 2]")
    with pytest.raises(BadRequest):
        detect_kind(tmp_path / "c")


def test_gguf_files_are_checked(tmp_path):
    good = tmp_path / "m.gguf"
    good.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 16)
    check_gguf(good)
    for name, data in (("m.bin", b"GGUF...."), ("fake.gguf", b"NOPE....")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(BadRequest):
            check_gguf(tmp_path / name)
    (tmp_path / "dir.gguf").mkdir()
    with pytest.raises(BadRequest):
        check_gguf(tmp_path / "dir.gguf")


def test_frameworks():
    for ok in ("transformers", "gguf", "rapidocr", "tesseract", "vllm", "sglang", "llama.cpp", "openai"):
        check_framework(ok)
    with pytest.raises(BadRequest) as exc:
        check_framework("pytorch")
    assert exc.value.code == "UNSUPPORTED_FRAMEWORK" and "transformers, gguf, rapidocr, tesseract, vllm" in exc.value.message
