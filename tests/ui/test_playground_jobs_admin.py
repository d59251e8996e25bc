"""The playground's long-document jobs (progress, Cancel), its HTML tables (rendered, sanitised) and
the management service's start, stop and logs behind a sign-in, in headless Chromium against the
real server."""
from __future__ import annotations

import time
from urllib.parse import urlparse

import requests
from fpdf import FPDF

from scripts.make_doc_pages import FONTS
from tests.pdf_docs import text_pdf
from tests.ui.test_playground import SAMPLE, open_ui, read_ocr

TABLE = ('<table><tr><th>Item</th><th colspan="2" onclick="window.__pwned=3">Price</th></tr>'
         '<tr><td>Apples</td><td>1.50</td><td><img src=x onerror="window.__pwned=1">2.00</td></tr></table>')
SCRIPT = "<script>window.__pwned=2</script> after the table"


def payload_pdf(path) -> None:
    """A born-digital PDF whose text layer (read as is) holds an HTML table with an onerror image and
    an onclick attribute, and a <script> line: what a hostile document could put in OCR text."""
    pdf = FPDF(unit="pt", format=(612, 792))
    pdf.set_auto_page_break(False)
    pdf.add_font("dv", "", FONTS["latin"][0])
    pdf.add_page()
    pdf.set_font("dv", "", 7)
    for i, line in enumerate(["Quarterly figures", TABLE, SCRIPT]):
        pdf.text(20, 40 + 20 * i, line)
    path.write_bytes(bytes(pdf.output()))


def test_html_tables_render_as_tables_and_nothing_executes(page, ui_server, tmp_path):
    doc = tmp_path / "hostile.pdf"
    payload_pdf(doc)
    open_ui(page, ui_server)
    result = read_ocr(page, doc, fmt="markdown")
    assert TABLE in result["markdown"] and SCRIPT in result["markdown"]  # the OCR text carries the payload
    page.click("#result-tabs [data-view=rendered]")
    view = page.locator("#view-rendered")
    assert view.locator("table").count() == 1
    assert view.locator("table tr").count() == 2
    assert view.locator("th").all_text_contents() == ["Item", "Price"]
    assert view.locator("td").all_text_contents() == ["Apples", "1.50", "2.00"]
    assert view.locator("th").nth(1).get_attribute("colspan") == "2"
    assert view.locator("th").nth(1).get_attribute("onclick") is None
    view.locator("th").nth(1).click()
    assert view.locator("img, script").count() == 0
    assert "<script>window.__pwned=2</script>" in view.text_content()  # shown as text, not run
    page.wait_for_timeout(300)  # an image error handler would have fired by now
    assert page.evaluate("window.__pwned") is None
    page.screenshot(path=str(tmp_path / "tab-ocr-table.png"), full_page=True)


def submit_job(page, server, pdf_path):
    """Choose a long PDF and press Read: the page creates a job; returns its POST /jobs/ocr answer."""
    open_ui(page, server)
    page.set_input_files("#ocr-file", str(pdf_path))
    page.wait_for_selector("#ocr-run:not([disabled])")
    page.select_option("#ocr-model", "rapidocr")
    with page.expect_response(lambda r: urlparse(r.url).path == "/jobs/ocr") as answer:
        page.click("#ocr-run")
    assert answer.value.status == 202, answer.value.text()
    return answer.value.json()


def progress(page) -> tuple[bool, float, float]:
    return page.evaluate("[document.getElementById('ocr-job').hidden, document.getElementById('ocr-progress').value,"
                         " document.getElementById('ocr-progress').max]")


def test_a_long_pdf_is_read_as_a_job_with_a_progress_bar(page, ui_server, tmp_path):
    data, _ = text_pdf(6)
    pdf = tmp_path / "six-pages.pdf"
    pdf.write_bytes(data)
    accepted = submit_job(page, ui_server, pdf)
    seen = set()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        hidden, value, maximum = progress(page)
        if hidden and seen:
            break
        if not hidden:
            seen.add((value, maximum))
        time.sleep(0.03)
    assert (6, 6) in seen or any(0 < v < 6 and m == 6 for v, m in seen), seen
    assert any(0 < v < 6 for v, _ in seen), seen  # the bar moved page by page
    page.wait_for_function("document.getElementById('ocr-status').textContent.includes('read by')")
    result = requests.get(f"{ui_server.url}/jobs/{accepted['job_id']}/result", timeout=30).json()
    assert result["pages"] == 6
    assert page.text_content("#page-label") == "page 1 of 6"
    assert page.text_content("#view-text") == result["text"]
    page.wait_for_function(f"document.querySelectorAll('#boxes rect.block').length === "
                           f"{len(result['page_results'][0]['blocks'])}")
    page.screenshot(path=str(tmp_path / "tab-ocr-job.png"), full_page=True)


def test_cancel_stops_the_job_on_the_server(page, ui_server, tmp_path):
    data, _ = text_pdf(40)
    pdf = tmp_path / "forty-pages.pdf"
    pdf.write_bytes(data)
    job_id = submit_job(page, ui_server, pdf)["job_id"]
    page.wait_for_function("document.getElementById('ocr-progress').value >= 1")
    page.screenshot(path=str(tmp_path / "tab-ocr-job-running.png"), full_page=True)
    page.click("#ocr-cancel")
    page.wait_for_selector("#ocr-error:not([hidden])")
    assert "cancelled" in page.text_content("#ocr-error") and "JOB_CANCELLED" in page.text_content("#ocr-error")
    assert page.is_hidden("#ocr-job") and page.is_enabled("#ocr-run")
    status = requests.get(f"{ui_server.url}/jobs/{job_id}", timeout=30).json()
    assert status["status"] == "cancelled" and status["pages_done"] < 40
    time.sleep(1.5)  # no page is read after the cancel
    assert requests.get(f"{ui_server.url}/jobs/{job_id}", timeout=30).json()["pages_done"] <= status["pages_done"] + 1


def loaded_cell(page, model: str) -> str:
    return page.text_content(f"tr[data-model={model}] td:nth-child(6)")


def test_models_start_stop_and_logs_after_signing_in(page, ui_server, tmp_path):
    password = (ui_server.data_dir / "initial_admin_password").read_text().strip()
    open_ui(page, ui_server)
    page.click("header [data-tab=models]")
    row = page.locator("tr[data-model=tesseract]")
    row.wait_for()
    if loaded_cell(page, "tesseract") == "yes":
        row.locator("[data-action=unload]").click()
        page.wait_for_function("document.querySelector('tr[data-model=tesseract] td:nth-child(6)').textContent === 'no'")
    row.locator("[data-action=start]").click()
    page.wait_for_selector("#login-dialog[open]")  # the management routes want a sign-in
    page.screenshot(path=str(tmp_path / "sign-in.png"))
    page.fill("#login-user", "admin")
    page.fill("#login-password", "wrong-password")
    page.click("#login-save")
    page.wait_for_function("!document.getElementById('login-error').hidden")
    assert page.text_content("#login-error")  # the API's message, not a blank
    page.fill("#login-password", password)
    page.click("#login-save")
    page.wait_for_function("document.querySelector('tr[data-model=tesseract] td:nth-child(6)').textContent === 'yes'")
    assert "tesseract" in requests.get(ui_server.url + "/health", timeout=10).json()["loaded_models"]
    assert page.evaluate("sessionStorage.getItem('chatvlm.managementToken')")
    # Logs with follow: the start is there, and the stop appears while the panel is open.
    page.locator("tr[data-model=tesseract] [data-action=logs]").click()
    page.wait_for_function("document.getElementById('logs-view').textContent.includes('running: loaded in')")
    page.locator("tr[data-model=tesseract] [data-action=stop]").click()
    page.wait_for_function("document.getElementById('logs-view').textContent.includes('stopped')")
    page.wait_for_function("document.querySelector('tr[data-model=tesseract] td:nth-child(6)').textContent === 'no'")
    page.screenshot(path=str(tmp_path / "tab-models-logs.png"), full_page=True)
    stopped = requests.post(ui_server.url + "/ocr", files={"file": SAMPLE.open("rb")}, data={"model": "tesseract"},
                            timeout=60)
    assert stopped.status_code == 503 and stopped.json()["code"] == "MODEL_NOT_RUNNING"
    # Start again (no second sign-in: the token is kept for the tab); the server is left as found.
    page.locator("tr[data-model=tesseract] [data-action=start]").click()
    page.wait_for_function("document.querySelector('tr[data-model=tesseract] td:nth-child(6)').textContent === 'yes'")
    assert not page.is_visible("#login-dialog[open]")
    assert page.locator("#logs-view div").count() >= 4
    page.click("#logs-close")
    assert page.is_hidden("#logs")
