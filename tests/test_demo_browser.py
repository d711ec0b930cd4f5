"""The web demo, driven in a real headless Chromium (Debian's chromium + chromium-driver, via Selenium).

Skipped, with the reason, only when the browser, its driver or the Python packages are missing; CI
installs them. The page must render without the internet: the browser resolves no host but 127.0.0.1 and
the test fails if the page asks for anything outside it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch
import transformers
from tiny_configs import WORDS, tiny_model

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
pytest.importorskip("gradio", reason="gradio is not installed (pip install 'granalign[demo]')")
pytest.importorskip("selenium", reason="selenium is not installed (pip install 'granalign[browser-tests]')")

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from granalign import GranAlignProcessor
from granalign.viz.demo import build_demo, launch_demo
from granalign.viz.scene_gallery import SceneGallerySearch, example_scenes


def _find(variable: str, *candidates: str | None) -> str | None:
    """The first existing file among $variable and the candidates."""
    return next((p for p in (os.environ.get(variable), *candidates) if p and Path(p).is_file()), None)


CHROMIUM = _find("GRANALIGN_CHROMIUM", "/usr/lib/chromium/chromium", shutil.which("chromium"))
CHROMEDRIVER = _find("GRANALIGN_CHROMEDRIVER", shutil.which("chromedriver"))
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip(
        "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver); "
        f"found chromium={CHROMIUM}, chromedriver={CHROMEDRIVER}",
        allow_module_level=True,
    )

CHROME_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,1100",
    # anything outside this machine fails at once instead of hanging the page
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
]
TIMEOUT = 60
MY_CAPTION = "a red circle left of a blue square"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo of a tiny random ViT model, served on 127.0.0.1 in the background."""
    directory = tmp_path_factory.mktemp("demo")
    (directory / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "##s"])
    )
    tokenizer = transformers.BertTokenizerFast(vocab=str(directory / "vocab.txt"))
    image_processor = transformers.ViTImageProcessorPil(size={"height": 32, "width": 32})
    processor = GranAlignProcessor(image_processor, tokenizer, max_length=24)
    model = tiny_model("vit").eval()
    app = build_demo(model, processor, num_examples=2, gallery_size=4)
    url = launch_demo(app, host="127.0.0.1", port=_free_port(), block=False, quiet=True)
    assert url.startswith("http://127.0.0.1:")
    yield {"url": url, "model": model, "processor": processor}
    app.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*CHROME_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER, log_output=sys.stderr))
    driver.set_page_load_timeout(TIMEOUT)
    yield driver
    driver.quit()


def _requested_urls(driver) -> set[str]:
    urls = set()
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.add(message["params"]["request"]["url"])
    return urls


def _loaded_images(driver, selector: str) -> list[dict]:
    """Images under `selector` that finished loading, with their natural size."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0] + ' img'))"
        ".filter(img => img.complete && img.naturalWidth > 0)"
        ".map(img => ({w: img.naturalWidth, h: img.naturalHeight, src: img.src}));",
        selector,
    )


def test_rank_explain_and_search_in_a_real_browser(demo, browser, tmp_path):
    driver, wait = browser, WebDriverWait(browser, TIMEOUT)
    driver.get(demo["url"])
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#rank-captions textarea"))
    external = {u for u in _requested_urls(driver) if u.startswith(("http:", "https:", "ws:", "wss:"))
                and not u.split("//", 1)[1].startswith("127.0.0.1")}  # fmt: skip
    assert not external, f"the page fetches from outside this machine: {sorted(external)}"
    # the built-in example scenes are offered
    wait.until(lambda d: len(_loaded_images(d, "[data-testid='dataset-cell-0-0']")) == 1)

    # upload a scene and type captions, one per line
    scene = example_scenes(1, image_size=96)[0]
    image_path = tmp_path / "scene.png"
    scene.image.save(image_path)
    driver.find_element(By.CSS_SELECTOR, "#rank-image input[type=file]").send_keys(str(image_path))
    wait.until(lambda d: _loaded_images(d, "#rank-image"))
    captions = driver.find_element(By.CSS_SELECTOR, "#rank-captions textarea")
    captions.clear()
    typed = [MY_CAPTION, min(scene.captions, key=len), "two dogs"]
    captions.send_keys("\n".join(typed))
    driver.find_element(By.ID, "rank-button").click()

    # the ranking shows every caption with a score, and the explanation figures appear
    wait.until(lambda d: "Best caption" in d.find_element(By.ID, "rank-best").text)
    ranking = driver.find_element(By.ID, "ranking").text
    for caption in typed:
        assert caption in ranking
    batch = demo["processor"](text=typed, images=[scene.image], padding="longest")
    with torch.no_grad():
        scores = demo["model"](**batch).logits_per_image[0] / demo["model"].temperature_scale()
    best = driver.find_element(By.ID, "rank-best").text
    assert f"“{typed[int(scores.argmax())]}”" in best
    assert f"{scores.max().item():.4f}" in best
    positions = [ranking.index(caption) for caption in typed]  # the table lists them best first
    assert sorted(range(3), key=positions.__getitem__) == torch.argsort(scores, descending=True).tolist()
    wait.until(lambda d: len(_loaded_images(d, "#explain-figures")) >= 1)
    figure = _loaded_images(driver, "#explain-figures")[0]
    assert figure["w"] > 200 and figure["h"] > 100

    # text -> image search over the built-in gallery
    driver.find_element(By.XPATH, "//button[@role='tab'][contains(., 'Search images')]").click()
    query = wait.until(
        lambda d: d.find_element(By.CSS_SELECTOR, "#search-query textarea, #search-query input")
    )
    query.send_keys(MY_CAPTION)
    driver.find_element(By.ID, "search-button").click()
    wait.until(lambda d: len(_loaded_images(d, "#search-results")) >= 4)
    hits = SceneGallerySearch(demo["model"], demo["processor"], num_images=4).search(MY_CAPTION, 4)
    shown = driver.find_element(By.ID, "search-results").text
    assert f"score {hits[0].score:.4f}" in shown
    assert [shown.index(hit.image_id) for hit in hits] == sorted(shown.index(hit.image_id) for hit in hits)
