"""Seed 000 (LLaMA-Local) against a real server over the tiny checkpoints, driven with the
seed's own Python client code: its non-stream example, its streaming loop and its client class."""
from __future__ import annotations

import re
from typing import Any, Dict, Optional

import pytest
import requests

from tests.server_process import RemoteServer

MAX = 12  # tokens per reply: the tiny models never stop by themselves


def sse_events(body: str) -> list[str]:
    """A conforming SSE parser: the data lines of one event are joined with newlines."""
    events = []
    for block in body.split("\n\n"):
        data = [ln[6:] if ln.startswith("data: ") else ln[5:] for ln in block.split("\n") if ln.startswith("data:")]
        if data:
            events.append("\n".join(data))
    return events


def generate(url: str, **payload) -> dict:
    r = requests.post(f"{url}/generate", json={"stream": False, "max_tokens": MAX, **payload}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


# ---- the seed's own client code (000: "Примеры с Python") ----------------------------------------
class LlamaLocalClient:
    """Клиент для взаимодействия с LLaMA Local API."""

    def __init__(self, base_url: str = "http://localhost:8000"):
        self.base_url = base_url

    def generate(
        self,
        prompt: str,
        temperature: Optional[float] = None,
        max_tokens: Optional[int] = None,
        top_p: Optional[float] = None,
        top_k: Optional[int] = None,
        repeat_penalty: Optional[float] = None,
        stream: bool = False
    ) -> Dict[str, Any]:
        """Генерирует текст на основе промпта."""
        url = f"{self.base_url}/generate"
        payload = {"prompt": prompt, "stream": stream}

        # Добавляем опциональные параметры
        if temperature is not None:
            payload["temperature"] = temperature
        if max_tokens is not None:
            payload["max_tokens"] = max_tokens
        if top_p is not None:
            payload["top_p"] = top_p
        if top_k is not None:
            payload["top_k"] = top_k
        if repeat_penalty is not None:
            payload["repeat_penalty"] = repeat_penalty

        try:
            response = requests.post(url, json=payload, timeout=300)
            response.raise_for_status()
            return response.json()
        except requests.exceptions.RequestException as e:
            print(f"Ошибка при запросе: {e}")
            raise

    def generate_stream(
        self,
        prompt: str,
        temperature: Optional[float] = None,
        max_tokens: Optional[int] = None,
        **kwargs
    ):
        """Генерирует текст в streaming режиме."""
        url = f"{self.base_url}/generate"
        payload = {"prompt": prompt, "stream": True}

        if temperature is not None:
            payload["temperature"] = temperature
        if max_tokens is not None:
            payload["max_tokens"] = max_tokens

        # Добавляем остальные параметры
        payload.update(kwargs)

        try:
            response = requests.post(url, json=payload, stream=True, timeout=300)
            response.raise_for_status()

            for line in response.iter_lines():
                if line:
                    line = line.decode('utf-8')
                    if line.startswith('data: '):
                        token = line[6:]
                        if token == '[DONE]':
                            break
                        elif token.startswith('[ERROR'):
                            raise Exception(token)
                        else:
                            yield token
        except requests.exceptions.RequestException as e:
            print(f"Ошибка при streaming запросе: {e}")
            raise

    def health(self) -> Dict[str, Any]:
        """Проверяет состояние сервера."""
        url = f"{self.base_url}/health"
        response = requests.get(url)
        return response.json()

    def model_info(self) -> Dict[str, Any]:
        """Получает информацию о модели."""
        url = f"{self.base_url}/model-info"
        response = requests.get(url)
        response.raise_for_status()
        return response.json()


def test_seed_non_stream_example(tiny_server):
    url = f"{tiny_server.url}/generate"
    payload = {
        "prompt": "Объясни квантовую физику простыми словами",
        "temperature": 0.7,
        "max_tokens": MAX,
        "top_p": 0.9,
        "top_k": 40,
        "repeat_penalty": 1.1,
        "stream": False
    }
    response = requests.post(url, json=payload)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["prompt"] == payload["prompt"] and isinstance(data["text"], str) and data["text"]
    usage = data["usage"]
    assert usage["prompt_tokens"] > 0 and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert data["finish_reason"] == "length" and usage["completion_tokens"] == MAX
    assert data["model"] == "qwen2_5_0_5b"


def test_seed_streaming_loop(tiny_server, capsys):
    url = f"{tiny_server.url}/generate"
    payload = {
        "prompt": "Расскажи длинную историю о космосе",
        "temperature": 0.8,
        "max_tokens": MAX,
        "stream": True
    }

    response = requests.post(url, json=payload, stream=True)

    print("Ответ модели:")
    for line in response.iter_lines():
        if line:
            line = line.decode('utf-8')
            if line.startswith('data: '):
                token = line[6:]  # Убираем 'data: '
                if token == '[DONE]':
                    print("\n\nГенерация завершена!")
                    break
                elif token.startswith('[ERROR'):
                    print(f"\nОшибка: {token}")
                    break
                else:
                    print(token, end='', flush=True)

    assert response.headers["content-type"].startswith("text/event-stream")
    out = capsys.readouterr().out
    assert out.startswith("Ответ модели:\n") and out.endswith("\n\nГенерация завершена!\n"), out
    assert "Ошибка" not in out and len(out) > len("Ответ модели:\n\n\nГенерация завершена!\n")


def test_seed_client_class(tiny_server):
    client = LlamaLocalClient(tiny_server.url)
    health = client.health()
    assert health["status"] == "healthy" and isinstance(health["model_loaded"], bool)
    result = client.generate(prompt="Что такое Python?", temperature=0.7, max_tokens=MAX, stream=False)
    assert result["text"] and result["prompt"] == "Что такое Python?"
    info = client.model_info()
    assert info["path"] == "qwen2_5_0_5b" and info["loaded"] is True and info["n_ctx"] == 4096
    tokens = list(client.generate_stream(prompt="Расскажи о машинном обучении", temperature=0.7, max_tokens=MAX))
    assert tokens and "".join(tokens).strip()
    # extra parameters through **kwargs reach the server too
    assert list(client.generate_stream(prompt="x", max_tokens=2, top_k=5, repeat_penalty=1.3))


def test_stream_equals_non_stream_for_greedy(tiny_server):
    prompt, n = "Что такое машинное обучение?", 24
    first = generate(tiny_server.url, prompt=prompt, temperature=0, max_tokens=n)
    assert generate(tiny_server.url, prompt=prompt, temperature=0, max_tokens=n)["text"] == first["text"]
    r = requests.post(f"{tiny_server.url}/generate", json={"prompt": prompt, "temperature": 0, "max_tokens": n},
                      timeout=60)  # stream is the default
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and all(e for e in events)  # empty pieces are not sent
    want = re.sub(r"\r\n?", "\n", first["text"])  # SSE itself turns CR into a line break
    assert "".join(events[:-1]) == want
    # the seed's line loop sees the same text, less the line breaks inside pieces
    seed_text = "".join(ln[6:] for ln in r.text.split("\n") if ln.startswith("data: ") and ln != "data: [DONE]")
    assert seed_text == want.replace("\n", "")


@pytest.mark.parametrize("payload", [
    {"prompt": ""}, {"prompt": "x", "temperature": 2.5}, {"prompt": "x", "max_tokens": 4097},
    {"prompt": "x", "top_p": 1.1}, {"prompt": "x", "top_k": 0}, {"prompt": "x", "repeat_penalty": 0.5},
    {"temperature": 0.5}])
def test_bad_parameters(tiny_server, payload):
    r = requests.post(f"{tiny_server.url}/generate", json=payload, timeout=10)
    assert r.status_code == 422
    body = r.json()
    assert body["code"] == "VALIDATION_ERROR" and isinstance(body["detail"], str)


def test_unknown_model(tiny_server):
    for stream in (True, False):
        payload = {"prompt": "x", "model": "llama-3.2-3b", "stream": stream}
        r = requests.post(f"{tiny_server.url}/generate", json=payload, timeout=10)
        assert r.status_code == 404 and r.json()["code"] == "MODEL_NOT_FOUND"  # JSON, even when streaming was asked
    r = requests.get(f"{tiny_server.url}/model-info", params={"model": "nope"}, timeout=10)
    assert r.status_code == 404 and r.json()["code"] == "MODEL_NOT_FOUND"


def test_model_info_fields(tiny_server):
    info = requests.get(f"{tiny_server.url}/model-info", timeout=10).json()
    assert {"path", "loaded", "n_ctx", "n_gpu_layers", "temperature", "top_p", "top_k", "repeat_penalty",
            "max_tokens", "stream"} <= set(info)
    assert "/" not in info["path"] and info["n_gpu_layers"] == 0 and info["stream"] is True
    vlm = requests.get(f"{tiny_server.url}/model-info", params={"model": "qwen_vl_2b"}, timeout=10).json()
    assert vlm["model"] == "qwen_vl_2b" and vlm["path"] == "qwen_vl_2b"


def test_no_text_model_is_503(tmp_path):
    # Out of the box the packaged SmolLM2 serves; with only uninstalled text models listed, 503.
    env = {"CHATVLM_DEFAULTS__TEXT": '["qwen2_5_0_5b"]', "CHATVLM_ALIASES": '{"qwen": "qwen2_5_0_5b"}'}
    with RemoteServer(models_dir=tmp_path, env=env) as server:
        r = requests.get(f"{server.url}/model-info", timeout=10)
        assert r.status_code == 503 and r.json()["code"] == "MODEL_NOT_INSTALLED" and r.json()["detail"]
        r = requests.post(f"{server.url}/generate", json={"prompt": "x"}, timeout=10)
        assert r.status_code == 503 and r.json()["code"] == "MODEL_NOT_INSTALLED"


def test_error_mid_stream_then_done(tiny_server):
    """Unloading the model under a running stream fails it: an [ERROR] line, then [DONE]."""
    generate(tiny_server.url, prompt="warm up", max_tokens=1)
    r = requests.post(f"{tiny_server.url}/generate", json={"prompt": "x", "max_tokens": 3000}, stream=True, timeout=60)
    lines = r.iter_lines(decode_unicode=True)
    assert next(ln for ln in lines if ln.startswith("data: "))  # generation is under way
    requests.post(f"{tiny_server.url}/api/v1/models/qwen2_5_0_5b/unload", timeout=30).raise_for_status()
    rest = [ln[6:] for ln in lines if ln.startswith("data: ")]
    assert rest[-1] == "[DONE]" and rest[-2].startswith("[ERROR] ") and "unloaded" in rest[-2], rest[-3:]
    assert len(rest) < 3000
