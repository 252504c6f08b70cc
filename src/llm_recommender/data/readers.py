"""Raw interaction logs in the formats users have → one ``(user, item, timestamp)`` table.

``read_interactions(path, data_config)`` returns a polars DataFrame with the columns

=============  =========  ==================================================================
``user``       String     original user id (NFC-normalised and stripped with
                          ``data.normalize_ids``; case is kept, so ``Bob`` and ``bob`` differ)
``item``       String     original item id (same rule)
``timestamp``  Int64      seconds since the epoch; for formats without time, the event's
                          position in the file (file order is time order)
``rating``     Float64    the rating, or null when the format has none
``row``        Int64      position of the event in the file: ties in time keep file order
=============  =========  ==================================================================

and a :class:`ReadReport`. Supported formats (``data.format``; ``auto`` sniffs the first
lines, gzip or not):

- ``amazon_json``: Amazon 2014/2018 review JSON lines (``reviewerID, asin, overall,
  unixReviewTime``, review text skipped);
- ``amazon2023_jsonl`` / ``amazon2023_csv``: Amazon Reviews'23 (``user_id, parent_asin`` or
  ``asin``, ``rating``, ``timestamp`` in milliseconds);
- ``amazon_ratings_csv``: Amazon 2014/2018 ratings-only ``item,user,rating,timestamp``, no header;
- ``csv``: any delimited file with a header (quoted text with commas and newlines is fine);
  columns found by the known names or ``data.columns.*``;
- ``movielens_udata`` (``u.data``, tab-separated), ``movielens_dat`` (``ratings.dat``, ``::``),
  ``movielens_csv`` (``ratings.csv``);
- ``sasrec_pairs`` (``user item`` per line) and ``sasrec_sequences`` (``user i1 i2 ...``).

How it reads: a columnar fast path with polars that parses only the needed columns (a
Kindle dump's review text is never turned into Python objects); if polars rejects the
file, or the parsed values break a rule (null or empty id, an id with a tab or newline, a
negative timestamp, a NaN rating), a line-by-line reference reader in Python runs instead.
It applies exactly the same rules, names the first bad line (``file: line N: reason``),
or with ``data.skip_bad_lines`` skips and counts the bad lines. For the one-record-per-line
formats (JSON, MovieLens, SASRec) that fallback works on 64 MiB blocks: polars reads each
block and only blocks with a bad line go through Python. So a clean file costs one columnar
pass, and a few bad lines in a multi-GB dump cost seconds, not a Python pass over it all.

Policies: ids are strings (numbers in JSON become their text); with ``normalize_ids`` they
are NFC-normalised and stripped, case kept (``Bob`` and ``bob`` are two users). An id with a
tab, newline or carriage return cannot be written one per line to the id maps: bad line.
Blank lines are skipped. Timestamps must be non-negative integers; ``timestamp_unit: auto``
divides by 1000 when the median exceeds 1e11 (milliseconds, as in Amazon Reviews'23).
A missing rating is null; a NaN or infinite one is a bad line.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import re
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import polars as pl

from ..config import DATA_FORMATS, DataConfig
from ..errors import DataError

# Known column names, most specific first (``data.columns.*`` overrides them).
COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "user": ("reviewerID", "user_id", "userId", "userID", "user", "UserId"),
    "item": ("parent_asin", "asin", "item_id", "itemId", "movieId", "movie_id", "item", "ItemId"),
    "timestamp": ("unixReviewTime", "timestamp", "unix_time", "time", "ts", "Timestamp"),
    "rating": ("overall", "rating", "score", "Rating"),
}

# Headerless formats: field position of each role.
_POSITIONS = {
    "amazon_ratings_csv": {"item": 0, "user": 1, "rating": 2, "timestamp": 3},
    "movielens_udata": {"user": 0, "item": 1, "rating": 2, "timestamp": 3},
    "movielens_dat": {"user": 0, "item": 1, "rating": 2, "timestamp": 3},
    "sasrec_pairs": {"user": 0, "item": 1},
}
_FIELD_COUNT = {"amazon_ratings_csv": 4, "movielens_udata": 4, "movielens_dat": 4, "sasrec_pairs": 2}
_JSON_FORMATS = ("amazon_json", "amazon2023_jsonl")
# One record per physical line (no quoting): these can be cut into blocks at newlines.
_LINE_FORMATS = _JSON_FORMATS + ("movielens_udata", "movielens_dat", "sasrec_pairs", "sasrec_sequences")
_BLOCK_BYTES = 1 << 26
_HEADER_FORMATS = ("csv", "amazon2023_csv", "movielens_csv")
_NO_TIME_FORMATS = ("sasrec_pairs", "sasrec_sequences")

_SNIFF_BYTES = 1 << 16
_MAX_FIRST_LINE = 1 << 24
_MS_THRESHOLD = 1e11  # seconds-since-epoch values stay below this until the year 5138
_MAX_TIMESTAMP = 1 << 62
_INT_RE = re.compile(r"-?\d+\Z")
_FLOAT_RE = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\Z|[+-]?(nan|NaN|inf|Inf|infinity|Infinity)\Z")
_BAD_ID_CHARS = re.compile(r"[\n\r\t]")


@dataclass
class ReadReport:
    """What was read and how."""

    path: str
    format: str
    num_rows: int = 0
    """Events read (after skipping bad lines)."""
    bad_lines: int = 0
    """Lines skipped with ``data.skip_bad_lines``."""
    first_bad_line: Optional[str] = None
    """``line N: reason`` of the first skipped line."""
    has_timestamps: bool = True
    """False for formats without time (timestamps are file positions)."""
    has_ratings: bool = False
    timestamp_unit: str = "s"
    """Unit of the raw time column: ``s``, ``ms`` or ``order`` (file position)."""
    columns: dict = field(default_factory=dict)
    """Source column (or field position) of each role."""
    engine: str = "polars"
    """``polars`` (columnar fast path) or ``python`` (the line-by-line reader ran)."""
    seconds: float = 0.0


class _NeedsLineReader(Exception):
    """The fast path found something to report line by line."""


@dataclass
class _Layout:
    """How a file is laid out: the result of sniffing."""

    format: str
    gzip: bool
    delimiter: Optional[str] = None
    header: Optional[list[str]] = None
    columns: dict = field(default_factory=dict)  # role -> column name (header/JSON) or position


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def read_interactions(
    path: str | Path, data_config: DataConfig, engine: str = "auto"
) -> tuple[pl.DataFrame, ReadReport]:
    """Read a raw interaction file into ``(user, item, timestamp, rating, row)``.

    Args:
        path: the raw file (gzip or not).
        data_config: the ``data`` section (format, columns, delimiter, timestamp_unit,
            skip_bad_lines, normalize_ids).
        engine: ``auto`` (polars, then the line reader if needed) or ``python`` (the line
            reader only; tests use it to check both agree).

    Returns:
        (frame, report). Raises :class:`DataError` naming the file (and line) on bad input.
    """
    started = time.perf_counter()
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: input file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    layout = sniff_layout(path, data_config)
    report = ReadReport(path=str(path), format=layout.format)
    report.columns = dict(layout.columns)
    report.has_timestamps = "timestamp" in layout.columns
    report.has_ratings = "rating" in layout.columns

    frame = None
    distinct: dict[str, pl.Series] = {}
    if engine == "auto":
        try:
            frame = _fast_read(path, layout)
            distinct = {column: frame.get_column(column).unique() for column in ("user", "item")}
            _check_values(frame, distinct, data_config.normalize_ids)
            _check_unterminated_quote(path, layout)
        except (pl.exceptions.PolarsError, _NeedsLineReader, UnicodeDecodeError, OSError):
            # polars' messages name neither the line nor the reason in user terms: the line
            # reader below applies the same rules and names the first bad line. A broken
            # gzip stream is found first by a C-speed pass, not line by line.
            if layout.gzip and layout.format not in _LINE_FORMATS:  # (blocks check as they read)
                _check_gzip_stream(path)
            frame = None
    if frame is None:
        distinct = {}
        if engine == "auto" and layout.format in _LINE_FORMATS:
            report.engine = "blocks"
            frame = _blockwise_read(path, layout, data_config, report)
        else:
            report.engine = "python"
            frame = _line_read(path, layout, data_config, report)

    if frame.height == 0:
        raise DataError(_empty_message(path, layout, report))
    frame = _finish(frame, data_config, report, distinct)
    report.num_rows = frame.height
    report.seconds = time.perf_counter() - started
    return frame, report


def detect_format(path: str | Path, data_config: DataConfig | None = None) -> str:
    """The format name ``auto`` resolves to for ``path`` (see :data:`DATA_FORMATS`)."""
    return sniff_layout(Path(path), data_config or DataConfig()).format


# --------------------------------------------------------------------------------------------
# Sniffing
# --------------------------------------------------------------------------------------------


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(2) == b"\x1f\x8b"


def _open_binary(path: Path, is_gzip: bool):
    return gzip.open(path, "rb") if is_gzip else open(path, "rb")


def _read_head(path: Path, is_gzip: bool) -> tuple[bytes, bool]:
    """The first 64 KiB (at least one whole line, up to 16 MiB); and whether that is all."""
    try:
        with _open_binary(path, is_gzip) as handle:
            head = handle.read(_SNIFF_BYTES)
            while b"\n" not in head and len(head) < _MAX_FIRST_LINE:
                more = handle.read(_SNIFF_BYTES)
                if not more:
                    return head, True
                head += more
            return head, not handle.read(1)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: {_gzip_problem(exc)} near the start of the file") from None


def _gzip_problem(exc: BaseException) -> str:
    if isinstance(exc, EOFError):
        return "truncated gzip file (the compressed data ends early)"
    return f"corrupt gzip data ({exc})"


def _excerpt(text: str, limit: int = 40) -> str:
    """A short quoted excerpt (repr escapes tabs and newlines) for one-line messages."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def sniff_layout(path: Path, data_config: DataConfig) -> _Layout:
    """Find the format, delimiter, header and columns from the first lines of ``path``."""
    is_gzip = _is_gzip(path)
    head, complete = _read_head(path, is_gzip)
    if not head.strip():
        raise DataError(f"{path}: empty file (no interactions)")
    nul = head.find(b"\x00")
    if nul >= 0:
        line = head.count(b"\n", 0, nul) + 1
        raise DataError(f"{path}: line {line}: binary data (NUL byte), not a text interaction log")
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = head.count(b"\n", 0, exc.start) + 1
        if line == 1 and not data_config.skip_bad_lines:
            raise DataError(f"{path}: line 1: not UTF-8 text (binary or another encoding)") from None
        # A later line: the readers report (or count) it in file order with other bad lines.
        text = head.decode("utf-8", "replace")
    lines = text.split("\n")
    if not complete and len(lines) > 1:
        lines = lines[:-1]  # the last one may be cut by the sniff window
    numbered = [(n + 1, line.rstrip("\r")) for n, line in enumerate(lines) if line.strip()]
    first_no, first = numbered[0]
    first = first.lstrip("\ufeff")
    fmt = data_config.format
    columns_given = {k: v for k, v in vars(data_config.columns).items() if v is not None}

    # ---- JSON lines
    if fmt in _JSON_FORMATS or (fmt == "auto" and first.lstrip().startswith("{")):
        keys = None
        for line_no, line in numbered[:50]:
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict):
                keys = list(record)
                break
            if not data_config.skip_bad_lines:
                raise DataError(f"{path}: line {line_no}: not a JSON object: {_excerpt(line)}")
        if keys is None:
            raise DataError(f"{path}: line {first_no}: no JSON object in the first lines")
        if fmt == "auto":
            fmt = "amazon_json" if "reviewerID" in keys else "amazon2023_jsonl"
        layout = _Layout(format=fmt, gzip=is_gzip)
        layout.columns = _resolve_columns(path, keys, data_config, first_no)
        return layout

    if columns_given and fmt not in ("auto",) + _HEADER_FORMATS:
        raise DataError(
            f"{path}: data.columns applies to files with column names (csv, JSON); "
            f"format {fmt!r} has fixed positions"
        )

    # ---- MovieLens ratings.dat
    if fmt == "movielens_dat" or (fmt == "auto" and "::" in first):
        return _Layout(format="movielens_dat", gzip=is_gzip, delimiter="::",
                       columns=dict(_POSITIONS["movielens_dat"]))

    # ---- SASRec (whitespace) formats
    delimiter = data_config.delimiter or _guess_delimiter(first)
    if fmt in _NO_TIME_FORMATS or (fmt == "auto" and delimiter is None):
        if fmt == "auto":
            counts = [len(line.split()) for _, line in numbered[:200]]
            if all(c == 2 for c in counts):
                fmt = "sasrec_pairs"
            elif len(counts) > 1 and len(set(counts)) == 1:
                # Every line the same width > 2 looks like a table (a space-separated u.data?),
                # not one sequence per user: refuse to guess.
                raise DataError(
                    f"{path}: line {first_no}: every line has {counts[0]} space-separated fields: "
                    f"a table or one sequence per user? Set data.format (sasrec_sequences for "
                    f"'user item1 item2 ...', or a csv with a header and data.delimiter)"
                )
            elif all(c >= 2 for c in counts) and max(counts) > 2:
                fmt = "sasrec_sequences"
            else:
                raise DataError(
                    f"{path}: line {first_no}: cannot detect the format (first line "
                    f"{_excerpt(first)}); set data.format to one of {', '.join(DATA_FORMATS[1:])}"
                )
        columns = dict(_POSITIONS.get(fmt, {"user": 0}))
        return _Layout(format=fmt, gzip=is_gzip, delimiter=None, columns=columns)

    if delimiter is None:
        delimiter = ","
    fields = next(csv.reader([first], delimiter=delimiter))
    header_names = set(columns_given.values()) | {a for names in COLUMN_ALIASES.values() for a in names}
    has_header = fmt in _HEADER_FORMATS or (fmt == "auto" and any(f.strip() in header_names for f in fields))

    # ---- delimited with a header
    if has_header:
        header = [f.strip() for f in fields]
        if fmt == "auto":
            if "userId" in header and "movieId" in header:
                fmt = "movielens_csv"
            elif "user_id" in header and ("parent_asin" in header or "asin" in header):
                fmt = "amazon2023_csv"
            else:
                fmt = "csv"
        layout = _Layout(format=fmt, gzip=is_gzip, delimiter=delimiter, header=header)
        layout.columns = _resolve_columns(path, header, data_config, first_no)
        if len(numbered) == 1 and complete:
            raise DataError(f"{path}: line {first_no}: header only, no interactions")
        return layout

    # ---- delimited, no header
    if fmt == "auto":
        if delimiter == "," and len(fields) == 4:
            fmt = "amazon_ratings_csv"
        elif delimiter == "\t" and len(fields) == 4:
            fmt = "movielens_udata"
        elif delimiter == "\t" and len(fields) == 2:
            fmt = "sasrec_pairs"
        else:
            raise DataError(
                f"{path}: line {first_no}: cannot detect the format (first line {_excerpt(first)}, "
                f"{len(fields)} fields separated by {delimiter!r}, no known column names); "
                f"set data.format, or give the file a header"
            )
    if fmt in _NO_TIME_FORMATS:
        return _Layout(format=fmt, gzip=is_gzip, columns=dict(_POSITIONS.get(fmt, {"user": 0})))
    delimiter = {"amazon_ratings_csv": ",", "movielens_udata": "\t"}.get(fmt, delimiter)
    return _Layout(format=fmt, gzip=is_gzip, delimiter=delimiter, columns=dict(_POSITIONS[fmt]))


def _guess_delimiter(line: str) -> Optional[str]:
    counts = {d: line.count(d) for d in (",", "\t", ";", "|")}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] > 0 else None


def _resolve_columns(path: Path, names: list[str], data_config: DataConfig, line_no: int) -> dict:
    """Role → column name, from ``data.columns`` or the known aliases."""
    given = {k: v for k, v in vars(data_config.columns).items() if v is not None}
    required = ("user", "item") if data_config.allow_no_timestamps else ("user", "item", "timestamp")
    columns: dict[str, str] = {}
    available = ", ".join(names[:30]) + (", ..." if len(names) > 30 else "")
    for role, aliases in COLUMN_ALIASES.items():
        if role in given:
            if given[role] not in names:
                raise DataError(
                    f"{path}: line {line_no}: no column {given[role]!r} (data.columns.{role}); "
                    f"the columns are: {available}"
                )
            columns[role] = given[role]
            continue
        found = next((a for a in aliases if a in names), None)
        if found is not None:
            columns[role] = found
        elif role in required:
            extra = " (or data.allow_no_timestamps=true)" if role == "timestamp" else ""
            raise DataError(
                f"{path}: line {line_no}: no {role} column (looked for {', '.join(aliases)}; "
                f"the columns are: {available}); set data.columns.{role}{extra}"
            )
    return columns


# --------------------------------------------------------------------------------------------
# Fast path: polars
# --------------------------------------------------------------------------------------------


def _fast_read(path: Path | bytes, layout: _Layout) -> pl.DataFrame:
    fmt, cols = layout.format, layout.columns
    if fmt in _JSON_FORMATS:
        schema = {cols["user"]: pl.String, cols["item"]: pl.String}
        if "timestamp" in cols:
            schema[cols["timestamp"]] = pl.Int64
        if "rating" in cols:
            schema[cols["rating"]] = pl.Float64
        raw = pl.read_ndjson(path, schema=schema)
        frame = raw.select(_select(cols))
    elif fmt == "sasrec_sequences":
        lines = pl.read_csv(
            path, has_header=False, separator="\x1f", quote_char=None, infer_schema=False,
            new_columns=["line"], empty_string_is_null=True,
        ).filter(pl.col("line").is_not_null())
        tokens = lines.select(pl.col("line").str.split(" ").alias("tokens"))
        if tokens.select(pl.col("tokens").list.contains("").any()).item():
            raise _NeedsLineReader  # tabs, double spaces, trailing spaces: let the line reader split
        frame = (
            tokens.select(
                pl.col("tokens").list.first().alias("user"),
                pl.col("tokens").list.slice(1).alias("item"),
            )
            .explode("item")
            .filter(pl.col("item").is_not_null())
        )
        frame = frame.with_columns(
            pl.int_range(pl.len(), dtype=pl.Int64).alias("timestamp"),
            pl.lit(None, dtype=pl.Float64).alias("rating"),
        )
    else:
        if fmt in _HEADER_FORMATS:
            raw = pl.read_csv(
                path, has_header=True, separator=layout.delimiter, quote_char='"',
                columns=list(dict.fromkeys(cols.values())), infer_schema=False,
                empty_string_is_null=True,
            )
            names = cols
        else:
            separator = ":" if fmt == "movielens_dat" else (layout.delimiter or " ")
            quote = '"' if fmt == "amazon_ratings_csv" else None
            raw = pl.read_csv(
                path, has_header=False, separator=separator, quote_char=quote,
                infer_schema=False, empty_string_is_null=True,
            )
            expected = 7 if fmt == "movielens_dat" else _FIELD_COUNT[fmt]
            if raw.width != expected:
                raise _NeedsLineReader
            step = 2 if fmt == "movielens_dat" else 1  # "a::b" splits on ':' into a, "", b
            names = {role: raw.columns[pos * step] for role, pos in cols.items()}
            if fmt == "movielens_dat" and raw.select(
                pl.any_horizontal(pl.col(raw.columns[1::2]).is_not_null()).any()
            ).item():
                raise _NeedsLineReader  # a single ':' somewhere
        # Blank lines come out as rows with no value at all: skipped, as the line reader does.
        raw = raw.filter(~pl.all_horizontal(pl.col(raw.columns).is_null()))
        frame = raw.select(
            pl.col(names["user"]).alias("user"),
            pl.col(names["item"]).alias("item"),
            (
                pl.col(names["timestamp"]).cast(pl.Int64, strict=True)
                if "timestamp" in names
                else pl.int_range(pl.len(), dtype=pl.Int64)
            ).alias("timestamp"),
            (
                pl.col(names["rating"]).cast(pl.Float64, strict=True)
                if "rating" in names
                else pl.lit(None, dtype=pl.Float64)
            ).alias("rating"),
        )
    return frame.with_row_index("row").with_columns(pl.col("row").cast(pl.Int64)).select(
        "user", "item", "timestamp", "rating", "row"
    )


def _select(cols: dict) -> list[pl.Expr]:
    return [
        pl.col(cols["user"]).alias("user"),
        pl.col(cols["item"]).alias("item"),
        (pl.col(cols["timestamp"]) if "timestamp" in cols else pl.int_range(pl.len(), dtype=pl.Int64)).alias(
            "timestamp"
        ),
        (pl.col(cols["rating"]) if "rating" in cols else pl.lit(None, dtype=pl.Float64)).alias("rating"),
    ]


def _check_values(frame: pl.DataFrame, distinct: dict[str, pl.Series], normalize: bool) -> None:
    """Raise :class:`_NeedsLineReader` if any value breaks a rule the line reader reports."""
    bad = frame.select(
        (
            pl.col("user").is_null()
            | pl.col("item").is_null()
            | pl.col("timestamp").is_null()
            | (pl.col("timestamp") < 0)
            | (pl.col("timestamp") > _MAX_TIMESTAMP)
            | pl.col("rating").is_nan()
            | pl.col("rating").is_infinite()
        ).any()
    ).item()
    if bad:
        raise _NeedsLineReader
    for values in distinct.values():
        if values.str.contains(r"[\n\r\t]").any():
            raise _NeedsLineReader
        stripped = values.str.strip_chars() if normalize else values
        if (stripped.str.len_bytes() == 0).any():
            raise _NeedsLineReader


def _check_unterminated_quote(path: Path, layout: _Layout) -> None:
    """polars accepts a quoted field left open at the end of a file (a cut download); the
    csv module does not. A plain file that does not end with a newline and holds an odd
    number of quote characters goes to the line reader, which names the line."""
    if layout.gzip or layout.format not in _HEADER_FORMATS + ("amazon_ratings_csv",):
        return
    size = path.stat().st_size
    with open(path, "rb") as handle:
        handle.seek(max(0, size - 1))
        if handle.read(1) == b"\n":
            return
    quotes = np.count_nonzero(np.memmap(path, dtype=np.uint8, mode="r") == ord('"'))
    if quotes % 2:
        raise _NeedsLineReader


def _raw_chunks(path: Path, is_gzip: bool, chunk_size: int = 1 << 22) -> Iterator[bytes]:
    """The file's (decompressed) bytes in chunks. A truncated or corrupt gzip stream raises
    :class:`DataError` naming the last complete line, counted exactly."""
    with open(path, "rb") as handle:
        if not is_gzip:
            while chunk := handle.read(chunk_size):
                yield chunk
            return
        lines = 0
        decompressor = zlib.decompressobj(wbits=31)
        pending = False  # the current gzip member has started but not reached its end marker
        try:
            while chunk := handle.read(chunk_size):
                while chunk:
                    pending = True
                    data = decompressor.decompress(chunk)
                    lines += data.count(b"\n")
                    yield data
                    chunk = b""
                    if decompressor.eof:  # multi-member gzip: the next member follows
                        chunk = decompressor.unused_data
                        decompressor = zlib.decompressobj(wbits=31)
                        pending = False
        except zlib.error as exc:
            raise DataError(f"{path}: corrupt gzip data ({exc}) after line {lines}") from None
        if pending:
            raise DataError(f"{path}: truncated gzip file (the compressed data ends early) after line {lines}")


def _check_gzip_stream(path: Path) -> None:
    """Decompress the whole file at C speed, keeping nothing; raise on a broken stream."""
    for _ in _raw_chunks(path, is_gzip=True):
        pass


# --------------------------------------------------------------------------------------------
# Reference path: line by line, naming the first bad line
# --------------------------------------------------------------------------------------------


class _BadLine(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _blockwise_read(path: Path, layout: _Layout, data_config: DataConfig, report: ReadReport) -> pl.DataFrame:
    """Line formats with a bad line somewhere: polars on 64 MiB blocks of whole lines, the
    line reader only on the blocks polars rejects. A few bad lines in a Kindle-size dump
    cost seconds instead of a Python pass over millions of lines."""
    frames = []
    lines_before = 0

    def parse(block: bytes) -> None:
        nonlocal lines_before
        try:
            frame = _fast_read(block, layout)
            distinct = {column: frame.get_column(column).unique() for column in ("user", "item")}
            _check_values(frame, distinct, data_config.normalize_ids)
        except (pl.exceptions.PolarsError, _NeedsLineReader, UnicodeDecodeError):
            lines = _split_lines(path, block, lines_before, report, data_config.skip_bad_lines)
            frame = _line_read(path, layout, data_config, report, lines)
        frames.append(frame)
        lines_before += block.count(b"\n")

    pieces: list[bytes] = []
    size = 0
    for chunk in _raw_chunks(path, layout.gzip, chunk_size=min(1 << 22, _BLOCK_BYTES)):
        pieces.append(chunk)
        size += len(chunk)
        if size >= _BLOCK_BYTES:
            block = b"".join(pieces)
            cut = block.rfind(b"\n") + 1
            if cut == 0:  # one line longer than a block: keep reading
                pieces, size = [block], len(block)
                continue
            parse(block[:cut])
            pieces, size = [block[cut:]], len(block) - cut
    block = b"".join(pieces)
    if block:
        parse(block)
    if not frames:
        return _line_read(path, layout, data_config, report, iter(()))
    frame = pl.concat(frames, how="vertical")
    positions = pl.int_range(pl.len(), dtype=pl.Int64)
    if "timestamp" not in layout.columns:  # file position is the time: count across blocks
        frame = frame.with_columns(positions.alias("timestamp"))
    return frame.with_columns(positions.alias("row"))


def _split_lines(
    path: Path, block: bytes, lines_before: int, report: ReadReport, skip: bool
) -> Iterator[tuple[int, str]]:
    for offset, raw in enumerate(block.split(b"\n")[:-1] if block.endswith(b"\n") else block.split(b"\n")):
        line_no = lines_before + offset + 1
        text = _decode_line(path, raw, line_no, report, skip)
        if text is not None:
            yield line_no, text


def _decode_line(path: Path, raw: bytes, line_no: int, report: ReadReport, skip: bool) -> Optional[str]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        _bad(path, line_no, "not UTF-8 text", report, skip)
        return None
    if "\x00" in text:
        _bad(path, line_no, "binary data (NUL byte)", report, skip)
        return None
    return text.rstrip("\n").rstrip("\r")


def _decoded_lines(path: Path, layout: _Layout, report: ReadReport, skip: bool) -> Iterator[tuple[int, str]]:
    """(line number, text without the newline) for every physical line; bad UTF-8 lines are
    skipped (and counted) or raise."""
    line_no = 0
    try:
        with _open_binary(path, layout.gzip) as handle:
            for raw in handle:
                line_no += 1
                text = _decode_line(path, raw, line_no, report, skip)
                if text is not None:
                    yield line_no, text
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: {_gzip_problem(exc)} after line {line_no}") from None


def _bad(path: Path, line_no: int, reason: str, report: ReadReport, skip: bool) -> None:
    if not skip:
        raise DataError(f"{path}: line {line_no}: {reason}")
    report.bad_lines += 1
    if report.first_bad_line is None:
        report.first_bad_line = f"line {line_no}: {reason}"


def _parse_id(value, role: str, normalize: bool) -> str:
    if value is None:
        raise _BadLine(f"missing {role} id")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _BadLine(f"{role} id {_excerpt(json.dumps(value))} is not a string or number")
    text = value if isinstance(value, str) else str(value)
    if _BAD_ID_CHARS.search(text):
        raise _BadLine(f"{role} id {_excerpt(text)} contains a tab or newline")
    if not (text.strip() if normalize else text):
        raise _BadLine(f"empty {role} id")
    return text


def _parse_timestamp(value) -> int:
    if value is None or value == "":
        raise _BadLine("missing timestamp")
    if isinstance(value, bool):
        raise _BadLine(f"timestamp {value!r} is not an integer")
    if isinstance(value, int):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and _INT_RE.match(value):
        number = int(value)
    else:
        raise _BadLine(f"timestamp {_excerpt(str(value))} is not an integer")
    if number < 0:
        raise _BadLine(f"negative timestamp {number}")
    if number > _MAX_TIMESTAMP:
        raise _BadLine(f"timestamp {number} is out of range")
    return number


def _parse_rating(value) -> Optional[float]:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise _BadLine(f"rating {value!r} is not a number")
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str) and _FLOAT_RE.match(value):
        number = float(value)
    else:
        raise _BadLine(f"rating {_excerpt(str(value))} is not a number")
    if not math.isfinite(number):
        raise _BadLine(f"rating {value!r} is not a finite number")
    return number


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _line_read(
    path: Path,
    layout: _Layout,
    data_config: DataConfig,
    report: ReadReport,
    lines: Optional[Iterator[tuple[int, str]]] = None,
) -> pl.DataFrame:
    """The reference reader: every line through Python (``lines``: a part of the file)."""
    skip = data_config.skip_bad_lines
    normalize = data_config.normalize_ids
    users: list[str] = []
    items: list[str] = []
    stamps: list[int] = []
    ratings: list[Optional[float]] = []
    fmt, cols = layout.format, layout.columns
    has_time = "timestamp" in cols

    def add(line_no: int, user, item, stamp, rating) -> None:
        try:
            parsed = (
                _parse_id(user, "user", normalize),
                _parse_id(item, "item", normalize),
                _parse_timestamp(stamp) if has_time else len(stamps),
                _parse_rating(rating),
            )
        except _BadLine as exc:
            _bad(path, line_no, exc.reason, report, skip)
            return
        users.append(parsed[0])
        items.append(parsed[1])
        stamps.append(parsed[2])
        ratings.append(parsed[3])

    if lines is None:
        lines = _decoded_lines(path, layout, report, skip)
    if fmt in _JSON_FORMATS:
        for line_no, text in lines:
            if not text.strip():
                continue
            try:
                record = json.loads(text, parse_constant=_reject_constant)
            except ValueError as exc:
                _bad(path, line_no, f"not valid JSON ({_json_reason(exc)}): {_excerpt(text)}", report, skip)
                continue
            if not isinstance(record, dict):
                _bad(path, line_no, f"not a JSON object: {_excerpt(text)}", report, skip)
                continue
            missing = [cols[r] for r in ("user", "item", "timestamp") if r in cols and cols[r] not in record]
            if missing:
                _bad(path, line_no, f"missing field {missing[0]!r}", report, skip)
                continue
            rating = record.get(cols["rating"]) if "rating" in cols else None
            stamp = record[cols["timestamp"]] if has_time else None
            add(line_no, record[cols["user"]], record[cols["item"]], stamp, rating)
    elif fmt == "sasrec_sequences":
        for line_no, text in lines:
            tokens = text.split()
            if not tokens:
                continue
            for item in tokens[1:]:
                add(line_no, tokens[0], item, None, None)
    elif fmt in ("sasrec_pairs", "movielens_udata", "movielens_dat"):
        expected = _FIELD_COUNT[fmt]
        for line_no, text in lines:
            if not text.strip():
                continue
            if fmt == "movielens_dat":
                fields = text.split("::")
            elif fmt == "movielens_udata":
                fields = text.split("\t")
            else:
                fields = text.split()
            if len(fields) != expected:
                sep = {"movielens_dat": "'::'", "movielens_udata": "tabs"}.get(fmt, "spaces")
                _bad(path, line_no, f"expected {expected} fields separated by {sep}, found {len(fields)}: "
                     f"{_excerpt(text)}", report, skip)
                continue
            add(line_no, *_pick(fields, cols))
    else:  # delimited, through the csv module so quoted commas and newlines work
        _read_delimited(path, layout, lines, add, report, skip)

    return pl.DataFrame(
        {
            "user": pl.Series(users, dtype=pl.String),
            "item": pl.Series(items, dtype=pl.String),
            "timestamp": pl.Series(stamps, dtype=pl.Int64),
            "rating": pl.Series(ratings, dtype=pl.Float64),
            "row": pl.int_range(len(users), dtype=pl.Int64, eager=True),
        }
    )


def _json_reason(exc: ValueError) -> str:
    return str(exc).split(":")[0]


def _pick(fields: list[str], cols: dict) -> tuple:
    return (
        fields[cols["user"]],
        fields[cols["item"]],
        fields[cols["timestamp"]] if "timestamp" in cols else None,
        fields[cols["rating"]] if "rating" in cols else None,
    )


def _read_delimited(path, layout: _Layout, lines, add, report: ReadReport, skip: bool) -> None:
    current = {"line": 0}

    def physical() -> Iterator[str]:
        for line_no, text in lines:
            current["line"] = line_no
            yield text + "\n"

    reader = csv.reader(physical(), delimiter=layout.delimiter, quotechar='"', strict=True)
    header = layout.header
    if header is not None:
        index = {role: header.index(name) for role, name in layout.columns.items()}
    else:
        index = dict(layout.columns)
    needed = max(index.values())
    seen_header = header is None
    while True:
        start = current["line"] + 1
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            reason = "unterminated quoted field" if "end of data" in str(exc) else f"malformed CSV ({exc})"
            _bad(path, start, reason, report, skip)
            if "end of data" in str(exc):
                break
            continue
        if not seen_header:
            seen_header = True
            continue
        if not any(f.strip() for f in fields):
            continue  # blank line
        if header is not None and len(fields) > len(header):
            _bad(path, start, f"expected {len(header)} fields, found {len(fields)}", report, skip)
            continue
        if header is None and len(fields) != _FIELD_COUNT[layout.format]:
            _bad(path, start, f"expected {_FIELD_COUNT[layout.format]} fields separated by "
                 f"{layout.delimiter!r}, found {len(fields)}", report, skip)
            continue
        if len(fields) <= needed:
            missing = next(role for role, pos in index.items() if pos >= len(fields))
            name = header[index[missing]] if header is not None else f"field {index[missing] + 1}"
            _bad(path, start, f"missing {missing} value ({name!r}); found {len(fields)} fields", report, skip)
            continue
        add(start, *_pick([f if f != "" else None for f in fields], index))


# --------------------------------------------------------------------------------------------
# Shared finishing: units, id normalisation
# --------------------------------------------------------------------------------------------


def _empty_message(path: Path, layout: _Layout, report: ReadReport) -> str:
    if report.bad_lines:
        return (
            f"{path}: no valid interactions ({report.bad_lines} bad lines skipped; first: "
            f"{report.first_bad_line})"
        )
    if layout.header is not None:
        return f"{path}: line 1: header only, no interactions"
    return f"{path}: no interactions in the file"


def _finish(
    frame: pl.DataFrame, data_config: DataConfig, report: ReadReport, distinct: dict[str, pl.Series]
) -> pl.DataFrame:
    if report.has_timestamps:
        unit = data_config.timestamp_unit
        if unit == "auto":
            median = frame.get_column("timestamp").median()
            unit = "ms" if median is not None and median > _MS_THRESHOLD else "s"
        if unit == "ms":
            frame = frame.with_columns(pl.col("timestamp") // 1000)
        report.timestamp_unit = unit
    else:
        report.timestamp_unit = "order"
    if data_config.normalize_ids:
        frame = frame.with_columns(
            _normalized(column, distinct.get(column, frame.get_column(column).unique()))
            for column in ("user", "item")
        )
    return frame


def _normalized(column: str, values: pl.Series) -> pl.Expr:
    """NFC + strip, computed on the distinct ``values`` only (cheap on 8M events)."""
    fixed = values.str.strip_chars()
    if (values.str.len_bytes() != values.str.len_chars()).any():  # some non-ASCII ids
        fixed = values.str.normalize("NFC").str.strip_chars()
    changed = values != fixed
    if not changed.any():
        return pl.col(column)
    mapping = dict(zip(values.filter(changed).to_list(), fixed.filter(changed).to_list()))
    return pl.col(column).replace(mapping)
