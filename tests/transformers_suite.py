"""transformers' own common test suites, from the sdist of the installed release (never copied here).

`common_suite()` downloads `transformers==<installed>`'s sdist with pip (PyPI is reachable), unpacks its
`tests/test_*_common.py` files into `$GRANALIGN_CACHE/transformers-tests/<version>/` (default
`~/.cache/granalign/...`) as the package `transformers_tests`, and imports it. The sdist lacks four helper
modules the suites import; they get minimal stand-ins that change no assertion:

- `exporters/test_export.py`: `ExportTesterMixin`, the base of `ModelTesterMixin`, whose torch.export tests
  are not part of what `ModelTesterMixin` itself checks (an empty mixin);
- `generation/test_utils.py`: `GenerationTesterMixin`, only used in `isinstance` checks (an empty mixin:
  GranAlign does not generate);
- `utils/test_configuration_utils.py`: `config_common_kwargs`, read only for configs without
  `sub_configs` (GranAlignConfig declares them, so the empty dict is never used);
- the repository's `utils/fetch_hub_objects_for_ci.py` (beside the package: `test_processing_common.py`
  puts `<root>/utils` on `sys.path`): `url_to_local_path`, which maps a test asset's URL to the copy CI
  pre-fetched, or returns the URL; nothing is pre-fetched here, so it returns the URL (the assets are
  read only by the chat-template tests, which skip for a processor without a chat template).

Where pip cannot reach PyPI, the tests skip saying why; with `GRANALIGN_REQUIRE_COMMON_TESTS=1` (set by
`.ci/run`) they fail instead, so CI never passes without them.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from types import ModuleType

import pytest
import transformers

SUITES = ("test_modeling_common.py", "test_configuration_common.py", "test_processing_common.py")
PACKAGE = "transformers_tests"
STAND_INS = {
    "exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
    "generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
    "utils/test_configuration_utils.py": "config_common_kwargs = {}\n",
}
# beside the package, in the cache root (`<root>/utils` is not a package)
ROOT_STAND_INS = {
    "utils/fetch_hub_objects_for_ci.py": (
        "def url_to_local_path(url, return_url_if_not_found=True):\n    return url\n"
    ),
}


def _cache_root() -> Path:
    base = os.environ.get("GRANALIGN_CACHE")
    root = Path(base) if base else Path.home() / ".cache" / "granalign"
    return root / "transformers-tests" / transformers.__version__


def _download_sdist(into: Path) -> Path:
    """`pip download transformers==<installed> --no-binary :all: --no-deps`; the sdist's path."""
    command = [sys.executable, "-m", "pip", "download", f"transformers=={transformers.__version__}"]
    command += ["--no-binary", ":all:", "--no-deps", "-q", "-d", str(into)]
    env = {**os.environ, "PIP_NO_INPUT": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    sdists = sorted(into.glob("transformers-*.tar.gz"))
    if result.returncode != 0 or not sdists:
        raise RuntimeError(f"pip could not download the transformers sdist: {result.stderr.strip()[-500:]}")
    return sdists[0]


def _unpack(sdist: Path, package: Path) -> None:
    """The sdist's common suites plus the stand-ins, as a package directory."""
    prefix = f"transformers-{transformers.__version__}/tests/"
    with tarfile.open(sdist) as archive:
        for name in SUITES:
            member = archive.extractfile(prefix + name)
            if member is None:
                raise RuntimeError(f"{sdist.name} has no {prefix + name}")
            (package / name).write_bytes(member.read())
    for relpath, text in STAND_INS.items():
        path = package / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / "__init__.py").touch()
        path.write_text(text)
    (package / "__init__.py").touch()


def _obtain() -> Path:
    """The cached package directory, made once (atomically) per transformers version."""
    root = _cache_root()
    package = root / PACKAGE
    if all((package / name).is_file() for name in SUITES):
        _write_root_stand_ins(root)
        return root
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as scratch:
        staged = Path(scratch) / PACKAGE
        staged.mkdir()
        _unpack(_download_sdist(Path(scratch)), staged)
        if package.exists():  # an incomplete earlier attempt
            import shutil

            shutil.rmtree(package)
        staged.rename(package)
    _write_root_stand_ins(root)
    return root


def _write_root_stand_ins(root: Path) -> None:
    for relpath, text in ROOT_STAND_INS.items():
        path = root / relpath
        if not path.is_file() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)


def common_suite(module: str) -> ModuleType:
    """Import `transformers_tests.<module>` (e.g. "test_modeling_common"), obtaining it first if needed."""
    try:
        root = _obtain()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as error:
        if os.environ.get("GRANALIGN_REQUIRE_COMMON_TESTS") == "1":
            raise
        pytest.skip(f"transformers' common tests unavailable: {error}", allow_module_level=True)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(f"{PACKAGE}.{module}")
