"""A custom-handler server that does what Inference Endpoints does with a repo's `handler.py`, for tests.

    python endpoint_emulator.py READY_FILE [GO_FILE]

PyPI's `hf-endpoints-emulator` (0.1.1, 2022) does not import with Starlette 1.x (it passes the removed
`on_startup=` argument; gradio, in our `demo` extra, needs Starlette >= 1.0.1) and binds 0.0.0.0, so this
is a minimal stand-in written after huggingface-inference-toolkit's `webservice_starlette.py`, the server
of the Endpoints containers, on the standard library:

* start-up: when `HF_MODEL_DIR` is empty, download the repo `HF_MODEL_ID` (at `HF_REVISION`) into it;
  check that its `requirements.txt` is satisfied (Endpoints pip-installs it; here `pip install --dry-run
  --no-index` must find everything already installed, so nothing is fetched or changed); import
  `handler.py` as the module `handler.EndpointHandler` with the repo on `sys.path` and build
  `EndpointHandler(HF_MODEL_DIR)`;
* `GET /`, `GET /health`: "Ok"; `POST /`, `POST /predict`: the body by its Content-Type (JSON, or an
  image file, which becomes `{"inputs": <PIL RGB image>}`), refused without `inputs`; query parameters
  become `parameters` when the body has none; the handler runs on one worker thread, one request at a
  time (the toolkit's `anyio.to_thread` with `MAX_CONCURRENT_THREADS = 1`); its answer is sent as JSON
  with 200, an exception as `{"error": "..."}` with 400.
* `ENDPOINT_TOKEN`, when set, must come as `Authorization: Bearer <token>` (401 otherwise), as on a
  protected endpoint.

It serves on 127.0.0.1 (a free port) and writes `{"port": ..., "startup_s": ...}` to READY_FILE once it
answers; with GO_FILE it imports first and waits for that file before downloading. `granalign` is
blocked in this process: the handler must work where it is not installed. It serves until killed.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from hub_clients import _BlockGranalign

IMAGE_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/tiff", "image/bmp", "image/gif", "image/webp",
               "image/x-image")  # fmt: skip
JSON_TYPES = ("application/json", "application/json; charset=UTF-8")


def _convert(value: str) -> Any:
    """Query parameters as the toolkit's `convert_params_to_int_or_bool` reads them."""
    if value.isdigit():
        return int(value)
    return {"true": True, "false": False}.get(value.lower(), value)


def check_requirements(model_dir: Path) -> str:
    """`pip install -r requirements.txt`, as Endpoints runs it, but from the installed packages only."""
    requirements = model_dir / "requirements.txt"
    if not requirements.is_file():
        return "no requirements.txt"
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--disable-pip-version-check",
               "-r", str(requirements)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise SystemExit(f"requirements.txt is not satisfied here:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def load_handler(model_dir: Path) -> Any:
    """The toolkit's `check_and_register_custom_pipeline_from_directory`."""
    spec = importlib.util.spec_from_file_location("handler.EndpointHandler", model_dir / "handler.py")
    if spec is None or spec.loader is None:
        raise SystemExit(f"no handler.py in {model_dir}")
    sys.path.insert(0, str(model_dir))
    module = importlib.util.module_from_spec(spec)
    sys.modules["handler.EndpointHandler"] = module
    spec.loader.exec_module(module)
    return module.EndpointHandler(str(model_dir))


def make_server(handler: Any, token: str | None) -> ThreadingHTTPServer:
    # one reused worker thread: torch keeps its thread pool, as under the toolkit's anyio worker threads
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="handler")

    class Routes(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: int, message: str) -> None:
            self._send(status, json.dumps({"error": message}).encode(), "application/json")

        def _authorized(self) -> bool:
            if token is None or self.headers.get("Authorization") == f"Bearer {token}":
                return True
            self._error(401, "Authorization header is correct, but the token seems invalid")
            return False

        def do_GET(self) -> None:
            if urlsplit(self.path).path not in ("/", "/health"):
                return self._error(404, f"no route for GET {self.path}")
            self._send(200, b"Ok", "text/plain; charset=utf-8")

        def do_POST(self) -> None:
            url = urlsplit(self.path)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if url.path not in ("/", "/predict"):
                return self._error(404, f"no route for POST {self.path}")
            if not self._authorized():
                return None
            try:
                content_type = self.headers.get("Content-Type")
                if content_type in JSON_TYPES:
                    data = json.loads(body)
                elif content_type in IMAGE_TYPES:
                    from PIL import Image

                    data = {"inputs": Image.open(io.BytesIO(body)).convert("RGB")}
                else:
                    raise ValueError(f'Content type "{content_type}" not supported')
                if not isinstance(data, dict) or ("inputs" not in data and "instances" not in data):
                    raise ValueError(
                        f"Body needs to provide a inputs key, received: {json.dumps(data)[:200]}"
                    )
                query = dict(parse_qsl(url.query))
                if query and "parameters" not in data:
                    data["parameters"] = {key: _convert(value) for key, value in query.items()}
                start = time.perf_counter()
                prediction = worker.submit(handler, data).result()
                elapsed = (time.perf_counter() - start) * 1000
                print(f"POST {url.path} | Duration: {elapsed:.2f} ms", file=sys.stderr, flush=True)
                accept = self.headers.get("Accept")
                if accept not in (None, "*/*", "application/json"):
                    raise ValueError(f'Accept type "{accept}" not supported')
                self._send(200, json.dumps(prediction).encode(), "application/json")
            except Exception as error:  # as the toolkit: any failure is a 400 with the message
                self._error(400, str(error))

    server = ThreadingHTTPServer(("127.0.0.1", 0), Routes)
    server.daemon_threads = True
    return server


def main(ready_file: str, go_file: str | None = None) -> None:
    sys.meta_path.insert(0, _BlockGranalign())
    started = time.monotonic()
    import torch  # noqa: F401  (imported before waiting, as the handler will)
    import transformers  # noqa: F401
    from huggingface_hub import snapshot_download

    if go_file is not None:
        deadline = time.monotonic() + 300
        while not os.path.exists(go_file):
            if time.monotonic() > deadline:
                raise SystemExit(f"{go_file} never appeared")
            time.sleep(0.05)
        started = time.monotonic()
    model_dir = Path(os.environ["HF_MODEL_DIR"])
    model_dir.mkdir(parents=True, exist_ok=True)
    if not any(model_dir.iterdir()):
        snapshot_download(
            os.environ["HF_MODEL_ID"], revision=os.environ.get("HF_REVISION"), local_dir=model_dir
        )
    pip = check_requirements(model_dir)
    handler = load_handler(model_dir)
    server = make_server(handler, os.environ.get("ENDPOINT_TOKEN"))
    info = {"port": server.server_address[1], "startup_s": time.monotonic() - started, "pip": pip[-2000:],
            "files": sorted(p.name for p in model_dir.iterdir() if p.is_file())}  # fmt: skip
    partial = Path(ready_file + ".partial")
    partial.write_text(json.dumps(info))
    partial.rename(ready_file)
    server.serve_forever()


if __name__ == "__main__":
    main(*sys.argv[1:3])
