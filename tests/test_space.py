"""The Space's pieces without a Hub or a browser: `GRANALIGN_INDEX` specs (`granalign.hub.hub_index`), the
wheel `granalign push --with-wheel` uploads, and spaces/requirements.txt against pyproject.toml. The
deployed Space itself, end to end, is tests/test_space_browser.py.
"""

from __future__ import annotations

import importlib.util
import re
import zipfile
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

from granalign.cli import build_parser
from granalign.hub.hub_index import HubFile, _folder, _image_files, locate_index, parse_hub_file
from granalign.hub.push import PushError, check_wheel

REPO_ROOT = Path(__file__).resolve().parents[1]


def _space_app():
    spec = importlib.util.spec_from_file_location("space_app", REPO_ROOT / "spaces" / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    return app


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("hf://me/model/gallery.safetensors", HubFile("me/model", "gallery.safetensors")),
        ("hf://models/me/model/a/b.safetensors", HubFile("me/model", "a/b.safetensors")),
        ("hf://datasets/me/g@v1/idx/x.safetensors", HubFile("me/g", "idx/x.safetensors", "dataset", "v1")),
        ("hf://spaces/me/demo/x.safetensors", HubFile("me/demo", "x.safetensors", "space")),
    ],
)
def test_hub_index_specs(spec, expected):
    assert parse_hub_file(spec) == expected
    assert parse_hub_file(str(expected)) == expected


@pytest.mark.parametrize(
    "spec", ["hf://me/x.safetensors", "hf://datasets/me/g", "hf://me//x", "hf://a/b/../x"]
)
def test_malformed_hub_index_specs_say_what_is_expected(spec):
    with pytest.raises(ValueError, match=r"expected hf://\[datasets/\|spaces/\]namespace/name"):
        parse_hub_file(spec)


def test_a_local_index_is_used_as_it_is(tmp_path):
    index = tmp_path / "gallery.safetensors"
    index.write_bytes(b"")
    assert locate_index(str(index), "me/model") == (index, None)
    assert locate_index(str(index), "me/model", str(tmp_path)) == (index, tmp_path)
    with pytest.raises(FileNotFoundError, match=r"the model '.*' is a local directory"):
        locate_index("gallery.safetensors", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="it is a local path"):
        locate_index("./missing.safetensors", "me/model")


def test_item_ids_map_to_repo_files_as_resolve_image_finds_them():
    files = {"images/a.png", "images/b.jpg", "images/sub/c.webp", "other/a.png"}
    source = HubFile("me/g", "x.safetensors", "dataset")
    assert _image_files(["a.png", "b", "sub/c"], _folder("images"), files, source) == [
        "images/a.png",
        "images/b.jpg",
        "images/sub/c.webp",
    ]
    assert _image_files(["images/a.png"], _folder(None), files, source) == ["images/a.png"]
    with pytest.raises(
        FileNotFoundError, match=r"no image under 'images/' for 1 of the index's 2 items .*'z'"
    ):
        _image_files(["a.png", "z"], "images/", files, source)
    with pytest.raises(ValueError, match="not a path inside the Hub repo"):
        _image_files(["../secret.png"], "", files, source)
    for root in ("../up", "/abs"):
        with pytest.raises(ValueError, match="must be a folder inside"):
            _folder(root)
    assert _folder("/") == _folder(".") == ""


def _wheel(path: Path, members: dict[str, str]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in members.items():
            archive.writestr(name, text)
    return path


def test_check_wheel_takes_only_a_granalign_wheel(tmp_path):
    good = _wheel(tmp_path / "granalign-0.1.0-py3-none-any.whl", {"granalign/__init__.py": ""})
    assert check_wheel(good) == good
    with pytest.raises(PushError, match=r"does not exist; build it with `pip wheel --no-deps"):
        check_wheel(tmp_path / "granalign-0.1.0-py3-none-any.whl.missing")
    other = _wheel(tmp_path / "other-0.1.0-py3-none-any.whl", {"other/__init__.py": ""})
    with pytest.raises(PushError, match=r"is not a granalign-<version>-py3-none-any\.whl wheel"):
        check_wheel(other)
    (tmp_path / "bad").mkdir()
    broken = tmp_path / "bad" / "granalign-0.1.0-py3-none-any.whl"
    broken.write_bytes(b"not a zip")
    with pytest.raises(PushError, match="is not a zip archive"):
        check_wheel(broken)
    (tmp_path / "empty").mkdir()
    empty = _wheel(tmp_path / "empty" / "granalign-0.1.0-py3-none-any.whl", {"README": ""})
    with pytest.raises(PushError, match="does not hold the granalign package"):
        check_wheel(empty)


def test_push_with_wheel_defaults_to_the_dist_wheel_of_this_version(tmp_path, monkeypatch, capsys):
    from granalign import __version__
    from granalign.cli import main

    args = build_parser().parse_args(["push", str(tmp_path), "--repo-id", "me/m", "--with-wheel"])
    assert args.with_wheel == "auto"
    monkeypatch.chdir(tmp_path)
    assert main(["push", str(tmp_path), "--repo-id", "me/m", "--with-wheel", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"wheel 'dist/granalign-{__version__}-py3-none-any.whl' does not exist" in err


def test_the_space_and_the_push_agree_on_wheel_names():
    app = _space_app()
    from granalign.hub.push import WHEEL_NAME

    for name in ("granalign-0.1.0-py3-none-any.whl", "granalign-1.2.3.dev4+g1234-py3-none-any.whl"):
        assert WHEEL_NAME.match(name) and app.WHEEL_NAME.match(name)
    for name in ("granalign-0.1.0-cp311-cp311-linux_x86_64.whl", "sub/granalign-0.1.0-py3-none-any.whl"):
        assert not WHEEL_NAME.match(name) and not app.WHEEL_NAME.match(name)
    assert app.ensure_granalign("me/model") == "installed"  # granalign is installed here


def test_space_requirements_are_granalign_and_demo_dependencies():
    """spaces/requirements.txt: what granalign and its demo extra need, except gradio (the Space's SDK) and
    granalign itself (app.py takes it from the pushed wheel), with the same or tighter versions."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    lines = (REPO_ROOT / "spaces" / "requirements.txt").read_text().splitlines()
    listed = {}
    for line in lines:
        if line.strip() and not line.lstrip().startswith(("#", "-")):
            requirement = Requirement(line)
            listed[requirement.name.lower()] = requirement
    assert "granalign" not in listed and "gradio" not in listed

    def needed(specs: list[str]) -> list[Requirement]:
        out = []
        for spec in specs:
            requirement = Requirement(spec)
            if requirement.name == "granalign":  # granalign[viz] inside the demo extra
                for extra in requirement.extras:
                    out += needed(project["optional-dependencies"][extra])
            elif requirement.name != "gradio":
                out.append(requirement)
        return out

    for requirement in needed(project["dependencies"] + project["optional-dependencies"]["demo"]):
        mine = listed.get(requirement.name.lower())
        assert mine is not None, f"spaces/requirements.txt lacks {requirement}"
        pinned = [s.version for s in mine.specifier if s.operator == "=="]
        assert (
            pinned and requirement.specifier.contains(pinned[0])
        ) or mine.specifier == requirement.specifier, (
            mine,
            requirement,
        )
    # the torch pin is the one setup.sh installs
    torch_pin = re.search(r'"torch==([^"]+)"', (REPO_ROOT / "scripts" / "setup.sh").read_text())[1]
    assert str(listed["torch"].specifier) == f"=={torch_pin}"
