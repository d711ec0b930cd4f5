"""Options of the precomp loader: `captions_per_image` (counts other than 5) and `cache_dir` (where the
float32 Arrow copy goes), also through `load_alignment_dataset`."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest

from granalign.data.loading import load_alignment_dataset
from granalign.data.precomputed import load_precomp
from granalign.data.schema import validate_dataset_dict

R, D = 3, 4


def _write(folder: Path, prefix: str, num_images: int, per_image: int, seed: int = 0) -> np.ndarray:
    folder.mkdir(parents=True, exist_ok=True)
    features = np.random.default_rng(seed).standard_normal((num_images, R, D)).astype(np.float32)
    np.save(folder / f"{prefix}_ims.npy", features)
    lines = [f"{prefix} image {i} caption {k}" for i in range(num_images) for k in range(per_image)]
    (folder / f"{prefix}_caps.txt").write_text("".join(line + "\n" for line in lines))
    return features


@pytest.fixture
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HOME and the datasets cache under `tmp_path`, so writes to the default cache can be seen."""
    home, default = tmp_path / "home", tmp_path / "hf_datasets_cache"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(default))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", default)  # read at import time
    return default


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_one_caption_per_image(tmp_path: Path, isolated_cache: Path) -> None:
    folder = tmp_path / "one_caption"
    train = _write(folder, "train", 5, 1)  # 5 rows, 5 lines: also fits "each image repeated 5 times"
    test = _write(folder, "test", 3, 1, seed=1)
    cache = str(tmp_path / "cache")
    data = load_precomp(folder, captions_per_image=1, cache_dir=cache)
    validate_dataset_dict(data)
    assert list(data) == ["train", "test"] and data["train"].num_rows == 5 and data["test"].num_rows == 3
    assert data["train"][4]["captions"] == ["train image 4 caption 0"]
    assert data["test"]["captions"] == [[f"test image {i} caption 0"] for i in range(3)]
    np.testing.assert_array_equal(np.asarray(data["train"][2]["region_features"]), train[2])
    np.testing.assert_array_equal(np.asarray(data["test"][1]["region_features"]), test[1])
    for kind in ("precomp", None):  # the option passes through the entry point, detected kind or not
        routed = load_alignment_dataset(folder, kind=kind, captions_per_image=1, cache_dir=cache)
        assert routed["train"]["captions"] == data["train"]["captions"]


def test_a_mismatched_caption_count_names_captions_per_image(tmp_path: Path, isolated_cache: Path) -> None:
    cache = str(tmp_path / "cache")
    one = tmp_path / "one"
    _write(one, "train", 5, 1)
    with pytest.raises(ValueError, match="captions_per_image") as error:
        load_precomp(one, cache_dir=cache)  # default 5: read as one row per caption, rows differ
    message = str(error.value)
    assert "5 rows" in message and "5 lines" in message and "captions_per_image=5" in message
    assert "captions_per_image=1" in message

    odd = tmp_path / "odd"
    _write(odd, "train", 3, 1)
    with pytest.raises(ValueError, match="captions_per_image") as error:
        load_precomp(odd, cache_dir=cache)
    assert "3 rows" in str(error.value) and "3 lines" in str(error.value)

    two = tmp_path / "two"
    _write(two, "train", 4, 2)
    with pytest.raises(ValueError, match="captions_per_image") as error:
        load_alignment_dataset(two, kind="precomp", cache_dir=cache)
    message = str(error.value)
    assert "4 rows" in message and "8 lines" in message and "captions_per_image=5 (20 lines)" in message
    assert "pass captions_per_image=2" in message
    data = load_alignment_dataset(two, kind="precomp", captions_per_image=2, cache_dir=cache)
    assert data["train"][3]["captions"] == ["train image 3 caption 0", "train image 3 caption 1"]

    with pytest.raises(ValueError, match="captions_per_image must be an integer >= 1"):
        load_precomp(two, captions_per_image=0, cache_dir=cache)
    assert not _files(isolated_cache)


def test_cache_dir_holds_the_arrow_copy_and_the_default_cache_stays_empty(
    tmp_path: Path, isolated_cache: Path
) -> None:
    folder = tmp_path / "precomp"
    _write(folder, "train", 4, 5)
    _write(folder, "dev", 2, 5, seed=1)
    home = Path.home()
    mine = tmp_path / "my_cache"
    data = load_precomp(folder, cache_dir=str(mine))
    for split in data.values():
        assert split.cache_files and all(Path(f["filename"]).is_relative_to(mine) for f in split.cache_files)
    assert any(p.suffix == ".arrow" for p in _files(mine))
    assert not _files(isolated_cache), "files were written to the default datasets cache"
    assert not _files(home), "files were written under HOME"

    # Without cache_dir the copy goes to the default cache (here the isolated one): the check above can fail.
    default = load_precomp(folder)
    assert all(Path(f["filename"]).is_relative_to(isolated_cache) for f in default["train"].cache_files)
    assert default["train"]["captions"] == data["train"]["captions"]
