"""The chat page at `/`, end to end in headless Chromium (Debian's `chromium` + `chromium-driver`, driven by
selenium): open the page, send a message, see the reply arrive in several streamed pieces and equal the
API's greedy answer, switch adapter, compare two models side by side. Writes a screenshot
(`$ALIGNKIT_TEST_ARTIFACTS/serve-chat-page.png`, else pytest's tmp folder).

Without the browser this test is skipped and says why, by name; with ALIGNKIT_REQUIRE_BROWSER=1 (set by
.ci/run, which installs the browser) a missing browser is a failure instead."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from alignkit.serve.engine import Engine, EngineConfig, SamplingParams

from .conftest import running_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install 'alignkit[test]')"
    if CHROMIUM is None or DRIVER is None:
        return ("headless Chromium is not installed: chromium and chromedriver not found on PATH "
                "(apt-get install chromium chromium-driver; .ci/run does this)")
    return None


@pytest.fixture(scope="module")
def browser():
    why = _missing()
    if why:
        if os.environ.get("ALIGNKIT_REQUIRE_BROWSER") == "1":
            pytest.fail(f"test_chat_page: {why}")
        pytest.skip(f"test_chat_page: {why}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,800"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def chat_reply(engine, model, text, max_tokens):
    tok = engine.tokenizer
    msgs = [{"role": "user", "content": text}]
    ids = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
              add_special_tokens=False)["input_ids"]
    return engine.generate(model, ids, SamplingParams(max_tokens=max_tokens, temperature=0.0))["choices"][0]["text"]


def test_chat_page_streams_switches_and_compares(browser, serve_stack, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    engine = Engine(serve_stack, EngineConfig(max_new_tokens=64))
    wait = WebDriverWait(browser, 30)
    with running_server(engine) as url:
        browser.get(url + "/")
        wait.until(lambda d: len(Select(d.find_element(By.ID, "model")).options) == 4)
        assert [o.get_attribute("value") for o in Select(browser.find_element(By.ID, "model")).options] == \
            ["base", "polite", "terse", "both"]
        mt = browser.find_element(By.ID, "max-tokens")
        mt.clear()
        mt.send_keys("16")

        def send(text):
            box = browser.find_element(By.ID, "prompt")
            box.send_keys(text)
            browser.find_element(By.ID, "send").click()

        def replies(pane, count):
            """textContent (exact, control characters included) of the finished replies in a pane."""
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, f"#log-{pane} .msg.assistant.done")) == count)
            return browser.find_elements(By.CSS_SELECTOR, f"#log-{pane} .msg.assistant.done")

        def text(el):
            return browser.execute_script("return arguments[0].textContent", el)

        Select(browser.find_element(By.ID, "model")).select_by_value("polite")
        send("Hello there")
        got = replies(0, 1)[0]
        polite = text(got)
        assert polite == chat_reply(engine, "polite", "Hello there", 16)
        assert int(got.get_attribute("data-chunks")) > 1  # streamed in pieces, not in one go
        stats = browser.find_element(By.ID, "stats-0").text
        assert "tokens/s" in stats and "latency" in stats and "first token" in stats

        # switch adapter: the chat starts over with the other model's answer
        Select(browser.find_element(By.ID, "model")).select_by_value("terse")
        assert browser.find_elements(By.CSS_SELECTOR, "#log-0 .msg") == []
        send("Hello there")
        terse = text(replies(0, 1)[0])
        assert terse == chat_reply(engine, "terse", "Hello there", 16)
        assert terse != polite

        # side by side: terse vs the base on the same prompt
        Select(browser.find_element(By.ID, "compare")).select_by_value("base")
        assert browser.find_element(By.ID, "pane-1").is_displayed()
        send("The quick brown fox")
        left, right = text(replies(0, 1)[0]), text(replies(1, 1)[0])
        assert left == chat_reply(engine, "terse", "The quick brown fox", 16)
        assert right == chat_reply(engine, "base", "The quick brown fox", 16)
        assert left != right
        assert browser.find_element(By.ID, "title-1").text == "base"
        assert browser.find_element(By.ID, "error").text == ""
        out = Path(os.environ.get("ALIGNKIT_TEST_ARTIFACTS", tmp_path))
        out.mkdir(parents=True, exist_ok=True)
        shot = out / "serve-chat-page.png"
        assert browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000


def test_chat_page_max_tokens_empty_is_the_servers_default_and_0_is_sent(browser, serve_stack):
    """The page sent `parseInt(field) || 64`: an empty field or a typed 0 went out as max_tokens 64 (here past the
    server's limit of 24: a 400 the user never asked for). Now an empty field (the page's default) leaves max_tokens
    out (the server's default: the context left, capped by its max_new_tokens) and a 0 is sent as typed, so the page
    shows the server's 400 naming it. The bodies are read from a wrapped window.fetch."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    engine = Engine(serve_stack, EngineConfig(max_new_tokens=24))
    wait = WebDriverWait(browser, 30)
    with running_server(engine) as url:
        browser.get(url + "/")
        wait.until(lambda d: len(Select(d.find_element(By.ID, "model")).options) == 4)
        browser.execute_script("""window.sent = []; const f = window.fetch;
            window.fetch = (u, o) => { if (o && o.body) window.sent.push(JSON.parse(o.body)); return f(u, o); };""")
        assert browser.find_element(By.ID, "max-tokens").get_attribute("value") == ""  # the page's default

        def send(text):
            browser.find_element(By.ID, "prompt").send_keys(text)
            browser.find_element(By.ID, "send").click()

        send("Hello there")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#log-0 .msg.assistant.done, #log-0 .msg.failed"))
        assert browser.find_element(By.ID, "error").text == ""
        assert len(browser.find_elements(By.CSS_SELECTOR, "#log-0 .msg.assistant.done")) == 1
        sent = browser.execute_script("return window.sent")
        assert len(sent) == 1 and "max_tokens" not in sent[0]
        stats = browser.find_element(By.ID, "stats-0").text
        assert int(stats.split(" tokens")[0]) <= 24

        mt = browser.find_element(By.ID, "max-tokens")
        mt.send_keys("0")
        send("Hello again")
        wait.until(lambda d: d.find_element(By.ID, "error").text != "")
        assert browser.execute_script("return window.sent")[1]["max_tokens"] == 0
        assert "max_tokens must be an integer >= 1, got 0" in browser.find_element(By.ID, "error").text
