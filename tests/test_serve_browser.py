"""The playground in a real headless browser (Debian's chromium and its chromedriver; `.ci/run` installs
them): type a prompt and see the streamed text, fill a mask and see the candidates, compare sentences,
show attention; and the page logs no console errors."""
from __future__ import annotations

import importlib
import shutil
import time

import pytest

from lmforge.serve.app import build_app, build_engines
from lmforge.serve.config import EngineOptions, Limits
from lmforge.serve.metrics import Metrics

from serve_helpers import Server, make_bert, make_classifier, make_gpt, make_qa, make_tagger, post

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs chromium and chromedriver "
                                "(apt-get install chromium chromium-driver; .ci/run does)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_browser")
    limits, metrics = Limits(), Metrics()
    engines = build_engines([f"gpt={make_gpt(d / 'gpt')}", f"bert={make_bert(d / 'bert')}", "minilm-l6"],
                            options=EngineOptions(max_batch=4), limits=limits, metrics=metrics)
    srv = Server(build_app(engines, limits=limits, metrics=metrics))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _wait(driver, predicate, timeout=60):
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: predicate(d))


def _choose(driver, model: str) -> None:
    Select(driver.find_element(By.ID, "model")).select_by_value(model)


def _set(driver, element_id: str, value) -> None:
    box = driver.find_element(By.ID, element_id)
    box.clear()
    box.send_keys(str(value))


def test_playground(server, browser):
    browser.get(server.url + "/")
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#model option")) == 3)
    assert browser.find_element(By.ID, "status").text == "3 model(s) loaded"

    # a GPT: the completion panel only; type a prompt, watch the text arrive in pieces
    _choose(browser, "gpt")
    assert browser.find_element(By.ID, "panel-completions").is_displayed()
    assert not browser.find_element(By.ID, "panel-fill-mask").is_displayed()
    _set(browser, "prompt", "once upon a time")
    _set(browser, "max-tokens", 60)
    _set(browser, "temperature", 0.9)
    _set(browser, "seed", 42)
    browser.execute_script("""  // record when the output changes while it streams
        window.__updates = [];
        new MutationObserver(() => window.__updates.push(performance.now()))
            .observe(document.getElementById('completion-output'), {childList: true, characterData: true, subtree: true});""")
    batch = server.engine("gpt").batch
    step = batch.step
    batch.step = lambda drop=(): time.sleep(0.01) or step(drop)  # tokens 10 ms apart at least: visibly streamed
    try:
        browser.find_element(By.ID, "generate").click()
        _wait(browser, lambda d: d.find_element(By.ID, "status").text.startswith("done"))
    finally:
        batch.step = step
    shown = browser.find_element(By.ID, "completion-output").get_attribute("textContent")
    expected = post(server.port, "/v1/completions", {"model": "gpt", "prompt": "once upon a time", "max_tokens": 60,
                                                     "temperature": 0.9, "top_p": 0.95, "seed": 42})[1]
    assert shown == expected["choices"][0]["text"]
    updates = browser.execute_script("return window.__updates")  # times (ms) the output changed
    assert len(updates) > 5 and updates[-1] - updates[1] > 100  # it grew piece by piece over time: streamed

    # a BERT masked LM: fill a mask, see the candidates with their probabilities
    _choose(browser, "bert")
    assert browser.find_element(By.ID, "panel-fill-mask").is_displayed()
    assert not browser.find_element(By.ID, "panel-completions").is_displayed()
    _set(browser, "mask-text", "the cat sat on the [MASK] .")
    _set(browser, "mask-top-k", 4)
    browser.find_element(By.ID, "fill").click()
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#mask-output .candidate"))
    rows = browser.find_elements(By.CSS_SELECTOR, "#mask-output .candidate")
    api = post(server.port, "/v1/fill-mask", {"model": "bert", "inputs": ["the cat sat on the [MASK] ."], "top_k": 4})[1]
    want = api["data"][0]["masks"][0]
    assert [r.find_element(By.CSS_SELECTOR, "span").text for r in rows] == [c["token"] for c in want]
    assert [r.find_elements(By.CSS_SELECTOR, "span")[-1].text for r in rows] == [f"{c['score']:.3f}" for c in want]

    # a sentence encoder: a similarity matrix with ones on the diagonal; attention: a T x T heatmap
    _choose(browser, "minilm-l6")
    browser.find_element(By.ID, "embed").click()
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#embed-output td"))
    cells = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#embed-output td")]
    assert len(cells) == 9 and cells[0] == cells[4] == cells[8] == "1.00"
    assert float(cells[1]) > float(cells[2])  # guitar ~ instrument more than ~ stock market
    _set(browser, "attention-text", "the cat sat")
    browser.find_element(By.ID, "attention").click()
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#attention-output td"))
    tokens = post(server.port, "/v1/attention", {"model": "minilm-l6", "text": "the cat sat"})[1]["tokens"]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#attention-output td")) == len(tokens) ** 2

    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []


def test_playground_reports_errors_on_the_page(server, browser):
    """A bad request shows its message in the status line (as text, not a console error)."""
    browser.get(server.url + "/")
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#model option")) == 3)
    _choose(browser, "bert")
    _set(browser, "mask-text", "no mask in this sentence")
    browser.find_element(By.ID, "fill").click()
    _wait(browser, lambda d: "no [MASK]" in d.find_element(By.ID, "status").text)
    assert "error" in browser.find_element(By.ID, "status").get_attribute("class")


@pytest.fixture(scope="module")
def task_server(tmp_path_factory):
    pytest.importorskip("lmforge.tasks")
    d = tmp_path_factory.mktemp("serve_browser_tasks")
    models = [f"sentiment={make_classifier(d / 'cls')}", f"ner={make_tagger(d / 'ner')}"]
    if "qa" in importlib.import_module("lmforge.tasks").TASKS:
        models.append(f"qa={make_qa(d / 'qa', steps=40)}")
    engines = build_engines(models)
    srv = Server(build_app(engines))
    yield srv
    srv.stop()


def test_playground_task_models(task_server, browser):
    """Classification probabilities as bars; entities highlighted in the text at their character offsets;
    the answer span highlighted in the context."""
    browser.get_log("browser")  # start with an empty console
    browser.get(task_server.url + "/")
    n_models = len(task_server.app.state.engines)
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#model option")) == n_models)
    _choose(browser, "sentiment")
    assert browser.find_element(By.ID, "panel-classify").is_displayed()
    _set(browser, "classify-text", "the film was great")
    browser.find_element(By.ID, "classify").click()
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#classify-output .candidate"))
    api = post(task_server.port, "/v1/classify", {"model": "sentiment", "inputs": ["the film was great"]})[1]["data"][0]
    assert browser.find_element(By.CSS_SELECTOR, "#classify-output strong").text == api["label"]
    bars = {r.find_element(By.CSS_SELECTOR, "span").text: r.find_elements(By.CSS_SELECTOR, "span")[-1].text
            for r in browser.find_elements(By.CSS_SELECTOR, "#classify-output .candidate")}
    assert bars == {label: f"{p:.3f}" for label, p in api["probs"].items()}

    _choose(browser, "ner")
    assert browser.find_element(By.ID, "panel-tag").is_displayed()
    text = "with alice went to paris"  # words of the training data: an unknown word's tag is arbitrary
    _set(browser, "tag-text", text)
    browser.find_element(By.ID, "tag").click()
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#tag-output p.muted"))
    entities = post(task_server.port, "/v1/tag", {"model": "ner", "inputs": [text]})[1]["data"][0]["entities"]
    marks = browser.find_elements(By.CSS_SELECTOR, "#tag-output mark")
    assert [m.find_element(By.CSS_SELECTOR, "sub").text for m in marks] == [e["type"] for e in entities]
    assert [m.text.rsplit("\n", 1)[0].removesuffix(m.find_element(By.CSS_SELECTOR, "sub").text)
            for m in marks] == [text[e["start"]:e["end"]] for e in entities]
    assert browser.find_element(By.CSS_SELECTOR, "#tag-output p.highlighted").text.replace("\n", "") \
        .startswith("with ")

    if "qa" in task_server.app.state.engines:  # the answer span highlighted in the context
        _choose(browser, "qa")
        assert browser.find_element(By.ID, "panel-qa").is_displayed()
        question, context = "where did bob go ?", "bob went to rome yesterday ."
        _set(browser, "qa-question", question)
        _set(browser, "qa-context", context)
        browser.find_element(By.ID, "qa").click()
        _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#qa-output p"))
        answer = post(task_server.port, "/v1/qa", {"model": "qa", "inputs": [{"question": question,
                                                                              "context": context}]})[1]["data"][0]
        marks = browser.find_elements(By.CSS_SELECTOR, "#qa-output mark")
        assert answer["start"] is not None and len(marks) == 1
        assert marks[0].text.startswith(context[answer["start"]:answer["end"]])
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
