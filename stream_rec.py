"""STREAM-Rec: slow thinking for sequential recommendation, in one readable file.

Junjie Zhang, Beichen Zhang, Wenqi Sun, Hongyu Lu, Wayne Xin Zhao, Yu Chen, Ji-Rong Wen.
"Slow Thinking for Sequential Recommendation". arXiv:2504.09627v1 (April 2025).
No official code was public when this file was written. The paper's method section is known
only through secondary sources, so every choice the paper leaves open is marked
`# Reconstructed:` (with the reading chosen and why) and listed in the README's STREAM-Rec table.

STREAM-Rec is a TIGER-style *generative* recommender. Every item becomes a short tuple of
discrete codes, its semantic ID (SID). An encoder-decoder Transformer reads the SID tokens of
the user's history and writes l "thinking" tokens (codes from the same vocabulary) before the
target item's SID. Three training stages teach it to think before it answers:
    base     the direct recommender: l = 0, cross-entropy (TIGER). Every stage is compared to
             it, and it is the "direct model" of the DPO loss and the likelihood reward.
    stage 1  pretraining on synthesized long targets: similar items' codes, then the target.
    stage 2  iterative-inference annotation of reasoning traces by the frozen stage-1 model, once
             for every training prefix, then fine-tuning on the stored traces (cross-entropy +
             state-target contrastive + quantisation + DPO against the direct model), part of
             every batch trained after the model's own trace (training sees what inference sees).
    stage 3  reinforcement learning with GRPO and five rewards.

Implements: item features (TF-IDF+SVD of S3-Rec attributes or of titles, PPMI co-occurrence +
    SVD, or attributes + co-occurrence) and residual k-means semantic IDs with a dedup digit; a
    small T5-like encoder-decoder with tied embeddings, a KV cache, the annotation MLPs and the
    target projection; the four training stages above (stage 2 annotated offline by a frozen
    model, or online), every loss / reward term behind a weight flag; batched beam search with
    invalid-SID dropping and duplicate merging (max or log-sum-exp), scored by data.py's shared
    full-ranking protocol; auto budgets with an expected time at start; stage checkpoints,
    --resume, and a --benchmark mode.
Omits: the pretrained text encoder and the RQ-VAE (no downloads offline: TF-IDF/co-occurrence
    vectors and RQ-k-means stand in), T5's relative position bias, the hashed user token,
    learning-rate schedules, and the spec's ablation grid (run it with the weight flags).

Run
    python stream_rec.py                                  # synthetic data, all stages, CPU, minutes
    python stream_rec.py --stages base,1 --trace-len 6    # some stages only (paper order)
    python stream_rec.py --stages 3 --overwrite           # rerun stage 3 from the saved stage 2
    python stream_rec.py --resume                         # skip finished stages, continue an interrupted one
    python stream_rec.py --stages 3 --eval-only --trace-decode greedy   # re-evaluate a stage
    python stream_rec.py --dataset DIR/Toys_and_Games.txt   # attributes found beside it
    python stream_rec.py --dataset ml-1m --data-dir DIR   # real data: full epochs, early stopping
    python stream_rec.py --benchmark --dataset ml-1m --data-dir DIR    # timings, peak memory
    Paper-size backbone: --d-model 128 --d-ff 512 --enc-layers 3 --dec-layers 3 --dropout 0.1

Notation (paper -> code)
    i_1..i_n, i_{n+1}    history `hist` (B, L) item ids, `target` (B,)
    m, c_{p+1..p+m}      RQ levels `levels`; the SID tokens of an item `model.item_tokens[item]`
                         (M = m + 1 tokens: m codes and the de-duplication digit)
    C, c_k               code-token vocabulary; embedding rows `model.emb.weight[FIRST_CODE:]`
    l, o_1..o_l          thinking tokens: `trace_len`, `trace` (B, l) token ids
    tau                  softmax temperature of P(y_t | ...) (`tau`, Spec §1)
    d_j                  decoder output state at position j (`d`), j = 0 is the start token
    s_i, r_i, t          state MLP_s(sum_{j<=i} d_j), residual MLP_r(t - s_{i-1}), target repr.
                         t = W v_target (`target_proj`, item vectors `item_vectors`; --target-repr)
    q                    length of the stage-1 synthetic prefix (= l here)
    lambda_*, tau_c      stage-2 loss weights `lambda_con` ..., InfoNCE temperature `tau_con`
    G, R, A, eps, beta   GRPO group size, reward sum_k w_k r_k, advantage, clip range `clip_eps`,
                         KL weight `beta_kl`
Shapes: B histories, L = max_len history items, M SID tokens per item, S = L*M encoder tokens,
    T = l + M + 1 decoder positions (trace, SID, EOS), W sequences per history (beams,
    rollouts, candidates), D = d_model, V vocabulary, N items, F item-feature dimension.
"""
import argparse
import copy
import dataclasses
import inspect
import json
import math
import os
import random
import re
import sys
import time
import types
import typing
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data

# Token ids: PAD pads histories, BOS starts the decoder, EOS ends an output; codes come after.
PAD_TOK, BOS, EOS, FIRST_CODE = 0, 1, 2, 3
STAGES = {"base": "base", "1": "stage1", "2": "stage2", "3": "stage3"}  # flag value -> result key
CHOICES = dict(features=("auto", "attr", "attr+cooc", "text", "cooc"), annotate=("offline", "online"),
               target_repr=("feature", "sid"), annot_keep=("all", "gain"), dpo_form=("direct", "shared"),
               rl_data=("users", "prefixes"), match_reward=("prefix", "level", "exact"),
               rank_negs_from=("direct", "popular", "random"), rl_credit=("sequence", "causal"), rl_judge=("policy", "ref"), stage1_init=("fresh", "direct"),
               trace_decode=("beam", "greedy", "split"), merge=("max", "lse"),
               skip_history=("auto", "on", "off"))  # flag -> its allowed values
MAX_ENCODER_TOKENS = 1024  # --max-len x (--levels + 1) cap: encoder attention memory grows with its square
CHEAP_WIDTH = 100  # beams and ranking negatives up to this are allowed on any data; wider: at most N items


class RunError(Exception):
    """A bad flag or a missing prerequisite; main() prints it as one line."""


# -----------------------------------------------------------------------------
# Config
# -----------------------------------------------------------------------------
@dataclass
class Config:
    # data (passed to data.load_dataset; None = the dataset's documented default)
    dataset: str = "synthetic"  # name or file path (see data.py); default: offline synthetic set
    data_dir: str = "data"  # download cache / folder of named datasets
    split: str | None = None  # loo | time
    min_rating: float | None = None  # keep ratings >= this
    kcore: int | None = None  # drop users/items with fewer interactions; 0 = off
    max_len: int = 20  # L, history items read by the encoder (MTGRec/TIGER: 20)
    mask_history: bool = True  # remove history items from rankings (shared protocol, README)
    # semantic IDs (Spec §2.1)
    features: str = "auto"  # item vectors: attr (TF-IDF+SVD of S3-Rec attributes) | attr+cooc (both, concatenated) | text (TF-IDF+SVD of titles) | cooc (PPMI+SVD) | auto: text with titles, else cooc (README: on Toys attr+cooc test R@10 0.0478 vs cooc 0.0501, seed 0; previous auto: attr+cooc with attributes)
    attributes: str | None = None  # S3-Rec <Name>_item2attributes.json (item id -> attribute ids); None = the one next to --dataset, if any
    feature_dim: int = 32  # F, SVD dimension of the item vectors
    cooc_window: int = 5  # items closer than this in a training sequence co-occur
    levels: int = 3  # m, residual quantisation levels (Spec §2.1 [R]: 3, plus a dedup digit)
    codebook_size: int = 0  # codes per level; 0 = ceil((8N)^(1/m)) clipped to [2, 256] (ours)
    kmeans_iters: int = 30  # Lloyd iterations per level (k-means++ init, seeded)
    # model (Spec §2.2: T5-like encoder-decoder; paper size 128 / 512 / 3 / 3)
    d_model: int = 64  # D
    n_heads: int = 4  # attention heads
    d_ff: int = 256  # feed-forward width
    enc_layers: int = 2  # encoder layers
    dec_layers: int = 2  # decoder layers
    dropout: float = 0.0  # dropout (TIGER/MTGRec: 0.1; 0 here, see the Deviation note in README)
    tau: float = 1.0  # tau, output softmax temperature (Spec §1; not given, 1)
    trace_len: int = 4  # l, thinking tokens (Spec §2.3: 4 Scientific, 6 Instruments)
    constrain_levels: bool = True  # SID positions may only emit their own level's codes (ours)
    constrain_items: bool = True  # beam search follows only SID prefixes of real items (a prefix trie) (ours)
    skip_history: str = "auto"  # on: beams (and stage 3's trie rollouts, --rl-skip-history) never complete an item of the history window (the protocol masks the history unless it is the target); auto = on when no training sequence repeats an item (ours)
    # training, shared by the stages
    epochs: int = 0  # max epochs of base, stage 1 and stage 2; 0 = auto: 3 on the synthetic demo (minutes), 50 on real data (early stopping: --patience)
    batch_size: int = 256  # (prefix -> next item) examples per step (MTGRec: 256)
    bucket: int = 0  # length bucketing of the prefix batches (base, stages 1-2; stage 3 with --rl-data prefixes): sort random pools of this many batches by prefix length, cut the padding (data.train_batches); 0 = off (ours, for speed: which prefixes share a batch changes, no output; README, STREAM-Rec "Benchmark")
    max_examples: int = -1  # examples per epoch, a fresh random subset each epoch; 0 = all; -1 = auto: 8192 on the synthetic demo, all on real data
    lr: float = 1e-3  # AdamW learning rate of base and stage 1 (MTGRec ft config: 1e-3)
    weight_decay: float = 0.05  # AdamW weight decay (MTGRec: 0.05)
    grad_clip: float = 1.0  # max gradient norm; 0 = off
    patience: int = 3  # early stop after this many epochs without a better valid metric; 0 = off
    select: str = "ndcg@10"  # validation metric that selects checkpoints (Spec §3.3: NDCG@10)
    # stages 1-2 (the base does not read them)
    stage1_init: str = "direct"  # direct: stage 1 starts from the direct model's (base.pt) weights, its SID/EOS decoder positions moved after the trace (ours; Toys, seeds 0 and 1 with --bucket 8: stage 2 test R@10 0.0493 +- 0.0008 against their bases' 0.0488 +- 0.0011; from a fresh stage 1, seed 0: 0.0481 against 0.0501; README row 12a) | fresh: new weights (Spec §3 says nothing else)
    rl_holdout: bool = False  # stages 1 and 2 train without each user's last training item, the target stage 3 reinforces, so RL sees targets the SFT never fitted (ours; README "Stage-3 screens")
    # stage 2: annotation + SFT (Spec §4)
    sft_lr: float = 5e-4  # AdamW learning rate of stage 2 (Spec §4.3 [R]: 2e-4..1e-3)
    annotate: str = "offline"  # offline: fit MLP_r/MLP_s on the frozen stage-1 model, label every training prefix once, fine-tune on the stored traces (Spec §4.2 alt.) | online: every batch labelled by the weights being trained (previous reconstruction)
    annot_epochs: int = 1  # offline: epochs (of --max-examples) fitting MLP_r, MLP_s and the target projection on the frozen model (L_con + L_quant) before labelling
    annot_every: int = 0  # offline: re-annotate every this many stage-2 epochs from a frozen snapshot of the model being fine-tuned; 0 = annotate once
    target_repr: str = "feature"  # t (Spec §4.2): feature = learned projection of the target's item vector | sid = sum of the target's code embeddings (previous reconstruction; it spells the answer)
    trace_topk: int = 8  # o_i = nearest code to r_i among the frozen model's own top-k tokens at step i; 0 = among all codes (previous reconstruction)
    annot_keep: str = "all"  # all | gain: keep an annotated trace only where it makes the target more likely (frozen annotator) than the direct model does; the other examples train on their own trace
    self_trace_frac: float = 0.5  # share of each stage-2 batch whose SID tokens are trained after the model's own greedy trace (no exposure gap); 0 = annotated traces only (previous)
    sft_warmup: int = 0  # epochs whose CE skips the thinking tokens (Spec §4.3 stability tip; previous reconstruction: 1)
    lambda_con: float = 0.1  # weight of L_con, state-target InfoNCE (Spec §4.3.2)
    tau_con: float = 0.1  # InfoNCE temperature (Spec §4.3.2 [R]: 0.07-0.1)
    lambda_quant: float = 0.1  # weight of L_quant, residual commitment (Spec §4.3.3)
    quant_beta: float = 0.0  # weight of the codebook half of L_quant (Spec §4.3.3 [R]: off)
    lambda_dpo: float = 0.1  # weight of L_DPO against the direct model (Spec §4.3.4)
    lambda_usage: float = 0.0  # weight of the code-usage penalty against trace collapse (Spec §4.3 tip; previous reconstruction: 1)
    beta_dpo: float = 0.1  # DPO beta (ours; the usual DPO default)
    dpo_form: str = "direct"  # direct: chosen [o ; target], rejected [own trace ; the direct model's answer], reference = the direct model | shared: both after one trace, reference = the stage-2 start (previous)
    # stage 3: GRPO (Spec §4b)
    rl_epochs: int = 2  # RL epochs (Spec §4b [R]: 1-3)
    rl_max_examples: int = -1  # histories per RL epoch, a fresh random subset; 0 = all; -1 = auto: 512 on the synthetic demo, all on real data
    rl_data: str = "users"  # users: one history per user, its training prefix -> last training item (Spec §4b: "epochs over the training users") | prefixes: every training prefix
    rl_batch: int = 32  # histories per RL step
    group_size: int = 8  # G, rollouts per history (Spec §4b [R]: 8-16)
    rl_lr: float = 2e-5  # AdamW learning rate (Spec §4b [R]: 1e-5..5e-5, "up to 1e-4")
    clip_eps: float = 0.2  # eps, PPO clip range (Spec §4b)
    beta_kl: float = 0.04  # beta, weight of the k3 KL to the stage-2 reference (Spec §4b: .01-.04)
    rl_inner: int = 2  # policy updates per batch of rollouts (Spec §4b: 1-2)
    rl_temp: float = 1.0  # sampling temperature of the rollouts (Spec §4b)
    rl_select_start: bool = True  # validate the stage-2 weights as "epoch 0" and keep them if no RL epoch beats them on valid (ours; previous: off)
    rl_credit: str = "sequence"  # sequence: every token gets the rollout's advantage (Spec §4b [R], DeepSeekMath) | causal: the SID and EOS tokens only the advantage of the rewards they can change (format, match)
    rl_judge: str = "policy"  # who scores the similarity, likelihood and ranking rewards: policy (the model being trained, with its own heads; the rewards move as it learns) | ref (the frozen stage-2 copy: fixed rewards, as a reward model is; ours)
    rl_skip_history: bool = True  # with --rl-trie and --skip-history on, the rollouts skip the history window's items as the beams do (ours; previous: they could end in one)
    rl_trie: bool = True  # sample the rollouts' SIDs inside the item trie (as --constrain-items decodes); the policy ratio and KL use the same renormalised distribution (ours; README: better than free rollouts on the synthetic data, 2 seeds, and on Toys, 1 seed; previous: off)
    w_format: float = 1.0  # weight of the format reward (Spec §4b.1)
    w_match: float = 1.0  # weight of the exact-match prefix reward (Spec §4b.2)
    w_sim: float = 0.5  # weight of the state-target similarity reward (Spec §4b.3)
    w_lik: float = 0.5  # weight of the thinking-likelihood reward (Spec §4b.4)
    w_rank: float = 1.0  # weight of the thinking-ranking reward (Spec §4b.5)
    match_reward: str = "prefix"  # prefix: leading SID codes right / M (Spec §4b.2) | level: codes right at any level / M (partial credit per level) | exact: 1 on a hit only
    rank_negs: int = 19  # negatives of the ranking reward (Spec §4b.5 [R]: 49-99)
    rank_negs_from: str = "direct"  # direct: the direct model's beams (hard), popular items fill | popular: drawn by training popularity | random: uniform (previous)
    # evaluation (Spec §2.5, §5.3)
    beam_valid: int = 20  # beam size on validation (MTGRec: 20)
    beam_test: int = 50  # beam size on test (MTGRec: 50)
    trace_decode: str = "beam"  # beam: one beam over trace + SID | greedy: greedy trace, then a beam over the SID (Spec §7.13) | split: the --trace-beams best traces, each with its own SID beam
    trace_beams: int = 4  # traces kept by --trace-decode split (each then gets a full --beam-valid/--beam-test SID beam: that many times the decoding cost)
    merge: str = "max"  # beams that end in one item: max (its best trace) | lse (log-sum-exp over its traces: the item's marginal probability)
    eval_batch: int = 128  # histories per evaluation batch
    # run
    stages: str = "base,1,2,3"  # stages to run, in paper order: any of base,1,2,3
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:i | mps
    seed: int = 0  # seeds everything; each stage also derives its own streams from it
    threads: int = 0  # CPU threads for torch; 0 = torch's default (1 is faster on a busy machine)
    out: str = "runs/stream_rec"  # folder of checkpoints and results.json; locked (out/.lock) while a run uses it
    resume: bool = False  # skip stages whose finished checkpoint is already in --out; continue an interrupted one from its last finished epoch
    overwrite: bool = False  # rerun stages that already have a checkpoint in --out (without it, or --resume, that is refused)
    eval_only: bool = False  # only evaluate the saved checkpoints of --stages; writes DIR/eval.json
    benchmark: bool = False  # time each stage's steps and the decoding instead of training
    benchmark_steps: int = 20  # training steps timed per stage by --benchmark
    estimate: bool = True  # time two steps of each stage at start and print the expected run time


def _field_help():
    """Field name -> its trailing comment, so --help shows exactly the comments above."""
    try:
        src = inspect.getsource(Config)
    except (OSError, TypeError):
        return {}
    return dict(re.findall(r"^\s+(\w+): [^#\n]*#\s*(.*)$", src, flags=re.M))


def parse_args(argv=None) -> Config:
    """Flags generated from Config: --trace-len (or --trace_len), --no-mask-history, ..."""
    p = argparse.ArgumentParser(description="STREAM-Rec (arXiv:2504.09627v1): semantic IDs, "
                                "base/stage 1/2/3 training, beam-search evaluation.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    helps = _field_help()
    for f in fields(Config):
        flags = ["--" + f.name.replace("_", "-")] + (["--" + f.name] if "_" in f.name else [])
        typ = f.type
        if typing.get_origin(typ) in (typing.Union, types.UnionType):  # `float | None`
            typ = next(a for a in typing.get_args(typ) if a is not type(None))
        if typ is bool:
            p.add_argument(*flags, action=argparse.BooleanOptionalAction, default=f.default,
                           help=helps.get(f.name, ""))
        else:
            p.add_argument(*flags, type=typ, default=f.default, help=helps.get(f.name, ""))
    return check_config(Config(**vars(p.parse_args(argv))))


def check_config(cfg, ds=None):
    """Refuse bad values with one line that names the flag and the fix. Every numeric flag is
    checked here: at parsing, and once more with the dataset `ds` (the limits it sets: beams and
    ranking negatives cannot use more items than it has)."""
    def need(ok, msg):
        if not ok:
            raise RunError(msg)
    for f in fields(cfg):  # nan and inf pass the comparisons below, then break training
        v = getattr(cfg, f.name)
        need(not isinstance(v, float) or math.isfinite(v),
             f"--{f.name.replace('_', '-')} must be a finite number (got {v})")
    need(cfg.trace_len >= 0, f"--trace-len must be >= 0 (got {cfg.trace_len})")
    for name in ("levels", "max_len", "feature_dim", "d_model", "n_heads", "d_ff", "enc_layers",
                 "dec_layers", "rl_epochs", "batch_size", "rl_batch", "beam_valid", "beam_test", "trace_beams",
                 "eval_batch", "kmeans_iters", "benchmark_steps"):
        need(getattr(cfg, name) >= 1, f"--{name.replace('_', '-')} must be >= 1 "
             f"(got {getattr(cfg, name)})")
    need(cfg.self_trace_frac >= 0, f"--self-trace-frac must be in [0, 1] (got {cfg.self_trace_frac})")
    for name in ("max_examples", "rl_max_examples"):
        need(getattr(cfg, name) >= -1, f"--{name.replace('_', '-')} must be >= -1: -1 = auto, 0 = all "
             f"(got {getattr(cfg, name)})")
    for name in ("epochs", "patience", "bucket", "codebook_size", "annot_epochs", "annot_every", "trace_topk",
                 "sft_warmup", "rank_negs", "quant_beta", "threads", "lambda_con", "lambda_quant",
                 "lambda_dpo", "lambda_usage", "beta_kl", "weight_decay", "grad_clip", "dropout"):
        need(getattr(cfg, name) >= 0, f"--{name.replace('_', '-')} must be >= 0 "
             f"(got {getattr(cfg, name)})")
    for name in ("lr", "sft_lr", "rl_lr", "tau", "tau_con", "beta_dpo", "rl_temp", "clip_eps"):
        v = getattr(cfg, name)
        need(math.isfinite(v) and v > 0, f"--{name.replace('_', '-')} must be > 0 (got {v})")
    need(cfg.d_model % cfg.n_heads == 0, f"--d-model ({cfg.d_model}) must be divisible by "
         f"--n-heads ({cfg.n_heads})")
    need(cfg.group_size >= 2, f"--group-size must be >= 2: GRPO normalises rewards within a "
         f"group (got {cfg.group_size})")
    need(cfg.rl_inner >= 1, f"--rl-inner must be >= 1 (got {cfg.rl_inner})")
    need(cfg.cooc_window >= 2, f"--cooc-window must be >= 2: items closer than the window are "
         f"paired, so 1 pairs nothing (got {cfg.cooc_window})")
    need(cfg.rank_negs >= 1 or not cfg.w_rank, f"--rank-negs must be >= 1 while --w-rank is on "
         f"(got {cfg.rank_negs}); the ranking reward ranks the target among them")
    need(cfg.codebook_size <= 256 or cfg.codebook_size == 0, "--codebook-size must be <= 256")
    need(cfg.dropout < 1, f"--dropout must be < 1 (got {cfg.dropout})")
    for name, choices in CHOICES.items():
        need(getattr(cfg, name) in choices, f"--{name.replace('_', '-')} must be {', '.join(choices[:-1])} "
             f"or {choices[-1]} (got {getattr(cfg, name)!r})")
    need(cfg.self_trace_frac <= 1, f"--self-trace-frac must be in [0, 1] (got {cfg.self_trace_frac})")
    metrics = [f"{m}@{k}" for m in ("recall", "ndcg", "mrr") for k in data.KS] + ["mrr"]
    need(cfg.select in metrics, f"--select must be one of {', '.join(metrics)} "
         f"(got {cfg.select!r})")
    names = [s.strip() for s in cfg.stages.split(",") if s.strip()]
    bad = [s for s in names if s not in STAGES]
    need(names and not bad, f"--stages takes a comma list of base,1,2,3 (got {cfg.stages!r})")
    need(0 <= cfg.seed < 2**32, f"--seed must be in 0..2^32-1, numpy's seed range (got {cfg.seed})")
    need(cfg.kcore is None or cfg.kcore >= 0, f"--kcore must be >= 0, 0 = off (got {cfg.kcore})")
    tokens = cfg.max_len * (cfg.levels + 1)
    need(tokens <= MAX_ENCODER_TOKENS, f"--max-len {cfg.max_len} x {cfg.levels + 1} SID tokens = {tokens} "
         f"encoder tokens, more than {MAX_ENCODER_TOKENS}: attention memory grows with their square; "
         f"lower --max-len (TIGER: 20) or --levels")
    rewards = ("w_format", "w_match", "w_sim", "w_lik", "w_rank")
    for name in rewards:
        need(getattr(cfg, name) >= 0, f"--{name.replace('_', '-')} must be >= 0, 0 = off (got "
             f"{getattr(cfg, name)}): a negative weight rewards the opposite")
    need("3" not in names or any(getattr(cfg, n) for n in rewards), "stage 3 needs a reward: "
         "--w-format, --w-match, --w-sim, --w-lik and --w-rank are all 0, so GRPO would train nothing")
    need(cfg.constrain_levels or not cfg.constrain_items, "--constrain-items follows the items' SIDs level "
         "by level and needs the level masks: with --no-constrain-levels pass --no-constrain-items too")
    need(cfg.constrain_items or cfg.skip_history != "on", "--skip-history on works inside --constrain-items' "
         "trie: pass --constrain-items, or --skip-history off")
    need(not (cfg.resume and cfg.overwrite), "--resume continues the stages in --out and --overwrite "
         "reruns them; pass one of them")
    need(not (cfg.rl_holdout and cfg.stage1_init == "direct"), "--rl-holdout keeps each user's last training "
         "item out of stages 1-2, but --stage1-init direct starts stage 1 from the base, which trained on it: "
         "add --stage1-init fresh")
    if ds is not None:  # Note: a ranked list holds at most N items; memory grows with the width
        for name in ("beam_valid", "beam_test"):  # widths up to CHEAP_WIDTH are fine on any data
            limit = max(ds.n_items, CHEAP_WIDTH)
            need(getattr(cfg, name) <= limit, f"--{name.replace('_', '-')} {getattr(cfg, name)} is wider "
                 f"than the {ds.n_items} items of {ds.name}: beams of one item are merged, so a list never "
                 f"holds more; use at most {limit} (MTGRec: 20 valid, 50 test)")
        limit = max(ds.n_items - 1, CHEAP_WIDTH)
        need(cfg.rank_negs <= limit or not cfg.w_rank, f"--rank-negs {cfg.rank_negs} needs that many "
             f"other items, but {ds.name} has {ds.n_items}; use at most {limit}")
    return cfg


# -----------------------------------------------------------------------------
# Utilities (BOILERPLATE)
# -----------------------------------------------------------------------------
def set_seed(seed):
    """Seed python, numpy and torch (all devices). Data order uses explicit Generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name):
    """auto -> cuda, then mps, then cpu. An explicit device that is absent is an error."""
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if re.fullmatch(r"cuda(:\d+)?", name):
        if not torch.cuda.is_available():
            raise RunError(f"--device {name}: this torch build or machine has no CUDA; "
                           f"use --device cpu or auto")
        if ":" in name and int(name.split(":")[1]) >= torch.cuda.device_count():
            raise RunError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
        return torch.device(name)
    if name == "mps":
        if not has_mps:
            raise RunError("--device mps: MPS is not available here; use --device cpu or auto")
        return torch.device("mps")
    raise RunError(f"--device must be auto, cpu, cuda, cuda:i or mps (got {name!r})")


def stage_seed(cfg, key):
    """Each stage has its own seed, so a stage rerun alone repeats the full run's numbers."""
    return cfg.seed * 1000 + list(STAGES.values()).index(key) * 101 + 7


def save_atomic(obj, path):
    """Write to a temporary file, then rename: a crash or Ctrl-C never leaves half a file."""
    tmp = path + ".tmp"
    try:
        if path.endswith(".json"):
            with open(tmp, "w") as f:
                json.dump(obj, f, indent=1)
        else:
            torch.save(obj, tmp)
    except BaseException:  # Ctrl-C or a full disk mid-write: drop the partial temp file
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


def load_file(path, keys=()):
    """A checkpoint (torch, weights only) or results.json of this script; a damaged file (truncated
    by a kill or a full disk, overwritten, random bytes) is one line, not a traceback. keys: the
    entries it must have."""
    try:
        if path.endswith(".json"):
            with open(path) as f:
                obj = json.load(f)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        ok = isinstance(obj, dict) and all(k in obj for k in keys)
    except Exception:  # torch.load and json raise many types here (UnpicklingError, RuntimeError...)
        ok = False
    if not ok:
        raise RunError(f"{path} is corrupt or incomplete; delete it or use a new --out")
    return obj


def memory_error_line(e):
    """One line for a failed allocation (sizes too large for this machine); None for other errors."""
    text = str(e)
    if not (isinstance(e, MemoryError) or re.search(r"out of memory|can't allocate|not enough memory", text, re.I)):
        return None
    asked = re.search(r"allocate (\d+) bytes", text)
    what = f"{int(asked.group(1)) / 2**30:.1f} GiB asked for" if asked else text.strip().splitlines()[0][:120]
    return (f"out of memory ({what}); lower --batch-size, --eval-batch, --beam-test, --rl-batch, "
            f"--group-size or --d-model")


# -----------------------------------------------------------------------------
# The run folder --out: checked before any work, locked while a run uses it (BOILERPLATE; the same
# helpers are in rearec.py, duplicated on purpose so this file stands alone)
# -----------------------------------------------------------------------------
def check_out(cfg, keys):
    """Before any work: --out is a folder (or does not exist yet), and the stages to train do not
    replace checkpoints already in it unless --overwrite says so (--resume continues them)."""
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise RunError(f"--out {cfg.out} is a file, not a folder; pass a folder path")
    if cfg.eval_only or cfg.benchmark or cfg.resume or cfg.overwrite:
        return
    found = [f"{key}.pt" for key in keys if os.path.exists(ckpt_path(cfg, key))]
    if found:
        raise RunError(f"{cfg.out} already holds {', '.join(found)} from another run of these stages; "
                       f"continue it with --resume, rerun the stages with --overwrite, or use a new --out")


def peak_rss_mib():
    """Peak resident memory of this process (Linux/macOS; None elsewhere)."""
    try:
        import resource
    except ImportError:
        return None
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kb / (2**20 if sys.platform == "darwin" else 2**10), 1)


# -----------------------------------------------------------------------------
# Semantic IDs (Spec §2.1: items -> m residual codes + a de-duplication digit)
# -----------------------------------------------------------------------------
def svd_vectors(matrix, dim, seed):
    """Rows of a sparse (N, X) matrix -> (N, F) unit vectors from a truncated SVD (U * S)."""
    q = max(1, min(dim, *matrix.shape))
    with torch.random.fork_rng():  # svd_lowrank draws a random projection: make it seeded
        torch.manual_seed(seed)
        U, S, _ = torch.svd_lowrank(matrix, q=q, niter=6)
    return F.normalize(U * S, dim=1)  # (N, F) cosine geometry for k-means and neighbours


def text_features(item_text, dim, seed):
    """TF-IDF over the words of "title | genres" lines, then SVD (stands in for a PLM)."""
    # Deviation: the paper encodes item text with a pretrained language model (Spec §2.1);
    # offline and dependency-free, a TF-IDF + SVD embedding keeps the "text -> vector" role.
    return tfidf_svd([re.findall(r"[a-z0-9]+", t.lower()) for t in item_text[1:]], dim, seed)


def attribute_features(item_attrs, dim, seed):
    """S3-Rec attributes (brand, categories: ids) as a bag of tokens -> TF-IDF -> SVD, (N, F)."""
    # Reconstructed: TIGER encodes title, price, brand and category with Sentence-T5; the S3-Rec
    # files carry brand and categories as ids only, so the bag of ids is the item's "text".
    return tfidf_svd([[f"a{a}" for a in attrs] for attrs in item_attrs[1:]], dim, seed)


def tfidf_svd(docs, dim, seed):
    """Token lists (one per item) -> smoothed TF-IDF rows (unit length) -> SVD, (N, F). An item
    without tokens gets the zero vector."""
    vocab = {w: k for k, w in enumerate(sorted({w for d in docs for w in d}))}
    rows = torch.tensor([i for i, d in enumerate(docs) for _ in d], dtype=torch.long)
    cols = torch.tensor([vocab[w] for d in docs for w in d], dtype=torch.long)
    n, v = len(docs), max(len(vocab), 1)
    tf = torch.sparse_coo_tensor(torch.stack([rows, cols]), torch.ones(len(rows)), (n, v),
                                 check_invariants=True).coalesce()  # (N, X) word counts
    i, c = tf.indices(), tf.values()
    df = torch.bincount(i[1], minlength=v).float()
    w = c * (torch.log((1 + n) / (1 + df)) + 1)[i[1]]  # tf * smoothed idf
    w = w / torch.zeros(n).index_add_(0, i[0], w * w).sqrt()[i[0]]  # unit rows
    return svd_vectors(torch.sparse_coo_tensor(i, w, (n, v), check_invariants=True), dim, seed)


def cooc_features(train, n_items, window, dim, seed):
    """Collaborative item vectors from TRAINING sequences only: windowed co-occurrence counts
    -> positive PMI -> SVD. (Valid/test targets never leak into the semantic IDs.)"""
    # Reconstructed: the paper quantises text embeddings only; data without titles (SASRec's
    # ml-1m.txt) needs a text-free item vector, and co-occurrence is the standard one.
    row, pos = train.positions()  # (n,) sequence of each training position, its index in items
    seq = train.items[pos] - 1  # (n,) item index 0..N-1, users back to back
    a, b = [], []
    for d in range(1, window):  # pairs (x_p, x_{p+d}) inside the same sequence
        same = row[:-d] == row[d:]
        a += [seq[:-d][same], seq[d:][same]]
        b += [seq[d:][same], seq[:-d][same]]  # symmetric
    idx = torch.from_numpy(np.stack([np.concatenate(a), np.concatenate(b)]))
    C = torch.sparse_coo_tensor(idx, torch.ones(idx.shape[1]), (n_items, n_items),
                                check_invariants=True).coalesce()  # (N, N) counts
    i, c = C.indices(), C.values()
    marg = torch.sparse.sum(C, 1).to_dense()  # (N,) row sums = column sums (symmetric)
    pmi = torch.log(c * c.sum() / (marg[i[0]] * marg[i[1]]))
    keep = pmi > 0  # PPMI: negative associations are noise at this data size
    P = torch.sparse_coo_tensor(i[:, keep], pmi[keep], (n_items, n_items), check_invariants=True)
    return svd_vectors(P.coalesce(), dim, seed)


def kmeans(x, k, iters, gen):
    """Deterministic k-means: k-means++ seeding from `gen`, then `iters` Lloyd steps.
    (N, F) -> centres (k, F), assignment (N,). An empty cluster keeps its old centre."""
    n = x.shape[0]
    centres = x[torch.randint(n, (1,), generator=gen)]  # (1, F)
    d2 = torch.cdist(x, centres).squeeze(1) ** 2  # (N,) squared distance to the nearest centre
    for _ in range(1, k):
        pick = torch.multinomial(d2, 1, generator=gen) if d2.sum() > 0 else \
            torch.randint(n, (1,), generator=gen)
        centres = torch.cat([centres, x[pick]])
        d2 = torch.minimum(d2, torch.cdist(x, x[pick]).squeeze(1) ** 2)
    for _ in range(iters):
        assign = torch.cdist(x, centres).argmin(1)  # (N,)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)  # (k, F)
        count = torch.bincount(assign, minlength=k)[:, None]
        centres = torch.where(count > 0, sums / count.clamp(min=1), centres)
    return centres, torch.cdist(x, centres).argmin(1)


def residual_kmeans(vecs, levels, size, iters, seed):
    """RQ-k-means (Spec §2.1, §9.3): level k clusters the residual left by levels < k.
    Then a de-duplication digit numbers the items that share all m codes, so SIDs are unique.
    Returns codes (N, m+1), sizes [K_1..K_m, K_dedup], and a usage report."""
    # Deviation: RQ-VAE (Spec §2.1) is replaced by RQ-k-means, which the spec allows (§9.3):
    # no training loop and deterministic, and it yields the same kind of hierarchical codes.
    n = vecs.shape[0]
    # Reconstructed: K = (8N)^(1/m) codes per level, so the m levels address ~8x more tuples
    # than items (the paper's 3 x 256 serves ~25k items; with K^m ~ N even random codes would
    # collide for a third of the items; 256 codes for 400 items would make every code unique).
    k = size or min(256, max(2, math.ceil((8 * n) ** (1 / levels) - 1e-9)))
    k = min(k, n)
    if k ** levels * n >= 2 ** 62:  # code tuples become int64 keys (dedup digit < n included)
        raise RunError(f"{levels} levels of {k} codes for {n} items address more code tuples than an "
                       f"int64 key holds; use fewer --levels or a smaller --codebook-size")
    gen = torch.Generator().manual_seed(seed)
    residual, codes = vecs.clone(), []
    for _ in range(levels):
        centres, c = kmeans(residual, k, iters, gen)
        codes.append(c)
        residual = residual - centres[c]  # what the next level has to explain
    codes = torch.stack(codes, 1)  # (N, m)
    # Reconstructed: the de-duplication digit (MTGRec's conflict codebook, Spec §2.1 [R]) numbers
    # the items of one code tuple 0, 1, 2, ... in item-id order (deterministic, meaning-free).
    key = (codes * torch.tensor([k ** (levels - 1 - j) for j in range(levels)])).sum(1)  # (N,)
    order = torch.argsort(key, stable=True)
    sk = key[order]
    first = torch.ones(n, dtype=torch.bool)
    first[1:] = sk[1:] != sk[:-1]
    start = torch.cummax(torch.where(first, torch.arange(n), 0), 0).values
    dedup = torch.empty(n, dtype=torch.long)
    dedup[order] = torch.arange(n) - start  # rank inside the group
    codes = torch.cat([codes, dedup[:, None]], 1)  # (N, M = m+1)
    sizes = [k] * levels + [int(dedup.max()) + 1]
    report = dict(sizes=sizes, used_per_level=[int(codes[:, j].unique().numel()) for j in range(levels)],
                  items_with_dedup_digit=int((dedup > 0).sum()),
                  colliding_prefixes=int((dedup == 1).sum()))  # each shared tuple has one digit 1
    return codes, sizes, report


def feature_kind(cfg, ds):
    """--features auto -> text with titles, else cooc. S3-Rec attributes only on request (attr,
    attr+cooc): on Toys attributes + co-occurrence trailed co-occurrence alone (README)."""
    if cfg.features != "auto":
        return cfg.features
    return "text" if ds.item_text else "cooc"


def build_semantic_ids(cfg, ds):
    """Item vectors (attributes, text or co-occurrence) -> RQ codes. Built on CPU: same seed, same SIDs."""
    t0 = time.time()
    kind = feature_kind(cfg, ds)
    if kind == "text" and not ds.item_text:
        raise RunError(f"--features text needs item titles, but {ds.name} has no metadata; "
                       f"use --features cooc (or auto)")
    if kind.startswith("attr") and not ds.item_attrs:
        raise RunError(f"--features {kind} needs an S3-Rec attribute file (<Name>_item2attributes.json "
                       f"next to the data, or --attributes PATH), but {ds.name} has none; use --features "
                       f"cooc (or auto)")
    # Note: k-means is thousands of tiny ops; on a busy machine a second thread makes each of
    # them wait for a descheduled peer (50-100x slower), so the build runs on one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if kind == "text":
            vecs = text_features(ds.item_text, cfg.feature_dim, cfg.seed)  # (N, F)
        elif kind == "attr":
            vecs = attribute_features(ds.item_attrs, cfg.feature_dim, cfg.seed)
        elif kind == "cooc":
            vecs = cooc_features(ds.train, ds.n_items, cfg.cooc_window, cfg.feature_dim, cfg.seed)
        else:  # attr+cooc: what an item is (attributes) and who buys it (co-occurrence), F/2 each
            # Reconstructed: many items share one attribute set (Toys: 11,924 items, 2,912 sets, the
            # largest 543 items), which alone would leave hundreds of items to the dedup digit;
            # the co-occurrence half separates them. Each half is a unit vector, scaled by 1/sqrt(2).
            half = max(1, cfg.feature_dim // 2)
            vecs = torch.cat([attribute_features(ds.item_attrs, half, cfg.seed),
                              cooc_features(ds.train, ds.n_items, cfg.cooc_window, cfg.feature_dim - half or 1,
                                            cfg.seed)], 1) / math.sqrt(2)
        codes, sizes, report = residual_kmeans(vecs, cfg.levels, cfg.codebook_size,
                                               cfg.kmeans_iters, cfg.seed)
    finally:
        torch.set_num_threads(threads)
    report.update(features=kind, feature_dim=vecs.shape[1], build_s=round(time.time() - t0, 2))
    pad = torch.zeros(1, codes.shape[1], dtype=torch.long)
    print(f"semantic IDs: {ds.n_items} items from {kind} features (F={vecs.shape[1]}) | codes per "
          f"level {sizes[:-1]} + dedup {sizes[-1]} | used {report['used_per_level']} | "
          f"{report['items_with_dedup_digit']} items need a dedup digit > 0 "
          f"({report['colliding_prefixes']} shared prefixes) | {report['build_s']} s")
    return dict(codes=torch.cat([pad, codes]), sizes=sizes, report=report,  # codes (N+1, M)
                vectors=torch.cat([torch.zeros(1, vecs.shape[1]), vecs]))  # (N+1, F)


# -----------------------------------------------------------------------------
# Model (Spec §2.2-2.4: T5-like encoder-decoder over code tokens, tied embeddings, MLP_r/MLP_s)
# -----------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head attention; the caller builds queries/keys/values with heads() so that
    cross-attention keys can be computed once per history and reused by every beam."""

    def __init__(self, d, heads, dropout):
        super().__init__()
        self.h, self.p = heads, dropout
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))

    def heads(self, x):  # (B, T, D) -> (B, H, T, D/H)
        return x.unflatten(-1, (self.h, -1)).transpose(1, 2)

    def kv(self, x):  # (B, T, D) -> keys and values (B, H, T, D/H)
        return self.heads(self.k(x)), self.heads(self.v(x))

    def attend(self, q, k, v, mask):  # mask: bool, True = may attend, broadcast to (B, H, Tq, Tk)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.p if self.training else 0.0)
        return self.o(out.transpose(1, 2).flatten(2))  # (B, Tq, D)


def feed_forward(d, d_ff, dropout):
    return nn.Sequential(nn.Linear(d, d_ff), nn.ReLU(), nn.Dropout(dropout), nn.Linear(d_ff, d))


class EncoderLayer(nn.Module):
    """Pre-LayerNorm Transformer encoder layer (T5 is pre-norm too)."""

    def __init__(self, d, heads, d_ff, dropout):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.att, self.ff, self.drop = Attention(d, heads, dropout), feed_forward(d, d_ff, dropout), nn.Dropout(dropout)

    def forward(self, x, mask):  # (B, S, D), mask (B, 1, 1, S)
        h = self.ln1(x)
        x = x + self.drop(self.att.attend(self.att.heads(self.att.q(h)), *self.att.kv(h), mask))
        return x + self.drop(self.ff(self.ln2(x)))  # (B, S, D)


class DecoderLayer(nn.Module):
    """Causal self-attention (with a key/value cache for step-by-step decoding), then
    cross-attention to the encoder output, then a feed-forward block."""

    def __init__(self, d, heads, d_ff, dropout):
        super().__init__()
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.self_att, self.cross = Attention(d, heads, dropout), Attention(d, heads, dropout)
        self.ff, self.drop = feed_forward(d, d_ff, dropout), nn.Dropout(dropout)

    def forward(self, x, cache, mem_kv, mem_mask, W):  # x (B*W, t, D): W sequences per history
        BW, t, _ = x.shape
        h = self.ln1(x)
        q, (k, v) = self.self_att.heads(self.self_att.q(h)), self.self_att.kv(h)  # (BW, H, t, dh)
        if cache is not None:  # earlier positions of the same sequences
            k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)  # (BW, H, t0+t, dh)
        causal = torch.ones(t, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - t)
        x = x + self.drop(self.self_att.attend(q, k, v, causal))
        # Note: the W sequences of one history share its encoder output, so their queries are
        # stacked along the query axis, (B, H, W*t, dh): no copy of the memory per beam.
        q = self.cross.heads(self.cross.q(self.ln2(x)).reshape(BW // W, W * t, -1))
        x = x + self.drop(self.cross.attend(q, *mem_kv, mem_mask).reshape(BW, t, -1))
        return x + self.drop(self.ff(self.ln3(x))), (k, v)  # (BW, t, D)


class ResidualMLP(nn.Module):
    """x + W2 gelu(W1 x), W2 = 0 at init: starts as the identity (Spec §2.4 [R])."""
    # Reconstructed: MLP_r / MLP_s are "small MLPs"; the identity start makes r_1 = t - d_0.

    def __init__(self, d):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)

    def forward(self, x):
        return x + self.net(x)


class StreamRec(nn.Module):
    """Encoder: the SID tokens of the last L history items. Decoder: [o_1..o_l ; SID ; EOS].

    The same class with trace_len = 0 is the direct (TIGER) model of the baseline. `vectors`
    (N+1, F), the item vectors the SIDs were built from, feed the target projection of stage 2.
    """

    def __init__(self, codes, sizes, trace_len, max_len, d_model, n_heads, d_ff, enc_layers,
                 dec_layers, dropout, tau, constrain_levels, vectors=None):
        super().__init__()
        self.args = dict(sizes=list(sizes), trace_len=trace_len, max_len=max_len, d_model=d_model,
                         n_heads=n_heads, d_ff=d_ff, enc_layers=enc_layers, dec_layers=dec_layers,
                         dropout=dropout, tau=tau, constrain_levels=constrain_levels)  # = model_args()
        M = len(sizes)
        # Reconstructed (Spec §1): the output is l thinking tokens, the M SID tokens and EOS.
        self.l, self.M, self.T, self.tau = trace_len, M, trace_len + M + 1, tau
        offsets = FIRST_CODE + torch.tensor([0] + sizes[:-1]).cumsum(0)  # (M,) first token of each level
        V = FIRST_CODE + sum(sizes)
        tokens = codes + offsets  # (N+1, M) level-offset token ids of every item's SID
        tokens[0] = PAD_TOK
        self.register_buffer("item_tokens", tokens)
        self.register_buffer("offsets", offsets)
        self.register_buffer("sizes", torch.tensor(sizes))
        # Item lookup: SID code tuple -> mixed-radix integer key -> item (sorted keys + search).
        radix = torch.tensor([math.prod(sizes[j + 1:]) for j in range(M)])
        keys = (codes[1:] * radix).sum(1)  # (N,)
        order = torch.argsort(keys)
        self.register_buffer("radix", radix)
        self.register_buffer("keys", keys[order])
        self.register_buffer("key_items", order + 1)
        # The prefix trie of --constrain-items, level by level: the sorted keys of every item's
        # first j+1 codes (later codes 0). Derived from `codes`, so not stored in checkpoints.
        for j in range(M):
            self.register_buffer(f"prefix_keys{j}", (codes[1:, :j + 1] * radix[:j + 1]).sum(1).unique(),
                                 persistent=False)
        # Reconstructed: per-position vocabulary masks (usual in TIGER code). Thinking positions
        # may emit any code token (Spec §2.3), SID position k only level-k codes, then EOS.
        # Without --constrain-levels every position may emit any code or EOS.
        allowed = torch.zeros(self.T, V, dtype=torch.bool)
        if constrain_levels:
            allowed[:trace_len, FIRST_CODE:] = True
            for j in range(M):
                allowed[trace_len + j, offsets[j]:offsets[j] + sizes[j]] = True
            allowed[-1, EOS] = True
        else:
            allowed[:, FIRST_CODE:] = allowed[:, EOS] = True
        self.register_buffer("allowed", allowed)  # (T, V)
        self.register_buffer("choice", allowed.sum(1) > 1)  # (T,) positions with a real choice
        self.emb = nn.Embedding(V, d_model)  # tied: encoder input, decoder input, output layer
        self.enc_pos = nn.Embedding(max_len * M, d_model)
        self.dec_pos = nn.Embedding(self.T, d_model)
        # Deviation: learned absolute positions instead of T5's relative position bias (simpler;
        # the encoder sequence has a fixed layout, newest item last).
        self.enc = nn.ModuleList(EncoderLayer(d_model, n_heads, d_ff, dropout) for _ in range(enc_layers))
        self.dec = nn.ModuleList(DecoderLayer(d_model, n_heads, d_ff, dropout) for _ in range(dec_layers))
        self.enc_norm, self.dec_norm, self.drop = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.Dropout(dropout)
        self.mlp_r, self.mlp_s = ResidualMLP(d_model), ResidualMLP(d_model)  # Spec §2.4
        # Reconstructed: code embeddings c_k and decoder states d_j share one scale, norm ~ D^(1/4),
        # so logits d.c start with unit variance AND t - s (an embedding sum minus a state) is a
        # meaningful residual in Stage 2. T5 instead rescales the output by D^(-1/2).
        self.d_scale = d_model ** -0.25
        for e in (self.emb, self.enc_pos, self.dec_pos):
            nn.init.normal_(e.weight, std=d_model ** -0.25)
        if vectors is not None:  # t = W v_target (Spec §4.2 alternative; --target-repr feature)
            # (created last, so the other weights start exactly as in the previous reconstruction)
            self.register_buffer("item_vectors", vectors.float(), persistent=False)  # (N+1, F)
            self.target_proj = nn.Linear(vectors.shape[1], d_model, bias=False)

    def encode(self, hist):  # (B, L) item ids -> encoder memory for every decoder layer
        # Deviation: no hashed user token in front (MTGRec has one); the shared protocol hands
        # the model histories only, as it does for ReaRec.
        # Histories are left-padded windows (newest item in the last column) and positions count
        # from the newest token, so a window without its all-padding columns (data.cut_padding:
        # the length-ordered evaluation, --bucket, the annotation pass) encodes as the full one.
        tok = self.item_tokens[hist].flatten(1)  # (B, S) SID tokens of the history, PAD-padded
        x = self.drop(self.emb(tok) + self.enc_pos.weight[-tok.shape[1]:])  # (B, S, D) newest token last
        mask = (tok != PAD_TOK)[:, None, None, :]  # (B, 1, 1, S) padding is never attended
        for layer in self.enc:
            x = layer(x, mask)
        x = self.enc_norm(x)
        # Cross-attention keys/values once per history, reused at every decoding step.
        return dict(kv=[layer.cross.kv(x) for layer in self.dec], mask=mask)

    def decode(self, memory, tokens, start=0, cache=None):
        """Decoder input tokens (B, W, t) at positions start.. -> states d (B, W, t, D), cache."""
        B, W, t = tokens.shape
        x = self.drop(self.emb(tokens) + self.dec_pos.weight[start:start + t]).flatten(0, 1)  # (BW, t, D)
        new = []
        for i, layer in enumerate(self.dec):
            x, c = layer(x, None if cache is None else cache[i], memory["kv"][i], memory["mask"], W)
            new.append(c)
        return (self.dec_norm(x) * self.d_scale).view(B, W, t, -1), new  # d_j, (B, W, t, D)

    def log_probs(self, d, start=0):
        """Spec §1 [P]: P(y_t | y_<t, c_1:p) = softmax(p(y_t) / tau), p = tied-embedding logits,
        restricted to the position's allowed tokens. (B, W, t, D) -> (B, W, t, V)."""
        logits = d @ self.emb.weight.T / self.tau
        return logits.masked_fill(~self.allowed[start:start + d.shape[2]], -math.inf).log_softmax(-1)

    def item_continuations(self, seqs, p, hist=None):
        """--constrain-items at SID position p (l <= p < l + M): the allowed tokens (B, W, V),
        the level's codes that keep each beam's SID a prefix of some item's SID; with hist (B, L)
        (--skip-history) the last level also skips the items of the history window, which the
        shared protocol drops from the list unless one is the target. seqs (B, W, p): the beams'
        tokens so far."""
        j, (B, W, _) = p - self.l, seqs.shape
        codes = seqs[..., self.l:p] - self.offsets[:j]  # (B, W, j) the SID codes so far
        c = torch.arange(int(self.sizes[j]), device=seqs.device)
        key = (codes * self.radix[:j]).sum(-1)[..., None] + c * self.radix[j]  # (B, W, K_j) every continuation
        keys = getattr(self, f"prefix_keys{j}")
        pos = torch.searchsorted(keys, key).clamp(max=len(keys) - 1)
        ok = keys[pos] == key  # (B, W, K_j)
        if j == self.M - 1 and hist is not None:  # full keys: prefix_keys{M-1} == self.keys
            ok &= ~(self.key_items[pos][..., None] == hist[:, None, None, :]).any(-1)
        allowed = torch.zeros(B, W, self.emb.num_embeddings, dtype=torch.bool, device=seqs.device)
        allowed[..., self.offsets[j]:self.offsets[j] + len(c)] = ok
        return allowed

    def tokens_to_items(self, sid):
        """SID tokens (..., M) -> item ids (...); 0 where the tuple is not an item's SID."""
        codes = sid - self.offsets
        ok = ((codes >= 0) & (codes < self.sizes)).all(-1)
        key = (codes.clamp(min=0) * self.radix).sum(-1)
        pos = torch.searchsorted(self.keys, key).clamp(max=len(self.keys) - 1)
        return torch.where(ok & (self.keys[pos] == key), self.key_items[pos], 0)


def model_args(cfg, sids, trace_len):
    """Everything StreamRec needs besides the code table; stored in every checkpoint."""
    return dict(sizes=list(sids["sizes"]), trace_len=trace_len, max_len=cfg.max_len,
                d_model=cfg.d_model, n_heads=cfg.n_heads, d_ff=cfg.d_ff, enc_layers=cfg.enc_layers,
                dec_layers=cfg.dec_layers, dropout=cfg.dropout, tau=cfg.tau,
                constrain_levels=cfg.constrain_levels)


def new_model(cfg, sids, trace_len, device):
    # Deviation: dropout defaults to 0 (TIGER: 0.1): the CPU budgets here underfit, and dropout
    # costs ~40% of a CPU step. --dropout 0.1 restores it.
    torch.manual_seed(cfg.seed + trace_len)  # the init does not depend on what ran before
    return StreamRec(sids["codes"], **model_args(cfg, sids, trace_len), vectors=sids["vectors"]).to(device)


def output_seq(model, trace, items):
    """[o_1..o_l ; SID(item) ; EOS]: trace (B, W, l) tokens, items (B, W) -> (B, W, T)."""
    eos = torch.full_like(items, EOS)[..., None]
    return torch.cat([trace, model.item_tokens[items], eos], -1)


def teacher_forced(model, memory, y):
    """Decoder input [BOS, y_1..y_{T-1}] -> log-probs (B, W, T, V) and states d (B, W, T, D)."""
    bos = torch.full_like(y[..., :1], BOS)
    d, _ = model.decode(memory, torch.cat([bos, y[..., :-1]], -1))
    return model.log_probs(d), d


def token_logp(lp, y):  # (B, W, T, V), (B, W, T) -> log P of each chosen token (B, W, T)
    return lp.gather(-1, y[..., None]).squeeze(-1)


def sid_logp(model, memory, trace, items):
    """log P(SID(item) ; EOS | x, trace), teacher-forced: trace (B, W, l), items (B, W) -> (B, W)."""
    y = output_seq(model, trace, items)
    return token_logp(teacher_forced(model, memory, y)[0], y)[..., model.l:].sum(-1)


@torch.no_grad()
def greedy_trace(model, memory):
    """The trace the model writes from the history alone, greedy (the trace of --trace-decode
    greedy): (B, l) token ids."""
    B = memory["mask"].shape[0]
    inp, cache, out = torch.full((B, 1, 1), BOS, device=memory["mask"].device), None, []
    for p in range(model.l):
        d, cache = model.decode(memory, inp, p, cache)  # (B, 1, 1, D)
        inp = model.log_probs(d, p).argmax(-1)  # (B, 1, 1)
        out.append(inp[:, 0, 0])
    return torch.stack(out, 1) if out else torch.zeros(B, 0, dtype=torch.long, device=inp.device)


def target_repr(model, items, kind="sid"):
    """Spec §4.2 [R]: t, the "target behaviour representation", (..., D).
    feature: W v_target, a learned projection of the item vector the SIDs were built from;
    sid: stop-grad(sum of the target SID's token embeddings)."""
    # Reconstructed: the paper does not specify t. The previous reconstruction (sid) put t in the
    # space of the very codes the trace is drawn from: with MLP_r near the identity the code
    # nearest to t - s was usually one of the target's own, so the trace spelled the answer,
    # which the model cannot do from the history at inference (README: the previous stage 2).
    # W v_target (the spec's alternative) lives in a space of its own; W is fitted with L_con
    # before annotating and fixed afterwards (callers detach it outside that fit).
    if kind == "feature":
        return model.target_proj(model.item_vectors[items])
    return model.emb(model.item_tokens[items]).sum(-2).detach()


# -----------------------------------------------------------------------------
# Losses (Spec §3.1, §4.3, §4b)
# -----------------------------------------------------------------------------
def ce_loss(tok_lp, weight):
    """Spec §3.1 [P] / §4.3.1: token cross-entropy -log P(y_t | y_<t, x), averaged over the
    positions of weight 1. tok_lp (B, W, T), weight (T,) or (B, 1, T): forced tokens (the
    constrained EOS) and, in stage 2, the thinking tokens of own-trace rows get weight 0."""
    return -(tok_lp * weight).sum() / weight.expand_as(tok_lp).sum().clamp(min=1)


def info_nce(s, t, items, tau):
    """Spec §4.3.2 [R]: L_con = mean_i InfoNCE(s_i, t) with cosine similarity / tau_c and the
    other targets of the batch as negatives. s (B, l, D), t (B, D), items (B,)."""
    # Reconstructed: the note only names the loss ("the state converges step by step to the
    # target"); in-batch InfoNCE with cosine similarity, averaged over the steps, is our form.
    B, l, _ = s.shape
    if l == 0:
        return s.sum() * 0
    sim = F.normalize(s, dim=-1) @ F.normalize(t, dim=-1).T / tau  # (B, l, B)
    # Note: another case with the SAME target item is not a negative (it would be a false one).
    same = (items[:, None] == items[None, :]) & ~torch.eye(B, dtype=torch.bool, device=s.device)
    sim = sim.masked_fill(same[:, None, :], -math.inf)
    labels = torch.arange(B, device=s.device)[:, None].expand(B, l)  # (B, l) the own target
    return F.cross_entropy(sim.transpose(1, 2), labels)


def quant_loss(r, c_o, beta):
    """Spec §4.3.3 [R]: L_quant = ||sg(c_o) - r||^2 + beta ||c_o - sg(r)||^2 (VQ style), mean
    over dimensions, steps and cases. beta = 0 keeps the token embeddings out of it."""
    # Reconstructed: VQ commitment form; the codebook half is off by default (quant_beta = 0)
    # because c_k are the shared token embeddings, which CE already trains.
    if r.shape[1] == 0:
        return r.sum() * 0
    return F.mse_loss(r, c_o.detach()) + beta * F.mse_loss(c_o, r.detach())


def usage_loss(r, codes):
    """Spec §4.3 stability tip ("add a small entropy or usage penalty") [R]: KL(u_i || uniform),
    u_i = the batch mean of the soft assignment softmax(-||c_k - r_i||^2) of residual r_i to
    the codes, averaged over steps. 0 when the batch spreads evenly over all C codes; log C when
    every residual picks one code. r (B, l, D), codes (C, D)."""
    if r.shape[1] == 0:
        return r.sum() * 0
    u = (-torch.cdist(r, codes.expand(len(r), -1, -1)) ** 2).softmax(-1).mean(0)  # (l, C)
    return (u * (u.clamp_min(1e-12).log() + math.log(codes.shape[0]))).sum(-1).mean()


def dpo_loss(pol_w, pol_l, ref_w, ref_l, beta):
    """Spec §4.3.4 [R] (DPO, Rafailov et al. 2023): -log sigmoid(beta [(log pi(y_w) - log
    ref(y_w)) - (log pi(y_l) - log ref(y_l))]) over sequence log-probs (B,). Returns (loss, acc)."""
    # Reconstructed: standard DPO on whole-output log-probs. Chosen and rejected share the trace,
    # so only their SID tokens differ and the trace terms cancel in the margin.
    margin = beta * ((pol_w - ref_w) - (pol_l - ref_l))  # (B,)
    return -F.logsigmoid(margin).mean(), (margin > 0).float().mean()


def group_advantages(R, eps=1e-6):
    """Spec §4b: A = (R - mean_G R) / (std_G R + eps), per group of G rollouts. R (B, G).
    The std is the unbiased one, as in common GRPO code."""
    return (R - R.mean(1, keepdim=True)) / (R.std(1, keepdim=True) + eps)


def kl_k3(lp, ref_lp):
    """k3 estimator of KL(pi || ref) per sampled token: exp(ref - lp) - (ref - lp) - 1 >= 0."""
    x = ref_lp - lp
    return x.exp() - x - 1


def token_advantages(rewards, w, l, T, credit="sequence"):
    """The advantage of every output token (B, G, T) from the reward terms (B, G, 5) (order
    REWARDS) and their weights w (5,); tokens t < l are the trace, the rest SID and EOS.
    sequence: A = group_advantages(sum_k w_k r_k), the same for every token (Spec §4b [R]).
    causal: trace tokens (t < l) get that A; the SID and EOS tokens get group_advantages of the
    format and match terms only: the similarity, likelihood and ranking rewards are functions of
    the trace alone (they score the target after it), so they are already fixed when the SID is
    drawn. Dropping a term an action cannot change keeps the policy gradient unbiased and removes
    its noise (the reward-to-go argument of REINFORCE; the SID tokens' own group normalisation
    also rescales their advantage)."""
    A = group_advantages(rewards @ w)[..., None].expand(-1, -1, T)  # (B, G, T)
    if credit == "sequence":
        return A
    # Reconstructed (--rl-credit causal): the recipe broadcasts one advantage to every token.
    A_sid = group_advantages(rewards[..., :2] @ w[:2])[..., None]  # format, match: (B, G, 1)
    return torch.where(torch.arange(T, device=A.device) < l, A, A_sid)


def grpo_loss(lp, old_lp, ref_lp, adv, clip_eps, beta, weight):
    """Spec §4b: GRPO = PPO-clip with group-normalised advantages, minus a KL penalty.
    loss = mean_tokens [ -min(rho A, clip(rho, 1-eps, 1+eps) A) + beta KL_k3 ],
    rho = pi(y_t) / pi_old(y_t), the mean over the tokens weight marks. lp, old_lp, ref_lp,
    adv (B, G, T); weight (T,) or (B, G, T), 1 = a token with a real choice."""
    # Reconstructed: the note names GRPO only; this is DeepSeekMath's form (token-mean loss, k3 KL
    # in the loss rather than in the reward); token_advantages gives each token its A.
    rho = (lp - old_lp).exp()
    A = adv  # (B, G, T)
    pg = -torch.minimum(rho * A, rho.clamp(1 - clip_eps, 1 + clip_eps) * A)
    kl = kl_k3(lp, ref_lp)
    weight = weight.expand_as(lp)  # (B, G, T)
    n = weight.sum().clamp(min=1)
    loss = ((pg + beta * kl) * weight).sum() / n
    clipped = ((rho.detach() - 1).abs() > clip_eps).float()
    return loss, dict(kl=float((kl.detach() * weight).sum() / n),
                      clip_frac=float((clipped * weight).sum() / n))


def update(model, opt, loss, cfg, stage):
    """One optimiser step; a non-finite loss stops the run with a clear message."""
    if not torch.isfinite(loss):
        flag = {"base": "--lr", "stage1": "--lr", "stage2": "--sft-lr", "stage3": "--rl-lr"}[stage]
        raise RunError(f"{stage}: the loss became {loss.item()}; training diverged, lower {flag} "
                       f"or the loss weights")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip > 0:  # 0 = off (clipping to norm 0 would zero every gradient: no training)
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()


# -----------------------------------------------------------------------------
# Training loop shared by the stages (BOILERPLATE): epochs, validation, checkpoints
# -----------------------------------------------------------------------------
def ckpt_path(cfg, key):
    return os.path.join(cfg.out, f"{key}.pt")


def save_stage(cfg, key, model, sids, epoch, best_valid, done, result=None):
    """Self-describing checkpoint: weights, how to rebuild the model, config, SIDs, results."""
    save_atomic(dict(model=model.state_dict(), model_args=model.args, config=dataclasses.asdict(cfg),
                     stage=key, epoch=epoch, best_valid=best_valid, done=done, result=result,
                     semantic_ids=dict(codes=sids["codes"], sizes=sids["sizes"])), ckpt_path(cfg, key))


def load_stage(cfg, key, sids, device, needed_by):
    """Rebuild a saved stage's model; refuse a checkpoint that does not fit this run."""
    path = ckpt_path(cfg, key)
    if not os.path.exists(path):
        flag = {v: k for k, v in STAGES.items()}[key]
        raise RunError(f"{needed_by} starts from the {key} checkpoint {path}, which does not exist; "
                       f"run --stages {flag} first with the same --out (or include it in --stages)")
    ck = load_file(path, ("model", "model_args", "config", "done", "semantic_ids"))  # on CPU, as the SIDs
    if not torch.equal(ck["semantic_ids"]["codes"], sids["codes"]):
        raise RunError(f"{path} was trained with other semantic IDs (different data, --features, "
                       f"--levels, --codebook-size or --seed); use the same flags or a new --out")
    want = model_args(cfg, sids, ck["model_args"]["trace_len"])
    diff = [k for k in want if k != "dropout" and want[k] != ck["model_args"][k]]
    if key != "base" and cfg.trace_len != ck["model_args"]["trace_len"]:
        diff.append("trace_len")
    if diff:
        saved = ", ".join(f"{k}={ck['model_args'][k]}" for k in diff)
        asked = ", ".join(f"{k}={getattr(cfg, k, want.get(k))}" for k in diff)
        raise RunError(f"{path} has {saved}, but this run asks for {asked}; use the same flags "
                       f"or a new --out")
    if needed_by not in ("--resume", "--eval-only"):  # a later stage starts from it
        # results.json records one config for all its stages: a stage-1/2 setting that differs
        # from the one this checkpoint was trained with would label its rows wrongly
        order, fields = list(STAGES.values()), stage_fields()
        own = {k for s in order[1:order.index(key) + 1] for k in fields.get(s, ())}
        other = [k for k in changed_settings(cfg, ck["config"], key) if k in own]
        if other:
            flag = {v: k for k, v in STAGES.items()}[key]
            saved = ", ".join(f"{k}={ck['config'].get(k, OLDER.get(k))}" for k in other)
            asked = ", ".join(f"{k}={getattr(cfg, k)}" for k in other)
            raise RunError(f"{path} was trained with {saved}, but this run asks for {asked}; pass "
                           f"the same flags, or rerun it with --stages {flag} --overwrite")
    if not ck["done"] and needed_by not in ("--resume", "--eval-only"):
        flag = {v: k for k, v in STAGES.items()}[key]
        raise RunError(f"{path} holds a {key} run that did not finish (interrupted?), so "
                       f"{needed_by} cannot start from it; finish it with --stages {flag} --resume "
                       f"(or rerun it with --overwrite), same --out")
    model = StreamRec(sids["codes"], **ck["model_args"], vectors=sids["vectors"]).to(device)
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError:  # e.g. a checkpoint of the previous reconstruction (no target projection)
        flag = {v: k for k, v in STAGES.items()}[key]
        raise RunError(f"{path} holds weights of another version of stream_rec.py; rerun --stages "
                       f"{flag} --overwrite (or use a new --out)") from None
    return model, ck


# Flags that may differ between a finished stage and a --resume of it: they do not change what
# the stage trained (everything else must match, or the results would mix two settings).
RUN_ONLY = {"data_dir", "device", "threads", "out", "resume", "eval_only", "benchmark",
            "benchmark_steps", "stages", "eval_batch", "overwrite", "estimate"}
# What a checkpoint written before a flag existed ran with (its value then, not today's default).
OLDER = {"constrain_items": False, "skip_history": "off", "trace_beams": 4, "rl_trie": False,
         "rl_select_start": False, "rl_credit": "sequence", "rl_judge": "policy", "rl_skip_history": False, "rl_holdout": False, "stage1_init": "fresh", "bucket": 0}
DECODING = {"constrain_items", "skip_history", "trace_decode", "trace_beams", "merge"}  # decoding (and stage 3's rollouts and negatives): the stored stage-2 traces do not depend on them


def stage_fields():
    """The Config fields stages 1-3 read and the base does not (trace_len, stage1_init, rl_holdout), those only stage 2 reads
    (sft_lr .. dpo_form) and only stage 3 reads (rl_epochs .. rank_negs_from, in Config's order),
    saved as results.json's "stage_fields": neither a --resume
    nor `data.py --report` compares an earlier stage on a later stage's fields (the base does
    not depend on the RL settings)."""
    names = [f.name for f in dataclasses.fields(Config)]
    span = lambda a, b: names[names.index(a):names.index(b) + 1]  # noqa: E731
    return {"stage1": ["trace_len", *span("stage1_init", "rl_holdout")], "stage2": span("sft_lr", "dpo_form"),
            "stage3": span("rl_epochs", "rank_negs_from")}


def changed_settings(cfg, saved, key=None):
    """The config fields (not RUN_ONLY) in which this run differs from a checkpoint's config;
    with key (a stage), only the fields that stage or an earlier one reads (stage_fields)."""
    order, fields = list(STAGES.values()), stage_fields()
    later = set() if key is None else {k for s in order[order.index(key) + 1:] for k in fields.get(s, ())}
    return sorted(k for k, v in dataclasses.asdict(cfg).items()
                  if k not in RUN_ONLY and k not in later and saved.get(k, OLDER.get(k)) != v)


def last_path(cfg, key):
    return os.path.join(cfg.out, f"{key}_last.pt")


def fit(cfg, key, model, step, ds, sids, device, batch_size, epochs, max_examples, bench_steps=0,
        opt=None, rngs=(), batches=None, diag=None, select_start=False):
    """Run `step(epoch, hist, target, *rest) -> {term: value}` over shuffled batches (default:
    (prefix -> next item) examples; `batches(generator)` yields other tuples); validate every
    epoch (plus `diag(model) -> {name: value}`, logged), keep the best checkpoint, test it once.
    select_start: the starting weights are validated too ("epoch 0", result `start_valid`) and
    kept when no epoch beats them.

    After every epoch out/<key>_last.pt holds what a --resume needs to continue the stage exactly
    as if it had not stopped: weights, optimiser `opt`, the random streams (data order, `rngs` of
    the stage, torch's global one) and the bookkeeping; it is removed once the stage finishes.
    Ctrl-C: a KeyboardInterrupt whose text says which epoch that file holds."""
    gen = torch.Generator().manual_seed(stage_seed(cfg, key))  # this stage's data order
    best, best_state, best_epoch, bad, history, t_stage, speeds = None, None, 0, 0, [], time.time(), []
    start, stopped, start_valid = 1, False, None
    if cfg.resume and os.path.exists(last_path(cfg, key)) and not bench_steps:
        ck = load_file(last_path(cfg, key), ("model", "optimizer", "rngs", "rng", "config", "epoch", "fit"))
        diff = changed_settings(cfg, ck["config"], key)
        if diff:
            saved = ", ".join(f"{k}={ck['config'].get(k, OLDER.get(k))}" for k in diff)
            raise RunError(f"--resume: {last_path(cfg, key)} was trained with other settings ({saved}); "
                           f"pass the same flags, or rerun the stage with --overwrite")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        for g, state in zip([gen, *rngs], ck["rngs"]):
            g.set_state(state)
        torch.set_rng_state(ck["rng"])
        if ck.get("cuda_rng") is not None and torch.cuda.is_available():  # dropout on the GPU
            torch.cuda.set_rng_state_all(ck["cuda_rng"])
        best, best_state, best_epoch, bad, history, speeds, stopped = (ck["fit"][k] for k in (
            "best", "best_state", "best_epoch", "bad", "history", "speeds", "stopped"))
        start_valid = ck["fit"].get("start_valid")
        start = ck["epoch"] + 1
        print(f"{key}: resumed from {last_path(cfg, key)} after epoch {ck['epoch']}")
    elif os.path.exists(last_path(cfg, key)) and not bench_steps:  # a fresh run: an older one's
        os.remove(last_path(cfg, key))  # last epoch must not be resumed into this run later
    done_epoch, epoch = start - 1, start
    try:
        if select_start and start == 1 and not bench_steps:  # epoch 0: the weights the stage starts from
            best = start_valid = evaluate_split(cfg, model, ds.valid, cfg.beam_valid, device)
            best_state = copy.deepcopy(model.state_dict())
            save_stage(cfg, key, model, sids, 0, best, done=False)  # this run's, as every new best
            print(f"{key} ep 0/{epochs} | the starting weights | valid {fmt_metrics(start_valid)}")
        for epoch in range(start, epochs + 1):
            if stopped:
                break
            sums, n, t0 = {}, 0, time.time()
            batches_ = batches(gen) if batches else data.train_batches(
                ds.train, cfg.max_len, batch_size, pairs=True, device=device, generator=gen, bucket=cfg.bucket)
            for batch in batches_:
                model.train()
                for name, v in step(epoch, *batch).items():
                    v = v.detach() if torch.is_tensor(v) else v
                    sums[name] = sums.get(name, 0.0) + float(v) * len(batch[1])
                n += len(batch[1])
                if bench_steps and n >= bench_steps * batch_size:  # --benchmark: time steps only
                    return dict(examples_per_s=round(n / (time.time() - t0), 1), steps=bench_steps)
                if max_examples and n >= max_examples:  # Deviation: CPU budget, README records it
                    break
            if bench_steps:  # fewer examples than the timed steps want: time what there is
                return dict(examples_per_s=round(n / (time.time() - t0), 1), steps=-(-n // batch_size))
            speed = n / (time.time() - t0)
            speeds.append(speed)
            logs = {name: v / n for name, v in sums.items()}
            valid = evaluate_split(cfg, model, ds.valid, cfg.beam_valid, device)
            extra = diag(model) if diag else {}
            history.append(dict(epoch=epoch, train=logs, valid=valid, examples=n,
                                examples_per_s=round(speed, 1), s=round(time.time() - t0, 1)) |
                           ({"diag": extra} if extra else {}))
            terms = " ".join(f"{name} {v:.4f}" for name, v in logs.items() if name != "loss")
            print(f"{key} ep {epoch}/{epochs} | loss {logs['loss']:.4f} ({terms}) | {n} ex, "
                  f"{speed:,.0f} ex/s | valid {fmt_metrics(valid)} | {time.time() - t0:.1f} s")
            if extra:
                print(f"{key} ep {epoch}/{epochs} | {fmt_diag(extra)}")
            if best is None or valid[cfg.select] > best[cfg.select]:
                best, best_epoch, bad = valid, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
                save_stage(cfg, key, model, sids, epoch, best, done=False)  # survives a crash
            else:
                bad += 1
                stopped = bool(cfg.patience and bad >= cfg.patience)
            # BOILERPLATE: everything a --resume needs to continue after this epoch
            save_atomic(dict(model=model.state_dict(), optimizer=opt.state_dict(), config=dataclasses.asdict(cfg),
                             rngs=[g.get_state() for g in [gen, *rngs]], rng=torch.get_rng_state(), epoch=epoch,
                             cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                             fit=dict(best=best, best_state=best_state, best_epoch=best_epoch, bad=bad,
                                      history=history, speeds=speeds, stopped=stopped,
                                      start_valid=start_valid)), last_path(cfg, key))
            done_epoch = epoch
            if stopped:
                print(f"{key}: no better valid {cfg.select} for {bad} epochs, stopping")
        model.load_state_dict(best_state)
        test = evaluate_split(cfg, model, ds.test, cfg.beam_test, device)  # once, best-valid weights
    except KeyboardInterrupt:
        where = f"{key}'s test evaluation" if done_epoch == epochs or stopped else \
            f"{key}'s validation of its starting weights (epoch 0)" if select_start and start_valid is None \
            and not done_epoch else f"{key} epoch {done_epoch + 1}"
        held = f"{last_path(cfg, key)} holds its epoch {done_epoch}" if done_epoch else f"{key} finished no epoch"
        raise KeyboardInterrupt(f"in {where}; {held}") from None
    result = dict(valid=best, test=test, best_epoch=best_epoch, epochs_run=len(history),
                  train_examples_per_s=round(sum(speeds) / len(speeds), 1),
                  wall_s=round(time.time() - t_stage, 1), history=history) | \
        ({"start_valid": start_valid} if start_valid is not None else {})
    save_stage(cfg, key, model, sids, best_epoch, best, done=True, result=result)
    if os.path.exists(last_path(cfg, key)):  # the finished checkpoint supersedes it
        os.remove(last_path(cfg, key))
    if start_valid is not None and best_epoch == 0:
        print(f"{key}: no epoch beat the starting weights on valid {cfg.select}; they are kept (epoch 0)")
    print(f"{key} TEST (epoch {best_epoch}) | {fmt_metrics(test)} | {result['wall_s']:.0f} s")
    return result


def adamw(model, lr, cfg):
    # Deviation: a constant learning rate (MTGRec: warm-up + cosine); few epochs, one knob less.
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)


def random_other(target, n_items, shape, gen):
    """Items drawn uniformly from 1..N minus the target. target (B,) -> (B, *shape)."""
    x = torch.randint(1, n_items, (len(target), *shape), generator=gen, device=gen.device)
    t = target.view(-1, *[1] * len(shape))
    return x + (x >= t).long()  # shift past the target: uniform over the other N - 1 items


# -----------------------------------------------------------------------------
# Baseline: the direct recommender, l = 0 (TIGER; Spec §5.4, §7.11)
# -----------------------------------------------------------------------------
def train_base(cfg, ds, sids, device, bench_steps=0):
    """Plain next-SID cross-entropy. Its checkpoint is the "direct model" of stages 2 and 3."""
    model = new_model(cfg, sids, 0, device)
    opt = adamw(model, cfg.lr, cfg)

    def step(epoch, hist, target):
        y = output_seq(model, hist[:, None, :0], target[:, None])  # (B, 1, M+1): SID ; EOS
        lp, _ = teacher_forced(model, model.encode(hist), y)
        loss = ce_loss(token_logp(lp, y), model.choice.float())
        update(model, opt, loss, cfg, "base")
        return dict(loss=loss, ce=loss)

    return fit(cfg, "base", model, step, ds, sids, device, cfg.batch_size, cfg.epochs,
               cfg.max_examples, bench_steps, opt=opt)


# -----------------------------------------------------------------------------
# Stage 1: pretraining on synthesized long targets (Spec §3)
# -----------------------------------------------------------------------------
def neighbours(vectors, k, chunk=1024):
    """Spec §3.3 [R]: the k items most cosine-similar to each item (itself excluded), ordered
    from far to near, so the prefix approaches the target coarse-to-fine. (N+1, F) -> (N+1, k)."""
    out = []
    for a in range(0, len(vectors), chunk):
        sim = vectors[a:a + chunk] @ vectors.T  # (chunk, N+1); rows are unit vectors
        sim[:, 0] = -math.inf  # never PAD
        rows = torch.arange(a, a + len(sim))
        sim[rows - a, rows] = -math.inf  # never the item itself
        out.append(sim.topk(k, dim=1).indices.flip(1))  # most similar last, next to the target
    return torch.cat(out)


def warm_start(model, direct):
    """--stage1-init direct: copy the direct model's weights into a thinking model of the same
    size. Every tensor of equal shape is copied; the decoder positions (l + M + 1 rows against
    the direct model's M + 1) take the direct model's rows at the SID and EOS positions l..l+M,
    so each SID code is predicted from the position that predicted it there; the l trace
    positions keep their fresh initialisation."""
    # Reconstructed (--stage1-init direct): the spec does not say how stage 1 is initialised.
    src, dst = direct.state_dict(), model.state_dict()  # the tensors share the models' storage
    with torch.no_grad():
        for k, v in src.items():
            if k in dst and dst[k].shape == v.shape and dst[k].is_floating_point():
                dst[k].copy_(v)
        dst["dec_pos.weight"][model.l:].copy_(src["dec_pos.weight"])  # (M+1, D) -> rows l..l+M
    return model


def stage1_pretrain(cfg, ds, sids, device, bench_steps=0):
    """Spec §3.1-3.2 [P]: Y = [c'_1..c'_q ; SID(target) ; EOS], c' = codes of similar items,
    trained with the plain sequence NLL. Teaches the decoder to emit a long prefix first."""
    l = cfg.trace_len
    model = new_model(cfg, sids, l, device)
    if cfg.stage1_init == "direct" and not bench_steps:
        warm_start(model, load_stage(cfg, "base", sids, device, "stage 1 (--stage1-init direct)")[0])
    opt = adamw(model, cfg.lr, cfg)
    # Reconstructed (Spec §3.3): neighbours by cosine of the item vectors the SIDs come from;
    # q = l, the first l tokens of the SIDs of the ceil(l/M) nearest
    # items (far to near), so stage 1 has exactly the stage-2 output layout.
    near = neighbours(sids["vectors"], max(1, math.ceil(l / model.M))).to(device)  # (N+1, k)

    def step(epoch, hist, target):
        prefix = model.item_tokens[near[target]].flatten(1)[:, :l]  # (B, q = l)
        y = output_seq(model, prefix[:, None], target[:, None])  # (B, 1, T)
        lp, _ = teacher_forced(model, model.encode(hist), y)
        loss = ce_loss(token_logp(lp, y), model.choice.float())  # Spec §3.1: L_Pretrain
        update(model, opt, loss, cfg, "stage1")
        return dict(loss=loss, ce=loss)

    return fit(cfg, "stage1", model, step, ds, sids, device, cfg.batch_size, cfg.epochs,
               cfg.max_examples, bench_steps, opt=opt)


# -----------------------------------------------------------------------------
# Stage 2: iterative-inference trace annotation (Spec §4.1-4.2) and fine-tuning (Spec §4.3)
# -----------------------------------------------------------------------------
# Reconstructed (Spec §4.2, its "alternative"; the paper: the iterative inference "annotates"
# traces, "then this annotated data is used to fine-tune"): --annotate offline, in phases
#   a. fit_annotator   on a FROZEN copy of the stage-1 model, fit MLP_r, MLP_s and the target
#                      projection W with lambda_con L_con + lambda_quant L_quant (nothing else moves);
#   b. annotate_all    label every training prefix once with it; store the traces (l small
#                      integers per example, out/stage2_traces.pt);
#   c. stage2_losses   fine-tune on the fixed [o ; SID ; EOS] data with the four losses, a share of
#                      every batch with its SID trained after the model's OWN trace instead.
# --annot-every E repeats a and b every E epochs from a frozen snapshot of the model being tuned.
# --annotate online is the previous reconstruction: each batch labelled by the weights being
# trained. CE then teaches the decoder its own labels, which moves the states that choose them,
# and the traces collapsed within ~2 epochs (README, "The previous reconstruction").
def annotation_states(model, d, t):
    """Spec §4.1 [P]: s_i = MLP_s(sum_{j=0..i} d_j) and r_i = MLP_r(t - s_{i-1}).
    d (B, l+1, D) decoder states at positions 0..l, t (B, D) -> s (B, l+1, D), r (B, l, D)."""
    s = model.mlp_s(d.cumsum(1))
    return s, model.mlp_r(t[:, None] - s[:, :-1])


@torch.no_grad()
def stage2_annotate(model, memory, t, topk=0):
    """ALGO LOGIC: the l-step residual loop that labels a reasoning trace (Spec §4.1).
    t (B, D) target representations; topk > 0: o_i only among the model's own top-k tokens at
    step i. Returns o (B, l) token ids, s (B, l+1, D), r (B, l, D), d (B, l+1, D)."""
    B, l = t.shape[0], model.l
    # Reconstructed (Spec §4.2): o_i may be any code token of any level, nearest in L2 to r_i
    # against the shared embedding matrix; d_j = the decoder's output state at position j.
    codes = model.emb.weight[FIRST_CODE:]  # (C, D)
    # Reconstructed (Spec §4.2): d_0 = the decoder state at the start token, the "fast" guess.
    d, cache = model.decode(memory, torch.full((B, 1, 1), BOS, device=t.device))
    states = [d[:, 0, 0]]  # d_j, (B, D) each
    acc = states[0]  # running sum of d_j
    s, r, o = [model.mlp_s(acc)], [], []  # s_0 = MLP_s(d_0)
    for i in range(1, l + 1):
        r.append(model.mlp_r(t - s[-1]))  # r_i = MLP_r(t - s_{i-1})
        dist = torch.cdist(r[-1], codes)  # (B, C) ||c_k - r_i||
        if topk:
            # Reconstructed: "progressively refining the model's predictions" read as: step i
            # picks among the k tokens the model itself ranks highest there (its own guesses),
            # the residual choosing the one that moves its state toward the target. A free choice
            # over all C codes is information the history does not hold (ce_think stayed near
            # ln|C|); a choice among the model's own top k is one it can learn to make.
            lp = model.log_probs(d, i - 1)[:, 0, 0, FIRST_CODE:]  # (B, C) its guess at step i
            top = lp.topk(min(topk, lp.shape[1]), dim=1).indices  # (B, k)
            dist = torch.full_like(dist, math.inf).scatter(1, top, dist.gather(1, top))
        o.append(dist.argmin(1) + FIRST_CODE)  # o_i = argmin_k ||c_k - r_i||
        d, cache = model.decode(memory, o[-1].view(B, 1, 1), i, cache)  # read o_i -> d_i
        states.append(d[:, 0, 0])
        acc = acc + d[:, 0, 0]
        s.append(model.mlp_s(acc))  # s_i = MLP_s(sum_{j<=i} d_j)
    o = torch.stack(o, 1) if o else t.new_zeros(B, 0, dtype=torch.long)
    r = torch.stack(r, 1) if r else t.new_zeros(B, 0, t.shape[-1])
    return o, torch.stack(s, 1), r, torch.stack(states, 1)


def fit_annotator(cfg, annot, ds, device, gen):
    """Stage 2a (Spec §4.1-4.3 [R]): the backbone of `annot` frozen, fit MLP_r, MLP_s (and the
    target projection W of --target-repr feature) by lambda_con L_con + lambda_quant L_quant on the
    traces the loop picks: --annot-epochs passes of --max-examples examples. Returns the mean terms."""
    annot.eval().requires_grad_(False)
    if not (cfg.annot_epochs and annot.l and (cfg.lambda_con or cfg.lambda_quant)):
        return {}
    mods = [annot.mlp_r, annot.mlp_s] + ([annot.target_proj] if cfg.target_repr == "feature" else [])
    params = [p for m in mods for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sums, n = {}, 0
    for _ in range(cfg.annot_epochs):
        seen = 0
        for hist, target in data.train_batches(ds.train, cfg.max_len, cfg.batch_size, pairs=True,
                                               device=device, generator=gen):
            with torch.no_grad():
                memory = annot.encode(hist)
            t = target_repr(annot, target, cfg.target_repr)  # (B, D), W trainable
            o, _, _, d = stage2_annotate(annot, memory, t.detach(), cfg.trace_topk)
            s, r = annotation_states(annot, d, t)  # the loop's s_i, r_i, now with gradient
            con = info_nce(s[:, 1:], t, target, cfg.tau_con)  # L_con (Spec §4.3.2)
            quant = quant_loss(r, annot.emb(o), cfg.quant_beta)  # L_quant (Spec §4.3.3)
            update(annot, opt, cfg.lambda_con * con + cfg.lambda_quant * quant, cfg, "stage2")
            for name, v in (("con", con), ("quant", quant)):
                sums[name] = sums.get(name, 0.0) + float(v.detach()) * len(target)
            n, seen = n + len(target), seen + len(target)
            if cfg.max_examples and seen >= cfg.max_examples:
                break
    annot.requires_grad_(False)
    return {name: v / max(n, 1) for name, v in sums.items()}


@torch.no_grad()
def annotate_all(cfg, annot, direct, ds, device):
    """Stage 2b: label EVERY training prefix once with the frozen annotator. The store: traces
    (P, l) int16 token ids, row = the position of the example's target in ds.train.items (-1
    where no example ends); gain (P,) = log P(SID ; EOS | x, o) under the annotator minus log P(SID ;
    EOS | x) under the direct model (nan without one); keep (P,) bool (--annot-keep); stats."""
    annot.eval()
    l, P = annot.l, len(ds.train.items)
    if annot.emb.num_embeddings >= 2**15:
        raise RunError(f"{annot.emb.num_embeddings} tokens do not fit the int16 trace store; lower "
                       f"--codebook-size or --levels")
    traces = torch.full((P, l), -1, dtype=torch.int16)
    gain, has = torch.full((P,), math.nan), torch.zeros(P, dtype=torch.bool)
    hits = 0  # trace tokens that are one of the target's own SID tokens ("the trace spells it")
    # bucket=8: prefixes of like length share a batch, the padding cut (each prefix is labelled on
    # its own by a frozen model, so the order changes no trace; faster, README "Benchmark")
    for hist, target, pos in data.train_batches(ds.train, cfg.max_len, max(cfg.batch_size, cfg.eval_batch),
                                                pairs=True, device=device, positions=True, bucket=8):
        memory = annot.encode(hist)
        o = stage2_annotate(annot, memory, target_repr(annot, target, cfg.target_repr), cfg.trace_topk)[0]
        p = pos.cpu()
        traces[p], has[p] = o.short().cpu(), True
        hits += int((o[:, :, None] == annot.item_tokens[target][:, None, :]).any(-1).sum())
        if direct is not None:
            slow = sid_logp(annot, memory, o[:, None], target[:, None])[:, 0]  # (B,)
            fast = sid_logp(direct, direct.encode(hist), o[:, None, :0], target[:, None])[:, 0]
            gain[p] = (slow - fast).float().cpu()
    # Reconstructed (--annot-keep gain): "suitable" traces are those that help; an example whose
    # annotated trace makes the target less likely than the direct model does trains on its own trace.
    keep = gain > 0 if cfg.annot_keep == "gain" else has.clone()
    keep &= has
    n = int(has.sum())
    tok = traces[has].long().flatten()
    p_ = torch.bincount(tok, minlength=annot.emb.num_embeddings).float() / max(tok.numel(), 1)
    stats = dict(examples=n, o_ppl=float(torch.exp(-(p_[p_ > 0] * p_[p_ > 0].log()).sum())),
                 distinct=int((p_ > 0).sum()), in_target=hits / max(n * l, 1),
                 gain=float(gain[has].nanmean()) if direct is not None else None,
                 gain_pos=float((gain[has] > 0).float().mean()) if direct is not None else None,
                 kept=int(keep.sum()) / max(n, 1))
    return dict(traces=traces, keep=keep, gain=gain, stats=stats)


def traces_path(cfg):
    return os.path.join(cfg.out, "stage2_traces.pt")


def annotation_round(cfg, model, direct, ds, device, gen, epoch):
    """Phases a + b on a frozen snapshot of `model` (at epoch 1: the stage-1 model); the fitted
    MLP_r, MLP_s and W are copied into `model`. Saves out/stage2_traces.pt; returns the store."""
    t0 = time.time()
    annot = copy.deepcopy(model)
    fitted = fit_annotator(cfg, annot, ds, device, gen)
    for name in ("mlp_r", "mlp_s", "target_proj"):
        if hasattr(model, name):
            getattr(model, name).load_state_dict(getattr(annot, name).state_dict())
    store = annotate_all(cfg, annot, direct, ds, device)
    store.update(epoch=epoch, fit=fitted, config=dataclasses.asdict(cfg), s=round(time.time() - t0, 1))
    save_atomic(store, traces_path(cfg))
    st = store["stats"]
    fit_txt = " ".join(f"{k} {v:.4f}" for k, v in fitted.items()) or "skipped"
    gain_txt = "" if st["gain"] is None else (f" | gain over direct {st['gain']:+.3f} nats "
                                              f"(> 0 for {100 * st['gain_pos']:.0f} %)")
    print(f"stage2 annotation (epoch {epoch}): fit {fit_txt} | {st['examples']} prefixes | o_ppl "
          f"{st['o_ppl']:.1f}, {st['distinct']} tokens, {100 * st['in_target']:.0f} % of them the "
          f"target's own codes{gain_txt} | kept {100 * st['kept']:.0f} % | {store['s']} s")
    return store


@torch.no_grad()
def direct_negatives(cfg, direct, hist, target, n_items, gen):
    """Spec §4.3.4 [R]: the rejected item is the direct model's greedy top-1 when it is wrong;
    when it is right (or not an item) a random other item stands in."""
    # Reconstructed: "contrast with the direct recommender": its wrong guess is the hard negative.
    top1 = beam_search(direct, hist, 1, **decoding(cfg))[0]  # (B, 1, T)
    pred = direct.tokens_to_items(top1[:, 0, :direct.M])  # (B,)
    other = random_other(target, n_items, (1,), gen)[:, 0]
    return torch.where((pred == target) | (pred == 0), other, pred)


def stage2_losses(cfg, model, direct, ref, hist, target, o_ann, self_rows, neg=None, warm=False):
    """Spec §4.3: one batch of L = L_SFT + l_con L_con + l_quant L_quant + l_dpo L_DPO (+ l_usage L_usage).

    o_ann (B, l): annotated traces (None: label them now with the current weights, --annotate
    online). self_rows (B,) bool: these rows are trained after the model's OWN greedy trace, CE on
    their SID and EOS only; the others on [o_ann ; SID ; EOS] with every loss. neg (B,): DPO's
    rejected item. warm: CE skips the thinking tokens (--sft-warmup). Returns (loss, {term: value})."""
    B, l = len(target), model.l
    memory = model.encode(hist)
    frozen = dict(kv=[(k.detach(), v.detach()) for k, v in memory["kv"]], mask=memory["mask"])
    t = target_repr(model, target, cfg.target_repr).detach()  # (B, D)
    training = model.training
    model.eval()  # the traces are the model's inference: decoder dropout off
    o_self = greedy_trace(model, frozen)  # (B, l) what the model writes from the history alone
    if o_ann is None:  # ALGO LOGIC: online annotation (previous reconstruction)
        o_ann = stage2_annotate(model, frozen, t, cfg.trace_topk)[0]
    model.train(training)
    # ALGO LOGIC: no exposure gap.
    # Reconstructed: at inference the SID follows the model's own trace, so part of every batch
    # trains the SID after exactly that trace (its thinking tokens get no CE: training a model on
    # its own guesses is what collapsed the online traces).
    o = torch.where(self_rows[:, None], o_self, o_ann)  # (B, l)
    y = output_seq(model, o[:, None], target[:, None])  # (B, 1, T) = [o ; SID ; EOS]
    lp, d = teacher_forced(model, memory, y)
    tok = token_logp(lp, y)  # (B, 1, T)
    think = torch.arange(model.T, device=hist.device) < l  # (T,) the thinking positions
    w = model.choice.float().expand(B, -1).clone()  # (B, T)
    w[self_rows[:, None] & think] = 0
    if warm:  # Reconstructed (Spec §4.3 stability tip, --sft-warmup): CE on the SID tokens only
        w[:, think] = 0
    ce = ce_loss(tok, w[:, None])  # L_SFT (Spec §4.3.1)
    logs = {}
    ann, own = ~self_rows, self_rows
    sid_w = model.choice.float() * ~think  # (T,)
    for name, rows, cols in (("ce_think", ann, model.choice.float() * think), ("ce_sid", ann, sid_w),
                             ("ce_sid_own", own, sid_w)):
        if rows.any() and cols.any():  # diagnostics: the CE of the thinking and SID tokens apart
            logs[name] = ce_loss(tok[rows], cols).detach()
    zero = tok.sum() * 0
    con = quant = usage = zero
    if ann.any() and l:  # the annotation losses on the rows with an annotated trace
        s, r = annotation_states(model, d[ann, 0, :l + 1], t[ann])
        con = info_nce(s[:, 1:], t[ann], target[ann], cfg.tau_con)  # L_con (Spec §4.3.2), steps 1..l
        quant = quant_loss(r, model.emb(o_ann[ann]), cfg.quant_beta)  # L_quant (Spec §4.3.3)
        if cfg.lambda_usage:  # Reconstructed (previous): code-usage penalty against collapse
            usage = usage_loss(r, model.emb.weight[FIRST_CODE:])
    empty = o[:, None, :0]
    direct_lp = None
    if direct is not None:
        with torch.no_grad():
            dmem = direct.encode(hist)
            direct_lp = sid_logp(direct, dmem, empty, target[:, None])[:, 0]  # (B,) log P_direct(target)
        if own.any():  # the target after the model's own trace vs. the direct answer (nats)
            logs["lik_gain"] = (tok[own, 0, l:].sum(-1) - direct_lp[own]).mean().detach()
    dpo = acc = zero
    if cfg.lambda_dpo:
        if cfg.dpo_form == "direct":
            # Reconstructed (Spec §4.3.4, "contrast with the direct recommender"): the slow answer,
            # chosen y_w = [o ; target], against the direct model's answer behind the model's own
            # trace, rejected y_l = [own trace ; direct's wrong top-1]; reference = the direct model
            # on the SID tokens (it writes no trace). The traces differ, so the trace is trained too.
            y_l = output_seq(model, o_self[:, None], neg[:, None])
            with torch.no_grad():
                ref_w, ref_l = direct_lp, sid_logp(direct, dmem, empty, neg[:, None])[:, 0]
        else:  # shared (previous): [o ; target] vs [o ; direct's miss], reference = stage-2 start
            y_l = output_seq(model, o[:, None], neg[:, None])
            with torch.no_grad():
                rmem = ref.encode(hist)
                ref_w = token_logp(teacher_forced(ref, rmem, y)[0], y).sum((1, 2))
                ref_l = token_logp(teacher_forced(ref, rmem, y_l)[0], y_l).sum((1, 2))
        pol_l = token_logp(teacher_forced(model, memory, y_l)[0], y_l).sum((1, 2))
        dpo, acc = dpo_loss(tok.sum((1, 2)), pol_l, ref_w, ref_l, cfg.beta_dpo)  # L_DPO
    loss = ce + cfg.lambda_con * con + cfg.lambda_quant * quant + cfg.lambda_dpo * dpo + \
        cfg.lambda_usage * usage
    # Spec §4.3 tip: watch code usage. Perplexity of the batch's annotated o_i, 1 = collapse.
    p = torch.bincount(o_ann.flatten(), minlength=model.emb.num_embeddings).float() / max(o_ann.numel(), 1)
    logs.update(ce=ce, con=con, quant=quant, dpo=dpo, dpo_acc=acc, own=self_rows.float().mean(),
                o_ppl=torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
    if cfg.lambda_usage:
        logs["usage"] = usage
    return loss, logs


def stage2_sft(cfg, ds, sids, device, bench_steps=0):
    """Stage 2: annotate traces (offline: once, with the frozen stage-1 model; online: every
    batch), then fine-tune on them with stage2_losses."""
    need_direct = bool(cfg.lambda_dpo) or cfg.annot_keep == "gain"
    if bench_steps:  # --benchmark: fresh weights cost the same time
        model, direct = new_model(cfg, sids, cfg.trace_len, device), new_model(cfg, sids, 0, device)
    else:
        model, _ = load_stage(cfg, "stage1", sids, device, "stage 2")  # Spec §3.4: stage 1 inits
        direct = None  # the direct model: DPO, --annot-keep gain, and the own-trace diagnostics
        if need_direct or os.path.exists(ckpt_path(cfg, "base")):
            direct = load_stage(cfg, "base", sids, device, "stage 2 (DPO, --annot-keep gain)")[0]
    if direct is not None:  # frozen, no dropout
        direct.eval().requires_grad_(False)
    # Reconstructed: the reference of --dpo-form shared is the policy frozen at the start of stage 2.
    ref = copy.deepcopy(model).eval().requires_grad_(False) if cfg.lambda_dpo and cfg.dpo_form == "shared" else None
    opt = adamw(model, cfg.sft_lr, cfg)
    gen = torch.Generator(device=device).manual_seed(stage_seed(cfg, "stage2"))
    annot_gen = torch.Generator().manual_seed(stage_seed(cfg, "stage2") + 1)  # the annotator's data order
    offline, state = cfg.annotate == "offline", dict(store=None, rounds=set())
    if offline and bench_steps:  # random stored traces: the fine-tuning step costs the same
        P = len(ds.train.items)
        state["store"] = dict(traces=torch.randint(FIRST_CODE, model.emb.num_embeddings, (P, model.l),
                                                   dtype=torch.int16), keep=torch.ones(P, dtype=torch.bool))
    elif offline:
        if cfg.resume and os.path.exists(last_path(cfg, "stage2")) and os.path.exists(traces_path(cfg)):
            store = load_file(traces_path(cfg), ("traces", "keep", "config"))
            if not set(changed_settings(cfg, store["config"], "stage2")) - DECODING:
                state["store"] = store
                print(f"stage2: the traces of epoch {store['epoch']} read from {traces_path(cfg)}")
        if state["store"] is None:
            state["store"] = annotation_round(cfg, model, direct, ds, device, annot_gen, 1)

    def step(epoch, hist, target, pos):
        if offline and cfg.annot_every and epoch > 1 and (epoch - 1) % cfg.annot_every == 0 and \
                epoch not in state["rounds"]:  # re-annotate from a frozen snapshot of the model
            state["rounds"].add(epoch)
            state["store"] = annotation_round(cfg, model, direct, ds, device, annot_gen, epoch)
        B = len(target)
        o_ann, keep = None, torch.ones(B, dtype=torch.bool, device=device)
        if offline:  # the stored traces: the same ones every epoch
            o_ann = state["store"]["traces"][pos.cpu()].long().to(device)
            keep = state["store"]["keep"][pos.cpu()].to(device)
        self_rows = ~keep if not cfg.self_trace_frac else \
            (torch.rand(B, generator=gen, device=device) < cfg.self_trace_frac) | ~keep
        neg = direct_negatives(cfg, direct, hist, target, ds.n_items, gen) if cfg.lambda_dpo else None
        loss, logs = stage2_losses(cfg, model, direct, ref, hist, target, o_ann, self_rows, neg,
                                   warm=epoch <= cfg.sft_warmup)
        update(model, opt, loss, cfg, "stage2")
        return dict(loss=loss, **logs)

    diag = (lambda m: trace_diagnostics(cfg, m, direct, ds.valid, device)) if direct is not None else None
    return fit(cfg, "stage2", model, step, ds, sids, device, cfg.batch_size, cfg.epochs,
               cfg.max_examples, bench_steps, opt=opt, rngs=[gen, annot_gen], diag=diag,
               batches=lambda g: data.train_batches(ds.train, cfg.max_len, cfg.batch_size, pairs=True,
                                                    device=device, generator=g, positions=True, bucket=cfg.bucket))


@torch.no_grad()
def trace_diagnostics(cfg, model, direct, split, device, n=1024):
    """Per epoch, on the first n cases of a split (logged, never used for selection): the target's
    log-likelihood log P(SID ; EOS | x, o) after the model's OWN greedy trace o, the direct model's
    log P(SID ; EOS | x), their difference (> 0: the model's own thinking helps), and ln|C|."""
    model.eval()
    rows = np.arange(min(n, len(split)))
    sums = dict(ll_own=0.0, ll_direct=0.0)
    for b in range(0, len(rows), cfg.eval_batch):
        r = rows[b:b + cfg.eval_batch]
        hist = torch.from_numpy(data.windows(split.items, split.starts[r], split.ends[r], cfg.max_len)).to(device)
        target = torch.from_numpy(split.targets[r]).to(device)
        memory = model.encode(hist)
        o = greedy_trace(model, memory)[:, None]  # (B, 1, l)
        sums["ll_own"] += float(sid_logp(model, memory, o, target[:, None]).sum())
        sums["ll_direct"] += float(sid_logp(direct, direct.encode(hist), o[..., :0], target[:, None]).sum())
    out = {k: v / max(len(rows), 1) for k, v in sums.items()}
    return out | dict(ll_gain=out["ll_own"] - out["ll_direct"], ln_C=math.log(model.emb.num_embeddings - FIRST_CODE),
                      ln_k=math.log(cfg.trace_topk) if cfg.trace_topk else None)


def fmt_diag(x):
    k = f", ln k {x['ln_k']:.2f}" if x.get("ln_k") is not None else ""
    return (f"valid[:1024] log P(target | own greedy trace) {x['ll_own']:.3f} vs direct {x['ll_direct']:.3f} "
            f"({x['ll_gain']:+.3f} nats) | ce_think at chance: ln|C| {x['ln_C']:.2f}{k}")


# -----------------------------------------------------------------------------
# Stage 3: reinforcement learning with GRPO and five rewards (Spec §4b)
# -----------------------------------------------------------------------------
@torch.no_grad()
def sample(model, memory, W, temp, gen, trie=False, skip=None):
    """W rollouts per history from the policy: tokens (B, W, T), states d (B, W, T, D), and
    the tokens each position could draw from, (B, W, T, V) bool (all True without trie).
    trie (--rl-trie): the SID positions sample only continuations of some item's SID prefix;
    skip (B, L) (with trie, --skip-history on): the last level also skips the items of the
    history window, as the evaluation's beams do, unless the prefix drawn so far leads to
    history items only (then those stay allowed: a rollout always ends in an item)."""
    B = memory["mask"].shape[0]
    inp, cache, ys, ds, allowed = torch.full((B, W, 1), BOS, device=gen.device), None, [], [], []
    for p in range(model.T):
        d, cache = model.decode(memory, inp, p, cache)  # (B, W, 1, D)
        lp = model.log_probs(d, p)[:, :, 0]  # (B, W, V)
        ok = torch.ones_like(lp, dtype=torch.bool)
        if trie and model.l <= p < model.l + model.M:
            seqs = torch.cat(ys, 2) if ys else torch.zeros(B, W, 0, dtype=torch.long, device=gen.device)
            if skip is not None and p == model.l + model.M - 1:
                ok = model.item_continuations(seqs, p, skip)  # (B, W, V) no history item
                stuck = ~ok.any(-1, keepdim=True)  # (B, W, 1) the prefix leads to history items only
                if stuck.any():
                    ok = torch.where(stuck, model.item_continuations(seqs, p), ok)
            else:
                ok = model.item_continuations(seqs, p)  # (B, W, V)
        probs = (lp.masked_fill(~ok, -math.inf) / temp).softmax(-1)  # (B, W, V)
        inp = torch.multinomial(probs.flatten(0, 1), 1, generator=gen).view(B, W, 1)
        ys.append(inp)
        ds.append(d)
        allowed.append(ok)
    return torch.cat(ys, 2), torch.cat(ds, 2), torch.stack(allowed, 2)


@torch.no_grad()
def rank_negatives(cfg, direct, hist, target, pop, gen):
    """Spec §4b.5 [R]: the ranking reward's --rank-negs negatives (B, n), never the target.
    direct: the direct model's beams (the items it would recommend: hard), popular items fill
    the slots its beams leave; popular: drawn in proportion to training popularity; random."""
    # Reconstructed: the spec asks for "random plus popular" negatives; uniform ones were easy (the
    # previous r_rank sat near 1), the items the direct model would recommend are the hard ones.
    B, n = len(target), cfg.rank_negs
    if cfg.rank_negs_from == "random":
        return random_other(target, len(pop) - 1, (n,), gen)
    fill = torch.multinomial(pop.expand(B, -1), n, replacement=True, generator=gen)  # (B, n)
    fill = torch.where(fill == target[:, None], random_other(target, len(pop) - 1, (n,), gen), fill)
    if cfg.rank_negs_from == "popular":
        return fill
    items = beams_to_items(direct, *beam_search(direct, hist, n + 1, **decoding(cfg)))[0]  # (B, n+1) ranked, PAD = empty
    items = items.masked_fill(items == target[:, None], PAD_TOK)
    items = items.gather(1, torch.argsort((items == PAD_TOK).long(), dim=1, stable=True))[:, :n]
    return torch.where(items == PAD_TOK, fill[:, :items.shape[1]], items)


@torch.no_grad()
def stage3_rewards(cfg, policy, direct, memory, hist, y, d, target, t, negs=None):
    """Spec §4b: the five reward terms of every rollout, (B, G, 5). Formulas are [R].
    policy: the model that scores them (--rl-judge: the one being trained, or its frozen copy),
    with its memory of the histories and its states d (B, G, T, D) on the rollouts y;
    t (B, D): its target representations; negs (B, n): the ranking reward's negatives."""
    B, G, T = y.shape
    l, M = policy.l, policy.M
    sid, tgt = y[..., l:l + M], policy.item_tokens[target][:, None]  # (B, G, M), (B, 1, M)
    valid = (policy.tokens_to_items(sid) > 0) & (y[..., l + M] == EOS)
    # Reconstructed: the note names the five rewards; every formula below is ours (Spec §4b).
    fmt = -(~valid).float()  # 1. format: -1 unless the output parses to an item
    eq = sid == tgt  # (B, G, M)
    if cfg.match_reward == "prefix":  # 2. exact-match: leading codes right / M, 1 = hit
        match = eq.long().cumprod(-1).sum(-1) / M
    elif cfg.match_reward == "level":  # partial credit per level: codes right at any level / M
        match = eq.float().mean(-1)
    else:  # exact: 1 on a hit only
        match = eq.all(-1).float()
    sim = F.cosine_similarity(policy.mlp_s(d[:, :, :l + 1].sum(2)), t[:, None], dim=-1)  # 3. cos(s_l, t)
    lik, rank = torch.zeros_like(fmt), torch.zeros_like(fmt)
    if cfg.w_lik or cfg.w_rank:
        # Candidates [target, negatives] scored by log P(SID ; EOS | x, sampled trace): one
        # teacher-forced pass over (B, G*C) sequences sharing each rollout's trace.
        cand = target[:, None] if negs is None else torch.cat([target[:, None], negs], 1)  # (B, C)
        C = cand.shape[1]
        trace = y[..., None, :l].expand(B, G, C, l).flatten(1, 2)  # (B, G*C, l)
        score = sid_logp(policy, memory, trace, cand[:, None].expand(B, G, C).flatten(1)).view(B, G, C)
        if cfg.w_lik:  # 4. thinking likelihood vs. answering directly, tanh-squashed
            direct_lp = sid_logp(direct, direct.encode(hist), y[:, :1, :0], target[:, None])  # (B, 1)
            lik = torch.tanh((score[..., 0] - direct_lp) / M)
        if cfg.w_rank and C > 1:  # 5. rank of the target among the negatives: 1 - (rank-1)/N
            rank = 1 - (score[..., 1:] >= score[..., :1]).float().sum(-1) / (C - 1)  # ties count against
    return torch.stack([fmt, match, sim, lik, rank], -1)


REWARDS = ("format", "match", "sim", "lik", "rank")


def user_batches(train, maxlen, batch_size, device, gen):
    """One example per user (at least 2 training items), shuffled: the training prefix ->
    the user's last training item. Yields histories (B, L), targets (B,)."""
    rows = np.flatnonzero(train.lengths() >= 2)
    rows = rows[torch.randperm(len(rows), generator=gen).numpy()]
    for b in range(0, len(rows), batch_size):
        r = rows[b:b + batch_size]
        hist = data.windows(train.items, train.starts[r], train.ends[r] - 1, maxlen)  # (B, L)
        yield torch.from_numpy(hist).to(device), torch.from_numpy(train.items[train.ends[r] - 1]).to(device)


def stage3_rl(cfg, ds, sids, device, bench_steps=0):
    """Stage 3: GRPO from the stage-2 model, KL-anchored to a frozen copy of it (Spec §4b)."""
    need_direct = bool(cfg.w_lik) or (bool(cfg.w_rank) and cfg.rank_negs_from == "direct")
    if bench_steps:
        policy, direct = new_model(cfg, sids, cfg.trace_len, device), new_model(cfg, sids, 0, device)
    else:
        policy, _ = load_stage(cfg, "stage2", sids, device, "stage 3")
        direct = None
        if need_direct or os.path.exists(ckpt_path(cfg, "base")):
            direct = load_stage(cfg, "base", sids, device, "stage 3 (likelihood reward, direct negatives)")[0]
    if direct is not None:  # frozen, no dropout
        direct.eval().requires_grad_(False)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    opt = adamw(policy, cfg.rl_lr, cfg)
    gen = torch.Generator(device=device).manual_seed(stage_seed(cfg, "stage3"))
    w = torch.tensor([cfg.w_format, cfg.w_match, cfg.w_sim, cfg.w_lik, cfg.w_rank], device=device)
    weight = policy.choice.float()  # tokens with a real choice carry the policy gradient
    pop = torch.from_numpy(ds.train.counts(ds.n_items)).float().to(device)  # training rows only
    pop[PAD_TOK] = 0  # (N+1,) training popularity, for the popular negatives

    def tempered(lp, allowed=None):  # (B, G, T, V) log-probs of the distribution the rollouts are sampled from
        # Reconstructed (--rl-trie): inference decodes inside the item trie (--constrain-items), so the
        # rollouts are sampled there too and the policy is the trie-renormalised distribution: the
        # format term is then constant, and no update is spent on SIDs that are no item.
        if allowed is not None:
            lp = lp.masked_fill(~allowed, -math.inf).log_softmax(-1)
        return lp if cfg.rl_temp == 1 else (lp / cfg.rl_temp).log_softmax(-1)

    def step(epoch, hist, target, *_):
        # Note: every RL pass runs without dropout, so rho and the KL compare the same function.
        policy.eval()
        with torch.no_grad():  # ALGO LOGIC: rollouts, rewards and advantages (Spec §4b)
            memory = policy.encode(hist)
            # Reconstructed (--rl-skip-history, README row 22a): the rollouts skip the history window's
            # items where the evaluation's beams do, so RL trains on outputs inference can produce.
            skip = hist if cfg.rl_trie and cfg.rl_skip_history and cfg.skip_history == "on" else None
            y, d, allowed = sample(policy, memory, cfg.group_size, cfg.rl_temp, gen, cfg.rl_trie, skip)  # (B, G, T)
            allowed = allowed if cfg.rl_trie else None  # (B, G, T, V): the sampling distribution's support
            # tokens with a real choice carry the policy gradient and count in the token mean;
            # inside the trie a position with one allowed token is forced (rho = 1, no gradient)
            tok_w = weight if allowed is None else weight * (allowed.sum(-1) > 1)  # (T,) or (B, G, T)
            negs = rank_negatives(cfg, direct, hist, target, pop, gen) if cfg.w_rank else None
            ref_memory = ref.encode(hist)
            ref_out, ref_d = teacher_forced(ref, ref_memory, y)  # (B, G, T, V), (B, G, T, D)
            # Reconstructed (--rl-judge ref): the similarity, likelihood and ranking rewards read
            # the model's own heads (MLP_s, t, P(SID | trace)); scored by the policy they change
            # with every update (a reward the policy can move without better outputs), scored by
            # the frozen stage-2 copy they stay fixed, as a reward model's do.
            judge, j_memory, j_d = (ref, ref_memory, ref_d) if cfg.rl_judge == "ref" else (policy, memory, d)
            t = target_repr(judge, target, cfg.target_repr).detach()
            rewards = stage3_rewards(cfg, judge, direct, j_memory, hist, y, j_d, target, t, negs)
            R = rewards @ w  # (B, G) total reward sum_k w_k r_k
            adv = token_advantages(rewards, w, policy.l, y.shape[2], cfg.rl_credit)  # (B, G, T)
            old_lp = token_logp(tempered(teacher_forced(policy, memory, y)[0], allowed), y)  # (B, G, T) pi_old
            ref_lp = token_logp(tempered(ref_out, allowed), y)
        for _ in range(cfg.rl_inner):  # ALGO LOGIC: clipped policy updates on the same rollouts
            # Note: ratio and KL use the same temperature as the sampling (--rl-temp), so the
            # ratio is exactly 1 at the first update and the clip means what it says.
            lp_all = tempered(teacher_forced(policy, policy.encode(hist), y)[0], allowed)  # (B, G, T, V)
            loss, st = grpo_loss(token_logp(lp_all, y), old_lp, ref_lp, adv, cfg.clip_eps,
                                 cfg.beta_kl, tok_w)
            update(policy, opt, loss, cfg, "stage3")
        p = lp_all.detach().exp()
        ent = -(p * lp_all.detach().masked_fill(p == 0, 0)).sum(-1)  # (B, G, T) entropy (nats)
        logs = {f"r_{k}": rewards[..., i].mean() for i, k in enumerate(REWARDS)}
        return dict(loss=loss, reward=R.mean(), **logs, kl=st["kl"], clip_frac=st["clip_frac"],
                    entropy=(ent * tok_w).sum() / tok_w.expand_as(ent).sum().clamp(min=1))

    # Reconstructed (Spec §4b: "1-3 epochs over the training users"): --rl-data users draws one
    # history per user; --rl-max-examples 0 covers all of them every epoch.
    batches = (lambda g: user_batches(ds.train, cfg.max_len, cfg.rl_batch, device, g)) \
        if cfg.rl_data == "users" else None
    diag = (lambda m: trace_diagnostics(cfg, m, direct, ds.valid, device)) if direct is not None else None
    # Reconstructed (Spec §4b [R]: "select by validation NDCG@10"): with --rl-select-start the
    # stage-2 weights RL starts from are a candidate too, so stage 3 never ends below stage 2 on
    # validation; the README reports the RL epochs beside it.
    return fit(cfg, "stage3", policy, step, ds, sids, device, cfg.rl_batch, cfg.rl_epochs,
               cfg.rl_max_examples, bench_steps, opt=opt, rngs=[gen], batches=batches, diag=diag,
               select_start=cfg.rl_select_start)


# -----------------------------------------------------------------------------
# Evaluation: batched beam search over trace + SID (Spec §2.5, §5.3), shared metrics (data.py)
# -----------------------------------------------------------------------------
@torch.no_grad()
def beam_search(model, hist, beam, traces=0, constrain=False, skip_history=False):
    """Keep the `beam` most probable partial outputs per history, all histories at once.
    Returns tokens (B, W, T) and log-probs (B, W), best first; -inf marks a dead beam (fewer
    than `beam` possible outputs). traces=0: one beam of width `beam` over trace and SID;
    traces=n >= 1: width n over the l thinking positions (n = 1: the greedy trace), then each of
    those n traces gets its own SID beam of width `beam` (W = n * beam).
    constrain (--constrain-items): the SID positions follow the prefix trie of the items, so
    every live beam ends in an item; skip_history (with constrain): never in one of the history
    window's items (a target that repeats one can then not be found: auto turns it on only for
    data without repeats)."""
    # Reconstructed (Spec §2.5, §7.13): one beam over the whole trace + SID (the spec's
    # recommendation); --trace-decode greedy is the alternative it names.
    # Reconstructed: trie-constrained decoding (common in TIGER-style code; TIGER itself decodes
    # freely and counts invalid IDs). On Toys a free beam of 20 wasted 17 % of its beams on code
    # tuples that are no item (README); the scores stay the model's own log-probabilities.
    # Reconstructed (new, --trace-decode split): one shared beam can spend its width on trace
    # variants of a few items; n traces with a full SID beam each keep `beam` items per trace,
    # and --merge lse then sums an item over them: log sum_o P(o | x) P(SID | o, x) over the n
    # best traces o. Measured (README): best for the synthetic stage 1, worse than the joint
    # beam on Toys' stage 1, whose traces are far more spread out; so not the default.
    skip = hist if skip_history else None
    memory = model.encode(hist)
    B, dev, V = hist.shape[0], hist.device, model.emb.num_embeddings
    inp, cache = torch.full((B, 1, 1), BOS, device=dev), None
    score, seqs = torch.zeros(B, 1, device=dev), torch.zeros(B, 1, 0, dtype=torch.long, device=dev)
    groups = 1  # independent beams per history: the traces, once they are written (split)
    for p in range(model.T):
        d, cache = model.decode(memory, inp, p, cache)  # (B, W, 1, D)
        lp = model.log_probs(d, p)[:, :, 0]  # (B, W, V)
        if constrain and model.l <= p < model.l + model.M:
            lp = lp.masked_fill(~model.item_continuations(seqs, p, skip), -math.inf)
        if traces and p == model.l:
            groups = score.shape[1]  # from here on every trace keeps a beam of its own
        width = traces if traces and p < model.l else beam
        cand = (score[..., None] + lp).view(B, groups, -1)  # (B, G, W/G * V)
        score, idx = cand.topk(min(width, cand.shape[2]), dim=2)  # (B, G, W') best first per group
        src = idx // V + torch.arange(groups, device=dev)[:, None] * (lp.shape[1] // groups)
        score, src, tok = score.flatten(1), src.flatten(1), (idx % V).flatten(1)  # (B, G*W')
        rows = torch.arange(B, device=dev)[:, None]
        seqs = torch.cat([seqs[rows, src], tok[..., None]], 2)  # (B, G*W', p+1)
        cache = [tuple(c.unflatten(0, (B, -1))[rows, src].flatten(0, 1) for c in kv) for kv in cache]
        inp = tok[..., None]
    if groups > 1:  # best first over all the traces' beams
        order = torch.argsort(-score, dim=1, stable=True)
        score, seqs = score.gather(1, order), seqs[torch.arange(B, device=dev)[:, None], order]
    return seqs, score


def beams_to_items(model, seqs, score, merge="max"):
    """Beams (B, W, T) with log-probs (B, W), best first -> ranked item ids (B, W): invalid SIDs
    dropped, the beams of one item merged, the gaps moved to the end as PAD (= empty slot).
    merge max: an item keeps its best beam's score. lse: log sum_beams exp(score), i.e.
    log sum_o P(o, SID | x) over the traces o in the beam, the item's marginal probability."""
    l, M = model.l, model.M
    items = model.tokens_to_items(seqs[..., l:l + M])  # (B, W)
    items = torch.where((seqs[..., l + M] == EOS) & torch.isfinite(score), items, 0)
    invalid = int(((items == 0) & torch.isfinite(score)).sum())
    same = (items[:, :, None] == items[:, None, :]) & (items[:, :, None] > 0)  # (B, W, W)
    dup = torch.triu(same, diagonal=1).any(1)  # (B, W) an earlier (better) beam has this item
    # Reconstructed (Spec §2.5): beams of one item collapse onto the best one (max). The trace is
    # a latent variable, so --merge lse adds the item's beams up instead (with beam search over
    # trace + SID, max ranks an item by one trace only and spends the width on its variants).
    total = score if merge == "max" else torch.logsumexp(score[:, None, :].masked_fill(~same, -math.inf), -1)
    key = total.masked_fill(dup | (items == 0), -math.inf)  # (B, W) one entry per item
    order = torch.argsort(-key, dim=1, stable=True)  # best item first, ties keep beam order
    return torch.where(dup, 0, items).gather(1, order), invalid


def evaluate_split(cfg, model, split, beam, device):
    """Shared full-ranking metrics (data.evaluate) of beam-search lists, plus trace statistics:
    distinct thinking tokens and their entropy on the top beam, and the invalid-beam rate."""
    model.eval()
    usage = torch.zeros(model.emb.num_embeddings, device=device)
    count = dict(invalid=0, beams=0)

    def score_fn(hist):
        seqs, score = beam_search(model, hist, beam, **decoding(cfg))
        items, invalid = beams_to_items(model, seqs, score, cfg.merge)
        usage.index_add_(0, seqs[:, 0, :model.l].flatten(), torch.ones(hist.shape[0] * model.l, device=device))
        count["invalid"] += invalid
        count["beams"] += int(torch.isfinite(score).sum())
        return items  # (B, W) ranked item ids, PAD = empty slot

    # Note: data.evaluate removes the case's history items from the lists (the shared protocol,
    # --mask-history); a beam that ends in a seen item is then wasted, so beams are wider than 20.
    # trim: batches of similar history length, all-padding columns cut (the same metrics, faster)
    m = data.evaluate(score_fn, split, cfg.max_len, device=device, batch_size=cfg.eval_batch,
                      mask_history=cfg.mask_history, trim=True)
    p = usage[usage > 0] / usage.sum().clamp(min=1)
    m.update(invalid_rate=count["invalid"] / max(count["beams"], 1), trace_distinct=int((usage > 0).sum()),
             trace_entropy_bits=float(-(p * p.log2()).sum()))
    return m


def fmt_metrics(m):
    return (f"R@10 {m['recall@10']:.4f} N@10 {m['ndcg@10']:.4f} R@20 {m['recall@20']:.4f} "
            f"N@20 {m['ndcg@20']:.4f} | invalid {100 * m['invalid_rate']:.1f}% | trace "
            f"{m['trace_distinct']} tokens, {m['trace_entropy_bits']:.2f} bits")


# -----------------------------------------------------------------------------
# Main
# -----------------------------------------------------------------------------
STAGE_FNS = {"base": train_base, "stage1": stage1_pretrain, "stage2": stage2_sft, "stage3": stage3_rl}


def stage_data(cfg, ds, key):
    """The data a stage trains on: --rl-holdout drops each user's last training item from stages 1
    and 2 (as a target; it is the last, so no history holds it). Rows keep their place in
    ds.train.items, so the stored traces' positions name the same examples."""
    # Reconstructed (--rl-holdout): stage 3's targets are the users' last training items; without
    # the holdout stage 2 has already fitted them, and reinforcing them overfits (README).
    if not cfg.rl_holdout or key not in ("stage1", "stage2"):
        return ds
    t = ds.train
    return dataclasses.replace(ds, train=dataclasses.replace(t, ends=np.maximum(t.ends - 1, t.starts)))


def benchmark(cfg, ds, sids, device, keys):
    """Time each stage's training steps and a full beam-search pass over the test users."""
    out = dict(semantic_ids_s=sids["report"]["build_s"], train_examples_per_s={}, decode_s={})
    for key in keys:
        out["train_examples_per_s"][key] = STAGE_FNS[key](cfg, ds, sids, device, cfg.benchmark_steps)
        print(f"benchmark {key}: {out['train_examples_per_s'][key]}")
    for l in sorted({0, cfg.trace_len}):
        model, t0 = new_model(cfg, sids, l, device), time.time()
        evaluate_split(cfg, model, ds.test, cfg.beam_test, device)
        out["decode_s"][f"l={l}"] = dict(seconds=round(time.time() - t0, 1), cases=len(ds.test),
                                         beam=cfg.beam_test)
        print(f"benchmark decode l={l}: {out['decode_s'][f'l={l}']}")
    out["peak_rss_mib"] = peak_rss_mib()
    if device.type == "cuda":
        out["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def has_repeats(train):
    """Does any training sequence hold one item twice?"""
    row, pos = train.positions()
    pairs = row.astype(np.int64) * (int(train.items.max(initial=0)) + 1) + train.items[pos]
    return len(np.unique(pairs)) < len(pairs)


def resolve_decoding(cfg, ds):
    """--skip-history auto: on unless a training sequence repeats an item (the protocol keeps a
    target that repeats a history item, so skipping the history would lose it)."""
    if cfg.skip_history == "auto":
        repeats = has_repeats(ds.train)
        cfg.skip_history = "off" if repeats or not cfg.constrain_items else "on"
        why = ("training sequences repeat items: a target may be one of its history's" if repeats else
               "--no-constrain-items: skipping works inside the item trie" if not cfg.constrain_items else
               "no training sequence repeats an item")
        print(f"skip-history auto -> {cfg.skip_history} ({why})")


def decoding(cfg):
    """beam_search's trace and constraint flags from the config."""
    return dict(traces=dict(beam=0, greedy=1, split=cfg.trace_beams)[cfg.trace_decode],
                constrain=cfg.constrain_items, skip_history=cfg.skip_history == "on")


def resolve_budget(cfg, ds):
    """--epochs 0, --max-examples -1 and --rl-max-examples -1 (auto): the small budget of the
    built-in synthetic demo (a few CPU-minutes), full epochs with early stopping on real data."""
    demo = cfg.dataset == "synthetic"
    if cfg.epochs == 0:
        cfg.epochs = 3 if demo else 50
    if cfg.max_examples < 0:
        cfg.max_examples = 8192 if demo else 0
    if cfg.rl_max_examples < 0:
        cfg.rl_max_examples = 512 if demo else 0
    n = int(ds.stats["train_targets"])
    users = int((ds.train.lengths() >= 2).sum())
    rl_n = users if cfg.rl_data == "users" else n
    print(f"budget: base / stage 1 / stage 2 up to {cfg.epochs} epochs x "
          f"{min(cfg.max_examples or n, n):,} of {n:,} training prefixes; stage 3 {cfg.rl_epochs} epochs x "
          f"{min(cfg.rl_max_examples or rl_n, rl_n):,} of {rl_n:,} {'users' if cfg.rl_data == 'users' else 'prefixes'}; "
          f"early stopping after {cfg.patience} epochs without a better valid {cfg.select}"
          + (" (auto: the synthetic demo's small budget)" if demo else ""))


def estimate_time(cfg, ds, sids, device, keys):
    """Print the expected wall time of each stage before training: two timed steps of every stage
    (fresh weights cost the same), one timed decoding batch, and the budget. An upper bound:
    early stopping can end a stage sooner."""
    n = int(ds.stats["train_targets"])
    users = int((ds.train.lengths() >= 2).sum())
    hist = torch.from_numpy(data.windows(ds.valid.items, ds.valid.starts[:cfg.eval_batch],
                                         ds.valid.ends[:cfg.eval_batch], cfg.max_len)).to(device)
    per_case = {}
    for l in sorted({0, cfg.trace_len}):  # seconds per validation case, beam --beam-valid
        model, t0 = new_model(cfg, sids, l, device), time.time()
        beam_search(model, hist, cfg.beam_valid, **decoding(cfg))
        per_case[l] = (time.time() - t0) / len(hist)
    model, t0 = new_model(cfg, sids, cfg.trace_len, device), time.time()
    stage2_annotate(model, model.encode(hist), target_repr(model, torch.from_numpy(
        ds.valid.targets[:cfg.eval_batch]).to(device), cfg.target_repr), cfg.trace_topk)
    annot_s = (time.time() - t0) / len(hist)  # seconds per annotated prefix (fit: ~2x)
    total, parts = 0.0, []
    for key in keys:
        rate = STAGE_FNS[key](cfg, ds, sids, device, 2)["examples_per_s"]
        l = 0 if key == "base" else cfg.trace_len
        epochs, ex = (cfg.rl_epochs, min(cfg.rl_max_examples or users, users) if cfg.rl_data == "users"
                      else min(cfg.rl_max_examples or n, n)) if key == "stage3" else \
            (cfg.epochs, min(cfg.max_examples or n, n))
        evals = epochs + (key == "stage3" and cfg.rl_select_start)  # + the epoch-0 validation
        sec = epochs * ex / rate + evals * len(ds.valid) * per_case[l] + \
            len(ds.test) * per_case[l] * cfg.beam_test / cfg.beam_valid
        if key == "stage2" and cfg.annotate == "offline":
            rounds = 1 + ((cfg.epochs - 1) // cfg.annot_every if cfg.annot_every else 0)
            sec += rounds * annot_s * (n + 2 * cfg.annot_epochs * min(cfg.max_examples or n, n))
        total += sec
        parts.append(f"{key} {sec / 60:.1f}")
    print(f"expected time: at most {total / 60:.1f} min ({', '.join(parts)} min), from timing 2 "
          f"steps of each stage and one decoding batch now; early stopping can end stages sooner")
    return total


def main(argv=None) -> dict:
    """Check the flags and --out, lock --out, run the stages. Ctrl-C at any point: one line saying
    what is saved, and exit code 130 (128 + SIGINT, what a shell reports for Ctrl-C)."""
    cfg, lock, finished = None, None, []  # finished: the stages of --stages done so far
    phase = "during start-up; nothing written yet"  # what a Ctrl-C interrupts (fit says more)
    try:
        cfg = parse_args(argv)
        device = pick_device(cfg.device)
        keys = [key for flag, key in STAGES.items() if flag in [s.strip() for s in cfg.stages.split(",")]]
        check_out(cfg, keys)
        lock = data.lock_out(cfg.out)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        print(f"STREAM-Rec | device {device} | torch {torch.__version__} | float32 | seed {cfg.seed}")
        print("config", json.dumps(dataclasses.asdict(cfg)))
        set_seed(cfg.seed)
        ds = data.load_dataset(cfg.dataset, cfg.data_dir, verbose=True, split=cfg.split,
                               min_rating=cfg.min_rating, kcore=cfg.kcore, attributes=cfg.attributes)
        check_config(cfg, ds)  # the limits the data sets (beam widths, ranking negatives)
        resolve_budget(cfg, ds)
        resolve_decoding(cfg, ds)
        sids = build_semantic_ids(cfg, ds)
        if cfg.benchmark:
            phase = "during the benchmark; benchmark.json not written"
            res = dict(config=dataclasses.asdict(cfg), dataset=ds.stats, device=str(device),
                       torch=torch.__version__, benchmark=benchmark(cfg, ds, sids, device, keys))
            save_atomic(res, os.path.join(cfg.out, "benchmark.json"))
            return res
        if cfg.eval_only:  # e.g. another --trace-decode or beam size for trained stages
            phase = "during the evaluation; eval.json not written"
            res = dict(config=dataclasses.asdict(cfg), dataset=ds.stats)
            for key in keys:
                model = load_stage(cfg, key, sids, device, "--eval-only")[0]
                res[key] = dict(valid=evaluate_split(cfg, model, ds.valid, cfg.beam_valid, device),
                                test=evaluate_split(cfg, model, ds.test, cfg.beam_test, device))
                print(f"{key} valid {fmt_metrics(res[key]['valid'])}\n{key} TEST  {fmt_metrics(res[key]['test'])}")
            save_atomic(res, os.path.join(cfg.out, "eval.json"))
            return res
        if cfg.estimate:
            phase = "while timing a few steps for the expected time; nothing written yet"
            estimate_time(cfg, ds, sids, device, keys)
        path = os.path.join(cfg.out, "results.json")
        old = load_file(path) if os.path.exists(path) else {}  # stages not rerun keep their entries
        res = dict(config=dataclasses.asdict(cfg), stage_fields=stage_fields(), older_config=OLDER,
                   dataset=ds.stats, device=str(device), torch=torch.__version__, semantic_ids=sids["report"])
        res.update({k: old[k] for k in STAGES.values() if k in old})
        order = list(STAGES.values())
        for key in keys:
            if cfg.resume and os.path.exists(ckpt_path(cfg, key)):
                ck = load_stage(cfg, key, sids, "cpu", "--resume")[1]
                diff = changed_settings(cfg, ck["config"], key)
                if diff:
                    saved = ", ".join(f"{k}={ck['config'].get(k, OLDER.get(k))}" for k in diff)
                    raise RunError(f"--resume: {ckpt_path(cfg, key)} was trained with other "
                                   f"settings ({saved}); pass the same flags, or rerun it with --overwrite")
                if ck["done"]:  # a stage interrupted mid-way continues from its last epoch (fit)
                    res[key] = ck["result"]
                    finished.append(key)
                    print(f"{key}: finished checkpoint found, skipped (--resume)")
                    continue
                if not os.path.exists(last_path(cfg, key)):
                    print(f"note: {key} did not finish and left no {last_path(cfg, key)}; it restarts "
                          f"from its first epoch")
            print(f"--- {key} ---")
            for later in order[order.index(key) + 1:]:  # they started from the old `key` model
                if later not in keys and res.pop(later, None) is not None:
                    print(f"note: {later}'s results dropped from results.json: it was trained "
                          f"from the previous {key}; rerun --stages {later.replace('stage', '')} --overwrite")
            set_seed(stage_seed(cfg, key))  # dropout etc.: same numbers whether run alone or not
            phase = f"while {key} was starting"
            res[key] = STAGE_FNS[key](cfg, stage_data(cfg, ds, key), sids, device)
            finished.append(key)
            save_atomic(res, path)
        save_atomic(res, path)
        summary = " | ".join(f"{k} R@10 {res[k]['test']['recall@10']:.4f}" for k in STAGES.values() if k in res)
        print(f"results in {path}: {summary}")
        return res
    except (data.DataError, RunError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt as e:
        what = str(e) or phase
        if cfg is not None and not (cfg.benchmark or cfg.eval_only):
            what += (f"; finished and saved: {', '.join(finished)}" if finished else "; no stage of this run finished")
            what += "; the same command with --resume continues from there"
        print(f"interrupted {what}", file=sys.stderr, flush=True)
        sys.exit(130)
    except (RuntimeError, MemoryError) as e:
        line = memory_error_line(e)
        if line is None:
            raise
        sys.exit(f"error: {line}")
    finally:
        if lock:
            data.release_lock(lock)


if __name__ == "__main__":
    main()
