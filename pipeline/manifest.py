"""The manifest contract (README, architecture: data contracts): one CSV row per sample, validated before any work.

Every problem is collected and reported at once, with the CSV line number of each
offending row and what to do about it; nothing runs on an invalid manifest.

The root rule (README, architecture: data contracts): with a video root, every local video
(a relative path, an absolute path or a ``file://`` URI) must lie inside it, unless
``allow_outside_root``. Containment is decided on the path as written, with ``.`` and ``..``
removed, against the root as given and the root with its symlinks resolved; symlinks *inside*
the root are not followed (they belong to whoever set the root up, not to the manifest).
Object-store URIs (``s3://`` …) are not confined.
"""
from __future__ import annotations

import io
import json
import math
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pandas as pd

from pipeline import storage
from pipeline.benchmarks import BENCHMARKS, SPLITS, tasks_of

REQUIRED = ("sample_id", "benchmark", "task", "split", "video", "answer")
OPTIONAL = ("start_sec", "end_sec", "question", "references")
MAX_SHOWN = 50  # problems listed in full; the rest are counted


class ManifestError(ValueError):
    """A manifest that failed validation; ``problems`` lists every finding."""

    def __init__(self, path: str, problems: list[str]):
        self.path = path
        self.problems = problems
        shown = problems[:MAX_SHOWN]
        more = f"\n  … and {len(problems) - MAX_SHOWN} more" if len(problems) > MAX_SHOWN else ""
        super().__init__(f"{path}: {len(problems)} problem(s) in the manifest; nothing was run.\n  "
                         + "\n  ".join(shown) + more)


def is_uri(path: str) -> bool:
    return "://" in path


def is_file_uri(path: str) -> bool:
    return path[:7].lower() == "file://"


def file_uri_path(uri: str) -> str:
    """The local path of a ``file://`` URI (percent-decoded); ``ValueError`` for one naming a remote host."""
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise ValueError(f"file URI {uri!r} names the host {parts.netloc!r}; write file:///absolute/path "
                         f"(three slashes) or a plain path")
    return unquote(parts.path)


def resolve_video(video: str, video_root: str | None) -> str:
    """Absolute path or URI of a manifest's ``video`` entry (a ``file://`` URI becomes its local path)."""
    if is_file_uri(video):
        try:
            return file_uri_path(video)
        except ValueError:
            return video
    if is_uri(video) or posixpath.isabs(video) or not video_root:
        return video
    if is_uri(video_root):
        return video_root.rstrip("/") + "/" + video
    return str(Path(video_root) / video)


def _escapes_root(video: str) -> bool:
    """A relative path whose ``..`` components lead out of the folder it starts from (lexically)."""
    if is_uri(video) or posixpath.isabs(video):
        return False
    norm = posixpath.normpath(video.replace("\\", "/"))
    return norm == ".." or norm.startswith("../")


def root_forms(video_root: str | None) -> tuple[str, ...] | None:
    """The local folder(s) that confine absolute video paths: the root as written (made absolute,
    ``..`` removed) and the root with its symlinks resolved. ``()`` for an object-store root (no local
    path is inside it), ``None`` when there is no root to confine to."""
    if not video_root:
        return None
    root = video_root
    if is_file_uri(root):
        root = file_uri_path(root)
    elif is_uri(root):
        return ()
    return tuple(dict.fromkeys([os.path.normpath(os.path.abspath(root)), os.path.realpath(root)]))


def _inside(path: str, roots: tuple[str, ...]) -> bool:
    p = os.path.normpath(path)
    return any(p == r or p.startswith(r.rstrip("/") + "/") for r in roots)


def _float_or_none(value: str) -> float | None:
    value = (value or "").strip()
    if not value:
        return None
    f = float(value)
    if math.isnan(f) or math.isinf(f):
        raise ValueError(value)
    return f


def _seconds(stripped: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """A column of seconds as float (NaN when empty) and the mask of entries that are not a finite number."""
    given = (stripped != "").to_numpy()
    values = pd.to_numeric(stripped.where(given, None), errors="coerce").to_numpy(dtype=float, copy=True)
    bad = given & ~np.isfinite(values)
    for i in np.flatnonzero(bad):  # what pandas does not parse but Python's float() does (e.g. '1_000')
        try:
            values[i] = _float_or_none(str(stripped.iat[i]))
            bad[i] = False
        except ValueError:
            values[i] = np.nan
    return values, bad


@dataclass
class Manifest:
    path: str
    df: pd.DataFrame  # all columns as strings; start_sec/end_sec as float (NaN when absent)

    def __len__(self) -> int:
        return len(self.df)

    def references(self, row) -> list[str]:
        """All references of a row: the JSON list in ``references`` if present, else [answer]."""
        refs = row.get("references", "") if hasattr(row, "get") else ""
        if isinstance(refs, str) and refs.strip():
            return list(json.loads(refs))
        return [row["answer"]]


def read_manifest(path: str | Path, video_root: str | None = None, *, check_files: bool = False,
                  allow_outside_root: bool = False) -> Manifest:
    """Read and validate a manifest CSV; raise :class:`ManifestError` listing every problem.

    With ``video_root``, every local video (relative, absolute or ``file://``) must lie inside it
    unless ``allow_outside_root``; ``check_files`` also reports videos that do not exist.
    """
    path = str(path)
    try:
        storage.check(path, "manifest")
        source = io.BytesIO(storage.read_bytes(path)) if storage.is_uri(path) else path
        df = pd.read_csv(source, dtype=str, keep_default_na=False, na_values=[], encoding="utf-8")
    except storage.StorageError as e:
        raise ManifestError(path, [str(e)]) from None
    except FileNotFoundError:
        raise ManifestError(path, [f"file not found: {path} (create one with `malmm-pipeline manifest` or `synth`)"]) from None
    except UnicodeDecodeError:
        raise ManifestError(path, encoding_problems(path)) from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise ManifestError(path, [f"not a readable CSV file: {e}"]) from None
    df.columns = [c.strip() for c in df.columns]
    problems = validate(df, video_root=video_root, check_files=check_files, allow_outside_root=allow_outside_root)
    if problems:
        raise ManifestError(path, problems)
    for col in OPTIONAL:
        if col not in df.columns:
            df[col] = ""
    for col in ("start_sec", "end_sec"):
        df[col] = _seconds(df[col].str.strip())[0]
    return Manifest(path, df)


def encoding_problems(path: str) -> list[str]:
    """Every line of a file that is not valid UTF-8 (line, byte offset, the bytes) and the fix."""
    data = storage.read_bytes(path)
    loc = storage.path(path)
    name = loc.name
    fixed = f"{loc.stem}.utf8{loc.suffix}"
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return [f"the file is UTF-16 (it starts with a UTF-16 byte-order mark), manifests must be UTF-8; "
                f"re-save it as UTF-8, e.g. `iconv -f utf-16 -t utf-8 {name} > {fixed}`"]
    problems, offset = [], 0
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            bad = raw[e.start:e.end]
            around = raw[max(0, e.start - 30):e.end + 30].decode("utf-8", errors="replace").strip()
            problems.append(f"line {number}: not UTF-8 at byte offset {offset + e.start} "
                            f"(byte {' '.join(f'0x{b:02x}' for b in bad)} in {around!r})")
        offset += len(raw) + 1
    # bytes 0x80-0x9f are printable in Windows-1252 (Excel's export) but control codes in Latin-1
    source = "cp1252" if any(0x80 <= b <= 0x9f for b in data) else "latin1"
    problems.append(f"the manifest must be UTF-8; re-save it as UTF-8 (e.g. `iconv -f {source} -t utf-8 {name} > "
                    f"{fixed}` if it came from a {'Windows-1252' if source == 'cp1252' else 'Latin-1'} export, "
                    f"or 'CSV UTF-8' in a spreadsheet's save dialog)")
    return problems


def _line(i: int) -> str:
    return f"line {i + 2} (row {i + 1})"  # the header is line 1


def _column(df: pd.DataFrame, col: str) -> pd.Series:
    """A column as strings ('' where absent or NA), indexed by row position."""
    if col not in df.columns:
        return pd.Series(np.full(len(df), "", dtype=object))
    return df[col].reset_index(drop=True).fillna("").astype(str)


def _bad_references(value: str) -> bool:
    try:
        r = json.loads(value)
    except ValueError:
        return True
    return not isinstance(r, list) or not r or not all(isinstance(x, str) and x.strip() for x in r)


def _video_problem(video: str, roots: tuple[str, ...] | None, allow_outside_root: bool) -> str | None:
    """What is wrong with one (stripped) ``video`` entry under the root rule, without its line."""
    if not video:
        return "empty video path"
    if is_file_uri(video):
        try:
            local = file_uri_path(video)
        except ValueError as e:
            return str(e)
    elif is_uri(video):
        try:
            storage.check(video, "video")
        except storage.StorageError as e:
            return str(e)
        return None  # object-store URIs are not confined to the video root
    elif posixpath.isabs(video):
        local = video
    else:
        if _escapes_root(video) and not allow_outside_root:
            return (f"video path {video!r} escapes the video root; give a path inside --video-root or "
                    f"pass --allow-outside-root")
        return None
    if roots is None or allow_outside_root or _inside(local, roots):
        return None
    where = roots[0] if roots else "an object-store video root"
    return (f"video path {video!r} is outside the video root {where}; move it inside, set --video-root "
            f"to a folder that holds it, or pass --allow-outside-root (allow_outside_root in [extract])")


def _video_problems(videos: pd.Series, roots: tuple[str, ...] | None, allow_outside_root: bool) -> dict[str, str]:
    """Distinct (stripped) video entry → its problem, for the entries that break the root rule.

    Column-wise first: a plain relative path (no ``..``, no scheme) is always fine, and so is an
    absolute one without ``.``/``..``/``//`` components that starts with a root; only the rest are
    looked at one by one.
    """
    u = pd.Series(videos.unique(), dtype=object).astype(str)
    absolute = u.str.startswith("/")
    odd = (u == "") | u.str.contains("://", regex=False) | u.str.contains("..", regex=False)
    if roots is not None and not allow_outside_root:
        plain_abs = absolute & ~odd & ~u.str.contains(r"//|/\.(?:/|$)", regex=True)
        inside = pd.Series(False, index=u.index)
        for r in roots:
            inside |= (u == r) | u.str.startswith(r.rstrip("/") + "/")
        odd |= absolute & ~(plain_abs & inside)
    out = {}
    for v in u[odd]:
        if (m := _video_problem(v, roots, allow_outside_root)) is not None:
            out[v] = m
    return out


def local_video_path(video: str, video_root: str | None) -> str | None:
    """The local file a (stripped) ``video`` entry names, or None for an object-store URI."""
    if is_file_uri(video):
        try:
            return file_uri_path(video)
        except ValueError:
            return None
    if is_uri(video):
        return None
    if posixpath.isabs(video) or not video_root:
        return video
    if is_file_uri(video_root):
        return str(Path(file_uri_path(video_root)) / video)
    return None if is_uri(video_root) else str(Path(video_root) / video)


def find_missing(video: pd.Series, video_root: str | None, only: set[str] | None = None) -> dict[int, str]:
    """Row position → local path or URI, for every row whose video file does not exist (each distinct
    video looked up once; object-store videos by listing each folder once). ``video`` holds the stripped entries;
    ``only`` restricts the lookup to these entries."""
    missing, listed = {}, {}
    for v in video.unique():
        if not v or (only is not None and v not in only):
            continue
        path = local_video_path(v, video_root)
        if path is not None:
            if not os.path.exists(path):
                missing[v] = path
            continue
        try:
            uri = storage.path(resolve_video(v, video_root))
        except storage.StorageError:
            continue  # an unsupported scheme is a validation error, reported there
        if storage.is_uri(uri):  # an object: each folder listed once, not one request per video
            if uri.parent not in listed:
                listed[uri.parent] = {p.name for p in storage.listdir(uri.parent, dirs=False)}
            if uri.name not in listed[uri.parent]:
                missing[v] = str(uri)
    if not missing:
        return {}
    values = video.to_numpy(dtype=object)
    return {int(i): missing[values[i]] for i in np.flatnonzero(video.isin(list(missing)).to_numpy())}


def missing_videos(df: pd.DataFrame, video_root: str | None, only: set[str] | None = None) -> list[str]:
    """Every row whose local video file does not exist, as '<line>: video file not found: <path>'
    (``only``: just these stripped ``video`` entries)."""
    return [f"{_line(i)}: video file not found: {p}"
            for i, p in find_missing(_column(df, "video").str.strip(), video_root, only).items()]


class _Values(dict):
    """Columns as object arrays, converted on first access (only columns with findings are)."""

    def __init__(self, series: dict[str, pd.Series]):
        super().__init__()
        self.series = series

    def __missing__(self, col: str) -> np.ndarray:
        self[col] = self.series[col].to_numpy(dtype=object)
        return self[col]


def validate(df: pd.DataFrame, *, video_root: str | None = None, check_files: bool = False,
             allow_outside_root: bool = False) -> list[str]:
    """Every problem of a manifest table, as human-readable lines naming the CSV line and the fix.

    Column-wise (pandas operations, and one check per distinct value where a value needs parsing),
    so a manifest of hundreds of thousands of rows validates in about a second. Findings are
    listed in line order.
    """
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        return [f"missing column(s) {', '.join(missing)}; required columns are {', '.join(REQUIRED)}"]
    if len(df) == 0:
        return ["the manifest has no rows"]
    found: list[tuple[int, int, str]] = []  # (row, check, message): sorted into line order at the end

    def report(mask, check: int, message) -> None:
        for i in np.flatnonzero(np.asarray(mask, dtype=bool)):
            found.append((int(i), check, f"{_line(int(i))}: {message(int(i))}"))

    cols = (*REQUIRED, *OPTIONAL)
    raw = {c: _column(df, c) for c in cols}
    strip = {c: s.str.strip() for c, s in raw.items()}
    rv = _Values(raw)  # element access for messages, converted on first use
    sv = _Values(strip)

    sid = raw["sample_id"]
    codes, uniques = pd.factorize(sid)
    first = np.full(len(uniques), len(sid), dtype=np.int64)
    np.minimum.at(first, codes, np.arange(len(sid)))
    report(sid.duplicated(keep="first") & (sid != ""), 0,
           lambda i: f"duplicate sample_id {rv['sample_id'][i]!r} (first at {_line(int(first[codes[i]]))}); "
                     f"sample ids must be unique")
    report(strip["sample_id"] == "", 1, lambda i: "empty sample_id")

    bench = strip["benchmark"]
    known = bench.isin(list(BENCHMARKS))
    report(~known, 2, lambda i: f"unknown benchmark {sv['benchmark'][i]!r}; use one of {', '.join(BENCHMARKS)}")
    for b in bench[known].unique():
        tasks = tasks_of(b)
        if tasks != ("",):
            report((bench == b) & ~strip["task"].isin(list(tasks)), 3,
                   lambda i, b=b, tasks=tasks: f"unknown task {rv['task'][i]!r} for {b}; use one of {', '.join(tasks)}")
    report(~strip["split"].isin(list(SPLITS)), 4,
           lambda i: f"unknown split {rv['split'][i]!r}; use one of {', '.join(SPLITS)}")
    report(strip["answer"] == "", 5,
           lambda i: "empty target in column 'answer' (a label, answer or caption is required)")

    given = strip["references"] != ""
    bad_refs = [v for v in raw["references"][given].unique() if _bad_references(v)]
    if bad_refs:
        report(raw["references"].isin(bad_refs) & given, 6,
               lambda i: f"'references' must be a JSON list of non-empty strings, got {rv['references'][i][:60]!r}")

    video_msg = _video_problems(strip["video"], root_forms(video_root), allow_outside_root)
    rejected = strip["video"].isin(list(video_msg)).to_numpy() if video_msg else np.zeros(len(df), bool)
    report(rejected, 7, lambda i: video_msg[sv["video"][i]])

    bounds = {}
    for check, col in ((8, "start_sec"), (9, "end_sec")):
        bounds[col], bad = _seconds(strip[col])
        report(bad, check, lambda i, col=col: f"{col} must be a number of seconds, got {rv[col][i]!r}")
    s, e = bounds["start_sec"], bounds["end_sec"]
    with np.errstate(invalid="ignore"):
        report(s < 0, 10, lambda i: f"start_sec is negative ({s[i]})")
        report(e <= s, 11, lambda i: f"end_sec ({e[i]}) must be greater than start_sec ({s[i]})")

    if check_files:
        for i, path in find_missing(strip["video"], video_root).items():
            if not rejected[i]:
                found.append((i, 12, f"{_line(i)}: video file not found: {path}"))
    found.sort(key=lambda t: (t[0], t[1]))
    return [m for _, _, m in found]
