"""The real-data benchmark's summaries (benchmarks/real_data.py): pure functions of result rows, no training."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import real_data


def _row(variant: str, fold: int, seed: int, rsum: float) -> dict:
    return {"variant": variant, "fold": fold, "seed": seed, "split_seed": 0, "rsum": rsum}


GRM, GLOBAL = "full[recipe]", "global_baseline[e12]"
# GRM: seeds 0 and 1 on folds 0 and 1; seed 2 on fold 0 only (an unfinished run, left out of the seed means)
ROWS = [
    _row(GRM, 0, 0, 240.0),
    _row(GRM, 1, 0, 230.0),
    _row(GRM, 0, 1, 238.0),
    _row(GRM, 1, 1, 234.0),
    _row(GRM, 0, 2, 200.0),
    _row(GLOBAL, 0, 0, 230.0),
    _row(GLOBAL, 1, 0, 226.0),
    _row(GLOBAL, 0, 1, 236.0),
    _row(GLOBAL, 1, 1, 234.0),
]


def test_seed_means_average_each_seed_over_its_splits_and_drop_seeds_missing_a_split():
    assert real_data.seed_means(ROWS, GRM) == {0: 235.0, 1: 236.0}
    assert real_data.seed_means(ROWS, GLOBAL) == {0: 228.0, 1: 235.0}
    repeated = [*ROWS, _row(GLOBAL, 1, 0, 230.0)]  # seed 0 on fold 1 twice: 226 and 230 -> 228
    assert real_data.seed_means(repeated, GLOBAL)[0] == pytest.approx((230.0 + 228.0) / 2)


def test_seeds_over_splits_says_whether_the_spreads_are_apart_from_the_named_grm_variant():
    table = real_data.seeds_over_splits(ROWS, GRM)
    grm_line, global_line = (
        next(line for line in table.splitlines() if line.startswith(f"| {name} |")) for name in (GRM, GLOBAL)
    )
    assert "0: 235.0 / 1: 236.0" in grm_line and "235.5 ± 0.7" in grm_line
    assert "231.5 ± 4.9" in global_line and global_line.endswith("| no |")  # 235.5 - 231.5 < 0.7 + 4.9
    apart = [row if row["variant"] != GLOBAL else {**row, "rsum": row["rsum"] - 10} for row in ROWS]
    assert real_data.seeds_over_splits(apart, GRM).splitlines()[-1].endswith("| yes |")


def test_paired_differences_compare_with_the_labelled_grm_variant():
    table = real_data.paired_differences(ROWS, GRM)
    # global minus GRM: fold 0 233 - 226 (GRM's seeds 0-2 averaged) = +7, fold 1 230 - 232 = -2
    assert f"| {GLOBAL} | ['fold0', 'fold1'] | +2.5 ± 6.4 | 1 of 2 |" in table
    assert real_data.paired_differences(ROWS).count("\n") == 1  # no unlabelled `full` rows: header only
