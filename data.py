"""The shared data layer of rearec.py and stream_rec.py: datasets, splits, batches, evaluation.

Both methods are compared under ONE protocol, so everything that decides a number lives here:
which interactions are kept, how each user's sequence is ordered and split, how sequences are
padded, and how a ranking is turned into Recall / NDCG / MRR. No model code, no losses.

Run
    python data.py --stats                               # the built-in synthetic dataset (offline)
    python data.py --dataset ml-1m --data-dir data --stats   # downloads ml-1m.zip once, then cached
    python data.py --dataset path/to/ml-1m.txt --stats   # any local file, layout auto-detected
    python data.py --report runs/a runs/b                # one markdown table of every results.json below
    python data.py --plot runs/a --plot-out figures      # training curves, ReaRec Figs. 2, 4, 5 (matplotlib)

Sequence layout (one worked example; PAD = 0, item ids are 1..N)
    A user's chronological items:          [7, 3, 9, 4, 2]
    leave-one-out:  train = [7, 3, 9]      valid = history [7, 3, 9]    -> target 4
                                           test  = history [7, 3, 9, 4] -> target 2
    Training rows, maxlen L = 4 (left-padded, newest item in the last column):
        inputs  = [0, 0, 7, 3]             the model reads these ...
        targets = [0, 0, 3, 9]             ... and predicts these, at EVERY position (0 = no loss)
    Evaluation rows: history [7, 3, 9, 4] -> [7, 3, 9, 4]; the score of the last column ranks items.
    Left padding keeps "the newest item" at a fixed column (-1), which is what a causal encoder and
    ReaRec's reasoning steps read; right padding would move it per user.

Datasets (name -> what is downloaded; defaults of the preprocessing in DEFAULTS below)
    synthetic              built in: 2,000 users, 400 items, topic chains + user-specific strides
    ml-100k, ml-1m, ml-20m GroupLens zips (https://files.grouplens.org/datasets/movielens/)
    amazon2014-<Cat>       McAuley 2014 5-core reviews, e.g. amazon2014-Beauty
    amazon2018-<Cat>       Ni et al. 2018 5-core reviews, e.g. amazon2018-All_Beauty
    amazon2023-<Cat>       Amazon Reviews 2023 benchmark 5-core rating_only CSV (leave-one-out)
    amazon2023-<Cat>-time  the same data as the benchmark's timestamp_w_his train/valid/test files,
                           split at the official absolute times (ReaRec's protocol)
    PATH                   a local file (.gz ok): SASRec `user item` lines, S3-Rec `user i1 i2 ..`
                           lines, CSV/TSV with a header, MovieLens `::` files, Amazon JSON lines
"""
import argparse
import atexit
import ast
import csv
import gzip
import hashlib
import http.client
import io
import json
import math
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

PAD = 0  # item id 0 is padding everywhere; real items are 1..n_items
KS = (5, 10, 20)  # cut-offs of every reported metric


class DataError(Exception):
    """A problem with the data or the user's request; main() prints it as one line."""


# -----------------------------------------------------------------------------
# Named datasets: where they come from and their documented preprocessing defaults
# -----------------------------------------------------------------------------
GROUPLENS = "https://files.grouplens.org/datasets/movielens/"
AMZ2014 = "http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/"
AMZ2018 = ["https://mcauleylab.ucsd.edu/public_datasets/data/amazon_v2/",
           "https://jmcauley.ucsd.edu/data/amazon_v2/"]  # the host has moved over the years
AMZ2023 = "https://mcauleylab.ucsd.edu/public_datasets/data/amazon_2023/"
AMZ2023_CUTS = (1628643414042, 1658002729837)  # official absolute split (ms): 2021-08-11, 2022-07-16

# MovieLens zips: (inner folder, md5 published by GroupLens next to each zip)
MOVIELENS = {"ml-100k": "0e33842e24a9c977be4e0107933c0723",
             "ml-1m": "c4d9eecfca2ab87c1945afe126590906",
             "ml-20m": "cd245b17a1ae2cc31bb14903e1204af3"}

# Preprocessing defaults by kind of source. None = step off.
#   min_rating: keep interactions with rating >= this (implicit feedback threshold)
#   dedup:      keep only the earliest (user, item) interaction
#   kcore:      drop users and items with fewer than k interactions ...
#   kcore_mode: ... in one pass on the unfiltered counts (SASRec) or repeated until stable
#   split:      "loo" leave-one-out, or "time" (global cut times; see time_split below)
#   min_history: time split only: evaluation cases need this many history items (ReaRec: 5)
DEFAULTS = {
    # SASRec's ML-1M / Amazon processing: all ratings kept, counts < 5 removed in ONE pass.
    # With these, raw ML-1M gives SASRec's ml-1m.txt exactly (6,040 u, 3,416 i, 999,611 rows).
    "raw": dict(min_rating=None, dedup=True, kcore=5, kcore_mode="once", split="loo", min_history=1),
    # Already processed files (SASRec pairs, S3-Rec lists, synthetic) are taken as they are.
    "processed": dict(min_rating=None, dedup=False, kcore=None, kcore_mode="once", split="loo",
                      min_history=1),
    # ReaRec on Amazon 2023 (paper §4.1, official notebooks): rating > 3, absolute-time split,
    # valid/test rows need >= 5 history items, all of them (and the target) seen in training.
    "rearec-time": dict(min_rating=4.0, dedup=True, kcore=None, kcore_mode="once", split="time",
                        min_history=5),
}


def _sources(name):
    """Name -> (files to fetch as [(filename, [urls], md5)], (meta file, [urls]) or None,
    the DEFAULTS entry of its preprocessing)."""
    if name in MOVIELENS:
        zname = name + ".zip"
        return [(zname, [GROUPLENS + zname], MOVIELENS[name])], None, "raw"
    m = re.fullmatch(r"amazon(2014|2018|2023)-(\w+?)(-time)?", name)
    if not m or (m.group(3) and m.group(1) != "2023"):
        raise DataError(f"unknown dataset '{name}': it is not a file and not one of synthetic, "
                        f"{', '.join(MOVIELENS)}, amazon2014-<Category>, amazon2018-<Category>, "
                        f"amazon2023-<Category>[-time]")
    year, cat, timed = m.groups()
    if year == "2014":
        f, meta = f"reviews_{cat}_5.json.gz", f"meta_{cat}.json.gz"
        return [(f, [AMZ2014 + f], None)], (meta, [AMZ2014 + meta]), "raw"
    if year == "2018":
        f, meta = f"{cat}_5.json.gz", f"meta_{cat}.json.gz"
        return ([(f, [u + "categoryFilesSmall/" + f for u in AMZ2018], None)],
                (meta, [u + "metaFiles2/" + meta for u in AMZ2018]), "raw")
    meta = f"meta_{cat}.jsonl.gz"
    meta = (meta, [AMZ2023 + "raw/meta_categories/" + meta])
    if timed:  # three files; the history column is rebuilt from the interactions themselves
        files = [(f"{cat}.{s}.csv.gz", [f"{AMZ2023}benchmark/5core/timestamp_w_his/{cat}.{s}.csv.gz"],
                  None) for s in ("train", "valid", "test")]
        return files, meta, "rearec-time"
    f = f"{cat}.csv.gz"
    return [(f, [AMZ2023 + "benchmark/5core/rating_only/" + f], None)], meta, "raw"


# -----------------------------------------------------------------------------
# Download: progress, cache, atomic write, integrity check (BOILERPLATE)
# -----------------------------------------------------------------------------
def _check_file(path, md5=None, name=None):
    """Return None if `path` is a complete, valid file, else a short reason. The format check
    (zip CRC, gzip stream) follows the extension of `name` (default: `path`)."""
    name = name or path
    try:
        if md5 is not None:
            h = hashlib.md5()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            if h.hexdigest() != md5:
                return f"md5 {h.hexdigest()} != expected {md5}"
        if name.endswith(".zip"):
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()  # reads every member and checks its CRC
                if bad:
                    return f"bad CRC in member {bad}"
        elif name.endswith(".gz"):
            with gzip.open(path, "rb") as f:  # the whole stream must decompress to its end
                while f.read(1 << 22):
                    pass
        elif os.path.getsize(path) == 0:
            return "empty file"
    except (OSError, EOFError, zipfile.BadZipFile, gzip.BadGzipFile, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def download(urls, dest, md5=None, quiet=False):
    """Fetch the first reachable URL of `urls` to `dest`, unless a valid copy is already there.

    The bytes go to `dest + '.part'` and are renamed only after the size (Content-Length) and the
    content (md5 / zip CRC / gzip stream) check out, so `dest` is never half-written. A corrupt
    cached copy is fetched again; it stays in place until the verified copy replaces it.
    Offline, the error says where to put the file by hand.
    """
    urls = [urls] if isinstance(urls, str) else list(urls)
    corrupt = None
    if os.path.exists(dest):
        corrupt = _check_file(dest, md5)
        if corrupt is None:
            return dest
        print(f"cached {dest} is corrupt ({corrupt}); downloading it again", file=sys.stderr)
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    tmp, errors = dest + ".part", []
    for url in urls:
        try:
            _fetch(url, tmp, quiet)
            why = _check_file(tmp, md5, name=dest)
            if why is not None:
                raise DataError(f"downloaded file from {url} is corrupt ({why})")
            os.replace(tmp, dest)  # atomic on POSIX and Windows
            return dest
        except urllib.error.HTTPError as e:  # the server answered: wrong name, moved file, ...
            errors.append(f"{url}: HTTP {e.code} {e.reason}")
        except (OSError, DataError, http.client.HTTPException) as e:  # offline, refused, timeout, cut
            errors.append(f"{url}: {getattr(e, 'reason', None) or e}")
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    cached = f"; the cached copy is corrupt ({corrupt})" if corrupt else ""
    err = DataError(f"could not download {os.path.basename(dest)} ({'; '.join(errors)}{cached}). If "
                    f"this machine is offline, fetch {urls[0]} elsewhere and place it at {dest}")
    err.reason = "; ".join(errors)  # for _download_all's one message about several files
    raise err


def _fetch(url, tmp, quiet):
    with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
        total = int(r.headers.get("Content-Length") or 0)
        done, last = 0, 0.0
        while chunk := r.read(1 << 20):
            f.write(chunk)
            done += len(chunk)
            if not quiet and (time.time() - last > 0.5 or done == total):
                last = time.time()
                pct = f" ({100 * done / total:.0f}%)" if total else ""
                print(f"downloading {url}: {done / 1e6:.1f}"
                      f"{f'/{total / 1e6:.1f}' if total else ''} MB{pct}", file=sys.stderr)
    if total and done != total:
        raise DataError(f"truncated download: got {done} of {total} bytes")


# -----------------------------------------------------------------------------
# Parsing: every layout becomes the same four columns
# -----------------------------------------------------------------------------
# A parsed file is a dict of equal-length numpy columns: user, item (raw ids, int or str),
# rating (float or None if the layout has none), time (int; the line number if it has none).
USER_COLS = ("user_id", "userid", "user", "reviewerid", "uid")
ITEM_COLS = ("item_id", "itemid", "item", "movieid", "parent_asin", "asin", "business_id", "iid")
RATING_COLS = ("rating", "overall", "stars", "score")
TIME_COLS = ("timestamp", "time", "unixreviewtime", "date")


def _read_text(path, inner=None):
    """The decoded text of a file, a .gz file, or member `inner` of a .zip (utf-8, else latin-1)."""
    try:
        if inner is not None:
            with zipfile.ZipFile(path) as z:
                raw = z.read(inner)
        else:
            with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
                raw = f.read()
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise DataError(f"cannot read {path}{'/' + inner if inner else ''}: {e}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")  # MovieLens .dat files are latin-1


def _as_ids(values):
    """Ids as int64 when every one is an integer (so 2 sorts before 10), else as str."""
    arr = np.asarray(values)
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64)
    arr = arr.astype(str)
    if arr.size and all(s.isdigit() for s in arr[: min(1000, arr.size)]):
        try:
            return arr.astype(np.int64)
        except ValueError:
            pass
    return arr


def _columns(user, item, rating=None, t=None):
    n = len(user)
    return dict(user=_as_ids(user), item=_as_ids(item),
                rating=None if rating is None else np.asarray(rating, dtype=np.float64),
                time=np.arange(n, dtype=np.int64) if t is None else np.asarray(t, dtype=np.int64),
                has_time=t is not None)


def _numeric_table(text, sep, ncols, path):
    """Fast path for all-numeric files with `ncols` fields per line; slow path names the bad line."""
    lines = text.count("\n") + (0 if text.endswith("\n") else 1)
    body = text.replace(sep, " ") if sep != " " else text
    for dtype in (np.int64, np.float64):  # integer parsing is ~7x faster; ML-20m has half stars
        with warnings.catch_warnings():  # numpy warns when it stops early; we check the count
            warnings.simplefilter("ignore")
            try:
                flat = np.fromstring(body, sep=" ", dtype=dtype)
            except ValueError:  # numpy >= 2.3 raises where older versions warned
                continue
        if flat.size == ncols * lines:
            return flat.reshape(lines, ncols)
    rows = []  # something is off: find the first malformed line and name it
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(sep) if sep != " " else line.split()
        try:
            if len(parts) != ncols:
                raise ValueError(f"expected {ncols} fields, got {len(parts)}")
            rows.append([float(p) for p in parts])
        except ValueError as e:
            raise DataError(f"{path}, line {n}: malformed line {line[:80]!r} ({e})") from None
    return np.array(rows, dtype=np.float64).reshape(-1, ncols)


def _parse_sasrec(text, path):
    """SASRec / BERT4Rec `user item` per line, already in chronological order. Integer ids take
    the fast path; other ids (e.g. Amazon user ids and ASINs) are read as strings, as the other
    layouts read them."""
    try:
        t = _numeric_table(text, " ", 2, path).astype(np.int64)
        return _columns(t[:, 0], t[:, 1])
    except DataError:  # not all numeric: read the ids as text, still naming a malformed line
        pass
    users, items = [], []
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise DataError(f"{path}, line {n}: malformed line {line[:80]!r} (expected 2 fields, "
                            f"got {len(parts)})")
        users.append(parts[0])
        items.append(parts[1])
    return _columns(users, items)


def _parse_user_lists(text, path):
    """S3-Rec layout: `user i1 i2 i3 ...` per line, chronological."""
    users, items = [], []
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2:
            raise DataError(f"{path}, line {n}: a user line needs a user id and at least one item")
        users += [parts[0]] * (len(parts) - 1)
        items += parts[1:]
    return _columns(users, items)


def _parse_movielens(text, path, sep):
    """user<sep>item<sep>rating<sep>timestamp (ML-1M `::`, ML-100k u.data tabs, headerless CSV)."""
    t = _numeric_table(text, sep, 4, path)
    return _columns(t[:, 0].astype(np.int64), t[:, 1].astype(np.int64), t[:, 2], t[:, 3])


def _find_col(header, names, path, what, required=True):
    for name in names:
        if name in header:
            return header.index(name)
    if required:
        raise DataError(f"{path}: no {what} column in the header {header}; "
                        f"name it one of {', '.join(names)}")
    return None


def _parse_table(text, path, delim):
    """CSV/TSV with a header naming user and item [rating] [timestamp] columns (RecBole's
    `user_id:token` typed headers are fine)."""
    rows = csv.reader(io.StringIO(text), delimiter=delim)
    header = [h.split(":")[0].strip().lower() for h in next(rows)]
    cu, ci = _find_col(header, USER_COLS, path, "user"), _find_col(header, ITEM_COLS, path, "item")
    cr = _find_col(header, RATING_COLS, path, "rating", required=False)
    ct = _find_col(header, TIME_COLS, path, "timestamp", required=False)
    user, item, rating, stamp = [], [], [], []
    for n, row in enumerate(rows, 2):
        if not row:
            continue
        try:
            user.append(row[cu])
            item.append(row[ci])
            if cr is not None:
                rating.append(float(row[cr]))
            if ct is not None:
                stamp.append(int(float(row[ct])))
        except (IndexError, ValueError) as e:
            raise DataError(f"{path}, line {n}: malformed row {delim.join(row)[:80]!r} ({e})") from None
    if not user:
        raise DataError(f"{path} has a header but no rows; add the interactions below the header")
    return _columns(user, item, rating if cr is not None else None, stamp if ct is not None else None)


def _parse_json_lines(text, path):
    """Amazon reviews, one object per line: 2014/2018 `reviewerID, asin, overall, unixReviewTime`,
    2023 `user_id, parent_asin, rating, timestamp` (ms). Old dumps are Python literals, not JSON."""
    user, item, rating, stamp = [], [], [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            try:
                d = json.loads(line)
            except json.JSONDecodeError:
                d = ast.literal_eval(line)  # 2014 "loose JSON"
            if "parent_asin" in d or "user_id" in d:  # Amazon 2023
                user.append(d["user_id"]), item.append(d["parent_asin"])
                rating.append(float(d["rating"])), stamp.append(int(d["timestamp"]))
            else:
                user.append(d["reviewerID"]), item.append(d["asin"])
                rating.append(float(d["overall"])), stamp.append(int(d["unixReviewTime"]))
        except (ValueError, SyntaxError, KeyError, TypeError) as e:
            raise DataError(f"{path}, line {n}: not a review record ({type(e).__name__}: {e}); "
                            f"expected reviewerID/asin/overall/unixReviewTime or "
                            f"user_id/parent_asin/rating/timestamp") from None
    return _columns(user, item, rating, stamp)


def parse_file(path, inner=None):
    """Auto-detect the layout of an interaction file and parse it into columns."""
    text = _read_text(path, inner)
    name = inner or path
    lines = [ln for ln in text[:200_000].splitlines()[:1000] if ln.strip()]
    if not lines:
        raise DataError(f"{name} is empty")
    first = lines[0].strip()
    if first.startswith("{"):
        return _parse_json_lines(text, name)
    if "::" in first:
        return _parse_movielens(text, name, "::")
    for delim in ("\t", ","):
        if delim in first:
            fields = first.split(delim)
            if all(re.fullmatch(r"-?[\d.eE+-]+", f.strip()) for f in fields):
                if len(fields) == 4:  # headerless user,item,rating,timestamp (e.g. u.data)
                    return _parse_movielens(text, name, delim)
                raise DataError(f"{name}: a headerless {len(fields)}-column table; add a header "
                                f"naming the user and item columns")
            return _parse_table(text, name, delim)
    counts = {len(ln.split()) for ln in lines}
    if counts == {2}:
        return _parse_sasrec(text, name)
    if max(counts) > 2:
        return _parse_user_lists(text, name)
    raise DataError(f"{name}: cannot recognise the layout of line 1 {first[:80]!r}; supported: "
                    f"'user item' lines, 'user i1 i2 ..' lines, CSV/TSV with a header, "
                    f"MovieLens '::' files, Amazon JSON lines")


def _concat(parts):
    if len(parts) == 1:
        return parts[0]
    out = {k: np.concatenate([p[k] for p in parts]) for k in ("user", "item", "time")}
    out["user"], out["item"] = _as_ids(out["user"]), _as_ids(out["item"])
    out["rating"] = None if any(p["rating"] is None for p in parts) else \
        np.concatenate([p["rating"] for p in parts])
    out["has_time"] = all(p["has_time"] for p in parts)
    return out


# -----------------------------------------------------------------------------
# Item metadata (titles, genres, categories; S3-Rec attribute ids): used by STREAM-Rec's item features
# -----------------------------------------------------------------------------
ML100K_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                 "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                 "Romance", "Sci-Fi", "Thriller", "War", "Western"]


def parse_meta(path, inner=None):
    """Raw item id -> one text line "title | genres or categories" (MovieLens or Amazon meta)."""
    text, out = _read_text(path, inner), {}
    base = os.path.basename(inner or path)
    if base == "movies.dat":  # ML-1M: id::title::Genre|Genre
        for line in text.splitlines():
            p = line.split("::")
            if len(p) == 3:
                out[p[0]] = f"{p[1]} | {p[2].replace('|', ' ')}"
    elif base == "u.item":  # ML-100k: id|title|date|video date|url|19 genre flags
        for line in text.splitlines():
            p = line.split("|")
            if len(p) >= 24:
                out[p[0]] = f"{p[1]} | " + " ".join(g for g, f in zip(ML100K_GENRES, p[5:24]) if f == "1")
    elif base == "movies.csv":  # ML-20m: movieId,title,genres
        for row in list(csv.reader(io.StringIO(text)))[1:]:
            if len(row) == 3:
                out[row[0]] = f"{row[1]} | {row[2].replace('|', ' ')}"
    else:  # Amazon meta, one object per line (2014 is Python-literal "loose JSON")
        for line in text.splitlines():
            try:
                d = json.loads(line)
            except json.JSONDecodeError:
                try:
                    d = ast.literal_eval(line)
                except (ValueError, SyntaxError):
                    continue
            key = d.get("parent_asin") or d.get("asin")
            cats = d.get("categories") or d.get("category") or []
            flat = [c for c in cats if isinstance(c, str)] + \
                [c for sub in cats if isinstance(sub, list) for c in sub]
            if key:
                out[key] = f"{d.get('title') or ''} | {' '.join(dict.fromkeys(flat))}".strip()
    return out


def _sibling_meta(path):
    """The metadata file that usually sits next to an interaction file, if it is there."""
    folder, base = os.path.split(path)
    names = {"u.data": ["u.item"], "ratings.csv": ["movies.csv"]}.get(base)
    if base.endswith(".dat"):  # MovieLens ratings.dat (or a part of it) -> movies.dat
        names = ["movies.dat"]
    if names is None:
        stem = re.sub(r"(\.(train|valid|test))?\.(json|jsonl|csv)(\.gz)?$", "", base)
        stem = re.sub(r"^reviews_|_5$", "", stem)
        names = [f"meta_{stem}.{e}" for e in ("json.gz", "jsonl.gz", "json", "jsonl")]
    for n in names:
        if os.path.exists(os.path.join(folder, n)):
            return os.path.join(folder, n)
    return None


def parse_item_attributes(path):
    """S3-Rec `<Name>_item2attributes.json`, one JSON object {"item id": [attribute ids]} ->
    {raw item id (str): [attribute id (str), ...]}. The ids are opaque (the file has no names)."""
    try:
        obj = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); expected one "
                        f"object of item id -> list of attribute ids") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected one JSON object of item id -> list of attribute ids, "
                        f"got a {type(obj).__name__}")
    out = {}
    for key, attrs in obj.items():
        if not isinstance(attrs, list) or not all(isinstance(a, (int, str)) and not isinstance(a, bool)
                                                  for a in attrs):
            raise DataError(f"{path}: item {key!r} maps to {str(attrs)[:40]}, not a list of attribute ids")
        out[str(key)] = [str(a) for a in attrs]
    return out


def _sibling_attributes(path):
    """`<Name>_item2attributes.json` next to an S3-Rec interaction file `<Name>.txt`, if there."""
    folder, base = os.path.split(path)
    stem = re.sub(r"\.(txt|csv|tsv|inter|dat)(\.gz)?$", "", base)
    cand = os.path.join(folder, f"{stem}_item2attributes.json")
    return cand if stem != base and os.path.exists(cand) else None


# -----------------------------------------------------------------------------
# The built-in synthetic dataset (offline default of both scripts)
# -----------------------------------------------------------------------------
TOPICS = ["jazz", "noir", "opera", "comet", "desert", "harbor", "glacier", "circus", "orchard",
          "castle", "jungle", "reactor", "canyon", "lagoon", "citadel", "meadow"]
ADJECTIVES = ["red", "quiet", "bold", "lost", "golden", "secret", "wild", "broken", "silver",
              "hidden", "little", "final", "iron", "pale", "swift", "electric", "velvet",
              "frozen", "crimson", "hollow", "lucky", "ancient", "bright", "lonely", "brave"]


def make_synthetic(n_users=2000, n_topics=16, items_per_topic=25, min_len=10, max_len=40,
                   noise=0.2, seed=0):
    """Sequences with structure a sequence model can learn and a popularity model cannot.

    Items live in topics (item = topic * items_per_topic + j). Topics follow one fixed cycle
    (topic -> chain[topic]), and inside the next topic the user moves from index j to
    j + stride (mod items_per_topic), where stride in {1, 2, 3} is a hidden per-user trait.
    So the next item depends on the last item (which topic comes next) AND on the step between
    the last two items (which index): a first-order Markov model gets the topic right but must
    spread its guess over three strides, a model of the whole sequence can infer the stride.
    With probability `noise` the next item is instead drawn from a skewed popularity law.
    Item "titles" name the topic ("golden jazz 7"), so text features recover the topics.
    Returns (columns dict, {raw item id: title}). Deterministic in `seed`; ~10 ms.
    """
    rng = np.random.default_rng(seed)
    T, M = n_topics, items_per_topic
    order = rng.permutation(T)  # one cycle through all topics: order[0] -> order[1] -> ...
    chain = np.empty(T, dtype=np.int64)
    chain[order] = np.roll(order, -1)
    stride = rng.integers(1, 4, size=n_users)  # hidden per-user trait
    lengths = rng.integers(min_len, max_len + 1, size=n_users)
    popularity = 1.0 / np.arange(1, T * M + 1) ** 0.8  # Zipf-like law over a shuffled item order
    popularity = popularity[rng.permutation(T * M)] / popularity.sum()
    topic, j = rng.integers(0, T, size=n_users), rng.integers(0, M, size=n_users)
    seqs = np.zeros((n_users, max_len), dtype=np.int64)
    for t in range(max_len):  # vectorised over users; one loop step per position
        if t > 0:
            topic, j = chain[topic], (j + stride) % M
            jump = rng.random(n_users) < noise
            pick = rng.choice(T * M, size=n_users, p=popularity)
            topic, j = np.where(jump, pick // M, topic), np.where(jump, pick % M, j)
        seqs[:, t] = topic * M + j + 1  # raw item ids 1..T*M
    mask = np.arange(max_len)[None, :] < lengths[:, None]
    users = np.repeat(np.arange(1, n_users + 1), lengths)
    days = np.arange(max_len)[None, :] * 86400 + rng.integers(0, 10**8, size=(n_users, 1))
    cols = _columns(users, seqs[mask], None, days[mask])
    titles = {i + 1: f"{ADJECTIVES[(i * 7 + i // M) % len(ADJECTIVES)]} {TOPICS[i // M % len(TOPICS)]} {i % M}"
              for i in range(T * M)}
    return cols, titles


# -----------------------------------------------------------------------------
# Preprocessing and splits (one place; each step a documented option)
# -----------------------------------------------------------------------------
@dataclass
class Seqs:
    """Ragged item sequences in CSR form: row r is items[starts[r]:ends[r]], oldest first.

    Training data has one row per user. An evaluation split has one row per test case: the row
    is the case's history and `targets[r]` the item to predict after it.
    """
    items: np.ndarray  # (total,) item ids 1..N, users back to back
    starts: np.ndarray  # (R,)
    ends: np.ndarray  # (R,)
    users: np.ndarray  # (R,) user index of each row
    targets: np.ndarray | None = None  # (R,) evaluation splits only

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, r):
        return self.items[self.starts[r]:self.ends[r]]

    def lengths(self):
        return self.ends - self.starts

    def counts(self, n_items):
        """(n_items + 1,) int64: how often each item id occurs inside the rows. Not
        np.bincount(items): the splits share one flat array, so `items` also holds the items
        after each training row's end (the valid and test targets)."""
        return np.bincount(self.items[self.positions()[1]], minlength=n_items + 1)

    def positions(self):
        """(row, pos): for every item of every row, oldest first, its row and its index in `items`."""
        lens = self.lengths()
        row = np.repeat(np.arange(len(self)), lens)
        return row, np.repeat(self.starts, lens) + np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)


@dataclass
class Dataset:
    name: str
    n_items: int  # item ids are 1..n_items; PAD = 0
    train: Seqs  # one row per user
    valid: Seqs
    test: Seqs
    item_text: list | None  # item id -> "title | genres" (index 0 = PAD = ""), None without metadata
    item_ids: np.ndarray  # item id -> raw id in the source file (index 0 unused)
    user_ids: np.ndarray  # user index -> raw id
    stats: dict
    item_attrs: list | None = None  # item id -> [attribute ids] (index 0 = PAD = []), None without a file


def _preprocess(cols, opts, name):
    """Threshold, stable sort, de-duplicate, k-core. Returns (user code, item code, time) arrays,
    grouped by user and chronological inside each user, plus the sorted raw id tables."""
    u, i, t, r = cols["user"], cols["item"], cols["time"], cols["rating"]
    if opts["min_rating"] is not None:  # implicit feedback: a rating >= threshold is a positive
        if r is None:
            raise DataError(f"{name} has no ratings, so a rating threshold cannot be applied; "
                            f"drop --min-rating")
        keep = r >= opts["min_rating"]
        u, i, t = u[keep], i[keep], t[keep]
    user_ids, uc = np.unique(u, return_inverse=True)  # sorted raw ids -> codes 0..
    item_ids, ic = np.unique(i, return_inverse=True)
    # Stable chronological sort inside each user: ties keep FILE order (ML-1M has many same-second
    # ties; an unstable sort reorders them and even changes which items become test targets).
    order = np.argsort(t, kind="stable")
    order = order[np.argsort(uc[order], kind="stable")]
    uc, ic, t = uc[order], ic[order], t[order]
    if opts["dedup"]:  # keep the earliest interaction of each (user, item) pair
        _, first = np.unique(uc * len(item_ids) + ic, return_index=True)
        first.sort()
        uc, ic, t = uc[first], ic[first], t[first]
    k = opts["kcore"] or 0
    while k > 0:  # "once": SASRec's single pass on the unfiltered counts; "iterative": to a fixed point
        keep = (np.bincount(uc)[uc] >= k) & (np.bincount(ic)[ic] >= k)
        uc, ic, t = uc[keep], ic[keep], t[keep]
        if opts["kcore_mode"] == "once" or keep.all():
            break
    if len(uc) == 0:
        raise DataError(f"no interactions left in {name} after preprocessing "
                        f"(min_rating={opts['min_rating']}, kcore={opts['kcore']}); "
                        f"lower --kcore or --min-rating")
    return uc, ic, t, user_ids, item_ids


def _leave_one_out(uc, ic):
    """Last item = test target, second-to-last = valid target, the rest = train (SASRec).
    Users with fewer than 3 items are training-only. Returns row boundaries in the flat arrays."""
    starts = np.flatnonzero(np.r_[True, uc[1:] != uc[:-1]])  # (U,) first position of each user
    ends = np.r_[starts[1:], len(uc)]
    users = uc[starts]
    has_eval = ends - starts >= 3
    train_end = np.where(has_eval, ends - 2, ends)
    s, e, us = starts[has_eval], ends[has_eval], users[has_eval]
    return (starts, train_end, users), (s, e - 2, us, e - 2), (s, e - 1, us, e - 1)


def _time_split(uc, ic, t, cuts, min_history):
    """Global time split: train < t1 <= valid < t2 <= test (ReaRec §4.1; Amazon 2023 benchmark).

    Every valid/test interaction is its own case, with ALL earlier items of the user as history
    (valid-period items included for test cases). As in ReaRec's notebooks, a case is kept only
    if its target and every history item occur in training, and its history is long enough.
    """
    period = np.searchsorted(np.asarray(cuts), t, side="right")  # 0 train, 1 valid, 2 test
    starts = np.flatnonzero(np.r_[True, uc[1:] != uc[:-1]])
    ends = np.r_[starts[1:], len(uc)]
    user_start = np.repeat(starts, ends - starts)  # (n,) start of each position's user
    in_train = np.zeros(ic.max() + 1, dtype=bool)
    in_train[ic[period == 0]] = True
    unseen = np.cumsum(~in_train[ic]) - ~in_train[ic]  # unseen items strictly before each position
    unseen_in_history = unseen - unseen[user_start]
    pos = np.arange(len(uc))
    ok = in_train[ic] & (unseen_in_history == 0) & (pos - user_start >= max(min_history, 1))
    train_end = starts + np.bincount(uc, weights=period == 0, minlength=uc.max() + 1)[uc[starts]].astype(np.int64)
    out = [(starts, train_end, uc[starts])]
    for p in (1, 2):
        c = np.flatnonzero(ok & (period == p))
        out.append((user_start[c], c, uc[c], c))
    return out, in_train


def build_dataset(cols, name, titles=None, **overrides):
    """Parsed columns -> Dataset: preprocessing, split, id remapping (0 = PAD), statistics."""
    kind = overrides.pop("kind", None) or ("raw" if cols["has_time"] else "processed")
    opts = dict(DEFAULTS[kind])
    opts.update({k: v for k, v in overrides.items() if v is not None})
    if opts["kcore_mode"] not in ("once", "iterative"):
        raise DataError(f"--kcore-mode must be 'once' or 'iterative', not {opts['kcore_mode']!r}")
    if (opts["kcore"] or 0) < 0:
        raise DataError(f"--kcore must be >= 0 (0 = off), not {opts['kcore']}")
    uc, ic, t, user_ids, item_ids = _preprocess(cols, opts, name)
    if opts["split"] == "loo":
        rows = _leave_one_out(uc, ic)
        used = np.ones(len(item_ids), dtype=bool)
        used[np.setdiff1d(np.arange(len(item_ids)), ic)] = False
    elif opts["split"] == "time":
        if not cols["has_time"]:
            raise DataError(f"{name} has no timestamps, so it cannot be split by time; use --split loo")
        cuts = opts.get("time_cuts")
        if not cuts:  # ReaRec's Yelp rule: cut at 80 % and 90 % of the time range
            lo, hi = int(t.min()), int(t.max())
            cuts = (lo + 0.8 * (hi - lo), lo + 0.9 * (hi - lo))
        opts["time_cuts"] = [int(c) for c in cuts]
        rows, used = _time_split(uc, ic, t, opts["time_cuts"], opts["min_history"])
    else:
        raise DataError(f"--split must be 'loo' or 'time', not {opts['split']!r}")
    # Remap: items in sorted raw-id order -> 1..N (0 = PAD); only items that can be trained on.
    remap = np.zeros(len(item_ids), dtype=np.int64)
    remap[used] = np.arange(1, used.sum() + 1)
    flat = remap[ic]  # items outside `used` only ever sit in dropped time-split positions
    train, valid, test = (
        Seqs(flat, s, e, us, None if len(r) == 3 else flat[r[3]]) for r in rows
        for s, e, us in [r[:3]])
    text = None
    if titles:
        text = [""] + [str(titles.get(raw, titles.get(str(raw), ""))) for raw in item_ids[used]]
    lens = np.bincount(uc)
    lens = lens[lens > 0]
    stats = dict(name=name, users=int(len(lens)), items=int(used.sum()), interactions=int(len(uc)),
                 avg_len=round(float(lens.mean()), 2), min_len=int(lens.min()),
                 max_len=int(lens.max()), density=round(len(uc) / len(lens) / max(used.sum(), 1), 6),
                 split=opts["split"], train_interactions=int(train.lengths().sum()),
                 train_targets=int(np.maximum(train.lengths() - 1, 0).sum()),
                 valid_cases=len(valid), test_cases=len(test), has_text=text is not None,
                 preprocessing={k: opts[k] for k in DEFAULTS[kind]} | (
                     {"time_cuts": opts["time_cuts"]} if opts["split"] == "time" else {}))
    if len(test) == 0 or len(valid) == 0:
        raise DataError(f"{name}: the {opts['split']} split left no validation or test cases "
                        f"({len(valid)} / {len(test)}); check --split / --time-cuts / --min-history")
    return Dataset(name, int(used.sum()), train, valid, test, text,
                   np.r_[np.zeros(1, item_ids.dtype), item_ids[used]], user_ids, stats)


def load_dataset(name="synthetic", data_dir="data", *, meta=None, attributes=None, verbose=True,
                 **overrides):
    """Load a named dataset (downloading it once into `data_dir`) or a local file.

    `overrides` (None = the dataset's default, see DEFAULTS): min_rating, dedup, kcore,
    kcore_mode, split, time_cuts, min_history. `meta`: a metadata file with item titles
    (found automatically next to local files and in `data_dir` for named datasets).
    `attributes`: an S3-Rec `<Name>_item2attributes.json` (found automatically next to a local
    `<Name>.txt`); sets `ds.item_attrs`.
    """
    titles, kind = None, None
    if name == "synthetic":
        cols, titles = make_synthetic()
        kind = "processed"
    elif os.path.isdir(name):
        raise DataError(f"{name} is a folder; pass the interactions file inside it")
    elif os.path.exists(name):
        cols = _load_local(name)
        if name.endswith(".zip"):
            titles = _zip_meta(name)
        else:
            meta = meta or _sibling_meta(name)
            attributes = attributes or _sibling_attributes(name)
    elif os.sep in name or re.search(r"\.(txt|csv|tsv|dat|data|inter|json|jsonl|gz|zip)$", name):
        raise DataError(f"no such file: {name}; check the path (named datasets: synthetic, "
                        f"{', '.join(MOVIELENS)}, amazon2014-<Category>, ...)")
    elif name in MOVIELENS and os.path.exists(os.path.join(data_dir, name + ".txt")):
        path = os.path.join(data_dir, name + ".txt")  # SASRec's preprocessed copy, used as it is
        if verbose:
            print(f"using {path} (SASRec format, already preprocessed)")
        cols = parse_file(path)
    else:
        files, meta_src, kind = _sources(name)
        paths = _download_all(files, data_dir)
        cols = _concat([_load_local(p) for p in paths])
        if name in MOVIELENS:
            titles = _zip_meta(paths[0])
        elif meta is None and meta_src and os.path.exists(os.path.join(data_dir, meta_src[0])):
            meta = os.path.join(data_dir, meta_src[0])
    if meta:
        titles = parse_meta(meta)
    ds = build_dataset(cols, name, titles, kind=kind, **overrides)
    if attributes:  # raw item id -> attribute ids, in the dataset's item order (0 = PAD)
        attrs = parse_item_attributes(attributes)
        ds.item_attrs = [[]] + [attrs.get(str(raw), []) for raw in ds.item_ids[1:]]
        have = sum(1 for a in ds.item_attrs if a)
        if have == 0:
            raise DataError(f"{attributes}: none of its item ids is an item of {name}; is it the "
                            f"attribute file of another dataset?")
        if verbose:
            print(f"attributes: {attributes}: {have} of {ds.n_items} items have attributes "
                  f"({sum(map(len, ds.item_attrs)) / have:.1f} per item)")
    ds.stats["has_attributes"] = ds.item_attrs is not None
    if verbose:
        s = ds.stats
        print(f"dataset {name}: {s['users']} users, {s['items']} items, {s['interactions']} "
              f"interactions (avg len {s['avg_len']}) | preprocessing {s['preprocessing']} | "
              f"split {s['split']}: {s['train_interactions']} train items, "
              f"{s['valid_cases']} valid / {s['test_cases']} test cases")
    return ds


def _download_all(files, data_dir):
    """download() every [(filename, urls, md5)]; if some fail, ONE error names all of them
    (amazon2023-<Cat>-time has three files: an offline user needs the whole list at once)."""
    paths, failed = [], []
    for f, urls, md5 in files:
        try:
            paths.append(download(urls, os.path.join(data_dir, f), md5))
        except DataError as e:
            failed.append((f, urls[0], e))
    if len(failed) == 1:
        raise failed[0][2]
    if failed:
        raise DataError(f"could not download {len(failed)} files: {', '.join(f for f, _, _ in failed)} "
                        f"({getattr(failed[0][2], 'reason', failed[0][2])}). If this machine is offline, "
                        f"fetch {', '.join(u for _, u, _ in failed)} elsewhere and place them in {data_dir}")
    return paths


ZIP_MEMBERS = {"ratings.dat": "movies.dat", "u.data": "u.item", "ratings.csv": "movies.csv"}


def _zip_member(path, meta=False):
    with zipfile.ZipFile(path) as z:
        for n in z.namelist():
            base = os.path.basename(n)
            if base in ZIP_MEMBERS:
                target = os.path.join(os.path.dirname(n), ZIP_MEMBERS[base]) if meta else n
                return target if target in z.namelist() else None
    if meta:
        return None
    raise DataError(f"{path}: no ratings.dat, u.data or ratings.csv inside the zip")


def _zip_meta(path):
    inner = _zip_member(path, meta=True)
    return parse_meta(path, inner) if inner else None


def _load_local(path):
    if path.endswith(".zip"):
        try:
            return parse_file(path, _zip_member(path))
        except zipfile.BadZipFile as e:
            raise DataError(f"{path} is not a valid zip ({e}); delete it and download it again") from None
    return parse_file(path)


# -----------------------------------------------------------------------------
# Batching: vectorised windows over the CSR arrays (no per-row Python loops)
# -----------------------------------------------------------------------------
def windows(items, starts, ends, length):
    """Row r = items[max(starts[r], ends[r] - length) : ends[r]], left-padded with PAD.

    (R,) starts/ends -> (R, length) int64: the last `length` items of each row, newest last.
    """
    idx = ends[:, None] - length + np.arange(length)[None, :]  # (R, length) positions in `items`
    valid = idx >= starts[:, None]
    if items.size == 0:
        return np.zeros(idx.shape, dtype=np.int64)
    return np.where(valid, items[np.clip(idx, 0, None)], PAD)


def cut_padding(w, keep=1):
    """Left-padded windows (B, L) without the columns that are padding in every row, at least
    `keep` columns kept. (B, L) -> (B, L' <= L)."""
    return w[:, min(int(np.argmax((w != PAD).any(0))), w.shape[1] - keep):]


def train_batches(train, maxlen, batch_size, *, pairs=False, device="cpu", generator=None, bucket=0,
                  positions=False):
    """Yield shuffled training batches (a fresh permutation from `generator` each call).

    pairs=False (SASRec / ReaRec): one row per user, targets at every position
        inputs (B, L), targets (B, L): targets[b, j] is the item after inputs[b, j]; PAD = no loss.
    pairs=True (TIGER / STREAM-Rec): one row per (prefix -> next item) example
        histories (B, L), targets (B,); positions=True adds (B,) int64 the index of each target
        in train.items, a key that names the example (STREAM-Rec stores a trace per example)
    bucket > 0: draw random pools of `bucket` batches, sort each pool by length (of the row, or
        of the prefix with pairs=True), and cut every batch's all-padding columns, so L <= maxlen
        varies per batch. On ML-1M about half of a random batch is padding; this halves the work and
        changes no output (positions count from the oldest item in ReaRec, from the newest in
        STREAM-Rec), only which rows share a batch. Toys prefixes: 8.1 items on average, and a
        random batch of 256 almost always holds one of 50, so padding is ~84 % of a random batch
        and ~30 % of a bucketed one (pools of 8).
    """
    lens = train.lengths()
    if pairs:  # every position after a user's first item is a target, its prefix the history
        row, pos = train.positions()  # (n,) for every training position
        offset = pos - train.starts[row]
        starts, ends = train.starts[row][offset >= 1], pos[offset >= 1]
    else:  # users with < 2 items have nothing to predict
        keep = lens >= 2
        starts, ends = train.starts[keep], train.ends[keep]
    n = len(starts)
    order = torch.randperm(n, generator=generator).numpy() if generator is not None else np.arange(n)
    batches = [order[b:b + batch_size] for b in range(0, n, batch_size)]
    if bucket:
        pool = bucket * batch_size
        length = ends - starts
        sorted_pools = [p[np.argsort(-length[p], kind="stable")] for p in
                        (order[i:i + pool] for i in range(0, n, pool))]
        batches = [p[b:b + batch_size] for p in sorted_pools for b in range(0, len(p), batch_size)]
        if generator is not None:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    for rows in batches:
        if pairs:
            hist = windows(train.items, starts[rows], ends[rows], maxlen)  # (B, L)
            if bucket:
                hist = cut_padding(hist)
            batch = (torch.from_numpy(hist).to(device), torch.from_numpy(train.items[ends[rows]]).to(device))
            yield batch + (torch.from_numpy(ends[rows]).to(device),) if positions else batch
        else:
            w = windows(train.items, starts[rows], ends[rows], maxlen + 1)  # (B, L+1)
            if bucket:
                w = cut_padding(w, keep=2)  # an input and its target column at least
            w = torch.from_numpy(w)
            inputs, targets = w[:, :-1], w[:, 1:].clone()  # (B, L) each
            targets[inputs == PAD] = PAD  # the oldest kept item has no input before it
            yield inputs.to(device), targets.to(device)


# -----------------------------------------------------------------------------
# Evaluation: full ranking over all items, the one protocol both methods report
# -----------------------------------------------------------------------------
def _discounts(n, device):
    """cumulative tables, index r = sum over ranks 1..r: D of 1/log2(rank+1), H of 1/rank."""
    r = torch.arange(1, n + 1, dtype=torch.float64, device=device)
    zero = torch.zeros(1, dtype=torch.float64, device=device)
    return torch.cat([zero, torch.cumsum(1 / torch.log2(r + 1), 0)]), torch.cat([zero, torch.cumsum(1 / r, 0)])


def target_rank(scores, targets, exclude=None):
    """(B, N+1) float scores (column 0 = PAD), targets (B,), exclude (B, H) item ids or None ->
    (greater, ties), (B,) float64 each: how many ranked items score above the target and how many
    tie with it. PAD and the items in exclude are out of the ranking; the target stays in."""
    t = targets.view(-1, 1)  # (B, 1)
    scores = scores.float().clone()  # (B, N+1), the caller's tensor stays untouched
    if torch.isnan(scores).any():
        raise DataError("the model produced NaN scores; training diverged (lower the learning "
                        "rate or the loss weights)")
    ts = scores.gather(1, t)  # (B, 1) target score
    scores[:, PAD] = -math.inf
    if exclude is not None:
        scores.scatter_(1, exclude, -math.inf)
    scores.scatter_(1, t, ts)
    return (scores > ts).sum(1).double(), (scores == ts).sum(1).double() - 1


def rank_metrics(out, targets, exclude=None, ks=KS):
    """Per-case Recall/NDCG/MRR@k and MRR from a score matrix or from ranked top-K lists.

    out: (B, N+1) float scores over all item ids (column 0 = PAD, never ranked), or
         (B, K) int item ids, best first (PAD = empty slot; repeats count once).
    exclude: (B, H) int item ids to remove from the ranking (the user's history), PAD-padded;
         the target itself is never removed.
    Ties: with scores, the target shares its rank uniformly with every item of equal score, and
    we report the exact expectation over that tie. A constant model therefore scores like a
    random ranking -- never perfectly (ties never favour the target).
    Returns {name: (B,) float64 tensor}.
    """
    t = targets.view(-1, 1)  # (B, 1)
    if out.dtype.is_floating_point:
        greater, ties = target_rank(out, targets, exclude)
        n = out.shape[1]
    else:
        lists = out  # (B, K)
        keep = lists != PAD
        first = ~torch.triu(lists[:, :, None] == lists[:, None, :], diagonal=1).any(1)  # (B, K)
        keep &= first
        if exclude is not None:
            seen = (lists[:, :, None] == exclude[:, None, :]).any(2) & (lists != t)
            keep &= ~seen
        hit = keep & (lists == t)  # (B, K) at most one True per row
        rank = torch.where(hit.any(1), (keep.long().cumsum(1) * hit).sum(1), 10**9)
        greater, ties = (rank - 1).double(), torch.zeros_like(rank, dtype=torch.float64)
        n = lists.shape[1]
    size = max(n, max(ks)) + 1  # ranks up to n+1 (a miss) and every cut-off k must be in the tables
    D, H = _discounts(size, out.device)
    lo, hi, cnt = greater + 1, greater + ties + 1, ties + 1  # the target's rank is uniform on [lo, hi]
    lo_i = lo.clamp(max=size).long()
    res = {}
    for k in ks:
        top = torch.minimum(hi, torch.full_like(hi, k)).clamp(min=0).long()  # min(hi, k)
        inside = lo <= k
        res[f"recall@{k}"] = torch.where(inside, (top - lo_i + 1) / cnt, 0.0)
        res[f"ndcg@{k}"] = torch.where(inside, (D[top] - D[lo_i - 1]) / cnt, 0.0)  # IDCG = 1
        res[f"mrr@{k}"] = torch.where(inside, (H[top] - H[lo_i - 1]) / cnt, 0.0)
    hi_i = hi.clamp(max=size).long()
    res["mrr"] = torch.where(lo <= n, (H[hi_i] - H[lo_i - 1]) / cnt, 0.0)
    return res


def case_groups(split, train, n=4):
    """Equal-sized quartiles (n groups) of an evaluation split's cases, as in ReaRec's Fig. 4:
    "length" by the case's history length, "popularity" by the target's count in the training
    sequences. Cases are sorted by the value (ties in case order) and cut into n equal-count
    blocks, so equal values may fall in neighbouring groups.
    Returns {name: ((R,) int64 group 0..n-1, [[lo, hi] value range of each group])}."""
    pop = train.counts(int(max(split.targets.max(), train.items.max())))  # training rows only
    out = {}
    for name, value in (("length", split.lengths()), ("popularity", pop[split.targets])):
        order = np.argsort(value, kind="stable")
        group = np.empty(len(value), dtype=np.int64)
        group[order] = np.arange(len(value)) * n // max(len(value), 1)
        ranges = [[int(value[group == g].min()), int(value[group == g].max())] if (group == g).any() else None
                  for g in range(n)]
        out[name] = (group, ranges)
    return out


def evaluate(score_fn, split, maxlen, *, device="cpu", batch_size=256, ks=KS, mask_history=True,
             oracle_of=None, trim=False, groups=None, paired_to=None):
    """Mean metrics of `score_fn` over an evaluation split (full ranking, batched).

    score_fn(histories (B, L) long on `device`) returns (B, N+1) scores, (B, K) ranked item
    lists, or a dict of several such views {name: tensor} (e.g. one per reasoning step). A view
    may also be (tensor, {stat: (B,) per-case numbers}), e.g. the steps a halting rule used: each
    stat is averaged over the cases like a metric.
    mask_history: remove the case's whole history (not only the last L items) from the ranking.
    oracle_of: names of views; adds view "oracle" = per case, the best of those views, chosen
    with the label (an upper bound, ReaRec Fig. 2).
    trim: batch cases of similar history length and cut all-padding columns (L <= maxlen then
    varies per batch); only for score_fns that accept any width. Metrics are unchanged.
    groups: case_groups(...) output; adds "groups": {name: {"ranges": .., "views": {view: [one
    {metric: mean} per group]}}} (dict score_fns only).
    paired_to: a view name; adds "se_diff_ndcg@10" to every view: the standard error of the mean
    per-case difference in NDCG@10 against that view (paired: the same cases), so a gap between
    two views of one model can be told from noise.
    Returns {metric: float} for a tensor, {view: {metric: float}} for a dict.
    """
    sums, single, d2 = {}, None, {}
    gsums = {name: {} for name in (groups or {})}  # name -> view -> metric -> (n,) sums
    lengths = split.ends - split.starts
    order = np.argsort(-np.minimum(lengths, maxlen), kind="stable") if trim else np.arange(len(split))
    for b in range(0, len(split), batch_size):
        rows = order[b:b + batch_size]
        starts, ends = split.starts[rows], split.ends[rows]
        hist = windows(split.items, starts, ends, maxlen)  # (B, L)
        if trim:
            hist = cut_padding(hist)
        hist = torch.from_numpy(hist).to(device)
        target = torch.from_numpy(split.targets[rows]).to(device)
        exclude = None
        if mask_history:  # the whole history, however long
            exclude = torch.from_numpy(windows(split.items, starts, ends, max(int(lengths[rows].max()), 1))).to(device)
        with torch.no_grad():
            out = score_fn(hist)
        single = not isinstance(out, dict)
        views = {"": out} if single else out
        per = {}
        for name, v in views.items():
            v, extra = v if isinstance(v, tuple) else (v, {})
            per[name] = rank_metrics(v, target, exclude, ks) | {k: e.double() for k, e in extra.items()}
        if oracle_of:
            names = [f"{m}@{k}" for k in ks for m in ("recall", "ndcg", "mrr")] + ["mrr"]  # not the extras
            per["oracle"] = {m: torch.stack([per[v][m] for v in oracle_of]).max(0).values for m in names}
        for name, ms in per.items():
            acc = sums.setdefault(name, {})
            for m, vals in ms.items():
                acc[m] = acc.get(m, 0.0) + float(vals.sum())
            if paired_to is not None:  # squared per-case differences against the reference view
                d2[name] = d2.get(name, 0.0) + float(((ms["ndcg@10"] - per[paired_to]["ndcg@10"]) ** 2).sum())
        for gname, (gid, ranges) in (groups or {}).items():
            g = torch.from_numpy(gid[rows]).to(device)
            for name, ms in per.items():
                acc = gsums[gname].setdefault(name, {})
                for m, vals in ms.items():
                    acc[m] = acc.get(m, 0) + torch.zeros(len(ranges), dtype=torch.float64, device=device).index_add_(0, g, vals.double())
    n = max(len(split), 1)
    res = {name: {m: v / n for m, v in ms.items()} for name, ms in sums.items()}
    for name, sq in d2.items():  # var(d) = E[d^2] - E[d]^2, SE = sqrt(var / n)
        mean = res[name]["ndcg@10"] - res[paired_to]["ndcg@10"]
        res[name]["se_diff_ndcg@10"] = math.sqrt(max(sq / n - mean * mean, 0.0) / n)
    if single:
        return res[""]
    if groups:
        res["groups"] = {}
        for gname, (gid, ranges) in groups.items():
            size = np.bincount(gid, minlength=len(ranges)).clip(min=1)
            res["groups"][gname] = {"ranges": ranges, "cases": np.bincount(gid, minlength=len(ranges)).tolist(),
                                    "views": {name: [{m: float(v[i]) / size[i] for m, v in ms.items()} for i in range(len(ranges))]
                                              for name, ms in gsums[gname].items()}}
    return res


# -----------------------------------------------------------------------------
# Run folders: one run at a time per --out (both scripts)
# -----------------------------------------------------------------------------
def lock_owner(lock):
    """The pid (text) of the live run that holds `lock`, or None if that run no longer exists."""
    try:
        with open(lock) as f:
            pid, host = f.read().split()
        pid = int(pid)
    except FileNotFoundError:  # released meanwhile
        return None
    except (OSError, ValueError):  # empty or garbled: a run killed as it wrote it, unless just made
        try:
            return "unknown, just started" if time.time() - os.path.getmtime(lock) < 10 else None
        except OSError:
            return None
    if host != socket.gethostname() or os.name == "nt":
        return f"{pid} on {host}"  # no cheap check of another machine's (or Windows') processes
    try:
        os.kill(pid, 0)  # signal 0 only asks whether the process exists
    except ProcessLookupError:
        return None
    except PermissionError:  # it exists, under another user
        pass
    return str(pid)


def lock_out(out):
    """Create --out and lock it for this run: out/.lock holds "pid host" and is created atomically
    (O_EXCL), so a second run into the folder stops with one line instead of mixing its files in.
    A lock whose run is gone (SIGKILL, a crash) is stale: removed, with a notice. Returns the lock
    path; main() releases it on every way out (finally; atexit as a backstop)."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create --out {out} ({e.strerror}); pick a folder you can write to")
    lock = os.path.join(out, ".lock")
    for _ in range(3):  # a retry follows the removal of a stale lock
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            owner = lock_owner(lock)
            if owner is not None:
                raise DataError(f"{out} is in use by another run (pid {owner}); wait for it or use "
                                f"another --out (if no run uses it, delete {lock})")
            print(f"note: removed the stale lock {lock}: the run that made it no longer exists")
            try:
                os.remove(lock)
            except FileNotFoundError:
                pass
            continue
        except OSError as e:
            raise DataError(f"cannot write to --out {out} ({e.strerror}); pick a folder you can write to")
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {socket.gethostname()}\n")
        atexit.register(release_lock, lock)
        return lock
    raise DataError(f"could not lock {out}: other runs keep taking it; use another --out")


def release_lock(lock):
    """Remove this process's lock (never one that another run holds); safe to call twice."""
    try:
        with open(lock) as f:
            mine = f.read().split()[:1] == [str(os.getpid())]
        if mine:
            os.remove(lock)
    except OSError:
        pass


# -----------------------------------------------------------------------------
# Reports: every results.json under some folders -> one markdown table (both scripts)
# -----------------------------------------------------------------------------
# Config fields that say where or how fast a run ran, not what it computed: never a table column.
RUN_FIELDS = {"seed", "out", "data_dir", "device", "threads", "resume", "benchmark", "benchmark_steps",
              "eval_batch_size", "eval_batch", "loss_chunk", "eval_only", "stages", "n_items", "overwrite"}
REPORT_METRICS = ("ndcg@10", "recall@10", "ndcg@20", "recall@20")


def find_results(dirs):
    """Every results.json under the folders (or the files themselves), sorted, read as dicts."""
    paths = []
    for d in dirs:
        if os.path.isfile(d):
            paths.append(d)
        elif os.path.isdir(d):
            paths += [os.path.join(root, "results.json") for root, _, files in os.walk(d) if "results.json" in files]
        else:
            raise DataError(f"--report: {d} is neither a folder nor a file")
    out = []
    for p in sorted(set(paths)):
        try:
            with open(p) as f:
                out.append((p, json.load(f)))
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"--report: cannot read {p} ({e}); delete it or rerun that run") from None
    if not out:
        raise DataError(f"--report: no results.json under {', '.join(dirs)}")
    return out


def curve_histories(res):
    """The per-epoch histories of one results.json as [(name, [{"epoch", term..., "valid_<metric>"...}])]:
    rearec.py's run as it is, one per stream_rec.py stage with its nested {"train": {...},
    "valid": {...}} epochs flattened."""
    if "method" in (res.get("config") or {}):
        hist = [(res["config"]["method"], res.get("history"))]
    else:
        hist = [(s, res[s].get("history")) for s in ("base", "stage1", "stage2", "stage3") if isinstance(res.get(s), dict)]
    return [(name, [{"epoch": e["epoch"], **e["train"], **{f"valid_{k}": v for k, v in e["valid"].items()}}
                    if isinstance(e.get("train"), dict) else e for e in h]) for name, h in hist if h]


def result_rows(path, res, views=False, older=None):
    """One results.json -> table rows {script, dataset, name, K, config, seed, valid, test, best_epoch}.
    rearec.py: one row per run (views=True: also one per reasoning step, the oracle and the
    selectors); stream_rec.py: one row per finished stage (K = thinking tokens l).
    older: {"config": {field: value}, "stage_fields": {...}} from newer stream_rec results.json
    ("older_config"): what a run whose config predates a field ran with, so it is not merged
    with runs that set the field otherwise."""
    older, cfg = older or {}, res.get("config") or {}
    if "method" not in cfg:  # stream_rec.py
        cfg = (older.get("config") or {}) | cfg
    dataset = os.path.splitext(os.path.basename(str((res.get("dataset") or {}).get("name", cfg.get("dataset", "?")))))[0]
    used = {k: v for k, v in cfg.items() if k not in set(res.get("unused_config", ()))}  # what the method reads
    common = dict(dataset=dataset, config=used, all_config=cfg, seed=cfg.get("seed"), path=path,
                  interrupted=bool(res.get("interrupted")))
    rows = []
    if "method" in cfg:  # rearec.py
        base = dict(common, script="rearec", name=cfg["method"], K=cfg.get("steps", 0), best_epoch=res.get("best_epoch"))
        rows.append(dict(base, valid=res.get("valid", {}), test=res.get("test", {})))
        if views and base["K"] > 0:  # K = 0: the one step is the run itself
            for k, m in (res.get("per_step") or {}).items():
                rows.append(dict(base, name=f"{cfg['method']} (r_{k[4:]})", valid=(res.get("valid_per_step") or {}).get(k, {}), test=m))
            if res.get("oracle"):
                rows.append(dict(base, name=f"{cfg['method']} (oracle)", valid=res.get("valid_oracle", {}), test=res["oracle"]))
            sel = res.get("selector")
            if sel:  # one row whichever selector validation chose in each seed (names: chosen_as)
                rows.append(dict(base, name=f"{cfg['method']} (chosen selector)", valid=sel.get("valid", {}),
                                 test=sel.get("test", {}), chosen_as=sel["name"]))
    else:  # stream_rec.py: one entry per stage
        order = ("base", "stage1", "stage2", "stage3")
        for i, stage in enumerate(order):
            if isinstance(res.get(stage), dict) and "test" in res[stage]:
                fields = older.get("stage_fields") or {}  # every version's "read only by stage X" lists
                later = {k for s in order[i + 1:] for k in {*(res.get("stage_fields") or {}).get(s, ()),
                                                              *fields.get(s, ())}}  # read after this stage
                rows.append(dict(common, script="stream_rec", name=stage,
                                 config={k: v for k, v in used.items() if k not in later},
                                 K=0 if stage == "base" else cfg.get("trace_len", 0),
                                 valid=res[stage].get("valid", {}), test=res[stage]["test"],
                                 best_epoch=res[stage].get("best_epoch")))
    return rows


def _mean_std(values):
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else None)


def report(dirs, split="test", metrics=REPORT_METRICS, views=False):
    """The markdown table of `python data.py --report DIR [DIR ...]`; returns (text, rows).

    Rows: one per (script, dataset, method or stage, K, settings), where `settings` lists the
    config fields that differ between the runs of that script and dataset (not the seed, not
    where/how fast it ran: RUN_FIELDS, and not the fields the row's method ignores). Runs that differ only in the seed are one row: each
    metric is mean ± std over them (sample std, n - 1), with the number of seeds. In brackets, the
    relative change of the mean against the matching base row: the `base` row (same script and
    dataset) whose config differs from the row's in the fewest fields (stream_rec: its run's base
    stage); no bracket when two base rows match equally well.
    """
    results, older = find_results(dirs), {"config": {}, "stage_fields": {}}
    for _, res in results:  # stream_rec.py: what runs that predate a field ran with
        older["config"].update(res.get("older_config") or {})
        for stage, names in (res.get("stage_fields") or {}).items():
            older["stage_fields"][stage] = sorted({*older["stage_fields"].get(stage, ()), *names})
    rows = [r for p, res in results for r in result_rows(p, res, views, older)]
    if not rows:
        raise DataError(f"--report: no finished runs in the results.json under {', '.join(dirs)}")
    # settings: the fields that differ between the runs of one script and dataset, each shown for
    # the rows whose method reads it (results.json's "unused_config" lists the ones it ignores)
    differing = {}
    for r in rows:
        keys = differing.setdefault((r["script"], r["dataset"]), {})
        for k, v in r["all_config"].items():
            keys.setdefault(k, set()).add(json.dumps(v, sort_keys=True))
    def settings(r):
        diff = differing[(r["script"], r["dataset"])]
        return tuple((k, r["config"][k]) for k in sorted(diff) if k in r["config"]
                     and len(diff[k]) > 1 and k not in RUN_FIELDS and k not in ("method", "steps", "trace_len"))
    groups = {}
    for r in rows:
        groups.setdefault((r["script"], r["dataset"], r["name"], r["K"], settings(r)), []).append(r)

    def distance(a, b):  # fields both runs read and set differently
        return sum(a[k] != b[k] for k in (set(a) & set(b)) - RUN_FIELDS - {"method", "steps"})

    table = []
    for key, members in groups.items():
        script, dataset, name, K, sett = key
        seeds = sorted({str(m["seed"]) for m in members})
        stats = {m: _mean_std([x[split][m] for x in members if m in x[split]]) if all(m in x[split] for x in members)
                 else (None, None) for m in metrics}
        best_ep = [x["best_epoch"] for x in members if x.get("best_epoch") is not None]
        table.append(dict(script=script, dataset=dataset, name=name, K=K, settings=sett, n=len(members),
                          seeds=seeds, stats=stats, config=members[0]["config"], path=members[0]["path"],
                          best_epoch=sum(best_ep) / len(best_ep) if best_ep else None,
                          interrupted=any(x["interrupted"] for x in members),
                          chosen=[x["chosen_as"] for x in sorted(members, key=lambda x: str(x["seed"])) if "chosen_as" in x]))
    for row in table:  # the matching base row
        row["base"] = None
        if row["name"] == "base":
            continue
        cands = [b for b in table if b["name"] == "base" and b["script"] == row["script"] and b["dataset"] == row["dataset"]]
        if row["script"] == "stream_rec":  # the base stage of the same run folder(s)
            cands = [b for b in cands if os.path.dirname(b["path"]) == os.path.dirname(row["path"])] or cands
        if cands:
            d = [distance(b["config"], row["config"]) for b in cands]
            if d.count(min(d)) == 1:
                row["base"] = cands[d.index(min(d))]
    table.sort(key=lambda r: (r["script"], r["dataset"], r["name"] != "base", r["name"], r["K"], str(r["settings"])))

    def cell(row, m):
        mean, std = row["stats"][m]
        if mean is None:
            return "—"
        text = f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "")
        b = row["base"]["stats"][m][0] if row["base"] else None
        if b:
            text += f" ({100 * (mean / b - 1):+.1f} %)"
        return text

    head = ["script", "dataset", "method / stage", "K", "settings"] + [f"{split} {m}" for m in metrics] + ["seeds", "best epoch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        sett = ", ".join(f"{k}={v}" for k, v in r["settings"]) or "defaults"
        name = r["name"][:-1] + f": {', '.join(r['chosen'])})" if r["chosen"] else r["name"]  # per seed
        lines.append("| " + " | ".join([r["script"], r["dataset"], name + (" (interrupted)" if r["interrupted"] else ""),
                                        str(r["K"]), sett] + [cell(r, m) for m in metrics]
                                       + [str(r["n"]), f"{round(r['best_epoch'], 1):g}" if r["best_epoch"] is not None else "—"]) + " |")
    return "\n".join(lines), table


def plot(dirs, out="figures", metric="ndcg@20"):
    """`python data.py --plot DIR [DIR ...]`: PNG figures from every results.json below the folders
    (matplotlib, an optional extra: imported only here). Writes into `out`, per dataset D:
        curves_D.png   validation `metric` and each training-loss term per epoch, one line per run
        bars_D.png     ReaRec Fig. 2: test `metric` of base, each method's own view, its selector
                       (chosen on validation) and its oracle, mean over seeds
        groups_D_M.png ReaRec Fig. 4: test NDCG@10 of every view by quartile of history length and
                       of target popularity, for each rearec method M (mean over seeds)
        ksweep_D.png   ReaRec Fig. 5: test `metric` against K for each method run at several K
    Returns the paths written."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no screen
        import matplotlib.pyplot as plt
    except ImportError:
        raise DataError("--plot needs matplotlib, an optional extra: pip install matplotlib") from None
    results = find_results(dirs)
    _, table = report(dirs, metrics=(metric, "ndcg@10"), views=True)
    os.makedirs(out, exist_ok=True)
    written = []

    def save(fig, name):
        path = os.path.join(out, name)
        fig.tight_layout()
        fig.savefig(path + ".tmp.png", dpi=90)
        os.replace(path + ".tmp.png", path)  # never a half-written figure
        plt.close(fig)
        written.append(path)

    def label(row_or_cfg, name):
        sett = ", ".join(f"{k}={v}" for k, v in row_or_cfg) if row_or_cfg else ""
        return name + (f" ({sett})" if sett else "")

    datasets = sorted({r["dataset"] for r in table})
    for ds in datasets:
        runs = [(p, res) for p, res in results if result_rows(p, res) and result_rows(p, res)[0]["dataset"] == ds]
        # 1. training curves (runs with a per-epoch history: rearec.py, stream_rec.py stages)
        curves = [(f"{name} {os.path.basename(os.path.dirname(p))}", h) for p, res in runs
                  for name, h in curve_histories(res)]
        if curves:
            terms = sorted({k for _, h in curves for e in h for k in e
                            if not k.startswith("valid") and k not in ("epoch", "train_seconds", "eval_seconds", "wall_s")
                            and isinstance(e[k], (int, float))})
            cols = min(1 + len(terms), 6)  # STREAM-Rec logs ~20 terms: a grid of at most 6 columns
            nrows = -(-(1 + len(terms)) // cols)
            fig, grid = plt.subplots(nrows, cols, figsize=(4 * cols, 3.2 * nrows), squeeze=False)
            axes = grid.reshape(1, -1)  # (1, nrows * cols): the metric first, then one panel per term
            for ax in axes[0, 1 + len(terms):]:
                ax.axis("off")
            for c, (name, h) in enumerate(curves):
                color = f"C{c % 10}"  # one colour per run in every panel, as in the legend
                ep = [e.get("epoch", i + 1) for i, e in enumerate(h)]
                key = f"valid_{metric}" if f"valid_{metric}" in h[0] else next((k for k in h[0] if k.startswith("valid")), None)
                if key:
                    axes[0, 0].plot(ep, [e.get(key) for e in h], label=name, lw=1, color=color)
                for ax, t in zip(axes[0, 1:], terms):
                    if any(t in e for e in h):
                        ax.plot([x for x, e in zip(ep, h) if t in e], [e[t] for e in h if t in e], lw=1, color=color)
            axes[0, 0].set(title=f"{ds}: valid {metric}", xlabel="epoch")
            for ax, t in zip(axes[0, 1:], terms):
                ax.set(title=f"train {t}", xlabel="epoch")
            if len(curves) <= 12:
                axes[0, 0].legend(fontsize=6)
            save(fig, f"curves_{ds}.png")
        rows = [r for r in table if r["dataset"] == ds and r["script"] == "rearec"]
        # 2. Fig. 2 bars: base | own view | selector | oracle, per method (mean over seeds)
        methods = [r for r in rows if " (" not in r["name"] and r["name"] != "base"]
        base = [r for r in rows if r["name"] == "base"]
        if methods or base:
            fig, ax = plt.subplots(figsize=(max(5, 1.8 * (len(methods) + 1)), 3.4))
            ticks, names, x = [], [], 0.0

            def bar(pos, value, color, what):
                ax.bar(pos, value, width=0.8, color=color, label=what if what not in ax.get_legend_handles_labels()[1] else None)
                ax.text(pos, value, f"{value:.4f}", ha="center", va="bottom", fontsize=6, rotation=90)
            for r in base[:1]:
                bar(x, r["stats"][metric][0], "grey", "base")
                ticks, names, x = [x], [label(r["settings"], "base")], x + 1.6
            for r in methods:
                sib = {s["name"].split(" (", 1)[1][:-1]: s for s in rows if s["name"].startswith(r["name"] + " (")
                       and s["K"] == r["K"] and s["settings"] == r["settings"]}
                sel = sib.get("chosen selector")
                for j, (what, s) in enumerate([("own view", r), ("selector", sel), ("oracle", sib.get("oracle"))]):
                    if s is not None and s["stats"][metric][0] is not None:
                        bar(x + 0.8 * j, s["stats"][metric][0], f"C{j}", what)
                ticks.append(x + 0.8)
                names.append(label(r["settings"], f"{r['name']} K={r['K']}"))
                x += 3.2
            ax.set_xticks(ticks, names, fontsize=6, rotation=15)
            ax.set_ylim(0, ax.get_ylim()[1] * 1.15)  # room for the value labels
            ax.set(title=f"{ds}: test {metric} (Fig. 2)")
            ax.legend(fontsize=7, loc="lower right")
            save(fig, f"bars_{ds}.png")
        # 3. Fig. 4 groups: one figure per rearec run family with groups (mean over seeds)
        fams = {}  # runs that differ only in the seed (or where they ran) share a figure
        grouped = [(p, res) for p, res in runs if res.get("groups") and "method" in res.get("config", {})]
        shared = set.intersection(*(set(res["config"]) for _, res in grouped)) if grouped else set()
        for p, res in grouped:  # compare the settings every run has and its method reads
            c = res["config"]
            same = json.dumps({k: c[k] for k in shared - RUN_FIELDS - set(res.get("unused_config", ()))}, sort_keys=True)
            fams.setdefault((c["method"], c.get("steps", 0)), {}).setdefault(same, []).append(res["groups"])
        fams = {(m, K, i if len(f) > 1 else None): gs for (m, K), f in fams.items() for i, gs in enumerate(f.values())}
        for (method, K, i), gs in fams.items():
            fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
            for ax, gname in zip(axes, ("length", "popularity")):
                views = list(gs[0][gname]["views"])
                views = [v for v in views if v.startswith("step") or v in ("main", "oracle")]
                for j, v in enumerate(views):
                    vals = np.mean([[q["ndcg@10"] for q in g[gname]["views"][v]] for g in gs], axis=0)
                    ax.bar(np.arange(len(vals)) + j / (len(views) + 1), vals, width=1 / (len(views) + 1), label=v)
                ranges = gs[0][gname]["ranges"]
                ax.set_xticks(np.arange(len(ranges)) + 0.4, [f"Q{i + 1}\n{lo}-{hi}" for i, (lo, hi) in enumerate(ranges)],
                              fontsize=7)
                ax.set_title(f"{ds} {method} K={K}\ntest ndcg@10 by {gname} quartile", fontsize=9)
            axes[0].legend(fontsize=6)
            save(fig, f"groups_{ds}_{method}{K}" + (f"_{i + 1}" if i is not None else "") + ".png")
        # 4. Fig. 5 K sweep: methods run at two or more K with otherwise equal settings
        sweeps = {}
        for r in methods:
            sett = tuple((k, v) for k, v in r["settings"] if k != "steps")
            sweeps.setdefault((r["name"], sett), []).append(r)
        sweeps = {k: sorted(v, key=lambda r: r["K"]) for k, v in sweeps.items() if len({r["K"] for r in v}) > 1}
        if sweeps:
            fig, ax = plt.subplots(figsize=(4.5, 3.2))
            for (name, sett), rs in sweeps.items():
                ax.plot([r["K"] for r in rs], [r["stats"][metric][0] for r in rs], marker="o", label=label(sett, name))
            if base:
                ax.axhline(base[0]["stats"][metric][0], color="grey", ls="--", label="base")
            ax.set_xticks(sorted({r["K"] for rs in sweeps.values() for r in rs}))  # K is an integer
            ax.set_title(f"{ds}\ntest {metric} vs K (ReaRec Fig. 5)", fontsize=9)
            ax.set_xlabel("reasoning steps K")
            ax.legend(fontsize=6)
            save(fig, f"ksweep_{ds}.png")
    if not written:
        raise DataError(f"--plot: nothing to draw from the results.json under {', '.join(dirs)}")
    return written


# -----------------------------------------------------------------------------
# CLI
# -----------------------------------------------------------------------------
def _add_data_args(p):
    """The data flags every script shares (also accepted with underscores)."""
    def arg(flag, **kw):
        p.add_argument(flag, flag.replace("-", "_").replace("__", "--"), **kw)
    arg("--dataset", default="synthetic", help="synthetic | ml-100k | ml-1m | ml-20m | "
        "amazon2014-<Cat> | amazon2018-<Cat> | amazon2023-<Cat>[-time] | path to a file")
    arg("--data-dir", default="data", help="download cache (default: ./data)")
    arg("--min-rating", type=float, help="keep ratings >= this (default: per dataset)")
    arg("--dedup", action=argparse.BooleanOptionalAction, default=None,
        help="keep only the earliest (user, item) interaction (default: per dataset)")
    arg("--kcore", type=int, help="drop users/items with < k interactions; 0 = off (default: per dataset)")
    arg("--kcore-mode", choices=["once", "iterative"], help="one pass (SASRec) or to a fixed point")
    arg("--split", choices=["loo", "time"], help="leave-one-out or global time split")
    arg("--time-cuts", type=lambda s: [float(x) for x in s.split(",")],
        help="t1,t2 for --split time, in the file's time unit (default: 80%%/90%% of the range)")
    arg("--min-history", type=int, help="time split: minimum history items of a valid/test case")
    arg("--meta", help="metadata file with item titles (default: found automatically)")


def _data_kwargs(args):
    """The load_dataset keyword arguments of parsed data flags."""
    keys = ("min_rating", "dedup", "kcore", "kcore_mode", "split", "time_cuts", "min_history", "meta")
    return {k: getattr(args, k) for k in keys}


def main(argv=None):
    p = argparse.ArgumentParser(description="Load, preprocess and split a dataset; print statistics.")
    _add_data_args(p)
    p.add_argument("--stats", action="store_true", help="print dataset statistics as one JSON object")
    p.add_argument("--download", action="store_true", help="only fetch the files into --data-dir")
    p.add_argument("--with-meta", action="store_true", help="with --download: also fetch item metadata")
    p.add_argument("--benchmark", action="store_true",
                   help="time the metric code alone on the test split (random scores, history masked)")
    p.add_argument("--report", nargs="+", metavar="DIR",
                   help="print one markdown table of every results.json under these folders (rearec.py "
                        "and stream_rec.py runs): mean ± std over seeds, the change against the matching base")
    p.add_argument("--report-split", choices=["test", "valid"], default="test",
                   help="with --report: which split's metrics (valid for tuning tables)")
    p.add_argument("--views", action="store_true",
                   help="with --report: also a row per reasoning step, the oracle and the selector (rearec.py)")
    p.add_argument("--plot", nargs="+", metavar="DIR",
                   help="draw PNG figures (training curves, ReaRec Fig. 2/4/5) from every results.json "
                        "under these folders; needs matplotlib (pip install matplotlib)")
    p.add_argument("--plot-out", default="figures", help="with --plot: the folder for the PNG files")
    args = p.parse_args(argv)
    try:
        if args.plot:
            paths = plot(args.plot, args.plot_out)
            print("\n".join(f"wrote {q}" for q in paths))
            return paths
        if args.report:
            text, _ = report(args.report, split=args.report_split, views=args.views)
            print(text)
            return text
        if args.download:
            if args.dataset == "synthetic" or os.path.exists(args.dataset):
                raise DataError(f"{args.dataset} needs no download")
            files, meta_src, _ = _sources(args.dataset)
            if args.with_meta and meta_src:
                files = files + [(meta_src[0], meta_src[1], None)]
            for f, urls, md5 in files:
                print(download(urls, os.path.join(args.data_dir, f), md5))
            return None
        ds = load_dataset(args.dataset, args.data_dir, verbose=not args.stats, **_data_kwargs(args))
    except DataError as e:
        sys.exit(f"error: {e}")
    if args.benchmark:
        return benchmark_metrics(ds)
    print(json.dumps(ds.stats))
    return ds.stats


def benchmark_metrics(ds, repeats=5):
    """Seconds that rank_metrics itself takes for every test case at once: a (cases, N+1) score
    matrix (random, so ties are rare), history masked. The best of `repeats` runs."""
    split = ds.test
    scores = torch.randn(len(split), ds.n_items + 1, generator=torch.Generator().manual_seed(0))
    targets = torch.from_numpy(split.targets)
    history = torch.from_numpy(windows(split.items, split.starts, split.ends, max(int(split.lengths().max()), 1)))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        rank_metrics(scores, targets, history)
        times.append(time.perf_counter() - t0)
    res = dict(cases=len(split), items=ds.n_items, history_columns=history.shape[1],
               metric_seconds=round(min(times), 4), threads=torch.get_num_threads(), torch=torch.__version__)
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
