"""Malformed inputs (issue 7): every case, run through the real CLI in a subprocess, ends
with exactly one ``error: ...`` line naming the file (and the line where there is one), a
non-zero exit, no traceback, and nothing left in the output folder. With
``--skip-bad-lines`` the per-line cases succeed and report how many lines were skipped.

The corpus lives in ``tests/bad_inputs/``; the few cases that need size or binary bytes
(truncated and corrupt gzip, binary garbage, very long lines) are built here from a recipe.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from llm_recommender.data.dataset import ProcessedData
from llm_recommender.data.synthetic import write_synthetic_logs
from llm_recommender.io_utils import clean_stale_temporaries

CORPUS = Path(__file__).resolve().parent / "bad_inputs"

# file in tests/bad_inputs, fragment of the message, line named (None: a file-level error),
# extra CLI arguments. k_core=1 unless the case is about k-core, so each file fails for
# the reason it was written for.
CASES = [
    ("empty.csv", "empty file", None, []),
    ("blank_lines_only.txt", "empty file", None, []),
    ("header_only.csv", "header only", 1, []),
    ("not_utf8.csv", "not UTF-8 text", 3, []),
    ("wrong_delimiter.csv", "missing item value", 2, []),
    ("missing_user_column.csv", "no user column", 1, []),
    ("missing_item_column.json", "no item column", 1, []),
    ("missing_time_column.csv", "no timestamp column", 1, []),
    ("null_user_id.json", "missing user id", 2, []),
    ("empty_item_id.csv", "missing item id", 3, []),
    ("non_numeric_timestamp.csv", "timestamp 'yesterday' is not an integer", 4, []),
    ("float_timestamp.csv", "timestamp '1.4e9' is not an integer", 3, []),
    ("negative_timestamp.dat", "negative timestamp -978300761", 2, []),
    ("timestamp_out_of_range.csv", "out of range", 3, []),
    ("nan_rating.csv", "rating 'nan' is not a finite number", 3, []),
    ("nan_rating.json", "NaN is not valid JSON", 2, []),
    ("cut_line.json", "not valid JSON", 3, []),
    ("cut_quoted_field.csv", "unterminated quoted field", 4, []),
    ("mixed_formats.txt", "not valid JSON", 3, []),
    ("not_a_json_object.json", "not a JSON object", 2, []),
    ("id_with_tab.json", "contains a tab or newline", 2, []),
    ("udata_missing_field.data", "expected 4 fields separated by tabs, found 3", 2, []),
    ("pairs_missing_item.txt", "expected 2 fields", 3, ["--format", "sasrec_pairs"]),
    ("extra_field.csv", "expected 3 fields, found 4", 3, []),
    ("unknown_format.txt", "cannot detect the format", 1, []),
    ("space_separated_table.data", "every line has 4 space-separated fields", 1, []),
    ("single_user.csv", "nothing left after the 5-core", None, ["--set", "data.k_core=5"]),
    ("everything_removed_by_k_core.csv", "lower data.k_core", None, ["--set", "data.k_core=5"]),
]

# Per-line cases that --skip-bad-lines turns into a count: (file, skipped, first bad line).
SKIPPABLE = [
    ("not_utf8.csv", 1, 3),
    ("null_user_id.json", 1, 2),
    ("empty_item_id.csv", 1, 3),
    ("non_numeric_timestamp.csv", 1, 4),
    ("negative_timestamp.dat", 1, 2),
    ("nan_rating.json", 1, 2),
    ("cut_line.json", 1, 3),
    ("cut_quoted_field.csv", 1, 4),
    ("mixed_formats.txt", 1, 3),
    ("id_with_tab.json", 1, 2),
    ("udata_missing_field.data", 1, 2),
    ("extra_field.csv", 1, 3),
]


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llm_recommender.cli", *args],
        capture_output=True, text=True, timeout=timeout,
    )


def preprocess(source: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    extra_args = list(extra)
    if not any(a.startswith("data.k_core") for a in extra_args):
        extra_args += ["--set", "data.k_core=1"]
    return run_cli("preprocess", "--input", str(source), "--output_dir", str(out), *extra_args)


def assert_one_line_error(result: subprocess.CompletedProcess, source: Path, line: int | None, fragment: str):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.endswith("\n") and result.stderr.count("\n") == 1, result.stderr
    message = result.stderr.rstrip("\n")
    assert message.startswith("error: ") and source.name in message, message
    assert fragment in message, message
    if line is not None:
        assert f"line {line}" in message, message
    assert len(message) < 600


def assert_nothing_written(out: Path):
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")] == []


def test_corpus_has_at_least_twenty_cases_and_every_file_is_used():
    files = {p.name for p in CORPUS.iterdir()}
    used = {case[0] for case in CASES} | {"ids_case_and_unicode.csv"}
    assert files == used
    assert len(CASES) >= 20  # plus the generated gzip, binary and long-line cases below


@pytest.mark.parametrize("name, fragment, line, extra", CASES, ids=[c[0] for c in CASES])
def test_corpus_file_fails_with_one_line(tmp_path, name, fragment, line, extra):
    out = tmp_path / "proc"
    result = preprocess(CORPUS / name, out, *extra)
    assert_one_line_error(result, CORPUS / name, line, fragment)
    assert_nothing_written(out)


@pytest.mark.parametrize("name, skipped, first_line", SKIPPABLE, ids=[c[0] for c in SKIPPABLE])
def test_skip_bad_lines_counts_and_reports(tmp_path, name, skipped, first_line):
    out = tmp_path / "proc"
    result = preprocess(CORPUS / name, out, "--skip-bad-lines")
    assert result.returncode == 0, result.stderr
    assert f"skipped {skipped} bad lines (first: line {first_line}:" in result.stdout
    meta = json.loads((out / "meta.json").read_text())
    assert meta["counts"]["bad_lines_skipped"] == skipped
    assert ProcessedData(out).num_interactions == meta["counts"]["read"]


def test_failure_keeps_the_previous_folder(tmp_path):
    good = tmp_path / "good.csv"
    good.write_text("user,item,timestamp\nu1,a,1\nu1,b,2\nu2,a,3\n")
    out = tmp_path / "proc"
    assert preprocess(good, out).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    result = preprocess(CORPUS / "non_numeric_timestamp.csv", out)
    assert_one_line_error(result, CORPUS / "non_numeric_timestamp.csv", 4, "is not an integer")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_ids_differing_in_case_or_unicode_form(tmp_path):
    # Policy (data.normalize_ids, default true): NFC-normalise and strip; case is kept.
    source = CORPUS / "ids_case_and_unicode.csv"
    out = tmp_path / "proc"
    assert preprocess(source, out).returncode == 0
    assert (out / "user_ids.txt").read_text(encoding="utf-8") == "caf\u00e9\nBob\nbob\n"
    raw = tmp_path / "raw"
    assert preprocess(source, raw, "--set", "data.normalize_ids=false").returncode == 0
    assert ProcessedData(raw).num_users == 5


def test_unknown_format_name(tmp_path):
    out = tmp_path / "proc"
    result = preprocess(CORPUS / "header_only.csv", out, "--format", "parquet")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: ") and "data.format='parquet' must be one of" in result.stderr
    assert_nothing_written(out)


def test_missing_input_file(tmp_path):
    out = tmp_path / "proc"
    result = preprocess(tmp_path / "nowhere.json", out)
    assert_one_line_error(result, tmp_path / "nowhere.json", None, "input file not found")
    assert_nothing_written(out)


# ------------------------------------------------------------------------------ generated cases


def _json_lines(count: int) -> bytes:
    return b"".join(
        b'{"reviewerID": "U%d", "asin": "I%d", "overall": 5.0, "unixReviewTime": %d}\n' % (i % 40, i % 30, 1000 + i)
        for i in range(count)
    )


def test_truncated_gzip(tmp_path):
    source = tmp_path / "truncated.json.gz"
    data = gzip.compress(_json_lines(5_000), mtime=0)
    source.write_bytes(data[: len(data) // 2])
    result = preprocess(source, tmp_path / "proc")
    assert_one_line_error(result, source, None, "truncated gzip file")
    assert "after line " in result.stderr
    assert_nothing_written(tmp_path / "proc")
    # --skip-bad-lines does not hide a broken file
    result = preprocess(source, tmp_path / "proc", "--skip-bad-lines")
    assert_one_line_error(result, source, None, "truncated gzip file")


def test_corrupt_gzip(tmp_path):
    source = tmp_path / "corrupt.json.gz"
    data = bytearray(gzip.compress(_json_lines(5_000), mtime=0))
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    source.write_bytes(bytes(data))
    result = preprocess(source, tmp_path / "proc")
    assert_one_line_error(result, source, None, "gzip")
    assert "line " in result.stderr
    assert_nothing_written(tmp_path / "proc")


def test_binary_garbage(tmp_path):
    source = tmp_path / "garbage.bin"
    garbage = bytearray(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    garbage[:2] = b"PK"  # looks like a zip, not like gzip
    source.write_bytes(bytes(garbage))
    result = preprocess(source, tmp_path / "proc")
    assert_one_line_error(result, source, None, "binary data")
    assert_nothing_written(tmp_path / "proc")


def test_very_long_lines(tmp_path):
    # A 5 MB review text is fine; a 5 MB line of garbage is one short message.
    fine = tmp_path / "long_review.json"
    long_text = "x" * 5_000_000
    fine.write_text(
        '{"reviewerID": "U1", "asin": "I1", "overall": 5.0, "unixReviewTime": 1}\n'
        f'{{"reviewerID": "U1", "asin": "I2", "overall": 4.0, "reviewText": "{long_text}", "unixReviewTime": 2}}\n'
    )
    result = preprocess(fine, tmp_path / "ok")
    assert result.returncode == 0, result.stderr
    assert ProcessedData(tmp_path / "ok").num_interactions == 2
    broken = tmp_path / "long_garbage.json"
    broken.write_text('{"reviewerID": "U1", "asin": "I1", "overall": 5.0, "unixReviewTime": 1}\n' + "{" * 5_000_000 + "\n")
    result = preprocess(broken, tmp_path / "proc")
    assert_one_line_error(result, broken, 2, "not valid JSON")
    assert len(result.stderr) < 300
    assert_nothing_written(tmp_path / "proc")


def test_kill_9_leaves_previous_or_new_state(tmp_path):
    """SIGKILL at random moments of a run: the folder is always a complete dataset, the
    previous one or the new one; the next run tidies whatever the kill left behind."""
    old_source, new_source = tmp_path / "old.json", tmp_path / "new.json"
    write_synthetic_logs(old_source, 2_000, 1_500, 60_000, "amazon2018", seed=1, verbose=False)
    write_synthetic_logs(new_source, 2_000, 1_500, 60_000, "amazon2018", seed=2, verbose=False)
    out = tmp_path / "proc"
    started = time.perf_counter()
    assert preprocess(old_source, out).returncode == 0
    duration = time.perf_counter() - started
    old_meta = (out / "meta.json").read_text()
    rng = random.Random(7)
    for _ in range(5):
        process = subprocess.Popen(
            [sys.executable, "-m", "llm_recommender.cli", "preprocess", "--input", str(new_source),
             "--output_dir", str(out), "--set", "data.k_core=1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(0.1, 1.5) * duration)  # some kills land after the end
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        if not out.exists():
            # Only possible between the two renames of the swap: the old folder is aside,
            # and the next run puts it back first thing (the same call as here).
            assert list(tmp_path.glob(".proc.old-*"))
            clean_stale_temporaries(tmp_path, "proc")
        data = ProcessedData(out)  # complete: loads and its sizes agree
        meta = (out / "meta.json").read_text()
        assert meta == old_meta or json.loads(meta)["source"]["path"] == str(new_source)
        assert data.num_interactions == int(np.asarray(data.offsets)[-1])
        if meta != old_meta:  # reset to the old state for the next kill
            assert preprocess(old_source, out).returncode == 0
    # A completed run removes every leftover of the killed ones.
    assert preprocess(new_source, out).returncode == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".proc")] == []
