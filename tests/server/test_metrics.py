"""Prometheus metrics (server/metrics.py): the middleware, GET /metrics and the Metrics methods, in-process."""
from __future__ import annotations

import asyncio

import pytest
from fastapi import APIRouter, FastAPI, HTTPException, WebSocket
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from server import metrics as metrics_mod
from server.metrics import Metrics, MetricsMiddleware


def build_app(metrics: Metrics | None = None) -> FastAPI:
    """A tiny app shaped like ours: routes on an included router with a prefix, plus the metrics router."""
    metrics = metrics or Metrics()
    items = APIRouter()

    @items.get("/items/{item_id}")
    async def get_item(item_id: int) -> dict:
        if item_id == 0:
            raise HTTPException(404, "no such item")
        if item_id == 500:
            raise RuntimeError("a bug")
        return {"id": item_id}

    @items.get("/stream")
    async def stream() -> StreamingResponse:
        async def pieces():
            for i in range(5):
                yield f"data: {i}\n\n"
        return StreamingResponse(pieces(), media_type="text/event-stream")

    @items.websocket("/ws/{session_id}")
    async def ws(websocket: WebSocket, session_id: str) -> None:
        await websocket.accept()
        while (text := await websocket.receive_text()) != "bye":
            await websocket.send_text(text)
        await websocket.close()

    app = FastAPI()
    app.include_router(items, prefix="/api")
    app.include_router(metrics_mod.router)
    app.state.metrics = metrics
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


@pytest.fixture
def client():
    with TestClient(build_app(), raise_server_exceptions=False) as c:
        yield c


def scrape(client: TestClient) -> dict[str, object]:
    """GET /metrics parsed by prometheus_client's own parser: family name -> family."""
    res = client.get("/metrics")
    assert res.status_code == 200
    return {f.name: f for f in text_string_to_metric_families(res.text)}


def value(families: dict, sample_name: str, **labels) -> float | None:
    family_name = sample_name.removesuffix("_total").removesuffix("_count").removesuffix("_sum") \
        .removesuffix("_bucket")
    for sample in families[family_name].samples:
        if sample.name == sample_name and all(sample.labels.get(k) == v for k, v in labels.items()):
            return sample.value
    return None


def label_values(families: dict, family: str, label: str, sample_name: str | None = None) -> set[str]:
    return {s.labels[label] for s in families[family].samples
            if label in s.labels and (sample_name is None or s.name == sample_name)}


def test_counts_by_route_template_and_status(client):
    assert client.get("/api/items/1").status_code == 200
    assert client.get("/api/items/2").status_code == 200
    assert client.get("/api/items/0").status_code == 404       # raised by the route
    assert client.get("/api/items/abc").status_code == 422     # validation
    assert client.get("/api/items/500").status_code == 500     # a bug
    assert client.get("/no/such/path").status_code == 404      # no route at all
    assert client.post("/api/items/1").status_code == 405
    fam = scrape(client)
    tpl = "/api/items/{item_id}"
    assert value(fam, "http_requests_total", route=tpl, method="GET", status="200") == 2
    assert value(fam, "http_requests_total", route=tpl, method="GET", status="404") == 1
    assert value(fam, "http_requests_total", route=tpl, method="GET", status="422") == 1
    assert value(fam, "http_requests_total", route=tpl, method="GET", status="500") == 1
    assert value(fam, "http_requests_total", route=tpl, method="POST", status="405") == 1
    assert value(fam, "http_requests_total", route="other", method="GET", status="404") == 1


def test_duration_histogram_observed(client):
    for i in range(1, 4):
        client.get(f"/api/items/{i}")
    fam = scrape(client)
    assert fam["http_request_duration_seconds"].type == "histogram"
    assert value(fam, "http_request_duration_seconds_count", route="/api/items/{item_id}") == 3
    assert value(fam, "http_request_duration_seconds_sum", route="/api/items/{item_id}") > 0
    assert value(fam, "http_request_duration_seconds_bucket", route="/api/items/{item_id}", le="+Inf") == 3


def test_text_format_parseable_with_seed_names(client):
    res = client.get("/metrics")
    assert res.headers["content-type"].startswith("text/plain")
    fam = {f.name: f for f in text_string_to_metric_families(res.text)}
    # seed 002 shows these two
    assert fam["model_inference_seconds"].type == "histogram"
    assert fam["active_connections"].type == "gauge"
    assert fam["active_connections"].samples[0].value == 1  # the scrape itself
    for name, kind in [("http_requests", "counter"), ("generation_time_to_first_token_seconds", "histogram"),
                       ("generation_tokens", "counter"), ("generation_prompt_tokens", "counter"),
                       ("engine_queue_depth", "gauge"), ("engine_batch_size", "gauge"),
                       ("models_loaded", "gauge"), ("model_loaded", "gauge")]:
        assert fam[name].type == kind, name
    # the scrape before this one is already counted
    assert value(scrape(client), "http_requests_total", route="/metrics", method="GET", status="200") == 1


def test_openmetrics_when_asked(client):
    res = client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert res.headers["content-type"].startswith("application/openmetrics-text")
    assert res.text.rstrip().endswith("# EOF")


def test_route_cardinality_is_bounded(client):
    for i in range(1, 101):
        client.get(f"/api/items/{i}")
    for i in range(50):
        client.get(f"/random/{i}/path")
    client.request("BREW", "/api/items/1")
    fam = scrape(client)
    routes = label_values(fam, "http_requests", "route", "http_requests_total")
    assert routes == {"/api/items/{item_id}", "other"}  # this scrape is counted after it renders
    assert value(fam, "http_requests_total", route="/api/items/{item_id}", method="GET", status="200") == 100
    assert value(fam, "http_requests_total", route="other", method="GET", status="404") == 50
    assert value(fam, "http_requests_total", route="/api/items/{item_id}", method="other", status="405") == 1
    assert label_values(fam, "http_requests", "method") == {"GET", "other"}
    assert label_values(fam, "http_request_duration_seconds", "route") == {"/api/items/{item_id}", "other"}


def test_streaming_route_recorded_once(client):
    res = client.get("/api/stream")
    assert res.status_code == 200 and res.text.count("data:") == 5
    fam = scrape(client)
    assert value(fam, "http_requests_total", route="/api/stream", method="GET", status="200") == 1
    assert value(fam, "http_request_duration_seconds_count", route="/api/stream") == 1


def test_websocket_counts_as_connection_not_request(client):
    with client.websocket_connect("/api/ws/abc") as ws:
        ws.send_text("hi")
        assert ws.receive_text() == "hi"
        fam = scrape(client)
        assert fam["active_connections"].samples[0].value == 2  # the socket and this scrape
        ws.send_text("bye")
    fam = scrape(client)
    assert fam["active_connections"].samples[0].value == 1
    assert not any("/ws" in r for r in label_values(fam, "http_requests", "route"))


def run_asgi(app, metrics: Metrics, path: str = "/s") -> list[tuple[str, float | None, float | None]]:
    """Drive MetricsMiddleware directly; at each message that reaches the server, note what was recorded."""
    mw = MetricsMiddleware(app, metrics)
    seen = []

    def recorded() -> tuple[float | None, float | None]:
        reg = metrics.registry
        return (reg.get_sample_value("http_requests_total", {"route": "other", "method": "GET", "status": "200"}),
                reg.get_sample_value("http_request_duration_seconds_count", {"route": "other"}))

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        seen.append((message["type"], *recorded()))

    scope = {"type": "http", "method": "GET", "path": path, "root_path": "", "headers": [], "query_string": b""}

    async def main():
        try:
            await mw(scope, receive, send)
        except RuntimeError:
            pass

    asyncio.run(main())
    return seen


def test_stream_status_at_start_duration_at_end_no_buffering():
    metrics = Metrics()
    passed_through = []

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for i in range(3):
            await send({"type": "http.response.body", "body": b"x", "more_body": True})
            passed_through.append(i)  # each chunk reached the server before the app went on
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    seen = run_asgi(app, metrics)
    # counted when the response starts, timed only after the last body message
    assert seen[0] == ("http.response.start", 1, None)
    assert all(s == ("http.response.body", 1, None) for s in seen[1:4])
    assert len(seen) == 5 and passed_through == [0, 1, 2]
    reg = metrics.registry
    assert reg.get_sample_value("http_request_duration_seconds_count", {"route": "other"}) == 1
    assert reg.get_sample_value("http_requests_total", {"route": "other", "method": "GET", "status": "200"}) == 1


def test_stream_failing_midway_counted_once_with_its_status():
    metrics = Metrics()

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x", "more_body": True})
        raise RuntimeError("engine died")

    run_asgi(app, metrics)
    reg = metrics.registry
    assert reg.get_sample_value("http_requests_total", {"route": "other", "method": "GET", "status": "200"}) == 1
    assert reg.get_sample_value("http_requests_total", {"route": "other", "method": "GET", "status": "500"}) is None
    assert reg.get_sample_value("http_request_duration_seconds_count", {"route": "other"}) == 1
    assert metrics.active_connections() == 0


def test_metrics_methods():
    m = Metrics()
    m.observe_generation("qwen", ttft_s=0.2, total_s=1.5, prompt_tokens=12, completion_tokens=30,
                         finish_reason="length")
    m.observe_generation("qwen", ttft_s=None, total_s=0.1, prompt_tokens=3, completion_tokens=0,
                         finish_reason="weird reason")
    m.observe_generation("qwen", ttft_s=0.3, total_s=9.0, prompt_tokens=5, completion_tokens=2,
                         finish_reason="cancelled")
    m.observe_inference("rapidocr", 0.05)
    m.observe_load("qwen", 2.0)
    m.set_queue_depth("qwen", 4)
    m.set_batch_size("qwen", 3)
    m.set_batch_size("qwen", 0)
    m.set_loaded("qwen", True)
    m.set_loaded("other", False)
    get = m.registry.get_sample_value
    q = {"model": "qwen"}
    assert get("model_inference_seconds_count", q) == 2  # not the cancelled one
    assert get("model_inference_seconds_sum", q) == pytest.approx(1.6)
    assert get("model_inference_seconds_bucket", {"model": "qwen", "le": "3.0"}) == 2
    assert get("generation_time_to_first_token_seconds_count", q) == 1  # no token, no TTFT
    assert get("generation_tokens_total", q) == 32  # a cancelled generation's tokens were still computed
    assert get("generation_prompt_tokens_total", q) == 20
    assert get("generation_requests_total", {"model": "qwen", "finish_reason": "length"}) == 1
    assert get("generation_requests_total", {"model": "qwen", "finish_reason": "other"}) == 1
    assert get("generation_requests_total", {"model": "qwen", "finish_reason": "cancelled"}) == 1
    assert get("model_inference_seconds_count", {"model": "rapidocr"}) == 1
    assert get("model_load_seconds_count", q) == 1
    assert get("engine_queue_depth", q) == 4
    assert get("engine_batch_size", q) == 0
    assert get("engine_batch_size_per_step_count", q) == 1  # empty steps are not observed
    assert get("models_loaded") == 1
    assert get("model_loaded", {"model": "qwen"}) == 1 and get("model_loaded", {"model": "other"}) == 0


def test_state_gauges_read_from_callbacks_at_scrape_time():
    state = {"active": 3, "loaded": ["a"]}
    m = Metrics(active_connections=lambda: state["active"], loaded_models=lambda: state["loaded"],
                known_models=lambda: ["a", "b"])
    get = m.registry.get_sample_value
    assert get("active_connections") == 3 and get("models_loaded") == 1
    assert get("model_loaded", {"model": "a"}) == 1 and get("model_loaded", {"model": "b"}) == 0
    state.update(active=0, loaded=["a", "b"])
    assert get("active_connections") == 0 and get("models_loaded") == 2
    assert get("model_loaded", {"model": "b"}) == 1


def test_each_app_has_its_own_registry():
    one, two = Metrics(), Metrics()
    with TestClient(build_app(one)) as a, TestClient(build_app(two)) as b:
        a.get("/api/items/1")
        a.get("/api/items/1")
        b.get("/api/items/1")
    labels = {"route": "/api/items/{item_id}", "method": "GET", "status": "200"}
    assert one.registry.get_sample_value("http_requests_total", labels) == 2
    assert two.registry.get_sample_value("http_requests_total", labels) == 1
    assert REGISTRY.get_sample_value("http_requests_total", labels) is None


def test_metrics_route_documented(client):
    op = client.get("/openapi.json").json()["paths"]["/metrics"]["get"]
    assert "text/plain" in op["responses"]["200"]["content"]
