"""Tests of data.py, rearec.py and stream_rec.py: offline, CPU only.

Run: python -m pytest -q -rs test_all.py   (-rs prints the reason of every skipped test)
"""
import dataclasses
import gzip
import hashlib
import http.server
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data

# The models here are tiny: torch's default of one thread per core only oversubscribes a CPU that
# other jobs share (the suite took 12 min instead of 30 s that way). One thread for every test.
torch.set_num_threads(1)

SHARED = Path(__file__).resolve().parent.parent / "shared" / "data"


# =============================================================================
# data.py
# =============================================================================
def full_sequences(ds):
    """raw user id -> raw item ids of the user's whole sequence (leave-one-out datasets)."""
    out = {}
    v = {int(u): int(t) for u, t in zip(ds.valid.users, ds.valid.targets)}
    t = {int(u): int(x) for u, x in zip(ds.test.users, ds.test.targets)}
    for r in range(len(ds.train)):
        u = int(ds.train.users[r])
        seq = list(ds.train[r]) + ([v[u], t[u]] if u in v else [])
        out[ds.user_ids[u].item()] = [ds.item_ids[i].item() for i in seq]
    return out


def write(path, text, gz=False):
    path = Path(path)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return str(path)


# --- Metrics: hand-computed values --------------------------------------------------------------
def test_metrics_hand_computed():
    # 5 items (ids 1..5). Column 0 is PAD and gets the highest score: it must never be ranked.
    scores = torch.tensor([[9.0, 0.9, 0.8, 0.7, 0.6, 0.5],    # target 3 -> rank 3
                           [9.0, 0.9, 0.8, 0.7, 0.6, 0.5],    # target 1 -> rank 1
                           [9.0, 0.9, 0.8, 0.7, 0.6, 0.5]])   # target 5 -> rank 5
    m = data.rank_metrics(scores, torch.tensor([3, 1, 5]), ks=(2, 5))
    assert m["recall@2"].tolist() == [0, 1, 0]
    assert m["recall@5"].tolist() == [1, 1, 1]
    assert m["ndcg@5"].tolist() == pytest.approx([1 / math.log2(4), 1.0, 1 / math.log2(6)])
    assert m["ndcg@2"].tolist() == pytest.approx([0, 1, 0])
    assert m["mrr"].tolist() == pytest.approx([1 / 3, 1, 1 / 5])
    assert m["mrr@2"].tolist() == pytest.approx([0, 1, 0])
    # Masking the history: items 1 and 2 removed for case 3 -> target 5 ranks 3rd. The target
    # itself is never removed, even when it is in the history (case 2).
    exclude = torch.tensor([[0, 0], [1, 0], [1, 2]])
    m = data.rank_metrics(scores, torch.tensor([3, 1, 5]), exclude, ks=(2, 5))
    assert m["ndcg@5"].tolist() == pytest.approx([1 / math.log2(4), 1.0, 1 / math.log2(4)])
    assert m["mrr"].tolist() == pytest.approx([1 / 3, 1, 1 / 3])


def test_metrics_ties_never_favour_the_target():
    # A constant model ranks like a random permutation: the exact expectation over the tie.
    n = 10
    m = data.rank_metrics(torch.zeros(1, n + 1), torch.tensor([4]), ks=(5,))
    assert m["recall@5"].item() == pytest.approx(0.5)
    assert m["ndcg@5"].item() == pytest.approx(sum(1 / math.log2(r + 1) for r in range(1, 6)) / n)
    assert m["mrr"].item() == pytest.approx(sum(1 / r for r in range(1, n + 1)) / n)
    # One item above, one tied with the target -> the rank is 2 or 3 with equal chance.
    s = torch.tensor([[0.0, 5.0, 1.0, 1.0, 0.0]])
    m = data.rank_metrics(s, torch.tensor([2]), ks=(2,))
    assert m["recall@2"].item() == pytest.approx(0.5)
    assert m["ndcg@2"].item() == pytest.approx(1 / math.log2(3) / 2)
    assert m["mrr"].item() == pytest.approx((1 / 2 + 1 / 3) / 2)


def test_metrics_from_ranked_lists():
    lists = torch.tensor([[3, 3, 1, 2], [0, 4, 5, 1], [2, 4, 5, 3]])  # PAD = empty slot
    targets = torch.tensor([1, 1, 1])  # rank 2 (the repeated 3 counts once), 3, absent
    m = data.rank_metrics(lists, targets, ks=(2, 3))
    assert m["recall@2"].tolist() == [1, 0, 0]
    assert m["recall@3"].tolist() == [1, 1, 0]
    assert m["ndcg@3"].tolist() == pytest.approx([1 / math.log2(3), 1 / math.log2(4), 0])
    assert m["mrr"].tolist() == pytest.approx([1 / 2, 1 / 3, 0])
    short = data.rank_metrics(torch.tensor([[5, 1], [2, 3]]), torch.tensor([1, 1]))  # lists shorter than k
    assert short["recall@20"].tolist() == [1, 0] and short["ndcg@5"].tolist() == pytest.approx([1 / math.log2(3), 0])
    exclude = torch.tensor([[3, 0], [4, 0], [2, 0]])  # history items leave the list
    m = data.rank_metrics(lists, targets, exclude, ks=(2, 3))
    assert m["mrr"].tolist() == pytest.approx([1, 1 / 2, 0])


def test_nan_scores_are_an_error():
    with pytest.raises(data.DataError, match="NaN"):
        data.rank_metrics(torch.full((1, 4), float("nan")), torch.tensor([1]))


def small_dataset():
    text = "".join(f"{u} {i}\n" for u, seq in [(1, [7, 3, 9, 4, 2]), (2, [5, 6]), (3, [1, 2, 3, 4, 8])]
                   for i in seq)
    return data.build_dataset(data.parse_file(write_tmp(text)), "tiny")


def write_tmp(text, suffix=".txt"):
    import tempfile
    fd, path = tempfile.mkstemp(suffix=suffix)
    os.write(fd, text.encode())
    os.close(fd)
    return path


def test_evaluate_views_and_oracle():
    ds = small_dataset()  # test cases: user 1 -> item 2, user 3 -> item 8
    n = ds.n_items
    good_for_first = torch.zeros(2, n + 1)
    good_for_first[0, 2] = 1.0  # case 0's target on top, case 1's target tied with everything
    good_for_second = torch.zeros(2, n + 1)
    good_for_second[1, 8] = 1.0
    views = lambda h: {"a": good_for_first[: len(h)], "b": good_for_second[: len(h)]}
    res = data.evaluate(views, ds.test, maxlen=3, oracle_of=["a", "b"], mask_history=False)
    assert res["oracle"]["ndcg@5"] == pytest.approx(1.0)
    assert res["a"]["ndcg@5"] < 1 and res["b"]["ndcg@5"] < 1
    assert res["oracle"]["ndcg@5"] >= max(res["a"]["ndcg@5"], res["b"]["ndcg@5"])


def test_case_groups_quartiles_and_group_metrics_by_hand():
    """Fig. 4 groups: equal-sized quartiles of history length and of the target's training count;
    each group's metric is the mean of its cases' metrics."""
    lengths = [5, 1, 3, 2, 8, 4, 7, 6]
    items = np.concatenate([np.full(n, 1 + i % 3) for i, n in enumerate(lengths)])  # histories of items 1..3
    ends = np.cumsum(lengths)
    split = data.Seqs(items, ends - lengths, ends, np.arange(8), np.array([1, 2, 3, 4, 4, 4, 4, 5]))
    # the splits share one flat array: the three 5s after the training row's end (its valid and
    # test items) must not count as training popularity
    train = data.Seqs(np.array([1, 1, 1, 1, 1, 2, 2, 2, 3, 3, 4, 5, 5, 5]), np.array([0]), np.array([11]), np.array([0]))
    assert train.counts(5).tolist() == [0, 5, 3, 2, 1, 0]
    groups = data.case_groups(split, train)
    g, ranges = groups["length"]
    assert g.tolist() == [2, 0, 1, 0, 3, 1, 3, 2] and ranges == [[1, 2], [3, 4], [5, 6], [7, 8]]
    g, ranges = groups["popularity"]  # target counts: 5, 3, 2, 1, 1, 1, 1, 0
    assert g.tolist() == [3, 3, 2, 0, 1, 1, 2, 0] and ranges == [[0, 1], [1, 1], [1, 2], [3, 5]]  # ties: case order
    torch.manual_seed(0)
    scores = torch.randn(8, 6)
    offset = iter([0, 3, 6])  # batches of 3 cases, in case order

    def score_fn(h):
        o = next(offset)
        return {"v": scores[o:o + len(h)]}

    res = data.evaluate(score_fn, split, 8, batch_size=3, mask_history=False, groups=groups)
    per_case = data.rank_metrics(scores, torch.from_numpy(split.targets))["ndcg@5"]
    for name in ("length", "popularity"):
        gid = torch.from_numpy(groups[name][0])
        expected = [per_case[gid == i].mean().item() for i in range(4)]
        assert [q["ndcg@5"] for q in res["groups"][name]["views"]["v"]] == pytest.approx(expected)
        assert res["groups"][name]["cases"] == [2, 2, 2, 2]


def test_evaluate_averages_per_case_view_statistics():
    ds = small_dataset()
    scores = torch.zeros(2, ds.n_items + 1)
    res = data.evaluate(lambda h: {"v": (scores[: len(h)], {"steps": torch.tensor([1.0, 4.0])[: len(h)]})},
                        ds.test, 3, mask_history=False)
    assert res["v"]["steps"] == pytest.approx(2.5) and "ndcg@10" in res["v"]


def test_evaluate_trim_changes_no_metric():
    ds = small_dataset()
    torch.manual_seed(0)
    table = torch.randn(ds.n_items + 1, ds.n_items + 1)
    fn = lambda h: table[h[:, -1]] + 0.1 * (h != 0).sum(1, keepdim=True)  # any width works
    widths = []
    plain = data.evaluate(fn, ds.valid, 6, batch_size=1)
    trimmed = data.evaluate(lambda h: widths.append(h.shape[1]) or fn(h), ds.valid, 6, batch_size=1, trim=True)
    assert plain == pytest.approx(trimmed) and sorted(widths) == [3, 3]  # histories [7 3 9], [1 2 3]


# --- Layouts --------------------------------------------------------------------------------------
ML_RATINGS = "1::10::5::100\n1::20::3::90\n1::30::4::100\n2::10::1::50\n2::30::2::40\n"
EXPECTED_ML = {1: [20, 10, 30], 2: [30, 10]}  # by time; 10 and 30 tie at t=100: file order kept


def test_parse_sasrec_pairs_and_user_lists(tmp_path):
    ds = data.load_dataset(write(tmp_path / "s.txt", "1 5\n1 3\n2 3\n2 4\n1 4\n"), verbose=False,
                           split="loo")
    assert full_sequences(ds) == {1: [5, 3, 4], 2: [3, 4]}  # file order is the order
    ds = data.load_dataset(write(tmp_path / "l.txt", "u1 10 20 30\nu2 20 30 40 50\n"), verbose=False)
    assert full_sequences(ds) == {"u1": [10, 20, 30], "u2": [20, 30, 40, 50]}
    assert ds.n_items == 5 and ds.item_ids[1:].tolist() == [10, 20, 30, 40, 50]


def test_parse_movielens_dat_with_titles_and_stable_ties(tmp_path):
    path = write(tmp_path / "ratings.dat", ML_RATINGS)
    (tmp_path / "movies.dat").write_bytes("10::Mis\xe9rables (1995)::Drama|Musical\n20::B::Comedy\n"
                                          "30::C::Horror\n".encode("latin-1"))
    ds = data.load_dataset(path, verbose=False, kcore=0)
    assert full_sequences(ds) == EXPECTED_ML
    assert ds.item_text[1] == "Misérables (1995) | Drama Musical"  # item 1 = raw 10 (sorted ids)


def test_parse_csv_tsv_json_gz_zip(tmp_path):
    rows = [("A", "x", 5.0, 3), ("A", "y", 4.0, 1), ("A", "w", 5.0, 5),
            ("B", "x", 2.0, 7), ("B", "z", 5.0, 2), ("B", "w", 5.0, 9)]
    expected = {"A": ["y", "x", "w"], "B": ["z", "x", "w"]}
    csv_text = "user_id,parent_asin,rating,timestamp\n" + "".join(f"{u},{i},{r},{t}\n" for u, i, r, t in rows)
    tsv_text = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + \
        "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows)  # RecBole atomic file
    j2014 = "".join(json.dumps({"reviewerID": u, "asin": i, "overall": r, "unixReviewTime": t,
                                "helpful": [0, 0]}) + "\n" for u, i, r, t in rows)
    loose = "".join(repr({"reviewerID": u, "asin": i, "overall": r, "unixReviewTime": t}) + "\n"
                    for u, i, r, t in rows)  # 2014 full dumps: Python literals, single quotes
    j2023 = "".join(json.dumps({"user_id": u, "parent_asin": i, "rating": r, "timestamp": t,
                                "text": "ok"}) + "\n" for u, i, r, t in rows)
    for name, text in [("a.csv.gz", csv_text), ("a.inter", tsv_text), ("b_5.json.gz", j2014),
                       ("c.json", loose), ("d.jsonl.gz", j2023)]:
        path = write(tmp_path / name, text, gz=name.endswith(".gz"))
        ds = data.load_dataset(path, verbose=False, kcore=0, dedup=False, min_history=1)
        assert full_sequences(ds) == expected, name
    # rating threshold: B's rating-2 interaction goes
    ds = data.load_dataset(str(tmp_path / "a.csv.gz"), verbose=False, kcore=0, min_rating=4)
    assert full_sequences(ds) == {"A": ["y", "x", "w"], "B": ["z", "w"]}
    # MovieLens-100k u.data (tab separated, no header) and a GroupLens-style zip
    u_data = "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in [(1, 10, 5, 100), (1, 20, 3, 90),
                                                                  (1, 30, 4, 100), (2, 10, 1, 50), (2, 30, 2, 40)])
    assert full_sequences(data.load_dataset(write(tmp_path / "u.data", u_data), verbose=False,
                                            kcore=0)) == EXPECTED_ML
    with zipfile.ZipFile(tmp_path / "ml.zip", "w") as z:
        z.writestr("ml-1m/ratings.dat", ML_RATINGS)
        z.writestr("ml-1m/movies.dat", "10::A::Drama\n20::B::Comedy\n30::C::Horror\n")
    ds = data.load_dataset(str(tmp_path / "ml.zip"), verbose=False, kcore=0)
    assert full_sequences(ds) == EXPECTED_ML and ds.item_text[2] == "B | Comedy"


def test_amazon_meta_next_to_reviews(tmp_path):
    rows = "".join(json.dumps({"reviewerID": u, "asin": i, "overall": 5.0, "unixReviewTime": t}) + "\n"
                   for u, i, t in [("A", "p1", 1), ("A", "p2", 2), ("A", "p3", 3)])
    path = write(tmp_path / "reviews_Toys_5.json.gz", rows, gz=True)
    meta = "".join(repr({"asin": a, "title": t, "categories": [["Toys", "Games"]]}) + "\n"
                   for a, t in [("p1", "Red car"), ("p2", "Blue ball")])
    write(tmp_path / "meta_Toys.json.gz", meta, gz=True)
    ds = data.load_dataset(path, verbose=False, kcore=0)
    assert ds.item_text == ["", "Red car | Toys Games", "Blue ball | Toys Games", ""]


# --- Preprocessing and splits ---------------------------------------------------------------------
def test_kcore_once_versus_iterative():
    # k = 2. Item c has 1 interaction. Dropping it leaves user 3 with 1 item: a single pass
    # (SASRec, counts from the unfiltered data) keeps user 3, the iterative k-core drops it too.
    cols = data._columns([1, 1, 2, 2, 3, 3], ["a", "b", "a", "b", "a", "c"], None, [1, 2, 1, 2, 1, 2])
    opts = dict(data.DEFAULTS["raw"], kcore=2)
    uc, ic, _, users, items = data._preprocess(cols, opts | {"kcore_mode": "once"}, "t")
    assert len(uc) == 5 and sorted(set(items[ic])) == ["a", "b"]
    uc, ic, _, users, items = data._preprocess(cols, opts | {"kcore_mode": "iterative"}, "t")
    assert len(uc) == 4 and sorted(set(users[uc].tolist())) == [1, 2]


def test_dedup_keeps_the_earliest():
    cols = data._columns([1, 1, 1], ["a", "b", "a"], None, [5, 1, 0])  # "a" at t=5 and t=0
    uc, ic, t, _, items = data._preprocess(cols, dict(data.DEFAULTS["raw"], kcore=0), "t")
    assert items[ic].tolist() == ["a", "b"] and t.tolist() == [0, 1]


def test_leave_one_out_split():
    ds = small_dataset()
    assert ds.item_ids[1:].tolist() == list(range(1, 10))  # raw ids 1..9 keep their value
    r = list(ds.train.users).index(0)  # user "1": [7, 3, 9, 4, 2]
    assert ds.train[r].tolist() == [7, 3, 9]
    v = list(ds.valid.users).index(0)
    assert ds.valid[v].tolist() == [7, 3, 9] and ds.valid.targets[v] == 4
    assert ds.test[v].tolist() == [7, 3, 9, 4] and ds.test.targets[v] == 2
    assert 1 not in ds.test.users  # user "2" has only 2 items: training only
    assert ds.stats["valid_cases"] == ds.stats["test_cases"] == 2


def test_time_split(tmp_path):
    # cuts at 10 and 20. User A: 3 training items, one valid (t=12), one test (t=25).
    # User B: item "y" appears only after t1, so B's valid case (target y) and test case (history
    # contains y) are both dropped, as in ReaRec's notebooks.
    rows = [("A", "a", 1), ("A", "b", 2), ("A", "c", 3), ("A", "b2", 12), ("A", "a2", 25),
            ("B", "b2", 5), ("B", "a2", 6), ("B", "y", 15), ("B", "a", 22)]
    text = "user,item,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in rows)
    ds = data.load_dataset(write(tmp_path / "t.csv", text), verbose=False, split="time",
                           time_cuts=[10, 20], kcore=0, min_history=1)
    name = lambda i: ds.item_ids[i]
    assert ds.n_items == 5  # y never occurs in training: it gets no id
    assert [[name(i) for i in ds.train[r]] for r in range(len(ds.train))] == [["a", "b", "c"], ["b2", "a2"]]
    assert len(ds.valid) == 1 and name(ds.valid.targets[0]) == "b2"
    assert len(ds.test) == 1 and name(ds.test.targets[0]) == "a2"
    assert [name(i) for i in ds.test[0]] == ["a", "b", "c", "b2"]  # history spans the valid period
    with pytest.raises(data.DataError, match="no validation or test"):
        data.load_dataset(str(tmp_path / "t.csv"), verbose=False, split="time", time_cuts=[10, 20],
                          kcore=0, min_history=5)


def test_sequences_in_the_time_split_keep_chronological_order_across_files(tmp_path):
    # amazon2023-<Cat>-time reads three files; their union is re-sorted per user.
    for split, rows in [("train", [("A", "a", 1), ("A", "b", 2), ("B", "c", 3), ("B", "d", 4)]),
                        ("valid", [("A", "c", 12)]),
                        ("test", [("A", "d", 25)])]:
        write(tmp_path / f"X.{split}.csv.gz", "user_id,parent_asin,rating,timestamp,history\n" +
              "".join(f"{u},{i},5.0,{t},\n" for u, i, t in rows), gz=True)
    cols = data._concat([data.parse_file(str(tmp_path / f"X.{s}.csv.gz")) for s in ("test", "valid", "train")])
    ds = data.build_dataset(cols, "X", split="time", time_cuts=[10, 20], kcore=0, min_history=1)
    assert [ds.item_ids[i] for i in ds.test[0]] == ["a", "b", "c"] and ds.item_ids[ds.test.targets[0]] == "d"


# --- Batching ---------------------------------------------------------------------------------------
def test_train_batches_every_position_and_pairs():
    ds = small_dataset()
    rows = {tuple(i.tolist()): tuple(t.tolist())
            for x, y in data.train_batches(ds.train, 4, 10) for i, t in zip(x, y)}
    assert rows[(0, 0, 7, 3)] == (0, 0, 3, 9)  # user 1, train [7, 3, 9]
    assert rows[(0, 0, 0, 5)] == (0, 0, 0, 6)  # user 2, train [5, 6]
    (x, y), = list(data.train_batches(ds.train, 1, 10))[:1]
    assert sorted(zip(x[:, 0].tolist(), y[:, 0].tolist())) == [(2, 3), (3, 9), (5, 6)]
    pairs = {(tuple(h.tolist()), int(t)) for h, ts in data.train_batches(ds.train, 3, 2, pairs=True)
             for h, t in zip(h, ts)}
    assert pairs == {((0, 0, 7), 3), ((0, 7, 3), 9), ((0, 0, 5), 6), ((0, 0, 1), 2), ((0, 1, 2), 3)}
    # length bucketing: the same rows (without their padding), batches of similar length
    plain = {tuple(r[r != 0].tolist()) for x, _ in data.train_batches(ds.train, 4, 1) for r in x}
    bucketed = list(data.train_batches(ds.train, 4, 2, bucket=2, generator=torch.Generator().manual_seed(1)))
    assert {tuple(r[r != 0].tolist()) for x, _ in bucketed for r in x} == plain
    assert sorted(x.shape[1] for x, _ in bucketed) == [1, 2]  # [7 3 | 1 2] and [5] (padding cut)
    # pairs (STREAM-Rec): the same (prefix, target) examples, each batch without all-PAD columns
    bp = list(data.train_batches(ds.train, 3, 2, pairs=True, bucket=2, generator=torch.Generator().manual_seed(1)))
    assert {(tuple(h[h != 0].tolist()), int(t)) for x, y in bp for h, t in zip(x, y)} == \
        {(tuple(h for h in p if h), t) for p, t in pairs}
    assert all(bool((x != 0).any(0).all()) and bool((x[:, -1] != 0).all()) for x, _ in bp)
    assert sum(x.numel() for x, _ in bp) < 5 * 3  # less padding than full windows of 3
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a = [x for x, _ in data.train_batches(ds.train, 4, 1, generator=g1)]
    b = [x for x, _ in data.train_batches(ds.train, 4, 1, generator=g2)]
    assert all(torch.equal(p, q) for p, q in zip(a, b))


# --- Synthetic data --------------------------------------------------------------------------------
def test_synthetic_is_deterministic_and_learnable():
    a, ta = data.make_synthetic(seed=0)
    b, tb = data.make_synthetic(seed=0)
    c, _ = data.make_synthetic(seed=1)
    assert all(np.array_equal(a[k], b[k]) for k in ("user", "item", "time")) and ta == tb
    assert not np.array_equal(a["item"], c["item"])
    ds = data.load_dataset("synthetic", verbose=False)
    n = ds.n_items
    pop = torch.from_numpy(np.bincount(ds.train.items, minlength=n + 1)).double()
    counts = np.zeros((n + 1, n + 1))
    for r in range(len(ds.train)):  # first-order Markov: counts of (item -> next item)
        s = ds.train[r]
        np.add.at(counts, (s[:-1], s[1:]), 1)
    counts = torch.from_numpy(counts)
    popularity = data.evaluate(lambda h: pop.expand(len(h), -1), ds.test, 50)
    markov = data.evaluate(lambda h: counts[h[:, -1]] + 1e-6 * pop, ds.test, 50)
    assert markov["ndcg@10"] > 5 * popularity["ndcg@10"] and markov["recall@10"] > 0.5
    assert ds.item_text[1].split()[1] == ds.item_text[2].split()[1]  # same topic word


# --- Downloads against a local HTTP server ---------------------------------------------------------
class Server:
    """A tiny HTTP server on 127.0.0.1 serving in-memory files; counts requests."""

    def __init__(self, files):
        self.files, self.requests, self.lie_about_length = files, [], False
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests.append(self.path)
                body = outer.files.get(self.path.lstrip("/"))
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body) + (100 if outer.lie_about_length else 0)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def ml_zip_bytes():
    import io
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("ml-1m/ratings.dat", ML_RATINGS * 1)
        z.writestr("ml-1m/movies.dat", "10::A::Drama\n20::B::Comedy\n30::C::Horror\n")
    return buf.getvalue()


def test_download_progress_cache_corruption_and_errors(tmp_path, capsys):
    body = gzip.compress(b"user,item\n" + b"a,b\n" * 50_000)
    srv = Server({"f.csv.gz": body, "bad.gz": b"not gzip at all"})
    try:
        dest = str(tmp_path / "cache" / "f.csv.gz")
        data.download(srv.url + "f.csv.gz", dest)
        assert Path(dest).read_bytes() == body and "downloading" in capsys.readouterr().err
        data.download(srv.url + "f.csv.gz", dest)  # cache hit: no new request
        assert len(srv.requests) == 1
        Path(dest).write_bytes(body[:100])  # a truncated cached copy is fetched again
        data.download(srv.url + "f.csv.gz", dest)
        assert len(srv.requests) == 2 and Path(dest).read_bytes() == body
        assert "corrupt" in capsys.readouterr().err
        with pytest.raises(data.DataError, match="corrupt"):  # bad content is never kept
            data.download(srv.url + "bad.gz", str(tmp_path / "bad.gz"))
        with pytest.raises(data.DataError, match="md5"):
            data.download(srv.url + "f.csv.gz", str(tmp_path / "m.csv.gz"), md5="0" * 32)
        srv.lie_about_length = True  # the connection ends before Content-Length bytes
        with pytest.raises(data.DataError):
            data.download(srv.url + "f.csv.gz", str(tmp_path / "short.csv.gz"))
        srv.lie_about_length = False
        with pytest.raises(data.DataError, match="404"):
            data.download(srv.url + "missing.gz", str(tmp_path / "missing.gz"))
        # mirrors: the first URL fails, the second works
        data.download([srv.url + "missing.gz", srv.url + "f.csv.gz"], str(tmp_path / "m2.csv.gz"))
    finally:
        srv.close()
    # server down: a one-line error naming the URL and where to put the file by hand
    with pytest.raises(data.DataError) as e:
        data.download(srv.url + "f.csv.gz", str(tmp_path / "off.csv.gz"))
    msg = str(e.value)
    assert srv.url + "f.csv.gz" in msg and str(tmp_path / "off.csv.gz") in msg and "\n" not in msg
    leftovers = [p.name for p in tmp_path.rglob("*") if p.is_file()]
    assert not any(n.endswith(".part") for n in leftovers)
    assert not {"bad.gz", "m.csv.gz", "short.csv.gz", "missing.gz", "off.csv.gz"} & set(leftovers)


def test_named_dataset_downloads_once_then_works_offline(tmp_path, monkeypatch):
    body = ml_zip_bytes()
    srv = Server({"ml-1m.zip": body})
    monkeypatch.setattr(data, "GROUPLENS", srv.url)
    monkeypatch.setitem(data.MOVIELENS, "ml-1m", hashlib.md5(body).hexdigest())
    try:
        ds = data.load_dataset("ml-1m", str(tmp_path), verbose=False, kcore=0)
    finally:
        srv.close()
    assert full_sequences(ds) == EXPECTED_ML and ds.item_text[1] == "A | Drama"
    ds = data.load_dataset("ml-1m", str(tmp_path), verbose=False, kcore=0)  # server is gone
    assert ds.stats["interactions"] == 5


# --- Bad input: one clear line each ------------------------------------------------------------------
@pytest.mark.parametrize("args, text, message", [
    (["--dataset", "no-such-set"], None, "unknown dataset 'no-such-set'"),
    (["--dataset", "missing/ratings.dat"], None, "no such file: missing/ratings.dat"),
    (["--dataset", "{f}"], "1::2::3::4\n1::x::3::4\n", "line 2"),
    (["--dataset", "{f}", "--kcore", "50"], "1::2::3::4\n1::3::3::5\n", "no interactions left"),
    (["--dataset", "{f}", "--split", "time"], "1 2\n1 3\n1 4\n", "no timestamps"),
    (["--dataset", "{f}", "--min-rating", "4"], "1 2\n1 3\n1 4\n", "no ratings"),
    (["--dataset", "{f}"], "", "empty"),
    (["--dataset", "{f}"], "user,rating\n1,5\n", "no item column"),
    (["--dataset", "{f}"], '{"foo": 1}\n', "line 1: not a review record"),
    (["--dataset", "{f}"], "1 2 3\n\n1\n", "line 3"),
    (["--dataset", "{gz}"], None, "cannot read"),
    (["--dataset", "{f}"], "user,item\n", "has a header but no rows"),  # not "lower --kcore"
    (["--dataset", "{f}", "--kcore", "-1"], "1 2\n1 3\n1 4\n", "--kcore must be >= 0"),
    (["--dataset", "{f}"], "u1 a\n" * 1001 + "u1 b c\n", "line 1002"),  # string ids, bad line late
])
def test_bad_input_gives_one_clear_line(tmp_path, args, text, message):
    f = tmp_path / "in.txt"
    if text is not None:
        f.write_text(text)
    gz = tmp_path / "broken.csv.gz"
    gz.write_bytes(gzip.compress(b"user,item\n1,2\n")[:-10])
    args = [a.format(f=f, gz=gz) for a in args]
    with pytest.raises(SystemExit) as e:
        data.main(args + ["--data-dir", str(tmp_path)])
    assert str(e.value).startswith("error: ") and message in str(e.value) and "\n" not in str(e.value)


def test_two_column_files_take_string_ids_like_the_other_layouts(tmp_path):
    ds = data.load_dataset(write(tmp_path / "pairs.txt", "u1 B0A\nu1 B0C\nu1 B0B\nu2 B0A\nu2 B0B\nu2 B0C\n"),
                           verbose=False)
    assert full_sequences(ds) == {"u1": ["B0A", "B0C", "B0B"], "u2": ["B0A", "B0B", "B0C"]}


def test_offline_multi_file_dataset_names_every_missing_file(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "AMZ2023", "http://127.0.0.1:9/")  # discard port: nothing listens
    with pytest.raises(SystemExit) as e:
        data.main(["--dataset", "amazon2023-Toys-time", "--data-dir", str(tmp_path)])
    msg = str(e.value)
    assert msg.startswith("error: ") and "\n" not in msg and "place them in" in msg
    assert all(f"Toys.{s}.csv.gz" in msg for s in ("train", "valid", "test"))


def test_corrupt_cached_download_is_kept_until_a_good_copy_replaces_it(tmp_path, capsys):
    body = gzip.compress(b"user,item\n1,2\n")
    dest = tmp_path / "f.csv.gz"
    dest.write_bytes(body[:-10])  # a truncated cached copy
    with pytest.raises(data.DataError, match="cached copy is corrupt"):  # offline: keep what we have
        data.download("http://127.0.0.1:9/f.csv.gz", str(dest))
    assert dest.read_bytes() == body[:-10]
    srv = Server({"f.csv.gz": body})
    try:
        data.download(srv.url + "f.csv.gz", str(dest))
    finally:
        srv.close()
    assert dest.read_bytes() == body and not list(tmp_path.glob("*.part"))


def test_offline_named_dataset_error(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "GROUPLENS", "http://127.0.0.1:9/")  # discard port: nothing listens
    with pytest.raises(SystemExit) as e:
        data.main(["--dataset", "ml-100k", "--data-dir", str(tmp_path)])
    assert "place it at" in str(e.value) and "ml-100k.zip" in str(e.value)


def test_cli_stats_json(tmp_path, capsys):
    data.main(["--dataset", write(tmp_path / "r.dat", ML_RATINGS), "--kcore", "0", "--stats"])
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["users"] == 2 and stats["items"] == 3 and stats["interactions"] == 5
    assert stats["min_len"] == 2 and stats["max_len"] == 3 and stats["test_cases"] == 1
    res = data.main(["--benchmark"])  # the metric-speed command, on the synthetic data
    assert res["cases"] == 2000 and res["items"] == 400 and res["metric_seconds"] > 0


# --- data.py --report: hand-made results.json files ----------------------------------------------
def fake_rearec_result(folder, method, seed, ndcg10, **config):
    cfg = dict(dataset="data/Toys.txt", method=method, steps=0 if method == "base" else 2, tau=1.0,
               alpha=5.0, seed=seed, out=str(folder), threads=1) | config
    folder.mkdir(parents=True)
    metrics = {"ndcg@10": ndcg10, "recall@10": 2 * ndcg10, "ndcg@20": ndcg10 + 0.01, "recall@20": 0.5}
    (folder / "results.json").write_text(json.dumps(dict(
        config=cfg, unused_config=["alpha"] if method == "base" else [], dataset={"name": "data/Toys.txt"},
        valid=metrics, test=metrics, best_epoch=seed + 10,
        per_step={"step0": metrics}, oracle=metrics)))


def test_report_mean_std_seeds_and_change_against_base(tmp_path, capsys):
    for seed, v in enumerate([0.1, 0.2, 0.3]):
        fake_rearec_result(tmp_path / f"base{seed}", "base", seed, v)
    fake_rearec_result(tmp_path / "base_tau", "base", 0, 0.4, tau=0.5)  # another setting: its own row
    for seed, v in enumerate([0.22, 0.26]):
        fake_rearec_result(tmp_path / "sweep" / f"prl{seed}", "prl", seed, v, alpha=2.0)
    stream = {"config": {"dataset": "syn", "trace_len": 4, "seed": 0}, "dataset": {"name": "synthetic"},
              "base": {"valid": {"ndcg@10": 0.5}, "test": {"ndcg@10": 0.4, "recall@10": 0.5, "ndcg@20": 0.5,
                                                             "recall@20": 0.6}, "best_epoch": 3},
              "stage2": {"valid": {"ndcg@10": 0.5}, "test": {"ndcg@10": 0.3, "recall@10": 0.6, "ndcg@20": 0.5,
                                                               "recall@20": 0.6}, "best_epoch": 2}}
    (tmp_path / "stream").mkdir()
    (tmp_path / "stream" / "results.json").write_text(json.dumps(stream))
    text, table = data.report([str(tmp_path)])
    rows = {(r["script"], r["name"], r["settings"]): r for r in table}
    base = rows[("rearec", "base", (("tau", 1.0),))]
    assert base["n"] == 3 and base["stats"]["ndcg@10"] == pytest.approx((0.2, 0.1))  # mean, sample std
    assert base["best_epoch"] == pytest.approx(11)
    assert rows[("rearec", "base", (("tau", 0.5),))]["n"] == 1
    base_alpha = rows[("rearec", "base", (("tau", 1.0),))]["config"]
    assert "alpha" not in base_alpha  # base ignores PRL's alpha: no column, no match on it
    prl = rows[("rearec", "prl", (("alpha", 2.0), ("tau", 1.0)))]  # the settings that differ among the runs
    assert prl["n"] == 2 and prl["stats"]["ndcg@10"] == pytest.approx((0.24, math.sqrt(0.0008)))
    assert prl["base"] is base  # the base run closest in config: tau 1.0, not 0.5
    line = next(l for l in text.splitlines() if "| prl |" in l)
    assert "0.2400 ± 0.0283 (+20.0 %)" in line and line.endswith("| 2 | 10.5 |")  # best epochs 10 and 11: their mean
    assert "| alpha=2.0, tau=1.0 |" in line
    assert "0.4000 |" in next(l for l in text.splitlines() if "tau=0.5" in l)  # one seed: no ± part
    stage2 = rows[("stream_rec", "stage2", ())]
    assert stage2["K"] == 4 and stage2["base"] is rows[("stream_rec", "base", ())]
    assert "0.3000 (-25.0 %)" in text and "0.6000 (+20.0 %)" in text
    for seed, (name, v) in enumerate([("entropy", 0.3), ("mean", 0.2)]):  # validation chose differently per seed
        res = json.loads((tmp_path / "sweep" / f"prl{seed}" / "results.json").read_text())
        res["selector"] = {"name": name, "valid": res["valid"], "test": dict(res["test"], **{"ndcg@10": v})}
        (tmp_path / "sweep" / f"prl{seed}" / "results.json").write_text(json.dumps(res))
    views_text, with_views = data.report([str(tmp_path)], views=True)
    names = {r["name"] for r in with_views}
    assert {"prl (r_0)", "prl (oracle)"} <= names and not any(n.startswith("base (") for n in names)  # K = 0: no views
    chosen = next(r for r in with_views if r["name"] == "prl (chosen selector)")  # one row over both seeds
    assert chosen["n"] == 2 and chosen["stats"]["ndcg@10"][0] == pytest.approx(0.25) and chosen["chosen"] == ["entropy", "mean"]
    assert "| prl (chosen selector: entropy, mean) |" in views_text
    # stream_rec's stage_fields: a stage-3 setting splits the stage-3 rows only; the earlier stages
    # of the two runs (seeds 0 and 1) are one row each
    for seed, trie in enumerate([False, True]):
        run = {"config": {"dataset": "syn2", "trace_len": 4, "seed": seed, "rl_trie": trie, "sft_lr": 1e-3},
               "stage_fields": sr.stage_fields(), "dataset": {"name": "syn2"}}
        for stage, v in [("base", 0.4), ("stage2", 0.3 + 0.1 * seed), ("stage3", 0.2 + 0.1 * seed)]:
            run[stage] = {"valid": {"ndcg@10": v}, "test": {"ndcg@10": v}, "best_epoch": 1}
        (tmp_path / f"stream2_{seed}").mkdir()
        (tmp_path / f"stream2_{seed}" / "results.json").write_text(json.dumps(run))
    assert "rl_trie" in sr.stage_fields()["stage3"] and "sft_lr" in sr.stage_fields()["stage2"]
    rows2 = [r for r in data.report([str(tmp_path)])[1] if r["dataset"] == "syn2"]
    got = sorted((r["name"], r["settings"], r["n"]) for r in rows2)
    assert got == [("base", (), 2), ("stage2", (), 2), ("stage3", (("rl_trie", False),), 1),
                   ("stage3", (("rl_trie", True),), 1)]
    # a run whose config predates a field (rl_holdout) reads as what it ran with (older_config of a
    # newer run), so it is not merged with a run that set the field; the base rows stay one row
    for seed, extra in enumerate([{}, {"rl_holdout": True}]):
        run = {"config": {"dataset": "syn3", "trace_len": 4, "seed": seed, **extra},
               "dataset": {"name": "syn3"}} | ({"stage_fields": sr.stage_fields(), "older_config": sr.OLDER}
                                               if extra else {})  # the first: an older results.json
        for stage in ("base", "stage2"):
            run[stage] = {"valid": {"ndcg@10": 0.3}, "test": {"ndcg@10": 0.3 + 0.1 * seed}, "best_epoch": 1}
        (tmp_path / f"stream3_{seed}").mkdir()
        (tmp_path / f"stream3_{seed}" / "results.json").write_text(json.dumps(run))
    rows3 = [r for r in data.report([str(tmp_path)])[1] if r["dataset"] == "syn3"]
    assert sorted((r["name"], r["settings"], r["n"]) for r in rows3) == [
        ("base", (), 2), ("stage2", (("rl_holdout", False),), 1), ("stage2", (("rl_holdout", True),), 1)]
    data.main(["--report", str(tmp_path), "--report-split", "valid", "--views"])
    out = capsys.readouterr().out
    assert "prl (r_0)" in out and "prl (oracle)" in out and "valid ndcg@10" in out
    with pytest.raises(SystemExit) as e:
        data.main(["--report", str(tmp_path / "missing")])
    assert str(e.value).startswith("error: --report:") and "\n" not in str(e.value)


def plot_fixture(tmp_path):
    groups = {g: {"ranges": [[1, 2], [3, 4], [5, 6], [7, 9]], "cases": [1, 1, 1, 1],
                  "views": {v: [{"ndcg@10": 0.1 * (i + 1)} for i in range(4)] for v in ("main", "step0", "step1", "oracle")}}
              for g in ("length", "popularity")}
    fake_rearec_result(tmp_path / "base", "base", 0, 0.1)
    for K in (1, 2):
        fake_rearec_result(tmp_path / f"prl{K}", "prl", 0, 0.1 + 0.01 * K, steps=K)
        res = json.loads((tmp_path / f"prl{K}" / "results.json").read_text())
        res |= {"groups": groups, "history": [{"epoch": 1, "loss": 3.0, "ce": 2.0, "valid_ndcg@20": 0.1},
                                              {"epoch": 2, "loss": 2.5, "ce": 1.8, "cl": 0.3, "valid_ndcg@20": 0.12}],
                "selector": {"name": "entropy", "valid": res["valid"], "test": res["test"]}}
        (tmp_path / f"prl{K}" / "results.json").write_text(json.dumps(res))


def test_plot_command_writes_the_figures(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is an optional extra (pip install matplotlib); CI installs only requirements.txt")
    plot_fixture(tmp_path / "runs")
    paths = data.main(["--plot", str(tmp_path / "runs"), "--plot-out", str(tmp_path / "fig")])
    names = sorted(os.path.basename(p) for p in paths)
    assert names == ["bars_Toys.png", "curves_Toys.png", "groups_Toys_prl1.png", "groups_Toys_prl2.png", "ksweep_Toys.png"]
    for p in paths:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Path(p).stat().st_size > 5000
    assert not list((tmp_path / "fig").glob("*.tmp*"))


def test_curve_histories_flatten_stream_rec_stages():
    epoch = lambda i: {"epoch": i, "train": {"loss": 2.0 / i, "ce": 1.0}, "valid": {"ndcg@10": 0.1 * i},  # noqa: E731
                       "examples": 8, "s": 1.0}
    res = {"config": {"dataset": "syn"}, "base": {"history": [epoch(1), epoch(2)]}, "stage2": {"history": [epoch(1)]},
           "stage3": {"test": {}}}  # no history: no curve
    got = data.curve_histories(res)
    assert [name for name, _ in got] == ["base", "stage2"]
    assert got[0][1][1] == {"epoch": 2, "loss": 1.0, "ce": 1.0, "valid_ndcg@10": 0.2}
    rearec = {"config": {"method": "prl"}, "history": [{"epoch": 1, "loss": 3.0, "valid_ndcg@20": 0.1}]}
    assert data.curve_histories(rearec) == [("prl", rearec["history"])]  # already flat


def test_plot_without_matplotlib_is_one_clear_line(tmp_path, monkeypatch):
    plot_fixture(tmp_path / "runs")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    with pytest.raises(SystemExit) as e:
        data.main(["--plot", str(tmp_path / "runs"), "--plot-out", str(tmp_path / "fig")])
    assert str(e.value) == "error: --plot needs matplotlib, an optional extra: pip install matplotlib"


# --- The real ML-1M files, where the shared data folder is present -----------------------------------
@pytest.mark.skipif(not (SHARED / "sasrec" / "ml-1m.txt").exists(),
                    reason=f"needs the shared data folder {SHARED} (../shared/data beside the repo)")
def test_raw_ml1m_reproduces_sasrec_order():
    """Raw ratings.dat (first 2,999 users) -> our parse + stable sort equals SASRec's ml-1m.txt
    for every user, item for item (through the published id mappings)."""
    sas = data.load_dataset(str(SHARED / "sasrec" / "ml-1m.txt"), verbose=False)
    assert (sas.stats["users"], sas.stats["items"], sas.stats["interactions"]) == (6040, 3416, 999611)
    raw = data.load_dataset(str(SHARED / "raw" / "ml-1m" / "ratings_users0001-2999.dat"),
                            verbose=False, kcore=0)
    maps = SHARED / "mappings" / "ml-1m_sas"
    item_map = dict(np.loadtxt(maps / "sas_to_original_items.txt", dtype=np.int64))
    user_map = dict(np.loadtxt(maps / "sas_to_original_users.txt", dtype=np.int64))
    kept = set(item_map.values())
    raw_seqs, checked = full_sequences(raw), 0
    for sas_user, seq in full_sequences(sas).items():
        raw_user = user_map[sas_user]
        if raw_user in raw_seqs:
            assert [item_map[i] for i in seq] == [i for i in raw_seqs[raw_user] if i in kept]
            checked += 1
    assert checked == 2999


# =============================================================================
# rearec.py
# =============================================================================

import rearec  # noqa: E402


def tiny_rearec(method="rpe", steps=2, backbone="sasrec", max_len=8, n_items=12, **kw):
    cfg = rearec.parse_args(["--method", method, "--steps", str(steps), "--backbone", backbone,
                             "--hidden", "16", "--heads", "2", "--ffn", "24", "--max-len", str(max_len)]
                            + [a for k, v in kw.items() for a in (f"--{k.replace('_', '-')}", str(v))])
    cfg.n_items = n_items
    rearec.resolve_auto(cfg, avg_len=max_len, verbose=False)
    torch.manual_seed(0)
    model = rearec.ReaRec(cfg)
    for p in model.parameters():  # larger weights than the N(0, 0.02) init: differences show up
        p.data.normal_(0, 0.3)
    return model.eval()


def reference_states(model, items, K, bidirectional=False):
    """The paper's reasoning written literally, with no cache and no batching (§3.1): the token
    sequence grows by one reasoning token per step, r_{k-1} + p^R_k, and the whole Transformer
    runs again over all tokens. Only the model's weights are shared with the code under test.
    items: the item ids of ONE prefix, oldest first, no padding. Returns (K+1, D)."""
    D, H = model.cfg.hidden, model.cfg.heads
    n = len(items)
    tokens = model.item_emb.weight[torch.tensor(items)] + model.pos_emb.weight[:n]  # (n, D)
    states = []
    for k in range(K + 1):
        x = model.in_ln(tokens)
        T = x.shape[0]
        allowed = torch.ones(T, T).tril().bool()
        if bidirectional:
            allowed[:n, :n] = True  # prefix mask: items both ways, reasoning tokens causal
        pre = model.cfg.norm == "pre"
        for layer in model.layers:
            h = layer.ln1(x) if pre else x
            q, kk, v = [t.view(T, H, D // H).transpose(0, 1) for t in layer.qkv(h).split(D, -1)]
            att = (q @ kk.transpose(1, 2) / math.sqrt(D // H)).masked_fill(~allowed, float("-inf"))
            ctx = (att.softmax(-1) @ v).transpose(0, 1).reshape(T, D)
            if pre:  # x + Attn(LN(x)), x + FFN(LN(x)), one LN at the end
                x = x + layer.proj(ctx)
                x = x + layer.ffn(layer.ln2(x))
            else:  # LN(x + Attn(x)), LN(x + FFN(x))
                x = layer.ln1(x + layer.proj(ctx))
                x = layer.ln2(x + layer.ffn(x))
        if pre:
            x = model.out_ln(x)
        states.append(x[-1])
        if k < K:
            rpe = model.reason_pos_emb.weight[k] if model.reason_pos_emb is not None else 0
            tokens = torch.cat([tokens, (x[-1] + rpe)[None]])
    return torch.stack(states)


SEQ = [3, 7, 1, 12, 5, 9]


def tiny_batch():
    """Two left-padded training rows and their next-item targets (0 = no loss): 13 cases."""
    x = torch.tensor([[0, 0] + SEQ, [0] + SEQ + [4]])
    y = torch.cat([x[:, 1:], torch.tensor([[2], [8]])], 1)
    y[x == 0] = 0
    return x, y


@pytest.mark.parametrize("norm", ["post", "pre"])
@pytest.mark.parametrize("backbone", ["sasrec", "bert4rec"])
@pytest.mark.parametrize("method, K", [("base", 0), ("naive", 2), ("rpe", 1), ("prl", 3)])
def test_cached_reasoning_equals_reencoding(backbone, method, K, norm):
    model = tiny_rearec(method, K, backbone, norm=norm)
    items = torch.tensor([[0, 0] + SEQ])  # left-padded to max_len 8
    with torch.no_grad():
        R = model(items)[0]  # (K+1, D), KV cache
        ref = reference_states(model, SEQ, K, bidirectional=backbone == "bert4rec")
    assert R.shape == (K + 1, 16)
    torch.testing.assert_close(R, ref, atol=1e-5, rtol=1e-4)
    if K == 0:  # the plain backbone: r_0 is the last item's output
        torch.testing.assert_close(R[0], model.encode(items)[0][0, -1])


@pytest.mark.parametrize("K, norm", [(0, "post"), (2, "post"), (2, "pre")])
def test_every_position_pass_equals_each_prefix_alone(K, norm):
    """Training reads all positions in one pass; position t must reason exactly as if the
    sequence ended at t (items <= t, its own reasoning tokens only)."""
    model = tiny_rearec("rpe", K, norm=norm)
    items = torch.tensor([[0, 0] + SEQ])
    with torch.no_grad():
        h, cache, key_ok = model.encode(items)
        R = model.reason(cache, key_ok, torch.arange(8)[None], h, K)[0]  # (L, K+1, D)
        for t in range(2, 8):
            torch.testing.assert_close(R[t], reference_states(model, SEQ[:t - 1], K), atol=1e-5, rtol=1e-4)


def test_bert4rec_prefix_cut_equals_reencoding_the_prefix():
    model = tiny_rearec("prl", 2, "bert4rec")
    items = torch.tensor([[0, 0] + SEQ, [0] + SEQ + [4]])
    cut = torch.tensor([[4], [5]])  # row 0 trains on SEQ[:3], row 1 on SEQ[:5]
    with torch.no_grad():
        h, cache, key_ok = model.encode(items, cut[:, 0])
        R = model.reason(cache, key_ok, cut, h.gather(1, cut[:, :, None].expand(2, 1, 16)), 2)[:, 0]
    torch.testing.assert_close(R[0], reference_states(model, SEQ[:3], 2, True), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(R[1], reference_states(model, SEQ[:5], 2, True), atol=1e-5, rtol=1e-4)


def test_causality_and_padding_invariance():
    model = tiny_rearec("prl", 2, max_len=10)
    a = torch.tensor([[0, 0, 0, 0] + SEQ])
    b = a.clone()
    b[0, -2:] = torch.tensor([2, 11])  # change the two newest items
    def every_position(items):
        h, cache, key_ok = model.encode(items)
        return model.reason(cache, key_ok, torch.arange(items.shape[1])[None], h, 2)

    with torch.no_grad():
        ra, rb = every_position(a), every_position(b)
        assert torch.equal(ra[:, :8], rb[:, :8]) and not torch.allclose(ra[:, 8:], rb[:, 8:])
        # more left padding (a longer window) changes nothing
        torch.testing.assert_close(model(a), model(torch.tensor([[0] * 4 + SEQ])[:, -10:]))
        torch.testing.assert_close(model(torch.tensor([SEQ[2:]])), model(torch.tensor([[0, 0] + SEQ[2:]])))


def test_reasoning_position_embeddings_are_their_own_table():
    rpe, naive = tiny_rearec("rpe", 3), tiny_rearec("naive", 3)
    assert rpe.reason_pos_emb.weight.shape == (3, 16) and rpe.pos_emb.weight.shape == (8, 16)
    assert naive.reason_pos_emb is None  # the naive ablation feeds r_{k-1} back unchanged
    assert tiny_rearec("base", 0).reason_pos_emb is None


@pytest.mark.parametrize("stopgrad, chunk", [(True, 0), (True, 6), (False, 0), (False, 6)])
def test_erl_loss_against_a_slow_loop(stopgrad, chunk):
    """ERLLoss writes its gradient by hand: value AND gradients (states and item embeddings) must
    equal autograd on a slow loop of the paper's formulas, with and without the stop-gradient,
    in one piece and in chunks."""
    torch.manual_seed(1)
    cfg = rearec.parse_args(["--method", "erl", "--kl-weight", "0.3", "--tau", "0.5",
                             "--loss-chunk", str(chunk)] + ([] if stopgrad else ["--no-kl-stopgrad"]))
    V, S, D, N = 3, 3, 4, 5
    R = torch.randn(V, S, D, requires_grad=True)
    E = torch.randn(N + 1, D, requires_grad=True)
    target = torch.tensor([1, 5, 2])
    loss, terms = rearec.erl_loss(R, target, E, cfg)
    # slow restatement: CE on the mean state; KL(p_j || p_i) over ordered pairs, p_i a constant
    R2, E2 = R.detach().clone().requires_grad_(), E.detach().clone().requires_grad_()
    rec, kl, pairs = 0.0, 0.0, 0
    for v in range(V):
        logits = R2[v].mean(0) @ E2[1:].T / 0.5
        rec = rec - torch.log_softmax(logits, 0)[target[v] - 1] / V
        for i in range(S):
            for j in range(S):
                if i != j:
                    p_j = torch.softmax(R2[v, j] @ E2[1:].T / 0.5, 0)
                    log_p_i = torch.log_softmax(R2[v, i] @ E2[1:].T / 0.5, 0)
                    log_p_i = log_p_i.detach() if stopgrad else log_p_i
                    kl = kl + (p_j * (p_j.log() - log_p_i)).sum()
                    pairs += 1
    slow = rec - 0.3 * kl / pairs
    assert loss.item() == pytest.approx(slow.item(), abs=1e-5)
    assert terms["ce"].item() == pytest.approx(rec.item(), abs=1e-5)
    assert terms["kl"].item() == pytest.approx((kl / pairs).item(), abs=1e-5) and terms["kl"] > 0
    (2 * loss).backward()  # the incoming gradient scales the stored one
    (2 * slow).backward()
    torch.testing.assert_close(R.grad, R2.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(E.grad, E2.grad, atol=1e-5, rtol=1e-4)
    assert E.grad[0].abs().sum() == 0  # PAD is no candidate
    # K = 0: no pairs, the KL term is 0 (the official code returns NaN); ERL is then plain CE
    loss0, terms0 = rearec.erl_loss(R[:, :1], target, E, cfg)
    assert terms0["kl"] == 0
    assert loss0.item() == pytest.approx(F.cross_entropy(R[:, 0] @ E[1:].T / 0.5, target - 1).item(), abs=1e-5)


@pytest.mark.parametrize("paper_sums", [False, True])
def test_prl_loss_against_a_slow_loop(paper_sums):
    torch.manual_seed(2)
    args = ["--method", "prl", "--tau", "0.2", "--alpha", "3", "--pl-weight", "0.7", "--cl-weight", "0.4"]
    cfg = rearec.parse_args(args + (["--prl-sum"] if paper_sums else []))
    V, K, D, N, C = 4, 2, 3, 6, 3
    R = torch.randn(V, K + 1, D)
    E = torch.randn(N + 1, D)
    target = torch.tensor([6, 1, 3, 3])
    views = {"clean": torch.randn(C, K + 1, D), "noisy": torch.randn(C, K + 1, D)}
    loss, terms = rearec.prl_loss(R, views, target, E, cfg, use_cl=True)
    taus = [0.2 * 3 ** (K - k) for k in range(K + 1)]  # tau_k = tau * alpha^(K-k)
    assert taus == pytest.approx([1.8, 0.6, 0.2])

    def ce(state, t, tau):
        return -torch.log_softmax(state @ E[1:].T / tau, 0)[t - 1]

    ce_K = sum(ce(R[v, K], target[v], taus[K]) for v in range(V)) / V
    per_step = [sum(ce(R[v, k], target[v], taus[k]) for v in range(V)) / V for k in range(K)]
    pl = sum(per_step) / (1 if paper_sums else K)
    cl_steps = []
    for k in range(1, K + 1):  # InfoNCE: noisy anchor c vs every clean state of step k
        total = 0.0
        for c in range(C):
            sims = torch.stack([views["noisy"][c, k] @ views["clean"][j, k] / 0.2 for j in range(C)])
            total = total - torch.log_softmax(sims, 0)[c]
        cl_steps.append(total / C)
    cl = sum(cl_steps) / (1 if paper_sums else K)
    assert loss.item() == pytest.approx((ce_K + 0.7 * pl + 0.4 * cl).item(), abs=1e-5)
    assert terms["pl"].item() == pytest.approx(pl.item(), abs=1e-5)
    assert terms["ce"].item() == pytest.approx(ce_K.item(), abs=1e-5)
    # warm-up: no contrastive term at all
    loss_w, terms_w = rearec.prl_loss(R, views, target, E, cfg, use_cl=False)
    assert "cl" not in terms_w and loss_w.item() == pytest.approx((ce_K + 0.7 * pl).item(), abs=1e-5)


@pytest.mark.parametrize("paper_sums, chunk", [(False, 0), (True, 4)])
def test_prl_cross_entropies_gradients_against_autograd(paper_sums, chunk):
    """CELoss writes the gradient of CE_K + pl_weight * PL by hand: the gradients w.r.t. the states
    and the item embeddings must equal autograd on the formulas (in one piece and in pieces)."""
    torch.manual_seed(3)
    cfg = rearec.parse_args(["--method", "prl", "--tau", "0.3", "--alpha", "2", "--pl-weight", "0.6",
                             "--loss-chunk", str(chunk)] + (["--prl-sum"] if paper_sums else []))
    V, K, D, N = 5, 2, 4, 7
    R = torch.randn(V, K + 1, D, requires_grad=True)
    E = torch.randn(N + 1, D, requires_grad=True)
    target = torch.tensor([1, 7, 3, 3, 5])
    loss, _ = rearec.prl_loss(R, None, target, E, cfg, use_cl=False)
    R2, E2 = R.detach().clone().requires_grad_(), E.detach().clone().requires_grad_()
    taus = [0.3 * 2 ** (K - k) for k in range(K + 1)]
    ce = [F.cross_entropy(R2[:, k] @ E2[1:].T / taus[k], target - 1) for k in range(K + 1)]
    slow = ce[K] + 0.6 * sum(ce[:K]) / (1 if paper_sums else K)
    assert loss.item() == pytest.approx(slow.item(), abs=1e-5)
    (3 * loss).backward()
    (3 * slow).backward()
    torch.testing.assert_close(R.grad, R2.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(E.grad, E2.grad, atol=1e-5, rtol=1e-4)
    assert E.grad[0].abs().sum() == 0  # PAD is no candidate


def test_cross_entropy_far_below_the_top_is_exact():
    """A target 200 nats below the best item underflows float32's softmax; the CE must still be
    the exact 200-ish nats, not inf or a capped value."""
    cfg = rearec.parse_args(["--method", "base", "--tau", "1"])
    R = torch.tensor([[200.0, 0.0]])
    E = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # PAD, item 1 (score 200), item 2 (score 0)
    loss, _ = rearec.ce_loss(R, torch.tensor([2]), E, cfg)
    assert loss.item() == pytest.approx(200.0, rel=1e-6)


def test_contrastive_term_with_groups_against_a_slow_loop():
    """Chains of one user are no negatives of each other; each keeps its own clean state as the
    positive. Slow loop: for each anchor, the candidates are itself and other users' chains."""
    torch.manual_seed(4)
    cfg = rearec.parse_args(["--method", "prl", "--tau", "0.07", "--cl-tau", "2.5"])
    C, K, D = 5, 2, 3
    views = {"clean": torch.randn(C, K + 1, D), "noisy": torch.randn(C, K + 1, D),
             "group": torch.tensor([0, 0, 1, 2, 2])}
    total = 0.0
    for k in range(1, K + 1):
        for c in range(C):
            cands = [j for j in range(C) if j == c or views["group"][j] != views["group"][c]]
            sims = torch.stack([views["noisy"][c, k] @ views["clean"][j, k] / 2.5 for j in cands])
            total = total - torch.log_softmax(sims, 0)[cands.index(c)]
    assert rearec.rcl_loss(views, cfg).item() == pytest.approx((total / (K * C)).item(), abs=1e-5)
    # without groups every other chain is a negative, and --cl-tau 0 falls back to --tau
    cfg0 = rearec.parse_args(["--method", "prl", "--tau", "2.5"])
    plain = rearec.rcl_loss({"clean": views["clean"], "noisy": views["noisy"]}, cfg0)
    full = rearec.rcl_loss(views | {"group": torch.arange(C)}, cfg)
    assert plain.item() == pytest.approx(full.item(), abs=1e-6) and plain.item() > rearec.rcl_loss(views, cfg).item()


@pytest.mark.parametrize("reencode", [False, True])
def test_contrastive_views_anchors_and_one_step_perturbation(reencode):
    """cl_anchors distinct supervised positions per user (fewer if a user has fewer), each chain's
    clean states are the training states at that position, groups name the user; with no noise and
    no dropout the noisy view equals the clean one (it follows the clean chain, official code)."""
    model = tiny_rearec("prl", 2, cl_anchors=4, noise=0.0)
    model.cfg.cl_reencode = reencode
    x, y = tiny_batch()
    x[0, :5] = 0
    y[x == 0] = 0  # row 0 now has 3 supervised positions, row 1 has 7
    valid = y != 0
    with torch.no_grad():
        h, cache, key_ok = model.encode(x)
        R = model.reason(cache, key_ok, torch.arange(8)[None], h, 2)
        torch.manual_seed(0)
        views = rearec.contrastive_views(model, x, R, valid, cache, key_ok, None, model.cfg)
    assert views["group"].tolist() == [0, 0, 0, 1, 1, 1, 1]
    rows = {0: R[0][valid[0]], 1: R[1][valid[1]]}
    for c, g in enumerate(views["group"].tolist()):  # every clean chain is a training state of its row
        assert any(torch.equal(views["clean"][c], s) for s in rows[g])
    assert len({tuple(v.tolist()) for v in views["clean"][:, 0]}) == 7  # distinct positions
    torch.testing.assert_close(views["noisy"], views["clean"], atol=1e-5, rtol=1e-5)
    model.cfg.noise = 0.5
    with torch.no_grad():
        noisy = rearec.contrastive_views(model, x, R, valid, cache, key_ok, None, model.cfg)["noisy"]
    assert not torch.allclose(noisy[:, 1:], views["clean"][:, 1:], atol=1e-3)


@pytest.mark.parametrize("method", ["base", "prl", "erl"])
def test_bfloat16_output_layer_matches_float32(method):
    """--dtype bfloat16 runs the output-layer matmuls in bf16 (softmax in float32): the loss must
    agree with float32 to 0.5 % and the gradients point the same way (cosine > 0.999)."""
    torch.manual_seed(6)
    K = 0 if method == "base" else 2
    V, D, N = 300, 32, 2000
    R = torch.nn.functional.layer_norm(torch.randn(V, K + 1, D), (D,))  # post-LN states, |r|^2 ~ D
    E = 0.3 * torch.randn(N + 1, D)
    target = torch.randint(1, N + 1, (V,))
    out = {}
    for dtype in ("float32", "bfloat16"):
        cfg = rearec.parse_args(["--method", method, "--dtype", dtype, "--tau", "0.5", "--kl-weight", "0.01"])
        Rg, Eg = R.clone().requires_grad_(), E.clone().requires_grad_()
        if method == "base":
            loss, _ = rearec.ce_loss(Rg[:, 0], target, Eg, cfg)
        elif method == "prl":
            loss, _ = rearec.prl_loss(Rg, None, target, Eg, cfg, use_cl=False)
        else:
            loss, _ = rearec.erl_loss(Rg, target, Eg, cfg)
        loss.backward()
        out[dtype] = loss.item(), Rg.grad.flatten(), Eg.grad.flatten()
    (l32, r32, e32), (l16, r16, e16) = out["float32"], out["bfloat16"]
    assert l16 == pytest.approx(l32, rel=5e-3)
    assert F.cosine_similarity(r16, r32, 0) > 0.999 and F.cosine_similarity(e16, e32, 0) > 0.999


@pytest.mark.parametrize("method", ["base", "rpe", "erl", "prl"])
def test_chunked_losses_equal_the_whole_batch(method):
    """--loss-chunk computes the output-layer losses a few cases at a time (memory); the loss,
    every logged term and every gradient must equal the one-piece computation."""
    model = tiny_rearec(method, 0 if method == "base" else 2, warmup=0)
    x, y = tiny_batch()
    results = []
    for chunk in (0, 9):  # 13 cases in pieces of 9 logit rows: 9 + 4 cases (1 row each), 3+3+3+3+1 (erl, prl: 3)
        model.cfg.loss_chunk = chunk
        model.zero_grad()
        torch.manual_seed(5)  # PRL's contrastive position and noise: the same draws both times
        loss, terms, n = rearec.compute_loss(model, x, y, model.cfg, use_cl=True)
        loss.backward()
        results.append((loss.detach(), {k: float(v) for k, v in terms.items()},
                        [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (l0, t0, g0), (l1, t1, g1) = results
    assert n == 13 and len(g0) == len(g1) > 0
    torch.testing.assert_close(l1, l0, atol=1e-5, rtol=1e-5)
    assert t0.keys() == t1.keys() and all(t1[k] == pytest.approx(t0[k], abs=1e-5) for k in t0)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["base", "naive", "rpe", "erl", "prl"])
@pytest.mark.parametrize("backbone", ["sasrec", "bert4rec"])
def test_every_method_trains_and_infers_for_K_0_to_5(method, backbone):
    """The official code crashes or returns NaN for several (method, K); here every one gives a
    finite loss, finite gradients and (K+1) states (base always has K = 0)."""
    x, y = tiny_batch()
    for K in range(6):
        model = tiny_rearec(method, K, backbone, warmup=0).train()
        loss, terms, _ = rearec.compute_loss(model, x, y, model.cfg, use_cl=True)
        loss.backward()
        assert torch.isfinite(loss) and all(torch.isfinite(torch.as_tensor(v)) for v in terms.values())
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        with torch.no_grad():
            R = model.eval()(x)
        assert R.shape == (2, model.cfg.steps + 1, 16) and torch.isfinite(R).all()
        assert model.cfg.steps == (0 if method == "base" else K)
        if method == "prl" and K > 0:
            assert "cl" in terms  # warm-up 0: the contrastive term is on from epoch 1


def test_prl_warmup_rule_in_epochs_and_in_steps():
    """Official: the contrastive term starts after --warmup epochs (epochs count from 1). With
    --warmup-steps N it starts at the (N+1)-th optimiser step, whatever the epoch."""
    epochs = tiny_rearec("prl", 2, warmup=2).cfg
    assert [rearec.contrastive_on(epochs, e, step=10**6) for e in (1, 2, 3)] == [False, False, True]
    steps = tiny_rearec("prl", 2, warmup=2, warmup_steps=5).cfg
    assert [rearec.contrastive_on(steps, 1, s) for s in (0, 4, 5, 6)] == [False, False, True, True]
    assert rearec.contrastive_on(steps, 9, 4) is False  # the epoch no longer counts
    for other in (tiny_rearec("rpe", 2).cfg, tiny_rearec("prl", 0).cfg, tiny_rearec("prl", 2, cl_weight=0).cfg):
        assert not rearec.contrastive_on(other, 9, 10**6)
    model = tiny_rearec("prl", 2).train()
    x, y = tiny_batch()
    _, off, n = rearec.compute_loss(model, x, y, model.cfg, use_cl=False)
    _, on, _ = rearec.compute_loss(model, x, y, model.cfg, use_cl=True)
    assert "cl" not in off and "cl" in on and n == 13  # every non-padded position is a case


def test_training_switches_the_contrastive_term_on_at_the_step(tmp_path, capsys):
    """A real run: 200 users, batch 32 = 7 steps per epoch; --warmup-steps 10 switches the term on
    at the 11th step (epoch 2, batch 4), and the log says so; epoch 1 has no `cl` term."""
    res = rearec.main(["--dataset", synthetic_file(tmp_path, 200), "--method", "prl", "--epochs", "2",
                       "--warmup-steps", "10", "--hidden", "16", "--batch-size", "32", "--max-len", "20",
                       "--out", str(tmp_path / "run")])
    assert "contrastive term on from optimiser step 11 (epoch 2, batch 4)" in capsys.readouterr().out
    assert "cl" not in res["history"][0] and res["history"][1]["cl"] > 0
    rearec.main(["--dataset", synthetic_file(tmp_path, 200), "--method", "prl", "--epochs", "2", "--warmup", "1",
                 "--hidden", "16", "--batch-size", "32", "--max-len", "20", "--out", str(tmp_path / "epochs")])
    assert "contrastive term on from optimiser step 8 (epoch 2, batch 1)" in capsys.readouterr().out  # --warmup epochs


def test_per_step_and_oracle_metrics_by_hand(tmp_path):
    # two test cases (targets 1 and 2) whose states we set by hand; item embeddings = one-hot
    ds = data.load_dataset(write(tmp_path / "s.txt", "1 3\n1 4\n1 4\n1 1\n2 4\n2 3\n2 3\n2 2\n"), verbose=False)
    model = tiny_rearec("rpe", 1, n_items=4)
    model.cfg.hidden = 4
    model.item_emb = torch.nn.Embedding(5, 4)
    model.item_emb.weight.data = torch.cat([torch.zeros(1, 4), torch.eye(4)])
    R = torch.tensor([[[4., 3, 2, 1], [1, 2, 3, 4]],  # case 1 (target 1): step0 rank 1, step1 rank 4
                      [[4., 3, 2, 1], [3, 4, 1, 2]]])  # case 2 (target 2): step0 rank 2, step1 rank 1
    model.forward = lambda hist: R[: len(hist)]
    model.cfg.mask_history = False
    res = rearec.evaluate(model, ds.test, model.cfg, "cpu", analysis=True)
    d = lambda r: 1 / math.log2(r + 1)
    assert res["step0"]["ndcg@5"] == pytest.approx((d(1) + d(2)) / 2)
    assert res["step1"]["ndcg@5"] == pytest.approx((d(4) + d(1)) / 2)
    assert res["main"] == res["step1"]  # rpe recommends with r_K
    assert res["oracle"]["ndcg@5"] == pytest.approx(1.0) and res["oracle"]["mrr"] == pytest.approx(1.0)
    # ERL recommends with the mean state: [2.5, 2.5, 2.5, 2.5] (a 4-way tie: expected MRR over
    # ranks 1..4) and [3.5, 3.5, 1.5, 1.5] (target tied at the top: rank 1 or 2)
    model.cfg.method = "erl"
    res = rearec.evaluate(model, ds.test, model.cfg, "cpu", analysis=True)
    assert res["main"]["mrr"] == pytest.approx(((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4 + (1 + 1 / 2) / 2) / 2)


def hand_views(top_sets, peaks, **kw):
    """States whose step k ranks exactly the items top_sets[b][k] first (30 items, one-hot item
    embeddings, so a state IS its logits); peaks[b][k] scales the logits (a peaked step = a
    low-entropy one). Returns step_views of the rpe model (tau = 1)."""
    model = tiny_rearec("rpe", len(top_sets[0]) - 1, n_items=30, tau=1.0, **kw)
    model.item_emb = torch.nn.Embedding(31, 30)
    model.item_emb.weight.data = torch.cat([torch.zeros(1, 30), torch.eye(30)])
    R = torch.zeros(len(top_sets), len(top_sets[0]), 30)
    for b, steps in enumerate(top_sets):
        for k, items in enumerate(steps):
            R[b, k, torch.tensor(items) - 1] = peaks[b][k] * torch.linspace(1.0, 0.5, len(items))
    return rearec.step_views(model, R, model.cfg), R


def test_label_free_selectors_on_hand_made_states():
    a, b, c = list(range(1, 11)), list(range(5, 15)), list(range(2, 12))  # |a & b| = 6, |a & c| = 9
    d = list(range(21, 31))
    top_sets = [[a, a, d],   # case 0: step 1 repeats step 0's list -> both rules halt at step 1
                [a, b, b],   # case 1: 6/10 shared: halt0.5 stops at 1; halt0.8 at step 2 (b = b)
                [a, d, c]]   # case 2: never stable -> both think to the last step
    peaks = [[1, 1, 8], [1, 8, 1], [8, 1, 1]]  # the peaked (lowest-entropy) step per case
    views, R = hand_views(top_sets, peaks)
    assert views["halt0.5"][1]["steps"].tolist() == [1, 1, 2]
    assert views["halt0.8"][1]["steps"].tolist() == [1, 2, 2]
    assert views["entropy"][1]["step"].tolist() == [2, 1, 0]
    for b, k in enumerate([2, 1, 0]):  # the chosen step's own scores rank the items
        assert torch.equal(views["entropy"][0][b], views[f"step{k}"][b])
    # mean: the average of the steps' log-probabilities, PAD column 0
    logp = torch.log_softmax(R, dim=-1)
    torch.testing.assert_close(views["mean"][:, 1:], logp.mean(1))
    assert views["main"].shape == (3, 31) and torch.equal(views["main"], views["step2"])  # rpe: r_K


def test_selector_cases_rank_as_the_evaluation_does(tmp_path):
    """The validation ranks the selector is fitted on are the evaluation's: each step's mean 1/rank
    equals that step's MRR from data.evaluate (history masked), and differs without the masking."""
    ds = data.load_dataset(synthetic_file(tmp_path, 150), verbose=False)
    model = tiny_rearec("prl", 2, n_items=ds.n_items, max_len=20)
    f = rearec.selector_cases(model, ds, model.cfg, "cpu")
    res = rearec.evaluate(model, ds.valid, model.cfg, "cpu", analysis=True)
    for k in range(3):
        assert (1.0 / f["rank"][:, k].double()).mean().item() == pytest.approx(res[f"step{k}"]["mrr"], rel=1e-6)
    model.cfg.mask_history = False
    unmasked = rearec.selector_cases(model.eval(), ds, model.cfg, "cpu")  # evaluate() left it in train mode
    assert (unmasked["rank"] >= f["rank"]).all() and (unmasked["rank"] > f["rank"]).any()


def test_learned_selector_learns_a_planted_rule():
    """Cases with short histories are ranked best by step 0, long ones by step 2 (ranks 1 vs 50);
    nothing else tells them apart. The fitted head must pick the right step for nearly all."""
    g = torch.Generator().manual_seed(0)
    c, K, D = 400, 2, 8
    lengths = torch.randint(1, 50, (c,), generator=g)
    long = lengths > 25
    rank = torch.full((c, K + 1), 50)
    rank[~long, 0], rank[long, 2] = 1, 1
    entropy = torch.full((c, K + 1), 3.0) + 0.01 * torch.randn(c, K + 1, generator=g)
    f = {"R": torch.randn(c, K + 1, D, generator=g), "entropy": entropy, "top1": -entropy, "rank": rank,
         "case": rearec.case_features(lengths, torch.full((c, K), 0.5), entropy)}
    sel = rearec.train_selector(f, K, steps=300)
    with torch.no_grad():
        pick = sel(f["R"], f["entropy"], f["top1"], f["case"]).argmax(1)
    assert (pick == torch.where(long, 2, 0)).float().mean() > 0.95


def test_cross_fitted_selector_scores_each_case_with_the_other_folds_head():
    """Validation is scored out of sample: changing the ranks (labels) of fold-0 cases leaves the
    held-out weights of fold-0 cases as they were, and changes the full head's and fold 1's."""
    g = torch.Generator().manual_seed(1)
    c, K, D = 300, 2, 8
    f = {"R": torch.randn(c, K + 1, D, generator=g), "entropy": 3 + torch.rand(c, K + 1, generator=g),
         "rank": torch.randint(1, 100, (c, K + 1), generator=g),
         "case": torch.randn(c, 4, generator=g), "fold": torch.randint(0, 2, (c,), generator=g)}
    f["top1"] = -f["entropy"]

    def weights(f):
        sel = rearec.cross_fit_selector(f, K, steps=100)
        args = (f["R"], f["entropy"], f["top1"], f["case"], f["fold"])
        with torch.no_grad():
            full = sel(*args)
            sel.held_out = True
            return full, sel(*args)

    full0, out0 = weights(f)
    changed = dict(f, rank=torch.where((f["fold"] == 0)[:, None], f["rank"].flip(1), f["rank"]))
    full1, out1 = weights(changed)
    zero = f["fold"] == 0
    assert torch.equal(out0[zero], out1[zero])  # fold 0's head never saw fold 0's labels
    assert not torch.allclose(out0[~zero], out1[~zero]) and not torch.allclose(full0, full1)
    hist = torch.tensor([[0, 0, 3, 4], [0, 5, 6, 9]])  # the fold ignores padding columns
    assert rearec.case_fold(hist).tolist() == [1, 0] and torch.equal(rearec.case_fold(hist[:, 1:]), rearec.case_fold(hist))


def test_paired_standard_error_of_a_view_difference():
    """data.evaluate(paired_to="main"): each view's SE of the mean per-case NDCG@10 difference
    against main, against numpy on the per-case values (rank_metrics); main's own SE is 0."""
    g = torch.Generator().manual_seed(0)
    ds = data.load_dataset("synthetic", verbose=False)
    split = ds.test
    n = len(split)
    scores = {v: torch.randn(n, ds.n_items + 1, generator=g) for v in ("main", "other")}
    out = data.evaluate(lambda h: {v: s[:len(h)] for v, s in scores.items()}, split, 20, batch_size=n,
                        mask_history=False, paired_to="main")
    target = torch.from_numpy(split.targets)
    per = {v: data.rank_metrics(s, target)["ndcg@10"].numpy() for v, s in scores.items()}
    d = per["other"] - per["main"]
    assert out["other"]["se_diff_ndcg@10"] == pytest.approx(d.std() / math.sqrt(n), rel=1e-9)
    assert out["other"]["ndcg@10"] - out["main"]["ndcg@10"] == pytest.approx(d.mean())
    assert out["main"]["se_diff_ndcg@10"] == 0.0 and d.std() > 0


def test_target_ranks_and_prefix_items_by_hand():
    logp = torch.log_softmax(torch.tensor([[[5.0, 4, 3, 2, 1]], [[1.0, 2, 3, 4, 5]]]), -1)  # (2, 1, 5) items 1..5
    t = torch.tensor([3, 2])
    assert rearec.target_ranks(logp, t).tolist() == [[3], [4]]
    exclude = torch.tensor([[1, 3, 0], [5, 2, 4]])  # the history; PAD ignored; the target stays in
    assert rearec.target_ranks(logp, t, exclude).tolist() == [[2], [2]]
    inputs = torch.tensor([[0, 5, 6, 7]])
    assert rearec.prefix_items(inputs, torch.tensor([[1, 3]])).tolist() == [[[0, 5, 0, 0], [0, 5, 6, 7]]]


def test_run_scores_validation_out_of_fold_and_test_with_the_full_head(tmp_path, monkeypatch):
    calls, real = [], rearec.evaluate
    def spy(model, split, cfg, device, analysis=False, selector=None, groups=None, held_out=False):
        if analysis:
            calls.append((groups is not None, held_out, type(selector).__name__))
        return real(model, split, cfg, device, analysis, selector, groups, held_out)
    monkeypatch.setattr(rearec, "evaluate", spy)
    rearec.main(["--dataset", synthetic_file(tmp_path, 150), "--method", "erl", "--hidden", "16", "--epochs", "1",
                 "--max-len", "20", "--out", str(tmp_path / "run")])
    assert calls == [(False, True, "CrossFitSelector"), (True, False, "CrossFitSelector")]  # valid, then test


def test_selector_train_positions_rank_without_their_history(tmp_path):
    """--selector-fit train ranks each position's target as the evaluation would (target_ranks
    with prefix_items, tested by hand above): no rank grows and some shrink."""
    ds = data.load_dataset(synthetic_file(tmp_path, 150), verbose=False)
    model = tiny_rearec("erl", 2, n_items=ds.n_items, max_len=20, selector_fit="train").eval()
    masked = rearec.selector_cases(model, ds, model.cfg, "cpu", cases=400)
    model.cfg.mask_history = False
    unmasked = rearec.selector_cases(model, ds, model.cfg, "cpu", cases=400)
    assert torch.equal(masked["R"], unmasked["R"])  # the same positions
    assert (masked["rank"] <= unmasked["rank"]).all() and (masked["rank"] < unmasked["rank"]).any()


@pytest.mark.parametrize("fit", ["valid", "train"])
def test_learned_selector_never_sees_the_test_label(tmp_path, monkeypatch, fit):
    """The learned selector is fitted on validation (or training) cases and chooses from the states
    alone: shuffling the test targets (and, fitted on training cases, the validation targets too)
    changes neither its weights nor its choices; shuffling what it is fitted on does change them."""
    ds = data.load_dataset(synthetic_file(tmp_path, 150), verbose=False)
    model = tiny_rearec("prl", 2, n_items=ds.n_items, max_len=20, selector_fit=fit)
    seen = []
    real_views = rearec.step_views
    monkeypatch.setattr(rearec, "step_views", lambda *a, **k: seen.append(v := real_views(*a, **k)) or v)

    def fit_and_choose():
        torch.manual_seed(0)
        sel = rearec.fit_selector(model, ds, model.cfg, "cpu", cases=500, steps=50)
        seen.clear()
        res = rearec.evaluate(model, ds.test, model.cfg, "cpu", analysis=True, selector=sel)
        return [p.detach().clone() for p in sel.parameters()], torch.cat([v["learned"][1]["step"] for v in seen]), res

    p0, choice0, res0 = fit_and_choose()
    rng = np.random.default_rng(0)
    ds.test.targets = rng.permutation(ds.test.targets)
    if fit == "train":
        ds.valid.targets = rng.permutation(ds.valid.targets)
    p1, choice1, res1 = fit_and_choose()
    assert all(torch.equal(x, y) for x, y in zip(p0, p1)) and torch.equal(choice0, choice1)
    assert res0["learned"]["ndcg@10"] != res1["learned"]["ndcg@10"]  # the metrics do see the labels
    if fit == "valid":  # what it is fitted on matters
        ds.valid.targets = rng.permutation(ds.valid.targets)
        p2, _, _ = fit_and_choose()
        assert not all(torch.equal(x, y) for x, y in zip(p0, p2))
    assert sum(p.numel() for p in rearec.StepSelector(64, 2).parameters()) == 82  # "a tiny head"


def synthetic_file(tmp_path, n_users=400):
    cols, _ = data.make_synthetic(n_users=n_users, seed=3)
    return write(tmp_path / "syn.txt", "".join(f"{u} {i}\n" for u, i in zip(cols["user"], cols["item"])))


@pytest.mark.parametrize("method", ["base", "naive", "rpe", "erl", "prl"])
def test_each_method_learns_the_synthetic_data(tmp_path, method):
    res = rearec.main(["--dataset", synthetic_file(tmp_path, 600), "--method", method, "--epochs", "3",
                       "--warmup", "1", "--hidden", "32", "--batch-size", "32", "--lr", "3e-3",
                       "--out", str(tmp_path / "run")])
    ds = data.load_dataset(synthetic_file(tmp_path, 600), verbose=False)
    pop = torch.from_numpy(np.bincount(ds.train.items, minlength=ds.n_items + 1)).double()
    popularity = data.evaluate(lambda h: pop.expand(len(h), -1), ds.test, 50)
    assert res["test"]["ndcg@10"] > 2.5 * popularity["ndcg@10"], (res["test"], popularity)


def test_cli_results_json_seed_and_resume(tmp_path):
    path = synthetic_file(tmp_path, 200)
    common = ["--dataset", path, "--method", "prl", "--hidden", "16", "--warmup", "0", "--batch-size", "64", "--max-len", "20",
              "--select-step", "own"]  # the paper's rule (r_K); --select-step auto is checked at the end
    a = rearec.main(common + ["--epochs", "2", "--out", str(tmp_path / "a")])
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    for key in ("config", "dataset", "valid", "test", "per_step", "oracle", "epochs", "train_seconds", "eval_seconds"):
        assert key in saved
    assert set(saved["per_step"]) == {"step0", "step1", "step2"} and saved["epochs"] == 2
    for k in ("ndcg@10", "recall@10", "ndcg@20", "recall@20", "mrr"):
        assert 0 <= saved["test"][k] <= 1
    assert saved["oracle"]["ndcg@10"] >= max(m["ndcg@10"] for m in saved["per_step"].values())
    # step selectors (the best chosen on validation), with the share of the gap to the oracle they close
    assert set(saved["selectors"]) == {"entropy", "mean", "halt0.5", "halt0.8", "learned", "learned-mix"}
    best = saved["selector"]["name"]
    assert saved["selectors"][best]["valid"]["ndcg@20"] == max(s["valid"]["ndcg@20"] for s in saved["selectors"].values())
    own, orc, sel = saved["test"]["ndcg@10"], saved["oracle"]["ndcg@10"], saved["selector"]["test"]["ndcg@10"]
    assert saved["selector"]["gap_closed"] == pytest.approx((sel - own) / (orc - own))
    assert set(saved["groups"]) == {"length", "popularity"} and len(saved["groups"]["length"]["views"]["oracle"]) == 4
    assert saved["recommend_view"] == "main"
    b = rearec.main(common + ["--epochs", "2", "--out", str(tmp_path / "b")])
    assert a["test"] == b["test"] and a["history"][-1]["loss"] == b["history"][-1]["loss"]
    # one epoch, then --resume to two: the same numbers as two epochs straight
    rearec.main(common + ["--epochs", "1", "--out", str(tmp_path / "c")])
    c = rearec.main(common + ["--epochs", "2", "--out", str(tmp_path / "c"), "--resume"])
    assert c["test"] == a["test"]
    with pytest.raises(SystemExit, match="other settings"):
        rearec.main(common + ["--epochs", "3", "--out", str(tmp_path / "c"), "--resume", "--lr", "0.01"])
    with pytest.raises(SystemExit, match="other settings"):  # a setting PRL reads
        rearec.main(common + ["--epochs", "3", "--out", str(tmp_path / "c"), "--resume", "--alpha", "3"])
    rearec.main(common + ["--epochs", "2", "--out", str(tmp_path / "c"), "--resume", "--kl-weight", "0.02"])  # one it ignores
    # --select-step auto: the recommending view is the best on validation (the oracle excluded)
    d = rearec.main(common + ["--epochs", "2", "--out", str(tmp_path / "c"), "--resume", "--select-step", "auto"])
    saved = json.loads((tmp_path / "c" / "results.json").read_text())
    views = {"main": saved["valid"]} | saved["valid_per_step"] | {k: s["valid"] for k, s in saved["selectors"].items()}
    assert saved["valid"]["ndcg@20"] == max(v["ndcg@20"] for v in views.values()) and d["recommend_view"] != "oracle"
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize("args, message", [
    (["--method", "cot"], "--method must be auto or one of"),
    (["--epoch-view", "oracle"], "--epoch-view must be own or steps"),
    (["--steps", "-1"], "--steps must be >= 0"),
    (["--hidden", "30", "--heads", "4"], "multiple of --heads"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
    (["--dataset", "ml-1x"], "unknown dataset"),
    (["--select-metric", "auc"], "--select-metric"),
    (["--select-step", "best"], "--select-step must be"),
    (["--resume", "--out", "/nonexistent-dir-for-test"], "no checkpoint"),
    # values that used to pass the checks and then crash, or train nothing and exit 0
    (["--heads", "0"], "--heads must be >= 1"),
    (["--seed", "-1"], "--seed must be in 0..2^32-1"),
    (["--weight-decay", "-1"], "--weight-decay and --grad-clip must be >= 0"),
    (["--eval-batch-size", "0"], "--eval-batch-size must be >= 1"),
    (["--eval-batch-size", "-1"], "--eval-batch-size must be >= 1"),
    (["--max-len", "1000000000"], "--max-len must be 0 (auto) to 10000"),
    (["--patience", "0"], "--patience must be >= 1"),
    (["--bucket", "-1"], "--bucket must be >= 0"),
    (["--kcore", "-1"], "--kcore must be >= 0"),
    (["--kl-weight", "1e30"], "--kl-weight must be <= 1"),
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--noise", "nan"], "--noise must be a finite number"),
    (["--cl-tau", "-1"], "--cl-tau must be >= 0"),
    (["--cl-anchors", "0"], "--cl-anchors must be >= 1"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--warmup-steps", "-2"], "--warmup-steps >= -1"),
    (["--dtype", "float16"], "--dtype must be float32 or bfloat16"),
    (["--norm", "sandwich"], "--norm must be post or pre"),
    (["--resume", "--overwrite"], "pass one of them"),
])
def test_rearec_bad_flags_give_one_clear_line(tmp_path, args, message):
    out = [] if "--out" in args else ["--out", str(tmp_path / "run")]  # never the working folder's runs/
    with pytest.raises(SystemExit) as e:
        rearec.main(args + out)
    assert str(e.value).startswith("error: ") and message in str(e.value) and "\n" not in str(e.value)


def tiny_rearec_args(tmp_path, out, *extra):
    return ["--dataset", synthetic_file(tmp_path, 200), "--hidden", "16", "--warmup", "0", "--batch-size", "64",
            "--max-len", "20", "--epochs", "1", "--out", str(tmp_path / out), *extra]


def one_line_error(e, *phrases):
    msg = str(e.value)
    return msg.startswith("error: ") and "\n" not in msg and all(p in msg for p in phrases)


def test_rearec_out_is_checked_before_any_work(tmp_path, monkeypatch):
    """A file, an unwritable path, a folder holding another run, a folder in use: one line each,
    before the data is even read."""
    monkeypatch.setattr(data, "load_dataset", lambda *a, **k: pytest.fail("read the data before checking --out"))
    (tmp_path / "f").write_text("x")
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "results.json").write_text("{}")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / ".lock").write_text(f"{os.getpid()} {socket.gethostname()}\n")  # a live process
    for out, phrases in [("f", ["is a file"]), ("f/sub", ["cannot create --out"]),
                         ("done", ["holds another run (results.json)", "--resume", "--overwrite", "new --out"]),
                         ("busy", [f"in use by another run (pid {os.getpid()})", "another --out"])]:
        with pytest.raises(SystemExit) as e:
            rearec.main(["--out", str(tmp_path / out)])
        assert one_line_error(e, *phrases), (out, str(e.value))
    assert (tmp_path / "busy" / ".lock").exists()  # another run's lock is never removed
    if os.geteuid() != 0:  # root writes into read-only folders
        (tmp_path / "ro").mkdir(mode=0o500)
        with pytest.raises(SystemExit) as e:
            rearec.main(["--out", str(tmp_path / "ro" / "run")])
        assert one_line_error(e, "cannot create --out")


def test_rearec_another_run_needs_resume_or_overwrite_and_stale_locks_go(tmp_path, capsys):
    first = rearec.main(tiny_rearec_args(tmp_path, "a"))
    with pytest.raises(SystemExit) as e:  # the same command again: refused, the run kept
        rearec.main(tiny_rearec_args(tmp_path, "a"))
    assert one_line_error(e, "holds another run", "--resume", "--overwrite")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "a" / ".lock").write_text(f"{dead.pid} {socket.gethostname()}\n")  # as after a SIGKILL
    again = rearec.main(tiny_rearec_args(tmp_path, "a", "--overwrite", "--seed", "1"))
    assert "removed the stale lock" in capsys.readouterr().out
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    assert saved["config"]["seed"] == 1 and again["test"] != first["test"]
    assert not (tmp_path / "a" / ".lock").exists() and not list(tmp_path.rglob("*.tmp"))


def interrupt_on_call(n, real):
    """A stand-in for `real` that raises KeyboardInterrupt (Ctrl-C) on its n-th call."""
    calls = []

    def fake(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    return fake


def test_rearec_ctrl_c_exits_130_tells_what_last_pt_holds_and_loses_nothing(tmp_path, monkeypatch, capsys):
    a = tmp_path / "a"
    rearec.main(tiny_rearec_args(tmp_path, "a"))  # a finished run
    before = {f: (a / f).read_bytes() for f in ("results.json", "last.pt", "best.pt")}
    # --overwrite, Ctrl-C in epoch 1: the finished run stays whole, and the message says so
    with monkeypatch.context() as m:
        m.setattr(rearec, "compute_loss", interrupt_on_call(1, rearec.compute_loss))
        with pytest.raises(SystemExit) as e:
            rearec.main(tiny_rearec_args(tmp_path, "a", "--overwrite", "--epochs", "4"))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 130 and len(err) == 1 and "before this run finished an epoch" in err[0]
    assert "last.pt is untouched: it still holds epoch 1 of the run that was in --out" in err[0]
    assert {f: (a / f).read_bytes() for f in before} == before and not (a / ".lock").exists()
    # Ctrl-C in epoch 2's validation: last.pt holds epoch 1, results.json says interrupted, and
    # --resume then gives exactly the uninterrupted run
    with monkeypatch.context() as m:
        m.setattr(rearec, "evaluate", interrupt_on_call(2, rearec.evaluate))
        with pytest.raises(SystemExit) as e:
            rearec.main(tiny_rearec_args(tmp_path, "b", "--epochs", "2"))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 130 and len(err) == 1 and "holds epoch 1" in err[0] and "--resume" in err[0]
    saved = json.loads((tmp_path / "b" / "results.json").read_text())
    assert saved["interrupted"] is True and saved["epochs"] == 1
    resumed = rearec.main(tiny_rearec_args(tmp_path, "b", "--epochs", "2", "--resume"))
    straight = rearec.main(tiny_rearec_args(tmp_path, "c", "--epochs", "2"))
    assert resumed["test"] == straight["test"] and resumed["interrupted"] is False
    with monkeypatch.context() as m:  # Ctrl-C while --resume reads last.pt: nothing written
        m.setattr(rearec, "load_checkpoint", interrupt_on_call(1, rearec.load_checkpoint))
        with pytest.raises(SystemExit) as e:
            rearec.main(tiny_rearec_args(tmp_path, "b", "--epochs", "3", "--resume"))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 130 and len(err) == 1 and "before this run wrote anything" in err[0], err
    # Ctrl-C while loading the data, and during the final evaluation
    for name, real, phrase in [("load_dataset", data.load_dataset, "before this run wrote anything"),
                               ("evaluate", rearec.evaluate, "during the final evaluation")]:
        with monkeypatch.context() as m:
            m.setattr(data if name == "load_dataset" else rearec, name,
                      interrupt_on_call(1 if name == "load_dataset" else 2, real))
            with pytest.raises(SystemExit) as e:
                rearec.main(tiny_rearec_args(tmp_path, "d" + name))
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 130 and len(err) == 1 and phrase in err[0], err
        assert not (tmp_path / ("d" + name) / "results.json").exists()
        assert not (tmp_path / ("d" + name) / ".lock").exists()


def test_rearec_corrupt_checkpoints_are_one_line(tmp_path):
    rearec.main(tiny_rearec_args(tmp_path, "a"))
    for name in ("last.pt", "best.pt"):
        path = tmp_path / "a" / name
        good = path.read_bytes()
        for bad in (os.urandom(3000), good[:3000]):  # random bytes, a truncated file
            path.write_bytes(bad)
            with pytest.raises(SystemExit) as e:
                rearec.main(tiny_rearec_args(tmp_path, "a", "--resume", "--epochs", "2"))
            assert one_line_error(e, f"{path} is corrupt or incomplete; delete it or use a new --out")
        path.write_bytes(good)


def test_bfloat16_on_a_cpu_without_native_bf16_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(rearec, "cpu_has_bf16", lambda: False)
    with pytest.raises(SystemExit) as e:
        rearec.main(["--dtype", "bfloat16", "--device", "cpu"])
    assert str(e.value).startswith("error: --dtype bfloat16 needs") and "--dtype float32" in str(e.value)


def test_benchmark_command_reports_every_row(tmp_path):
    """--benchmark: one epoch of base, rpe, erl, prl and evaluation for K = 0..3, in a JSON file."""
    out = tmp_path / "bench"
    rearec.main(["--dataset", synthetic_file(tmp_path, 100), "--benchmark", "--hidden", "16",
                 "--max-len", "10", "--out", str(out)])
    res = json.loads((out / "benchmark.json").read_text())
    assert [(r["method"], r["K"]) for r in res["train"]] == [("base", 0), ("rpe", 2), ("erl", 2), ("prl", 2)]
    assert [r["K"] for r in res["eval"]] == [0, 1, 2, 3]
    # 100 users with >= 2 training items each; positive times and a plausible resident size
    assert all(r["epoch_seconds"] > 0 and r["seqs_per_s"] * r["epoch_seconds"] == pytest.approx(100)
               for r in res["train"])
    assert all(0.05 < r["peak_rss_gb"] < 64 for r in res["train"] + res["eval"])


def test_oracle_over_runs_reads_each_run_as_its_own_evaluation(tmp_path):
    """--oracle-runs: each run's view scores as the run's own final test; a run paired with
    itself gives an ensemble and an oracle equal to it; two runs give an oracle >= each."""
    own = ["--select-step", "own"]  # --oracle-runs ranks with each run's own rule
    a = rearec.main(tiny_rearec_args(tmp_path, "a", "--method", "erl", "--steps", "2", *own))
    b = rearec.main(tiny_rearec_args(tmp_path, "b", "--seed", "1", "--max-len", "12", *own))
    syn = synthetic_file(tmp_path, 200)
    same = rearec.main(["--dataset", syn, "--oracle-runs", f"{tmp_path / 'a'},{tmp_path / 'a'}", "--out", str(tmp_path / "o1")])
    for view in ("run0", "run1", "ensemble", "oracle"):
        for m in ("ndcg@10", "recall@20", "mrr"):
            tol = 1e-5 if view == "ensemble" else 1e-9  # log_softmax rounds a few near-ties differently
            assert same["test"][view][m] == pytest.approx(a["test"][m], abs=tol), (view, m)
    two = rearec.main(["--dataset", syn, "--oracle-runs", f"{tmp_path / 'a'},{tmp_path / 'b'}", "--out", str(tmp_path / "o2")])
    assert two["test"]["run1"]["ndcg@10"] == pytest.approx(b["test"]["ndcg@10"], abs=1e-9)  # its own window, 12
    saved = json.loads((tmp_path / "o2" / "oracle_runs.json").read_text())["test"]
    assert {v: saved[v]["ndcg@10"] for v in saved} == pytest.approx({v: two["test"][v]["ndcg@10"] for v in two["test"]})
    for m in ("ndcg@10", "recall@10", "mrr"):
        assert two["test"]["oracle"][m] >= max(two["test"]["run0"][m], two["test"]["run1"][m])
        assert two["test"]["oracle"][m] > min(two["test"]["run0"][m], two["test"]["run1"][m])
    with pytest.raises(SystemExit) as e:
        rearec.main(["--dataset", syn, "--oracle-runs", str(tmp_path / "none"), "--out", str(tmp_path / "o3")])
    assert one_line_error(e, "--oracle-runs: no best.pt in", "finished runs")
    with pytest.raises(SystemExit) as e:
        rearec.main(["--dataset", synthetic_file(tmp_path, 100), "--oracle-runs", str(tmp_path / "a"), "--out", str(tmp_path / "o3")])
    assert one_line_error(e, "--oracle-runs:", "items", "pass the dataset those runs were trained on")


@pytest.mark.parametrize("method, fix", [("erl", "--kl-weight"), ("prl", "--lr")])
def test_divergence_is_a_clear_error(tmp_path, method, fix):
    # An absurd learning rate makes the weights overflow within two steps; the run must stop at
    # once with one line naming the fix (ERL is known to diverge through its KL term).
    with pytest.raises(SystemExit) as e:
        rearec.main(["--dataset", synthetic_file(tmp_path, 200), "--method", method, "--lr", "1e30",
                     "--epochs", "1", "--hidden", "16", "--max-len", "20", "--out", str(tmp_path / "r")])
    assert str(e.value).startswith("error: non-finite loss at epoch 1") and fix in str(e.value)
    assert "\n" not in str(e.value)



# =============================================================================
# stream_rec.py
# =============================================================================
import stream_rec as sr  # noqa: E402  (the section banner above keeps each file's tests together)


def tiny_model(sizes=(3, 2), trace_len=1, n_items=None, seed=0, d=16, features=0):
    """A StreamRec small enough to enumerate: level-0 codes x dedup digit, every tuple an item
    unless n_items is smaller. Random (non-identity) MLP_r / MLP_s so the loop is non-trivial.
    features > 0: random item vectors of that size and a target projection (--target-repr feature)."""
    torch.manual_seed(seed)
    grid = torch.cartesian_prod(*[torch.arange(k) for k in sizes]).view(-1, len(sizes))
    grid = grid[:n_items] if n_items else grid
    codes = torch.cat([torch.zeros(1, len(sizes), dtype=torch.long), grid])  # row 0 = PAD
    vectors = torch.randn(len(codes), features) if features else None
    model = sr.StreamRec(codes, list(sizes), trace_len, max_len=3, d_model=d, n_heads=2, d_ff=32,
                         enc_layers=1, dec_layers=1, dropout=0.0, tau=1.0, constrain_levels=True,
                         vectors=vectors)
    for mlp in (model.mlp_r, model.mlp_s):
        torch.nn.init.normal_(mlp.net[2].weight, std=0.3)
    return model.eval()


def tiny_args(out, *extra):
    return ["--dataset", str(out.parent / "tiny.txt"), "--out", str(out), "--d-model", "16",
            "--n-heads", "2", "--d-ff", "32", "--enc-layers", "1", "--dec-layers", "1",
            "--max-len", "5", "--trace-len", "2", "--epochs", "1", "--max-examples", "256",
            "--batch-size", "128", "--rl-epochs", "1", "--rl-max-examples", "32", "--rl-batch", "16",
            "--group-size", "4", "--rank-negs", "3", "--beam-valid", "5", "--beam-test", "5",
            "--eval-batch", "256", "--kmeans-iters", "5", "--threads", "1", "--no-estimate", *extra]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """All four stages on a 120-user synthetic file (no titles, so co-occurrence features)."""
    root = tmp_path_factory.mktemp("stream")
    cols, _ = data.make_synthetic(n_users=120, n_topics=4, items_per_topic=6, seed=3)
    (root / "tiny.txt").write_text("".join(f"{u} {i}\n" for u, i in zip(cols["user"], cols["item"])))
    res = sr.main(tiny_args(root / "a"))
    return root, res


def strip_times(res):
    """A results dict without the wall-clock fields (they differ between identical runs)."""
    if isinstance(res, dict):
        return {k: strip_times(v) for k, v in res.items()
                if k not in ("wall_s", "s", "examples_per_s", "train_examples_per_s", "build_s", "out")}
    if isinstance(res, list):
        return [strip_times(v) for v in res]
    return res


# --- Semantic IDs --------------------------------------------------------------------------------
def test_semantic_ids_unique_deterministic_and_invertible():
    ds = data.load_dataset("synthetic", verbose=False)
    for features in ("text", "cooc"):
        cfg = sr.Config(features=features)
        a, b = sr.build_semantic_ids(cfg, ds), sr.build_semantic_ids(cfg, ds)
        assert torch.equal(a["codes"], b["codes"]) and a["sizes"] == b["sizes"]
        codes = a["codes"][1:]
        assert len(torch.unique(codes, dim=0)) == ds.n_items  # every item its own SID
        assert a["sizes"][:3] == [15, 15, 15]  # ceil((8 * 400) ** (1/3)) = 15 codes per level
        assert a["sizes"][3] == int(codes[:, 3].max()) + 1  # dedup digit range = largest collision
        assert a["report"]["items_with_dedup_digit"] == int((codes[:, 3] > 0).sum())
        model = sr.new_model(cfg, a, 2, "cpu")
        assert torch.equal(model.tokens_to_items(model.item_tokens[1:]), torch.arange(1, ds.n_items + 1))
    # text features put the two items of one topic ("... jazz 0", "... jazz 1") on one level-0 code
    text = sr.build_semantic_ids(sr.Config(features="text"), ds)["codes"]
    topic = torch.tensor([t.split()[1] == "jazz" for t in ds.item_text[1:]])
    assert len(text[1:][topic, 0].unique()) == 1
    assert sr.build_semantic_ids(sr.Config(levels=2), ds)["sizes"][:2] == [57, 57]  # ceil(56.6)


def test_tokens_to_items_rejects_wrong_levels_and_unknown_tuples():
    model = tiny_model(sizes=(3, 2), n_items=5)  # tuple (2, 1) is not an item
    sid = model.item_tokens[1:]
    assert model.tokens_to_items(sid).tolist() == [1, 2, 3, 4, 5]
    off = model.offsets
    bad = torch.stack([off + torch.tensor([2, 1]),  # a code tuple no item has
                       torch.stack([off[1], off[1]]),  # a dedup token at the level-0 position
                       torch.tensor([sr.EOS, off[1]])])
    assert model.tokens_to_items(bad).tolist() == [0, 0, 0]


# --- Model, stage 1 and the stage-2 annotation loop ----------------------------------------------
def test_encoder_reads_a_window_without_its_padding_columns_as_the_full_one():
    # Histories are left-padded and positions count from the newest token, so a batch of short
    # histories may drop its all-PAD columns (data.cut_padding); its rows must decode exactly as
    # they do beside a full row (where nothing can be cut).
    model = tiny_model(sizes=(3, 2), trace_len=1)  # max_len 3, M = 2 tokens per item
    full = np.array([[0, 0, 2], [0, 1, 3]])  # (2, 3): column 0 is padding in both rows
    short = torch.from_numpy(data.cut_padding(full))
    both = torch.from_numpy(np.concatenate([full, [[4, 5, 6]]]))  # (3, 3): no column to cut
    assert short.tolist() == [[0, 2], [1, 3]] and data.cut_padding(both.numpy()).shape == (3, 3)
    mem_s, mem_b = model.encode(short), model.encode(both)
    assert mem_s["mask"].shape[-1] == 2 * 2 and mem_b["mask"].shape[-1] == 3 * 2  # 2 items kept
    tokens = torch.tensor([sr.BOS, sr.FIRST_CODE + 1, sr.FIRST_CODE + 3])
    d_s, _ = model.decode(mem_s, tokens.expand(2, 1, 3))
    d_b, _ = model.decode(mem_b, tokens.expand(3, 1, 3))
    assert torch.allclose(d_s, d_b[:2], atol=1e-6)
    # a left-aligned position table (the mistake) would shift the short rows' positions
    assert not torch.allclose(model.enc_pos.weight[:4], model.enc_pos.weight[-4:])


def test_evaluation_in_length_order_gives_the_same_metrics(monkeypatch):
    # evaluate_split batches cases of similar history length (data.evaluate trim=True); every
    # case's beams depend on its history only, so the metrics equal the unsorted, padded pass.
    model = tiny_model(sizes=(3, 2), trace_len=1)
    ds = tiny_dataset([[1, 2, 3, 4, 5], [2, 3, 1], [4, 5, 6, 1], [1, 3, 5], [6, 5, 4, 3, 2, 1],
                       [2, 4, 6], [3, 1, 2, 6], [5, 6, 2]])
    cfg = sr.Config(max_len=3, eval_batch=3, skip_history="on")
    trimmed = sr.evaluate_split(cfg, model, ds.valid, 4, "cpu")
    plain_eval, widths = data.evaluate, []
    monkeypatch.setattr(sr.data, "evaluate", lambda fn, *a, **k: plain_eval(
        lambda h: widths.append(h.shape[1]) or fn(h), *a, **(k | {"trim": False})))
    plain = sr.evaluate_split(cfg, model, ds.valid, 4, "cpu")
    assert widths == [3] * len(widths)  # the padded pass really saw full windows
    assert trimmed.keys() == plain.keys()
    assert all(trimmed[m] == pytest.approx(plain[m], abs=1e-12) for m in plain)


def test_kv_cache_decoding_equals_teacher_forcing():
    model = tiny_model(trace_len=2)
    hist = torch.tensor([[0, 1, 4], [2, 5, 6]])
    memory = model.encode(hist)
    y = torch.tensor([[[3, 7, 4, 6, sr.EOS]], [[5, 5, 3, 7, sr.EOS]]])  # (B, 1, T); V = 8
    lp, d = sr.teacher_forced(model, memory, y)
    inp, cache, steps = torch.full((2, 1, 1), sr.BOS), None, []
    for p in range(model.T):
        dp, cache = model.decode(memory, inp, p, cache)
        steps.append(dp)
        inp = y[:, :, p:p + 1]
    assert torch.allclose(torch.cat(steps, 2), d, atol=1e-5)


def test_stage1_neighbours_far_to_near():
    v = torch.nn.functional.normalize(torch.tensor(
        [[0.0, 0.0], [1.0, 0.0], [0.9, 0.1], [0.5, 0.5], [0.0, 1.0]]), dim=1)
    v[0] = 0
    near = sr.neighbours(v, 2, chunk=2)
    assert near[1].tolist() == [3, 2]  # item 1: 2 is nearest, so it comes last (next to the target)
    assert near[4].tolist() == [2, 3] and 0 not in near[1:].flatten().tolist()


def test_annotation_loop_matches_slow_restatement_of_spec_4_1():
    model = tiny_model(sizes=(4, 3), trace_len=3, seed=1)
    hist = torch.tensor([[1, 2, 3], [0, 5, 7], [9, 4, 2]])
    target = torch.tensor([6, 11, 1])
    memory = model.encode(hist)
    o, s, r, d_loop = sr.stage2_annotate(model, memory, sr.target_repr(model, target))
    E = model.emb.weight.detach()
    for b in range(3):  # one case at a time, the decoder re-run from scratch at every step
        mem_b = {"kv": [(k[b:b + 1], v[b:b + 1]) for k, v in memory["kv"]], "mask": memory["mask"][b:b + 1]}
        t = sum(E[tok] for tok in model.item_tokens[target[b]].tolist())  # t = sum of SID embeddings
        seq, ds_ = [sr.BOS], []
        for i in range(model.l + 1):
            d_all, _ = model.decode(mem_b, torch.tensor(seq).view(1, 1, -1))
            ds_.append(d_all[0, 0, -1])  # d_i: state at the newest position
            assert torch.allclose(ds_[-1], d_loop[b, i], atol=1e-5)
            s_i = model.mlp_s(sum(ds_))  # s_i = MLP_s(sum_{j<=i} d_j)
            assert torch.allclose(s_i, s[b, i], atol=1e-5)
            if i == model.l:
                break
            r_next = model.mlp_r(t - s_i)  # r_{i+1} = MLP_r(t - s_i)
            assert torch.allclose(r_next, r[b, i], atol=1e-5)
            dist = {tok: float(((E[tok] - r_next.detach()) ** 2).sum()) for tok in range(sr.FIRST_CODE, len(E))}
            best = min(dist, key=dist.get)  # o = argmin_k ||c_k - r||
            assert int(o[b, i]) == best
            seq.append(best)
    # the teacher-forced pass used for the stage-2 losses reproduces the same s_i and r_i
    y = sr.output_seq(model, o[:, None], target[:, None])
    _, d = sr.teacher_forced(model, memory, y)
    s2, r2 = sr.annotation_states(model, d[:, 0, :model.l + 1], sr.target_repr(model, target))
    assert torch.allclose(s2, s, atol=1e-5) and torch.allclose(r2, r, atol=1e-5)


# --- Losses and the GRPO objective against hand-computed values ----------------------------------
def test_stage2_losses_hand_computed():
    tok_lp = torch.log(torch.tensor([[[0.5, 0.25, 1.0]]]))  # (B=1, W=1, T=3); the last is forced
    assert sr.ce_loss(tok_lp, torch.tensor([1.0, 1.0, 0.0])).item() == pytest.approx(
        (math.log(2) + math.log(4)) / 2)
    s = torch.tensor([[[2.0, 0.0]], [[0.0, 3.0]]])  # (B=2, l=1, D=2)
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    tau = 0.5  # cosines: own target 1, other target 0 -> -log(e^2 / (e^2 + e^0))
    assert sr.info_nce(s, t, torch.tensor([7, 8]), tau).item() == pytest.approx(
        -math.log(math.exp(2) / (math.exp(2) + 1)), rel=1e-5)
    assert sr.info_nce(s, t, torch.tensor([7, 7]), tau).item() == pytest.approx(0.0, abs=1e-6)
    r, c = torch.tensor([[[1.0, 2.0]]]), torch.tensor([[[0.0, 0.0]]])
    assert sr.quant_loss(r, c, 0.0).item() == pytest.approx(2.5)  # (1 + 4) / 2
    assert sr.quant_loss(r, c, 0.25).item() == pytest.approx(2.5 * 1.25)
    codes = torch.tensor([[0.0, 0.0], [10.0, 0.0]])  # usage: every residual on code 0 -> log 2
    assert sr.usage_loss(torch.zeros(3, 1, 2), codes).item() == pytest.approx(math.log(2), rel=1e-5)
    spread = torch.tensor([[[0.0, 0.0]], [[10.0, 0.0]]])  # one residual per code -> 0
    assert sr.usage_loss(spread, codes).item() == pytest.approx(0.0, abs=1e-6)
    loss, acc = sr.dpo_loss(torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0]),
                            torch.tensor([-1.5, -2.0]), torch.tensor([-1.5, -2.0]), 0.5)
    m = [0.5 * ((-1 + 1.5) - (-2 + 1.5)), 0.5 * ((-3 + 2) - (-1 + 2))]  # [0.5, -1.0]
    want = -sum(math.log(1 / (1 + math.exp(-x))) for x in m) / 2
    assert loss.item() == pytest.approx(want, rel=1e-6) and acc.item() == 0.5


def test_grpo_advantages_clipping_and_k3_kl_hand_computed():
    A = sr.group_advantages(torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]]))
    sd = math.sqrt(5 / 3)  # unbiased std of 1..4
    assert A[0].tolist() == pytest.approx([-1.5 / sd, -0.5 / sd, 0.5 / sd, 1.5 / sd], rel=1e-5)
    assert A[1].abs().max().item() == 0.0  # equal rewards: no signal, no NaN
    assert sr.kl_k3(torch.log(torch.tensor(0.5)), torch.log(torch.tensor(0.25))).item() == \
        pytest.approx(0.5 + math.log(2) - 1, rel=1e-6)
    # two rollouts of one token: rho = 1.5 with A = +1 (clipped to 1.2 -> -1.2), and
    # rho = 0.5 with A = -1 (clipped to 0.8 -> +0.8); the mean over tokens is (-1.2 + 0.8) / 2
    lp2 = torch.log(torch.tensor([[[0.3], [0.2]]])).requires_grad_()  # (B=1, G=2, T=1)
    old2 = torch.log(torch.tensor([[[0.2], [0.4]]]))
    loss2, st2 = sr.grpo_loss(lp2, old2, old2, torch.tensor([[[1.0], [-1.0]]]), 0.2, 0.0, torch.ones(1))
    assert loss2.item() == pytest.approx((-1.2 + 0.8) / 2, rel=1e-6)
    assert st2["clip_frac"] == 1.0
    loss2.backward()
    assert lp2.grad.abs().max().item() == 0.0  # both tokens clipped: no gradient
    beta = 0.1  # the KL term: lp = ref -> 0; lp != ref -> the k3 value
    loss3, st3 = sr.grpo_loss(old2, old2, torch.log(torch.tensor([[[0.1], [0.4]]])),
                              torch.zeros(1, 2, 1), 0.2, beta, torch.ones(1))
    k3 = 0.5 - math.log(0.5) - 1  # ref/pi = 0.5 on the first token
    assert loss3.item() == pytest.approx(beta * k3 / 2, rel=1e-5) and st3["kl"] == pytest.approx(k3 / 2, rel=1e-5)
    # a (B, G, T) weight (a trie-forced token marked 0): the mean runs over the marked tokens only
    lp4 = torch.log(torch.tensor([[[0.3, 0.9], [0.2, 1.0]]]))  # (1, 2, 2); the second token of rollout 2 forced
    old4 = torch.log(torch.tensor([[[0.2, 0.9], [0.4, 1.0]]]))
    w4 = torch.tensor([[[1.0, 1.0], [1.0, 0.0]]])
    loss4, _ = sr.grpo_loss(lp4, old4, old4, torch.tensor([[[1.0, 1.0], [-1.0, -1.0]]]), 0.2, 0.0, w4)
    assert loss4.item() == pytest.approx((-1.2 - 1.0 + 0.8) / 3, rel=1e-6)  # rho: 1.5 (clip), 1, 0.5 (clip)


def test_token_advantages_sequence_and_causal_credit_hand_computed():
    # one history, G = 2 rollouts, l = 2 trace tokens + M = 2 SID tokens + EOS (T = 5)
    # reward terms (format, match, sim, lik, rank), weights w = (1, 1, 0.5, 0.5, 1)
    rewards = torch.tensor([[[0.0, 1.0, 0.0, 0.0, 0.0],  # a hit after a poor trace
                             [0.0, 0.0, 1.0, 1.0, 1.0]]])  # a miss after a good trace
    w = torch.tensor([1.0, 1.0, 0.5, 0.5, 1.0])
    s = 1 / math.sqrt(2)  # group_advantages of two values: +-(half the gap) / (gap / sqrt 2)
    seq = sr.token_advantages(rewards, w, 2, 5, "sequence")  # R = (1, 2): -s, +s on every token
    assert seq.shape == (1, 2, 5)
    assert seq[0].flatten().tolist() == pytest.approx([-s] * 5 + [s] * 5, rel=1e-5)
    causal = sr.token_advantages(rewards, w, 2, 5, "causal")
    assert causal[0, :, :2].flatten().tolist() == pytest.approx([-s] * 2 + [s] * 2, rel=1e-5)  # trace: all terms
    assert causal[0, :, 2:].flatten().tolist() == pytest.approx([s] * 3 + [-s] * 3, rel=1e-5)  # SID, EOS: format + match
    # the trace-only terms (sim, lik, rank) never reach the SID tokens under causal credit
    other = rewards.clone()
    other[..., 2:] = torch.tensor([[[5.0, -3.0, 2.0], [0.0, 0.0, 0.0]]])
    assert torch.equal(sr.token_advantages(other, w, 2, 5, "causal")[..., 2:], causal[..., 2:])
    assert not torch.equal(sr.token_advantages(other, w, 2, 5, "causal")[..., :2], causal[..., :2])


def test_stage3_rewards_format_match_similarity():
    cfg = sr.Config(w_lik=0.0, w_rank=0.0)
    model = tiny_model(sizes=(3, 2), n_items=5, trace_len=1)  # item 6 would be (2, 1): absent
    hist = torch.tensor([[1, 2, 3]])
    target = torch.tensor([4])  # codes (1, 1)
    off = model.offsets
    sid = lambda a, b: [int(off[0]) + a, int(off[1]) + b]
    y = torch.tensor([[[4] + sid(1, 1) + [sr.EOS],  # exact hit
                       [4] + sid(1, 0) + [sr.EOS],  # first code right
                       [4] + sid(0, 1) + [sr.EOS],  # first code wrong: no credit for the second
                       [4] + sid(2, 1) + [sr.EOS]]])  # not an item
    memory = model.encode(hist)
    _, d = sr.teacher_forced(model, memory, y)
    t = sr.target_repr(model, target)
    r = sr.stage3_rewards(cfg, model, None, memory, hist, y, d, target, t)
    assert r[0, :, 0].tolist() == [0, 0, 0, -1]  # format
    assert r[0, :, 1].tolist() == [1.0, 0.5, 0.0, 0.0]  # exact-match prefix / M
    assert r[0, :, 2].abs().max() <= 1 and torch.allclose(r[0, 0, 2], r[0, 1, 2])  # same trace
    level = sr.stage3_rewards(sr.Config(w_lik=0.0, w_rank=0.0, match_reward="level"), model, None,
                              memory, hist, y, d, target, t)
    assert level[0, :, 1].tolist() == [1.0, 0.5, 0.5, 0.5]  # codes right at any level / M
    exact = sr.stage3_rewards(sr.Config(w_lik=0.0, w_rank=0.0, match_reward="exact"), model, None,
                              memory, hist, y, d, target, t)
    assert exact[0, :, 1].tolist() == [1.0, 0.0, 0.0, 0.0]
    # the ranking reward: target first among [target, negatives], by log P(SID ; EOS | x, trace)
    negs = torch.tensor([[1, 2, 3]])
    rk = sr.stage3_rewards(sr.Config(w_lik=0.0), model, None, memory, hist, y, d, target, t, negs)
    cand = torch.tensor([4, 1, 2, 3])
    for g in range(4):
        lp = [float(sr.sid_logp(model, memory, y[:, g:g + 1, :1], cand[None, c:c + 1]).detach()) for c in range(4)]
        assert rk[0, g, 4].item() == pytest.approx(1 - sum(x >= lp[0] for x in lp[1:]) / 3)


def test_checkpoints_older_than_a_flag_read_as_what_they_ran_with():
    """A checkpoint config without a newer flag means the behaviour before it (OLDER), not
    today's default: equal when this run asks for that behaviour, a difference otherwise."""
    old = sr.Config(**sr.OLDER)
    saved = {k: v for k, v in dataclasses.asdict(old).items() if k not in sr.OLDER}
    assert set(sr.OLDER) == {"constrain_items", "skip_history", "trace_beams", "rl_trie", "rl_select_start",
                             "rl_credit", "rl_judge", "rl_skip_history", "rl_holdout", "stage1_init", "bucket"}
    assert sr.changed_settings(old, saved) == []
    assert sr.changed_settings(sr.Config(**(sr.OLDER | {"bucket": 8})), saved, "base") == ["bucket"]  # training
    # a stage's checkpoint is compared on what that stage and the earlier ones read
    now, before = sr.Config(rl_lr=1e-4, sft_lr=1e-3), dataclasses.asdict(sr.Config())
    assert [sr.changed_settings(now, before, k) for k in ("base", "stage1", "stage2", "stage3")] == \
        [[], [], ["sft_lr"], ["rl_lr", "sft_lr"]]
    assert sr.changed_settings(now, before) == ["rl_lr", "sft_lr"]
    held = sr.Config(rl_holdout=True, trace_len=6)  # read by stages 1-3, not by the base
    assert [sr.changed_settings(held, before, k) for k in ("base", "stage1", "stage3")] == \
        [[], ["rl_holdout", "trace_len"], ["rl_holdout", "trace_len"]]
    assert sr.changed_settings(sr.Config(rl_trie=True, **{k: v for k, v in sr.OLDER.items() if k != "rl_trie"}),
                               saved) == ["rl_trie"]


def test_rl_trie_rollouts_are_items_and_masks_match_a_brute_force():
    """--rl-trie: sampled SIDs are always items (free sampling is not), and the returned mask allows
    a token exactly when the SID so far plus that token starts some item's SID."""
    model = tiny_model(sizes=(3, 2), n_items=5, trace_len=1, seed=1)  # (2, 1) is no item
    memory = model.encode(torch.tensor([[1, 2, 3], [0, 4, 5]]))
    l, M = model.l, model.M
    free, _, free_allowed = sr.sample(model, memory, 300, 1.0, torch.Generator().manual_seed(0))
    y, _, allowed = sr.sample(model, memory, 300, 1.0, torch.Generator().manual_seed(0), trie=True)  # (2, 300, T)
    assert free_allowed.all()
    assert (model.tokens_to_items(y[..., l:l + M]) > 0).all() and (y[..., l + M] == sr.EOS).all()
    assert (model.tokens_to_items(free[..., l:l + M]) == 0).any()
    sids = model.item_tokens[1:].tolist()  # every item's SID tokens
    for b, g in [(0, 0), (0, 7), (1, 3), (1, 299)]:
        for p in range(model.T):
            for v in range(model.emb.num_embeddings):
                want = (not l <= p < l + M) or any(s[:p - l] == y[b, g, l:p].tolist() and s[p - l] == v for s in sids)
                assert bool(allowed[b, g, p, v]) == want



def test_rl_trie_rollouts_skip_the_history_as_the_beams_do():
    """--rl-trie with --skip-history on: a rollout never ends in an item of its history window,
    unless every item under the SID prefix it drew is one (then the history items stay allowed)."""
    model = tiny_model(sizes=(3, 2), n_items=5, trace_len=1, seed=1)  # items (0,0) (0,1) (1,0) (1,1) (2,0)
    hist = torch.tensor([[1, 2, 3], [0, 4, 5]])
    l, M = model.l, model.M
    y, _, allowed = sr.sample(model, model.encode(hist), 300, 1.0, torch.Generator().manual_seed(0),
                              trie=True, skip=hist)
    items = model.tokens_to_items(y[..., l:l + M])  # (2, 300)
    assert (items > 0).all()
    under = lambda first: [i for i in range(1, 6) if int(model.item_tokens[i, 0]) == first]  # noqa: E731
    for b in range(2):
        seen = set(hist[b].tolist())
        for g in range(300):
            sib = under(int(y[b, g, l]))  # the items that share the rollout's first code
            fresh = [i for i in sib if i not in seen]
            assert int(items[b, g]) in (fresh or sib)
            last = allowed[b, g, l + M - 1]  # the last level: exactly the codes of those items
            want = {int(model.item_tokens[i, 1]) for i in (fresh or sib)}
            assert set(torch.nonzero(last).flatten().tolist()) == want
    assert (items[0] == 1).any() or (items[0] == 2).any()  # row 0, first code 0: both items seen -> allowed
    assert not (items[0] == 3).any() and (items[0] == 4).any()  # first code 1: item 3 seen, 4 fresh
    assert not (items[1] == 4).any() and (items[1] == 5).any()  # row 1: 4 seen; 5 seen but the only one

# --- Beam search ----------------------------------------------------------------------------------
def test_beam_search_returns_the_true_top_sequences():
    model = tiny_model(sizes=(3, 2), trace_len=1, seed=2)  # 5 thinking tokens x 3 x 2 = 30 outputs
    hist = torch.tensor([[1, 2, 3], [0, 4, 6]])
    memory = model.encode(hist)
    outs = [[th, a, b, sr.EOS] for th in range(sr.FIRST_CODE, model.emb.num_embeddings)
            for a in range(int(model.offsets[0]), int(model.offsets[0]) + 3)
            for b in range(int(model.offsets[1]), int(model.offsets[1]) + 2)]
    y = torch.tensor(outs)[None].expand(2, -1, -1)  # (B, 30, T) every possible output
    lp = sr.token_logp(sr.teacher_forced(model, memory, y)[0], y).sum(-1)  # (B, 30)
    for beam in (15, 30):  # 15 = the number of partial outputs before the last code: exact
        seqs, score = sr.beam_search(model, hist, beam)
        top = lp.topk(beam, dim=1)
        assert torch.allclose(score, top.values, atol=1e-5)
        assert torch.equal(seqs, y[torch.arange(2)[:, None], top.indices])
    seqs, score = sr.beam_search(model, hist, 6, traces=1)  # trace = argmax, then exact
    first = model.log_probs(model.decode(memory, torch.full((2, 1, 1), sr.BOS))[0])  # (B, 1, 1, V)
    assert (seqs[:, :, 0] == first[:, 0, 0].argmax(-1)[:, None]).all()
    same = y[:, :, 0] == seqs[:, :1, 0]
    best = lp.masked_fill(~same, -math.inf).topk(6, dim=1)
    assert torch.allclose(score, best.values, atol=1e-5)
    # --trace-decode split: the n most probable traces, each with its own exact SID beam of 3
    # (3 = the partial outputs before the last code: exact per trace), all 3n beams best first
    for n in (2, 3):
        seqs, score = sr.beam_search(model, hist, 3, traces=n)
        traces = first[:, 0, 0, sr.FIRST_CODE:].topk(n, dim=1).indices + sr.FIRST_CODE  # (B, n)
        for b in range(2):
            want = []
            for t in traces[b].tolist():
                top = lp[b].masked_fill(y[b, :, 0] != t, -math.inf).topk(3)
                want += zip(top.values.tolist(), top.indices.tolist())
            want.sort(key=lambda w: -w[0])
            assert torch.allclose(score[b], torch.tensor([w[0] for w in want]), atol=1e-5)
            assert torch.equal(seqs[b], y[b, [w[1] for w in want]])
    assert sr.decoding(sr.Config(trace_decode="split", trace_beams=3))["traces"] == 3
    assert sr.decoding(sr.Config(trace_decode="greedy"))["traces"] == 1
    assert sr.decoding(sr.Config())["traces"] == 0


@pytest.mark.parametrize("trace_len", [0, 1])
def test_constrained_beam_search_is_exact_over_recommendable_items(trace_len):
    """--constrain-items with --skip-history: a beam wide enough for every output returns exactly
    the outputs that end in a real item outside the history window, ranked by the model's own
    log-probabilities; the free beam spends slots on the tuple that is no item and on the
    history's items."""
    model = tiny_model(sizes=(3, 2), trace_len=trace_len, n_items=5, seed=4)  # tuple (2, 1) is no item
    hist = torch.tensor([[1, 2, 3], [0, 0, 5]])
    memory = model.encode(hist)
    off = [int(o) for o in model.offsets]
    thinking = [[t] for t in range(sr.FIRST_CODE, model.emb.num_embeddings)] if trace_len else [[]]
    outs = [th + [off[0] + a, off[1] + b, sr.EOS] for th in thinking for a in range(3) for b in range(2)]
    y = torch.tensor(outs)[None].expand(2, -1, -1)  # (B, O, T) every output
    lp = sr.token_logp(sr.teacher_forced(model, memory, y)[0], y).sum(-1)  # (B, O)
    items = model.tokens_to_items(y[..., trace_len:trace_len + 2])  # (B, O), 0 = no item
    ok = (items > 0) & ~(items[..., None] == hist[:, None, :]).any(-1)
    want = lp.masked_fill(~ok, -math.inf).sort(dim=1, descending=True)
    n_ok = int(ok.sum(1).min())
    seqs, score = sr.beam_search(model, hist, len(outs), constrain=True, skip_history=True)
    live = torch.isfinite(score)
    assert live.sum(1).tolist() == ok.sum(1).tolist()  # every live beam is a recommendable output
    torch.testing.assert_close(score[:, :n_ok], want.values[:, :n_ok], atol=1e-5, rtol=0)
    assert torch.equal(seqs[:, :n_ok], y[torch.arange(2)[:, None], want.indices[:, :n_ok]])
    free_seqs, free_score = sr.beam_search(model, hist, len(outs))
    free_items = model.tokens_to_items(free_seqs[..., trace_len:trace_len + 2])
    assert ((free_items == 0) | (free_items[..., None] == hist[:, None, :]).any(-1)).any()


def test_item_continuations_follow_the_trie_by_hand():
    """Three levels, an unused level-0 code and a prefix with one item: the allowed codes at each
    SID position, and --skip-history removing the last code of a history item."""
    model = tiny_model(sizes=(3, 2, 2), trace_len=1, n_items=7)  # items 1..7 = tuples 000 001 010 011 100 101 110
    off, V = [int(o) for o in model.offsets], model.emb.num_embeddings
    def allowed(prefix, hist=None):  # prefix: level codes chosen so far -> the allowed codes at the next level
        seqs = torch.tensor([[[sr.FIRST_CODE] + [off[j] + c for j, c in enumerate(prefix)]]])  # (1, 1, 1 + j)
        mask = model.item_continuations(seqs, 1 + len(prefix), hist)[0, 0]  # (V,)
        j = len(prefix)
        assert not mask[:off[j]].any() and not mask[off[j] + model.sizes[j]:].any()  # only level-j codes
        return [c for c in range(int(model.sizes[j])) if mask[off[j] + c]]
    assert allowed([]) == [0, 1]  # level-0 code 2 starts no item
    assert allowed([1]) == [0, 1] and allowed([1, 1]) == [0] and allowed([0, 1]) == [0, 1]
    assert allowed([1, 1], torch.tensor([[0, 7, 2]])) == [] and allowed([0, 0], torch.tensor([[0, 7, 2]])) == [0]
    for seed in range(3):  # a narrow beam: every live beam ends in an item outside the window
        m = tiny_model(sizes=(3, 2, 2), trace_len=1, n_items=7, seed=seed)
        hist = torch.tensor([[1, 2, 3], [0, 0, 7]])
        seqs, score = sr.beam_search(m, hist, 3, constrain=True, skip_history=True)
        items = m.tokens_to_items(seqs[..., 1:4])
        assert ((items > 0) & ~(items[..., None] == hist[:, None, :]).any(-1) | ~torch.isfinite(score)).all()


def test_constrain_items_flags_and_older_checkpoints(capsys):
    with pytest.raises(sr.RunError, match="--no-constrain-items"):
        sr.check_config(sr.Config(constrain_levels=False))
    sr.check_config(sr.Config(constrain_levels=False, constrain_items=False))
    with pytest.raises(sr.RunError, match="--skip-history"):
        sr.check_config(sr.Config(constrain_items=False, skip_history="on"))
    old = {k: v for k, v in dataclasses.asdict(sr.Config()).items() if k not in ("constrain_items", "skip_history")}
    assert sr.changed_settings(sr.Config(skip_history="off"), old) == ["constrain_items"]  # it decoded freely then
    assert sr.changed_settings(sr.Config(constrain_items=False, skip_history="off"), old) == []
    # --skip-history auto: off where a training sequence repeats an item (a target may repeat one)
    for seqs, want in (([[1, 2, 3, 4, 5], [6, 5, 4]], "on"), ([[1, 2, 1, 4, 5], [6, 5, 4]], "off")):
        cfg = sr.Config(dataset="x")
        sr.resolve_decoding(cfg, tiny_dataset(seqs))
        assert cfg.skip_history == want
    cfg = sr.Config(dataset="x", constrain_items=False)  # no trie: off, and the line says why
    sr.resolve_decoding(cfg, tiny_dataset([[1, 2, 3, 4, 5], [6, 5, 4]]))
    assert cfg.skip_history == "off" and "--no-constrain-items" in capsys.readouterr().out


def test_beams_to_items_drops_invalid_merges_duplicates():
    model = tiny_model(sizes=(3, 2), n_items=5, trace_len=1)
    off = model.offsets
    sid = lambda a, b: [int(off[0]) + a, int(off[1]) + b]
    seqs = torch.tensor([[[3] + sid(0, 1) + [sr.EOS],  # item 2
                          [4] + sid(2, 1) + [sr.EOS],  # not an item
                          [5] + sid(1, 0) + [sr.EOS],  # item 3
                          [6] + sid(0, 1) + [sr.EOS],  # item 2 again, other trace: merged
                          [3] + sid(0, 0) + [sr.EOS]]])  # item 1 but a dead beam
    score = torch.tensor([[-1.0, -2.0, -3.0, -4.0, -math.inf]])
    items, invalid = sr.beams_to_items(model, seqs, score)
    assert items.tolist() == [[2, 3, 0, 0, 0]] and invalid == 1


# --- Runs: results.json, checkpoints, determinism, errors -----------------------------------------
def test_tiny_run_writes_valid_results_json(tiny_run):
    root, res = tiny_run
    saved = json.loads((root / "a" / "results.json").read_text())
    assert strip_times(saved) == strip_times(json.loads(json.dumps(res)))
    assert saved["dataset"]["users"] == 120 and saved["config"]["trace_len"] == 2
    assert saved["semantic_ids"]["features"] == "cooc"  # the file has no titles
    for key in ("base", "stage1", "stage2", "stage3"):
        for split in ("valid", "test"):
            m = saved[key][split]
            assert set(m) >= {f"{n}@{k}" for n in ("recall", "ndcg") for k in (5, 10, 20)}
            assert all(0 <= m[f"recall@{k}"] <= 1 for k in (5, 10, 20))
        assert saved[key]["wall_s"] >= 0 and math.isfinite(saved[key]["history"][0]["train"]["loss"])
    assert {"con", "quant", "dpo"} <= set(saved["stage2"]["history"][0]["train"])
    assert {"r_format", "r_match", "r_sim", "r_lik", "r_rank", "kl", "clip_frac", "entropy"} <= \
        set(saved["stage3"]["history"][0]["train"])
    for key in ("base", "stage1", "stage2", "stage3"):  # self-describing, finished checkpoints
        ck = torch.load(root / "a" / f"{key}.pt", weights_only=True)
        assert ck["done"] and ck["stage"] == key and ck["config"]["seed"] == 0
        assert ck["model_args"]["trace_len"] == (0 if key == "base" else 2)


def test_each_stage_loads_the_previous_checkpoint_and_reruns_alone(tiny_run):
    root, res = tiny_run
    # stage 2 alone starts from stage1.pt and base.pt and repeats the full run's numbers
    with pytest.raises(SystemExit) as e:  # rerunning stages that have checkpoints needs --overwrite
        sr.main(tiny_args(root / "a", "--stages", "2,3"))
    assert one_line_error(e, "already holds stage2.pt, stage3.pt", "--resume", "--overwrite")
    again = sr.main(tiny_args(root / "a", "--stages", "2,3", "--overwrite"))
    assert strip_times(again["stage2"]) == strip_times(res["stage2"])
    assert strip_times(again["stage3"]) == strip_times(res["stage3"])
    skipped = sr.main(tiny_args(root / "a", "--resume"))  # everything finished: nothing reruns
    for key in ("base", "stage1", "stage2", "stage3"):
        assert strip_times(skipped[key]) == strip_times(json.loads(json.dumps(res[key])))
    with pytest.raises(SystemExit) as e:  # a later stage alone, its input missing
        sr.main(tiny_args(root / "empty", "--stages", "3"))
    assert "stage2.pt" in str(e.value) and "--stages 2" in str(e.value)
    with pytest.raises(SystemExit) as e:  # the saved stage 1 has another trace length
        sr.main(tiny_args(root / "a", "--stages", "2", "--trace-len", "3", "--overwrite"))
    assert "trace_len=2" in str(e.value) and "trace_len=3" in str(e.value)
    with pytest.raises(SystemExit) as e:  # --resume with another training setting
        sr.main(tiny_args(root / "a", "--resume", "--lambda-dpo", "0.5"))
    assert "--resume" in str(e.value) and "lambda_dpo=0.1" in str(e.value)


def test_unfinished_parents_and_stale_results(tiny_run):
    root, res = tiny_run
    shutil.copytree(root / "a", root / "e")
    ck = torch.load(root / "e" / "stage2.pt", weights_only=True)
    torch.save(ck | {"done": False}, root / "e" / "stage2.pt")  # as if stage 2 had been interrupted
    with pytest.raises(SystemExit) as e:
        sr.main(tiny_args(root / "e", "--stages", "3", "--overwrite"))
    assert "did not finish" in str(e.value) and "--stages 2 --resume" in str(e.value)
    # rerunning stage 2 alone drops stage 3's results: they were trained from the old stage 2
    again = sr.main(tiny_args(root / "e", "--stages", "2", "--overwrite"))
    saved = json.loads((root / "e" / "results.json").read_text())
    assert "stage3" not in again and "stage3" not in saved and {"base", "stage1", "stage2"} <= set(saved)


def test_same_seed_same_result(tiny_run):
    root, res = tiny_run
    other = sr.main(tiny_args(root / "b", "--stages", "base,1"))
    assert strip_times(other["base"]) == strip_times(res["base"])
    assert strip_times(other["stage1"]) == strip_times(res["stage1"])
    seed1 = sr.main(tiny_args(root / "c", "--stages", "base", "--seed", "1"))
    assert strip_times(seed1["base"]) != strip_times(res["base"])


def test_baseline_learns_the_synthetic_data(tmp_path):
    """The direct model (TIGER, l = 0) must find the planted topic/stride structure."""
    ds = data.load_dataset("synthetic", verbose=False)
    pop = torch.from_numpy(np.bincount(ds.train.items, minlength=ds.n_items + 1)).double()
    popularity = data.evaluate(lambda h: pop.expand(len(h), -1), ds.valid, 20)
    res = sr.main(["--stages", "base", "--out", str(tmp_path),
                   "--d-model", "32", "--n-heads", "2", "--d-ff", "64", "--enc-layers", "1",
                   "--dec-layers", "1", "--max-len", "3", "--epochs", "2", "--max-examples", "16384",
                   "--lr", "3e-3", "--beam-valid", "10", "--beam-test", "20", "--threads", "1"])
    assert res["base"]["valid"]["recall@10"] > 3 * popularity["recall@10"]  # 0.38 vs 0.09 here
    assert res["base"]["test"]["recall@10"] > 0.2


@pytest.mark.parametrize("args, message", [
    (["--trace-len", "-1"], "--trace-len must be >= 0"),
    (["--stages", "base,4"], "--stages takes a comma list of base,1,2,3"),
    (["--features", "bert"], "--features must be auto, attr, attr+cooc, text or cooc"),
    (["--annotate", "later"], "--annotate must be offline or online"),
    (["--merge", "sum"], "--merge must be max or lse"),
    (["--dpo-form", "x"], "--dpo-form must be direct or shared"),
    (["--rank-negs-from", "x"], "--rank-negs-from must be direct, popular or random"),
    (["--self-trace-frac", "1.5"], "--self-trace-frac must be in [0, 1]"),
    (["--max-examples", "-2"], "--max-examples must be >= -1"),
    (["--trace-topk", "-1"], "--trace-topk must be >= 0"),
    (["--device", "tpu"], "--device must be auto, cpu, cuda"),
    (["--select", "auc"], "--select must be one of"),
    (["--group-size", "1"], "--group-size must be >= 2"),
    (["--rl-lr", "0"], "--rl-lr must be > 0"),
    (["--d-model", "30", "--n-heads", "4"], "divisible"),
    (["--cooc-window", "1"], "--cooc-window must be >= 2"),
    (["--rank-negs", "0"], "--rank-negs must be >= 1 while --w-rank is on"),
    (["--levels", "9", "--codebook-size", "256", "--stages", "base"], "more code tuples than an int64 key holds"),
    (["--dataset", "no-such-set"], "unknown dataset 'no-such-set'"),
    # values that used to pass the checks and then crash, run out of memory or train nothing
    (["--seed", "-1"], "--seed must be in 0..2^32-1"),
    (["--kcore", "-1"], "--kcore must be >= 0"),
    (["--max-len", "1000000"], "encoder tokens, more than 1024"),
    (["--lambda-dpo", "inf"], "--lambda-dpo must be a finite number"),
    (["--w-format", "-1"], "--w-format must be >= 0"),
    (["--w-format", "0", "--w-match", "0", "--w-sim", "0", "--w-lik", "0", "--w-rank", "0"], "stage 3 needs a reward"),
    (["--resume", "--overwrite"], "pass one of them"),
    (["--rl-holdout", "--stage1-init", "direct"], "add --stage1-init fresh"),
    (["--beam-valid", "100000", "--stages", "base"], "--beam-valid 100000 is wider than the 400 items"),
    (["--beam-test", "401", "--stages", "base"], "--beam-test 401 is wider than the 400 items"),
    (["--rank-negs", "100000"], "--rank-negs 100000 needs that many other items"),
])
def test_bad_flags_give_one_clear_line(tmp_path, args, message):
    with pytest.raises(SystemExit) as e:
        sr.main(args + ["--out", str(tmp_path / "run")])  # never the working folder's runs/
    assert str(e.value).startswith("error: ") and message in str(e.value) and "\n" not in str(e.value)


def test_missing_device_text_features_and_nonfinite_loss_are_clear_errors(tiny_run, monkeypatch):
    root, _ = tiny_run
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        sr.main(["--device", "cuda:0"])
    assert "no CUDA" in str(e.value)
    with pytest.raises(SystemExit) as e:
        sr.main(tiny_args(root / "d", "--features", "text"))
    assert "needs item titles" in str(e.value)
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(sr.RunError, match="lower --sft-lr"):
        sr.update(model, opt, torch.tensor(float("nan"), requires_grad=True), sr.Config(), "stage2")


def test_out_checks_lock_and_corrupt_files_are_one_line(tiny_run, monkeypatch):
    root, _ = tiny_run
    (root / "file").write_text("x")
    with pytest.raises(SystemExit) as e:
        sr.main(tiny_args(root / "file"))
    assert one_line_error(e, "is a file")
    shutil.copytree(root / "a", root / "f")
    assert not (root / "a" / ".lock").exists() and not list((root / "a").glob("*_last.pt"))
    (root / "f" / ".lock").write_text(f"{os.getpid()} {socket.gethostname()}\n")  # a live run holds it
    with pytest.raises(SystemExit) as e:
        sr.main(tiny_args(root / "f", "--stages", "3", "--overwrite"))
    assert one_line_error(e, f"in use by another run (pid {os.getpid()})")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (root / "f" / ".lock").write_text(f"{dead.pid} {socket.gethostname()}\n")  # as after a SIGKILL: stale
    good = {n: (root / "f" / n).read_bytes() for n in ("stage2.pt", "results.json")}
    for name, bad in [("stage2.pt", os.urandom(3000)), ("stage2.pt", good["stage2.pt"][:3000]),
                      ("results.json", good["results.json"][:100])]:
        (root / "f" / name).write_bytes(bad)
        with pytest.raises(SystemExit) as e:
            sr.main(tiny_args(root / "f", "--stages", "3", "--overwrite"))
        assert one_line_error(e, f"{root / 'f' / name} is corrupt or incomplete; delete it or use a new --out")
        assert not (root / "f" / ".lock").exists()  # the stale lock went, and this run's lock too
        (root / "f" / name).write_bytes(good[name])


@pytest.mark.parametrize("script", ["rearec", "stream_rec"])
def test_a_failed_allocation_is_one_line(tmp_path, monkeypatch, script):
    """Sizes that no machine can hold end with one line naming the flags to lower, not a traceback."""
    def too_big(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough "
                           "memory: you tried to allocate 25600000000 bytes.")
    monkeypatch.setattr(data, "load_dataset", too_big)
    with pytest.raises(SystemExit) as e:
        (rearec if script == "rearec" else sr).main(["--out", str(tmp_path / "run")])
    assert one_line_error(e, "out of memory (23.8 GiB asked for); lower --batch-size")
    assert not (tmp_path / "run" / ".lock").exists()


@pytest.mark.parametrize("stage, flags", [("base", ["--stages", "base", "--epochs", "2"]),
                                          ("stage2", ["--stages", "2", "--epochs", "2", "--overwrite"]),
                                          ("stage3", ["--stages", "3", "--rl-epochs", "2", "--overwrite"])])
def test_ctrl_c_exits_130_and_resume_continues_the_stage_from_its_last_epoch(tiny_run, monkeypatch, capsys,
                                                                           stage, flags):
    root, _ = tiny_run
    for name in ("straight", "stopped") if stage != "base" else ():  # it starts from the saved stages
        shutil.copytree(root / "a", root / f"{stage}_{name}")
    straight = sr.main(tiny_args(root / f"{stage}_straight", *flags))
    out = root / f"{stage}_stopped"
    with monkeypatch.context() as m:  # Ctrl-C during epoch 2's validation (stage 3 validates an epoch 0 first)
        m.setattr(sr, "evaluate_split", interrupt_on_call(2 + (stage == "stage3"), sr.evaluate_split))
        with pytest.raises(SystemExit) as e:
            sr.main(tiny_args(out, *flags))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 130 and len(err) == 1, err
    assert f"in {stage} epoch 2; {out / (stage + '_last.pt')} holds its epoch 1" in err[0] and "--resume" in err[0]
    resumed = sr.main(tiny_args(out, *[f for f in flags if f != "--overwrite"], "--resume"))
    assert f"{stage}: resumed from" in capsys.readouterr().out
    assert strip_times(resumed[stage]) == strip_times(straight[stage])
    assert not (out / f"{stage}_last.pt").exists() and not (out / ".lock").exists()
    with monkeypatch.context() as m:  # Ctrl-C while loading the data: one line, exit 130
        m.setattr(data, "load_dataset", interrupt_on_call(1, data.load_dataset))
        with pytest.raises(SystemExit) as e:
            sr.main(tiny_args(root / f"{stage}_startup"))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 130 and len(err) == 1 and "during start-up; nothing written yet" in err[0]


# --- Offline annotation, the exposure-gap path, DPO against the direct model, merging, attributes ---
def tiny_dataset(seqs):
    """A Dataset from hand-made user sequences (item ids 1..N, leave-one-out split)."""
    users = [u for u, s in enumerate(seqs) for _ in s]
    return data.build_dataset(data._columns(users, [i for s in seqs for i in s]), "hand")


def slow_annotation(model, hist_b, t_b, topk):
    """Spec §4.1 with the top-k rule, one case, the decoder re-run from scratch at every step:
    o_i = the code nearest to r_i = MLP_r(t - s_{i-1}) among the k tokens the model ranks highest."""
    E = model.emb.weight.detach()
    mem = model.encode(hist_b[None])
    seq, ds_ = [sr.BOS], []
    for i in range(model.l):
        d_all, _ = model.decode(mem, torch.tensor(seq).view(1, 1, -1))
        ds_.append(d_all[0, 0, -1])
        s_prev = model.mlp_s(sum(ds_))  # s_{i} over the states so far
        r_i = model.mlp_r(t_b - s_prev)
        logits = (d_all[0, 0, -1] @ E.T)[sr.FIRST_CODE:]  # thinking positions allow every code
        cands = logits.topk(topk).indices.tolist() if topk else range(len(logits))
        dist = {c: float(((E[sr.FIRST_CODE + c] - r_i) ** 2).sum()) for c in cands}
        seq.append(sr.FIRST_CODE + min(dist, key=dist.get))
    return seq[1:]


@pytest.mark.parametrize("topk, kind", [(0, "sid"), (3, "feature"), (2, "sid")])
def test_offline_annotation_equals_a_slow_restatement(topk, kind):
    """annotate_all (batched over every training prefix, KV cache, top-k rule) = the loop of Spec
    §4.1 written out per example; its gain = log P(target | x, o) under the annotator minus the
    direct model's log P(target | x), both summed token by token; keep follows the gain."""
    model = tiny_model(sizes=(3, 2), trace_len=3, seed=4, features=5 if kind == "feature" else 0)
    direct = tiny_model(sizes=(3, 2), trace_len=0, seed=5)
    ds = tiny_dataset([[1, 2, 3, 4, 5], [6, 5, 4], [2, 6, 1, 3], [3, 1]])
    cfg = sr.Config(max_len=3, trace_topk=topk, target_repr=kind, batch_size=2, eval_batch=2, annot_keep="gain")
    with torch.no_grad():
        store = sr.annotate_all(cfg, model, direct, ds, "cpu")
    items, starts, ends = ds.train.items, ds.train.starts, ds.train.ends
    examples = [(p, s) for s, e in zip(starts, ends) for p in range(s + 1, e)]
    assert store["traces"].shape == (len(items), 3) and store["stats"]["examples"] == len(examples)
    with torch.no_grad():
        for p, s in examples:
            hist = torch.tensor(data.windows(items, np.array([s]), np.array([p]), 3)[0])
            target = int(items[p])
            t_b = sr.target_repr(model, torch.tensor([target]), kind)[0]
            o = slow_annotation(model, hist, t_b, topk)
            assert store["traces"][p].tolist() == o, p
            def logp(m, y):  # sum of log P(y_t | y_<t, x) over the SID and EOS tokens, one step at a time
                mem, total = m.encode(hist[None]), 0.0
                for j in range(m.l, m.T):
                    d_all, _ = m.decode(mem, torch.tensor([sr.BOS] + y[:j]).view(1, 1, -1))
                    total += float(m.log_probs(d_all[:, :, -1:], j)[0, 0, 0, y[j]])
                return total
            sid = model.item_tokens[target].tolist() + [sr.EOS]
            gain = logp(model, o + sid) - logp(direct, sid)
            assert float(store["gain"][p]) == pytest.approx(gain, abs=1e-4)
            assert bool(store["keep"][p]) == (gain > 0)
    assert (store["traces"][[s for s in starts]] == -1).all()  # a user's first item is no example


def test_stored_traces_are_reused_unchanged_across_epochs(tiny_run, monkeypatch):
    """Offline stage 2 annotates once; every epoch trains on the same stored traces (the file's),
    whatever the fine-tuning does to the weights. --annot-every 1 annotates again at epoch 2."""
    root, _ = tiny_run
    calls, seen = [], []
    real_annotate, real_losses = sr.annotate_all, sr.stage2_losses

    def spy_annotate(cfg, annot, *args, **kwargs):  # the real store, its traces made diverse
        calls.append(1)
        store = real_annotate(cfg, annot, *args, **kwargs)
        rows = store["traces"][:, 0] >= 0
        g = torch.Generator().manual_seed(len(calls))
        store["traces"][rows] = torch.randint(sr.FIRST_CODE, annot.emb.num_embeddings, (int(rows.sum()), annot.l),
                                              generator=g, dtype=torch.int16)
        return store

    def spy_losses(cfg, model, direct, ref, hist, target, o_ann, self_rows, *rest, **kw):
        seen.append((len(calls), o_ann.clone(), hist.clone(), target.clone()))
        return real_losses(cfg, model, direct, ref, hist, target, o_ann, self_rows, *rest, **kw)

    monkeypatch.setattr(sr, "annotate_all", spy_annotate)
    monkeypatch.setattr(sr, "stage2_losses", spy_losses)
    for every, rounds in ((0, 1), (1, 2)):
        shutil.copytree(root / "a", root / f"reuse{every}")
        calls.clear(), seen.clear()
        sr.main(tiny_args(root / f"reuse{every}", "--stages", "2", "--epochs", "2", "--max-examples", "0",
                          "--overwrite", "--lambda-dpo", "0", "--annot-every", str(every)))
        assert len(calls) == rounds
        store = torch.load(root / f"reuse{every}" / "stage2_traces.pt", weights_only=True)
        assert store["epoch"] == rounds  # the traces of the last annotation round
        ds = data.load_dataset(str(root / "tiny.txt"), verbose=False)
        pos_of = {}  # (history window, target) -> the positions of the examples that have it
        for st, e in zip(ds.train.starts, ds.train.ends):
            for p in range(st + 1, e):
                h = tuple(data.windows(ds.train.items, np.array([st]), np.array([p]), 5)[0].tolist())
                pos_of.setdefault((h, int(ds.train.items[p])), []).append(p)
        per_round = {}
        for r, o, hist, target in seen:  # every trained example, looked up by (history, target)
            for b in range(len(target)):
                key = (tuple(hist[b].tolist()), int(target[b]))
                if len(pos_of[key]) == 1:  # a key that names one example
                    per_round.setdefault(r, {}).setdefault(key, []).append(tuple(o[b].tolist()))
        assert len(per_round[rounds]) > 0.5 * ds.stats["train_targets"]  # 1,654 of the 2,657 here
        # every example was trained in both epochs (max-examples 0 = all), each time on one trace
        assert sum(len(target) for _, _, _, target in seen) == 2 * ds.stats["train_targets"]
        for r, table in per_round.items():
            assert all(len(set(v)) == 1 for v in table.values())  # the same trace in every epoch of a round
        assert all(v[0] == tuple(store["traces"][pos_of[k][0]].tolist()) for k, v in per_round[rounds].items())
        if every:  # the second round trained on new traces
            assert sum(per_round[1][k][0] != per_round[2][k][0] for k in per_round[1]) > 0.5 * len(per_round[1])


def test_train_batches_positions_name_each_example():
    ds = tiny_dataset([[1, 2, 3, 4, 5], [6, 5, 4, 3]])  # train rows [1, 2, 3] (flat 0-2), [6, 5] (flat 5-6)
    got = []
    for hist, target, pos in data.train_batches(ds.train, 3, 2, pairs=True, positions=True,
                                                generator=torch.Generator().manual_seed(0)):
        items = torch.from_numpy(ds.train.items)
        assert (items[pos] == target).all()
        for b, p in enumerate(pos.tolist()):
            start = 0 if p < 5 else 5
            assert hist[b].tolist() == [0] * (3 - (p - start)) + items[start:p].tolist()
        got += pos.tolist()
    assert sorted(got) == [1, 2, 6]  # targets 2, 3 of the first user and 5 of the second


def slow_greedy_trace(model, hist_b):
    """The model's own trace, one case: argmax at every thinking position, re-decoding from scratch."""
    mem, seq = model.encode(hist_b[None]), [sr.BOS]
    for i in range(model.l):
        d_all, _ = model.decode(mem, torch.tensor(seq).view(1, 1, -1))
        seq.append(int(model.log_probs(d_all[:, :, -1:], i)[0, 0, 0].argmax()))
    return seq[1:]


def slow_token_logps(model, hist_b, y):
    """log P(y_j | y_<j, x) for every output position j, re-decoding from scratch: (T,)."""
    mem = model.encode(hist_b[None])
    out = []
    for j in range(len(y)):
        d_all, _ = model.decode(mem, torch.tensor([sr.BOS] + y[:j]).view(1, 1, -1))
        out.append(float(model.log_probs(d_all[:, :, -1:], j)[0, 0, 0, y[j]].detach()))
    return out


def test_exposure_gap_path_trains_the_sid_after_the_models_own_trace():
    """Own-trace rows: CE on the SID tokens after the model's OWN greedy trace, none on its own
    trace tokens; annotated rows: CE on [o_ann ; SID] (the forced EOS never counts)."""
    torch.manual_seed(0)
    model = tiny_model(sizes=(3, 2), trace_len=2, seed=6)
    hist = torch.tensor([[1, 2, 3], [0, 4, 6], [5, 5, 2]])
    target = torch.tensor([4, 1, 6])
    o_ann = torch.tensor([[3, 4], [5, 6], [7, 3]])
    cfg = sr.Config(lambda_con=0.0, lambda_quant=0.0, lambda_dpo=0.0, target_repr="sid")
    own = torch.tensor([True, False, True])
    loss, logs = sr.stage2_losses(cfg, model, None, None, hist, target, o_ann, own)
    terms = []
    for b in range(3):
        trace = slow_greedy_trace(model, hist[b]) if own[b] else o_ann[b].tolist()
        lp = slow_token_logps(model, hist[b], trace + model.item_tokens[target[b]].tolist() + [sr.EOS])
        terms += lp[2:4] if own[b] else lp[:4]  # own: the 2 SID tokens; annotated: trace + SID
    assert loss.item() == pytest.approx(-sum(terms) / len(terms), rel=1e-5)
    sid_own = [x for b in (0, 2) for x in slow_token_logps(
        model, hist[b], slow_greedy_trace(model, hist[b]) + model.item_tokens[target[b]].tolist() + [sr.EOS])[2:4]]
    assert logs["ce_sid_own"].item() == pytest.approx(-sum(sid_own) / 4, rel=1e-5)
    assert logs["own"].item() == pytest.approx(2 / 3)
    # all rows on their own trace: the thinking tokens get no gradient from the CE
    loss_all, logs_all = sr.stage2_losses(cfg, model, None, None, hist, target, o_ann, torch.ones(3, dtype=torch.bool))
    assert "ce_think" not in logs_all
    model.zero_grad()
    loss_all.backward()
    model2 = tiny_model(sizes=(3, 2), trace_len=2, seed=6)
    loss_none, _ = sr.stage2_losses(cfg, model2, None, None, hist, target, o_ann, torch.zeros(3, dtype=torch.bool))
    assert loss_none.item() != pytest.approx(loss_all.item())


def test_dpo_against_the_direct_model_hand_computed():
    """--dpo-form direct: margin = beta [(log pi([o ; target]) - log pi_d(target)) - (log pi([own trace ;
    neg]) - log pi_d(neg))], every term summed token by token; the trace terms count (they differ)."""
    model = tiny_model(sizes=(3, 2), trace_len=2, seed=7)
    direct = tiny_model(sizes=(3, 2), trace_len=0, seed=8)
    hist, target, neg = torch.tensor([[1, 2, 3], [6, 0, 4]]), torch.tensor([4, 2]), torch.tensor([5, 3])
    o_ann = torch.tensor([[3, 4], [7, 5]])  # V = 3 + 3 + 2 = 8 tokens
    beta = 0.7
    cfg = sr.Config(lambda_con=0.0, lambda_quant=0.0, lambda_dpo=1.0, beta_dpo=beta, target_repr="sid")
    own = torch.tensor([False, False])
    _, logs = sr.stage2_losses(cfg, model, direct, None, hist, target, o_ann, own, neg)
    want, wins = [], 0
    for b in range(2):
        sid = lambda i: model.item_tokens[i].tolist() + [sr.EOS]
        pol_w = sum(slow_token_logps(model, hist[b], o_ann[b].tolist() + sid(target[b])))
        pol_l = sum(slow_token_logps(model, hist[b], slow_greedy_trace(model, hist[b]) + sid(neg[b])))
        ref_w, ref_l = sum(slow_token_logps(direct, hist[b], sid(target[b]))), sum(slow_token_logps(direct, hist[b], sid(neg[b])))
        m = beta * ((pol_w - ref_w) - (pol_l - ref_l))
        want.append(-math.log(1 / (1 + math.exp(-m))))
        wins += m > 0
    assert logs["dpo"].item() == pytest.approx(sum(want) / 2, rel=1e-5)
    assert logs["dpo_acc"].item() == wins / 2
    # a row trained on its own trace shares it with the rejected answer: the trace terms cancel
    _, logs2 = sr.stage2_losses(cfg, model, direct, None, hist, target, o_ann, torch.tensor([True, True]), neg)
    want2 = []
    for b in range(2):
        tr = slow_greedy_trace(model, hist[b])
        sid = lambda i: model.item_tokens[i].tolist() + [sr.EOS]
        gap = sum(slow_token_logps(model, hist[b], tr + sid(target[b]))[2:]) - \
            sum(slow_token_logps(model, hist[b], tr + sid(neg[b]))[2:])
        ref = sum(slow_token_logps(direct, hist[b], sid(target[b]))) - sum(slow_token_logps(direct, hist[b], sid(neg[b])))
        want2.append(-math.log(1 / (1 + math.exp(-beta * (gap - ref)))))
    assert logs2["dpo"].item() == pytest.approx(sum(want2) / 2, rel=1e-5)


def test_lse_merge_on_a_hand_made_beam_set():
    """Beams of one item: max keeps the best one; lse adds them up (log-sum-exp over traces)."""
    model = tiny_model(sizes=(3, 2), n_items=5, trace_len=1)
    off = model.offsets
    sid = lambda a, b: [int(off[0]) + a, int(off[1]) + b]
    seqs = torch.tensor([[[3] + sid(1, 0) + [sr.EOS],  # item 3 (codes 1, 0), -1.0
                          [4] + sid(0, 1) + [sr.EOS],  # item 2, -1.5
                          [5] + sid(0, 1) + [sr.EOS],  # item 2 again, -1.6
                          [6] + sid(2, 1) + [sr.EOS],  # no item, -1.7
                          [6] + sid(1, 0) + [sr.EOS],  # item 3 again, -3.0
                          [3] + sid(0, 0) + [sr.EOS],  # item 1, -3.1
                          [4] + sid(0, 0) + [sr.EOS]]])  # a dead beam
    score = torch.tensor([[-1.0, -1.5, -1.6, -1.7, -3.0, -3.1, -math.inf]])
    items, invalid = sr.beams_to_items(model, seqs, score, "max")
    assert items.tolist() == [[3, 2, 1, 0, 0, 0, 0]] and invalid == 1
    # lse: item 2 = log(e^-1.5 + e^-1.6) = -0.856 beats item 3 = log(e^-1 + e^-3) = -0.873
    assert math.log(math.exp(-1.5) + math.exp(-1.6)) > math.log(math.exp(-1.0) + math.exp(-3.0))
    items, invalid = sr.beams_to_items(model, seqs, score, "lse")
    assert items.tolist() == [[2, 3, 1, 0, 0, 0, 0]] and invalid == 1


def test_attributes_loader_on_a_hand_made_file_and_features_auto(tmp_path, capsys):
    (tmp_path / "Toy.txt").write_text("1 10 20 30\n2 20 30 40\n3 10 30 40 50\n4 50 20 10\n")
    (tmp_path / "Toy_item2attributes.json").write_text(json.dumps(
        {"10": [1, 2], "20": [1, 2], "30": [3], "40": [4, 5, 1], "99": [7]}))  # 50: none; 99: no such item
    ds = data.load_dataset(str(tmp_path / "Toy.txt"))
    assert "4 of 5 items have attributes" in capsys.readouterr().out
    raw = ds.item_ids[1:].tolist()
    assert raw == [10, 20, 30, 40, 50]
    assert ds.item_attrs == [[], ["1", "2"], ["1", "2"], ["3"], ["4", "5", "1"], []]
    assert ds.stats["has_attributes"] and not data.load_dataset("synthetic", verbose=False).stats["has_attributes"]
    cfg = sr.Config(dataset=str(tmp_path / "Toy.txt"))
    assert sr.feature_kind(cfg, ds) == "cooc"  # auto: attributes only on request (README: they trailed on Toys)
    assert sr.feature_kind(sr.Config(features="attr+cooc"), ds) == "attr+cooc"
    vec = sr.attribute_features(ds.item_attrs, 8, 0)  # (N, F)
    assert torch.allclose(vec[0], vec[1], atol=1e-6) and vec[4].abs().max() == 0  # same attributes; none
    # --features attr+cooc uses them in a run
    res = sr.main(["--dataset", str(tmp_path / "Toy.txt"), "--out", str(tmp_path / "run"), "--stages", "base",
                   "--features", "attr+cooc",
                   "--epochs", "1", "--d-model", "8", "--n-heads", "2", "--d-ff", "8", "--enc-layers", "1",
                   "--dec-layers", "1", "--max-len", "3", "--beam-valid", "3", "--beam-test", "3", "--threads", "1",
                   "--kmeans-iters", "2", "--no-estimate"])
    assert res["semantic_ids"]["features"] == "attr+cooc" and res["dataset"]["has_attributes"]
    # the expected-time estimate on data smaller than its timed steps trains and writes nothing
    est = sr.main(["--dataset", str(tmp_path / "Toy.txt"), "--out", str(tmp_path / "run_est"), "--stages", "base,1,2,3",
                   "--epochs", "1", "--d-model", "8", "--n-heads", "2", "--d-ff", "8", "--enc-layers", "1",
                   "--dec-layers", "1", "--max-len", "3", "--beam-valid", "3", "--beam-test", "3", "--threads", "1",
                   "--kmeans-iters", "2", "--rank-negs", "2", "--rl-batch", "2", "--group-size", "2", "--rl-epochs", "1"])
    assert all(est[k]["epochs_run"] == 1 for k in ("base", "stage1", "stage2", "stage3"))
    # bad files: one line each
    for text, msg in (("{", "is not valid JSON"), ("[1, 2]", "expected one JSON object"),
                      ('{"10": 3}', "not a list of attribute ids"), ('{"77": [1]}', "none of its item ids")):
        (tmp_path / "Toy_item2attributes.json").write_text(text)
        with pytest.raises(data.DataError, match=msg):
            data.load_dataset(str(tmp_path / "Toy.txt"), verbose=False)
    with pytest.raises(SystemExit) as e:
        sr.main(["--dataset", "synthetic", "--features", "attr", "--out", str(tmp_path / "r2")])
    assert one_line_error(e, "--features attr needs an S3-Rec attribute file")


def test_tfidf_svd_keeps_the_tfidf_geometry_hand_computed():
    """Rows of the SVD vectors have the cosines of the (smoothed) TF-IDF rows when F >= their rank."""
    docs = [["a", "b"], ["a"], ["c"]]
    n = 3  # idf = ln((1 + n) / (1 + df)) + 1: a (df 2) 1.2877, b, c (df 1) 1.6931
    ia, ib = math.log(4 / 3) + 1, math.log(4 / 2) + 1
    rows = torch.tensor([[ia, ib, 0.0], [ia, 0.0, 0.0], [0.0, 0.0, ib]])
    cos = F.normalize(rows, dim=1) @ F.normalize(rows, dim=1).T
    assert cos[0, 1].item() == pytest.approx(ia / math.hypot(ia, ib), rel=1e-4)  # 0.6054
    v = sr.tfidf_svd(docs, 3, 0)
    assert torch.allclose(v @ v.T, cos, atol=1e-4)


def test_user_batches_rank_negatives_and_auto_budgets():
    ds = tiny_dataset([[1, 2, 3, 4, 5], [6, 5, 4, 3], [2, 3]])  # train rows [1, 2, 3], [6, 5], [2, 3]
    got = {}
    for hist, target in sr.user_batches(ds.train, 3, 2, "cpu", torch.Generator().manual_seed(0)):
        for h, t in zip(hist.tolist(), target.tolist()):
            got[tuple(h)] = t
    assert got == {(0, 1, 2): 3, (0, 0, 6): 5, (0, 0, 2): 3}  # prefix -> the last training item
    # ranking negatives: never the target; "direct" = the direct model's beams, best first
    direct = tiny_model(sizes=(3, 2), trace_len=0, seed=9)
    hist, target = torch.tensor([[1, 2, 3], [0, 4, 6]]), torch.tensor([4, 2])
    pop = torch.tensor([0.0, 5, 1, 1, 1, 1, 1])
    gen = torch.Generator().manual_seed(0)
    for kind in ("random", "popular", "direct"):
        negs = sr.rank_negatives(sr.Config(rank_negs=3, rank_negs_from=kind, skip_history="on"), direct, hist, target, pop, gen)
        assert negs.shape == (2, 3) and not (negs == target[:, None]).any() and ((negs >= 1) & (negs <= 6)).all()
    ranked = sr.beams_to_items(direct, *sr.beam_search(direct, hist, 4, constrain=True, skip_history=True))[0]
    for b in range(2):  # the beams skip the history window's items (--constrain-items, default)
        want = [i for i in ranked[b].tolist() if i and i != target[b]][:3]
        assert want and not set(want) & set(hist[b].tolist()) and negs[b, :len(want)].tolist() == want
    # --epochs 0 / --max-examples -1 / --rl-max-examples -1: the demo budget on synthetic, full epochs otherwise
    for name, want in (("synthetic", (3, 8192, 512)), ("some/file.txt", (50, 0, 0))):
        cfg = sr.Config(dataset=name)
        sr.resolve_budget(cfg, ds)
        assert (cfg.epochs, cfg.max_examples, cfg.rl_max_examples) == want
    cfg = sr.Config(dataset="x", epochs=7, max_examples=100, rl_max_examples=0)
    sr.resolve_budget(cfg, ds)
    assert (cfg.epochs, cfg.max_examples, cfg.rl_max_examples) == (7, 100, 0)


def test_fit_annotator_moves_only_the_mlps_and_the_target_projection():
    model = tiny_model(sizes=(3, 2), trace_len=2, seed=3, features=4)
    ds = tiny_dataset([[1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2], [2, 3, 1, 4]])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = sr.Config(max_len=3, batch_size=4, trace_topk=2, lr=0.05)
    logs = sr.fit_annotator(cfg, model, ds, "cpu", torch.Generator().manual_seed(0))
    assert set(logs) == {"con", "quant"}
    for k, v in model.state_dict().items():
        moved = not torch.equal(v, before[k])
        assert moved == k.startswith(("mlp_r.", "mlp_s.", "target_proj.")) or (not moved and "net.2" not in k), k
    assert not torch.equal(model.target_proj.weight, before["target_proj.weight"])
    assert not any(p.requires_grad for p in model.parameters())  # frozen again for annotating


def test_expected_time_is_printed_at_start(tiny_run, capsys):
    root, _ = tiny_run
    sr.main([a for a in tiny_args(root / "eta", "--stages", "base,1,2") if a != "--no-estimate"])
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("expected time: at most"))
    assert "base" in line and "stage2" in line and "early stopping" in line
    assert "budget: base / stage 1 / stage 2 up to 1 epochs x 256 of" in out


def test_a_checkpoint_of_another_version_is_one_line(tiny_run):
    root, _ = tiny_run
    shutil.copytree(root / "a", root / "oldver")
    ck = torch.load(root / "oldver" / "stage2.pt", weights_only=True)
    ck["model"].pop("target_proj.weight")  # as saved by the previous reconstruction
    torch.save(ck, root / "oldver" / "stage2.pt")
    with pytest.raises(SystemExit) as e:
        sr.main(tiny_args(root / "oldver", "--stages", "3", "--overwrite"))
    assert one_line_error(e, "stage2.pt holds weights of another version", "--stages 2 --overwrite")


def test_rl_holdout_drops_each_users_last_training_target_from_stages_1_and_2():
    ds = data.load_dataset("synthetic", verbose=False)
    pairs = lambda d: {int(p) for _, _, pos in data.train_batches(d.train, 5, 512, pairs=True, positions=True)
                       for p in pos}  # noqa: E731  (positions of the targets in train.items)
    full, cfg = pairs(ds), sr.Config(rl_holdout=True)
    last = {int(e) - 1 for s, e in zip(ds.train.starts, ds.train.ends) if e - s >= 2}
    assert pairs(sr.stage_data(cfg, ds, "stage2")) == full - last == pairs(sr.stage_data(cfg, ds, "stage1"))
    assert len(last) > 100 and last <= full
    for key in ("base", "stage3"):  # the base and stage 3 see every training item
        assert sr.stage_data(cfg, ds, key) is ds
    assert sr.stage_data(sr.Config(), ds, "stage2") is ds
    _, targets = next(sr.user_batches(ds.train, 5, 10**6, "cpu", torch.Generator().manual_seed(0)))
    assert sorted(targets.tolist()) == sorted(int(ds.train.items[p]) for p in last)  # stage 3's targets


def test_rl_holdout_runs_and_a_later_stage_refuses_an_earlier_one_trained_otherwise(tiny_run):
    root, res = tiny_run
    shutil.copytree(root / "a", root / "held")
    with pytest.raises(SystemExit) as e:  # stage 2 would start from a stage 1 trained on every item
        sr.main(tiny_args(root / "held", "--stages", "2,3", "--overwrite", "--rl-holdout", "--stage1-init", "fresh"))
    assert one_line_error(e, "stage1.pt was trained with rl_holdout=False", "rl_holdout=True", "--stages 1 --overwrite")
    held = sr.main(tiny_args(root / "held", "--stages", "1,2,3", "--overwrite", "--rl-holdout", "--stage1-init", "fresh"))
    assert json.loads((root / "held" / "results.json").read_text())["config"]["rl_holdout"] is True
    for key in ("stage1", "stage2", "stage3"):
        assert 0 <= held[key]["test"]["recall@10"] <= 1
    with pytest.raises(SystemExit) as e:  # and the other way round
        sr.main(tiny_args(root / "held", "--stages", "3", "--overwrite", "--stage1-init", "fresh"))
    assert one_line_error(e, "stage2.pt was trained with rl_holdout=True", "rl_holdout=False")


def test_stage1_warm_start_copies_the_direct_model_and_moves_its_sid_positions(tiny_run):
    direct, model = tiny_model(trace_len=0, seed=1), tiny_model(trace_len=2, seed=2)
    fresh_trace_rows = model.dec_pos.weight[:2].detach().clone()
    sr.warm_start(model, direct)
    a, b = direct.state_dict(), model.state_dict()
    same = [k for k, v in a.items() if v.is_floating_point() and b[k].shape == v.shape]
    assert {"emb.weight", "enc_pos.weight"} <= set(same) and any(k.startswith("dec.") for k in same)
    assert all(torch.equal(a[k], b[k]) for k in same)  # every weight of equal shape: copied
    assert torch.equal(b["dec_pos.weight"][2:], a["dec_pos.weight"])  # SID and EOS positions after the trace
    assert torch.equal(b["dec_pos.weight"][:2], fresh_trace_rows)  # the trace positions stay fresh
    # in a run: stage 1 starts from base.pt (and needs it)
    root, _ = tiny_run
    shutil.copytree(root / "a", root / "warm")
    res = sr.main(tiny_args(root / "warm", "--stages", "1", "--overwrite", "--stage1-init", "direct"))
    assert 0 <= res["stage1"]["test"]["recall@10"] <= 1
    (root / "warm2").mkdir()
    with pytest.raises(SystemExit) as e:
        sr.main(tiny_args(root / "warm2", "--stages", "1", "--stage1-init", "direct"))
    assert one_line_error(e, "--stage1-init direct", "base.pt", "--stages base")


def test_a_fresh_run_removes_an_older_runs_last_epoch_file(tiny_run, monkeypatch, capsys):
    root, _ = tiny_run
    shutil.copytree(root / "a", root / "stale")
    (root / "stale" / "stage3_last.pt").write_bytes(b"an interrupted older stage 3")
    with monkeypatch.context() as m:  # this run is interrupted before it finishes any epoch
        m.setattr(sr, "evaluate_split", interrupt_on_call(1, sr.evaluate_split))
        with pytest.raises(SystemExit):
            sr.main(tiny_args(root / "stale", "--stages", "3", "--overwrite"))
    assert "in stage3's validation of its starting weights (epoch 0)" in capsys.readouterr().err
    assert not (root / "stale" / "stage3_last.pt").exists()  # a later --resume cannot continue the old run


def test_stage3_keeps_the_stage2_weights_when_no_rl_epoch_beats_them(tiny_run, monkeypatch, capsys):
    root, res = tiny_run
    real, seen = sr.evaluate_split, []

    def rl_looks_worse(cfg, model, split, beam, device):  # every validation after the first: worse
        m = real(cfg, model, split, beam, device)
        seen.append(split)
        return m | {"ndcg@10": -1.0} if split is seen[0] and len(seen) > 1 else m

    monkeypatch.setattr(sr, "evaluate_split", rl_looks_worse)
    shutil.copytree(root / "a", root / "keep")
    kept = sr.main(tiny_args(root / "keep", "--stages", "3", "--overwrite"))["stage3"]
    assert kept["best_epoch"] == 0 and kept["valid"] == kept["start_valid"] and kept["epochs_run"] == 1
    assert kept["test"] == res["stage2"]["test"]  # the stage-2 weights, tested as stage 3
    a, b = (torch.load(root / "keep" / f"{k}.pt", weights_only=True)["model"] for k in ("stage2", "stage3"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "no epoch beat the starting weights" in capsys.readouterr().out
    seen.clear()  # without the epoch-0 candidate the RL epoch is kept, however it validates
    rl = sr.main(tiny_args(root / "keep", "--stages", "3", "--overwrite", "--no-rl-select-start"))["stage3"]
    assert rl["best_epoch"] == 1 and "start_valid" not in rl



def test_rl_judge_ref_scores_the_rewards_with_the_frozen_stage2_copy(tiny_run, monkeypatch):
    """--rl-judge ref: every reward call gets the frozen copy (the stage-2 weights, all stage long);
    --rl-judge policy: the model being trained (trainable, its weights move between calls)."""
    root, _ = tiny_run
    real, calls = sr.stage3_rewards, []

    def spy(cfg, judge, direct, memory, hist, y, d, target, t, negs=None):
        calls.append((any(p.requires_grad for p in judge.parameters()),
                      {n: p.detach().clone() for n, p in judge.named_parameters()}))
        with torch.no_grad():  # the memory, states and t handed over are the judge's own
            own = judge.encode(hist)["kv"]
            assert all(torch.allclose(a, b, atol=1e-5) for kv, kv2 in zip(memory["kv"], own) for a, b in zip(kv, kv2))
            assert torch.allclose(d, sr.teacher_forced(judge, judge.encode(hist), y)[1], atol=1e-5)
            assert torch.allclose(t, sr.target_repr(judge, target, cfg.target_repr), atol=1e-6)
        return real(cfg, judge, direct, memory, hist, y, d, target, t, negs)

    monkeypatch.setattr(sr, "stage3_rewards", spy)
    stage2 = torch.load(root / "a" / "stage2.pt", weights_only=True)["model"]
    for judge in ("ref", "policy"):
        calls.clear()
        out = root / f"judge_{judge}"
        shutil.copytree(root / "a", out)
        sr.main(tiny_args(out, "--stages", "3", "--overwrite", "--rl-judge", judge, "--no-rl-select-start"))
        assert len(calls) >= 2
        moved = any(not torch.equal(calls[0][1][n], w[n]) for _, w in calls[1:] for n in w)
        if judge == "ref":
            assert not moved and not any(trainable for trainable, _ in calls)
            assert all(torch.equal(w, stage2[n]) for n, w in calls[-1][1].items())  # still stage 2
        else:
            assert moved and all(trainable for trainable, _ in calls)

@pytest.mark.parametrize("flags", [
    # the previous reconstruction, kept behind flags for the README comparison
    ["--annotate", "online", "--target-repr", "sid", "--trace-topk", "0", "--self-trace-frac", "0",
     "--dpo-form", "shared", "--lambda-usage", "1", "--sft-warmup", "1", "--rank-negs-from", "random",
     "--rl-data", "prefixes"],
    ["--annot-keep", "gain", "--annot-every", "1", "--epochs", "2", "--match-reward", "level",
     "--rank-negs-from", "popular", "--merge", "lse", "--trace-decode", "greedy", "--skip-history", "on"],
    ["--self-trace-frac", "1", "--match-reward", "exact", "--target-repr", "sid", "--trace-topk", "1",
     "--no-rl-trie", "--rl-credit", "causal"],
])
def test_every_stage2_and_stage3_option_runs(tiny_run, flags):
    root, _ = tiny_run
    out = root / f"opt{abs(hash(tuple(flags))) % 10**6}"
    shutil.copytree(root / "a", out)
    res = sr.main(tiny_args(out, "--stages", "2,3", "--overwrite", *flags))
    for key in ("stage2", "stage3"):
        assert 0 <= res[key]["test"]["recall@10"] <= 1 and math.isfinite(res[key]["history"][-1]["train"]["loss"])
    assert "ll_gain" in res["stage2"]["history"][0]["diag"]


def test_epoch_view_steps_picks_the_epoch_on_the_best_step(tmp_path):
    """--epoch-view steps: each epoch logs every step's validation score, and the best epoch is
    the one whose best view (own or any r_k) scores highest; the per-epoch step views equal the
    final analysis's. --epoch-view own picks on the own view alone."""
    args = tiny_rearec_args(tmp_path, "s", "--method", "prl", "--epochs", "4", "--epoch-view", "steps",
                            "--select-step", "own")
    res = rearec.main(args)
    key = "ndcg@20"
    best = [max([h[f"valid_{key}"]] + [h[f"valid_step{k}_{key}"] for k in range(3)]) for h in res["history"]]
    assert res["best_epoch"] == 1 + int(np.argmax(best))
    cfg = rearec.parse_args(args)
    cfg.n_items = 400
    ds = data.load_dataset(cfg.dataset, verbose=False)
    rearec.resolve_auto(cfg, ds.stats["avg_len"], verbose=False)
    model = rearec.ReaRec(cfg)
    model.load_state_dict(torch.load(tmp_path / "s" / "best.pt", weights_only=False)["model"])
    quick = rearec.evaluate(model, ds.valid, cfg, "cpu", per_step=True)
    full = rearec.evaluate(model, ds.valid, cfg, "cpu", analysis=True)
    for v in ("main", "step0", "step1", "step2"):
        assert quick[v][key] == pytest.approx(full[v][key], abs=1e-12)
    assert max(quick[v][key] for v in quick) == pytest.approx(best[res["best_epoch"] - 1], abs=1e-12)
    own = rearec.main(tiny_rearec_args(tmp_path, "o", "--method", "prl", "--epochs", "4", "--select-step", "own"))
    assert own["best_epoch"] == 1 + int(np.argmax([h[f"valid_{key}"] for h in own["history"]]))
    assert "valid_step0_ndcg@20" not in own["history"][0]


def test_epoch_view_decides_the_best_epoch(tmp_path, monkeypatch):
    """Scripted validation scores: the own view peaks at epoch 1, r_0 at epoch 3. --epoch-view own
    keeps epoch 1, --epoch-view steps epoch 3 (and stops one epoch later at --patience 1 than own
    would at patience 2)."""
    own_scores, step0_scores = [0.30, 0.20, 0.10, 0.05], [0.10, 0.35, 0.40, 0.35]
    calls = []

    def scripted(model, split, cfg, device, per_step=False, **kw):
        e = len(calls)
        calls.append(per_step)
        m = lambda x: {k: x for k in ("ndcg@10", "recall@10", "ndcg@20", "recall@20", "mrr")}  # noqa: E731
        if not per_step:
            return m(own_scores[e])
        return {"main": m(own_scores[e]), "step0": m(step0_scores[e]), "step1": m(0.0), "step2": m(0.0)}

    monkeypatch.setattr(rearec, "evaluate", scripted)
    ds = data.load_dataset(synthetic_file(tmp_path, 100), verbose=False)
    for view, patience, best, epochs in [("own", 2, 1, 3), ("steps", 1, 3, 4)]:
        calls.clear()
        cfg = rearec.parse_args(tiny_rearec_args(tmp_path, view, "--method", "prl", "--epochs", "4",
                                                 "--epoch-view", view, "--patience", str(patience)))
        cfg.n_items = ds.n_items
        rearec.resolve_auto(cfg, ds.stats["avg_len"], verbose=False)
        os.makedirs(cfg.out, exist_ok=True)
        info = rearec.train(cfg, rearec.ReaRec(cfg), ds, torch.device("cpu"))
        assert (info["best_epoch"], info["epoch"]) == (best, epochs), view
        assert calls == [view == "steps"] * epochs


def test_recommend_view_auto_is_the_best_validation_view():
    """--select-step auto: the best validation view, never the oracle; a tie keeps the own view
    (base's r_0 is both); own and a named view are taken as given; an absent view is one line."""
    cfg = rearec.parse_args(["--select-step", "auto"])
    valid = {"main": {"ndcg@20": 0.10}, "step0": {"ndcg@20": 0.10}, "mean": {"ndcg@20": 0.05},
             "oracle": {"ndcg@20": 0.50}, "groups": {}}
    assert rearec.recommend_view(valid, cfg) == "main"
    valid["learned-mix"] = {"ndcg@20": 0.12}
    assert rearec.recommend_view(valid, cfg) == "learned-mix"
    assert rearec.recommend_view(valid, rearec.parse_args(["--select-step", "own"])) == "main"
    assert rearec.recommend_view(valid, rearec.parse_args(["--select-step", "mean"])) == "mean"
    with pytest.raises(SystemExit, match="not a view of this run"):
        rearec.recommend_view(valid, rearec.parse_args(["--select-step", "step3"]))


def test_auto_settings_follow_the_sequence_length():
    """--method auto, --max-len 0, --tau 0 and --dropout -1 take the long (> 100 items) or short
    profile, or the demo's on the built-in synthetic data; values given on the command line stay as
    given; base (auto or given) runs no steps."""
    long = rearec.resolve_auto(rearec.parse_args(["--dataset", "ml-1m"]), avg_len=165.5, verbose=False)
    short = rearec.resolve_auto(rearec.parse_args(["--dataset", "toys.txt"]), avg_len=8.6, verbose=False)
    for cfg, name in [(long, "long"), (short, "short")]:
        assert {k: getattr(cfg, k) for k in ("method", "max_len", "tau", "dropout")} == rearec.AUTO_PROFILES[name]
    assert long.tau != short.tau or long.dropout != short.dropout  # the profiles differ
    assert (long.method, long.steps) == ("base", 0) and (short.method, short.steps) == ("prl", 2)
    given = rearec.resolve_auto(rearec.parse_args(["--dataset", "ml-1m", "--tau", "0.3", "--dropout", "0.0", "--max-len", "7",
                                                   "--method", "erl", "--steps", "3"]), avg_len=165.5, verbose=False)
    assert (given.tau, given.dropout, given.max_len, given.method, given.steps) == (0.3, 0.0, 7, "erl", 3)
    assert rearec.resolve_auto(rearec.parse_args(["--dataset", "toys.txt", "--method", "base"]), avg_len=8.6, verbose=False).steps == 0
    demo = rearec.resolve_auto(rearec.parse_args(["--dataset", "synthetic"]), avg_len=24.5, verbose=False)
    assert demo.method == "base" and (demo.tau, demo.dropout, demo.max_len) == (short.tau, short.dropout, short.max_len)
