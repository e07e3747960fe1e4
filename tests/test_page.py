"""The server's page (src/loramem/page.html) in a real browser: headless Chromium (Debian's chromium and
chromium-driver, which .ci/run installs) loads it from a running server, asks a PhoneBook question and reads the
answer and its module from the page; a document title holding HTML shows as text."""

import os
import shutil
from pathlib import Path

import pytest

from loramem import LoraSpec, Memory, facts_from_text
from loramem.corpus import Document
from loramem.synth import SynthSpec
from test_serve import FACTS, FAST, KEY, QUESTION, running

webdriver = pytest.importorskip("selenium.webdriver")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(CHROMEDRIVER is None, reason="needs Debian's chromium-driver (.ci/run installs it)")
TITLE = '<img src=x onerror="document.title=1"><b>Bold</b> & Co'
SCREENSHOT = os.environ.get("LORAMEM_PAGE_SCREENSHOT")  # a path: also keep the screenshot there (docs/page.png)


@pytest.fixture(scope="module")
def page_server(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("page")
    phonebook = Memory.open(root / "pb.mem", create=True, base=tiny)
    phonebook.write(facts_from_text(FACTS), lora=LoraSpec(rank=8, layers="all"), train_spec=FAST, name="phonebook",
                    progress=False)
    titled = Memory.open(root / "titled.mem", create=True, base=tiny)
    list(titled.write_documents([Document.from_text("Zorblat engines use quantum gears.", title=TITLE)],
                                SynthSpec(formats="original"), None, LoraSpec(rank=4), FAST, progress=False))
    for url, _ in running({"pb": phonebook, "titled": titled}):
        yield url.removesuffix("/v1")


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


def test_the_page_asks_a_question_and_shows_the_answer_its_module_and_escaped_titles(page_server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser.get(page_server + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: "401" in d.find_element(By.ID, "status").text or "API key" in d.find_element(By.ID, "status").text)
    browser.find_element(By.ID, "key").send_keys(KEY)
    browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
    wait.until(lambda d: d.find_element(By.ID, "status").text == "2 memories")

    memories = browser.find_element(By.ID, "memories")
    assert "phonebook" in memories.text
    assert TITLE in memories.text  # the title as text: no image, no bold element, the script never ran
    assert memories.find_elements(By.TAG_NAME, "img") == [] and memories.find_elements(By.TAG_NAME, "b") == []
    assert browser.title == "loramem"

    Select(browser.find_element(By.ID, "memory")).select_by_value("pb")
    Select(browser.find_element(By.ID, "mode")).select_by_visible_text("lora")
    browser.find_element(By.ID, "question").send_keys(QUESTION)
    browser.find_element(By.ID, "ask").click()
    wait.until(lambda d: d.find_element(By.ID, "result").is_displayed() or d.find_element(By.ID, "ask-error").text)
    assert browser.find_element(By.ID, "ask-error").text == ""
    assert browser.find_element(By.ID, "answer").text.startswith("705-882-9365")
    first_module = browser.find_element(By.CSS_SELECTOR, "#answer-modules tbody tr td")
    assert first_module.text == "phonebook"
    timing = browser.find_elements(By.CSS_SELECTOR, "#answer-timing tbody td")
    assert len(timing) == 5 and float(timing[-1].text) > 0
    shot = tmp_path / "page.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if SCREENSHOT:
        Path(SCREENSHOT).write_bytes(shot.read_bytes())
