"""The Space (`spaces/app.py`) deployed as on the Hub, driven in headless Chromium: a tiny model is pushed
with `granalign push --with-wheel` to the Hub-API test server (`tests/hub_server.py`), its gallery index and
images go into a dataset repo, and `spaces/app.py` runs in a fresh process whose only settings are
`GRANALIGN_MODEL` and `GRANALIGN_INDEX` (plus `HF_ENDPOINT` at the test server), with an empty `HF_HOME`
and the installed granalign hidden: it must take granalign from the pushed wheel. Nothing here contacts
the real Hub; the browser and its fixture come from tests/test_demo_browser.py (skipped as it is).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from hub_server import HubServer
from test_demo_browser import (  # the browser fixture, and the skip when Chromium is missing
    MY_CAPTION,
    TIMEOUT,
    _free_port,
    _loaded_images,
    _requested_urls,
    browser,  # noqa: F401
)
from tiny_configs import IMAGE_SIZE, tiny_model, tiny_tokenizer
from transformers import ViTImageProcessorPil

from granalign import GranAlignProcessor, __version__

REPO_ROOT = Path(__file__).resolve().parents[1]
ORG, TOKEN = "granalign-org", "hf_alice_write"
MODEL_REPO, GALLERY_REPO = f"{ORG}/grm-space", f"{ORG}/grm-space-gallery"
WHEEL = f"granalign-{__version__}-py3-none-any.whl"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
# runs spaces/app.py with the installed granalign hidden: only one unpacked under HF_HOME can be imported
_LAUNCHER = """
import importlib.machinery, os, runpy, sys
home = os.environ["HF_HOME"]
class WheelOnly:
    def find_spec(self, name, path=None, target=None):
        if name != "granalign":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, [p for p in sys.path if p.startswith(home)])
        if spec is None:
            raise ModuleNotFoundError("granalign is hidden in this process", name=name)
        return spec
sys.meta_path.insert(0, WheelOnly())
sys.argv = [sys.argv[1]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
# the model-repo form of GRANALIGN_INDEX, and a missing file, resolved in another fresh process
_LOCATE = """
import json, sys
from granalign.hub.hub_index import locate_index
index, root = locate_index("gallery.safetensors", sys.argv[1])
try:
    locate_index("missing.safetensors", sys.argv[1])
    missing = None
except FileNotFoundError as error:
    missing = str(error)
print(json.dumps({"index": str(index), "root": str(root), "missing": missing}))
"""


def _build_wheel(out: Path) -> subprocess.Popen:
    """`pip wheel --no-deps` of a copy of this checkout (the build leaves nothing in the working tree)."""
    source = out / "source"
    shutil.copytree(
        REPO_ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    # the build backend from this environment when it has one (offline), else pip's isolated build
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    command = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        *isolation,
        "--wheel-dir",
        str(out),
        str(source),
    ]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen, what: str, timeout: float = 300) -> str:
    try:
        output, _ = process.communicate(timeout=timeout)
    finally:
        process.kill()
    assert process.returncode == 0, f"{what} failed:\n{(output or '')[-4000:]}"
    return output or ""


def _wait_until_served(process: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + 300
    while True:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the Space did not start (rc {process.poll()}):\n{log.read_text()[-4000:]}")
        try:
            with _OPENER.open(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    """Push the model with its wheel and the gallery, then serve spaces/app.py from the test Hub."""
    from granalign.hub.loading import load_model_and_processor
    from granalign.retrieval import GalleryIndex, encode_images
    from granalign.viz.index_search import IndexImageSearch
    from granalign.viz.scene_gallery import example_scenes

    root = tmp_path_factory.mktemp("space")
    wheel_build = _build_wheel(root / "dist")
    image_processor = ViTImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = GranAlignProcessor(image_processor, tiny_tokenizer(root), max_length=24)
    tiny_model("vit").save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    model, processor = load_model_and_processor(str(root / "model"), "cpu")
    # the gallery, as `granalign index gallery.safetensors --images images/` run in the repo's folder stores it
    gallery = root / "gallery"
    (gallery / "images").mkdir(parents=True)
    ids = []
    for scene in example_scenes(5, image_size=48):
        ids.append(f"images/{scene.image_id}.png")
        scene.image.save(gallery / ids[-1])
    outputs = encode_images(model, processor, [gallery / item for item in ids], progress=False)
    GalleryIndex.build(model, outputs, ids).save(gallery / "gallery.safetensors")
    files = {p.relative_to(gallery).as_posix(): p.read_bytes() for p in gallery.rglob("*") if p.is_file()}
    expected = IndexImageSearch(model, processor, gallery / "gallery.safetensors", image_root=gallery)

    with HubServer(tokens={TOKEN: ("alice", [ORG])}) as hub:
        # an older wheel already in the repo: the push replaces it
        hub.put_files("model", MODEL_REPO, {"granalign-0.0.1-py3-none-any.whl": b"old"})
        _finish(wheel_build, "pip wheel")
        push = subprocess.Popen(
            [sys.executable, "-m", "granalign.cli", "push", str(root / "model"), "--repo-id", MODEL_REPO,
             "--with-wheel", str(root / "dist" / WHEEL)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=hub.client_env(root / "push-home", TOKEN),
        )  # fmt: skip
        pushed = _finish(push, "granalign push --with-wheel")
        hub.put_files("dataset", GALLERY_REPO, files)
        hub.put_files("model", MODEL_REPO, files, message="Add the gallery")

        port, log = _free_port(), root / "space.log"
        env = hub.client_env(root / "space-home", GRANALIGN_MODEL=MODEL_REPO, OMP_NUM_THREADS="1",
                             GRANALIGN_INDEX=f"hf://datasets/{GALLERY_REPO}/gallery.safetensors",
                             GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port))  # fmt: skip
        space_dir = root / "space-repo"  # the Space's repository: the three files of spaces/
        shutil.copytree(REPO_ROOT / "spaces", space_dir, ignore=shutil.ignore_patterns("__pycache__"))
        with open(log, "w") as log_file:
            app = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(space_dir / "app.py")], cwd=space_dir,
                                   env=env, stdout=log_file, stderr=subprocess.STDOUT)  # fmt: skip
        # meanwhile: the wheel's resolve URL works as a pip requirement, and the model-repo index form
        url = f"{hub.endpoint}/{MODEL_REPO}/resolve/main/{WHEEL}"
        pip = subprocess.Popen(
            [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(root / "pip-target"), url],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=hub.client_env(root / "pip-home"),
        )  # fmt: skip
        locate = subprocess.Popen([sys.executable, "-c", _LOCATE, MODEL_REPO], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, env=hub.client_env(root / "locate-home"))  # fmt: skip
        try:
            _wait_until_served(app, f"http://127.0.0.1:{port}/", log)
            yield {"url": f"http://127.0.0.1:{port}", "hub": hub, "log": log, "home": root / "space-home",
                   "expected": expected, "pushed": pushed, "pip": _finish(pip, "pip install URL"),
                   "pip_target": root / "pip-target", "wheel_url": url, "gallery": gallery, "root": root,
                   "located": json.loads(_finish(locate, "locate_index").strip().splitlines()[-1])}  # fmt: skip
        finally:
            for process in (app, pip, locate):
                process.kill()
            app.wait(timeout=30)


def test_the_space_takes_granalign_model_and_index_from_the_hub(space):
    log = space["log"].read_text()
    assert f"granalign {__version__} ({WHEEL} from {MODEL_REPO}); model {MODEL_REPO}" in log, log[-3000:]
    unpacked = list((space["home"] / "granalign" / "wheels").glob(f"{WHEEL[:-4]}-*/granalign/__init__.py"))
    assert len(unpacked) == 1
    assert f"searching hf://datasets/{GALLERY_REPO}/gallery.safetensors" in log
    gallery = space["home"] / "granalign" / "galleries" / f"datasets--{GALLERY_REPO.replace('/', '--')}"
    assert sorted(p.name for p in (gallery / "images").iterdir()) == sorted(
        p.name for p in (space["gallery"] / "images").iterdir()
    )
    # from the test Hub into the empty HF_HOME: the model, the index (LFS objects, from its "CDN") and images
    fetched = {
        path.split("?")[0]
        for method, path, status in space["hub"].requests
        if method == "GET" and status < 400
    }
    lfs = [space["root"] / "model" / "model.safetensors", space["gallery"] / "gallery.safetensors"]
    assert {f"/__cdn/{hashlib.sha256(file.read_bytes()).hexdigest()}" for file in lfs} <= fetched
    head = space["hub"].store.get("dataset", GALLERY_REPO).branches["main"]
    assert {f"/datasets/{GALLERY_REPO}/resolve/{head}/{p.relative_to(space['gallery']).as_posix()}"
            for p in (space["gallery"] / "images").iterdir()} <= fetched  # fmt: skip


def test_push_with_wheel_replaces_the_older_wheel_and_its_url_installs(space):
    assert "removed stale files: granalign-0.0.1-py3-none-any.whl" in space["pushed"], space["pushed"]
    repo = space["hub"].store.get("model", MODEL_REPO)
    files = repo.commits[repo.branches["main"]].files
    assert [name for name in files if name.endswith(".whl")] == [WHEEL]
    # what a requirements.txt line `granalign[demo] @ <this url>` makes pip do
    assert (space["pip_target"] / "granalign" / "__init__.py").is_file(), space["pip"][-3000:]
    assert (space["pip_target"] / "granalign" / "hub" / "templates" / "handler.py").is_file()


def test_an_index_in_the_model_repo_is_found_by_its_path(space):
    located = space["located"]
    assert Path(located["index"]).name == "gallery.safetensors"
    assert sorted(p.name for p in (Path(located["root"]) / "images").iterdir()) == sorted(
        p.name for p in (space["gallery"] / "images").iterdir()
    )
    assert f"the model repo {MODEL_REPO!r} has no file 'missing.safetensors'" in located["missing"]


def test_search_works_in_a_real_browser(space, browser, record_property):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver, wait = browser, WebDriverWait(browser, TIMEOUT)
    driver.get(space["url"])
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#rank-captions textarea"))
    assert f"GranAlign demo: {MODEL_REPO}" in driver.find_element(By.TAG_NAME, "body").text
    external = {u for u in _requested_urls(driver) if u.startswith(("http:", "https:", "ws:", "wss:"))
                and not u.split("//", 1)[1].startswith("127.0.0.1")}  # fmt: skip
    assert not external, f"the page fetches from outside this machine: {sorted(external)}"

    driver.find_element(By.XPATH, "//button[@role='tab'][contains(., 'Search images')]").click()
    query = wait.until(
        lambda d: d.find_element(By.CSS_SELECTOR, "#search-query textarea, #search-query input")
    )
    query.send_keys(MY_CAPTION)
    started = time.perf_counter()
    driver.find_element(By.ID, "search-button").click()
    wait.until(lambda d: len(_loaded_images(d, "#search-results")) >= 4)
    record_property("space_search_seconds", round(time.perf_counter() - started, 3))
    hits = space["expected"].search(MY_CAPTION, 4)  # the same index, searched in this process
    shown = driver.find_element(By.ID, "search-results").text
    for hit in hits:
        assert hit.image_id in shown and f"score {hit.score:.4f}" in shown, (hit, shown)
    assert [shown.index(hit.image_id) for hit in hits] == sorted(shown.index(hit.image_id) for hit in hits)
