"""
sample.py: generate text from any checkpoint (diffusion or GPT, told apart by the checkpoint).

    python sample.py --out_dir=out/diffusion-shakespeare_char-linear-uniform
    python sample.py --out_dir=DIR --sampler=remask --steps=32 --num_samples=4 --top_p=0.9
    python sample.py --out_dir=DIR --start="ROMEO:[MASK:40]
    JULIET:" --max_new_tokens=0                         # infill 40 tokens in place
    python sample.py --out_dir=out/gpt-shakespeare_char --start=FILE:prompt.txt --trace=gen.json

The sampling code lives here and is shared by diffusion.py (its end-of-training sample),
evaluate.py and visualize.py: frames() is the one entry point, a generator of
(step, tokens, changed). Diffusion samplers (each with temperature, top-k and top-p):

  confidence       the reference implementation's: a cosine count schedule says how many masked
                   positions to reveal per step; the most confident sampled tokens are revealed.
  ancestral        MDLM's reverse process (Sahoo et al. 2024, eq. 7) with the model's own noise
                   schedule: each masked token is revealed with probability
                   (alpha_s - alpha_t) / (1 - alpha_t) and drawn from the model, by Gumbel-max in
                   float64 (float32 Gumbel noise truncates the tail and lowers the effective
                   temperature: Zheng et al. 2024, "Masked diffusion models are secretly
                   time-agnostic masked models and exploit inaccurate categorical sampling").
                   Whatever is still masked at t = 0 (alpha(0) < 1) is sampled the same way
                   (--final_fill=argmax: greedily, the old behaviour).
  ancestral_cache  the same samples, but the forward pass is skipped when no token changed in
                   the previous step (the model is time-agnostic, so its output depends on the
                   tokens only: MDLM section 4.2). Identical output, fewer forward passes.
  remask           LLaDA's low-confidence remasking (Nie et al. 2025): a linear count schedule;
                   each step the masked positions with the highest confidence (max probability,
                   top-1 minus top-2 margin, or negative entropy: --remask_score) are revealed.
  threshold        Fast-dLLM's parallel decoding (Wu et al. 2025): every masked position whose
                   max probability exceeds --threshold is revealed, at least one per step (and
                   enough to finish within --steps).
  remdm            ReMDM (Wang et al. 2025): MDLM's reverse process, but already revealed tokens
                   are remasked with probability sigma_t, so later steps can correct them
                   (--remdm_mode=cap: sigma_t = min(eta, sigma_max); rescale: eta * sigma_max).

Block diffusion models (diffusion.py --block_len=L, BD3-LM: Arriola et al. 2025) generate block
by block, left to right: each block of L positions starts all MASK and is filled by the chosen
sampler in --steps steps (steps per block), seeing only itself and the finished blocks before it,
whose keys and values stay in a KV cache (diffusion.BlockContext: only the current block runs
through the model; a finished block enters the cache in the next block's first pass). A prompt
fills whole blocks of context and, when its length is not a multiple of L, fixed positions of the
first block generated; infilling works within a block (a [MASK] span sees the text to its left
and the rest of its block). Past block_size the window rolls by whole blocks: each block then
sees the last block_size - L tokens, prefilled again. The cache never changes the samples.

Longer than block_size (MDLM models): semi-autoregressive windows. The first window fills the block; each
later window keeps the last block_size - stride tokens of the text so far as its (fixed)
prefix and generates the next stride tokens. GPT slides its own window (gpt.generate).

Infilling: in --start, `[MASK]` is one token to fill and `[MASK:N]` is N tokens; everything
else stays as written. `[MASK]` rather than `_` because `_` is ordinary text for GPT-2 BPE;
the brackets are not in the Tiny Shakespeare character set either, so the placeholder cannot
collide with the text. Masked tokens print as `_`.

Every sample i of a batch draws its randomness from its own generator seeded with seed + i, so
a batch of N equals N single runs with seeds seed..seed+N-1, and runs are deterministic.
"""
import functools
import hashlib
import importlib.util
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import diffusion
from runtime import (EXIT_USAGE, Config, Tokenizer, UserError, at_least, atomic_write_text, build_model, configure,
                     fmt_time, in_range, one_of, print0, read_checkpoint, resolve_device, run_cli, settings_of)

# -----------------------------------------------------------------------------
out_dir = ''                    # run folder holding ckpt.pt (diffusion.py or gpt.py)
sampler = 'ancestral_cache'     # diffusion sampler: one of SAMPLERS (GPT checkpoints sample left to right)
steps = 64                      # diffusion denoising steps per window (MDLM) or per block (block diffusion)
num_samples = 1                 # samples, generated as one batch
max_new_tokens = -1             # tokens to append; -1 = fill the block after the prompt (0 if it has [MASK])
start = ''                      # prompt text with optional [MASK] / [MASK:N] spans, or FILE:path
temperature = 1.0               # 0 = greedy
top_k = 0                       # keep the k most likely tokens; 0 = all
top_p = 1.0                     # nucleus sampling mass in (0, 1]; 1.0 = all
seed = 1337                     # sample i of the batch uses seed + i
device = 'auto'                 # 'auto' | 'cpu' | 'cuda' | 'mps'
threshold = 0.9                 # threshold sampler: reveal positions whose max probability exceeds this
remask_score = 'max_prob'       # remask sampler confidence: 'max_prob' | 'margin' | 'neg_entropy'
remdm_mode = 'cap'              # remdm sigma_t: 'cap' (min(eta, sigma_max)) | 'rescale' (eta * sigma_max)
remdm_eta = 0.02                # remdm remasking strength eta
final_fill = 'sample'           # ancestral/remdm: masks left at t = 0 (alpha(0) < 1): 'sample' (like every step) | 'argmax'
stride = 0                      # new tokens per window after the first (long texts, MDLM); 0 = block_size // 2
trace = ''                      # write every frame (step, tokens, changed) to this .json file
script = ''                     # .py files you trust to rebuild the checkpoint (comma-separated): a copy outside this folder, or a changed one
# -----------------------------------------------------------------------------

SAMPLERS = ('confidence', 'ancestral', 'ancestral_cache', 'remask', 'threshold', 'remdm')
REMASK_SCORES = ('max_prob', 'margin', 'neg_entropy')
REMDM_MODES = ('cap', 'rescale')
SAMPLER_OPTIONS = ('schedule', 'threshold', 'remask_score', 'remdm_mode', 'remdm_eta', 'stride', 'final_fill')
FINAL_FILLS = ('sample', 'argmax')
PLACEHOLDER = re.compile(r'\[MASK(?::(\d+))?\]')   # [MASK] = 1 token, [MASK:N] = N tokens
RULES = {'sampler': one_of(SAMPLERS), 'remask_score': one_of(REMASK_SCORES), 'remdm_mode': one_of(REMDM_MODES), 'final_fill': one_of(FINAL_FILLS),
         'steps': at_least(1), 'num_samples': at_least(1), 'max_new_tokens': at_least(-1), 'temperature': at_least(0.0),
         'top_k': at_least(0), 'top_p': in_range(1e-9, 1), 'threshold': in_range(1e-9, 1), 'remdm_eta': at_least(0.0),
         'stride': at_least(0)}

# -----------------------------------------------------------------------------
# checkpoints come back through the script that made them (diffusion.py, gpt.py or a copy), under
# one trust rule: a checkpoint names a script, but only the user decides which code runs

HERE = os.path.dirname(os.path.realpath(__file__))   # the project's own folder


def sha256_of(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def trusted_script(ckpt, trust=()):
    """The file to rebuild a checkpoint with. weights_only keeps a checkpoint's pickle from running
    code, but the checkpoint also names the script that made it, and importing that runs it; so a
    recorded script is imported only when
      - it is a file in this project's folder (beside sample.py; a relative path is resolved
        there, never against the current folder) and its sha256 is the recorded one, or, for a
        project moved since, the file of the same name here has the recorded sha256; or
      - the user names it in trust (--script=PATH[,PATH...], matched by real path or file name),
        which also accepts a file changed since it wrote the checkpoint.
    Checkpoints from before scripts were recorded use this folder's diffusion.py or gpt.py.
    Anything else is a one-line UserError saying what to pass."""
    path = ckpt['path']
    info = ckpt.get('script')
    if info is None:  # made before checkpoints recorded their script
        if ckpt['objective'] not in ('diffusion', 'gpt'):
            raise UserError(f"{path} holds an unknown objective {str(ckpt['objective'])[:40]!r}")
        return os.path.join(HERE, f"{ckpt['objective']}.py")
    if not (isinstance(info, dict) and isinstance(info.get('path'), str) and info['path'].endswith('.py')
            and isinstance(info.get('sha256', ''), str)):
        raise UserError(f"{path} names its script as {str(info)[:80]!r}, not a .py file; if you trust a file to "
                        "rebuild it, pass --script=PATH")
    recorded = info['path']
    real = os.path.realpath(recorded if os.path.isabs(recorded) else os.path.join(HERE, recorded))
    for t in trust:
        if os.path.realpath(t) == real or os.path.basename(t) == os.path.basename(recorded):
            return t  # the user vouches for this file
    local = real if os.path.dirname(real) == HERE else os.path.join(HERE, os.path.basename(real))
    want = info.get('sha256')
    if os.path.dirname(real) == HERE:
        if not os.path.exists(real):
            raise UserError(f"{path} was made by {recorded}, which is gone; put that script back (or copy it "
                            "there) to use this checkpoint")
        if want and sha256_of(real) != want:
            raise UserError(f"{recorded} changed since it wrote {path}; if it still fits that checkpoint, pass "
                            f"--script={recorded}")
        return real
    if os.path.exists(local) and want and sha256_of(local) == want:
        return local  # the same script in this project (the project moved since)
    raise UserError(f"{path} was made by {recorded}, which is not in this project; if you trust that file, pass "
                    f"--script={recorded}")


def trust_list(spec):
    """--script=PATH[,PATH...] -> the paths, each checked to be a .py file."""
    paths = [p.strip() for p in spec.split(',') if p.strip()]
    for p in paths:
        if not (p.endswith('.py') and os.path.isfile(p)):
            raise UserError(f"--script={p}: no such .py file", EXIT_USAGE)
    return paths


def import_script(path):
    """The module of a script file (a copy of diffusion.py, say), imported once; its folder goes on
    sys.path so that a copied gpt.py finds the copied diffusion.py it imports. Only trusted_script's
    answer is ever passed here."""
    path = os.path.realpath(path)
    for mod in list(sys.modules.values()):
        if os.path.realpath(getattr(mod, '__file__', None) or '-') == path and mod.__name__ != '__main__':
            return mod
    name = os.path.splitext(os.path.basename(path))[0]
    if name in sys.modules:  # another file of the same name is loaded: keep both apart
        name = f"{name}_{hashlib.sha256(path.encode()).hexdigest()[:8]}"
    if os.path.dirname(path) not in sys.path:
        sys.path.append(os.path.dirname(path))
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except Exception as e:
        del sys.modules[name]
        raise UserError(f"cannot import {path}, the script that made this checkpoint ({type(e).__name__}: "
                        f"{str(e)[:100]})") from None
    return mod


@dataclass
class Run:
    """A checkpoint brought back by the script that trained it (see load_run)."""
    model: nn.Module        # the script's Transformer, weights loaded, in eval mode on the device
    ckpt: dict
    script: object          # the script's module (diffusion.py, gpt.py or a copy of either)
    objective: object       # the script's objective built with the run's settings: .schedule etc.

    @functools.cached_property
    def tokenizer(self):     # on first use: GPT-2 BPE needs tiktoken's files, which scoring does not
        return Tokenizer(self.ckpt['meta'])

    @property
    def ops(self):
        """The module whose samplers and loss pieces (generate, masked_ce, ...) this run uses: the
        script itself, or for a GPT script the diffusion module it imports."""
        return script_ops(self.script)


def script_ops(script):
    return script if hasattr(script, 'Transformer') else getattr(script, 'diffusion', diffusion)


def load_run(path, device='cpu', finite=True, trust=()):
    """A checkpoint's model and objective, rebuilt from the classes of the script that made it,
    chosen by trusted_script (trust: the files of --script). One-line errors when that script is
    not trusted, gone, changed so that it no longer fits, or the weights are not finite (a
    diverged run: use its best.pt)."""
    ckpt = read_checkpoint(path, device)
    path = ckpt['path']
    script = trusted_script(ckpt, trust)
    mod = import_script(script)
    try:
        models = script_ops(mod)   # a GPT script's model classes are its diffusion module's
        model = build_model(ckpt, models.ModelConfig, models.Transformer, path).to(device).eval()
        defaults = getattr(mod, 'DEFAULTS', None) or settings_of(vars(mod))  # gpt.py: DEFAULTS
        objective = mod.OBJECTIVE(Config(defaults, **ckpt['config']), ckpt['meta'])
    except Exception as e:
        if script not in trust:   # a script that has its recorded hash fits; a failure here is a bug
            raise
        changed = sha256_of(script) != (ckpt.get('script') or {}).get('sha256')
        how = f"changed since it wrote {path} and no longer fits it" if changed else f"does not fit {path}"
        raise UserError(f"{script} (--script) {how} ({type(e).__name__}: {str(e)[:120]})") from None
    if finite and not all(torch.isfinite(v).all() for v in ckpt['model'].values() if v.is_floating_point()):
        raise UserError(f"{path} holds non-finite weights (the run diverged); use the run's best.pt instead")
    return Run(model, ckpt, mod, objective)


def load_checkpoint(path, device='cpu', trust=()):
    """(model in eval mode on device, checkpoint dict), rebuilt by the script that made it."""
    run = load_run(path, device, trust=trust)
    return run.model, run.ckpt


def model_block_len(model):
    """A block diffusion model's block length; 0 for MDLM and GPT (and models from before block_len)."""
    return diffusion.block_len_of(getattr(model.cfg, 'block_len', 0), model.cfg.block_size)


# -----------------------------------------------------------------------------
# building blocks shared by the samplers


def confidence_score(logits, kind):
    """(M, V) logits -> (M,) confidence of the model's own distribution (temperature 1, unfiltered)."""
    logp = F.log_softmax(logits.double(), -1)
    p = logp.exp()
    if kind == 'max_prob':
        return p.max(-1).values
    if kind == 'margin':
        top2 = p.topk(2, dim=-1).values
        return top2[:, 0] - top2[:, 1]
    if kind == 'neg_entropy':
        return (p * logp.masked_fill(p == 0, 0)).sum(-1)
    raise UserError(f"remask_score={kind!r}: use one of {', '.join(REMASK_SCORES)}", EXIT_USAGE)


# -----------------------------------------------------------------------------
# diffusion samplers: each takes a window x (B, W) with MASK where tokens are wanted (every other
# position is context and never changes), updates a copy and yields (step, x, changed).
# gens: one generator per row. They share the signature so frames() can call any of them. ops: the
# run's script module (Run.ops), whose building blocks (all_logits, sample_categorical, generate, ...)
# they use, so that a copy's edit of those reaches every sampler.


@torch.no_grad()
def confidence_sampler(model, x, steps, gens, temperature=1.0, top_k=0, top_p=1.0, ops=diffusion, **_):
    """The reference implementation's sampler: a cosine count schedule decides how many masked
    positions stay masked after each step; the most confident of the sampled tokens are revealed
    (confidence = the model's probability of the sampled token)."""
    mask_id = model.cfg.mask_id
    x = x.clone()
    n0 = (x == mask_id).sum(1)                                          # (B,) masked at the start
    steps = max(1, min(steps, int(n0.max())))                           # more steps than tokens: idle passes
    for step in range(1, steps + 1):
        masked = x == mask_id                                           # (B, W)
        if not masked.any():
            break
        keep = torch.ceil(n0 * math.cos(math.pi / 2 * step / steps)).long()  # (B,) still masked after
        if step == steps:
            keep = torch.zeros_like(keep)  # cos(pi/2) is 6e-17, not 0: reveal everything at the end
        logits = ops.all_logits(model, x)                                      # (B, W, V)
        new = x.clone()
        for i, gen in enumerate(gens):
            pos = masked[i].nonzero().squeeze(1)                        # (M,)
            n = int(pos.numel() - keep[i])
            if n <= 0:
                continue
            tok = ops.sample_categorical(logits[i, pos], gen, temperature, top_k, top_p)
            conf = F.softmax(logits[i, pos], -1).gather(-1, tok[:, None]).squeeze(1)
            pick = conf.topk(n).indices
            new[i, pos[pick]] = tok[pick]
        changed = new != x
        x = new
        yield step, x, changed


def ancestral_sampler(model, x, steps, gens, ops=diffusion, **kw):
    """MDLM's reverse process: diffusion.generate, the sampler the training script itself uses."""
    return ops.generate(model, x, steps, gens, **dict(kw, cache=False))


def ancestral_cache_sampler(model, x, steps, gens, ops=diffusion, **kw):
    """The same samples with the forward pass skipped for rows that did not change."""
    return ops.generate(model, x, steps, gens, **dict(kw, cache=True))


def reveal_counts(n, steps):
    """LLaDA's linear count schedule: n tokens over `steps` steps, the remainder in the first
    steps: [n // steps + 1] * (n % steps) + [n // steps] * (steps - n % steps)."""
    return [n // steps + (1 if k < n % steps else 0) for k in range(steps)]


def reveal_most_confident(model, x, steps, gens, how_many, score, temperature, top_k, top_p, ops):
    """Each step, score every masked position, sample tokens at the how_many(i, step, conf) most
    confident ones and leave the rest masked. Shared by remask and threshold."""
    mask_id = model.cfg.mask_id
    for step in range(1, steps + 1):
        masked = x == mask_id
        if not masked.any():
            break
        logits = ops.all_logits(model, x)
        new = x.clone()
        for i, gen in enumerate(gens):
            pos = masked[i].nonzero().squeeze(1)
            if pos.numel() == 0:
                continue
            conf = confidence_score(logits[i, pos], score)
            n = min(how_many(i, step, conf), pos.numel())
            if n == 0:
                continue
            pick = pos[conf.topk(n).indices]
            new[i, pick] = ops.sample_categorical(logits[i, pick], gen, temperature, top_k, top_p)
        changed = new != x
        x = new
        yield step, x, changed


@torch.no_grad()
def remask_sampler(model, x, steps, gens, temperature=1.0, top_k=0, top_p=1.0, remask_score='max_prob', ops=diffusion,
                   **_):
    """LLaDA low-confidence remasking: predict every masked position, keep the reveal_counts[k]
    most confident ones and leave (remask) the rest. The confidence does not depend on the
    sampled token here, so tokens are drawn at the kept positions only."""
    mask_id = model.cfg.mask_id
    n0 = int((x == mask_id).sum(1).max())
    steps = max(1, min(steps, n0))
    counts = [reveal_counts(int(n), steps) for n in (x == mask_id).sum(1).tolist()]  # rows may differ (infill)
    yield from reveal_most_confident(model, x.clone(), steps, gens, lambda i, step, conf: counts[i][step - 1],
                                     remask_score, temperature, top_k, top_p, ops)


@torch.no_grad()
def threshold_sampler(model, x, steps, gens, temperature=1.0, top_k=0, top_p=1.0, threshold=0.9, ops=diffusion, **_):
    """Fast-dLLM confidence-threshold parallel decoding: reveal every masked position whose max
    probability exceeds `threshold`, and at least ceil(masked / steps left) of the most confident
    ones (so at least one per step, and the window is done within `steps`). With threshold 1.0
    and steps >= the masked count this reveals exactly one token per step."""
    steps = max(1, min(steps, int((x == model.cfg.mask_id).sum(1).max())))
    yield from reveal_most_confident(
        model, x.clone(), steps, gens,
        lambda i, step, conf: max(int((conf > threshold).sum()), math.ceil(conf.numel() / (steps - step + 1))),
        'max_prob', temperature, top_k, top_p, ops)


@torch.no_grad()
def remdm_sampler(model, x, steps, gens, schedule, temperature=1.0, top_k=0, top_p=1.0, remdm_mode='cap',
                  remdm_eta=0.02, final_fill='sample', ops=diffusion, **_):
    """ReMDM (Wang et al. 2025, eq. 5): from t to s, a token this window revealed is remasked with
    probability sigma_t and a masked token is revealed with probability
    (alpha_s - (1 - sigma_t) alpha_t) / (1 - alpha_t), where sigma_t <= sigma_max =
    min(1, (1 - alpha_s) / alpha_t) keeps both probabilities valid; sigma_t = 0 is MDLM.
    Context positions (prompt, previous window, infilling context) are never remasked."""
    if remdm_mode not in REMDM_MODES:
        raise UserError(f"remdm_mode={remdm_mode!r}: use one of {', '.join(REMDM_MODES)}", EXIT_USAGE)
    mask_id = model.cfg.mask_id
    alphas = schedule.alpha(ops.time_grid(steps)).tolist()
    x = x.clone()
    free = x == mask_id                                                 # (B, W) positions this window generates
    step = 0
    for step in range(1, steps + 1):
        masked = x == mask_id
        a_t, a_s = alphas[step - 1], alphas[step]
        sigma_max = min(1.0, (1 - a_s) / a_t) if a_t > 0 else 1.0
        sigma = min(remdm_eta, sigma_max) if remdm_mode == 'cap' else remdm_eta * sigma_max
        sigma = max(sigma, 0.0)
        p_reveal = min(max((a_s - (1 - sigma) * a_t) / (1 - a_t), 0.0), 1.0) if a_t < 1 else 1.0
        logits = ops.all_logits(model, x)
        new = x.clone()
        for i, gen in enumerate(gens):
            pos = masked[i].nonzero().squeeze(1)
            done = (free[i] & ~masked[i]).nonzero().squeeze(1)          # revealed by this window
            rev = pos[ops.uniform(pos.numel(), gen, x.device) < p_reveal]
            new[i, rev] = ops.sample_categorical(logits[i, rev], gen, temperature, top_k, top_p)
            new[i, done[ops.uniform(done.numel(), gen, x.device) < sigma]] = mask_id
        changed = new != x
        x = new
        yield step, x, changed
    masked = x == mask_id
    if masked.any():
        x = ops.fill_final(x, ops.all_logits(model, x), masked, gens, final_fill, temperature, top_k, top_p)
        yield step + 1, x, masked


SAMPLER_FNS = {'confidence': confidence_sampler, 'ancestral': ancestral_sampler,
               'ancestral_cache': ancestral_cache_sampler, 'remask': remask_sampler,
               'threshold': threshold_sampler, 'remdm': remdm_sampler}
assert tuple(SAMPLER_FNS) == SAMPLERS

# -----------------------------------------------------------------------------
# the entry point: prompt handling, long texts, GPT


def check_options(**opts):
    """frames()'s options checked by the same RULES as the command line's."""
    unknown = set(opts) - set(RULES) - set(SAMPLER_OPTIONS)
    if unknown:
        raise TypeError(f"frames() got unknown options {sorted(unknown)}; known: {', '.join(SAMPLER_OPTIONS)}")
    for k, v in opts.items():
        if k in RULES and not RULES[k][0](v):
            raise UserError(f"{k}={v!r}: must be {RULES[k][1]}", EXIT_USAGE)


def window_start(n, first_masked, block_size, stride):
    """Start of the next window over a sequence of n tokens whose first masked position is
    first_masked: keep block_size - stride tokens of context before it (fewer at the start),
    and never run past the end."""
    return max(0, min(first_masked - (block_size - stride), n - block_size))


def frames(model, objective, prompt, max_new_tokens, *, num_samples=1, sampler='ancestral_cache', steps=64,
           temperature=1.0, top_k=0, top_p=1.0, seed=1337, stats=None, script=None, **opts):
    """The one entry point every consumer uses (diffusion.py, evaluate.py, visualize.py).

    prompt: list of token ids; for diffusion it may contain model.cfg.mask_id (infilling), and
    max_new_tokens MASKs are appended. Yields (step, tokens, changed): tokens (num_samples, N)
    with MASK where not yet revealed (GPT: the tokens so far), changed (num_samples, N) bool.
    Sample i uses its own generator seeded seed + i. stats: optional dict; stats['nfe'] counts
    forward passes of the model (one batched call = 1). opts (diffusion): schedule (the
    run's objective.schedule, a diffusion.Schedule, for ancestral and remdm; default linear),
    threshold, remask_score, remdm_mode, remdm_eta, stride. script: the run's module (load_run's
    Run.script): its sampling code is used (a copy's edits included); None = this folder's."""
    check_options(sampler=sampler, steps=steps, num_samples=num_samples, temperature=temperature, top_k=top_k,
                  top_p=top_p, **opts)
    ops = script_ops(script) if script is not None else diffusion
    opts['schedule'] = opts.get('schedule') or ops.Schedule('linear')
    dev = next(model.parameters()).device
    gen_dev = 'cpu' if dev.type == 'mps' and objective != 'gpt' else dev  # MPS has no float64 (diffusion noise)
    gens = [torch.Generator(device=gen_dev).manual_seed(seed + i) for i in range(num_samples)]
    if stats is not None:
        stats.setdefault('nfe', 0)
        hook = model.register_forward_pre_hook(lambda *_: stats.__setitem__('nfe', stats['nfe'] + 1))
    try:
        if objective == 'gpt':
            yield from _gpt_frames(model, prompt, max_new_tokens, gens, temperature, top_k, top_p, script)
        else:
            yield from _diffusion_frames(model, prompt, max_new_tokens, gens, sampler, steps, temperature, top_k,
                                         top_p, dict(opts, ops=ops))
    finally:
        if stats is not None:
            hook.remove()


def _gpt_frames(model, prompt, max_new_tokens, gens, temperature, top_k, top_p, script=None):
    """GPT through gpt.generate (KV cache; the run's script's, a copy's included), row i sampling with gens[i]."""
    if script is not None and hasattr(script, 'generate'):
        generate = script.generate
    else:
        from gpt import generate
    dev = next(model.parameters()).device
    if model.cfg.mask_id in prompt:
        raise UserError("GPT generates left to right and cannot infill [MASK] spans; use a diffusion checkpoint",
                        EXIT_USAGE)
    x = torch.tensor([list(prompt) or [0]] * len(gens), device=dev)   # (B, P)
    yield from generate(model, x, max_new_tokens, temperature, top_k, top_p, gens)


def _diffusion_frames(model, prompt, max_new_tokens, gens, sampler, steps, temperature, top_k, top_p, opts):
    dev = next(model.parameters()).device
    cfg = model.cfg
    W = cfg.block_size
    stride_ = opts.pop('stride', 0) or W // 2
    if not 0 < stride_ <= W:
        raise UserError(f"stride={stride_}: must be in 1..block_size ({W})", EXIT_USAGE)
    seq = torch.tensor([list(prompt) + [cfg.mask_id] * max_new_tokens] * len(gens), device=dev)  # (B, N)
    if seq.numel() and (seq > cfg.mask_id).any():
        raise UserError(f"prompt holds token ids above the vocabulary ({cfg.mask_id} tokens)", EXIT_USAGE)
    fn = SAMPLER_FNS[sampler]
    if model_block_len(model):   # block diffusion: block by block, KV cache (module docstring)
        yield from opts['ops'].generate_blocks(model, seq, fn, steps, gens, temperature=temperature, top_k=top_k,
                                               top_p=top_p, **opts)
        return
    total = 0
    while True:
        masked = (seq == cfg.mask_id).any(0).nonzero()  # every row has the same masked positions here
        if masked.numel() == 0:
            break
        a = window_start(seq.size(1), int(masked[0]), W, stride_)
        done = total
        frames_w = fn(model, seq[:, a:a + W], steps, gens, temperature=temperature, top_k=top_k, top_p=top_p, **opts)
        for done, seq, changed in opts['ops'].in_window(frames_w, seq, a, total):
            yield done, seq, changed
        total = done


def generate_tokens(model, objective, prompt, max_new_tokens, **kw):
    """Run frames() to the end: (tokens (B, N), info) with info = {'nfe': forward passes,
    'steps': frames, 'seconds', 'tokens': tokens generated over the batch, 'tokens_per_s'}."""
    stats = {'nfe': 0}
    dev = next(model.parameters()).device
    t0, n_steps, x = time.time(), 0, None
    for n_steps, x, _ in frames(model, objective, prompt, max_new_tokens, stats=stats, **kw):
        pass
    if x is None:
        raise UserError("nothing to generate: pass max_new_tokens > 0 or a prompt with [MASK] spans", EXIT_USAGE)
    if dev.type == 'cuda':
        torch.cuda.synchronize(dev)
    dt = time.time() - t0
    n_new = x.size(0) * (max_new_tokens + (list(prompt).count(model.cfg.mask_id) if objective != 'gpt' else 0))
    return x, {'nfe': stats['nfe'], 'steps': n_steps, 'seconds': dt, 'tokens': n_new,
               'tokens_per_s': n_new / max(dt, 1e-9)}


class Progress:
    """Long texts: a line on stderr every `every` seconds with the tokens done and an ETA."""
    def __init__(self, objective, prompt, n_new, mask_id, every=10.0):
        self.objective, self.n_prompt, self.n_new, self.mask_id, self.every = objective, len(prompt), n_new, mask_id, every
        self.context = len(prompt) - list(prompt).count(mask_id)          # fixed tokens that are not new
        self.t0 = self.t_note = time.time()

    def update(self, x):
        """x: (B, N) the tokens so far (a frame of frames())."""
        now = time.time()
        if now - self.t_note < self.every:
            return
        done = x.size(1) - self.n_prompt if self.objective == 'gpt' else int((x[0] != self.mask_id).sum()) - self.context
        eta = (self.n_new - done) * (now - self.t0) / max(done, 1)
        print0(f"... {done}/{self.n_new} tokens in {fmt_time(now - self.t0)}, eta {fmt_time(eta)}", file=sys.stderr)
        self.t_note = now


def encode_prompt(tokenizer, text):
    """Text with [MASK] / [MASK:N] spans -> token ids with tokenizer.mask_id in the spans."""
    ids, pos = [], 0
    for m in PLACEHOLDER.finditer(text):
        ids += tokenizer.encode(text[pos:m.start()]) if m.start() > pos else []
        n = int(m.group(1) or 1)
        if n < 1:
            raise UserError(f"{m.group(0)}: a masked span needs at least one token", EXIT_USAGE)
        ids += [tokenizer.mask_id] * n
        pos = m.end()
    return ids + (tokenizer.encode(text[pos:]) if pos < len(text) else [])


def write_trace(path, tokenizer, recorded, meta):
    """Frames as JSON: {'meta': {...}, 'frames': [{'step', 'tokens': [[id, ...], ...] (MASK =
    meta['mask_id']), 'changed': [[position, ...], ...] per sample, 'text': [str, ...]}]}."""
    out = {'meta': meta, 'frames': [
        {'step': step, 'tokens': x.tolist(), 'changed': [row.nonzero().squeeze(1).tolist() for row in ch],
         'text': [tokenizer.decode(r) for r in x.tolist()]} for step, x, ch in recorded]}
    atomic_write_text(json.dumps(out), path)


def main():
    c = configure(globals(), rules=RULES, verbose=False)
    if not c.out_dir:
        raise UserError("pass --out_dir=DIR, a run folder made by diffusion.py or gpt.py", EXIT_USAGE)
    if c.trace and not os.path.isdir(os.path.dirname(os.path.abspath(c.trace))):
        raise UserError(f"--trace={c.trace}: folder {os.path.dirname(os.path.abspath(c.trace))} does not exist", EXIT_USAGE)
    run = load_run(c.out_dir, resolve_device(c.device), trust=trust_list(c.script))
    model, objective, tok = run.model, run.ckpt['objective'], run.tokenizer
    text = c.start
    if text.startswith('FILE:'):
        try:
            with open(text[5:], encoding='utf-8') as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read prompt file {text[5:]}: {getattr(e, 'strerror', None) or e}") from None
    prompt = encode_prompt(tok, text)
    infill = tok.mask_id in prompt
    if objective == 'gpt' and not prompt:
        prompt = [tok.eot_id if tok.eot_id is not None else 0]  # GPT needs one token to start from
    n = c.max_new_tokens
    if n < 0:  # auto: fill the block after the prompt (half a block past a long prompt); infill only
        n = 0 if infill else max(model.cfg.block_size - len(prompt), model.cfg.block_size // 2)
    kw = dict(num_samples=c.num_samples, sampler=c.sampler, steps=c.steps, temperature=c.temperature, top_k=c.top_k,
              top_p=c.top_p, seed=c.seed, threshold=c.threshold, remask_score=c.remask_score, remdm_mode=c.remdm_mode,
              remdm_eta=c.remdm_eta, stride=c.stride, final_fill=c.final_fill, schedule=getattr(run.objective, 'schedule', None),
              script=run.script)
    stats, recorded = {'nfe': 0}, []
    t0, x = time.time(), None
    n_new = n + (prompt.count(tok.mask_id) if infill else 0)
    progress = Progress(objective, prompt, n_new, tok.mask_id)
    for step, x, ch in frames(model, objective, prompt, n, stats=stats, **kw):
        if c.trace:
            recorded.append((step, x.cpu(), ch.cpu()))
        progress.update(x)
    if x is None:
        raise UserError("nothing to generate: pass --max_new_tokens > 0 or a prompt with [MASK] spans", EXIT_USAGE)
    dt = time.time() - t0
    for i in range(c.num_samples):
        print(tok.decode(x[i].tolist()))
        print('-' * 60)
    L = model_block_len(model)
    how = ('gpt (KV cache)' if objective == 'gpt' else f'block diffusion (block_len {L}) {c.sampler}, {c.steps} '
           'steps/block' if L else f'diffusion {c.sampler}, {c.steps} steps/window')
    print(f"{how}: {c.num_samples} x {n_new} tokens, NFE {stats['nfe']} forward passes, {dt:.2f} s, "
          f"{c.num_samples * n_new / max(dt, 1e-9):,.0f} tokens/s")
    if c.trace:
        write_trace(c.trace, tok, recorded, {'objective': objective, 'sampler': c.sampler if objective != 'gpt' else 'gpt',
                                             'steps': c.steps, 'seed': c.seed, 'mask_id': tok.mask_id,
                                             'prompt_len': len(prompt), 'nfe': stats['nfe'], 'seconds': dt})
        print(f"trace: {len(recorded)} frames -> {c.trace}")


if __name__ == '__main__':
    run_cli(main)
