"""The playground at /ui in headless Chromium: OCR boxes, PDF pages, Markdown download, streaming
chat and Stop, the Models tab, the auth prompt, API errors, and the first load's weight."""
from __future__ import annotations

import json
import time
from urllib.parse import urlparse

import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.pdf_docs import text_pdf
from tests.server_process import ROOT
from tests.ui.conftest import API_KEY

SAMPLE = ROOT / "samples" / "receipt_en.png"
TEXT_MODEL = "qwen2_5_0_5b"  # the tiny random-weight causal LM: noise, but real streaming


def open_ui(page, server) -> None:
    page.goto(server.url + "/ui/")
    page.wait_for_function("document.querySelectorAll('#ocr-model option').length > 1")


def read_ocr(page, path, *, model="rapidocr", fmt="text", pages="") -> dict:
    page.set_input_files("#ocr-file", str(path))
    page.wait_for_selector("#ocr-run:not([disabled])")
    page.select_option("#ocr-model", model)
    page.select_option("#ocr-format", fmt)
    page.fill("#ocr-pages", pages)
    with page.expect_response(lambda r: urlparse(r.url).path == "/ocr") as answer:
        page.click("#ocr-run")
    assert answer.value.status == 200, answer.value.text()
    page.wait_for_function("document.getElementById('ocr-status').textContent.includes('read by')")
    return answer.value.json()


def drawn_boxes(page) -> int:
    return page.locator("#boxes rect.block").count()


def test_first_load_is_small_and_stays_on_the_machine(page, ui_server, tmp_path):
    sizes: dict[str, int] = {}
    page.on("requestfinished", lambda r: sizes.__setitem__(r.url, r.sizes()["responseBodySize"]
                                                            + r.sizes()["responseHeadersSize"]))
    open_ui(page, ui_server)
    page.wait_for_load_state("networkidle")
    hosts = {urlparse(u).netloc for u in sizes if not u.startswith(("data:", "blob:"))}
    assert hosts == {urlparse(ui_server.url).netloc}, hosts  # no CDN, no font host, nothing else
    total = sum(sizes.values())
    print(f"\nplayground first load: {len(sizes)} requests, {total / 1024:.1f} KB")
    assert total <= 300 * 1024, sizes
    page.screenshot(path=str(tmp_path / "tab-ocr-empty.png"))


def test_ocr_image_draws_one_box_per_block(page, ui_server, tmp_path):
    open_ui(page, ui_server)
    result = read_ocr(page, SAMPLE)
    boxed = [b for b in result["blocks"] if b["box"]]
    assert len(boxed) == len(result["blocks"]) > 3
    page.wait_for_function(f"document.querySelectorAll('#boxes rect.block').length === {len(boxed)}")
    assert drawn_boxes(page) == len(result["blocks"])
    # The overlay is in the page's pixels: its viewBox is the answer's image_size.
    w, h = result["image_size"]
    assert page.get_attribute("#boxes", "viewBox") == f"0 0 {w} {h}"
    first = page.locator("#boxes rect.block").first
    first.hover()
    assert result["blocks"][0]["text"] in page.text_content("#hover-text")
    assert first.locator("title").text_content() == result["blocks"][0]["text"]
    assert page.text_content("#view-text") == result["text"]
    page.screenshot(path=str(tmp_path / "tab-ocr.png"), full_page=True)


def test_pdf_is_shown_page_by_page(page, ui_server, tmp_path):
    data, _ = text_pdf(2)
    pdf = tmp_path / "two-pages.pdf"
    pdf.write_bytes(data)
    open_ui(page, ui_server)
    result = read_ocr(page, pdf)
    assert result["pages"] == 2
    assert page.text_content("#page-label") == "page 1 of 2"
    for index, page_result in enumerate(result["page_results"]):
        if index:
            page.click("#page-next")
            page.wait_for_function(f"document.getElementById('page-label').textContent === 'page {index + 1} of 2'")
        want = len(page_result["blocks"])
        assert want > 0
        page.wait_for_function(f"document.querySelectorAll('#boxes rect.block').length === {want}")
        # The page image is the server's rendering at the size the boxes refer to.
        page.wait_for_function(f"document.getElementById('page-img').naturalWidth === {page_result['image_size'][0]}")
        texts = page.locator("#boxes rect.block title").all_text_contents()
        assert texts == [b["text"] for b in page_result["blocks"]]
    page.screenshot(path=str(tmp_path / "tab-ocr-pdf.png"), full_page=True)
    # Only page 2: one page shown, the second one (its rendering, its boxes).
    only = read_ocr(page, pdf, pages="2")
    assert only["pages"] == 1 and {b["page"] for b in only["blocks"]} == {1}
    page.wait_for_function(f"document.getElementById('page-img').naturalWidth === {result['page_results'][1]['image_size'][0]}")
    page.wait_for_function("document.getElementById('page-label').textContent === 'page 1 of 1'")
    page.wait_for_function(f"document.querySelectorAll('#boxes rect.block').length === {len(only['blocks'])}")
    texts = page.locator("#boxes rect.block title").all_text_contents()
    assert texts == [b["text"] for b in result["page_results"][1]["blocks"]]
    assert "PAGE 2" in page.text_content("#view-text") and "PAGE 1" not in page.text_content("#view-text")


def test_markdown_rendered_raw_and_downloaded(page, ui_server, tmp_path):
    open_ui(page, ui_server)
    result = read_ocr(page, SAMPLE, fmt="markdown")
    assert result["markdown"]
    page.click("#result-tabs [data-view=raw]")
    assert page.text_content("#view-raw") == result["markdown"]
    page.click("#result-tabs [data-view=rendered]")
    assert page.locator("#view-rendered p").count() >= 1
    with page.expect_download() as download:
        page.click("#dl-md")
    assert download.value.suggested_filename == "receipt_en.md"
    saved = tmp_path / "downloaded.md"
    download.value.save_as(saved)
    assert saved.read_text(encoding="utf-8") == result["markdown"]
    with page.expect_download() as download:
        page.click("#dl-json")
    download.value.save_as(tmp_path / "downloaded.json")
    assert json.loads((tmp_path / "downloaded.json").read_text(encoding="utf-8")) == result


def test_api_error_is_shown_as_the_api_message(page, ui_server, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(SAMPLE.read_bytes()[:300])
    open_ui(page, ui_server)
    page.set_input_files("#ocr-file", str(broken))
    page.select_option("#ocr-model", "rapidocr")
    with page.expect_response(lambda r: urlparse(r.url).path == "/ocr") as answer:
        page.click("#ocr-run")
    body = answer.value.json()
    assert answer.value.status == 400
    page.wait_for_selector("#ocr-error:not([hidden])")
    assert page.text_content("#ocr-error") == f"{body['detail']} ({body['code']})"


def engine_state(server, model: str) -> dict[str, float]:
    """The engine's batch size, queue depth and cancelled generations, from /metrics."""
    out = {"batch": 0.0, "queue": 0.0, "cancelled": 0.0}
    for family in text_string_to_metric_families(requests.get(server.url + "/metrics", timeout=10).text):
        for s in family.samples:
            if s.labels.get("model") != model:
                continue
            if s.name == "engine_batch_size":
                out["batch"] = s.value
            elif s.name == "engine_queue_depth":
                out["queue"] = s.value
            elif s.name == "generation_requests_total" and s.labels.get("finish_reason") == "cancelled":
                out["cancelled"] = s.value
    return out


def start_chat(page, server, prompt: str, max_tokens: int) -> None:
    open_ui(page, server)
    page.click("header [data-tab=chat]")
    page.wait_for_function(f"[...document.querySelectorAll('#chat-model option')].some(o => o.value === '{TEXT_MODEL}')")
    page.select_option("#chat-model", TEXT_MODEL)
    page.fill("#chat-max-tokens", str(max_tokens))
    page.fill("#chat-prompt", prompt)
    page.click("#chat-send")


def assistant_text_length(page) -> int:
    return page.evaluate("(document.querySelector('.msg.assistant .text') || {textContent: ''}).textContent.length")


def test_chat_streams_and_the_text_grows(page, ui_server, tmp_path):
    start_chat(page, ui_server, "Tell me a long story", 600)
    lengths = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        lengths.append(assistant_text_length(page))
        if page.get_attribute(".msg.assistant", "data-state") != "streaming":
            break
        time.sleep(0.05)
    growing = sorted(set(n for n in lengths if n > 0))
    assert len(growing) >= 3, lengths  # seen at several lengths while streaming, not all at once
    assert page.get_attribute(".msg.assistant", "data-state") in ("stop", "length")
    assert page.is_disabled("#chat-stop")
    page.screenshot(path=str(tmp_path / "tab-chat.png"), full_page=True)
    # "View code" shows this request as curl and Python.
    page.fill("#chat-prompt", "And then?")
    page.click("#chat-code")
    curl = page.text_content("#code-view")
    assert "/v1/chat/completions" in curl and TEXT_MODEL in curl and '"max_tokens": 600' in curl
    page.click("#code-tabs [data-code=python]")
    python = page.text_content("#code-view")
    assert "from openai import OpenAI" in python and "stream=True" in python and "And then?" in python
    compile(python, "view-code.py", "exec")  # what the page shows is valid Python
    page.click("#code-tabs [data-code=requests]")
    compile(page.text_content("#code-view"), "view-code-requests.py", "exec")


def test_stop_cancels_the_request_on_the_server(page, ui_server, tmp_path):
    before = engine_state(ui_server, TEXT_MODEL)["cancelled"]
    start_chat(page, ui_server, "Count to ten thousand", 3500)
    page.wait_for_function("(document.querySelector('.msg.assistant .text') || {}).textContent?.length > 20")
    assert engine_state(ui_server, TEXT_MODEL)["batch"] >= 1  # it is generating now
    page.click("#chat-stop")
    page.wait_for_function("document.querySelector('.msg.assistant').dataset.state === 'stopped'")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        state = engine_state(ui_server, TEXT_MODEL)
        if state["batch"] == 0 and state["queue"] == 0 and state["cancelled"] > before:
            break
        time.sleep(0.1)
    assert state == {"batch": 0, "queue": 0, "cancelled": before + 1}, state
    assert page.is_enabled("#chat-send")
    page.screenshot(path=str(tmp_path / "tab-chat-stopped.png"), full_page=True)


def test_models_tab_loads_and_unloads(page, ui_server, tmp_path):
    open_ui(page, ui_server)
    page.click("header [data-tab=models]")
    row = page.locator("tr[data-model=rapidocr]")
    row.wait_for()
    if row.locator("td").nth(5).text_content() == "yes":
        row.locator("[data-action=unload]").click()
        page.wait_for_function("document.querySelector('tr[data-model=rapidocr] td:nth-child(6)').textContent === 'no'")
    row.locator("[data-action=load]").click()
    page.wait_for_function("document.querySelector('tr[data-model=rapidocr] td:nth-child(6)').textContent === 'yes'")
    assert "rapidocr" in requests.get(ui_server.url + "/health", timeout=10).json()["loaded_models"]
    uninstalled = page.locator("tr[data-model=qwen_vl_7b]")
    assert uninstalled.locator("td.reason").text_content().startswith("no weights at")
    assert uninstalled.locator("[data-action=load]").is_disabled()
    page.screenshot(path=str(tmp_path / "tab-models.png"), full_page=True)
    row.locator("[data-action=unload]").click()
    page.wait_for_function("document.querySelector('tr[data-model=rapidocr] td:nth-child(6)').textContent === 'no'")
    assert "rapidocr" not in requests.get(ui_server.url + "/health", timeout=10).json()["loaded_models"]


def test_auth_prompt_keeps_the_key_for_the_tab(page, keyed_server, tmp_path):
    page.goto(keyed_server.url + "/ui/")  # the page itself loads without a key
    page.wait_for_selector("#auth-dialog[open]")
    page.screenshot(path=str(tmp_path / "auth-prompt.png"))
    page.fill("#auth-key", "wrong-key")
    page.click("#auth-save")
    page.wait_for_function("document.getElementById('auth-error').textContent === 'invalid API key'")
    assert page.is_visible("#auth-dialog[open]")
    page.fill("#auth-key", API_KEY)
    page.click("#auth-save")
    page.wait_for_function("document.querySelectorAll('#models-table tbody tr').length > 0")
    assert not page.is_visible("#auth-dialog[open]")
    assert page.evaluate("sessionStorage.getItem('chatvlm.apiKey')") == API_KEY
    # Every call carries the key: an OCR through the page works.
    result = read_ocr(page, SAMPLE)
    assert result["model"] == "rapidocr"
    page.reload()  # same tab: the key is still there, no prompt
    page.wait_for_function("document.querySelectorAll('#ocr-model option').length > 1")
    assert not page.is_visible("#auth-dialog[open]")
    page.click("#forget-key")
    page.wait_for_selector("#auth-dialog[open]")
