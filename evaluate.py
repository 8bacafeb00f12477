"""
evaluate.py: one yardstick for every checkpoint. Likelihood with its uncertainty, sample
quality, the micro-dLLM seed's validation block, and a comparison across runs. The reporting
across runs lives in report.py: --compare's table and plots, study.py's tables, and the statistics
of results (Student's t, confidence intervals over samples and seeds) that this file uses too.

    python evaluate.py --out_dir=out/diffusion-shakespeare_char-linear-uniform
    python evaluate.py --out_dir=RUN --ref=out/gpt-shakespeare_char --json=eval.json
    python evaluate.py --compare out/run1 out/run2 ...        # or --compare='out/*'

Likelihood. Every diffusion checkpoint, whatever schedule and masking it was trained with, is
scored by the NELBO under *uniform* masking (alpha(t) = 1 - t, every token masked with
probability t). In continuous time the bound does not depend on the shape of the schedule
(Kingma et al. 2021, "Variational Diffusion Models", sec. 5; MDLM, Sahoo et al. 2024, eq. 10),
so this is the one bound every masked diffusion model can be compared on; entropy-weighted
masking is a training choice and is ignored here. Two estimators of the same number:
  - continuous: t ~ U[t_min, 1] (stratified within each batch), each token masked w.p. t,
    masked cross-entropy weighted by 1/t (diffusion_loss's estimate with the linear schedule),
    minus a control variate for the number of tokens masked (its mean is known: tL);
  - discrete any-order bound: k ~ U{1..L} (stratified), exactly k positions masked uniformly,
    weight L/k (Uria et al. 2014; Hoogeboom et al. 2022, "Autoregressive Diffusion Models").
    Integrating t out of the continuous bound given k masked tokens gives exactly weight 1/k,
    so for a model that does not read the mask rate both estimate the same number; the
    continuous one leaves out t < t_min (about t_min x the single-masked-token CE).
The 95% confidence interval is Monte Carlo error only (over t and the masks, for these exact
tokens): each batch is scored in `passes` independent passes, and the spread between passes
within a batch gives the variance. Checked on a model whose NELBO is known exactly (a fixed
categorical on data with exact counts): over 1000 seeds the CI covered it 94% (continuous)
and 95% (discrete) of the time. GPT checkpoints get the exact NLL on the same tokens:
windows of L + 1 consecutive tokens tile the split; both kinds score the last L tokens of each
window (GPT sees the first as context), so both sit in one table.

Block diffusion models (diffusion.py --block_len=L, BD3-LM) are scored by their own bound, in the
same units: -log p(x) = sum over blocks b of -log p(x_b | x_<b), and each block's term is bounded
by the same uniform-masking NELBO, within the block only, the clean blocks before it as context
(one vectorised pass of the model per batch). continuous: one t per block (stratified over the
batch's blocks), each token masked with probability t, weight 1/t, summed over blocks / L;
discrete: k ~ U{1..L} per block, exactly k of its positions masked, weight L/k. At L = 1 the
discrete estimate is exact: the model's autoregressive NLL. The curve masks round(rL) positions
of every block.

Sample quality: generative perplexity under a reference autoregressive model (--ref: a gpt.py
run folder, or a GPT-2 through `transformers` with local weights), always next to the samples'
unigram entropy and distinct-1/2 (low perplexity with low entropy is repetition, not quality;
Zheng et al. 2024, "Masked diffusion models are secretly time-agnostic masked models"), and the
same figures for length-matched validation text. MAUVE (Pillutla et al. 2021) through
`mauve-text` when installed, on features of the reference model, averaged over sample seeds.

Results are cached in <out_dir>/eval.json; --compare reuses them when the checkpoint step and
every setting given on the command line match, else evaluates the run again.
"""
import contextlib
import glob
import importlib.util
import json as jsonlib  # `json` is a setting (--json=PATH)
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import sample
from diffusion import Schedule, mask_count_cv, mask_uniform, masked_ce, stratified_times
from runtime import (EXIT_USAGE, ControlVariate, TokenData, Tokenizer, UserError, at_least, autocast_for,
                     check_same_data, ckpt_file, configure, fingerprint, in_range, load_meta, one_of, read_checkpoint,
                     resolve_device, rng, run_cli, settings_of)
from report import sample_ppl_ci, t975, training_log, write_compare, write_json

# -----------------------------------------------------------------------------
out_dir = ''                    # run folder holding ckpt.pt (diffusion or GPT)
data_dir = ''                   # '' = the checkpoint's own data_dir (else ./data beside this file)
split = 'val'                   # split scored for likelihood and used for reference texts
max_tokens = 1048576            # score at most this many tokens of the split, evenly spread (0 = all)
batch_size = 32                 # windows per forward pass
passes = 4                      # Monte Carlo passes over the split per estimator (>= 2: the CI needs them)
t_min = 1e-4                    # continuous estimator: t ~ U[t_min, 1]; the left-out part is ~t_min x CE
control_variate = True          # continuous estimator: subtract the mask-count control variate (same mean, less noise)
discrete = True                 # also the exact discrete any-order bound (k ~ U{1..L}, weight L/k)
curve_points = 10               # mask rates of the CE / accuracy / entropy curve (0 = no curve)
curve_tokens = 32768            # tokens scored per mask rate on that curve
wikitext = True                 # BPE models: also zero-shot on data_dir/wikitext2 when prepared
ref = ''                        # reference AR model: gpt.py run folder | gpt2[-medium|-large|-xl] | hf:PATH | '' = none
num_samples = 16                # samples per seed for sample quality (0 = no samples)
sample_seeds = 3                # sampling seeds averaged (sample quality, MAUVE)
sampler = ''                    # diffusion sampler of sample.py; '' = sample.py's default (GPT samples left to right)
steps = 64                      # denoising steps per sample
temperature = 1.0               # sampling temperature (0 = greedy)
top_k = 0                       # keep the k most likely tokens when sampling; 0 = all
top_p = 1.0                     # nucleus sampling mass; 1.0 = all
mauve = True                    # MAUVE when mauve-text is installed and --ref is given
json = ''                       # also write every figure to this path ('' = only <out_dir>/eval.json)
script = ''                     # .py files you trust to rebuild the checkpoints (comma-separated): see sample.py --help
compare = ''                    # comma-separated run folders or globs: compare them (also: --compare DIR1 DIR2 ...)
report_dir = ''                 # where --compare writes compare.md/.json/.png; '' = out/compare
recompute = False               # --compare: evaluate again even when a run's eval.json is current
compare_plots = True            # --compare: also loss_curves.png and nelbo_by_schedule.png (one line/point per run)
device = 'auto'                 # 'auto' | 'cpu' | 'cuda' | 'cuda:1' | 'mps'
dtype = 'auto'                  # 'auto' (bfloat16 autocast on CUDA, float32 elsewhere) | 'float32' | 'bfloat16'
seed = 1337                     # every random draw of the evaluation is keyed by this
# and sample.py's sampler options (threshold, remask_score, remdm_mode, remdm_eta, stride, final_fill): same names,
# defaults and meaning as there (the schedule is the checkpoint's)
# -----------------------------------------------------------------------------

SAMPLER_OPTIONS = [k for k in sample.SAMPLER_OPTIONS if k != 'schedule']
LINEAR = Schedule('linear')     # alpha(t) = 1 - t: uniform masking at rate t, NELBO weight 1/t
EVAL_KEYS = ('data_dir', 'split', 'max_tokens', 'batch_size', 'passes', 't_min', 'control_variate', 'discrete',
             'curve_points', 'curve_tokens', 'wikitext', 'ref', 'num_samples', 'sample_seeds', 'sampler', 'steps',
             'temperature', 'top_k', 'top_p', 'mauve', 'dtype', 'seed', *SAMPLER_OPTIONS)
HERE = os.path.dirname(os.path.abspath(__file__))
GPT2_NAMES = ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl', 'distilgpt2')

# -----------------------------------------------------------------------------
# statistics: the Monte Carlo error of one estimate (Student's t itself is report.t975)


def combine(est, tokens):
    """est: (nb, P) per-token estimates of nb batches in P independent passes; tokens: (nb,).
    Returns (mean, standard error, degrees of freedom). Only Monte Carlo error counts: batch b's
    variance is the spread of its P passes (same tokens, independent t and masks); the
    degrees of freedom are Welch-Satterthwaite's. P = 1 (an exact estimate) gives se = 0."""
    est = np.asarray(est, dtype=np.float64)
    w = np.asarray(tokens, dtype=np.float64)
    w = w / w.sum()
    P = est.shape[1]
    mean = float((w * est.mean(1)).sum())
    if P < 2:
        return mean, 0.0, math.inf
    a = w ** 2 * est.var(1, ddof=1) / P                      # (nb,) variance contributions
    var = float(a.sum())
    df = var ** 2 / float((a ** 2).sum() / (P - 1)) if var > 0 else math.inf
    return mean, math.sqrt(var), df


def summarize(est, tokens, seconds, estimator, char):
    """Per-token figures of one estimator, with 95% CIs: nats, bits (per character for a
    character model), perplexity; and throughput."""
    mean, se, df = combine(est, tokens)
    h = t975(df) * se
    ln2 = math.log(2)
    n, P = int(np.sum(tokens)), int(np.shape(est)[1])
    return {'estimator': estimator, 'nats': mean, 'ci95': h, 'nats_lo': mean - h, 'nats_hi': mean + h,
            'rel_ci95': h / mean if mean else float('nan'), 'se': se, 'df': df,
            'bits': mean / ln2, 'bits_ci95': h / ln2, 'bits_unit': 'bits/char' if char else 'bits/token',
            'ppl': math.exp(mean), 'ppl_lo': math.exp(mean - h), 'ppl_hi': math.exp(mean + h),
            'tokens': n, 'passes': P, 'seconds': seconds, 'tokens_per_s': n * P / max(seconds, 1e-9)}

# -----------------------------------------------------------------------------
# data: the split as consecutive windows


def split_windows(data, L, max_tokens=0):
    """Consecutive non-overlapping windows of L + 1 tokens tiling every shard of a split:
    (N, L + 1) int64. Both objectives score w[:, 1:], the same tokens; GPT reads w[:, :-1].
    With max_tokens, N = max_tokens // L windows evenly spread over the split."""
    counts = [max((n - 1) // L, 0) for n in data.sizes]      # windows per shard
    total = sum(counts)
    if total == 0:
        raise UserError(f"the split holds fewer than {L + 1} tokens per shard: nothing to score")
    idx = np.arange(total)
    if max_tokens and total * L > max_tokens:
        idx = np.unique(np.linspace(0, total - 1, max(1, max_tokens // L)).round().astype(np.int64))
    starts = np.concatenate([[0], np.cumsum(counts)])
    rows = []
    for s, path in enumerate(data.paths):
        mine = idx[(idx >= starts[s]) & (idx < starts[s + 1])] - starts[s]
        if len(mine) == 0:
            continue
        arr = np.memmap(path, dtype=data.dtype, mode='r')
        offs = mine[:, None] * L + np.arange(L + 1)[None]     # (n, L + 1) positions in the shard
        rows.append(torch.from_numpy(np.asarray(arr[offs]).astype(np.int64)))
    return torch.cat(rows)


def resolve_data_dir(ckpt, override):
    """The data_dir to read: --data_dir, else the checkpoint's (as given, then beside this file)."""
    if override:
        return override
    d = ckpt['config'].get('data_dir', 'data')
    for cand in (d, os.path.join(HERE, d)):
        if os.path.exists(os.path.join(cand, ckpt['config']['dataset'], 'meta.json')):
            return cand
    return d


# -----------------------------------------------------------------------------
# likelihood


def random_k_mask(k, L, gen):
    """(n, L) bool with exactly k[i] positions of row i masked, a uniform k-subset."""
    keys = torch.rand(len(k), L, generator=gen)
    return keys.argsort(1).argsort(1) < k[:, None]


def continuous_batch(model, x, gen_t, gen_mask, t_min, ce=masked_ce):
    """Continuous-time NELBO under uniform masking, per sequence, in nats/token: (f, c), both (n,).

    f is diffusion_loss's estimate with the linear schedule: t stratified in [t_min, 1), each
    token masked with probability t, (1 - t_min) / t x summed masked CE / L (MDLM eq. 10).
    c = (1 - t_min) / t x (number masked) / L - (1 - t_min) is a control variate: its mean is
    exactly 0 (E[number masked] = tL), and it carries the noise of how many tokens happened to be
    masked, which dominates f at small t. monte_carlo subtracts beta x c."""
    n, L = x.shape
    u0 = torch.rand((), generator=gen_t, dtype=torch.float64)
    t = stratified_times(u0, 0, n, n, t_min)                               # (n,) in [t_min, 1)
    mask = torch.rand(x.shape, generator=gen_mask, dtype=torch.float64) < mask_uniform(x, LINEAR.alpha(t), None)
    ce = ce(model, x, mask.to(x.device), model.cfg.mask_id, t.float().to(x.device))   # (n,)
    w = (1 - t_min) * LINEAR.weight(t)                                     # (n,) float64 on the CPU
    f = w.to(x.device) * ce.double() / L
    return f, mask_count_cv(t[:, None], mask.sum(1, keepdim=True), L, t_min).to(x.device)


def block_times(u0, n, nb, t_min):
    """(n * nb,) stratified times for n sequences of nb blocks, block by block within each
    sequence; block j of sequence i takes stratum j * n + i (DiffusionObjective.draws's order)."""
    return stratified_times(u0, 0, n * nb, n * nb, t_min).view(nb, n).t().reshape(-1)


def block_continuous_batch(model, x, gen_t, gen_mask, t_min, ce=masked_ce):
    """continuous_batch for a block model (BD3-LM): (f, c), both (n,). One t per block, each token
    masked with probability its block's t, each block's masked CE given the clean blocks before
    it (the vectorised pass), weighted (1 - t_min) / t and summed over the blocks / L: the
    block model's NELBO. c: the same control variate, summed over the blocks."""
    n, L = x.shape
    B = sample.model_block_len(model)
    u0 = torch.rand((), generator=gen_t, dtype=torch.float64)
    t = block_times(u0, n, L // B, t_min)                                  # (n * nb,) in [t_min, 1)
    p = mask_uniform(x.reshape(-1, B), LINEAR.alpha(t), None).reshape(n, L)
    mask = torch.rand(x.shape, generator=gen_mask, dtype=torch.float64) < p
    ce = ce(model, x, mask.to(x.device), model.cfg.mask_id, p.float().to(x.device), block_len=B)  # (n * nb,)
    w = (1 - t_min) * LINEAR.weight(t)                                     # (n * nb,) float64 on the CPU
    f = (w.to(x.device) * ce.double()).view(n, -1).sum(1) / L
    return f, mask_count_cv(t.view(n, -1), mask.reshape(n, -1, B).sum(2), L, t_min).to(x.device)


def block_discrete_batch(model, x, gen_t, gen_mask, t_min=None, ce=masked_ce):
    """discrete_batch for a block model: k ~ U{1..B} per block (stratified over the batch's
    blocks), exactly k of its B positions masked, (B / k) x its summed CE, summed over the blocks
    / L. At B = 1 this is the exact autoregressive NLL. (f, None)."""
    n, L = x.shape
    B = sample.model_block_len(model)
    u0 = torch.rand((), generator=gen_t, dtype=torch.float64)
    k = (block_times(u0, n, L // B, 0.0) * B).long().clamp(max=B - 1) + 1   # (n * nb,) in 1..B
    mask = random_k_mask(k, B, gen_mask).reshape(n, L).to(x.device)
    rate = (k.float() / B).repeat_interleave(B).view(n, L).to(x.device)
    ce = ce(model, x, mask, model.cfg.mask_id, rate, block_len=B)   # (n * nb,)
    return (B / k.to(x.device) * ce.double()).view(n, -1).sum(1) / L, None


def discrete_batch(model, x, gen_t, gen_mask, t_min=None, ce=masked_ce):
    """Discrete any-order bound per sequence (nats/token): k ~ U{1..L} stratified, exactly k
    positions masked, (L / k) x summed CE / L = the mean CE of the k masked tokens. (f, None)."""
    n, L = x.shape
    u0 = torch.rand((), generator=gen_t, dtype=torch.float64)
    u = stratified_times(u0, 0, n, n, 0.0)                                 # (n,) in [0, 1)
    k = (u * L).long().clamp(max=L - 1) + 1                                # (n,) in 1..L
    mask = random_k_mask(k, L, gen_mask).to(x.device)
    ce = ce(model, x, mask, model.cfg.mask_id, (k.float() / L).to(x.device))
    return ce.double() / k.to(x.device), None


@torch.no_grad()
def monte_carlo(model, x, batch_fn, passes, batch_size, seed, t_min, control_variate=True,
                autocast=contextlib.nullcontext(), ce=masked_ce):
    """Run batch_fn over x (N, L) clean tokens `passes` times with independent randomness keyed
    by (seed, estimator, pass, batch). Returns (est (nb, passes), tokens (nb,), seconds, beta).
    ce: the masked cross-entropy of the run's own script (a copy's edit included).

    With control_variate, and when batch_fn returns a control variate c (mean 0), the estimate
    is f - beta c with beta = cov(f, c) / var(c) over a pilot batch (its own randomness, not
    counted) and the batches done before: the regression coefficient, which minimises the
    variance. beta never depends on the batch it is applied to, so every estimate stays unbiased
    and the estimates stay uncorrelated (a martingale difference sequence): the spread between
    passes is still an honest variance (Glasserman 2003, "Monte Carlo Methods in Financial
    Engineering", sec. 4.1)."""
    dev = next(model.parameters()).device
    nb = math.ceil(len(x) / batch_size)
    est = np.zeros((nb, passes))
    cv = ControlVariate(dev)                              # the regression on the pairs done so far
    t0 = time.time()
    if control_variate:
        with autocast:
            f, c = batch_fn(model, x[:batch_size].to(dev), rng(seed, batch_fn.__name__, 't', 'pilot'),
                            rng(seed, batch_fn.__name__, 'mask', 'pilot'), t_min, ce)
        if c is not None:
            cv.correct(f, c)
    for p in range(passes):
        for b in range(nb):
            xb = x[b * batch_size:(b + 1) * batch_size].to(dev)
            with autocast:
                f, c = batch_fn(model, xb, rng(seed, batch_fn.__name__, 't', p, b),
                                rng(seed, batch_fn.__name__, 'mask', p, b), t_min, ce)
            if c is not None and control_variate:
                est[b, p] = cv.correct(f, c).mean().item()
            else:
                est[b, p] = f.mean().item()
    tokens = np.array([min(batch_size, len(x) - b * batch_size) for b in range(nb)]) * x.size(1)
    return est, tokens, time.time() - t0, float(cv.beta())


@torch.no_grad()
def ar_nll(model, ids, autocast=contextlib.nullcontext()):
    """Next-token NLL of an autoregressive model. ids: (B, T) with T - 1 <= block_size.
    Returns (B, T - 1) float64: -log p(ids[:, i + 1] | ids[:, :i + 1])."""
    with autocast:
        logits = model(ids[:, :-1])                                        # (B, T - 1, V)
    return F.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction='none').double()


@torch.no_grad()
def gpt_exact(model, w, batch_size, autocast=contextlib.nullcontext()):
    """Exact NLL of a GPT on windows w (N, L + 1): (est (nb, 1), tokens (nb,), seconds)."""
    dev = next(model.parameters()).device
    t0 = time.time()
    est, tokens = [], []
    for b in range(0, len(w), batch_size):
        nll = ar_nll(model, w[b:b + batch_size].to(dev), autocast)          # (n, L)
        est.append([nll.mean().item()])
        tokens.append(nll.numel())
    return np.array(est), np.array(tokens), time.time() - t0


@torch.no_grad()
def mask_rate_curve(model, x, points, batch_size, seed, autocast=contextlib.nullcontext()):
    """Cross-entropy, argmax reconstruction accuracy and predictive entropy of the masked
    tokens when round(r L) positions are masked uniformly, at the mid-points r of `points`
    equal bins of [0, 1]. The NELBO is the area under the CE curve (Uria et al. 2014).
    x: (N, L). Returns a list of dicts, one per rate. A block model: round(r B) positions of
    every block of B, given the clean blocks before it (the vectorised pass); k = 1..B each once
    when B <= points (then the area is the discrete any-order bound's expectation)."""
    dev = next(model.parameters()).device
    N, L = x.shape
    B = sample.model_block_len(model)
    span = B or L                                                          # positions masked together
    out = []
    ks = [min(max(1, round((i + 0.5) / points * span)), span) for i in range(points)]
    for i, k_val in enumerate(range(1, span + 1) if B and B <= points else ks):
        sums = torch.zeros(3, dtype=torch.float64)
        count = 0
        for b in range(0, N, batch_size):
            xb = x[b:b + batch_size].to(dev)
            k = torch.full((xb.size(0) * L // span,), k_val)
            mask = random_k_mask(k, span, rng(seed, 'curve', i, b)).view(xb.shape).to(dev)
            clean = {'x0': xb} if B else {}
            with autocast:
                logits = model(torch.where(mask, model.cfg.mask_id, xb), mask_rate=torch.full(
                    (xb.size(0),), k_val / span, device=dev), select=mask.flatten().nonzero().squeeze(1),
                    **clean).float()  # (M, V)
            y = xb[mask]
            logp = F.log_softmax(logits, -1)
            sums += torch.stack([-logp.gather(1, y[:, None]).sum(), (logits.argmax(-1) == y).sum(),
                                 torch.special.entr(logp.exp()).sum()]).double().cpu()
            count += y.numel()
        ce, acc, ent = (sums / count).tolist()
        out.append({'mask_rate': k_val / span, 'ce': ce, 'accuracy': acc, 'entropy': ent, 'tokens': count})
    return out


def likelihood(model, objective, w, c, char, autocast=contextlib.nullcontext(), curve=True, ce=masked_ce):
    """Every likelihood figure of one model on windows w (N, L + 1); see the module docstring.
    ce: the run's script's masked_ce (Run.ops.masked_ce)."""
    res = {'windows': len(w), 'window_tokens': w.size(1) - 1}
    if objective == 'gpt':
        est, tokens, dt = gpt_exact(model, w, c.batch_size, autocast)
        res['exact'] = summarize(est, tokens, dt, 'exact', char)
        res['headline'] = 'exact'
        return res
    if c.passes < 2:
        raise UserError(f"--passes={c.passes}: at least 2 are needed for a confidence interval", EXIT_USAGE)
    x = w[:, 1:]
    B = sample.model_block_len(model)
    if B:  # block diffusion: its own bound (module docstring)
        res['block_len'] = B
    for name, fn, on in (('continuous', block_continuous_batch if B else continuous_batch, True),
                         ('discrete', block_discrete_batch if B else discrete_batch, c.discrete)):
        if on:
            est, tokens, dt, beta = monte_carlo(model, x, fn, c.passes, c.batch_size, c.seed, c.t_min,
                                                c.control_variate and name == 'continuous', autocast, ce)
            res[name] = summarize(est, tokens, dt, name, char)
            if name == 'continuous':
                res[name].update(t_min=c.t_min, control_variate=c.control_variate, beta=beta)
    res['headline'] = 'continuous'
    if curve and c.curve_points > 0:
        n = max(1, min(len(x), c.curve_tokens // x.size(1)))
        sub = x[torch.linspace(0, len(x) - 1, n).round().long().unique()]
        res['curve'] = mask_rate_curve(model, sub, c.curve_points, c.batch_size, c.seed, autocast)
        res['curve_area'] = float(np.mean([p['ce'] for p in res['curve']]))   # midpoint rule: ~ the NELBO
    return res

# -----------------------------------------------------------------------------
# sample quality: reference models, text statistics, MAUVE


class RefModel:
    """A reference autoregressive model: generative perplexity and MAUVE features.

    fwd(ids (B, T)) -> (logits (B, T, V), hidden (B, T, C)); encode(text) -> ids; bos: ids
    prepended before scoring (GPT-2's <|endoftext|>; none for a character model, whose first
    token is then not scored); same_vocab(meta): whether the evaluated model's ids can be used
    as they are (else samples are decoded to text and re-encoded)."""
    def __init__(self, name, fwd, encode, bos, block_size, same_vocab, device):
        self.name, self.fwd, self.encode, self.bos = name, fwd, encode, list(bos)
        self.block_size, self.same_vocab, self.device = block_size, same_vocab, device

    def to_ids(self, seqs, tokenizer, meta):
        """Token id lists of the evaluated model -> id lists of the reference model."""
        if self.same_vocab(meta):
            return [list(map(int, s)) for s in seqs]
        return [self.encode(tokenizer.decode(s, mask_str='')) for s in seqs]

    @torch.no_grad()
    def score(self, seqs):
        """seqs: lists of reference-model ids. Returns (nll (n,) summed over each sequence's
        scored tokens, counts (n,), features (n, C)). Sequences longer than block_size are
        scored in consecutive chunks (the context restarts each chunk); the features are the
        final hidden state at the last position of the first chunk (as MAUVE truncates)."""
        nll, counts, feats = np.zeros(len(seqs)), np.zeros(len(seqs), dtype=np.int64), [None] * len(seqs)
        full = [self.bos + list(s) for s in seqs]
        by_len = {}
        for i, s in enumerate(full):
            by_len.setdefault(len(s), []).append(i)
        bs = self.block_size
        for T, rows in by_len.items():
            if T < 2:
                continue
            ids = torch.tensor([full[i] for i in rows], device=self.device)   # (n, T)
            for j in range(0, T - 1, bs):
                chunk = ids[:, j:j + bs + 1]                                   # (n, <= bs + 1)
                logits, hidden = self.fwd(chunk[:, :-1])
                lp = F.cross_entropy(logits.float().transpose(1, 2), chunk[:, 1:], reduction='none')
                nll[rows] += lp.double().sum(1).cpu().numpy()
                counts[rows] += chunk.size(1) - 1
                if j == 0:
                    for r, f in zip(rows, hidden[:, -1].float().cpu().numpy()):
                        feats[r] = f
        if any(f is None for f in feats):
            raise UserError("a sample is too short to score with the reference model (fewer than 2 tokens)")
        return nll, counts, np.stack(feats)


def gpt_ref(path, device, autocast, trust=()):
    """A gpt.py run as the reference; its final-norm output (a forward hook) gives features."""
    run = sample.load_run(path, device, trust=trust)
    model, ckpt = run.model, run.ckpt
    if ckpt['objective'] != 'gpt':
        raise UserError(f"--ref={path} holds a {ckpt['objective']} run; the reference must be autoregressive "
                        "(a gpt.py run folder, or gpt2 through transformers)")
    meta = ckpt['meta']
    tok = Tokenizer(meta)
    hidden = {}
    model.norm.register_forward_hook(lambda mod, inp, out: hidden.__setitem__('h', out))

    def fwd(ids):
        with autocast:
            logits = model(ids)
        return logits, hidden['h']

    def same_vocab(m):
        return all(m.get(k) == meta.get(k) for k in ('tokenizer', 'vocab_size', 'chars'))
    name = (f"gpt.py run {os.path.abspath(path)} (step {ckpt['step']}, {model.num_params() / 1e6:.2f}M parameters, "
            f"{meta['dataset']})")
    bos = [meta['eot_id']] if meta.get('eot_id') is not None else []
    return RefModel(name, fwd, tok.encode, bos, model.cfg.block_size, same_vocab, device)


def hf_ref(name, device):
    """A GPT-2 (or any causal LM with GPT-2's BPE) through transformers, from local files only."""
    try:
        import transformers
    except ImportError:
        raise UserError(f"--ref={name} needs the transformers package (pip install transformers) and "
                        "locally cached weights; or pass --ref=DIR, a gpt.py run folder") from None
    model_name = name[3:] if name.startswith('hf:') else name
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_name, local_files_only=True)
    except OSError as e:
        raise UserError(f"--ref={name}: no local weights for {model_name!r} ({str(e).splitlines()[0][:120]}); "
                        "download them once where there is network, or pass --ref=DIR (a gpt.py run)") from None
    model = model.to(device).eval()
    import tiktoken  # GPT-2's BPE: the same ids as the transformers tokenizer, no extra files
    enc = tiktoken.get_encoding('gpt2')

    def fwd(ids):
        out = model(ids, output_hidden_states=True)
        return out.logits, out.hidden_states[-1]

    def same_vocab(m):
        return m.get('tokenizer') == 'gpt2'
    n_ctx = getattr(model.config, 'n_positions', None) or getattr(model.config, 'max_position_embeddings', 1024)
    return RefModel(f"transformers {model_name}", fwd, enc.encode_ordinary, [enc.eot_token], n_ctx,
                    same_vocab, device)


def load_ref(spec, device, autocast, trust=()):
    """The reference model --ref names; trust: the --script files (sample.trusted_script)."""
    if not spec:
        return None
    if os.path.isdir(spec) or spec.endswith('.pt'):
        return gpt_ref(spec, device, autocast, trust)
    if spec in GPT2_NAMES or spec.startswith('hf:'):
        return hf_ref(spec, device)
    raise UserError(f"--ref={spec!r}: not a run folder; use a gpt.py run folder, gpt2[-medium|-large|-xl], "
                    "or hf:NAME_OR_PATH")


def unigram_entropy(seqs):
    """Mean over sequences of the entropy (nats) of each sequence's token histogram."""
    out = []
    for s in seqs:
        _, counts = np.unique(np.asarray(s), return_counts=True)
        p = counts / counts.sum()
        out.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(out))


def distinct_n(seqs, n):
    """Distinct n-grams over all n-grams of all sequences pooled (Li et al. 2016)."""
    grams = [tuple(s[i:i + n]) for s in seqs for i in range(len(s) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


def text_stats(seqs):
    seqs = [list(map(int, s)) for s in seqs]
    return {'entropy': unigram_entropy(seqs), 'distinct_1': distinct_n(seqs, 1), 'distinct_2': distinct_n(seqs, 2)}


def mauve_score(p_feats, q_feats, seed):
    """MAUVE of samples (p) against references (q) on precomputed features; None when
    mauve-text is not installed."""
    try:
        import mauve as mauve_lib
    except ImportError:
        return None
    out = mauve_lib.compute_mauve(p_features=p_feats, q_features=q_feats, seed=seed, verbose=False)
    return float(out.mauve)


def sampler_name(c):
    return c.sampler or sample.sampler


@torch.no_grad()
def run_sampler(model, objective, n, num, seed, c, tokenizer, schedule, script=None):
    """num samples of n tokens through sample.frames (sample i seeded seed + i). Returns tokens
    (num, n), the prompt stripped, and the reverse process's statistics: per step, the fraction
    of positions whose token changed, and of those that changed from one real token to another
    (revisions; zero for samplers that never remask)."""
    mask_id = model.cfg.mask_id
    prompt = [] if objective == 'diffusion' else [tokenizer.eot_id if tokenizer.eot_id is not None else 0]
    opts = {k: c[k] for k in SAMPLER_OPTIONS} if objective == 'diffusion' else {}
    stats, prev, change, revise, x = {'nfe': 0}, None, [], [], None
    t0 = time.time()
    for _, x, _ in sample.frames(model, objective, prompt, n, num_samples=num, sampler=sampler_name(c),
                                 steps=c.steps, temperature=c.temperature, top_k=c.top_k,
                                 top_p=c.top_p, seed=seed, stats=stats, schedule=schedule, script=script,
                                 **opts):
        if objective == 'diffusion':
            before = prev if prev is not None else torch.full_like(x, mask_id)
            changed = x != before                                      # (num, n)
            change.append(changed.float().mean().item())
            revise.append((changed & (before != mask_id)).float().mean().item())
            prev = x.clone()
    dt = time.time() - t0
    return x[:, len(prompt):].cpu(), {'nfe': stats['nfe'], 'seconds': dt, 'tokens_per_s': num * n / max(dt, 1e-9),
                                      'change_rate_per_step': change, 'revision_rate_per_step': revise}


def sample_quality(model, objective, meta, data, ref, c, schedule=None, script=None):
    """Sample quality averaged over sample_seeds seeds; the same text figures for length-matched
    validation windows ('data') as the yardstick."""
    tok = Tokenizer(meta)
    n = model.cfg.block_size
    res = {'num_samples': c.num_samples, 'seeds': c.sample_seeds, 'tokens_per_sample': n,
           'sampler': sampler_name(c) if objective == 'diffusion' else 'left-to-right',
           'steps': c.steps if objective == 'diffusion' else n, 'reference': ref.name if ref else None,
           'mauve_features': None, 'notes': [], 'per_seed': []}
    if ref is None:
        res['notes'].append("no --ref: no generative perplexity or MAUVE (pass --ref=DIR of a gpt.py run, or gpt2)")
    want_mauve = c.mauve and ref is not None
    if want_mauve and importlib.util.find_spec('mauve') is None:
        want_mauve = False
        res['notes'].append("MAUVE skipped: mauve-text is not installed (pip install mauve-text)")
    elif want_mauve:
        res['mauve_features'] = f"final hidden state at the last token, {ref.name}"
    for s in range(c.sample_seeds):
        sd = c.seed + s * c.num_samples       # sample i of the batch uses sd + i: no seed twice
        toks, info = run_sampler(model, objective, n, c.num_samples, sd, c, tok, schedule, script)
        refs = data.batch(c.num_samples, n, rng(c.seed, 'refs', s))       # (num, n) real text
        rec = {'seed': sd, 'nfe': info['nfe'], 'seconds': info['seconds'], 'tokens_per_s': info['tokens_per_s'],
               'samples': text_stats(toks.tolist()), 'data': text_stats(refs.tolist())}
        if objective == 'diffusion':
            rec['change_rate_per_step'] = info['change_rate_per_step']
            rec['revision_rate_per_step'] = info['revision_rate_per_step']
        if ref is not None:
            feats = {}
            for key, seqs in (('samples', toks.tolist()), ('data', refs.tolist())):
                nll, cnt, feats[key] = ref.score(ref.to_ids(seqs, tok, meta))
                rec[key]['gen_ppl'] = math.exp(nll.sum() / cnt.sum())
                rec[key]['nats_per_sample'] = (nll / cnt).tolist()   # per token, each sample's
            if want_mauve:
                rec['mauve'] = mauve_score(feats['samples'], feats['data'], sd)
        if s == 0:
            res['examples'] = [tok.decode(t) for t in toks[:2].tolist()]
        res['per_seed'].append(rec)
    # mean and standard deviation over the seeds
    seeds = res['per_seed']
    res['mean'], res['sd'] = {}, {}
    figures = {f'{who}_{k}': [r[who][k] for r in seeds] for who in ('samples', 'data') for k in seeds[0][who]}
    if want_mauve:
        figures['mauve'] = [r['mauve'] for r in seeds]
        if c.num_samples < 100:
            res['notes'].append(f"MAUVE from {c.num_samples} samples per seed is a rough figure (k-means on so few "
                                "points; Pillutla et al. use thousands): raise --num_samples for a firm one")
    for k, v in figures.items():
        if k.endswith('nats_per_sample'):
            continue
        res['mean'][k] = float(np.mean(v))
        res['sd'][k] = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
    if ref is not None:  # gen PPL's 95% CI over all the samples (each sample one draw of the sampler)
        res['gen_ppl_ci'] = sample_ppl_ci([x for r in seeds for x in r['samples']['nats_per_sample']])
    if objective == 'diffusion':  # per reverse step, averaged over seeds (frames per run may differ)
        for key in ('change_rate_per_step', 'revision_rate_per_step'):
            runs = [r[key] for r in seeds]
            res[key] = [float(np.mean([run[i] for run in runs if i < len(run)])) for i in range(max(map(len, runs)))]
    return res


def seed_block(lik, samples):
    """The micro-dLLM seed's validation block, gathered from the other sections: masked
    reconstruction accuracy and predictive entropy per timestep (mask rate t of the uniform
    process), reverse-step token change rate, distinct-2."""
    out = {}
    if 'curve' in lik:
        cv = lik['curve']
        out['mask_rate'] = [p['mask_rate'] for p in cv]
        out['accuracy_per_t'] = [p['accuracy'] for p in cv]
        out['entropy_per_t'] = [p['entropy'] for p in cv]
        out['ce_per_t'] = [p['ce'] for p in cv]
        out['accuracy'] = float(np.mean(out['accuracy_per_t']))   # t ~ U[0, 1]: the mean over the grid
    if samples and samples.get('change_rate_per_step'):
        out['change_rate_per_step'] = samples['change_rate_per_step']
        out['change_rate'] = float(np.mean(samples['change_rate_per_step']))
        out['revision_rate'] = float(np.mean(samples['revision_rate_per_step']))
    if samples and 'samples_distinct_2' in samples.get('mean', {}):
        out['distinct_2'] = samples['mean']['samples_distinct_2']
    return out

# -----------------------------------------------------------------------------
# one run


def eval_json(path):
    """Where a checkpoint's figures are kept: RUN/eval.json for RUN/ckpt.pt (a run folder), and
    RUN/eval-best.json for RUN/best.pt (any other checkpoint file: eval-<its name>.json)."""
    f = ckpt_file(path)
    stem = os.path.splitext(os.path.basename(f))[0]
    return os.path.join(os.path.dirname(f) or '.', 'eval.json' if stem == 'ckpt' else f'eval-{stem}.json')


def evaluate_run(run_path, c, log=print):
    """Every figure for one checkpoint: a run folder (its ckpt.pt) or a checkpoint file of one
    (RUN/best.pt); writes eval_json(run_path). c: the settings (a dict)."""
    ckpt_path = ckpt_file(run_path)
    run_dir = os.path.dirname(ckpt_path) or '.'
    dev = resolve_device(c.device)
    autocast = autocast_for(dev, c.dtype)
    trust = sample.trust_list(c.script)
    run = sample.load_run(ckpt_path, dev, trust=trust)
    model, ckpt, path = run.model, run.ckpt, run.ckpt['path']
    objective, meta, cfg = ckpt['objective'], ckpt['meta'], ckpt['config']
    char = meta['tokenizer'] == 'char'
    L = model.cfg.block_size
    ddir = resolve_data_dir(ckpt, c.data_dir)
    dmeta = load_meta(ddir, cfg['dataset'])
    check_same_data(dict(dmeta, fingerprint=fingerprint(ddir, cfg['dataset'], dmeta)), meta, path)
    data = TokenData(ddir, cfg['dataset'], c.split, dmeta)
    res = {'run': os.path.abspath(run_dir), 'objective': objective, 'ckpt_step': ckpt['step'],
           'checkpoint': os.path.abspath(ckpt_path), 'ckpt_mtime': os.path.getmtime(ckpt_path),
           'schedule': cfg.get('schedule') if objective == 'diffusion' else None,
           'masking': cfg.get('masking') if objective == 'diffusion' else None,
           'block_len': sample.model_block_len(model),
           'params': model.num_params(), 'dataset': cfg['dataset'], 'tokenizer': meta['tokenizer'],
           'settings': {k: c[k] for k in EVAL_KEYS}, 'device': str(dev), 'time': time.strftime('%Y-%m-%d %H:%M:%S'),
           'notes': []}
    log(f"evaluating {run_dir}: {objective}, step {ckpt['step']}, {model.num_params() / 1e6:.2f}M parameters, "
        f"on {dev}")
    want_samples = c.num_samples > 0 and c.sample_seeds > 0
    ref_model = load_ref(c.ref, dev, autocast, trust) if want_samples else None   # fail early on a bad --ref
    w = split_windows(data, L, c.max_tokens)
    ce = run.ops.masked_ce   # the run's script's own (a copy's edit included)
    res['likelihood'] = likelihood(model, objective, w, c, char, autocast, ce=ce)
    res['likelihood'].update(split=c.split, data=os.path.join(ddir, cfg['dataset']))
    # zero-shot WikiText-2 for BPE models
    if c.wikitext and meta['tokenizer'] == 'gpt2':
        wmeta_path = os.path.join(ddir, 'wikitext2', 'meta.json')
        if os.path.exists(wmeta_path):
            wmeta = load_meta(ddir, 'wikitext2')
            check_same_data(wmeta, dict(meta, fingerprint=None), path)
            wsplit = 'test' if 'test' in wmeta.get('splits', {}) else 'val'
            wdata = TokenData(ddir, 'wikitext2', wsplit, wmeta)
            res['wikitext2'] = likelihood(model, objective, split_windows(wdata, L, c.max_tokens), c, False,
                                          autocast, curve=False, ce=ce)
            res['wikitext2']['split'] = wsplit
        else:
            res['notes'].append(f"WikiText-2 skipped: not prepared at {os.path.join(ddir, 'wikitext2')} "
                                "(python prepare.py --dataset=wikitext2)")
    elif c.wikitext and char:
        res['notes'].append("WikiText-2 skipped: character-level model (zero-shot WikiText-2 is for GPT-2 BPE models)")
    # sample quality and the seed's validation block
    samples = None
    if want_samples:
        samples = sample_quality(model, objective, meta, data, ref_model, c, getattr(run.objective, 'schedule', None),
                                 run.script)
        res['samples'] = samples
    if objective == 'diffusion':
        res['seed_block'] = seed_block(res['likelihood'], samples)
    res['training'] = {k: v for k, v in training_log(run_dir).items() if k not in ('train', 'val')}
    write_json(res, eval_json(ckpt_path))
    return res

# -----------------------------------------------------------------------------
# the readable summary


def fmt_est(e):
    return (f"{e['nats']:.4f} ± {e['ci95']:.4f} nats/token | {e['bits']:.4f} ± {e['bits_ci95']:.4f} {e['bits_unit']} "
            f"| PPL {e['ppl']:.3f} [{e['ppl_lo']:.3f}, {e['ppl_hi']:.3f}] | {e['tokens_per_s']:,.0f} tokens/s")


def describe_likelihood(lik, title):
    lines = [f"{title}: {lik['windows'] * lik['window_tokens']:,} tokens in {lik['windows']:,} windows of "
             f"{lik['window_tokens']}"]
    labels = {'continuous': f"NELBO, continuous t (t in [{lik.get('continuous', {}).get('t_min', 0):g}, 1])",
              'discrete': "NELBO, discrete any-order (k ~ U{1..L})", 'exact': "exact NLL (autoregressive)"}
    if lik.get('block_len'):
        B = lik['block_len']
        labels = {'continuous': f"block NELBO (BD3-LM, blocks of {B}, the text before each as context), continuous t "
                                f"(one per block, in [{lik.get('continuous', {}).get('t_min', 0):g}, 1])",
                  'discrete': f"block NELBO, discrete any-order (k ~ U{{1..{B}}} per block)"}
    for key in ('continuous', 'discrete', 'exact'):
        if key in lik:
            e = lik[key]
            extra = f", {e['passes']} passes, CI ±{100 * e['rel_ci95']:.2f}%" if key != 'exact' else ''
            lines.append(f"  {labels[key]}{extra}:\n    {fmt_est(e)}")
    if 'curve' in lik:
        where = ' in every block' if lik.get('block_len') else ''
        lines.append(f"  by mask rate r (exactly round(rL) tokens masked{where}): CE nats | accuracy | predictive "
                     "entropy nats")
        for p in lik['curve']:
            lines.append(f"    r={p['mask_rate']:.3f}  {p['ce']:.4f}  {p['accuracy']:.3f}  {p['entropy']:.4f}")
        lines.append(f"    area under the CE curve (midpoint rule, {len(lik['curve'])} rates): {lik['curve_area']:.4f} "
                     "nats/token, a coarse third estimate of the NELBO")
    return lines


def summary_text(res):
    lines = [f"== {res['run']}",
             f"{res['objective']}" + (f" (block diffusion, block_len {res['block_len']})" if res.get('block_len')
                                      else '') +
             (f", schedule {res['schedule']}, masking {res['masking']}" if res['objective'] == 'diffusion' else '') +
             f", step {res['ckpt_step']}, {res['params'] / 1e6:.2f}M parameters, {res['dataset']}"]
    lik = res['likelihood']
    lines += describe_likelihood(lik, f"likelihood on {lik['data']} [{lik['split']}] (uniform masking whatever "
                                 "the training schedule; 95% CI = Monte Carlo error)")
    if 'wikitext2' in res:
        lines += describe_likelihood(res['wikitext2'], f"zero-shot WikiText-2 [{res['wikitext2']['split']}]")
    s = res.get('samples')
    if s:
        lines.append(f"samples: {s['num_samples']} x {s['tokens_per_sample']} tokens x {s['seeds']} seeds, sampler "
                     f"{s['sampler']}, {s['steps']} steps; reference: {s['reference'] or 'none'}")
        if s['mauve_features']:
            lines.append(f"  MAUVE features: {s['mauve_features']}")
        m, sd = s['mean'], s['sd']
        cols = [('gen_ppl', 'gen PPL'), ('entropy', 'entropy'), ('distinct_1', 'distinct-1'),
                ('distinct_2', 'distinct-2')]
        lines.append('  ' + f"{'':10}" + ''.join(f"{h:>20}" for _, h in cols))
        for who in ('samples', 'data'):
            cells = [f"{m[f'{who}_{k}']:.3f} ± {sd[f'{who}_{k}']:.3f}" if f'{who}_{k}' in m else 'n/a'
                     for k, _ in cols]
            lines.append('  ' + f"{who:10}" + ''.join(f"{x:>20}" for x in cells))
        if 'mauve' in m:
            lines.append(f"  MAUVE (samples vs length-matched {res['likelihood']['split']} text): "
                         f"{m['mauve']:.4f} ± {sd['mauve']:.4f}")
        lines += [f"  note: {n}" for n in s['notes']]
        for i, ex in enumerate(s.get('examples', [])[:1]):
            lines.append(f"  example: {ex[:240]!r}")
    sb = res.get('seed_block')
    if sb:
        parts = []
        if 'accuracy' in sb:
            parts.append(f"masked reconstruction accuracy {sb['accuracy']:.4f} (mean over t)")
            parts.append("predictive entropy per t " + ' '.join(f"{e:.2f}" for e in sb['entropy_per_t']))
        if 'change_rate' in sb:
            parts.append(f"reverse-step token change rate {sb['change_rate']:.4f} "
                         f"(revisions {sb['revision_rate']:.4f})")
        if 'distinct_2' in sb:
            parts.append(f"distinct-2 {sb['distinct_2']:.4f}")
        lines.append("seed validation block: " + '; '.join(parts))
    tr = res.get('training', {})
    if tr.get('last_val_loss') is not None:
        lines.append(f"training log (step {tr['last_val_step']}): val_loss {tr['last_val_loss']:.4f}" +
                     (f", val_nelbo {tr['last_val_nelbo']:.4f}" if tr.get('last_val_nelbo') is not None else '') +
                     " (training's own estimate; the figures above are the comparable ones)")
    lines += [f"note: {n}" for n in res['notes']]
    return '\n'.join(lines)

# -----------------------------------------------------------------------------
# comparison across runs


def fold_compare(argv):
    """`--compare DIR1 DIR2 ...` -> `--compare=DIR1,DIR2,...`, so configure stays the only parser."""
    out, runs, collecting, seen = [], [], False, False
    for a in argv:
        if a == '--compare':
            collecting, seen = True, True
        elif collecting and not a.startswith('--') and not a.endswith('.py'):
            runs.append(a)
        else:
            collecting = False
            out.append(a)
    if seen:
        if not runs:
            raise UserError("--compare needs run folders: --compare DIR1 DIR2 ... (or --compare='out/*')", EXIT_USAGE)
        out.append('--compare=' + ','.join(runs))
    return out


def compare_dirs(spec):
    """Run folders (with ckpt.pt) named by a comma-separated list of paths or globs."""
    dirs = []
    for item in filter(None, (s.strip() for s in spec.split(','))):
        hits = sorted(glob.glob(item)) if glob.has_magic(item) else [item]
        hits = [h for h in hits if os.path.exists(ckpt_file(h))]
        if not hits:
            raise UserError(f"--compare: no run folder with a ckpt.pt at {item!r}")
        dirs += [h for h in hits if h not in dirs]
    return dirs


def cached_or_evaluate(run_dir, c, explicit, log=print):
    """eval.json when it matches the checkpoint's step and every setting given explicitly."""
    path = os.path.join(run_dir, 'eval.json')
    if not c.recompute and os.path.exists(path):
        with open(path) as f:
            try:
                res = jsonlib.load(f)
            except ValueError:
                res = None
        step = read_checkpoint(run_dir)['step']
        if res and 'likelihood' in res and res.get('ckpt_step') == step and \
                res.get('ckpt_mtime') == os.path.getmtime(ckpt_file(run_dir)) and all(
                res.get('settings', {}).get(k) == c[k] for k in explicit if k in EVAL_KEYS):
            log(f"{run_dir}: using eval.json of {res.get('time')} (step {step})")
            return res
    return evaluate_run(run_dir, c, log)


def run_compare(c, explicit, log=print):
    """--compare: every run evaluated (or its current eval.json reused), then report.py's table and plots."""
    results = [cached_or_evaluate(d, c, explicit, log) for d in compare_dirs(c.compare)]
    return write_compare(results, c.report_dir or os.path.join('out', 'compare'), c.compare_plots, log)


RULES = {'split': one_of(('train', 'val', 'test')), 'max_tokens': at_least(0), 'batch_size': at_least(1),
         'passes': at_least(2), 't_min': in_range(0, 1, hi_open=True), 'curve_points': at_least(0),
         'curve_tokens': at_least(1), 'num_samples': at_least(0), 'sample_seeds': at_least(0),
         'sampler': one_of(('',) + sample.SAMPLERS), 'dtype': one_of(('auto', 'float32', 'bfloat16')),
         **{k: v for k, v in sample.RULES.items() if k in ('steps', 'temperature', 'top_k', 'top_p', *SAMPLER_OPTIONS)}}


def default_settings():
    """This script's settings plus sample.py's sampler options, with their defaults."""
    return dict(settings_of(globals()), **{k: getattr(sample, k) for k in SAMPLER_OPTIONS})


def main():
    c = configure(default_settings(), argv=fold_compare(sys.argv[1:]), rules=RULES, sources=[__file__, sample.__file__],
                  verbose=False)
    if c.compare:
        rows = run_compare(c, c.explicit)
        if c.json:
            write_json(rows, c.json)
        return
    if not c.out_dir:
        raise UserError("pass --out_dir=DIR (a run folder made by diffusion.py or gpt.py), or --compare DIR1 DIR2 ...",
                        EXIT_USAGE)
    res = evaluate_run(c.out_dir, c)
    print(summary_text(res))
    if c.json:
        write_json(res, c.json)
        print(f"wrote {c.json}")


if __name__ == '__main__':
    run_cli(main)
