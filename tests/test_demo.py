"""The web demo (tools/demo.py) in a real headless browser: Debian's chromium driven by selenium through
chromedriver. The server runs on a free port of 127.0.0.1 over a tiny pre-training checkpoint and a
caption checkpoint fine-tuned from it; the browser uploads an image, waits for the caption and checks
it is the one the Python API gives, shows the Grad-CAM maps, ranks captions, searches the gallery and
draws the SRCL view; bad uploads give a message on the page. Without chromium the browser test skips
with the reason, except under CI (the ``CI`` environment variable), where it fails."""
from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import shutil
import sys
import threading
import urllib.error
import urllib.request
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

import run_finetune
from tests.pretrain_helpers import TINY_MODEL, one_thread, pretrained, world  # noqa: F401  (fixtures)
from tools import demo

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _missing_browser() -> str:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -r requirements-test.txt)"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} not found (apt-get install -y chromium chromium-driver)"
    return ""


@pytest.fixture(scope="module")
def checkpoints(world, pretrained, tmp_path_factory):
    out = tmp_path_factory.mktemp("caption")
    sets = {**TINY_MODEL, "x-synthetic": "null", "data.image_root": str(world), "data.num_workers": 0,
            "data.train_files": f"[{world / 'caption_train.json'}]", "data.val_file": "null",
            "data.test_file": "null", "data.val_gt_file": "null", "data.test_gt_file": "null",
            "generation.max_length": 8, "train.output_dir": str(out), "train.max_steps": 2, "train.epochs": 1,
            "train.batch_size": 8, "train.progress": "false", "train.num_threads": 1}
    with contextlib.redirect_stdout(io.StringIO()):
        rc = run_finetune.main(["--task", "caption_shapes", "--checkpoint", str(pretrained), "--set",
                                *[f"{k}={v}" for k, v in sets.items()]])
    assert rc == 0
    return {"pretrain": str(pretrained), "caption": str(out / "checkpoint_last.pth")}


@pytest.fixture(scope="module")
def server(world, checkpoints):
    args = demo.build_parser().parse_args(["--checkpoint", checkpoints["pretrain"], "--checkpoint",
                                           checkpoints["caption"], "--shapes", str(world), "--srcl-batch", "8"])
    app = demo.build_app(args)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), demo.make_handler(app))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield app, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


def require_browser() -> None:
    """Skip when chromium, chromedriver or selenium is missing; fail instead under CI."""
    why = _missing_browser()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test: {why}")
        pytest.skip(why)


@pytest.fixture(scope="module")
def browser():
    require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1200,1900", "--no-first-run", "--disable-extensions"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _wait_text(driver, element_id: str, timeout: float = 120) -> str:
    """The text of ``element_id`` once the request it shows has finished."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    el = driver.find_element(By.ID, element_id)
    WebDriverWait(driver, timeout).until(lambda d: el.text.strip() and el.text.strip() != "working...")
    return el.text.strip()


def test_the_page_captions_an_uploaded_image_in_a_real_browser(server, browser, world, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    app, url = server
    image = tmp_path / "upload.png"
    shutil.copy(sorted((world / "images/test").glob("*.png"))[0], image)
    expected = app.serving("caption").caption([str(image)])[0]
    browser.get(url)
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
    assert "caption checkpoint" in browser.find_element(By.ID, "checkpoints").text
    browser.find_element(By.ID, "file").send_keys(str(image))
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "preview").get_attribute("src").startswith("data:image"))
    browser.find_element(By.ID, "caption-btn").click()
    shown = _wait_text(browser, "caption-out")
    assert shown == expected and expected  # the page shows the API's caption of the uploaded file

    browser.find_element(By.ID, "gradcam-btn").click()
    _wait_text(browser, "gradcam-out")
    cams = browser.find_elements(By.CSS_SELECTOR, "#gradcam-out img")
    words = [w.text for w in browser.find_elements(By.CSS_SELECTOR, "#gradcam-out .cam")][2:]
    assert len(cams) == 2 + len(words) and words == ["a", "red", "circle"]

    browser.find_element(By.ID, "rank-btn").click()
    rows = _wait_text(browser, "rank-out").splitlines()
    assert len(rows) == 4 and {r.rsplit(" ", 2)[0] for r in rows[1:]} == {"a red circle", "a blue square", "a green star"}

    browser.find_element(By.ID, "search-btn").click()
    _wait_text(browser, "search-out")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#search-out img")) == min(6, len(app.gallery))

    browser.find_element(By.ID, "srcl-btn").click()
    assert "false negatives" in _wait_text(browser, "srcl-out")
    for img_id in ("srcl-weights", "srcl-truth"):
        assert browser.execute_script(f"return document.getElementById('{img_id}').naturalWidth") == 8 * 18

    # the VQA panel: no loaded checkpoint answers, the page says so instead of failing
    answer = browser.find_element(By.ID, "panel-answer")
    assert "not available: needs a VQA checkpoint" in answer.text
    assert not browser.find_element(By.ID, "answer-btn").is_enabled()
    browser.execute_script("window.scrollTo(0, 0)")
    shot = tmp_path / "demo.png"
    assert browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000

    # a file that is not an image: a message on the page
    bad = tmp_path / "notes.png"
    bad.write_text("these are not pixels")
    before = browser.find_element(By.ID, "preview").get_attribute("src")
    browser.find_element(By.ID, "file").send_keys(str(bad))
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "preview").get_attribute("src") != before)
    browser.find_element(By.ID, "caption-btn").click()
    assert _wait_text(browser, "caption-out") == "notes.png is not an image (it cannot be read as JPEG, PNG, ...)"


def test_requests_the_checkpoint_cannot_serve_and_bad_uploads_are_messages(server):
    app, _ = server
    only_pretrain = demo.DemoApp({c: p for c, p in app.pipelines.items() if p.task == "retrieval"},
                                 app.gallery, app.world, app.opts)
    with pytest.raises(demo.DemoError, match=r"no loaded checkpoint can do this .*load a caption checkpoint"):
        only_pretrain.handle("caption", {"image": {"demo": "shapes 1"}})
    with pytest.raises(demo.DemoError, match="not an image"):
        app.handle("rank", {"image": {"data": "data:image/png;base64,aGVsbG8=", "name": "x.png"}, "texts": "a"})
    with pytest.raises(demo.DemoError, match="not base64"):
        app.handle("rank", {"image": {"data": "data:image/png;base64,%%%"}, "texts": "a"})
    small = demo.DemoApp(app.pipelines, app.gallery, app.world, demo.DemoOptions(max_upload_mb=1e-4))
    import base64
    png = (Path(app.world) / "images/test").glob("*.png").__next__().read_bytes()
    with pytest.raises(demo.DemoError, match=r"too large: .* MB \(limit 0.0001 MB\)"):
        small.handle("rank", {"image": {"data": base64.b64encode(png).decode()}, "texts": "a"})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), demo.make_handler(small))  # the upload limit before reading
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    body = json.dumps({"image": {"data": base64.b64encode(png).decode()}, "texts": "a" * 100_000}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{httpd.server_address[1]}/api/rank", data=body)
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=30)
    assert err.value.code == 413 and "the upload is too large" in json.loads(err.value.read())["error"]
    httpd.shutdown()
    httpd.server_close()
    with pytest.raises(demo.DemoError, match="type one or more captions"):
        app.handle("rank", {"image": {"demo": "shapes 1"}, "texts": "  \n"})
    with pytest.raises(demo.DemoError, match="unknown request"):
        app.handle("shutdown", {})


def test_command_line_errors_are_one_line(tmp_path, capsys, checkpoints):
    assert demo.main(["--checkpoint", str(tmp_path / "missing.pth")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --checkpoint {tmp_path / 'missing.pth'}: no such file"
    assert demo.main(["--checkpoint", checkpoints["pretrain"], "--gallery", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: --gallery {tmp_path / 'nowhere'}: no such folder"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert demo.main(["--checkpoint", checkpoints["pretrain"], "--port", str(port)]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"error: cannot serve on 127.0.0.1:{port}: ") and "--port" in line
    notckpt = tmp_path / "notes.pth"
    notckpt.write_text("not a checkpoint")
    assert demo.main(["--checkpoint", str(notckpt)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "notes.pth" in lines[0]


def test_a_missing_browser_skips_outside_ci_and_fails_under_ci(monkeypatch, tmp_path):
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", str(tmp_path / "no-chromium"))
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no-chromium not found"):
        require_browser()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must run the browser test: .*no-chromium not found"):
        require_browser()
