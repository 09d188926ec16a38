"""A bounded fuzz run of the TIFF reader (a fixed seed, CELLSEG_FUZZ_SECONDS, 60 s by default): zero errors other
than our documented ones, and no decode over its memory budget. docs/reliability.md has a longer run's figures."""

from __future__ import annotations

import os

import numpy as np

from tests.ml import tiff_fuzz

SECONDS = float(os.environ.get("CELLSEG_FUZZ_SECONDS", "60"))
SEED = 26


def test_the_generator_writes_valid_tiffs_of_many_kinds():
    rng = np.random.default_rng(SEED)
    files = [tiff_fuzz.valid_tiff(rng) for _ in range(40)]
    assert len(set(files)) == 40
    assert len({f[:4] for f in files}) == 2, "classic TIFF and BigTIFF"


def test_a_bounded_fuzz_run_answers_only_our_errors_within_the_memory_budget(tmp_path):
    report = tiff_fuzz.run(SECONDS, SEED, keep=tmp_path)
    summary = report.summary()
    print(summary)
    assert report.files > 100, summary
    assert not report.failures, summary
    assert not report.over_budget, summary
    assert sum(n for outcome, n in report.outcomes.items() if outcome.startswith("decoded")) > 10, summary
