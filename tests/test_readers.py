"""Readers: every supported format, detected without a hint, gzip or not, by name, and with
the columnar and line-by-line engines agreeing."""

from __future__ import annotations

import gzip
from pathlib import Path

import polars as pl
import pytest

from conftest import shared_path
from llm_recommender.config import DataColumns, DataConfig
from llm_recommender.data.readers import detect_format, read_interactions
from llm_recommender.errors import ConfigError, DataError

# (user, item, timestamp in seconds, rating) expected from every fixture below.
EXPECTED = [
    ("U1", "I1", 1_400_000_000, 5.0),
    ("U1", "I2", 1_400_000_100, 4.0),
    ("U2", "I1", 1_300_000_000, 3.0),
]

FIXTURES = {
    "amazon_json": (
        '{"reviewerID": "U1", "asin": "I1", "reviewerName": "A, \\"B\\"", "helpful": [0, 0], '
        '"reviewText": "Good,\\nvery good", "overall": 5.0, "unixReviewTime": 1400000000}\n'
        '{"overall": 4.0, "verified": true, "reviewerID": "U1", "asin": "I2", "style": {"Size:": " 7 oz"}, '
        '"unixReviewTime": 1400000100}\n'
        '{"reviewerID": "U2", "asin": "I1", "overall": 3.0, "unixReviewTime": 1300000000, "summary": "ok"}\n'
    ),
    "amazon_ratings_csv": "I1,U1,5.0,1400000000\nI2,U1,4.0,1400000100\nI1,U2,3.0,1300000000\n",
    "amazon2023_csv": (
        "user_id,parent_asin,rating,timestamp\n"
        "U1,I1,5.0,1400000000000\nU1,I2,4.0,1400000100999\nU2,I1,3.0,1300000000500\n"
    ),
    "amazon2023_jsonl": (
        '{"rating": 5.0, "title": "x", "text": "a, b", "asin": "I1-v", "parent_asin": "I1", '
        '"user_id": "U1", "timestamp": 1400000000000, "verified_purchase": true}\n'
        '{"rating": 4.0, "asin": "I2-v", "parent_asin": "I2", "user_id": "U1", "timestamp": 1400000100000}\n'
        '{"rating": 3.0, "asin": "I1-w", "parent_asin": "I1", "user_id": "U2", "timestamp": 1300000000000}\n'
    ),
    "csv": (
        'index,asin,overall,reviewText,reviewerID,unixReviewTime\n'
        '0,I1,5,"Loved it, really.\nSecond paragraph with ""quotes""",U1,1400000000\n'
        '1,I2,4,"Short",U1,1400000100\n'
        '2,I1,3,"Commas, commas, commas",U2,1300000000\n'
    ),
    "movielens_udata": "U1\tI1\t5\t1400000000\nU1\tI2\t4\t1400000100\nU2\tI1\t3\t1300000000\n",
    "movielens_dat": "U1::I1::5::1400000000\nU1::I2::4::1400000100\nU2::I1::3::1300000000\n",
    "movielens_csv": (
        "userId,movieId,rating,timestamp\nU1,I1,5.0,1400000000\nU1,I2,4.0,1400000100\nU2,I1,3.0,1300000000\n"
    ),
}

# Formats without time: timestamps are positions in the file, there are no ratings.
NO_TIME_FIXTURES = {
    "sasrec_pairs": ("U1 I1\nU1 I2\nU2 I1\n", [("U1", "I1", 0), ("U1", "I2", 1), ("U2", "I1", 2)]),
    "sasrec_sequences": (
        "U1 I1 I2 I3\nU2 I1\nU3 I3 I2\n",
        [("U1", "I1", 0), ("U1", "I2", 1), ("U1", "I3", 2), ("U2", "I1", 3), ("U3", "I3", 4), ("U3", "I2", 5)],
    ),
}


def _write(tmp_path: Path, name: str, text: str, gz: bool) -> Path:
    path = tmp_path / (name + (".gz" if gz else ""))
    data = text.encode("utf-8")
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


def _rows(frame: pl.DataFrame, with_rating: bool = True) -> list[tuple]:
    columns = ["user", "item", "timestamp"] + (["rating"] if with_rating else [])
    return [tuple(row) for row in frame.select(columns).iter_rows()]


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("fmt", sorted(FIXTURES))
def test_each_format_is_detected_and_read(tmp_path, fmt, gz):
    path = _write(tmp_path, f"log_{fmt}", FIXTURES[fmt], gz)
    assert detect_format(path) == fmt
    frame, report = read_interactions(path, DataConfig())
    assert report.format == fmt and report.engine == "polars"
    assert _rows(frame) == EXPECTED
    assert frame.get_column("row").to_list() == [0, 1, 2]
    assert report.has_timestamps and report.has_ratings
    assert report.timestamp_unit == ("ms" if fmt.startswith("amazon2023") else "s")
    # Selected by name, the result is the same; so is the line-by-line reference reader.
    by_name, _ = read_interactions(path, DataConfig(format=fmt))
    reference, ref_report = read_interactions(path, DataConfig(), engine="python")
    assert by_name.equals(frame)
    assert reference.equals(frame) and ref_report.engine == "python"


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("fmt", sorted(NO_TIME_FIXTURES))
def test_formats_without_time_use_file_order(tmp_path, fmt, gz):
    text, expected = NO_TIME_FIXTURES[fmt]
    path = _write(tmp_path, f"seq_{fmt}.txt", text, gz)
    assert detect_format(path) == fmt
    frame, report = read_interactions(path, DataConfig())
    assert _rows(frame, with_rating=False) == expected
    assert frame.get_column("rating").null_count() == frame.height
    assert not report.has_timestamps and report.timestamp_unit == "order"
    reference, _ = read_interactions(path, DataConfig(format=fmt), engine="python")
    assert reference.equals(frame)


def test_csv_column_overrides_and_delimiter(tmp_path):
    path = tmp_path / "export.tsv"
    path.write_text(
        "who;what;when;stars;comment\n"
        'U1;I1;1400000000;5;"a; b"\n'
        "U1;I2;1400000100;4;x\n"
        "U2;I1;1300000000;3;y\n"
    )
    columns = DataColumns(user="who", item="what", timestamp="when", rating="stars")
    config = DataConfig(format="csv", columns=columns)
    frame, report = read_interactions(path, config)
    assert report.columns == {"user": "who", "item": "what", "timestamp": "when", "rating": "stars"}
    assert _rows(frame) == EXPECTED
    # A name that is not in the header is one clear error naming the file, line and key.
    with pytest.raises(DataError, match=r"export.tsv: line 1: no column 'user_name' \(data.columns.user\)"):
        read_interactions(path, DataConfig(format="csv", columns=DataColumns(user="user_name")))


def test_delimiter_setting_is_one_character():
    with pytest.raises(ConfigError, match="data.delimiter"):
        DataConfig(delimiter="::")


def test_milliseconds_detected_or_forced(tmp_path):
    path = tmp_path / "ms.csv"
    path.write_text("user,item,timestamp\nU1,I1,1400000000123\nU1,I2,1400000001999\n")
    frame, report = read_interactions(path, DataConfig())
    assert report.timestamp_unit == "ms"
    assert frame.get_column("timestamp").to_list() == [1_400_000_000, 1_400_000_001]
    frame, report = read_interactions(path, DataConfig(timestamp_unit="s"))
    assert frame.get_column("timestamp").to_list() == [1_400_000_000_123, 1_400_000_001_999]


def test_missing_time_column_is_an_error_unless_allowed(tmp_path):
    path = tmp_path / "notime.csv"
    path.write_text("user,item\nU1,I1\nU1,I2\n")
    with pytest.raises(DataError, match=r"notime.csv: line 1: no timestamp column .*data.columns.timestamp"):
        read_interactions(path, DataConfig())
    frame, report = read_interactions(path, DataConfig(allow_no_timestamps=True))
    assert not report.has_timestamps
    assert frame.get_column("timestamp").to_list() == [0, 1]


def test_ids_are_nfc_normalised_and_stripped_but_case_is_kept(tmp_path):
    path = tmp_path / "ids.csv"
    # "café" composed and decomposed, "Bob" and "bob", " bob " with spaces.
    path.write_text(
        "user,item,timestamp\ncaf\u00e9,I1,1\ncafe\u0301,I2,2\nBob,I1,3\nbob,I2,4\n bob ,I3,5\n",
        encoding="utf-8",
    )
    frame, _ = read_interactions(path, DataConfig())
    assert frame.get_column("user").to_list() == ["caf\u00e9", "caf\u00e9", "Bob", "bob", "bob"]
    raw, _ = read_interactions(path, DataConfig(normalize_ids=False))
    assert raw.get_column("user").n_unique() == 5


def test_numeric_json_ids_become_strings(tmp_path):
    path = tmp_path / "numeric.json"
    path.write_text('{"user_id": 7, "item_id": 12, "timestamp": 5}\n{"user_id": 7, "item_id": 13, "timestamp": 6}\n')
    frame, report = read_interactions(path, DataConfig())
    assert report.format == "amazon2023_jsonl"
    assert _rows(frame, with_rating=False) == [("7", "12", 5), ("7", "13", 6)]
    reference, _ = read_interactions(path, DataConfig(), engine="python")
    assert reference.equals(frame)


def test_blank_lines_are_skipped_by_both_engines(tmp_path):
    path = tmp_path / "blank.csv"
    path.write_text("user,item,timestamp\nU1,I1,1\n\nU1,I2,2\n\n")
    frame, _ = read_interactions(path, DataConfig())
    assert _rows(frame, with_rating=False) == [("U1", "I1", 1), ("U1", "I2", 2)]
    assert frame.get_column("row").to_list() == [0, 1]


# ------------------------------------------------------------------------------ real data


def test_beauty_sequences_counts():
    path = shared_path("data", "amazon-beauty", "beauty_5core_sequences.txt")
    frame, report = read_interactions(path, DataConfig())
    assert report.format == "sasrec_sequences"
    assert (frame.get_column("user").n_unique(), frame.get_column("item").n_unique(), frame.height) == (
        22_363,
        12_101,
        198_502,
    )


def test_movielens_100k_counts_before_k_core():
    path = shared_path("data", "movielens-100k", "u.data")
    frame, report = read_interactions(path, DataConfig())
    assert report.format == "movielens_udata"
    assert (frame.get_column("user").n_unique(), frame.get_column("item").n_unique(), frame.height) == (
        943,
        1_682,
        100_000,
    )
    assert frame.get_column("rating").min() == 1.0 and frame.get_column("rating").max() == 5.0


@pytest.mark.parametrize(
    "relative, fmt, counts",
    [
        (("movielens-latest-small", "ratings.csv.gz"), "movielens_csv", (610, 9_724, 100_836)),
        (("wikipedia-sasrec", "wikipedia_user_item.txt"), "sasrec_pairs", (8_227, 1_000, 157_474)),
        (("raw-samples", "amazon2014_kindle_store_sample.csv.gz"), "csv", (4_370, 4_444, 4_905)),
        (("raw-samples", "amazon2014_musical_instruments_5_head50.json"), "amazon_json", (49, 7, 50)),
        (("raw-samples", "amazon2018_all_beauty_5.json.gz"), "amazon_json", (991, 85, 5_269)),
        (("raw-samples", "amazon2023_all_beauty_5core_ratings.csv.gz"), "amazon2023_csv", (253, 356, 2_535)),
    ],
)
def test_shared_files_detected_and_counted(relative, fmt, counts):
    path = shared_path("data", *relative)
    frame, report = read_interactions(path, DataConfig())
    assert report.format == fmt and report.engine == "polars"
    assert (frame.get_column("user").n_unique(), frame.get_column("item").n_unique(), frame.height) == counts
    reference, _ = read_interactions(path, DataConfig(), engine="python")
    assert reference.equals(frame)


def test_kindle_sample_reads_only_needed_columns_through_quoted_text():
    path = shared_path("data", "raw-samples", "amazon2014_kindle_store_sample.csv.gz")
    frame, report = read_interactions(path, DataConfig())
    assert report.columns == {"user": "reviewerID", "item": "asin", "timestamp": "unixReviewTime", "rating": "overall"}
    assert frame.columns == ["user", "item", "timestamp", "rating", "row"]
    first = frame.row(0)
    assert first[:4] == ("AUSBN91MCI3WM", "B00J4S6YWC", 1403308800, 5.0)


@pytest.mark.parametrize("fmt", ["amazon_json", "sasrec_sequences", "movielens_udata"])
def test_blockwise_reading_of_a_file_with_bad_lines_matches_the_line_reader(tmp_path, monkeypatch, fmt):
    # polars rejects the whole file; it is then read in blocks, and only blocks with a bad
    # line go through Python. Small blocks here, so the bad lines fall in different blocks.
    import llm_recommender.data.readers as readers

    monkeypatch.setattr(readers, "_BLOCK_BYTES", 700)
    good = {
        "amazon_json": lambda n: f'{{"reviewerID": "U{n % 7}", "asin": "I{n % 11}", "overall": 4.0, "unixReviewTime": {n}}}',
        "sasrec_sequences": lambda n: f"{n} {n % 5} {n % 7} {n % 3}",
        "movielens_udata": lambda n: f"{n % 9}\t{n % 13}\t3\t{1000 + n}",
    }[fmt]
    lines = [good(n).encode() for n in range(200)]
    # 57: malformed for the format (any text is a user with no items in sasrec_sequences,
    # so there it is bytes that are not UTF-8); 58: blank, skipped, not bad; 131: not UTF-8.
    lines[56] = b"U1 \xff\xfe" if fmt == "sasrec_sequences" else b"oops"
    lines[57] = b""
    lines[130] = b"caf\xe9 1 2"
    path = tmp_path / "with_bad_lines.gz"
    path.write_bytes(gzip.compress(b"\n".join(lines) + b"\n", mtime=0))

    with pytest.raises(DataError, match=r"with_bad_lines.gz: line 57: "):
        read_interactions(path, DataConfig())
    config = DataConfig(skip_bad_lines=True)
    frame, report = read_interactions(path, config)
    assert report.engine == "blocks" and report.bad_lines == 2
    assert report.first_bad_line.startswith("line 57: ")
    reference, ref_report = read_interactions(path, config, engine="python")
    assert ref_report.bad_lines == 2
    assert frame.equals(reference)
    assert frame.get_column("row").to_list() == list(range(frame.height))
