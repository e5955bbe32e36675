"""ReaRec: latent multi-step reasoning for sequential recommendation, in one file.

Paper: Jiakai Tang, Sunhao Dai, Teng Shi, Jun Xu, Xu Chen, Wen Chen, Wu Jian, Yuning Jiang.
    "Think Before Recommend: Unleashing the Latent Reasoning Power for Sequential
    Recommendation". arXiv:2503.22675 (v3, Aug 2025; the equations and tables cited below).
Official code: https://github.com/TangJiakai/ReaRec (commit 7f46432), compared line by line.

Implements:
    - a SASRec-style causal Transformer backbone (item + position embeddings, post-LN layers,
      tied output embeddings, full-softmax cross-entropy over all items) and a BERT4Rec-style
      bidirectional variant with the paper's prefix mask (--backbone bert4rec)
    - reasoning (§3.1.2): K autoregressive steps that feed the last hidden state back as a new
      input token plus a reasoning position embedding (RPE), with a key/value cache
    - training of the reasoning at EVERY position of a sequence in one pass (SASRec)
    - methods: base (K=0), naive (no RPE), rpe, erl (§3.2), prl (§3.3)
    - per-step metrics and the label-chosen "oracle" step (the paper's Fig. 2 ceiling)
    - adaptive reasoning depth, the paper's open problem: step selectors that choose a step per
      case without the label (entropy, mean, halting, a tiny learned head), chosen on validation
    - metrics by quartile of history length and of target popularity (the paper's Fig. 4)
    - early stopping on validation, atomic checkpoints, --resume, a speed/memory benchmark
Omits: the text-based backbones (UniSRec, MoRec: LLaMA features, not released).

Run:
    python rearec.py --method erl                        # synthetic data, ERL, K=2: ~1-3 min on CPU
    python rearec.py                                     # the defaults: plain SASRec on this demo (--method auto)
    python rearec.py --dataset ml-1m --device cuda       # ML-1M, downloaded into ./data once
    python rearec.py --dataset path/to/ml-1m.txt --benchmark   # speed and memory, K=0 vs K=2
    for K in 1 2 3 4 5; do python rearec.py --method prl --steps $K --out runs/k$K; done  # the K sweep (Fig. 5) ...
    python data.py --report runs --views && python data.py --plot runs     # ... as a table and figures

Notation (paper -> code):
    E (item embeddings, tied with the output layer)     item_emb.weight      (N+1, D), row 0 = PAD
    p_i (absolute position embeddings)                  pos_emb
    P^R = [p^R_1..p^R_K] (reasoning position emb.)      reason_pos_emb       (K, D)
    K (reasoning steps)                                 cfg.steps
    r_0..r_K (reasoning hidden states; r_0 = SASRec)    R[..., k, :]
    tau, alpha (PRL: tau_k = tau * alpha^(K-k))         cfg.tau, cfg.alpha
    lambda (ERL KL weight), gamma (PRL noise std)       cfg.kl_weight, cfg.noise
Shapes: B batch, L history window, P reasoning chains per row (L when training every position,
    1 at inference), K steps, D hidden, H heads, N items (+1 PAD column at index 0).
"""
import argparse
import copy
import ctypes
import dataclasses
import gc
import inspect
import json
import math
import os
import random
import re
import resource
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data


# -----------------------------------------------------------------------------
# Config
# -----------------------------------------------------------------------------
@dataclass
class Config:
    # data (data.py documents every preprocessing default)
    dataset: str = "synthetic"  # synthetic | ml-1m | amazon2023-<Cat>[-time] | ... | a file path
    data_dir: str = "data"  # download cache
    split: str | None = None  # loo | time; None = the dataset's default
    min_rating: float | None = None  # implicit-feedback threshold; None = the dataset's default
    kcore: int | None = None  # k-core filter, 0 = off; None = the dataset's default
    max_len: int = 0  # L, items of history read; 0 = auto, per dataset (AUTO_PROFILES: 200 if the average sequence is > 100 items, as SASRec on ML-1M, else 50, the paper's setup)
    mask_history: bool = True  # evaluation: do not rank items already in the history (Deviation: paper/official do not mask; --no-mask-history)
    # model
    method: str = "auto"  # base | naive | rpe | erl | prl (paper §3, §4.3.2 ablations); auto = per dataset (AUTO_PROFILES: prl on short sparse sequences, the only method above base on Toys over 3 seeds; base on long ones, where none beat it, and on the 20-epoch synthetic demo; README "Tuning"; Deviation: official default PRL)
    backbone: str = "sasrec"  # sasrec (causal) | bert4rec (bidirectional items, paper's prefix mask)
    steps: int = 2  # K, reasoning steps (paper: best at 2; official: reason_step); base uses 0
    hidden: int = 64  # D (Deviation: paper/official 256; 64 keeps ML-1M practical on a CPU)
    layers: int = 2  # Transformer layers (official default)
    heads: int = 2  # attention heads (official default)
    ffn: int = 256  # feed-forward inner size (official: 300 with D=256)
    norm: str = "post"  # post: LN after each residual (official code, RecBole's SASRec) | pre: LN before each sublayer and once after the last layer (the SASRec paper, §III-B; Deviation from the official code; a tie on Toys, -1.5 % on ML-1M, README "Tuning")
    dropout: float = -1.0  # attention and hidden dropout; -1 = auto, per dataset (AUTO_PROFILES: 0.5 on short sparse data as the official code, 0.2 on ML-1M as SASRec)
    emb_dropout: float = 0.2  # dropout on every input token (official: hard-coded 0.2)
    tau: float = 0.0  # softmax temperature of every CE and of the InfoNCE; 0 = auto, per dataset (AUTO_PROFILES; Deviation: official default 0.07, not in the paper's grid)
    # ERL (paper §3.2)
    kl_weight: float = 0.01  # lambda (paper grid 0.001-0.1; official default 0.05, its issue #4 advises lower; Toys screen, README "Tuning"); at most 1: above, maximising the KL outweighs the CE
    kl_stopgrad: bool = True  # stop-gradient on log p_i in KL(p_j || p_i) (official code)
    # PRL (paper §3.3)
    alpha: float = 1.2  # temperature growth per step back (official temp_scale 5; paper grid 1.2-5: 1.2 the best of the Toys screens at tau 5, ahead of 2 and 5, README "Tuning")
    noise: float = 0.01  # gamma, the STD of the noise on reasoning inputs (official noise_factor; the paper's N(0, gamma I) reads as a variance)
    pl_weight: float = 1.0  # weight of the progressive CE on steps 0..K-1 (official)
    cl_weight: float = 1.0  # weight of the reasoning-aware contrastive term (official)
    cl_tau: float = 0.0  # temperature of the contrastive InfoNCE; 0 = --tau (official: one temperature)
    cl_anchors: int = 8  # contrastive chains per user, at distinct random positions; only other users' chains are negatives (Deviation: official 1; 8 validates higher on Toys, 3 seeds, README "Tuning")
    cl_reencode: bool = False  # the noisy view re-encodes the items with its own dropout (official); off: reuse the clean item cache
    warmup: int = 2  # epochs without the contrastive term (official: warmup); used when --warmup-steps is -1
    warmup_steps: int = -1  # optimiser steps without the contrastive term; -1 = count --warmup epochs instead (official)
    prl_sum: bool = False  # paper's sums over steps (Official code: means, the default)
    # training
    epochs: int = 0  # maximum epochs; 0 = auto: 20 on the built-in synthetic data (a 1-3 min demo), else 200 (official: 300; early stopping ends runs long before)
    patience: int = 10  # early stopping: epochs without a better validation score, >= 1 (official: 10)
    select_metric: str = "ndcg@20"  # validation metric for model selection (official: NDCG@20)
    epoch_view: str = "own"  # the validation view that picks the best epoch (best.pt, early stopping): own (the method's rule; official) | steps (the best of own and each step r_0..r_K that epoch; Deviation, opt-in: for --select-step auto, which often recommends with an early step)
    selector_fit: str = "valid"  # cases the learned step selector is fitted on: valid (held out; test never) | train (random training positions)
    select_step: str = "auto"  # the view that recommends in the final evaluation: auto (the best on validation: on Toys PRL r_0 or learned-mix, not its last step, README "Tuning"; Deviation: the paper recommends with its own rule) | own (the paper's rule: ERL mean, else r_K) | stepK | entropy | mean | halt0.5 | halt0.8 | learned | learned-mix
    batch_size: int = 64  # users per batch; every position of a user is a target (ML-1M: ~7,000 per step; official: 2,048 rows). 64, not SASRec's 128: K=2 triples the tokens, and ML-1M at L=200 stays under 3 GB
    bucket: int = 8  # length bucketing: sort pools of this many batches by length (data.py); 0 = off
    lr: float = 1e-3  # Adam learning rate (official)
    weight_decay: float = 0.0  # official l2 = 0
    grad_clip: float = 0.0  # max gradient norm, 0 = off (official: off)
    eval_batch_size: int = 128  # users per evaluation batch (ML-1M, L=200: 128 is faster than 512 on a CPU and needs 0.3 GB, not 0.8)
    loss_chunk: int = -1  # output-layer losses in pieces of this many logit rows (a row: one state's N scores); -1 = auto: 256 on CPU (cache-sized pieces run fastest), 8192 on GPU; 0 = all at once
    # run
    device: str = "auto"  # auto | cpu | cuda | cuda:i | mps
    dtype: str = "float32"  # float32 | bfloat16: on CUDA autocast of the whole model; on a CPU with native bf16, the output-layer matmuls only
    threads: int = 0  # CPU threads for torch, 0 = torch's default (use 1 when several runs share a CPU)
    seed: int = 0  # official: 0
    out: str = "runs/rearec"  # checkpoints and results.json; a folder holding another run is refused unless --resume or --overwrite; locked (out/.lock) while a run uses it
    resume: bool = False  # continue the run in --out from out/last.pt
    overwrite: bool = False  # start a new run in an --out that holds another one (its files are replaced once this run finishes its first epoch)
    benchmark: bool = False  # measure speed and memory (K=0 vs K=2) instead of training
    oracle_runs: str = ""  # analysis instead of training: comma-separated folders of finished runs on --dataset; ranks with each run's own view (the method's rule, as --select-step own), their ensemble and the per-case oracle over them (README "Is the oracle gap a signal?"); writes out/oracle_runs.json
    n_items: int = 0  # (derived at runtime)


METHODS = ("base", "naive", "rpe", "erl", "prl")
# The settings only one method reads (the others ignore them): results.json lists a run's ignored
# ones as "unused_config", so `data.py --report` neither shows nor matches on them.
METHOD_FIELDS = {"erl": ("kl_weight", "kl_stopgrad"),
                 "prl": ("alpha", "noise", "pl_weight", "cl_weight", "cl_tau", "cl_anchors", "cl_reencode",
                         "warmup", "warmup_steps", "prl_sum")}


def unused_config(cfg):
    """The config fields this run's method ignores (METHOD_FIELDS of the other methods)."""
    return sorted(f for m, fields in METHOD_FIELDS.items() if m != cfg.method for f in fields)
MAX_LEN = 10_000  # --max-len cap: 50x SASRec's 200; position tables and (B, L) windows grow with L


def field_help():
    """Config field -> its trailing comment, so --help shows exactly the comments above."""
    try:
        return dict(re.findall(r"^\s+(\w+): [^#\n]*#\s*(.*)$", inspect.getsource(Config), flags=re.M))
    except (OSError, TypeError):  # no source (e.g. a frozen build): flags without help text
        return {}


# Per-dataset defaults, from the validation sweeps in the README ("Tuning"). --method auto,
# --max-len 0, --tau 0 and --dropout -1 take the profile of the data's average sequence length:
#   long  (> 100 items: MovieLens-like; tuned on ML-1M): plain SASRec (no reasoning method beat it),
#         SASRec's L = 200, dropout 0.2
#   short (sparse Amazon-like; tuned on S3-Rec's Toys 5-core): PRL (with --alpha 1.2, --cl-anchors 8
#         and --select-step auto, above base on validation and test over 3 seeds), L = 50, dropout 0.5
#   demo  (the built-in synthetic data, 20 epochs): as short, but plain SASRec: PRL learns this data
#         more slowly and trails base by 18 % at 20 epochs, 3.5 % at 80 (README "Set up and run")
AUTO_PROFILES = {"long": {"method": "base", "max_len": 200, "tau": 0.5, "dropout": 0.2},
                 "short": {"method": "prl", "max_len": 50, "tau": 5.0, "dropout": 0.5},
                 "demo": {"method": "base", "max_len": 50, "tau": 5.0, "dropout": 0.5}}
AUTO_VALUE = {"method": "auto", "max_len": 0, "tau": 0, "dropout": -1}  # the value that means "auto"


def resolve_auto(cfg, avg_len, verbose=True):
    """Fill the auto settings (AUTO_VALUE) from AUTO_PROFILES and say so."""
    name = "demo" if cfg.dataset == "synthetic" else "long" if avg_len > 100 else "short"
    auto = {k: v for k, v in AUTO_PROFILES[name].items() if getattr(cfg, k) == AUTO_VALUE[k]}
    for k, v in auto.items():
        setattr(cfg, k, v)
    if cfg.method == "base":
        cfg.steps = 0  # base = the plain backbone: no reasoning steps
    if auto and verbose:
        what = "the synthetic demo" if name == "demo" else f"{name} sequences (average {avg_len} items; the README's sweeps)"
        print(f"auto settings for {what}: "
              + ", ".join(f"{k} {v}" for k, v in auto.items()))
    return cfg


def parse_args(argv=None):
    """argparse generated from the Config fields: --max-len (or --max_len), --no-mask-history..."""
    p = argparse.ArgumentParser(description="ReaRec (arXiv:2503.22675): SASRec/BERT4Rec + latent "
                                "reasoning steps, trained with ERL or PRL, full-ranking evaluation.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    helps = field_help()
    for f in dataclasses.fields(Config):
        if f.name == "n_items":
            continue
        flags = [f"--{f.name.replace('_', '-')}"] + ([f"--{f.name}"] if "_" in f.name else [])
        text = helps.get(f.name, "").replace("%", "%%")
        if f.type is bool:
            p.add_argument(*flags, dest=f.name, default=f.default, action=argparse.BooleanOptionalAction,
                           help=text)
        else:
            kind = {"int | None": int, "float | None": float, "str | None": str}.get(str(f.type), f.type)
            p.add_argument(*flags, dest=f.name, default=f.default, type=kind, metavar=f.name.upper(),
                           help=text)
    cfg = Config(**vars(p.parse_args(argv)))
    for f in dataclasses.fields(cfg):  # nan and inf pass the comparisons below, then break training
        v = getattr(cfg, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            sys.exit(f"error: --{f.name.replace('_', '-')} must be a finite number, not {v}")
    for ok, message in [
        (cfg.method in METHODS + ("auto",), f"--method must be auto or one of {', '.join(METHODS)}, not {cfg.method!r}"),
        (cfg.backbone in ("sasrec", "bert4rec"), f"--backbone must be sasrec or bert4rec, not {cfg.backbone!r}"),
        (cfg.steps >= 0, f"--steps must be >= 0, not {cfg.steps}"),
        (cfg.heads >= 1, f"--heads must be >= 1, not {cfg.heads}"),
        (cfg.heads >= 1 and cfg.hidden > 0 and cfg.hidden % cfg.heads == 0, f"--hidden ({cfg.hidden}) must be a positive multiple of --heads ({cfg.heads})"),
        (cfg.layers >= 1 and cfg.ffn >= 1, "--layers and --ffn must be >= 1"),
        (cfg.norm in ("post", "pre"), f"--norm must be post or pre, not {cfg.norm!r}"),
        ((0 <= cfg.dropout < 1 or cfg.dropout == -1) and 0 <= cfg.emb_dropout < 1, "dropouts must be in [0, 1) (--dropout -1: auto)"),
        (cfg.tau >= 0 and cfg.alpha > 0, "--tau must be > 0 (0: auto) and --alpha > 0"),
        (cfg.noise >= 0 and cfg.kl_weight >= 0, "--noise and --kl-weight must be >= 0"),
        (cfg.kl_weight <= 1, f"--kl-weight must be <= 1, not {cfg.kl_weight}: ERL subtracts lambda * KL from the loss, and above 1 "
                             f"pushing the steps apart outweighs the CE (paper grid 0.001-0.1)"),
        (min(cfg.pl_weight, cfg.cl_weight, cfg.cl_tau) >= 0, "--pl-weight, --cl-weight and --cl-tau must be >= 0 (--cl-tau 0 = --tau)"),
        (cfg.cl_anchors >= 1, f"--cl-anchors must be >= 1, not {cfg.cl_anchors}"),
        (cfg.warmup >= 0 and cfg.warmup_steps >= -1, "--warmup must be >= 0 and --warmup-steps >= -1 (-1 = count --warmup epochs)"),
        (cfg.max_len >= 0 and cfg.epochs >= 0 and cfg.batch_size > 0 and cfg.lr > 0, "--max-len, --epochs must be >= 0; --batch-size, --lr > 0"),
        (cfg.max_len <= MAX_LEN, f"--max-len must be 0 (auto) to {MAX_LEN} items, not {cfg.max_len}"),
        (cfg.patience >= 1, f"--patience must be >= 1, not {cfg.patience}: early stopping would end the run before its first epoch"),
        (cfg.bucket >= 0, f"--bucket must be >= 0 (0 = off), not {cfg.bucket}: a negative pool gives no training batches"),
        (cfg.weight_decay >= 0 and cfg.grad_clip >= 0, "--weight-decay and --grad-clip must be >= 0 (0 = off)"),
        (cfg.eval_batch_size >= 1, f"--eval-batch-size must be >= 1, not {cfg.eval_batch_size}"),
        (0 <= cfg.seed < 2**32, f"--seed must be in 0..2^32-1 (numpy's seed range), not {cfg.seed}"),
        (cfg.kcore is None or cfg.kcore >= 0, f"--kcore must be >= 0 (0 = off), not {cfg.kcore}"),
        (not (cfg.resume and cfg.overwrite), "--resume continues the run in --out and --overwrite replaces it; pass one of them"),
        (cfg.dtype in ("float32", "bfloat16"), f"--dtype must be float32 or bfloat16, not {cfg.dtype!r}"),
        (cfg.threads >= 0, f"--threads must be >= 0, not {cfg.threads}"),
        (cfg.loss_chunk >= -1, f"--loss-chunk must be -1 (auto), 0 (all at once) or a row count, not {cfg.loss_chunk}"),
        (cfg.select_step in ("own", "auto", "entropy", "mean", "learned", "learned-mix")
         + tuple(f"halt{t}" for t in HALT_THRESHOLDS) or re.fullmatch(r"step\d+", cfg.select_step),
         f"--select-step must be own, auto, stepK, entropy, mean, {', '.join(f'halt{t}' for t in HALT_THRESHOLDS)}, "
         f"learned or learned-mix, not {cfg.select_step!r}"),
        (cfg.selector_fit in ("valid", "train"), f"--selector-fit must be valid or train, not {cfg.selector_fit!r}"),
        (cfg.epoch_view in ("own", "steps"), f"--epoch-view must be own or steps, not {cfg.epoch_view!r}"),
        (cfg.select_metric in [f"{m}@{k}" for m in ("ndcg", "recall", "mrr") for k in data.KS] + ["mrr"],
         f"--select-metric must be ndcg@k, recall@k or mrr@k with k in {data.KS}, or mrr"),
    ]:
        if not ok:
            sys.exit(f"error: {message}")
    return cfg  # auto values (and base's steps = 0) are filled in by resolve_auto once the data is read


# -----------------------------------------------------------------------------
# Utilities (BOILERPLATE; the same few lines are in stream_rec.py, on purpose)
# -----------------------------------------------------------------------------
def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too


def pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            sys.exit(f"error: --device {name} asked for, but this torch ({torch.__version__}) sees no "
                     f"CUDA GPU; use --device cpu or auto")
        if ":" in name and int(name.split(":")[1]) >= torch.cuda.device_count():
            sys.exit(f"error: --device {name}: only {torch.cuda.device_count()} CUDA device(s) found")
    elif name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        sys.exit("error: --device mps asked for, but MPS is not available; use --device cpu or auto")
    elif name not in ("cpu", "mps") and not name.startswith("cuda"):
        sys.exit(f"error: --device must be auto, cpu, cuda, cuda:i or mps, not {name!r}")
    return torch.device(name)


def cpu_has_bf16():
    """Whether this CPU computes bf16 matmuls natively (AVX512-BF16 / AMX); elsewhere torch
    emulates them, slower than float32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def save_atomic(obj, path):
    """torch.save to a temp file, then rename: a crash never leaves a half-written file."""
    tmp = path + ".tmp"
    try:
        torch.save(obj, tmp)
    except BaseException:  # Ctrl-C or a full disk mid-write: drop the partial temp file
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


def load_checkpoint(path, device, keys):
    """torch.load of one of this script's checkpoints; a damaged file (truncated by a full disk or
    a kill, overwritten, random bytes) is one line, not an unpickling traceback. keys: the entries
    the checkpoint must have."""
    try:
        ck = torch.load(path, map_location=device, weights_only=False)
        ok = all(k in ck for k in keys)
    except Exception:  # torch.load raises many types here: UnpicklingError, RuntimeError, EOFError...
        ok = False
    if not ok:
        sys.exit(f"error: {path} is corrupt or incomplete; delete it or use a new --out")
    return ck


# -----------------------------------------------------------------------------
# The run folder --out: checked before any work, locked while a run uses it (BOILERPLATE; the same
# helpers are in stream_rec.py, duplicated on purpose so this file stands alone)
# -----------------------------------------------------------------------------
RUN_FILES = ("last.pt", "best.pt", "results.json")  # a folder holding one of these holds a run


def check_out(cfg):
    """Before any work: --out is a folder (or does not exist yet), and a new run does not replace
    the run already in it unless --overwrite says so (--resume continues that run instead)."""
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        sys.exit(f"error: --out {cfg.out} is a file, not a folder; pass a folder path")
    if cfg.benchmark or cfg.oracle_runs:  # writes benchmark.json / oracle_runs.json only, beside whatever the folder holds
        return
    last = os.path.join(cfg.out, "last.pt")
    if cfg.resume and not os.path.exists(last):
        sys.exit(f"error: --resume: no checkpoint at {last}; run once without --resume")
    found = [f for f in RUN_FILES if os.path.exists(os.path.join(cfg.out, f))]
    if found and not (cfg.resume or cfg.overwrite):
        sys.exit(f"error: {cfg.out} holds another run ({', '.join(found)}); continue it with --resume, "
                 f"replace it with --overwrite, or use a new --out")


def remove_old_run(out):
    """--overwrite: the previous run's files go once this run has its first epoch to save (until
    then an interrupted new run leaves the old one whole)."""
    for f in RUN_FILES:
        if os.path.exists(os.path.join(out, f)):
            os.remove(os.path.join(out, f))


def memory_error_line(e):
    """One line for a failed allocation (sizes too large for this machine); None for other errors."""
    text = str(e)
    if not (isinstance(e, MemoryError) or re.search(r"out of memory|can't allocate|not enough memory", text, re.I)):
        return None
    asked = re.search(r"allocate (\d+) bytes", text)
    what = f"{int(asked.group(1)) / 2**30:.1f} GiB asked for" if asked else text.strip().splitlines()[0][:120]
    return f"out of memory ({what}); lower --batch-size, --eval-batch-size, --max-len or --hidden"


# -----------------------------------------------------------------------------
# Model: SASRec backbone + reasoning with a KV cache (paper §3.1.2)
# -----------------------------------------------------------------------------
def attend(q, k, v, mask, k_own=None, v_own=None, dropout=None):
    """Scaled dot-product attention over item keys, plus (for reasoning tokens) each chain's own
    earlier reasoning tokens.

    q (B, H, P, dh); k, v (B, H, L, dh) item keys/values; mask (B or 1, 1, P, L) True = may attend.
    k_own, v_own (B, H, P, S, dh): the keys/values of chain p's reasoning tokens 1..S (the current
    token included). Chains never see each other's reasoning tokens. Returns (B, H, P, dh).
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, P, L)
    scores = scores.masked_fill(~mask, float("-inf"))
    if k_own is not None:
        own = torch.einsum("bhpd,bhpsd->bhps", q, k_own) * scale  # (B, H, P, S)
        scores = torch.cat([scores, own], dim=-1)  # (B, H, P, L+S)
    att = torch.softmax(scores, dim=-1)
    if dropout is not None:
        att = dropout(att)
    L = k.shape[2]
    out = att[..., :L] @ v  # (B, H, P, dh)
    if k_own is not None:
        out = out + torch.einsum("bhps,bhpsd->bhpd", att[..., L:], v_own)
    return out


class Layer(nn.Module):
    """One Transformer layer, in one of two LayerNorm placements (--norm):
    post (official code, copied there from RecBole's SASRec):
        x = LN(x + Dropout(W_o MHA(x)));  x = LN(x + Dropout(W_2 GELU(W_1 x)))
    pre (the SASRec paper, §III-B: g(x) = x + Dropout(g(LN(x)))):
        x = x + Dropout(W_o MHA(LN(x)));  x = x + Dropout(W_2 GELU(W_1 LN(x)))
    Keys and values are computed from the same input as the queries (LN(x) in pre), so the KV
    cache holds them for either placement."""

    def __init__(self, cfg):
        super().__init__()
        D = cfg.hidden
        self.heads = cfg.heads
        self.pre = cfg.norm == "pre"
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)
        self.ln1 = nn.LayerNorm(D, eps=1e-12)
        self.ffn = nn.Sequential(nn.Linear(D, cfg.ffn), nn.GELU(), nn.Linear(cfg.ffn, D))
        self.ln2 = nn.LayerNorm(D, eps=1e-12)
        self.attn_drop = nn.Dropout(cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def qkv_heads(self, x):
        """(B, T, D) -> q, k, v, each (B, H, T, dh)."""
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x) if self.pre else x).split(D, dim=-1)
        return [t.view(B, T, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v)]

    def finish(self, x, ctx):
        """Residual (+ LN) around the attention output ctx (B, H, T, dh), then the FFN block."""
        B, T, D = x.shape
        ctx = ctx.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        if self.pre:
            x = x + self.drop(self.proj(ctx))
            return x + self.drop(self.ffn(self.ln2(x)))
        x = self.ln1(x + self.drop(self.proj(ctx)))
        return self.ln2(x + self.drop(self.ffn(x)))


class ReaRec(nn.Module):
    """SASRec (or BERT4Rec) backbone + K latent reasoning steps. The only parameters reasoning
    adds are the K x D reasoning position embeddings (paper §3.1.2); everything else is shared."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        D, K = cfg.hidden, cfg.steps
        self.item_emb = nn.Embedding(cfg.n_items + 1, D)  # row 0 = PAD; tied with the output layer
        self.pos_emb = nn.Embedding(cfg.max_len, D)  # position 0 = the OLDEST item in the window
        # ALGO LOGIC: reasoning position embeddings P^R (paper §3.1.2). A separate table,
        # not more rows of pos_emb: reasoning token k is not "the item at position L+k", it
        # marks which step of thinking this is, and the same k follows every history length.
        # The naive ablation feeds r_{k-1} back with no such marker (paper §4.3.2).
        self.reason_pos_emb = nn.Embedding(K, D) if K > 0 and cfg.method != "naive" else None
        self.in_ln = nn.LayerNorm(D, eps=1e-12)  # applied to EVERY input token (official wrapper)
        self.in_drop = nn.Dropout(cfg.emb_dropout)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.layers))
        # pre-LN leaves the residual stream unnormalised: one LN after the last layer (SASRec)
        self.out_ln = nn.LayerNorm(D, eps=1e-12) if cfg.norm == "pre" else nn.Identity()
        self.apply(self._init)

    @staticmethod
    def _init(m):
        # Official init: N(0, 0.02) for Linear and Embedding weights, zero biases. Small item
        # embeddings matter with a tied output layer (N(0, 1) makes the first logits huge).
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def encode(self, items, cut=None):
        """Encode the items once and keep every layer's keys/values (the KV cache).

        items (B, L) left-padded. cut (B,) bert4rec only: the last item position each row may use.
        Returns h (B, L, D) final-layer item states, cache [(k, v) (B, H, L, dh)] per layer, and
        key_ok (B, 1, 1, L): which item keys exist (not padding, not beyond the cut).
        """
        B, L = items.shape
        not_pad = items != data.PAD  # (B, L)
        pos = (not_pad.cumsum(1) - 1).clamp(min=0)  # oldest item = 0 (official); pads masked below
        x = self.in_drop(self.in_ln(self.item_emb(items) + self.pos_emb(pos)))  # Eq. 2 (B, L, D)
        key_ok = not_pad
        if cut is not None:
            key_ok = key_ok & (torch.arange(L, device=items.device) <= cut[:, None])
        key_ok = key_ok[:, None, None, :]  # (B, 1, 1, L)
        eye = torch.eye(L, dtype=torch.bool, device=items.device)
        if self.cfg.backbone == "sasrec":  # causal: item t sees items <= t
            mask = key_ok & torch.tril(torch.ones(L, L, dtype=torch.bool, device=items.device))
        else:  # bert4rec: items see each other both ways (within the prefix)
            mask = key_ok.expand(B, 1, L, L)
        mask = mask | eye  # padding queries see themselves only: no all-masked row, no NaN
        cache = []
        for layer in self.layers:
            q, k, v = layer.qkv_heads(x)  # (B, H, L, dh) each
            cache.append((k, v))
            x = layer.finish(x, attend(q, k, v, mask, dropout=layer.attn_drop))
        return self.out_ln(x), cache, key_ok

    def reason(self, cache, key_ok, chain_pos, r0, steps, feed=None, noise=0.0):
        """ALGO LOGIC: K autoregressive reasoning steps (paper §3.1.2) with a KV cache.

        Chain p of row b starts from r0[b, p], the final state of the item at position
        chain_pos[b, p], and reasons as if the sequence ended there: its tokens attend to the items
        at positions <= chain_pos (causal SASRec; bert4rec: the whole prefix) and to the chain's
        own earlier reasoning tokens (paper: "reasoning tokens attend causally"), never to other
        chains. One step costs ONE new token per chain; item keys/values come from the cache.

        Step k: input h^0 = r_{k-1} + p^R_k  (-> LN -> dropout, like every input token)
                r_k = final-layer output at the new token.
        feed (B, P, K, D): build the inputs from these states instead of the chain's own (PRL's
            noisy view follows the clean chain: official code); noise: std of N(0, noise^2) added
            to each input before the LN (PRL, paper §3.3).
        chain_pos (B or 1, P). Returns R = [r_0 .. r_K] (B, P, K+1, D).
        """
        L = key_ok.shape[-1]
        # chain p may read item keys at positions <= its own position (and that exist)
        chain_mask = key_ok & (torch.arange(L, device=r0.device) <= chain_pos[..., None])[:, None]  # (B, 1, P, L)
        states, r = [r0], r0
        own = [([], []) for _ in self.layers]  # per layer: this chain's reasoning keys, values
        for k in range(1, steps + 1):
            z = (feed[:, :, k - 1] if feed is not None else r)  # (B, P, D)
            if self.reason_pos_emb is not None:
                z = z + self.reason_pos_emb.weight[k - 1]  # + p^R_k
            if noise > 0:
                z = z + noise * torch.randn_like(z)  # Paper §3.3: h~ = h + eps
            x = self.in_drop(self.in_ln(z))  # (B, P, D)
            for (k_item, v_item), layer, (ks, vs) in zip(cache, self.layers, own):
                q, k_new, v_new = layer.qkv_heads(x)  # (B, H, P, dh)
                ks.append(k_new)
                vs.append(v_new)
                ctx = attend(q, k_item, v_item, chain_mask, torch.stack(ks, 3), torch.stack(vs, 3),
                             dropout=layer.attn_drop)
                x = layer.finish(x, ctx)
            r = self.out_ln(x)
            states.append(r)
        return torch.stack(states, dim=2)  # (B, P, K+1, D)

    def forward(self, items):
        """Inference: reason after the last item. items (B, L) -> R (B, K+1, D)."""
        h, cache, key_ok = self.encode(items)
        last = torch.full((1, 1), items.shape[1] - 1, device=items.device)
        return self.reason(cache, key_ok, last, h[:, -1:], self.cfg.steps)[:, 0]

    def user_state(self, R):
        """The method's own view (the paper's rule, --select-step own): the mean over steps for ERL
        (paper §3.2), r_K for every other method (PRL: "inference uses the last step", paper §3.3).
        The final evaluation may recommend with another view: recommend_view, --select-step auto."""
        return R.mean(dim=-2) if self.cfg.method == "erl" else R[..., -1, :]


# -----------------------------------------------------------------------------
# Losses (paper §3.2 ERL, §3.3 PRL)
# -----------------------------------------------------------------------------
class CELoss(torch.autograd.Function):
    """Next-item cross-entropies of S states per case, each at its own temperature, weighted and
    summed, with the gradient written out (MACHINERY: the formulas are in ce_loss / prl_loss).

    For each case v (V of them) and state s (S of them):
        z_vs = r_vs E^T / tau_s,   CE_s = mean_v -log softmax(z_vs)[target_v]
        L = sum_s w_s CE_s
    base / naive / rpe: S = 1, w = 1. PRL: S = K+1 (r_0..r_K), tau_s = tau alpha^(K-s),
    w = (pl_weight/K, ..., pl_weight/K, 1) (paper sums: pl_weight instead of pl_weight/K).
    The gradient w.r.t. the logits is w_s (softmax(z_vs) - onehot(target_v)) / V; each piece of
    cases turns it into gradients for R and E at once and frees its (cases, S, N) logits. Against
    autograd with checkpointed pieces (the earlier form) this does 3 output-layer matmuls instead
    of 4 and one softmax pass instead of three; test_all.py checks value and gradients against
    autograd on the formulas, and bfloat16 against float32.
    mm_dtype: the dtype of the three matmuls (torch.bfloat16 with --dtype bfloat16: 2-3x faster on
    CPUs with native bf16); the softmax always runs in float32.
    Returns (L, CE_s for every s).
    """

    @staticmethod
    def forward(ctx, R, E, target, taus, weights, chunk, mm_dtype):
        # R (V, S, D); E (N, D) item embeddings (no PAD row); target (V,) in 0..N-1; taus, weights (S,)
        ctx.dtypes = R.dtype, E.dtype
        with torch.autocast(R.device.type, enabled=False):
            R, E = R.float(), E.float()
            V, S, _ = R.shape
            inv_tau = (1.0 / taus.float())[:, None]  # (S, 1)
            w = (weights.float() / max(V, 1))[:, None]  # (S, 1): the mean over cases folded in
            E_mm, Et_mm = E.to(mm_dtype), E.T.contiguous().to(mm_dtype)  # (N, D), (D, N)
            dR, dE = torch.empty_like(R), torch.zeros_like(E)
            ce_sum = R.new_zeros(S)
            chunk = chunk if chunk > 0 else max(V, 1)
            for a in range(0, V, chunk):
                r = R[a:a + chunk] * inv_tau  # (c, S, D): r_s / tau_s
                t = target[a:a + chunk, None, None].expand(-1, S, 1)  # (c, S, 1)
                z = (r.to(mm_dtype) @ Et_mm).float()  # (c, S, N) logits
                p = F.softmax(z, dim=-1)  # (c, S, N): the one pass over all N (no log_softmax)
                p_t = p.gather(-1, t)  # (c, S, 1)
                ce = -p_t.log()  # -log softmax(z)[target]
                low = p_t < 1e-30  # float32 runs out of precision: the target is > 69 nats below (rare)
                if low.any():
                    ce = torch.where(low, z.logsumexp(-1, keepdim=True) - z.gather(-1, t), ce)
                ce_sum += ce.sum(dim=(0, 2))
                g = p.scatter_add_(-1, t, -torch.ones_like(ce)).mul_(w)  # (c, S, N): w_s (p - onehot) / V
                g_mm = g.to(mm_dtype)
                dR[a:a + chunk] = (g_mm @ E_mm).float() * inv_tau  # (c, S, D)
                dE += (g_mm.flatten(0, 1).T @ r.flatten(0, 1).to(mm_dtype)).float()  # (N, D)
            ce = ce_sum / max(V, 1)
        ctx.save_for_backward(dR, dE)
        ctx.mark_non_differentiable(ce)
        return (weights.float() * ce).sum(), ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce):
        dR, dE = ctx.saved_tensors
        R_dtype, E_dtype = ctx.dtypes
        return (grad_loss * dR).to(R_dtype), (grad_loss * dE).to(E_dtype), None, None, None, None, None


def mm_dtype(cfg):
    """The dtype of the output-layer matmuls: bfloat16 with --dtype bfloat16, else float32."""
    return torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32


def ce_loss(R, target, item_emb, cfg):
    """Next-item cross-entropy of one state per case (base, naive, rpe; paper Eq. for L_Rec):
        CE = mean_v -log softmax(r_v E^T / tau)[target_v],  a plain dot product with the tied item
    embeddings. R (V, D), target (V,) item ids, item_emb (N+1, D). Returns (loss, {"ce": ..}).
    Deviation: the PAD row is no candidate (item_emb[1:]); the official code keeps it in the
    training softmax. It can never be a target, so removing it only removes noise."""
    one = R.new_ones(1)
    loss, _ = CELoss.apply(R[:, None], item_emb[1:], target - 1, cfg.tau * one, one,
                           piece(cfg, 1, R.device), mm_dtype(cfg))
    return loss, {"ce": loss.detach()}


class ERLLoss(torch.autograd.Function):
    """ERL objective, ReaRec §3.2 (v3 and the official code), with its gradient written out.

    For each case (V of them) and each state r_k, k = 0..K (S = K+1 states):
        z_k = r_k E^T / tau;  p_k = softmax(z_k);  h_u = mean_k r_k, so  z_u = h_u E^T / tau = mean_k z_k
        L_rec = CE(softmax(z_u), target)
        KL_ij = KL(p_j || sg(p_i)) = sum_n p_j (log p_j - sg(log p_i))
        L = L_rec - lambda * mean over the S(S-1) ordered pairs i != j and the V cases of KL_ij
    The minus sign MAXIMISES the disagreement between steps (diversity); the stop-gradient keeps
    each p_i a fixed reference while p_j moves away from it. Official code: ordered pairs, a mean
    and the stop-gradient (the paper writes a sum over i < j). K = 0 has no pairs: the KL term
    is 0 (Official code: NaN, a mean over nothing).

    Why a hand-written gradient: the loss touches S full softmaxes (V x S x N numbers) per batch,
    and autograd keeps or recomputes a dozen such tensors (log p, p, their products, and the
    backward of each). Here each chunk of cases computes the loss AND its gradient with respect to
    the logits in one go, then folds that into gradients for R and E, (V, S, D) and (N, D), and
    frees the chunk. On ML-1M this took an ERL epoch from 6.9x to 3.0x the base epoch (CPU, README)
    and keeps no big tensor for the backward pass. test_all.py checks value and gradients
    against autograd on a slow loop of the formulas above. The gradient w.r.t. the logits:
        dL_rec/dz_k   = (softmax(z_u) - onehot(target)) / S                      (z_u = mean_k z_k)
        dKL_ij/dz_j   = p_j * (log p_j - log p_i - KL_ij)            (p_i held fixed)
        sum over i != j:  p_j * (S log p_j - sum_i log p_i - sum_{i != j} KL_ij)
        without the stop-gradient, also dKL_ij/dz_i = p_i - p_j; sum over j != i:  S p_i - sum_j p_j
    Each is then divided by the number of terms in its mean (V, and V S (S-1) for the KL).
    """

    @staticmethod
    def forward(ctx, R, E, target, tau, kl_weight, stopgrad, chunk, mm_dtype=torch.float32):
        # R (V, S, D) states; E (N, D) item embeddings (no PAD row); target (V,) in 0..N-1
        # mm_dtype: dtype of the output-layer matmuls (as CELoss); softmaxes and KLs in float32
        ctx.dtypes = R.dtype, E.dtype
        with torch.autocast(R.device.type, enabled=False):  # softmax sums over N: float32 always
            R, E = R.float(), E.float()
            E_mm, Et_mm = E.to(mm_dtype), E.T.contiguous().to(mm_dtype)  # (N, D), (D, N)
            V, S, _ = R.shape
            dR, dE = torch.empty_like(R), torch.zeros_like(E)
            rec_sum, kl_sum = R.new_zeros(()), R.new_zeros(())
            off_diagonal = ~torch.eye(S, dtype=torch.bool, device=R.device)  # (S, S)
            chunk = chunk if chunk > 0 else max(V, 1)  # 0 = all cases at once
            for a in range(0, V, chunk):
                r, t = R[a:a + chunk] / tau, target[a:a + chunk]  # (c, S, D) r / tau, (c,)
                rows = torch.arange(len(t), device=R.device)
                z = (r.to(mm_dtype) @ Et_mm).float()  # (c, S, N)
                # L_rec: CE of the mean state; its logits are the mean of the steps' logits
                log_q = F.log_softmax(z.mean(dim=1), dim=-1)  # (c, N)
                rec_sum = rec_sum - log_q[rows, t].sum()
                g_rec = log_q.exp_()  # softmax(z_u), in place
                g_rec[rows, t] -= 1.0
                grad = (g_rec / (V * S))[:, None, :]  # (c, 1, N): the same for every step
                if S > 1:
                    log_p = F.log_softmax(z, dim=-1)  # (c, S, N)
                    # softmax, not log_p.exp(): most log-probabilities lie below -87, where exp()
                    # underflows, and torch's exp() takes a ~10x slower path there on CPU
                    p = F.softmax(z, dim=-1)
                    # kl[c, i, j] = sum_n p_j log p_j - sum_n p_j log p_i, without a (c, S, S, N) tensor
                    cross = torch.bmm(log_p, p.transpose(1, 2))  # (c, S, S): [c, i, j] = sum_n log p_i p_j
                    neg_entropy = cross.diagonal(dim1=1, dim2=2)  # (c, S): sum_n p_j log p_j
                    kl = (neg_entropy[:, None, :] - cross) * off_diagonal  # (c, S, S), diagonal 0
                    kl_sum = kl_sum + kl.sum()
                    # g_kl = p * (S log p - sum_i log p_i - sum_{i != j} KL_ij), built in place in
                    # log_p (no longer needed): each pass over (c, S, N) numbers costs as much as a matmul
                    sum_log_p = log_p.sum(1, keepdim=True)  # (c, 1, N)
                    g_kl = log_p.mul_(S).sub_(sum_log_p).sub_(kl.sum(1)[..., None])  # (c, S, N), times p below
                    w = kl_weight / (V * S * (S - 1))
                    grad = torch.addcmul(grad, g_kl, p, value=-w)  # grad - w * g_kl * p, (c, S, N)
                    if not stopgrad:  # - w * (S p - sum_j p_j)
                        grad.add_(p, alpha=-w * S).add_(p.sum(1, keepdim=True), alpha=w)
                else:
                    grad = grad.expand_as(z)
                grad = grad.to(mm_dtype)
                dR[a:a + chunk] = (grad @ E_mm).float() / tau  # (c, S, D)
                dE += (grad.flatten(0, 1).T @ r.flatten(0, 1).to(mm_dtype)).float()  # (N, D)
            rec = rec_sum / V
            kl = kl_sum / (V * S * (S - 1)) if S > 1 else torch.zeros_like(rec)
        ctx.save_for_backward(dR, dE)
        ctx.mark_non_differentiable(rec, kl)
        return rec - kl_weight * kl, rec, kl

    @staticmethod
    def backward(ctx, grad_loss, _grad_rec, _grad_kl):
        dR, dE = ctx.saved_tensors
        (R_dtype, E_dtype) = ctx.dtypes
        return (grad_loss * dR).to(R_dtype), (grad_loss * dE).to(E_dtype), None, None, None, None, None, None


def erl_loss(R, target, item_emb, cfg):
    """ERL loss (ERLLoss above). R (V, K+1, D), target (V,) item ids, item_emb (N+1, D) with the
    PAD row first (no candidate, as ce_loss). Returns (loss, {"ce": L_rec, "kl": mean KL})."""
    loss, rec, kl = ERLLoss.apply(R, item_emb[1:], target - 1, cfg.tau, cfg.kl_weight, cfg.kl_stopgrad,
                                  piece(cfg, R.shape[1], R.device), mm_dtype(cfg))
    return loss, {"ce": rec, "kl": kl}


def prl_loss(R, views, target, item_emb, cfg, use_cl):
    """PRL objective, ReaRec §3.3 (official code's form; --prl-sum gives the paper's sums).

    Progressive temperature annealing: tau_k = tau * alpha^(K-k), k = 0..K. Early steps see a
    smoother distribution (alpha > 1), the last one the base tau: the reasoning sharpens step by
    step instead of every step copying the previous one (paper: alpha = 1 collapses, 10 is too abrupt).
        CE_K = CE(r_K E^T / tau);  PL = mean_{k<K} CE(r_k E^T / tau_k)
    Reasoning-aware contrastive learning (rcl_loss): the noisy chain's r~_k must pick out its own
    clean r_k among the other sequences' r_k in the batch (InfoNCE), k = 1..K.
    loss = CE_K + pl_weight * PL + cl_weight * CL. CL = 0 during the warm-up (Official code:
    crashes there, `cl_loss` is undefined). Official code: means over steps and cases; the paper
    sums over steps (--prl-sum).
    R (V, K+1, D) clean states at the supervised positions; views: rcl_loss's input (unused when
    use_cl is False). Returns (loss, terms).
    """
    K = R.shape[1] - 1
    taus = cfg.tau * cfg.alpha ** torch.arange(K, -1, -1, device=R.device, dtype=torch.float32)  # (K+1,) tau_0..tau_K = tau
    pl_w = cfg.pl_weight if cfg.prl_sum else cfg.pl_weight / max(K, 1)  # per-step weight of PL
    weights = torch.tensor([pl_w] * K + [1.0], device=R.device)  # (K+1,)
    loss, ce = CELoss.apply(R, item_emb[1:], target - 1, taus, weights, piece(cfg, K + 1, R.device),
                            mm_dtype(cfg))  # CE_K + pl_weight * PL: all K+1 CEs in one pass
    terms = {"ce": ce[K]}
    if K > 0:
        terms["pl"] = ce[:K].sum() if cfg.prl_sum else ce[:K].mean()
    if K > 0 and use_cl:
        cl = rcl_loss(views, cfg)
        loss = loss + cfg.cl_weight * cl
        terms["cl"] = cl.detach()
    return loss, terms


def rcl_loss(views, cfg):
    """PRL's reasoning-aware contrastive term (paper §3.3), steps 1..K:
        CL = mean_k mean_c -log softmax_j(r~_k[c] . r_k[j] / tau_cl)[c]   (--prl-sum: sum over k)
    views: "clean", "noisy" (C, K+1, D), the states of C contrastive chains and their noisy
    re-runs; optional "group" (C,): chains of one group (one user) are no negatives of each other
    (their histories overlap); each chain's own clean state stays its positive.
    tau_cl = --cl-tau, or tau when that is 0 (official: the CE's temperature).
    Deviation (--cl-tau): the states are post-LayerNorm, |r|^2 ~ D, so at the official tau = 0.07
    the logits reach D / 0.07 ~ 900 and one near-duplicate negative decides the loss."""
    clean, noisy = views["clean"][:, 1:], views["noisy"][:, 1:]  # (C, K, D) each
    C, K = clean.shape[:2]
    sim = torch.einsum("ckd,jkd->kcj", noisy, clean) / (cfg.cl_tau or cfg.tau)  # (K, C, C) anchor c vs clean j
    group = views.get("group")
    if group is not None:  # same-group pairs are no negatives (the diagonal stays: the positive)
        same = (group[:, None] == group[None, :]) & ~torch.eye(C, dtype=torch.bool, device=sim.device)
        sim = sim.masked_fill(same, float("-inf"))
    labels = torch.arange(C, device=sim.device).repeat(K)
    cl = F.cross_entropy(sim.flatten(0, 1), labels, reduction="sum" if cfg.prl_sum else "mean")
    return cl / C if cfg.prl_sum else cl


def piece(cfg, rows_per_case, device):
    """Cases per piece of an output-layer loss: --loss-chunk counts logit rows (memory is rows x N),
    a case has one row per state it scores. 0 = all cases at once. Auto (-1): 256 rows on a CPU,
    where pieces that stay in cache run fastest (ML-1M, 8 batches, measured: ERL 1.6x and base
    1.05x faster than pieces of 1,024 cases), 8192 on a GPU, where fewer, larger kernels are faster."""
    rows = cfg.loss_chunk if cfg.loss_chunk >= 0 else (256 if device.type == "cpu" else 8192)
    return rows and max(1, rows // rows_per_case)


def compute_loss(model, inputs, targets, cfg, use_cl=False):
    """One training batch -> (loss, {term: value}, number of supervised positions).

    SASRec: every position of every row is a case (the reasoning chain of position t reads
    items <= t), so one pass trains on all (prefix -> next item) pairs of a user.
    Deviation: the official code makes every (prefix, next item) pair its own row and re-encodes
    it: the same cases and the same per-case computation (test_all.py checks this), but ~100x the
    work on ML-1M. As in SASRec, a prefix here sees at most the user's last L+1 items.
    Reconstructed: bert4rec. Bidirectional item states would see the future, so each row gives
    ONE case per epoch: a random prefix, its later items masked out as keys (no official code;
    the paper says SASRec-style next-item training with bidirectional items, issue #1).
    use_cl: PRL's contrastive term is on (contrastive_on decides; off during the warm-up).
    """
    B, L = inputs.shape
    valid = targets != data.PAD  # (B, L)
    K = cfg.steps
    if cfg.backbone == "sasrec":
        h, cache, key_ok = model.encode(inputs)
        chain_pos = torch.arange(L, device=inputs.device)[None, :]  # (1, L): one chain per position
        R = model.reason(cache, key_ok, chain_pos, h, K)  # (B, L, K+1, D)
        R_cases, target, cut = R[valid], targets[valid], None  # (V, K+1, D), (V,)
    else:
        cut = torch.multinomial(valid.float(), 1)  # (B, 1) the prefix each row trains on
        h, cache, key_ok = model.encode(inputs, cut[:, 0])
        r0 = h.gather(1, cut[:, :, None].expand(B, 1, h.shape[-1]))  # (B, 1, D)
        R = model.reason(cache, key_ok, cut, r0, K)  # (B, 1, K+1, D)
        R_cases, target = R[:, 0], targets.gather(1, cut)[:, 0]  # (B, K+1, D), (B,)
    E = model.item_emb.weight
    if cfg.method == "erl":
        loss, terms = erl_loss(R_cases, target, E, cfg)
    elif cfg.method == "prl":
        use_cl = use_cl and K > 0 and cfg.cl_weight > 0
        views = contrastive_views(model, inputs, R, valid, cache, key_ok, cut, cfg) if use_cl else None
        loss, terms = prl_loss(R_cases, views, target, E, cfg, use_cl)
    else:  # base, naive, rpe: CE on the last state r_K (r_0 when K = 0)
        loss, terms = ce_loss(R_cases[:, -1], target, E, cfg)
    return loss, terms, len(target)


def contrastive_views(model, inputs, R, valid, cache, key_ok, cut, cfg):
    """The two views of PRL's contrastive term (paper §3.3): clean chains and their noisy re-runs,
    h~ = h + eps on every reasoning input. Official code: the noisy input at step k is the CLEAN
    chain's r_{k-1} + p^R_k plus noise (a one-step perturbation, not an independently unrolled
    noisy chain): feed= does exactly that.
    Deviation (--cl-anchors): the official batch holds 2,048 independent prefixes; ours holds every
    position of a few users. So each user gives cl_anchors chains at distinct random supervised
    positions, and only other users' chains are its negatives (rcl_loss's groups): a position's
    neighbours share most of its history.
    --cl-reencode (official): the noisy view also re-encodes the items, with its own dropout (the
    official code duplicates the batch). --no-cl-reencode reuses the clean item cache and re-runs
    only the reasoning steps: cheaper, and the paper perturbs only the reasoning inputs.
    R (B, L or 1, K+1, D); cut (B, 1) bert4rec's prefix per row, else None. Returns rcl_loss's views.
    """
    B, L = valid.shape
    K, D = R.shape[2] - 1, R.shape[3]
    if cut is None:  # sasrec: A distinct random supervised positions per row
        A = min(cfg.cl_anchors, L)
        pos = torch.rand(B, L, device=R.device).masked_fill(~valid, -1.0).topk(A, dim=1).indices  # (B, A)
        ok = valid.gather(1, pos)  # (B, A) False where a row has fewer than A supervised positions
        R_cl = R.gather(1, pos[:, :, None, None].expand(B, A, K + 1, D))  # (B, A, K+1, D)
    else:  # bert4rec: the one trained prefix of each row
        A, pos, ok, R_cl = 1, cut, torch.ones_like(cut, dtype=torch.bool), R
    if cfg.cl_reencode:  # official: a second pass over the items, with its own dropout
        _, cache, key_ok = model.encode(inputs, None if cut is None else cut[:, 0])
    noisy = model.reason(cache, key_ok, pos, R_cl[:, :, 0], K, feed=R_cl[:, :, :K], noise=cfg.noise)  # (B, A, K+1, D)
    group = torch.arange(B, device=R.device)[:, None].expand(B, A)  # (B, A): the row (user) of each chain
    return {"clean": R_cl[ok], "noisy": noisy[ok], "group": group[ok]}


def contrastive_on(cfg, epoch, step):
    """Whether PRL's contrastive term is on for a batch. It is off during the warm-up: the first
    --warmup-steps optimiser steps, or (--warmup-steps -1, official) the first --warmup epochs.
    epoch counts from 1; step = optimiser steps taken before this batch, over the whole run.
    Deviation (--warmup-steps): an epoch here is ~300 steps on Toys and ~95 on ML-1M, ~480 in the
    official runs: counting steps keeps the warm-up one length, whatever the batch size and data."""
    if cfg.method != "prl" or cfg.steps == 0 or cfg.cl_weight == 0:
        return False
    return step >= cfg.warmup_steps if cfg.warmup_steps >= 0 else epoch > cfg.warmup


# -----------------------------------------------------------------------------
# Adaptive reasoning depth: step selectors (the paper's open problem, §5 "future work")
# -----------------------------------------------------------------------------
# Every evaluation can rank items with each step r_0..r_K alone; the oracle (best step per case,
# chosen with the label) shows how much a perfect choice would gain. A selector makes that choice
# per case WITHOUT the label. Label-free rules need no training; the learned one is a tiny head
# fitted on training cases after the model is trained (the model stays frozen).
HALT_THRESHOLDS = (0.5, 0.8)  # top-10 overlap at which the halting rule stops thinking


def step_temperatures(cfg, K, device=None):
    """The temperature each step was trained at: PRL's tau * alpha^(K-k), tau for every other method."""
    if cfg.method == "prl":
        return cfg.tau * cfg.alpha ** torch.arange(K, -1, -1, dtype=torch.float32, device=device)
    return torch.full((K + 1,), float(cfg.tau), device=device)


class StepSelector(nn.Module):
    """Learned selector: per case, softmax weights over the K+1 steps from label-free features.
    Per step: its state r_k (D numbers), the entropy and the top-1 log-probability of its item
    distribution, through one linear score shared by the steps, plus a bias per step. Per case
    (case_features, standardised): the history length, whether the steps agree, the mean entropy,
    each with a weight per step. D + 3 + (K+1) + 4 (K+1) parameters (82 for D = 64, K = 2).
    "learned" recommends with the highest-weight step, "learned-mix" with the weighted mixture
    of the steps' distributions, log sum_k w_k p_k."""

    def __init__(self, D, K, n_case=4):
        super().__init__()
        self.score = nn.Linear(D + 2, 1)
        self.step_bias = nn.Parameter(torch.zeros(K + 1))
        self.case_weight = nn.Parameter(torch.zeros(n_case, K + 1))
        nn.init.zeros_(self.score.weight)  # starts as the uniform mixture (and deterministically:
        nn.init.zeros_(self.score.bias)    # the bias, common to all steps, cancels in the softmax)
        self.register_buffer("case_mean", torch.zeros(n_case))  # set by fit_selector
        self.register_buffer("case_std", torch.ones(n_case))

    def forward(self, R, entropy, top1, case, fold=None):
        # R (B, K+1, D); entropy, top1 (B, K+1); case (B, n_case) -> log weights (B, K+1)
        # (fold: read by CrossFitSelector only)
        feats = torch.cat([R / math.sqrt(R.shape[-1]), entropy[..., None], top1[..., None]], dim=-1)
        case = (case - self.case_mean) / self.case_std
        return F.log_softmax(self.score(feats)[..., 0] + self.step_bias + case @ self.case_weight, dim=-1)


# Reconstructed: selectors are not in the paper; cross-fitting is the standard way to score a
# model fitted on the same held-out cases that choose it (README "Choosing a step per case").
class CrossFitSelector(nn.Module):
    """A StepSelector fitted on the validation cases, plus two heads for an honest validation
    score (cross-fitting): the cases are split in two folds by case_fold, heads[f] is fitted on
    the other fold's cases and scores fold f's. So no validation case's own label picks its step,
    and the validation score that chooses between the selectors is out of sample.
    held_out=True (the validation evaluation): the heads; False (test): `full`, fitted on all of
    the validation cases."""

    def __init__(self, full, heads):
        super().__init__()
        self.full, self.heads, self.held_out = full, nn.ModuleList(heads), False

    def forward(self, R, entropy, top1, case, fold=None):
        if not self.held_out:
            return self.full(R, entropy, top1, case)
        logw0, logw1 = (h(R, entropy, top1, case) for h in self.heads)  # (B, K+1) each
        return torch.where((fold == 0)[:, None], logw0, logw1)


def case_fold(hist):
    """(B, L) history windows -> (B,) fold 0/1 for cross-fitting: the parity of the sum of the
    item ids in the window. Label-free, the same in selector_cases and in evaluate (cutting
    padding columns leaves it unchanged), and about half the cases in each fold."""
    return hist.sum(1) % 2


def step_log_probs(R, E, cfg):
    """R (B, K+1, D) -> the steps' item log-probabilities (B, K+1, N) at their training temperatures,
    with their entropies and top-1 log-probabilities (B, K+1)."""
    taus = step_temperatures(cfg, R.shape[1] - 1, R.device)
    logp = F.log_softmax((R / taus[:, None]) @ E[1:].T, dim=-1)  # (B, K+1, N), no PAD column
    return logp, -(logp.exp() * logp).sum(-1), logp.max(-1).values


def top10_overlap(logp):
    """(B, K+1, N) -> (B, K): the share of step k's top-10 items that are in step k-1's top 10."""
    top = logp.topk(min(10, logp.shape[-1]), dim=-1).indices  # (B, K+1, 10) (fewer items: all of them)
    return (top[:, 1:, :, None] == top[:, :-1, None, :]).any(-1).float().mean(-1)


def case_features(lengths, overlap, entropy):
    """Label-free features of each case for the learned selector (B, 4): log(1 + history length in
    the window) (the paper's Fig. 4: extra steps help short histories), the top-10 overlap of
    steps 1 and 0 and of steps K and K-1 (do the steps agree?), and the mean entropy of the steps."""
    return torch.stack([torch.log1p(lengths.float()), overlap[:, 0], overlap[:, -1], entropy.mean(1)], dim=1)


def step_views(model, R, cfg, selector=None, lengths=None, folds=None, steps_only=False):
    """Every view of the states R (B, K+1, D): scores (B, N+1) per view, or (scores, {stat: (B,)}).
    steps_only=True stops after the first two kinds (main, step0..K; --epoch-view steps).
        main       the method's own rule (ERL: the mean state, else r_K)
        step0..K   one step alone
        entropy    per case, the step whose item distribution has the lowest entropy
        mean       the mean of the steps' log-probabilities
        halt<θ>    think step by step; stop at the first step whose top-10 list shares a fraction
                   >= θ of its items with the previous step's ("steps" = reasoning steps computed)
        learned, learned-mix   the StepSelector's choice / mixture (a selector and the cases'
                   history lengths, (B,), given; folds (B,) for a CrossFitSelector)
    "step" = the mean chosen step index of a one-step choice."""
    E = model.item_emb.weight
    B, S, _ = R.shape
    logits = R @ E.T  # (B, K+1, N+1); tau does not change a single step's ranking
    views = {"main": model.user_state(R) @ E.T} | {f"step{k}": logits[:, k] for k in range(S)}
    if S == 1 or steps_only:
        return views
    pick = lambda k: (logits[torch.arange(B, device=R.device), k], {"step": k.double()})  # (B, N+1)
    logp, entropy, top1 = step_log_probs(R, E, cfg)
    views["entropy"] = pick(entropy.argmin(1))
    views["mean"] = F.pad(logp.mean(1), (1, 0))  # (B, N+1), PAD column (never ranked) 0
    overlap = top10_overlap(logp)  # (B, K): step k vs k-1
    for theta in HALT_THRESHOLDS:
        stable = overlap >= theta  # (B, K)
        k = torch.where(stable.any(1), stable.float().argmax(1) + 1, S - 1)  # first stable step, else K
        scores, stats = pick(k)
        views[f"halt{theta}"] = (scores, {"steps": k.double()})
    if selector is not None:
        logw = selector(R, entropy, top1, case_features(lengths, overlap, entropy), folds)  # (B, K+1)
        views["learned"] = pick(logw.argmax(1))
        views["learned-mix"] = F.pad(torch.logsumexp(logw[..., None] + logp, dim=1), (1, 0))
    return views


def target_ranks(logp, t, exclude=None):
    """(c, K+1, N) item log-probabilities (no PAD column), targets t (c,), exclude (c, X) item ids
    or None -> (c, K+1) each step's rank of the target, 1 = best. As the evaluation ranks: the
    items in exclude (the history; PAD ignored) are out of the ranking, the target stays in."""
    c, S, N = logp.shape
    scores = F.pad(logp, (1, 0)).reshape(c * S, N + 1)  # (c (K+1), N+1) with a PAD column
    rep = lambda x: x.repeat_interleave(S, 0)  # noqa: E731 (one row per case and step)
    greater, _ = data.target_rank(scores, rep(t), None if exclude is None else rep(exclude))
    return (greater.long() + 1).view(c, S)


def prefix_items(inputs, pos):
    """(B, L) training windows, (B, P) positions -> (B, P, L): the items at positions <= p, the
    history of the target at p (the items after it PAD)."""
    return inputs[:, None, :].masked_fill(torch.arange(inputs.shape[1], device=inputs.device) > pos[..., None], data.PAD)


def selector_cases(model, ds, cfg, device, cases=20_000):
    """The cases a StepSelector is fitted on, with its inputs and each step's rank of the true
    next item, ranked as the evaluation ranks (with --mask-history the case's history is out of
    the ranking: the whole history for validation, the items up to the position in the training
    window for training positions):
        --selector-fit valid: the validation cases (the held-out cases that choose between the
            selectors too, cross-fitted; test never);
        --selector-fit train: up to `cases` random supervised positions of the training sequences.
    Returns {"R": (c, K+1, D), "entropy", "top1", "rank": (c, K+1), "case": (c, 4), "fold": (c,)}."""
    K, E = cfg.steps, model.item_emb.weight
    feats = {"R": [], "entropy": [], "top1": [], "rank": [], "case": [], "fold": []}

    def add(R, t, lengths, exclude, fold):  # R (c, K+1, D) float, t (c,) item ids, lengths (c,) items in the window
        logp, entropy, top1 = step_log_probs(R, E, cfg)
        feats["rank"].append(target_ranks(logp, t, exclude))
        feats["R"].append(R), feats["entropy"].append(entropy), feats["top1"].append(top1)
        feats["case"].append(case_features(lengths, top10_overlap(logp), entropy))
        feats["fold"].append(fold)

    with torch.no_grad():
        if cfg.selector_fit == "valid":
            split = ds.valid
            for b in range(0, len(split), cfg.eval_batch_size):
                rows = np.arange(b, min(b + cfg.eval_batch_size, len(split)))
                starts, ends = split.starts[rows], split.ends[rows]
                hist = torch.from_numpy(data.windows(split.items, starts, ends, cfg.max_len)).to(device)
                seen = (torch.from_numpy(data.windows(split.items, starts, ends, max(int((ends - starts).max()), 1)))
                        .to(device) if cfg.mask_history else None)  # the whole history, as data.evaluate
                with autocast(cfg, device):  # the states as evaluate() computes them
                    R = model(hist)
                add(R.float(), torch.from_numpy(split.targets[rows]).to(device), (hist != data.PAD).sum(1), seen,
                    case_fold(hist))
        else:
            per_row = max(1, math.ceil(cases / max(len(ds.train), 1)))
            gen = torch.Generator().manual_seed(cfg.seed + 7)
            for inputs, targets in data.train_batches(ds.train, cfg.max_len, cfg.eval_batch_size, device=device,
                                                      generator=gen, bucket=cfg.bucket):
                B, L = inputs.shape
                valid = targets != data.PAD
                noise = torch.rand(B, L, generator=gen).to(device).masked_fill(~valid, -1.0)
                pos = noise.topk(min(per_row, L), dim=1).indices  # (B, P) random supervised positions
                ok = valid.gather(1, pos)
                with autocast(cfg, device):
                    h, cache, key_ok = model.encode(inputs)
                    r0 = h.gather(1, pos[..., None].expand(-1, -1, h.shape[-1]))
                    R = model.reason(cache, key_ok, pos, r0, K)
                seen = (inputs != data.PAD).cumsum(1).gather(1, pos)  # (B, P) items up to each position
                hist = prefix_items(inputs, pos)  # (B, P, L)
                add(R[ok].float(), targets.gather(1, pos)[ok], seen[ok],
                    hist[ok] if cfg.mask_history else None, torch.zeros_like(seen[ok]))
    return {k: torch.cat(v)[:cases] for k, v in feats.items()}


def fit_selector(model, ds, cfg, device, cases=20_000, steps=300):
    """Fit a StepSelector (the model frozen) on selector_cases to predict which step ranks the
    target best: maximise the expected DCG of the chosen step, sum_k w_k / log2(1 + rank_k).
    (The mixture likelihood, log sum_k w_k p_k(target), was the first objective tried: it rewards
    the flattest distribution, PRL's r_0 at tau alpha^K, not the best ranking; on Toys it chose
    r_0 for nearly every case, README.)
    Why validation by default: on training positions, which the model has fitted, the step the
    loss trains ranks the target best almost everywhere, so a head fitted there learns to pick
    that step. Fitted on validation, its 82 parameters (D = 64, K = 2) see 19,412 held-out cases
    (Toys; 6,040 on ML-1M), and its validation score is what chooses it against the
    label-free rules, cross-fitted (CrossFitSelector) so that score is out of sample. Returns the
    selector."""
    model.eval()
    f = selector_cases(model, ds, cfg, device, cases)
    model.train()
    return cross_fit_selector(f, cfg.steps, steps) if cfg.selector_fit == "valid" else train_selector(f, cfg.steps, steps)


def cross_fit_selector(f, K, steps=300):
    """A head on all of f's cases, and heads[k] on the cases outside fold k (CrossFitSelector).
    A fold whose complement has fewer than 2 cases (tiny validation sets) gets the full head."""
    full = train_selector(f, K, steps)
    other = lambda k: {name: v[f["fold"] != k] for name, v in f.items()}
    return CrossFitSelector(full, [train_selector(other(k), K, steps) if int((f["fold"] != k).sum()) >= 2 else full
                                   for k in (0, 1)])


def train_selector(f, K, steps=300):
    """The fit itself, on selector_cases' tensors f: full-batch Adam on minus the expected DCG."""
    gain = 1.0 / torch.log2(f["rank"].double() + 1).float()  # (c, K+1) DCG of each step's ranking
    selector = StepSelector(f["R"].shape[-1], K).to(f["R"].device)
    selector.case_mean.copy_(f["case"].mean(0))
    selector.case_std.copy_(f["case"].std(0).clamp(min=1e-6))
    opt = torch.optim.Adam(selector.parameters(), lr=0.01)
    for _ in range(steps):  # full batch: a few thousand numbers per case at most
        loss = -(selector(f["R"], f["entropy"], f["top1"], f["case"]).exp() * gain).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return selector.eval()


def choose_selector(valid, cfg):
    """The adaptive selector (entropy, mean, halt<θ>, learned, learned-mix) with the best validation
    --select-metric: chosen on validation only."""
    names = [v for v in valid if v not in ("main", "oracle", "groups") and not v.startswith("step")]
    return max(names, key=lambda v: valid[v][cfg.select_metric]) if names else None


# -----------------------------------------------------------------------------
# Evaluation (the shared full-ranking protocol of data.py)
# -----------------------------------------------------------------------------
def evaluate(model, split, cfg, device, analysis=False, selector=None, groups=None, held_out=False, per_step=False):
    """Full-ranking metrics of the model's own view (user_state: ERL mean, else r_K).

    analysis=True adds one view per reasoning step r_0..r_K, the step selectors (step_views) and
    the "oracle": per case the step that ranks the target best, chosen with the label: the
    ceiling an ideal step selector could reach (paper Fig. 2; Reconstructed: the paper gives no
    formula and the code has none, this is its "post-hoc optimal reasoning step" read per test
    case). groups: data.case_groups(...) for per-quartile metrics (paper Fig. 4). held_out: score
    each case with the CrossFitSelector head not fitted on it (the validation evaluation).
    per_step=True (--epoch-view steps, every epoch): the own view and each step alone, no more.
    Returns {metric: v} or {"main"/"step0"/.../"oracle": {metric: v}, "groups": ...}.
    """
    model.eval()
    E = model.item_emb.weight
    if isinstance(selector, CrossFitSelector):
        selector.held_out = held_out

    def score_fn(hist):  # hist (B, L)
        with autocast(cfg, device):
            R = model(hist)  # (B, K+1, D)
        R = R.float()
        if per_step:  # {main, step0, ..., stepK}: (B, N+1) each
            return step_views(model, R, cfg, steps_only=True)
        if not analysis:
            return model.user_state(R) @ E.T  # (B, N+1); tau does not change a ranking
        return step_views(model, R, cfg, selector, lengths=(hist != data.PAD).sum(1), folds=case_fold(hist))

    steps = [f"step{k}" for k in range(cfg.steps + 1)] if analysis else None
    res = data.evaluate(score_fn, split, cfg.max_len, device=device, batch_size=cfg.eval_batch_size,
                        mask_history=cfg.mask_history, oracle_of=steps, trim=True, groups=groups,
                        paired_to="main" if analysis else None)
    model.train()
    return res


def release_free_memory():
    """Hand the heap's free pages back to the OS (glibc's malloc_trim; a no-op elsewhere). Batches
    of different widths leave free holes in the heap that still count as resident memory: without
    this, 10-epoch ML-1M runs (K=2, batch 64) peaked at 3.0-3.2 GB though one step needs ~2 GB."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def batches(ds, cfg, device, generator):
    """data.train_batches with this run's settings; every 8 batches (and at the end) the heap's
    free pages go back to the OS (release_free_memory): 3-6 % of the time on a CPU, measured."""
    for step, batch in enumerate(data.train_batches(ds.train, cfg.max_len, cfg.batch_size, device=device,
                                                    generator=generator, bucket=cfg.bucket)):
        yield batch
        if step % 8 == 7:
            release_free_memory()
    release_free_memory()


def autocast(cfg, device):
    """--dtype bfloat16 on CUDA: autocast of the whole model. On a CPU only the output-layer
    matmuls run in bf16 (mm_dtype); the Transformer's small matmuls gain nothing there."""
    cuda = device.type == "cuda" if isinstance(device, torch.device) else str(device).startswith("cuda")
    return torch.autocast("cuda", dtype=torch.bfloat16) if cfg.dtype == "bfloat16" and cuda else nullcontext()


def fmt(metrics, keys=("ndcg@10", "recall@10", "ndcg@20", "recall@20")):
    return " ".join(f"{k} {metrics[k]:.4f}" for k in keys)


# -----------------------------------------------------------------------------
# Training (paper's setup: Adam, full-softmax CE, early stopping on validation)
# -----------------------------------------------------------------------------
class NonFiniteLoss(Exception):
    pass


# Fields that may differ between a run and its --resume (everything else must match).
RUN_ONLY = {"epochs", "patience", "resume", "device", "out", "benchmark", "oracle_runs", "eval_batch_size", "data_dir", "threads",
            "loss_chunk", "select_step", "selector_fit", "overwrite"}


def train(cfg, model, ds, device):
    """Train with early stopping on validation `select_metric`; keep best.pt and last.pt.

    Returns a summary dict. Ctrl-C stops training: the summary is then the one last.pt holds, with
    interrupted=True and `note`, one line saying what last.pt holds; --resume continues from it.
    """
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best_path, last_path = os.path.join(cfg.out, "best.pt"), os.path.join(cfg.out, "last.pt")
    state = dict(epoch=0, step=0, best=-1.0, best_epoch=0, bad_epochs=0, history=[], train_seconds=0.0)
    if cfg.resume:  # check_out() made sure last.pt exists
        ck = load_checkpoint(last_path, device, ("model", "optimizer", "config", "state", "rng"))
        defaults = {f.name: f.default for f in dataclasses.fields(Config)}  # fields newer than the checkpoint
        diff = {k: (ck["config"].get(k, defaults[k]), v) for k, v in dataclasses.asdict(cfg).items()
                if k not in RUN_ONLY and k not in unused_config(cfg) and ck["config"].get(k, defaults[k]) != v}
        if diff:
            sys.exit(f"error: --resume: {last_path} was trained with other settings "
                     f"{ {k: old for k, (old, new) in diff.items()} }; pass the same flags or a new --out")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        torch.set_rng_state(ck["rng"])
        if ck.get("cuda_rng") is not None and torch.cuda.is_available():  # dropout on the GPU
            torch.cuda.set_rng_state_all(ck["cuda_rng"])
        state = ck["state"]
        state.setdefault("step", state["epoch"] * math.ceil(len(ds.train) / cfg.batch_size))  # older checkpoints
        if state["best_epoch"] > 0:  # checked now, not after the epochs it would waste
            load_checkpoint(best_path, device, ("model",))
        print(f"resumed from {last_path} after epoch {state['epoch']}")
    resumed_at = state["epoch"]  # 0 for a new run
    n_rows = int((ds.train.lengths() >= 2).sum())
    saved = copy.deepcopy(state)  # what last.pt holds for this run (epoch 0: nothing yet)
    epoch = state["epoch"] + 1
    cl_was_on = state["step"] > 0 and contrastive_on(cfg, state["epoch"], state["step"] - 1)  # at the last step done
    try:
        while state["epoch"] < cfg.epochs and state["bad_epochs"] < cfg.patience:
            epoch = state["epoch"] + 1
            model.train()
            t0, sums, count = time.time(), {}, 0
            gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)  # same order on resume
            for step, (inputs, targets) in enumerate(batches(ds, cfg, device, gen)):
                use_cl = contrastive_on(cfg, epoch, state["step"])
                if use_cl and not cl_was_on:
                    print(f"contrastive term on from optimiser step {state['step'] + 1} (epoch {epoch}, "
                          f"batch {step + 1})", flush=True)
                cl_was_on = use_cl
                with autocast(cfg, device):
                    loss, terms, n = compute_loss(model, inputs, targets, cfg, use_cl)
                if not torch.isfinite(loss):
                    hint = ("ERL maximises the KL between steps and can diverge: lower --kl-weight "
                            "(e.g. 0.005) or --lr" if cfg.method == "erl" else "lower --lr or raise --tau")
                    raise NonFiniteLoss(f"non-finite loss at epoch {epoch}, batch {step + 1} "
                                        f"({ {k: float(v) for k, v in terms.items()} }); {hint}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip > 0:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                state["step"] += 1
                for k, v in {"loss": loss.detach(), **terms}.items():
                    sums[k] = sums.get(k, 0.0) + float(v) * n
                count += n
            train_time = time.time() - t0
            t1 = time.time()
            if cfg.epoch_view == "steps" and cfg.steps > 0:  # select the epoch on its best view
                views = evaluate(model, ds.valid, cfg, device, per_step=True)
                best_view = max(views, key=lambda v: views[v][cfg.select_metric])  # a tie keeps "main"
                score = views[best_view][cfg.select_metric]
                valid = views["main"] | {f"{v}_{cfg.select_metric}": m[cfg.select_metric] for v, m in views.items() if v != "main"}
            else:
                best_view, valid = None, evaluate(model, ds.valid, cfg, device)
                score = valid[cfg.select_metric]
            eval_time = time.time() - t1
            state["epoch"], state["train_seconds"] = epoch, state["train_seconds"] + train_time
            if epoch == 1:  # a new run (--overwrite): the old run's files go now, not before
                remove_old_run(cfg.out)
            if score > state["best"]:
                state.update(best=score, best_epoch=epoch, bad_epochs=0)
                save_atomic({"model": model.state_dict(), "config": dataclasses.asdict(cfg),
                             "epoch": epoch, "valid": valid}, best_path)
            else:
                state["bad_epochs"] += 1
            losses = {k: v / max(count, 1) for k, v in sums.items()}
            state["history"].append({"epoch": epoch, **losses, **{f"valid_{k}": v for k, v in valid.items()},
                                     "train_seconds": train_time, "eval_seconds": eval_time})
            save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(),
                         "config": dataclasses.asdict(cfg), "state": state,
                         "rng": torch.get_rng_state(),
                         "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}, last_path)
            saved = copy.deepcopy(state)
            eta = (cfg.epochs - epoch) * (state["train_seconds"] + eval_time * epoch) / epoch
            terms_txt = " ".join(f"{k} {v:.4f}" for k, v in losses.items() if k != "loss")
            chosen = f" | {best_view} {score:.4f}" if best_view else ""
            print(f"ep {epoch:3d} | loss {losses.get('loss', 0):.4f} ({terms_txt}) | valid {fmt(valid)}{chosen} | "
                  f"{n_rows / train_time:,.0f} seq/s, {count / train_time:,.0f} targets/s | "
                  f"train {train_time:.1f}s eval {eval_time:.1f}s | best {state['best']:.4f} @ep"
                  f"{state['best_epoch']}{' *' if state['bad_epochs'] == 0 else ''} | eta <= {eta / 60:.1f} min",
                  flush=True)
    except KeyboardInterrupt:
        # Tell the truth about last.pt: this run's epoch, the epoch it resumed from, or not ours.
        if saved["epoch"] == 0:
            held = "nothing was saved"
            if os.path.exists(last_path):  # --overwrite: still the previous run's file
                try:
                    old = torch.load(last_path, map_location="cpu", weights_only=False)["state"]["epoch"]
                    held = f"{last_path} is untouched: it still holds epoch {old} of the run that was in --out"
                except Exception:  # damaged: say no more than we know
                    held = f"{last_path} is untouched: it belongs to the run that was in --out"
            note = f"in epoch {epoch}, before this run finished an epoch; {held}"
        else:
            since = " (where this run resumed)" if saved["epoch"] == resumed_at else ""
            note = (f"in epoch {epoch}; {last_path} holds epoch {saved['epoch']}{since}: continue with "
                    f"--resume (with --epochs {saved['epoch']} it only evaluates)")
        return saved | {"interrupted": True, "note": note, "best_path": best_path}
    return state | {"interrupted": False, "best_path": best_path}


# -----------------------------------------------------------------------------
# Benchmark: training throughput, evaluation time, peak memory (not a test)
# -----------------------------------------------------------------------------
def peak_rss_gb():
    """Peak resident memory of this process since the start or the last reset_peak_rss()."""
    try:
        with open("/proc/self/status") as f:  # Linux: VmHWM, which reset_peak_rss() can reset
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**20  # KiB
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def reset_peak_rss():
    """Let each benchmark row report its own peak: hand freed heap memory back to the OS (glibc)
    and reset the peak counter (Linux >= 4.0). Elsewhere the peaks stay cumulative."""
    gc.collect()
    release_free_memory()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def benchmark(cfg, ds, device):
    """One training epoch for K=0 (base) and K=2 (rpe, erl, prl with its contrastive term on),
    then full-ranking evaluation of the test split for K=0..3 (untrained weights: the cost does
    not depend on them). Prints a table and writes out/benchmark.json."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows, res = [], {"train": [], "eval": [], "device": str(device), "torch": torch.__version__,
                     "threads": torch.get_num_threads(), "dataset": ds.stats}
    for method, K in [("base", 0), ("rpe", 2), ("erl", 2), ("prl", 2)]:
        c = dataclasses.replace(cfg, method=method, steps=K)
        set_seed(cfg.seed)
        model = ReaRec(c).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=c.lr)
        reset_peak_rss()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync()
        t0, seqs, targets_seen = time.time(), 0, 0
        for inputs, targets in batches(ds, c, device, torch.Generator().manual_seed(0)):
            with autocast(c, device):
                loss, _, n = compute_loss(model, inputs, targets, c, use_cl=True)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seqs, targets_seen = seqs + len(inputs), targets_seen + n
        sync()
        dt = time.time() - t0
        gpu = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        res["train"].append(dict(method=method, K=K, epoch_seconds=dt, seqs_per_s=seqs / dt,
                                 targets_per_s=targets_seen / dt, peak_rss_gb=peak_rss_gb(), gpu_gb=gpu))
        print(f"train {method:4s} K={K}: epoch {dt:7.1f} s | {seqs / dt:8.1f} seq/s | "
              f"{targets_seen / dt:9.0f} targets/s | peak RSS {peak_rss_gb():.2f} GB"
              + (f" | GPU {gpu:.2f} GB" if gpu else ""), flush=True)
    for K in range(4):
        c = dataclasses.replace(cfg, method="prl" if K else "base", steps=K)
        set_seed(cfg.seed)
        model = ReaRec(c).to(device)
        reset_peak_rss()
        evaluate(model, ds.test, c, device)  # warm-up
        sync()
        t0 = time.time()
        evaluate(model, ds.test, c, device)
        sync()
        main_s = time.time() - t0
        t0 = time.time()
        evaluate(model, ds.test, c, device, analysis=True)
        full_s = time.time() - t0
        res["eval"].append(dict(K=K, seconds=main_s, with_per_step_and_oracle_seconds=full_s,
                                peak_rss_gb=peak_rss_gb()))
        print(f"eval K={K}: {main_s:6.2f} s ({main_s / res['eval'][0]['seconds']:.2f}x K=0) | with "
              f"per-step + oracle views {full_s:6.2f} s | {len(ds.test)} cases | peak RSS "
              f"{peak_rss_gb():.2f} GB", flush=True)
    base = res["train"][0]["epoch_seconds"]
    for r in res["train"][1:]:
        print(f"epoch time {r['method']} K=2 / base K=0: {r['epoch_seconds'] / base:.2f}x")
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, "benchmark.json.tmp"), "w") as f:
        json.dump(res, f, indent=1)
    os.replace(os.path.join(cfg.out, "benchmark.json.tmp"), os.path.join(cfg.out, "benchmark.json"))
    return res


# -----------------------------------------------------------------------------
# Is the oracle gap a signal? The same per-case oracle over independently trained runs
# -----------------------------------------------------------------------------
# The step oracle picks, per case and with the label, the best of K+1 rankings. Any K+1 rankings
# that are each good and not identical give such a ceiling, useful disagreement or not. Setting
# it beside the oracle over K+1 separately trained models (e.g. base with three seeds) says how
# much of the step oracle's gain reasoning adds. Reconstructed: not in the paper.
def oracle_over_runs(cfg, ds, device):
    """Load the best.pt of each folder in --oracle-runs (finished runs on this dataset), rank the
    validation and test cases with each run's own recommending view ("run0", "run1", ...), with
    their ensemble ("ensemble": the mean of the runs' log-probabilities, each at its training
    temperature) and with the per-case oracle over the runs. Prints and writes
    out/oracle_runs.json."""
    dirs = [d for d in cfg.oracle_runs.split(",") if d]
    models = []
    for d in dirs:
        path = os.path.join(d, "best.pt")
        if not os.path.exists(path):
            sys.exit(f"error: --oracle-runs: no best.pt in {d}; pass the folders of finished runs")
        ck = load_checkpoint(path, device, ("model", "config"))
        c = Config(**{f.name: ck["config"].get(f.name, f.default) for f in dataclasses.fields(Config)})
        if c.n_items != ds.n_items:
            sys.exit(f"error: --oracle-runs: {d} was trained on {c.n_items} items, --dataset {cfg.dataset} has "
                     f"{ds.n_items}; pass the dataset those runs were trained on")
        model = ReaRec(c).to(device)
        model.load_state_dict(ck["model"])
        models.append((c, model.eval()))
    names = [f"run{i}" for i in range(len(models))]
    maxlen = max(c.max_len for c, _ in models)

    def score_fn(hist):  # hist (B, L <= maxlen) -> {view: (B, N+1)}
        views, logps = {}, []
        for name, (c, model) in zip(names, models):
            with autocast(c, device):
                R = model(hist[:, -c.max_len:]).float()  # each run reads its own window
            s = model.user_state(R) @ model.item_emb.weight.T  # (B, N+1)
            views[name] = s
            logps.append(F.log_softmax(s[:, 1:] / c.tau, dim=-1))  # (B, N), no PAD column
        views["ensemble"] = F.pad(torch.stack(logps).mean(0), (1, 0))
        return views

    res = {"runs": dirs}
    for split_name, split in (("valid", ds.valid), ("test", ds.test)):
        res[split_name] = data.evaluate(score_fn, split, maxlen, device=device, batch_size=cfg.eval_batch_size,
                                        mask_history=cfg.mask_history, oracle_of=names, trim=True)
    best = max(res["test"][n]["ndcg@10"] for n in names)
    for view, m in res["test"].items():
        print(f"test {view:9s} | {fmt(m)} | ndcg@10 vs the best run {100 * (m['ndcg@10'] / best - 1):+.1f} %")
    os.makedirs(cfg.out, exist_ok=True)
    path = os.path.join(cfg.out, "oracle_runs.json")
    with open(path + ".tmp", "w") as f:
        json.dump(res, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")
    return res


def recommend_view(valid, cfg):
    """--select-step -> the view whose metrics are the run's "valid" / "test": own = the method's
    rule; auto = the best validation --select-metric among every view but the oracle (a tie keeps
    the own view: base's r_0 is both "main" and "step0")."""
    if cfg.select_step == "own":
        return "main"
    if cfg.select_step == "auto":
        views = ["main"] + [v for v in valid if v not in ("main", "oracle", "groups")]
        return max(views, key=lambda v: valid[v][cfg.select_metric])  # max keeps the first of equals
    if cfg.select_step not in valid:
        sys.exit(f"error: --select-step {cfg.select_step} is not a view of this run "
                 f"({', '.join(v for v in valid if v not in ('oracle', 'groups'))}); use own or auto")
    return cfg.select_step


def analysis_results(valid, test, cfg):
    """The per-step, oracle, selector and group entries of results.json."""
    own, oracle = test["main"]["ndcg@10"], test["oracle"]["ndcg@10"]
    def gap(m):  # the fraction of the own-view-to-oracle gap a view closes, on test NDCG@10
        return (m["ndcg@10"] - own) / (oracle - own) if oracle > own else None
    names = [v for v in valid if v not in ("main", "oracle", "groups") and not v.startswith("step")]
    selectors = {v: {"valid": valid[v], "test": test[v], "gap_closed": gap(test[v])} for v in names}
    best = choose_selector(valid, cfg)
    return {"per_step": {k: v for k, v in test.items() if k.startswith("step")}, "oracle": test["oracle"],
            "valid_per_step": {k: v for k, v in valid.items() if k.startswith("step")},
            "valid_oracle": valid["oracle"], "selectors": selectors,
            "selector": {"name": best, **selectors[best]} if best else None, "groups": test.get("groups")}


def print_analysis(res):
    """Per-step, oracle and selector rows, then NDCG@10 by quartile of history length and of target
    popularity (paper Fig. 4)."""
    own = res["test"]["ndcg@10"] if res.get("recommend_view", "main") == "main" else None
    def delta(m):  # ndcg@10 against the own view, with the paired standard error of the difference
        if own is None or "se_diff_ndcg@10" not in m:
            return ""
        return f" | vs own {m['ndcg@10'] - own:+.4f} ± {m['se_diff_ndcg@10']:.4f}"
    for name, m in list(res["per_step"].items()) + [("oracle", res["oracle"])]:
        print(f"test {name:11s} | {fmt(m)}{delta(m)}")
    for name, s in res["selectors"].items():
        extra = "".join(f" | {k} {s['test'][k]:.2f}" for k in ("steps", "step") if k in s["test"])
        closed = f"{100 * s['gap_closed']:+.0f} %" if s["gap_closed"] is not None else "n/a"
        star = " <- chosen on valid" if res["selector"] and name == res["selector"]["name"] else ""
        print(f"test {name:11s} | {fmt(s['test'])}{delta(s['test'])} | gap to oracle closed {closed}{extra}{star}")
    for gname, g in (res["groups"] or {}).items():
        views = ["main"] + list(res["per_step"]) + ([res["selector"]["name"]] if res["selector"] else []) + ["oracle"]
        head = " | ".join(f"Q{i + 1} {lo}-{hi}" for i, (lo, hi) in enumerate(g["ranges"]))
        print(f"test ndcg@10 by {gname} quartile | {head}")
        for v in dict.fromkeys(views):
            print(f"  {v:11s} | " + " | ".join(f"{q['ndcg@10']:.4f}" for q in g["views"][v]))


# -----------------------------------------------------------------------------
# Main
# -----------------------------------------------------------------------------
def main(argv=None):
    """Check the flags and --out, lock --out, run. Ctrl-C at any point: one line saying what is
    saved, and exit code 130 (128 + SIGINT, what a shell reports for Ctrl-C)."""
    cfg = parse_args(argv)
    device = pick_device(cfg.device)
    if cfg.dtype == "bfloat16" and not (torch.cuda.is_bf16_supported() if device.type == "cuda"
                                        else device.type == "cpu" and cpu_has_bf16()):
        sys.exit(f"error: --dtype bfloat16 needs a CUDA GPU with bf16 or a CPU with native bf16 "
                 f"(AVX512-BF16 or AMX); this {device.type} has none, use --dtype float32")
    check_out(cfg)
    try:
        lock = data.lock_out(cfg.out)
    except data.DataError as e:
        sys.exit(f"error: {e}")
    try:
        return run(cfg, device)
    except KeyboardInterrupt as e:
        print(f"interrupted {str(e) or f'before this run wrote anything to {cfg.out}'}", file=sys.stderr, flush=True)
        sys.exit(130)
    except (RuntimeError, MemoryError) as e:
        line = memory_error_line(e)
        if line is None:
            raise
        sys.exit(f"error: {line}")
    finally:
        data.release_lock(lock)


def run(cfg, device):
    """Data, model, training (or --benchmark), evaluation of the best checkpoint, results.json."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed)
    print(f"rearec | torch {torch.__version__} | device {device} | dtype {cfg.dtype} | "
          f"threads {torch.get_num_threads()}")
    try:
        ds = data.load_dataset(cfg.dataset, cfg.data_dir, split=cfg.split, min_rating=cfg.min_rating,
                               kcore=cfg.kcore)
    except data.DataError as e:
        sys.exit(f"error: {e}")
    cfg.n_items = ds.n_items
    resolve_auto(cfg, ds.stats["avg_len"])
    if cfg.epochs == 0:
        cfg.epochs = 20 if cfg.dataset == "synthetic" else 200
        print(f"epochs auto -> {cfg.epochs} (20 for the built-in synthetic demo, 200 otherwise; "
              f"early stopping after --patience {cfg.patience} epochs without a better validation score)")
    print("config", json.dumps(dataclasses.asdict(cfg)))
    mask = "history masked" if cfg.mask_history else "history not masked"
    print(f"protocol: full ranking over {ds.n_items} items, {mask}, ties share their rank "
          f"(expected value), select on valid {cfg.select_metric}")
    if cfg.benchmark:
        return benchmark(cfg, ds, device)
    if cfg.oracle_runs:
        return oracle_over_runs(cfg, ds, device)
    os.makedirs(cfg.out, exist_ok=True)
    model = ReaRec(cfg).to(device)
    print(f"{cfg.method} | K={cfg.steps} | {sum(p.numel() for p in model.parameters()):,} parameters")
    info = None
    try:
        info = train(cfg, model, ds, device)
        if info["interrupted"] and info["epoch"] == 0:  # no finished epoch: nothing to report
            raise KeyboardInterrupt(info["note"] + "; no results.json written")
        if info["best_epoch"] > 0:  # reload the best validation checkpoint of THIS run
            model.load_state_dict(load_checkpoint(info["best_path"], device, ("model",))["model"])
        t0 = time.time()
        selector = fit_selector(model, ds, cfg, device) if cfg.steps > 0 else None
        valid = evaluate(model, ds.valid, cfg, device, analysis=True, selector=selector, held_out=True)
        test = evaluate(model, ds.test, cfg, device, analysis=True, selector=selector,
                        groups=data.case_groups(ds.test, ds.train))
        eval_seconds = time.time() - t0
    except KeyboardInterrupt as e:
        if str(e) or info is None:  # train()'s own note, or before training: main() words it
            raise
        raise KeyboardInterrupt(f"during the final evaluation, results.json left as it was; "
                                f"{os.path.join(cfg.out, 'last.pt')} holds epoch {info['epoch']}: --resume "
                                f"continues (with --epochs {info['epoch']} it only evaluates)") from None
    except (NonFiniteLoss, data.DataError) as e:
        sys.exit(f"error: {e}")
    view = recommend_view(valid, cfg)
    results = {"config": dataclasses.asdict(cfg), "unused_config": unused_config(cfg), "dataset": ds.stats,
               "recommend_view": view,
               "valid": valid[view], "test": test[view], **analysis_results(valid, test, cfg),
               "epochs": info["epoch"], "best_epoch": info["best_epoch"],
               "train_seconds": info["train_seconds"], "eval_seconds": eval_seconds,
               "interrupted": info["interrupted"], "history": info["history"],
               "device": str(device), "torch": torch.__version__}
    print(f"valid (best epoch {info['best_epoch']}) | {fmt(valid[view])}" + (f" | view {view}" if view != "main" else ""))
    print(f"test | {fmt(test[view])} | {mask}")
    print_analysis(results)
    path = os.path.join(cfg.out, "results.json")
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")
    if info["interrupted"]:  # results.json holds the best epoch so far, marked "interrupted": true
        raise KeyboardInterrupt(info["note"] + f"; {path} has its best epoch's metrics, marked interrupted")
    return results


if __name__ == "__main__":
    main()
