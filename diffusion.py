"""
diffusion.py: a masked (absorbing-state) discrete diffusion language model in one file.

    python prepare.py                         # Tiny Shakespeare, character level
    python diffusion.py                       # train the default small model on CPU
    python diffusion.py --schedule=cosine     # any setting below is a --key=value
    python diffusion.py config/char_10m.py    # or a config file of `name = value` lines
    python diffusion.py --help                # every setting, its default, range and meaning

Top to bottom: settings, the settings parser (configure), the model (shared with gpt.py), the
noise schedules, masking rules and loss weightings (one registry each), the objective, data,
checkpoints, and one flat training loop (train) that gpt.py reuses with its own objective.
Copy this file to change any of them: a checkpoint records the script that made it, and
sample.py, evaluate.py and visualize.py rebuild the model and objective from that script.

Forward process (D3PM, Austin et al. 2021; MDLM, Sahoo et al. 2024): each token survives
with probability alpha(t), else becomes MASK. The model is trained with the continuous-time
negative ELBO (MDLM eq. 10), each masked token's cross-entropy weighted by
-alpha'(t) / (1 - alpha(t)). SUBS parameterisation: the MASK logit is -inf, and only masked
positions count in the loss.
"""
import ast
import contextlib
import ctypes
import difflib
import errno
import fcntl
import functools
import gc
import hashlib
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, asdict, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# settings: every lowercase global of type bool/int/float/str/None in this block is a
# setting that `--key=value` (or a config file) overrides; RULES below gives each its range.
# gpt.py takes the same ones except the diffusion block.
# I/O
out_dir = ''                    # run folder; '' = out/diffusion-<dataset>-<schedule>-<masking> (gpt.py: out/gpt-<dataset>)
init_from = 'scratch'           # 'scratch' (refuses to overwrite a run) | 'resume' | 'auto' (resume if out_dir has ckpt.pt)
eval_interval = 200             # steps between validation + checkpoint
eval_iters = 20                 # validation batches per evaluation; 0 = the whole validation split, in order
log_interval = 10               # steps between log lines
sample_at_end = True            # print a sample when training finishes
diverge_ratio = 3.0             # stop as diverged when val loss exceeds this multiple of the best so far (0 = off)
wandb_log = False               # also log to Weights & Biases (pip install wandb)
wandb_project = 'diffusion-lm'  # W&B project
wandb_run_name = ''             # W&B run name; '' = the out_dir's name
# data
dataset = 'shakespeare_char'    # folder under data_dir written by prepare.py
data_dir = 'data'               # where prepare.py writes datasets
batch_size = 32                 # sequences per micro-step per process
block_size = 128                # tokens per sequence
gradient_accumulation_steps = 0 # micro-steps per optimizer step over all DDP processes; 0 = one per process
train_tokens = 0                # train on the first N tokens of the train split only (data-constrained runs); 0 = all
# model (see ModelConfig)
n_layer = 4                     # transformer blocks
n_head = 4                      # attention heads
n_embd = 192                    # width
mlp = 'relu2'                   # MLP kind: one of MLPS below
tie_weights = False             # share token embedding and output head
dropout = 0.0                   # dropout probability (0 for pretraining)
time_cond = False               # condition on the mask rate (diffusion only; MDLM finds it unnecessary)
# diffusion (gpt.py has none of these)
schedule = 'linear'             # noise schedule alpha(t): one of SCHEDULES below
masking = 'uniform'             # which tokens get masked: one of MASKINGS below
entropy_file = ''               # .npy of per-token-id normalised entropy; '' = <data_dir>/<dataset>/entropy.npy
loss_weighting = 'nelbo'        # per-token loss weight: one of LOSS_WEIGHTINGS below
t_min = 1e-3                    # smallest t drawn: keeps the NELBO weight finite near t=0
block_len = 0                   # block diffusion (BD3-LM): tokens per block, divides block_size; 0 = MDLM
# optimizer: AdamW, linear warmup then cosine decay
learning_rate = 1e-3            # peak learning rate
max_iters = 1000                # optimizer steps in total (the default trains in ~6 min on 2 CPU cores)
warmup_iters = 100              # steps of linear warmup
lr_decay_iters = None           # step where the cosine reaches min_lr; None = max_iters
min_lr = None                   # final learning rate; None = learning_rate / 10
weight_decay = 0.1              # on 2-D weights only
beta1 = 0.9                     # AdamW beta1
beta2 = 0.99                    # AdamW beta2
grad_clip = 1.0                 # clip the global gradient norm; 0 = off
# system
device = 'auto'                 # 'auto' (cuda, then mps, then cpu) | 'cpu' | 'cuda' | 'cuda:1' | 'mps'
dtype = 'auto'                  # 'auto' (bfloat16 autocast on CUDA, float32 elsewhere) | 'float32' | 'bfloat16'
compile = False                 # torch.compile the model
backend = 'auto'                # DDP backend: 'auto' (nccl on CUDA, gloo on CPU) | 'nccl' | 'gloo'
seed = 1337                     # base seed; DDP rank r uses seed + r for its own randomness
# -----------------------------------------------------------------------------

EXIT_USAGE = 2        # bad settings
EXIT_DIVERGED = 3     # the loss went non-finite or exploded; the last good checkpoint is kept
EXIT_RESUMABLE = 75   # exit code after a signal-triggered save (EX_TEMPFAIL): "run me again"
DIFFUSION_ONLY = ('schedule', 'masking', 'entropy_file', 'loss_weighting', 't_min', 'time_cond', 'block_len')


class UserError(Exception):
    """A problem the user can fix; scripts print it as one line and exit with .code."""
    def __init__(self, msg, code=1):
        super().__init__(msg)
        self.code = code


def run_cli(main):
    """Run a script's main(); a UserError becomes one line on stderr (rank 0 only under torchrun)
    and its exit code. Matched by class name, so a copied script's UserError counts too."""
    try:
        main()
    except Exception as e:
        if not any(k.__name__ == 'UserError' for k in type(e).__mro__):
            raise
        if is_master():
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(getattr(e, 'code', 1))
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)


def is_master():
    return int(os.environ.get('RANK', 0)) == 0


def print0(*args, **kwargs):
    """print on DDP rank 0 only."""
    if is_master():
        print(*args, **kwargs, flush=True)

# -----------------------------------------------------------------------------
# configuration: configure(globals()) applies config files and --key=value overrides


class Config(dict):
    """Resolved settings with attribute access (c.batch_size); .explicit: the keys the user set."""
    explicit = frozenset()

    def __getattr__(self, k):
        return self[k] if k in self else object.__getattribute__(self, k)

    def __setattr__(self, k, v):
        object.__setattr__(self, k, frozenset(v)) if k == 'explicit' else self.__setitem__(k, v)


def settings_of(g):
    """The settings in a module's globals: lowercase names bound to bool/int/float/str/None."""
    return {k: v for k, v in g.items() if k.islower() and not k.startswith('_') and type(v) in SETTING_TYPES}


SETTING_TYPES = (bool, int, float, str, type(None))


def shared_settings():
    """diffusion.py's settings minus the diffusion-only ones: gpt.py starts from these."""
    return {k: v for k, v in settings_of(globals()).items() if k not in DIFFUSION_ONLY}


def one_of(options):  # rules: (test, text); configure checks the values given against them
    return lambda v: v in options, 'one of ' + ', '.join(map(str, options))


def at_least(lo, optional=False):
    return lambda v: (optional and v is None) or (v is not None and v >= lo), f">= {lo}" + (" or None" * optional)


def in_range(lo, hi, hi_open=False):
    return (lambda v: lo <= v < hi if hi_open else lo <= v <= hi), f"in [{lo}, {hi}{')' if hi_open else ']'}"


def _value(key, value, default):
    """value (text from the command line, or a literal from a config file) as default's type."""
    kind = type(default)
    if isinstance(value, str) and kind not in (str, type(None)):
        low = value.lower()
        if kind is bool and low in ('true', '1', 'yes', 'on', 'false', '0', 'no', 'off'):
            return low in ('true', '1', 'yes', 'on')
        with contextlib.suppress(ValueError, SyntaxError):
            value = float(value) if kind is not bool else value   # 1e9 is fine for an int setting
    elif isinstance(value, str) and default is None:
        with contextlib.suppress(ValueError, SyntaxError):
            return ast.literal_eval(value)
    if kind is float and type(value) in (int, float):
        return float(value)
    if kind is int and type(value) is float and value.is_integer():
        return int(value)
    if default is None or type(value) is kind:
        return value
    raise UserError(f"--{key}={value!r}: expected {kind.__name__} like the default {default!r}", EXIT_USAGE)


def read_config_file(path):
    """A config file holds `name = literal` lines only; it is parsed, never executed."""
    try:
        tree = ast.parse(open(path).read(), path)
        return {n.targets[0].id: ast.literal_eval(n.value) for n in tree.body
                if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))}   # docstrings aside
    except OSError as e:
        raise UserError(f"cannot read config file {path}: {e.strerror}", EXIT_USAGE) from None
    except (SyntaxError, ValueError, AttributeError, IndexError):
        raise UserError(f"{path}: a config file may only hold `name = value` lines (values are literals)",
                        EXIT_USAGE) from None


def _closest(key, keys):
    def score(k):
        initials = ''.join(w[0] for w in k.split('_') if w)   # lr -> learning_rate
        return max(difflib.SequenceMatcher(None, key, k).ratio(), key == initials, 0.9 * k.startswith(key))
    return max(sorted(keys), key=score)


def print_help(keys, rules, sources):
    """Every setting with its default, its rule and the comment after it in the source."""
    doc = {}
    for path in sources:  # the first file that comments a setting wins
        for line in open(path):
            name, eq, rest = line.partition('=')
            if eq and name.strip().isidentifier() and not line[0].isspace() and '#' in rest:
                doc.setdefault(name.strip(), rest.split('#', 1)[1].strip())
    print(f"usage: python {os.path.basename(sys.argv[0])} [config.py ...] [--key=value ...]\n\nsettings:")
    for k, v in keys.items():
        print(f"  --{k}={v!r}" + (f"  [{rules[k][1]}]" if k in rules else '') + f"\n      {doc.get(k, '')}")


def configure(g, argv=None, rules=None, sources=None, verbose=True):
    """Override the settings in g (a script's globals(), or a dict of defaults) from config files
    and --key=value args: types follow the defaults, values must pass rules ({name: (test, text)}),
    an unknown key is an error naming the closest one. --help/-h lists the settings (comments
    from sources, the files that define them) and exits 0. Updates g; returns the Config."""
    argv = sys.argv[1:] if argv is None else argv
    keys, rules, explicit = settings_of(g), rules or {}, []
    if '--help' in argv or '-h' in argv:
        print_help(keys, rules, sources or [g['__file__']])
        sys.exit(0)
    for arg in argv:
        if arg.startswith('--'):
            key, eq, value = arg[2:].partition('=')
            items = [(key.replace('-', '_'), value if eq else None)]
        elif arg.endswith('.py'):
            items = read_config_file(arg).items()
        else:
            raise UserError(f"unexpected argument {arg!r}: use --key=value or a config file (--help lists the "
                            "settings)", EXIT_USAGE)
        for key, value in items:
            if key not in keys:
                raise UserError(f"unknown setting {key}; the closest valid one is --{_closest(key, keys)} "
                                "(--help lists them)", EXIT_USAGE)
            if value is None:  # --compile means --compile=true
                if type(keys[key]) is not bool:
                    raise UserError(f"{arg}: expected --{key}=value", EXIT_USAGE)
                value = True
            g[key] = _value(key, value, keys[key])
            test, text = rules.get(key, (lambda v: True, ''))
            if not test(g[key]):
                raise UserError(f"--{key}={g[key]!r}: must be {text}", EXIT_USAGE)
            explicit.append(key)
    cfg = Config(settings_of(g))
    cfg.explicit = explicit
    if verbose:
        print0('config: ' + ' '.join(f'{k}={v!r}' for k, v in cfg.items()))
    return cfg

# -----------------------------------------------------------------------------
# the model: one transformer for both objectives; only ModelConfig.causal differs (and block_len,
# for block diffusion)


@dataclass
class ModelConfig:
    vocab_size: int = 128       # embedding rows: real tokens + MASK, padded to a multiple of 64
    mask_id: int = 65           # MASK token id; ids >= mask_id (MASK and padding) are never predicted
    block_size: int = 256       # longest sequence (RoPE table length)
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    mlp: str = 'relu2'          # 'relu2' | 'swiglu'
    tie_weights: bool = False
    causal: bool = False        # True: GPT (attend left only); False: diffusion (attend everywhere)
    time_cond: bool = False     # add an embedding of the mask rate to every position
    dropout: float = 0.0
    block_len: int = 0          # block diffusion (BD3-LM): attention in blocks of this many positions; 0 = off


def padded_vocab(n_tokens, multiple=64):
    """Embedding rows for n_tokens real tokens + MASK, rounded up for fast matmuls."""
    return (n_tokens + 1 + multiple - 1) // multiple * multiple


class RMSNormFunction(torch.autograd.Function):
    """x / rms(x) * weight over the last dim, weight broadcast to x: (D,), or (2, 1, D) for q and k
    together. F.rms_norm's forward is one kernel, but its backward is autograd's chain of a dozen
    ops (pow, mean, rsqrt and theirs): the 17 norms of a small model took a tenth of its CPU step.
    Here: 3 passes over x forward, 6 backward. torch.compile traces it and fuses either way."""
    @staticmethod
    def forward(ctx, x, weight, eps):
        acc = torch.promote_types(x.dtype, torch.float32)                             # bf16 in fp32
        r = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=acc)               # (..., 1)
        r = r.square_().div_(x.size(-1)).add_(eps).rsqrt_().to(x.dtype)               # 1 / rms(x)
        w = weight.to(x.dtype)
        xhat = x * r                                                                   # (..., D)
        ctx.save_for_backward(xhat, r, w)
        return xhat * w

    @staticmethod
    def backward(ctx, g):
        xhat, r, w = ctx.saved_tensors
        gx_hat = g * xhat                                                              # (..., D)
        # d/dx of xhat = x r: r (h - xhat mean(h xhat)), h = g w the gradient at xhat
        dot = (gx_hat @ w)[..., None] if w.dim() == 1 else (gx_hat * w).sum(-1, keepdim=True)   # (..., 1)
        gx = torch.addcmul(g * w, xhat, dot, value=-1.0 / xhat.size(-1)).mul_(r)
        acc = torch.promote_types(g.dtype, torch.float32)                             # bf16 sums in fp32
        gw = gx_hat.flatten(0, g.dim() - w.dim() - 1).sum(0, dtype=acc).sum_to_size(w.shape)   # leading dims first
        return gx, gw, None


def rms_norm(x, weight, eps=1e-6):
    return RMSNormFunction.apply(x, weight, eps)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def rope_table(block_size, head_dim, base=10000.0):
    """Rotary position embeddings (Su et al. 2021), the two halves of a head rotated as pairs
    (x1_i, x2_i) by angle t / base^(2i/D): (cos, sin) of shape (block_size, head_dim), full width
    with sin's first half negated, the form apply_rope multiplies by."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(block_size, dtype=torch.float32), inv_freq)   # (T, D/2)
    return angles.cos().repeat(1, 2), torch.cat([-angles.sin(), angles.sin()], 1)


def apply_rope(x, cos, sin):
    """x: (B, T, ..., D); cos, sin: (T, D) from rope_table. [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]
    in three ops (a cat, a multiply and a multiply-add)."""
    shape = (x.size(1),) + (1,) * (x.dim() - 3) + (x.size(-1),)                    # (T, 1.., D)
    cos, sin = cos.view(shape).to(x.dtype), sin.view(shape).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.addcmul(x * cos, torch.cat([x2, x1], dim=-1), sin)


def block_len_of(block_len, block_size):
    """The block length a model or run works with: 0 (whole-sequence MDLM) for 0 or block_size."""
    return block_len if 0 < block_len < block_size else 0


def _block_mask(Tq, Tk, block_len, vectorised, device):
    """attend()'s mask for a block model: (Tq, Tk) bool, True where a query may attend a key, or
    None where every query may attend every key. See attend for the two layouts."""
    if vectorised:  # [x_t ; x_0], Tq = Tk = 2T, both halves at positions 0..T-1
        pos = torch.arange(Tk, device=device)
        blk, clean = (pos % (Tk // 2)) // block_len, pos >= Tk // 2
        bq, bk, cq, ck = blk[:, None], blk[None], clean[:, None], clean[None]
        return (((bq == bk) & (cq == ck))          # block diagonal: a block sees itself, in its own half
                | ((bk < bq) & ck & ~cq)           # offset block-causal: noisy block b sees clean blocks < b
                | ((bk <= bq) & ck & cq))          # block-causal: clean block b sees clean blocks <= b
    if (Tk - Tq) // block_len >= (Tk - 1) // block_len:
        return None   # the queries are all in the last block: they see every key (a cached block's usual call)
    q_block = (torch.arange(Tq, device=device) + Tk - Tq) // block_len   # queries are the last Tq positions
    return torch.arange(Tk, device=device)[None] // block_len <= q_block[:, None]


_cached_block_mask = functools.lru_cache(maxsize=256)(_block_mask)


def attend(q, k, v, causal, dropout_p=0.0, block_len=0, vectorised=False):
    """The one place where attention direction is decided. q: (B, H, Tq, D), k, v: (B, H, Tk, D).

    causal=False (diffusion): every position attends to every position.
    causal=True (GPT): position i attends to positions <= i. With a KV cache the Tq queries are
    the last Tq of the Tk positions, so the causal mask is aligned bottom-right.
    block_len > 0 (block diffusion, BD3-LM: Arriola et al. 2025), positions in blocks of block_len
    counted from 0. Plain layout (sampling, and any call with a KV cache, queries bottom-right
    aligned as for GPT): block-causal, a position sees its whole block and every earlier block.
    vectorised=True (training and evaluation: q, k, v over [x_t ; x_0], 2T positions, both halves
    at positions 0..T-1): a noisy block b sees itself (block diagonal) and the clean blocks < b
    (offset block-causal); a clean block b sees the clean blocks <= b (block-causal); no clean
    position sees a noisy one. The masks have static shapes and are built once per shape."""
    if block_len:
        build = _block_mask if torch.compiler.is_compiling() else _cached_block_mask   # compiled: folded in the graph
        allowed = build(q.size(-2), k.size(-2), block_len, vectorised, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p)
    Tq, Tk = q.size(-2), k.size(-2)
    if not causal or Tq == 1:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    if Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p)


class KVCache:
    """Keys and values of past positions, preallocated: (n_layer, B, H, max_len, D) each."""
    def __init__(self, cfg, batch_size, max_len, device, dtype):
        shape = (cfg.n_layer, batch_size, cfg.n_head, max_len, cfg.n_embd // cfg.n_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # positions filled; the model advances it after a forward pass

    def update(self, layer, k, v):
        T = k.size(2)
        self.k[layer, :, :, self.pos:self.pos + T] = k
        self.v[layer, :, :, self.pos:self.pos + T] = v
        return self.k[layer, :, :, :self.pos + T], self.v[layer, :, :, :self.pos + T]


class Attention(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.n_head, self.causal, self.layer = cfg.n_head, cfg.causal, layer
        self.block_len = block_len_of(cfg.block_len, cfg.block_size)
        self.head_dim = cfg.n_embd // cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.q_norm = RMSNorm(self.head_dim)  # QK-norm keeps attention logits bounded; forward applies
        self.k_norm = RMSNorm(self.head_dim)  # both weights in one rms_norm call
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin, cache=None, vectorised=False):
        B, T, C = x.shape
        qk, v = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).split([2, 1], dim=2)  # (B, T, 2 | 1, H, D)
        # QK-norm and RoPE on q and k together: half the ops of doing each on its own
        qk_weight = torch.stack([self.q_norm.weight, self.k_norm.weight])[:, None]  # (2, 1, D)
        q, k = apply_rope(rms_norm(qk, qk_weight, self.q_norm.eps), cos, sin).unbind(2)   # (B, T, H, D)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.squeeze(2).transpose(1, 2)     # (B, H, T, D)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        y = attend(q, k, v, self.causal, self.dropout if self.training else 0.0, self.block_len, vectorised)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


MLPS = ('relu2', 'swiglu')   # the kinds MLP knows


class ReLUSquared(torch.autograd.Function):
    """relu(h)^2 with a one-multiply backward, 2 relu(h) g: autograd's own (threshold, pow and
    its multiplies over the widest activation) costs a fifth of a small model's CPU step."""
    @staticmethod
    def forward(ctx, h):
        ctx.save_for_backward(h)
        return F.relu(h).square_()          # in place: one new (B, T, 4C) buffer, not two

    @staticmethod
    def backward(ctx, g):
        (h,) = ctx.saved_tensors
        return F.relu(h).mul_(g).mul_(2.0)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.kind = cfg.mlp
        if cfg.mlp == 'relu2':    # Primer (So et al. 2021): ReLU squared
            hidden = 4 * cfg.n_embd
            self.fc = nn.Linear(cfg.n_embd, hidden, bias=False)
        elif cfg.mlp == 'swiglu':  # Shazeer 2020; 8/3 width keeps the parameter count of 4x
            hidden = 64 * math.ceil(8 * cfg.n_embd / 3 / 64)
            self.fc = nn.Linear(cfg.n_embd, 2 * hidden, bias=False)
        else:
            raise ValueError(f"unknown mlp {cfg.mlp!r}: use one of {', '.join(MLPS)}")
        self.proj = nn.Linear(hidden, cfg.n_embd, bias=False)

    def forward(self, x):
        h = self.fc(x)
        if self.kind == 'relu2':
            h = ReLUSquared.apply(h)
        else:
            a, b = h.chunk(2, dim=-1)
            h = F.silu(a) * b
        return self.proj(h)


class Block(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.norm1, self.attn = RMSNorm(cfg.n_embd), Attention(cfg, layer)
        self.norm2, self.mlp = RMSNorm(cfg.n_embd), MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, cache=None, vectorised=False):
        x = x + self.drop(self.attn(self.norm1(x), cos, sin, cache, vectorised))
        return x + self.drop(self.mlp(self.norm2(x)))


def timestep_embedding(r, dim):
    """Sinusoidal features of the mask rate r in [0, 1]: (B,) -> (B, dim)."""
    freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, device=r.device) / (dim // 2))
    angles = 1000.0 * r.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class Transformer(nn.Module):
    """Token embedding, RoPE, pre-norm blocks with QK-norm, final RMSNorm, linear head.

    Takes a ModelConfig and nothing else: it never reads a script's settings."""
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.block_len = block_len_of(cfg.block_len, cfg.block_size)   # 0: not a block model
        assert cfg.n_embd % cfg.n_head == 0 and (cfg.n_embd // cfg.n_head) % 2 == 0
        assert 0 < cfg.mask_id < cfg.vocab_size
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.wte.weight
        self.time_mlp = (nn.Sequential(nn.Linear(256, cfg.n_embd), nn.SiLU(), nn.Linear(cfg.n_embd, cfg.n_embd))
                         if cfg.time_cond else None)
        cos, sin = rope_table(cfg.block_size, cfg.n_embd // cfg.n_head)
        self.register_buffer('rope_cos', cos, persistent=False)
        self.register_buffer('rope_sin', sin, persistent=False)
        # GPT-2 initialisation; residual projections scaled by 1/sqrt(2 n_layer)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith('proj.weight') else 0.02
                nn.init.normal_(p, mean=0.0, std=std)
            elif name.endswith('.bias'):
                nn.init.zeros_(p)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self):
        """Training FLOPs per token: 6 per matmul weight (forward + backward) plus attention
        scores and values over the whole block (PaLM appendix B). The head is counted at every
        position, although the diffusion loss evaluates it at masked positions only."""
        c = self.cfg
        matmul = sum(p.numel() for n, p in self.named_parameters() if p.dim() == 2 and n != 'wte.weight')
        if c.tie_weights:
            matmul += self.lm_head.weight.numel()
        if self.block_len:  # the vectorised pass: 2T positions per T tokens, each attending over 2T
            return 12 * matmul + 48 * c.n_layer * c.n_embd * c.block_size
        return 6 * matmul + 12 * c.n_layer * c.n_embd * c.block_size

    def forward(self, idx, mask_rate=None, cache=None, select=None, x0=None):
        """idx: (B, T) token ids. mask_rate: (B,) fraction masked, used when time_cond.
        cache: a KVCache to read and extend (positions continue from cache.pos).
        select: optional (K,) long, positions of the flattened (B * T) batch; then only those
        positions' logits are returned, (K, V): the head (a third of a 124M model's FLOPs) runs
        where the loss needs it, with a shape that does not depend on the data.
        x0: (B, T) clean tokens, for a block model's vectorised pass (BD3-LM training and
        evaluation): one pass over [idx ; x0], 2T positions with both halves at positions 0..T-1
        (attend: noisy block b sees itself and the clean blocks before it); only idx's positions
        reach the head. mask_rate may also be (B, T), per position of idx (x0's rate is 0).
        Returns logits (B, T, V) with -inf for MASK and padding ids."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.cfg.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.cfg.block_size}")
        vectorised = x0 is not None
        if vectorised:
            if not self.block_len or cache is not None:
                raise ValueError("x0 (the vectorised [x_t ; x_0] pass) is for block models, without a cache")
            idx = torch.cat([idx, x0], 1)                        # (B, 2T)
        x = self.wte(idx)                                        # (B, T, C)
        if self.time_mlp is not None:
            if mask_rate is None:
                raise ValueError("this model is time-conditioned: pass mask_rate")
            if mask_rate.dim() == 1 and not vectorised:
                x = x + self.time_mlp(timestep_embedding(mask_rate, 256))[:, None, :]
            else:  # a rate per position; the clean half of a vectorised pass is unmasked
                r = mask_rate if mask_rate.dim() == 2 else mask_rate[:, None].expand(B, T)
                r = torch.cat([r, torch.zeros_like(r)], 1) if vectorised else r
                x = x + self.time_mlp(timestep_embedding(r.flatten(), 256)).view(*r.shape, -1)
        x = self.drop(x)
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        if vectorised:
            cos, sin = torch.cat([cos, cos]), torch.cat([sin, sin])
        for block in self.blocks:
            x = block(x, cos, sin, cache, vectorised)
        if cache is not None:
            cache.pos += T
        if vectorised:
            x = x[:, :T]                                         # the noisy half
        x = self.norm(x)
        if select is not None:
            x = x.flatten(0, 1).index_select(0, select)          # (K, C)
        logits = self.lm_head(x)                                 # (..., V)
        # SUBS (MDLM): never predict MASK (nor the padding rows)
        return logits.masked_fill(self.invalid_ids(logits.device), float('-inf'))

    def invalid_ids(self, device):
        return torch.arange(self.cfg.vocab_size, device=device) >= self.cfg.mask_id


def filter_logits(logits, top_k=0, top_p=1.0):
    """Keep the top_k largest logits (0 = all) and the smallest set whose probability reaches
    top_p (1.0 = all); the rest become -inf. logits: (..., V). Used by every sampler."""
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float('-inf'))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs >= top_p     # mass before this token already reaches top_p
        drop[..., 0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float('-inf'))
    return logits

# -----------------------------------------------------------------------------
# the diffusion: noise schedules, masking rules and loss weightings, one registry each.
# To add one, write its function and add its name to the registry: the settings' allowed
# values (RULES), study.py and slurm_train.sh read the registries.


def _cos(t):
    return torch.cos(math.pi / 2 * t)


def _sin(t):
    return torch.sin(math.pi / 2 * t)


SCHEDULES = {  # name: (alpha(t), alpha'(t)), float64 tensors with t in [0, 1]
    'linear':         (lambda t: 1 - t,                          lambda t: -torch.ones_like(t)),
    'cosine':         (lambda t: _cos(t),                        lambda t: -math.pi / 2 * _sin(t)),
    'loglinear':      (lambda t: 1 - (1 - 1e-3) * t,             lambda t: torch.full_like(t, -(1 - 1e-3))),
    'sqrt':           (lambda t: 1 - torch.sqrt(t),              lambda t: -0.5 / torch.sqrt(t)),
    'clipped_cosine': (lambda t: 0.05 + 0.9 * _cos(t),           lambda t: -0.9 * math.pi / 2 * _sin(t)),
    'sigmoid':        (lambda t: torch.sigmoid(-10 * (t - 0.5)),
                       lambda t: -10 * torch.sigmoid(-10 * (t - 0.5)) * torch.sigmoid(10 * (t - 0.5))),
}
# Schedules whose endpoints are not alpha(0)=1, alpha(1)=0 cover only part of the mask-rate
# range [0, 1]; the NELBO as trained then leaves out the tokens masked below 1-alpha(0) (they are
# never scored: a reconstruction term) and above 1-alpha(1) (a prior term). loglinear leaves out
# mask rates above 0.999; clipped_cosine below 0.05 and above 0.95; sigmoid below 0.0067 and above
# 0.9933. evaluate.py scores every model with the full uniform-masking bound instead.


class Schedule:
    """alpha(t), alpha'(t) and the NELBO weight of one entry of SCHEDULES."""
    def __init__(self, name):
        if name not in SCHEDULES:
            raise UserError(f"unknown schedule {name!r}: use one of {', '.join(SCHEDULES)}", EXIT_USAGE)
        self.name = name
        self.alpha, self.dalpha = SCHEDULES[name]

    def weight(self, t):
        """The continuous-time NELBO weight -alpha'(t) / (1 - alpha(t)) (MDLM eq. 10)."""
        return -self.dalpha(t) / (1 - self.alpha(t))


def mask_uniform(x, alpha, objective):
    """Every token is masked with probability 1 - alpha. x: (B, T); alpha: (B,) -> (B, T) float64."""
    return (1 - alpha)[:, None].expand(x.shape)


def mask_entropy(x, alpha, objective):
    """Easy tokens (low entropy under a reference LM) are masked more: the rate 1 - alpha is scaled
    per token by clamp(2 - ent_norm, 0.5, 1.5), capped at 1 (prepare.py --entropy makes ent_norm)."""
    return ((1 - alpha)[:, None] * objective.entropy_weight(x.device)[x]).clamp(max=1.0)


MASKINGS = {'uniform': mask_uniform, 'entropy': mask_entropy}  # name: (x, alpha, objective) -> mask probs


def weight_nelbo(ce_sum, n_masked, t, schedule, t_min, T):
    """(1 - t_min) * w(t) * masked CE / T per sequence: the Monte Carlo NELBO estimate in nats per
    token over t in [t_min, 1] (MDLM eq. 10). Returns (loss, per-sequence values)."""
    per_seq = ((1 - t_min) * schedule.weight(t)).float().to(ce_sum.device) * ce_sum / T
    return per_seq.mean(), per_seq


def weight_masked_mean(ce_sum, n_masked, t, schedule, t_min, T):
    """The plain mean cross-entropy over masked tokens (the reference code's; not a bound)."""
    return ce_sum.sum() / n_masked.sum().clamp(min=1), ce_sum / n_masked.clamp(min=1)


LOSS_WEIGHTINGS = {'nelbo': weight_nelbo, 'masked_mean': weight_masked_mean}


def entropy_weights(ent_norm, vocab_size):
    """Per-token-id mask multipliers clamp(2 - ent_norm, 0.5, 1.5); 1 for MASK and padding."""
    w = torch.ones(vocab_size, dtype=torch.float64)
    w[:len(ent_norm)] = (2 - torch.as_tensor(ent_norm, dtype=torch.float64)).clamp(0.5, 1.5)
    return w


def load_entropy(path, n_tokens):
    """Read an entropy .npy (one value per token id of the dataset, mean 1); clear errors."""
    if not os.path.exists(path):
        raise UserError(f"no entropy file at {path}; make one with: python prepare.py --entropy "
                        f"--ref=OUT_DIR_OF_A_GPT_RUN (or pass --entropy_file=PATH)")
    try:
        arr = np.load(path, allow_pickle=False)
        ok = arr.ndim == 1 and np.issubdtype(arr.dtype, np.number)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read entropy file {path}: {str(e)[:100]}") from None
    if not ok or len(arr) != n_tokens:
        raise UserError(f"entropy file {path} holds {arr.dtype} of shape {arr.shape}; expected ({n_tokens},) "
                        "numbers, one per token id of the dataset's vocabulary")
    if not np.all(np.isfinite(arr)):
        raise UserError(f"entropy file {path} holds non-finite values")
    return arr

# -----------------------------------------------------------------------------
# forward process, loss and deterministic randomness


def rng(*key):
    """A torch.Generator seeded by a hash of key: randomness that is a pure function of
    (seed, purpose, step, micro-batch), so resume and DDP need no generator state."""
    h = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(h, 'little') >> 1)


def stratified_times(u0, start, count, total, t_min, stride=1):
    """Times for sequences start, start + stride, ... (count of them) of a global batch of `total`:
    one uniform offset u0 shared by the whole batch, then evenly spaced (low-variance, stratified),
    in [t_min, 1). With stride = the number of micro-batches, every micro-batch spans [t_min, 1]."""
    i = start + stride * torch.arange(count, dtype=torch.float64)
    u = torch.remainder(u0 + i / total, 1.0)
    return t_min + (1 - t_min) * u


def draw_mask(x, p, gen):
    """q(z_t | x): which positions of x (B, T) are MASK, each with probability p (B, T)."""
    return torch.rand(x.shape, generator=gen, dtype=torch.float64) < p.cpu()


def masked_ce(model, x, mask, mask_id, mask_rate=None, capacity=None, keys=None, block_len=0):
    """Replace x at mask with MASK, run the model, and return each sequence's summed cross-entropy
    over its masked positions: (B,) float32. Unmasked positions never count.

    capacity=None: the head runs at every masked position (a data-dependent shape: evaluation).
    capacity=K: it runs at K positions of the batch, a shape fixed in advance (compile-clean, no
    host sync): every masked position when there are at most K, padded with unmasked ones weighted
    0; else a uniform random K of the M masked ones (the smallest keys, (B, T) uniforms independent
    of the mask given it) weighted M / K, which keeps every sum unbiased (Horvitz-Thompson).

    block_len > 0 (a block model): the model also sees the clean x (its vectorised pass, x0=x),
    and the sums are per block: (B * T / block_len,), block by block within each sequence."""
    z = torch.where(mask, mask_id, x)                                   # (B, T)
    flat = mask.flatten()                                               # (B * T,)
    if capacity is None:
        idx, weight = flat.nonzero().squeeze(1), 1.0                    # (M,)
    elif capacity >= flat.numel():
        idx, weight = torch.arange(flat.numel(), device=x.device), flat.float()
    else:
        idx = torch.where(flat, keys.flatten(), 2.0).topk(capacity, largest=False).indices   # (K,) masked first
        weight = flat[idx] * (flat.sum() / capacity).clamp(min=1)      # (K,)
    if block_len:
        logits = model(z, mask_rate=mask_rate, select=idx, x0=x)        # (K, V)
    else:
        logits = model(z, mask_rate=mask_rate, select=idx)              # (K, V)
    ce = F.cross_entropy(logits.float(), x.flatten()[idx], reduction='none') * weight   # fp32
    per_position = torch.zeros(flat.shape, device=x.device).index_add(0, idx, ce)
    return per_position.view(-1, block_len).sum(1) if block_len else per_position.view(x.shape).sum(1)


def nelbo_terms(model, x, t, u, schedule, mask_id, t_min=0.0, masking='uniform', weighting='nelbo',
                objective=None, capacity=None):
    """The loss on clean tokens x (B, T) at times t (B,) with mask uniforms u (B, T) (both float64,
    on x's device): a token is masked when u < its masking probability. Pure tensor code with
    static shapes (given a capacity), so torch.compile takes it whole. Returns (loss, per_seq)."""
    alpha = schedule.alpha(t)                                           # (B,)
    p = MASKINGS[masking](x, alpha, objective)                          # (B, T)
    mask = u < p
    ce_sum = masked_ce(model, x, mask, mask_id, (1 - alpha).float(), capacity, keys=u / p)
    return LOSS_WEIGHTINGS[weighting](ce_sum, mask.sum(1), t, schedule, t_min, x.size(1))


def block_nelbo_terms(model, x, t, u, schedule, mask_id, block_len, t_min=0.0, masking='uniform',
                      weighting='nelbo', objective=None, capacity=None):
    """BD3-LM's loss (Arriola et al. 2025, eq. 8 and sec. 3.2), vectorised: x (B, T) in blocks of
    block_len, t (B * T / block_len,) one time per block (block by block within each sequence),
    u (B, T) as in nelbo_terms. Each block is masked and weighted as a sequence of its own, with
    the clean blocks before it as context: one pass of the model over [x_t ; x_0]. With the NELBO
    weighting a sequence's value is the sum over its blocks of each block's NELBO,
    (1 - t_min) w(t_b) x (masked CE of block b), divided by T; the loss is their mean. Static
    shapes like nelbo_terms. Returns (loss, per_seq)."""
    B, T = x.shape
    alpha = schedule.alpha(t)                                           # (B * nb,)
    p = MASKINGS[masking](x.reshape(-1, block_len), alpha, objective).reshape(B, T)
    mask = u < p
    rate = (1 - alpha).float()[:, None].expand(-1, block_len).reshape(B, T)   # each position's block's rate
    ce_sum = masked_ce(model, x, mask, mask_id, rate, capacity, keys=u / p, block_len=block_len)   # (B * nb,)
    loss, per_block = LOSS_WEIGHTINGS[weighting](ce_sum, mask.reshape(-1, block_len).sum(1), t, schedule, t_min,
                                                 block_len)
    return loss, per_block.view(B, -1).mean(1)   # mean over blocks of (per-block value / block_len) = sum / T


def diffusion_loss(model, x, t, schedule, mask_id, gen, t_min=0.0, masking='uniform', weighting='nelbo',
                   objective=None, capacity=None, block_len=0):
    """nelbo_terms with the mask uniforms drawn from gen (on the CPU, so that the draws are the same
    on every device) and t (B,) given on the CPU. Returns (loss, per_seq). block_len > 0:
    block_nelbo_terms, t (B * T / block_len,) one time per block."""
    u = torch.rand(x.shape, generator=gen, dtype=torch.float64)
    if block_len:
        return block_nelbo_terms(model, x, to_device(t, x.device), to_device(u, x.device), schedule, mask_id,
                                 block_len, t_min, masking, weighting, objective, capacity)
    return nelbo_terms(model, x, to_device(t, x.device), to_device(u, x.device), schedule, mask_id, t_min, masking,
                       weighting, objective, capacity)


def to_device(tensor, dev):
    """Host to device without stalling the device's queue (pinned memory, non-blocking copy)."""
    return tensor.pin_memory().to(dev, non_blocking=True) if dev.type == 'cuda' else tensor.to(dev)


def head_capacity(B, T, schedule, masking, t_min):
    """How many positions of a (B, T) micro-batch get the output head: the largest expected number
    of masked tokens over the offsets of stratified times spread over the micro-batch, plus 4
    standard deviations (more masked tokens than this are subsampled without bias: masked_ce).
    Entropy masking scales rates by up to 1.5."""
    s = torch.linspace(0, 1 / B, 65, dtype=torch.float64)[:, None]    # offsets of the B strata
    t = t_min + (1 - t_min) * torch.remainder(s + torch.arange(B, dtype=torch.float64) / B, 1.0)
    rate = (1 - schedule.alpha(t)) * (1.5 if masking != 'uniform' else 1.0)
    mean = float(rate.clamp(max=1).mean(1).max()) * B * T
    return min(B * T, math.ceil(mean + 4 * math.sqrt(B * T / 4)))


def batch_mean(values, sizes):
    """(mean, standard error) of per-batch values (a list of 0-d tensors) weighted by their
    sizes; the standard error from the batches' spread (nan for one batch). One sync, here."""
    v = torch.stack(values).double().cpu()
    w = torch.tensor(sizes, dtype=torch.float64)
    w = w / w.sum()
    mean, k = float((w * v).sum()), len(sizes)
    return mean, float((w ** 2 * (v - mean) ** 2).sum() * k / (k - 1)) ** 0.5 if k > 1 else float('nan')


def mask_count_cv(t, counts, T, t_min):
    """The control variate of the uniform-masking NELBO estimate, per sequence: (1 - t_min) x the
    sum over its times t (B, k) of w(t) x counts (B, k) / T - (1 - t_min), counts being the tokens
    masked at each t (k = 1, or one per block), w(t) = 1/t the linear schedule's weight. Its mean is
    exactly 0 (E[count] = t x tokens), and it carries the noise of how many tokens happened to be
    masked, which dominates the estimate at small t. Used in training (DiffusionObjective.evaluate)
    and by evaluate.py."""
    return (1 - t_min) * (counts / t).sum(1) / T - (1 - t_min)


class ControlVariate:
    """Estimates f - beta c with beta = cov(f, c) / var(c) fitted on the (f, c) pairs added before:
    never on the draws it corrects, so the estimate stays unbiased and successive estimates
    uncorrelated (Glasserman 2003, "Monte Carlo Methods in Financial Engineering", sec. 4.1).
    Running sums n, f, c, fc, cc kept on the device (no host sync)."""
    def __init__(self, device='cpu'):
        self.sums = torch.zeros(5, dtype=torch.float64, device=device)

    def beta(self):
        n, sf, sc, sfc, scc = self.sums
        n = n.clamp(min=1)
        var = scc - sc * sc / n
        return torch.where(var > 0, (sfc - sf * sc / n) / var.clamp(min=1e-30), 0.0)

    def correct(self, f, c):
        """f - beta c with the beta of the pairs so far (both (B,) float64); then adds these pairs."""
        out = f - self.beta() * c
        self.sums += torch.stack([torch.ones_like(self.sums[0]) * len(f), f.sum(), c.sum(), (f * c).sum(), (c * c).sum()])
        return out


class DiffusionObjective:
    """What makes this a diffusion LM; gpt.py's GPTObjective fills the same slots."""
    name = 'diffusion'
    causal = False          # difference 2: bidirectional attention

    def __init__(self, c, meta):
        self.c, self.meta = c, meta
        self.mask_id = meta['vocab_size']           # difference 1: the MASK token
        self.schedule = Schedule(c.schedule)
        self.uniform = Schedule('linear')
        self._ent_weight, self._ready, self._cv = None, False, None
        self.own_is_uniform = c.schedule == 'linear' and c.masking == 'uniform' and c.loss_weighting == 'nelbo'
        self.block_len = block_len_of(c.block_len, c.block_size)   # 0: MDLM; else BD3-LM block diffusion
        self.capacity = head_capacity(c.batch_size, c.block_size, self.schedule, c.masking, c.t_min)
        if c.compile:  # the whole loss, model included: static shapes, no host sync (tests/test_compile.py)
            self.compute = torch.compile(self.compute)

    def entropy_weight(self, device):
        """Per-token-id entropy multipliers (vocab,) on device, read once from the entropy file."""
        if self._ent_weight is None:
            path = self.c.entropy_file or os.path.join(self.c.data_dir, self.c.dataset, 'entropy.npy')
            n = self.meta['vocab_size']
            self._ent_weight = entropy_weights(load_entropy(path, n), padded_vocab(n))
        return self._ent_weight.to(device)

    def compute(self, model, x, t, u, own=True, capacity=None, per_seq=False):
        """difference 3 and 4: the NELBO over masked positions, from clean tokens x (B, T), times t
        (B,) and mask uniforms u (B, T) on the device; own=False: the uniform-masking NELBO.
        A block model: t (B * T / block_len,) one per block, and block_nelbo_terms.
        per_seq: each sequence's value (B,) instead of their mean."""
        if self.block_len:
            out = block_nelbo_terms(model, x, t, u, self.schedule if own else self.uniform, self.mask_id,
                                    self.block_len, self.c.t_min, self.c.masking if own else 'uniform',
                                    self.c.loss_weighting if own else 'nelbo', self, capacity or self.capacity)
        else:
            out = nelbo_terms(model, x, t, u, self.schedule if own else self.uniform, self.mask_id, self.c.t_min,
                              self.c.masking if own else 'uniform', self.c.loss_weighting if own else 'nelbo', self,
                              capacity or self.capacity)
        return out[1] if per_seq else out[0]

    def control_variate(self, t, u):
        """mask_count_cv (B,) of the uniform-masking draws (t, u) of compute(own=False)."""
        B, T = u.shape
        t = t.view(B, -1)                                               # (B, 1) or (B, blocks)
        counts = (u.view(B, t.size(1), -1) < (1 - self.uniform.alpha(t))[..., None]).sum(-1)   # (B, 1 or blocks)
        return mask_count_cv(t, counts, T, self.c.t_min)

    def draws(self, x, key, micro=0, micros=1):
        """(t (B,), u (B, T)) on x's device, keyed by (seed, *key, micro): micro-batch `micro` of
        `micros` takes every micros-th of the batch's stratified times, so each micro-batch spans
        [t_min, 1] and masks about the same number of tokens (steady shapes and load).
        A block model draws one time per block, t (B * T / block_len,), stratified over all the
        blocks of the batch the same way; block j of sequence i takes stratum j * B + i, so every
        sequence spans [t_min, 1] too."""
        B = x.size(0)
        n = B * (x.size(1) // self.block_len) if self.block_len else B    # times: one per block, or per sequence
        u0 = torch.rand((), generator=rng(self.c.seed, *key, 't'), dtype=torch.float64)
        t = stratified_times(u0, micro, n, n * micros, self.c.t_min, stride=micros)
        if self.block_len:
            t = t.view(-1, B).t().reshape(-1)
        u = torch.rand(x.shape, generator=rng(self.c.seed, *key, micro, 'mask'), dtype=torch.float64)
        t, u = to_device(t, x.device), to_device(u, x.device)
        if not self._ready:  # a masking rule reads its own data (the entropy file) here, not in compiled code
            MASKINGS[self.c.masking](x.reshape(-1, self.block_len) if self.block_len else x, self.schedule.alpha(t),
                                     self)
            self._ready = True
        return t, u

    def loss(self, model, window, step, micro):
        """window: (B, block_size + 1); the last token is GPT's target only, so both objectives see
        the same tokens. micro: this micro-batch's place in the global batch."""
        x = window[:, :-1]
        t, u = self.draws(x, ('train', step), micro, self.c.gradient_accumulation_steps)
        return self.compute(model, x, t, u)

    @torch.no_grad()
    def evaluate(self, model, batches):
        """val_loss: the training objective (own schedule and masking) on validation data.
        val_nelbo: the uniform-masking NELBO, the same yardstick for every diffusion model, with
        stratified times and the control variate above (evaluate.py's continuous estimator): each
        sequence counts f - beta c, beta = cov(f, c) / var(c) fitted on the sequences of earlier
        batches and evaluations only, so it never depends on the draws it corrects (unbiased).
        val_nelbo_se: its standard error, from the spread of the batches' values: for random batches
        the error against the whole split's value; for the whole split in order (eval_iters=0) an
        upper bound on the Monte Carlo error, since the spread also counts how the batches' texts differ."""
        own, fair, sizes = [], [], []

        def fit(x, key):   # the uniform NELBO per sequence f (B,), corrected by its control variate
            t, u = self.draws(x, key)
            f = self.compute(model, x, t, u, own=False, capacity=x.numel(), per_seq=True).double()   # head everywhere
            return t, u, f, self._cv.correct(f, self.control_variate(t, u)).mean()
        for i, window in enumerate(batches):
            x = window[:, :-1]
            if self._cv is None:   # kept across evaluations; a first pilot pass (its own draws) starts it
                self._cv = ControlVariate(x.device)
                fit(x, ('val', 'pilot'))
            t, u, f, value = fit(x, ('val', i))
            fair.append(value)
            own.append((f.mean() if self.own_is_uniform else self.compute(model, x, t, u, capacity=x.numel())).double())
            sizes.append(len(x))
        nelbo, se = batch_mean(fair, sizes)
        return {'val_loss': batch_mean(own, sizes)[0], 'val_nelbo': nelbo, 'val_nelbo_se': se}

    def sample(self, model, tokenizer, n=None, seed=1337, steps=64):
        """difference 5: generation by iterative unmasking; one sample of n tokens as text. A block
        model fills block after block (generate_blocks), with as many tokens per step on average."""
        n = n or model.cfg.block_size
        dev = next(model.parameters()).device
        x = torch.full((1, n), self.mask_id, device=dev)
        gens = [torch.Generator('cpu' if dev.type == 'mps' else dev).manual_seed(seed)]   # MPS has no float64
        if self.block_len:
            frames = generate_blocks(model, x, generate, max(1, math.ceil(steps * self.block_len / n)), gens,
                                     schedule=self.schedule)
        else:
            frames = generate(model, x, min(steps, n), gens, self.schedule)
        for _, x, _ in frames:
            pass
        return tokenizer.decode(x[0].tolist())

# -----------------------------------------------------------------------------
# sampling building blocks (sample.py has five more samplers built from these)


def sample_categorical(logits, gen, temperature=1.0, top_k=0, top_p=1.0):
    """(M, V) logits -> (M,) ids. Gumbel-max in float64 (exact categorical sampling; float32
    noise would lower the effective temperature, Zheng et al. 2024). temperature 0 = argmax.
    gen: this sample's own generator, so the draw does not depend on the rest of the batch."""
    if temperature == 0 or logits.size(0) == 0:
        return logits.argmax(-1)
    z = filter_logits(logits.double() / temperature, top_k, top_p)
    u = torch.rand(z.shape, generator=gen, dtype=torch.float64, device=gen.device).to(z.device)
    return (z - torch.log(-torch.log(u))).argmax(-1)            # u in [0, 1): u = 0 gives -inf


def uniform(n, gen, device):
    """n float64 uniforms from one sample's generator."""
    return torch.rand(n, generator=gen, dtype=torch.float64, device=gen.device).to(device)


def all_logits(model, x):
    """Logits (B, T, V) float32 at every position of the window x (B, T). Time-conditioned
    models get the fraction of masked positions, which depends on x only (so caching stays exact).
    Every position's logits are computed (no select=): the matmul shapes then do not depend on how
    many positions are masked, which keeps a batch bitwise equal to single runs on CPU."""
    mask_rate = (x == model.cfg.mask_id).float().mean(1)
    return model(x, mask_rate=mask_rate).float()


def time_grid(steps):
    """Times 1 = t_0 > t_1 > ... > t_steps = 0, uniform as in MDLM: float64 (steps + 1,)."""
    return 1.0 - torch.arange(steps + 1, dtype=torch.float64) / steps


@torch.no_grad()
def generate(model, x, steps, gens, schedule, temperature=1.0, top_k=0, top_p=1.0, cache=True, final_fill='sample',
             **_):
    """MDLM ancestral sampling of the MASK positions of x (B, W), t from 1 to 0 in `steps`
    uniform steps of `schedule` (a Schedule: its alpha is the one used). From t to s < t each
    masked token is revealed with probability (alpha_s - alpha_t) / (1 - alpha_t) (MDLM eq. 7
    with SUBS: revealed tokens stay), its value drawn from the model by float64 Gumbel-max.
    Deciding reveal first, then the token, is the same categorical over V + 1 outcomes as MDLM's
    single draw. gens: one generator per row. cache=True reuses the last logits of a row whose
    tokens did not change (the model is time-agnostic: MDLM sec. 4.2): identical output, fewer
    passes. A schedule with alpha(0) < 1 leaves masks at t = 0: fill_final fills them (final_fill).
    Yields (step, x, changed)."""
    mask_id = model.cfg.mask_id
    alphas = schedule.alpha(time_grid(steps)).tolist()                  # alpha(t_k), k = 0..steps
    x = x.clone()
    logits, stale = None, torch.ones(x.size(0), dtype=torch.bool)       # stale: rows needing a pass
    step = 0

    def refresh():
        nonlocal logits
        if not cache or logits is None:
            logits = all_logits(model, x)
        elif stale.any():
            rows = stale.nonzero().squeeze(1).to(x.device)
            logits[rows] = all_logits(model.rows(rows) if isinstance(model, BlockContext) else model, x[rows])
        stale.fill_(False)

    for step in range(1, steps + 1):
        masked = x == mask_id
        if not masked.any():
            break
        a_t, a_s = alphas[step - 1], alphas[step]
        p_reveal = min(max((a_s - a_t) / (1 - a_t), 0.0), 1.0) if a_t < 1 else 1.0
        refresh()
        new = x.clone()
        for i, gen in enumerate(gens):
            pos = masked[i].nonzero().squeeze(1)
            if pos.numel() == 0:
                continue
            rev = pos[uniform(pos.numel(), gen, x.device) < p_reveal]
            new[i, rev] = sample_categorical(logits[i, rev], gen, temperature, top_k, top_p)
        changed = new != x
        stale |= changed.any(1).cpu()
        x = new
        yield step, x, changed
    masked = x == mask_id
    if masked.any():
        refresh()
        x = fill_final(x, logits, masked, gens, final_fill, temperature, top_k, top_p)
        yield step + 1, x, masked


def fill_final(x, logits, masked, gens, final_fill='sample', temperature=1.0, top_k=0, top_p=1.0):
    """The positions still masked at t = 0 (a schedule with alpha(0) < 1 leaves a fraction
    (1 - alpha(0)) / (1 - alpha(1)) of them: 5% for clipped_cosine) filled from logits (B, W, V):
    'sample' draws them like every other step (temperature, top-k, top-p), so every schedule is
    sampled alike; 'argmax' takes the most likely token (greedy; lowers a judge's perplexity)."""
    if final_fill == 'argmax':
        return torch.where(masked, logits.argmax(-1), x)
    x = x.clone()
    for i, gen in enumerate(gens):
        pos = masked[i].nonzero().squeeze(1)
        x[i, pos] = sample_categorical(logits[i, pos], gen, temperature, top_k, top_p)
    return x


class BlockContext:
    """A block model as a sampler sees it while it fills one block (BD3-LM sampling): called like
    the model on the block's tokens (B, Lb) (Lb <= block_len), it returns their logits given the
    finished text before the block, of which the window holds the last block_size - block_len
    tokens at most (past block_size the window rolls by whole blocks). generate_blocks points it
    at each block in turn.

    use_cache: the finished text's keys and values stay in a KVCache. A call runs the context not
    cached yet (the block finished last; after a roll, the whole window again: a prefill) together
    with the block, in one pass, and keeps no keys or values of the block, which is still noisy.
    use_cache=False runs the whole window every call. A clean block attends only to itself and
    the clean blocks before it, so both compute the same logits: the same samples."""
    def __init__(self, model, use_cache=True):
        self.model, self.cfg, self.use_cache = model, model.cfg, use_cache
        self.block_len = block_len_of(model.cfg.block_len, model.cfg.block_size)
        self.cache, self.cache_start = None, -1   # the cache holds the window from position cache_start
        self.ctx, self.start = None, 0

    def point(self, seq, a):
        """The block at positions a.. of seq (B, N), a a multiple of block_len: its context is
        seq[:, start:a], at most block_size - block_len tokens."""
        self.start = max(0, a + self.block_len - self.cfg.block_size)
        self.ctx = seq[:, self.start:a]

    def rows(self, rows):
        """The same view for some rows only (diffusion.generate's cache passes the changed rows);
        it reads the cache and never writes to it."""
        view = object.__new__(BlockContext)
        view.__dict__.update(self.__dict__, ctx=self.ctx[rows])
        if self.use_cache:
            if self.cache is None or self.cache.pos != self.ctx.size(1):
                raise RuntimeError("BlockContext.rows: the context is not cached yet (call on every row first)")
            view.cache = object.__new__(KVCache)
            view.cache.k, view.cache.v, view.cache.pos = self.cache.k[:, rows], self.cache.v[:, rows], self.cache.pos
        return view

    def __call__(self, x, mask_rate=None, **_):
        B, Lb = x.shape
        if not self.use_cache:
            new = self.ctx
        else:
            if self.cache is None or self.cache.k.size(1) != B:
                dtype = next(self.model.parameters()).dtype
                if torch.is_autocast_enabled(x.device.type):   # keys/values come out in the autocast dtype
                    dtype = torch.get_autocast_dtype(x.device.type)
                self.cache, self.cache_start = KVCache(self.cfg, B, self.cfg.block_size, x.device, dtype), -1
            if self.cache_start != self.start or self.cache.pos > self.ctx.size(1):   # a new window: prefill
                self.cache.pos, self.cache_start = 0, self.start
            new = self.ctx[:, self.cache.pos:]
        rate = None
        if self.cfg.time_cond:  # per position: the context is clean, the block has its own rate
            rate = torch.cat([torch.zeros(B, new.size(1), device=x.device), mask_rate[:, None].expand(B, Lb)], 1)
        logits = self.model(torch.cat([new, x], 1), mask_rate=rate, cache=self.cache if self.use_cache else None)
        if self.use_cache:
            self.cache.pos -= Lb   # the block's keys and values are not kept
        return logits[:, -Lb:]


def generate_blocks(model, x, sampler, steps, gens, use_cache=True, **kw):
    """BD3-LM generation with a block model: the MASK positions of x (B, N) are filled block by
    block, left to right (blocks of block_len positions from position 0; every row has MASK at the
    same positions). A block without MASK is context; a block with MASK (all of it, or around a
    partial prompt, or an infilling span) is filled by sampler(view, block, steps, gens, **kw):
    diffusion.generate or any of sample.py's samplers, view being a BlockContext. Yields
    (step, x, changed) over the whole of x, steps counted across blocks."""
    L, mask_id = block_len_of(model.cfg.block_len, model.cfg.block_size), model.cfg.mask_id
    if not L:
        raise ValueError("generate_blocks needs a block model (0 < block_len < block_size)")
    view = BlockContext(model, use_cache)
    x, total = x.clone(), 0
    for a in range(0, x.size(1), L):
        if not (x[:, a:a + L] == mask_id).any():
            continue
        view.point(x, a)
        done = total
        for done, x, changed in in_window(sampler(view, x[:, a:a + L], steps, gens, **kw), x, a, total):
            yield done, x, changed
        total = done


def in_window(frames, seq, a, total=0):
    """A sampler's frames (step, window, changed) over seq[:, a:a + W], spliced back into (a copy
    of) seq: yields (total + step, seq, changed over all of seq)."""
    for step, xw, ch in frames:
        seq = seq.clone()
        seq[:, a:a + xw.size(1)] = xw
        changed = torch.zeros_like(seq, dtype=torch.bool)
        changed[:, a:a + xw.size(1)] = ch
        yield total + step, seq, changed
# -----------------------------------------------------------------------------
# data: meta.json + uint16 token files (one or many shards per split) written by prepare.py


class Tokenizer:
    """Character or GPT-2 BPE tokenizer described by a dataset's meta.json."""
    def __init__(self, meta):
        self.kind = meta['tokenizer']
        self.n_tokens = meta['vocab_size']
        self.mask_id = self.n_tokens
        self.eot_id = meta.get('eot_id')
        if self.kind == 'char':
            self.itos = meta['chars']
            self.stoi = {ch: i for i, ch in enumerate(self.itos)}
        elif self.kind == 'gpt2':
            self.enc = gpt2_encoding()
        else:
            raise UserError(f"unknown tokenizer {self.kind!r} in meta.json")

    def encode(self, text):
        if self.kind == 'char':
            missing = sorted(set(text) - set(self.stoi))
            if missing:
                raise UserError(f"characters not in the vocabulary: {''.join(missing)!r}")
            return [self.stoi[ch] for ch in text]
        return self.enc.encode_ordinary(text)

    def decode(self, ids, mask_str='_'):
        """ids -> text; MASK shows as mask_str, padding ids as nothing."""
        out, run = [], []
        for i in (int(i) for i in ids):
            if i < self.n_tokens:
                run.append(i)
                continue
            if run:
                out.append(self._decode(run))
                run = []
            if i == self.mask_id:
                out.append(mask_str)
        if run:
            out.append(self._decode(run))
        return ''.join(out)

    def _decode(self, ids):
        return ''.join(self.itos[i] for i in ids) if self.kind == 'char' else self.enc.decode(ids)


def gpt2_encoding():
    """tiktoken's GPT-2 BPE; offline it uses ../shared/tiktoken_cache when that exists."""
    shared = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'shared', 'tiktoken_cache')
    if 'TIKTOKEN_CACHE_DIR' not in os.environ and os.path.isdir(shared):
        os.environ['TIKTOKEN_CACHE_DIR'] = shared
    import tiktoken
    try:
        return tiktoken.get_encoding('gpt2')
    except OSError as e:  # requests' connection errors are OSErrors
        raise UserError(f"cannot load the GPT-2 BPE files ({type(e).__name__}); without network, set "
                        "TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cached files") from None


def load_meta(data_dir, dataset):
    """A dataset's meta.json, checked to be what prepare.py writes."""
    path = os.path.join(data_dir, dataset, 'meta.json')
    again = f"; make it again with: python prepare.py --dataset={dataset}"
    if not os.path.exists(path):
        raise UserError(f"no data at {os.path.join(data_dir, dataset)}; make it with: "
                        f"python prepare.py --dataset={dataset}")
    try:
        with open(path, encoding='utf-8') as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not readable JSON ({type(e).__name__}){again}") from None
    if not (isinstance(meta, dict) and isinstance(meta.get('vocab_size'), int) and meta['vocab_size'] > 0
            and meta.get('tokenizer') in ('char', 'gpt2') and isinstance(meta.get('splits'), dict)):
        raise UserError(f"{path} is not a dataset description written by prepare.py{again}")
    return meta


def data_identity(meta):
    """What must not change under a run: tokenizer, vocabulary and the token files' fingerprint."""
    return {k: meta.get(k) for k in ('tokenizer', 'vocab_size', 'chars', 'fingerprint')}


def _from_difference(a, b, width=40):
    """a and b cut to width characters from a little before where they first differ."""
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    start = max(0, i - 10)
    return tuple(('...' if start else '') + s[start:start + width] for s in (a, b))


def check_same_data(meta, ckpt_meta, where):
    """A one-line refusal when data prepared now differs from the data a checkpoint was made on."""
    now, then = data_identity(meta), data_identity(ckpt_meta)
    if then.get('fingerprint') is None or now.get('fingerprint') is None:
        now.pop('fingerprint'), then.pop('fingerprint')  # data prepared before fingerprints existed
    bad = [k for k in now if now[k] != then[k]]
    if bad:
        show = {k: _from_difference(str(then[k]), str(now[k])) for k in bad}
        raise UserError(f"{where} was made on other data: {meta.get('dataset')} now differs in "
                        + ', '.join(f"{k} ({a!r} then, {b!r} now)" for k, (a, b) in show.items()))


class TokenData:
    """One split of a dataset: uint16 shards listed in meta.json, memmapped and size-checked.
    Batches are random windows, a pure function of the generator passed in. limit > 0: only the
    first `limit` tokens of the split (a data-constrained run repeats them epoch after epoch)."""
    def __init__(self, data_dir, dataset, split, meta=None, limit=0):
        self.meta = meta or load_meta(data_dir, dataset)
        again = f"; rerun python prepare.py --dataset={dataset}"
        info = self.meta['splits'].get(split)
        if info is None:
            raise UserError(f"{dataset} has no {split} split{again}")
        self.paths = [os.path.join(data_dir, dataset, s) for s in info['shards']]
        self.sizes = list(info['tokens'])
        self.dtype = np.dtype(self.meta.get('dtype', 'uint16'))
        self.vocab = self.meta['vocab_size']
        for path, n in zip(self.paths, self.sizes):
            if not os.path.exists(path):
                raise UserError(f"missing {path}{again}")
            if os.path.getsize(path) != n * self.dtype.itemsize:
                raise UserError(f"{path} holds {os.path.getsize(path) // self.dtype.itemsize} tokens but "
                                f"meta.json says {n}{again}")
        if limit:
            if limit > sum(self.sizes):
                raise UserError(f"--train_tokens={limit} is more than the {sum(self.sizes):,} tokens of the {split} split")
            ends = np.cumsum([0] + self.sizes)
            self.sizes = [int(min(n, max(limit - e, 0))) for n, e in zip(self.sizes, ends)]
        self.tokens = sum(self.sizes)

    def batch(self, batch_size, length, gen):
        """(batch_size, length) int64 windows: a shard chosen in proportion to its windows, then
        an offset within it. Ids outside the vocabulary are a one-line error naming the shard."""
        counts = torch.tensor([max(n - length + 1, 0) for n in self.sizes], dtype=torch.float64)
        if counts.sum() == 0:
            raise UserError(f"every shard is shorter than {length} tokens; lower --block_size")
        shard = torch.multinomial(counts, batch_size, replacement=True, generator=gen) if len(counts) > 1 \
            else torch.zeros(batch_size, dtype=torch.long)
        offs = (torch.rand(batch_size, generator=gen, dtype=torch.float64) * counts[shard]).long()
        # memmaps are opened per batch, not kept (nanoGPT: a long-lived memmap grows resident memory)
        maps = {s: np.memmap(self.paths[s], dtype=self.dtype, mode='r') for s in set(shard.tolist())}
        rows = [maps[s][o:o + length] for s, o in zip(shard.tolist(), offs.tolist())]
        out = torch.from_numpy(np.stack(rows).astype(np.int64))
        if out.max() >= self.vocab:
            s = shard[int((out >= self.vocab).any(1).nonzero()[0])]
            raise UserError(f"{self.paths[s]} holds token id {int(out.max())}, outside the vocabulary of "
                            f"{self.vocab}; rerun python prepare.py --dataset={self.meta.get('dataset')}")
        return out

    def windows(self, batch_size, length):
        """Every whole window of `length` tokens of the split in order, each starting at the last
        token of the one before (so each token is in some window's first length - 1, the part
        diffusion sees, and GPT predicts each token once), as (<= batch_size, length) batches."""
        for path, n in zip(self.paths, self.sizes):
            data = np.memmap(path, dtype=self.dtype, mode='r')
            starts = range(0, n - length + 1, length - 1)    # windows overlap by GPT's target token
            for i in range(0, len(starts), batch_size):
                yield torch.from_numpy(np.stack([data[o:o + length] for o in starts[i:i + batch_size]]).astype(np.int64))


def fingerprint(data_dir, dataset, meta):
    """A cheap fingerprint of a dataset's token files: sizes and hashes of their first and last
    64 KiB (hashing 20 GB of FineWeb at every start would take minutes)."""
    h = hashlib.blake2b(digest_size=8)
    for split in sorted(meta['splits']):
        for shard in meta['splits'][split]['shards']:
            path = os.path.join(data_dir, dataset, shard)
            with open(path, 'rb') as f:
                size = os.fstat(f.fileno()).st_size
                h.update(f"{shard}:{size}".encode() + f.read(65536))
                f.seek(max(size - 65536, 0))
                h.update(f.read(65536))
    return h.hexdigest()

# -----------------------------------------------------------------------------
# checkpoints: atomic writes, weights_only loads, one-line errors, the script that made them


def atomic_write(path, write, mode='wb'):
    """write(f) into a temporary file, fsync, rename over path: a crash leaves the old file, and a
    full disk or a file size limit leaves it too (the temporary file is removed; one-line error
    with the size written and the previous file's)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save: its zip writer turns the OSError into a RuntimeError
        size = os.path.getsize(tmp) if os.path.exists(tmp) else 0
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if not isinstance(e, OSError):
            if not isinstance(e.__context__, OSError):
                raise
            e = e.__context__
        full = e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
        old = os.path.getsize(path) if os.path.exists(path) else 0
        mib = lambda n: f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"
        raise UserError(f"cannot write {path}: {e.strerror}" + (
            f" (stopped at {mib(size)}" + (f" of about {mib(old)}, the size of the previous file, which is kept"
                                            if old else "") + "; free space there"
            + (" or raise the file size limit (ulimit -f)" if e.errno == errno.EFBIG else "") + ")" if full else "")) from None
    with contextlib.suppress(OSError):  # make the rename itself durable where the OS allows
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def atomic_save(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text, path):
    atomic_write(path, lambda f: f.write(text), 'w')


def remove_stale_temps(folder):
    """Delete `*.tmp.<pid>` files of processes that no longer run (a kill -9 during a save)."""
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        pid = name.rpartition('.tmp.')[2]
        if '.tmp.' in name and pid.isdigit() and int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(folder, name))
            except PermissionError:
                pass  # alive, another user's


def read_log(path, warn=True):
    """The records of a log.jsonl; a torn last line (kill -9, full disk) is skipped with a note."""
    recs = []
    with contextlib.suppress(FileNotFoundError), open(path, encoding='utf-8', errors='replace') as f:
        lines = f.read().splitlines()
        for i, line in enumerate(lines):
            try:
                recs.append(json.loads(line))
            except ValueError:
                if warn and line.strip():
                    print0(f"note: skipped a torn line {i + 1} of {path}")
    return recs


def script_info(path):
    """What a checkpoint records of the script that made it: its path and a hash of its source."""
    with open(path, 'rb') as f:
        return {'path': os.path.abspath(path), 'sha256': hashlib.sha256(f.read()).hexdigest()}


def read_checkpoint(path, device='cpu'):
    """torch.load(weights_only=True) with one-line errors for missing, corrupt or foreign files."""
    if os.path.isdir(path):
        path = os.path.join(path, 'ckpt.pt')
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}; train one with: python diffusion.py "
                        f"--out_dir={os.path.dirname(path) or '.'} (or gpt.py)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, foreign object: all mean "not usable"
        raise UserError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
    need = ('model', 'model_args', 'objective', 'config', 'meta', 'step')
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in need):
        raise UserError(f"{path} is not a checkpoint of this project (missing "
                        f"{[k for k in need if not isinstance(ckpt, dict) or k not in ckpt]})")
    ckpt['path'] = path
    return ckpt


def build_model(ckpt, path='checkpoint'):
    """Rebuild the (uncompiled) model from the config stored in a checkpoint and load its weights."""
    unknown = set(ckpt['model_args']) - {f.name for f in fields(ModelConfig)}
    if unknown:
        raise UserError(f"{path}: model config has unknown fields {sorted(unknown)}")
    model = Transformer(ModelConfig(**ckpt['model_args']))
    try:
        model.load_state_dict(ckpt['model'])
    except RuntimeError as e:
        first = [ln.strip() for ln in str(e).splitlines() if ln.strip()][1:2] or [str(e)[:160]]
        raise UserError(f"{path}: weights do not match the stored model config ({first[0][:160]})") from None
    return model


def rng_state():
    s = np.random.get_state()
    state = {'python': random.getstate(), 'torch': torch.get_rng_state(),
             'numpy': [s[0], torch.from_numpy(s[1].astype(np.int64)), s[2], s[3], s[4]]}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    random.setstate((state['python'][0], tuple(state['python'][1]), state['python'][2]))
    torch.set_rng_state(state['torch'].cpu())
    n = state['numpy']
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'].cpu())
# -----------------------------------------------------------------------------
# training: the steps train() takes, each a small function, in the order it takes them

PEAK_FLOPS = [  # dense bf16 FLOP/s by device-name substring, first match wins; add yours
    ('H200', 989e12), ('H100 PCIe', 756e12), ('H100', 989e12), ('A100', 312e12),
    ('L40S', 362e12), ('L4', 121e12), ('A10G', 70e12), ('4090', 165e12), ('V100', 125e12),
]


def peak_flops(device):
    if device.type != 'cuda':
        return None
    name = torch.cuda.get_device_name(device)
    return next((f for key, f in PEAK_FLOPS if key in name), None)


def resolve_device(name, local_rank=0):
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' | 'mps' -> a torch.device that exists here, else a one-line error."""
    if name == 'auto':
        if torch.cuda.is_available():
            name = f'cuda:{local_rank}'
        elif getattr(torch.backends, 'mps', None) and torch.backends.mps.is_available():
            name = 'mps'
        else:
            name = 'cpu'
    elif name == 'cuda':
        name = f'cuda:{local_rank}'
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device={name!r}: use auto, cpu, cuda, cuda:N or mps", EXIT_USAGE) from None
    if dev.type == 'cuda' and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise UserError(f"--device={name} but that CUDA device is not available here; use --device=cpu", EXIT_USAGE)
    if dev.type == 'mps' and not (getattr(torch.backends, 'mps', None) and torch.backends.mps.is_available()):
        raise UserError("--device=mps but MPS is not available here; use --device=cpu", EXIT_USAGE)
    if dev.type not in ('cpu', 'cuda', 'mps'):
        raise UserError(f"--device={name!r}: use auto, cpu, cuda, cuda:N or mps", EXIT_USAGE)
    return dev


def autocast_for(dev, dtype):
    """bfloat16 autocast on CUDA by default (the loss is computed in fp32), none elsewhere."""
    amp = {'auto': torch.bfloat16 if dev.type == 'cuda' else None, 'float32': None, 'bfloat16': torch.bfloat16}[dtype]
    return torch.autocast(device_type=dev.type, dtype=amp) if amp is not None else contextlib.nullcontext()


RULES = {  # what each setting must be: (test, text); configure() checks the values given
    'init_from': one_of(('scratch', 'resume', 'auto')), 'eval_interval': at_least(1), 'eval_iters': at_least(0),
    'log_interval': at_least(1), 'diverge_ratio': at_least(0.0), 'batch_size': at_least(1),
    'block_size': at_least(2), 'gradient_accumulation_steps': at_least(0), 'n_layer': at_least(1),
    'n_head': at_least(1), 'n_embd': at_least(2), 'mlp': one_of(MLPS), 'dropout': in_range(0, 1, hi_open=True),
    'schedule': one_of(SCHEDULES), 'masking': one_of(MASKINGS), 'loss_weighting': one_of(LOSS_WEIGHTINGS),
    't_min': in_range(0, 1, hi_open=True), 'learning_rate': at_least(0.0), 'max_iters': at_least(0),
    'warmup_iters': at_least(0), 'lr_decay_iters': at_least(0, optional=True), 'min_lr': at_least(0.0, optional=True),
    'weight_decay': at_least(0.0), 'beta1': in_range(0, 1, hi_open=True), 'beta2': in_range(0, 1, hi_open=True),
    'grad_clip': at_least(0.0), 'dtype': one_of(('auto', 'float32', 'bfloat16')),
    'backend': one_of(('auto', 'nccl', 'gloo')), 'block_len': at_least(0), 'train_tokens': at_least(0),
}


def check_settings(c):
    """Checks between settings (each alone is checked by RULES), and warnings for odd pairs."""
    if c.n_embd % c.n_head or (c.n_embd // c.n_head) % 2:
        raise UserError(f"--n_embd={c.n_embd} must be a multiple of --n_head={c.n_head} with an even quotient "
                        "(the head size, for rotary embeddings)", EXIT_USAGE)
    if c.get('block_len') and c.block_size % c.block_len:
        raise UserError(f"--block_len={c.block_len} must divide --block_size={c.block_size} (0 or block_size: MDLM)",
                        EXIT_USAGE)
    decay = c.lr_decay_iters if c.lr_decay_iters is not None else c.max_iters
    for bad, what in ((c.warmup_iters > c.max_iters, f"warmup_iters={c.warmup_iters} is longer than the run: the "
                       "learning rate never reaches its peak"),
                      (c.eval_interval > c.max_iters > 0, f"eval_interval={c.eval_interval} > max_iters: validation "
                       "runs only at the start and the end"),
                      (decay < c.max_iters, f"lr_decay_iters={decay} < max_iters: the last "
                       f"{c.max_iters - decay} steps run at min_lr")):
        if bad:
            print0(f"warning: {what}")


def default_out_dir(c, objective):
    if objective == 'diffusion':
        blocks = f"-block{c.block_len}" if block_len_of(c.get('block_len', 0), c.block_size) else ''
        return os.path.join('out', f'diffusion-{c.dataset}-{c.schedule}-{c.masking}{blocks}')
    return os.path.join('out', f'{objective}-{c.dataset}')


def lock_run(out_dir):
    """One run per out_dir: an exclusive lock on out_dir/lock, held until the process ends (the OS
    drops it however the process ends, so a killed run never blocks the next)."""
    os.makedirs(out_dir, exist_ok=True)
    f = open(os.path.join(out_dir, 'lock'), 'a+')
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or '?'
        f.close()
        raise UserError(f"{out_dir} is in use by another run (pid {holder}); wait for it, or choose another "
                        "--out_dir", EXIT_USAGE) from None
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def start_or_resume(c, objective_name):
    """(settings, checkpoint or None). Resuming takes the checkpoint's settings, updated by those
    set explicitly now; the model, data and objective cannot change under a resumed run."""
    path = os.path.join(c.out_dir, 'ckpt.pt')
    mode = c.init_from if c.init_from != 'auto' else ('resume' if os.path.exists(path) else 'scratch')
    if mode == 'scratch':
        if os.path.exists(path):
            raise UserError(f"{c.out_dir} already holds a run; continue it with --init_from=resume, or "
                            "choose another --out_dir (or delete that folder)", EXIT_USAGE)
        return c, None
    ckpt = read_checkpoint(path)
    if ckpt['objective'] != objective_name:
        raise UserError(f"{path} holds a {ckpt['objective']} run; resume it with {ckpt['objective']}.py")
    merged = Config(ckpt['config'])
    fixed = {f.name for f in fields(ModelConfig)} | {'dataset', 'schedule', 'masking', 'loss_weighting'}
    for k in sorted(c.explicit):
        if k in fixed and k in merged and merged[k] != c[k]:
            raise UserError(f"--{k}={c[k]!r} differs from the checkpoint's {merged[k]!r}; a resumed run "
                            "keeps its model and objective (start a new --out_dir instead)", EXIT_USAGE)
    merged.update({k: v for k, v in c.items() if k in c.explicit or k not in merged})
    merged.explicit = c.explicit
    return merged, ckpt


def model_config(c, meta, causal):
    """The ModelConfig of a run: every ModelConfig field that is also a setting comes from it."""
    n = meta['vocab_size']
    own = {f.name: c[f.name] for f in fields(ModelConfig) if f.name in c}
    return ModelConfig(**dict(own, vocab_size=padded_vocab(n), mask_id=n, causal=causal))


def lr_at(step, c):
    """Linear warmup to learning_rate, cosine decay to min_lr at lr_decay_iters, then flat."""
    decay_iters = c.lr_decay_iters if c.lr_decay_iters is not None else c.max_iters
    min_lr = c.min_lr if c.min_lr is not None else c.learning_rate / 10
    if step < c.warmup_iters:
        return c.learning_rate * (step + 1) / (c.warmup_iters + 1)
    if step >= decay_iters:
        return min_lr
    ratio = (step - c.warmup_iters) / max(decay_iters - c.warmup_iters, 1)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (c.learning_rate - min_lr)


def make_optimizer(model, c, device):
    """AdamW; weight decay on 2-D weights (matmuls, embeddings) only, never on norms or biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': c.weight_decay},
              {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
    extra = {'fused': True} if device.type in ('cuda', 'cpu') else {}   # one kernel for all parameters
    return torch.optim.AdamW(groups, lr=c.learning_rate, betas=(c.beta1, c.beta2), **extra)


def restore(ckpt, optimizer, c, rank, world):
    """Seed this rank, then restore the optimizer, the loop counters and every RNG from a
    checkpoint. Returns (step, best_val, evaluated_at)."""
    torch.manual_seed(c.seed + rank)  # per-rank randomness (dropout)
    random.seed(c.seed + rank)
    np.random.seed(c.seed + rank)
    if ckpt is None:
        return 0, float('inf'), -1
    optimizer.load_state_dict(ckpt['optimizer'])
    states = ckpt.get('rng', [])
    if len(states) == world:
        set_rng_state(states[rank])
    else:
        print0(f"note: checkpoint has RNG state for {len(states)} processes, this run has {world}; reseeded")
    return ckpt['step'], ckpt.get('best_val_loss', float('inf')), ckpt.get('evaluated_at', -1)


def open_log(out_dir, step, cfg):
    """log.jsonl without the lines written after the checkpoint (a crash), plus a start record."""
    path = os.path.join(out_dir, 'log.jsonl')
    keep = [r for r in read_log(path) if r.get('step', 0) <= step]
    atomic_write_text(''.join(json.dumps(r) + '\n' for r in keep + [{'step': step, 'event': 'start',
                                                                        'config': dict(cfg)}]), path)
    return path


def write_status(out_dir, status, step, max_iters):
    atomic_write_text(json.dumps({'status': status, 'step': step, 'max_iters': max_iters}) + '\n',
                      os.path.join(out_dir, 'status.json'))


def save_checkpoint(path, raw_model, optimizer, model_cfg, objective_name, cfg, meta, script, loop, states):
    """Everything needed to continue exactly: weights, optimizer, settings, data identity, the
    script that trained it, the loop counters and every rank's RNG state. Atomic."""
    atomic_save({'model': raw_model.state_dict(), 'optimizer': optimizer.state_dict(),
                 'model_args': asdict(model_cfg), 'objective': objective_name, 'config': dict(cfg), 'meta': meta,
                 'script': script, 'step': loop['step'], 'best_val_loss': loop['best_val'],
                 'evaluated_at': loop['evaluated_at'], 'rng': states,
                 'data': {'sampler': 'random windows keyed by (seed, step, micro)', 'seed': cfg['seed']}}, path)


def keep_best(ckpt_path):
    """best.pt: a hard link to the checkpoint just written (no copy; ckpt.pt is later replaced by a
    rename, so best.pt keeps these bytes). Atomic like every file of a run."""
    best = os.path.join(os.path.dirname(ckpt_path), 'best.pt')
    tmp = f"{best}.tmp.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.remove(tmp)
    try:
        os.link(ckpt_path, tmp)
    except OSError:  # a filesystem without hard links
        with open(ckpt_path, 'rb') as f:
            data = f.read()
        atomic_write(best, lambda out: out.write(data))
        return
    os.replace(tmp, best)


def finite_weights(model):
    return all(torch.isfinite(p).all() for p in model.parameters())


def shutdown_ddp(dist):
    """Leave DDP cleanly: wait for every rank, collect the DDP wrapper the caller has just
    dropped (its reducer holds gloo/NCCL work objects, and a gloo worker thread destroying one
    during interpreter shutdown aborts the process), then destroy the group."""
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()


def fmt_time(s):
    """Seconds as 4m05s or 2h07m (log lines' ETA; prepare.py and sample.py use it too)."""
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def tune_backend(dev):
    """Settings that change speed, not results. CUDA: TF32 matmuls where fp32 remains. CPU under
    glibc (Linux): freed memory stays in the heap (mallopt) instead of going back to the OS, so
    each step's big activations reuse mapped pages instead of page-faulting fresh ones (hundreds of
    faults a step): 1.5-2.5 ms of a 57 ms step at nanoGPT's CPU recipe size, measured process
    against process. bench/bench_train.py times every contender of ours with it set."""
    if dev.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    elif dev.type == 'cpu' and sys.platform.startswith('linux'):
        try:
            libc = ctypes.CDLL(None)
            libc.mallopt(-1, 1 << 30)      # M_TRIM_THRESHOLD: keep up to 1 GiB of freed heap
            libc.mallopt(-3, 32 << 20)     # M_MMAP_THRESHOLD: blocks under 32 MiB from the heap, not mmap
        except (OSError, AttributeError):  # another C library: its own policy
            pass


def train(c, Objective, script):
    """Train with settings c (a Config from configure) and an objective class (DiffusionObjective
    here, GPTObjective in gpt.py); script is the training script's path, recorded in checkpoints.
    Exits with EXIT_RESUMABLE after a SIGUSR1/SIGTERM/Ctrl-C-triggered save, raises UserError
    (EXIT_DIVERGED) when the loss diverges, returns the model when max_iters is reached."""
    # ---- processes and devices: DDP from torchrun's environment ----
    ddp = int(os.environ.get('RANK', -1)) != -1
    rank, local_rank, world = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE')) if ddp else (0, 0, 1)
    master = rank == 0
    dev = resolve_device(c.device, local_rank)
    if ddp:
        import torch.distributed as dist
        if dev.type == 'cuda':
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=c.backend if c.backend != 'auto' else ('nccl' if dev.type == 'cuda' else 'gloo'))

    # ---- where the run lives: lock it, then start or resume ----
    explicit = c.explicit
    c = Config(c, out_dir=c.out_dir or default_out_dir(c, Objective.name))
    c.explicit = explicit
    out_dir, ckpt_path = c.out_dir, os.path.join(c.out_dir, 'ckpt.pt')
    lock = lock_run(out_dir) if master else None
    if master:
        remove_stale_temps(out_dir)
    c, ckpt = start_or_resume(c, Objective.name)
    print0('config: ' + ' '.join(f'{k}={v!r}' for k, v in c.items()))   # after a resume: the run's own
    check_settings(c)
    c.gradient_accumulation_steps = c.gradient_accumulation_steps or world   # the global batch: G micro-batches
    if c.gradient_accumulation_steps % world:
        raise UserError(f"gradient_accumulation_steps={c.gradient_accumulation_steps} is not a multiple of "
                        f"the {world} DDP processes", EXIT_USAGE)
    micro_per_rank = c.gradient_accumulation_steps // world

    # ---- data, model, objective, optimizer ----
    meta = load_meta(c.data_dir, c.dataset)
    train_data = TokenData(c.data_dir, c.dataset, 'train', meta, limit=c.train_tokens)
    val_data = TokenData(c.data_dir, c.dataset, 'val', meta)
    meta = dict(meta, fingerprint=fingerprint(c.data_dir, c.dataset, meta))
    if ckpt is not None:
        check_same_data(meta, ckpt['meta'], ckpt_path)
    model_cfg = model_config(c, meta, Objective.causal)
    torch.manual_seed(c.seed)  # identical initial weights on every rank
    raw_model = (Transformer(model_cfg) if ckpt is None else build_model(ckpt, ckpt_path)).to(dev)
    objective = Objective(c, meta)
    optimizer = make_optimizer(raw_model, c, dev)
    step, best_val, evaluated_at = restore(ckpt, optimizer, c, rank, world)
    model = raw_model   # with --compile the objective compiles its loss, the model's forward included
    tune_backend(dev)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[local_rank] if dev.type == 'cuda' else None)
    autocast = autocast_for(dev, c.dtype)
    script = script_info(script)

    tokens_per_step = c.batch_size * c.block_size * c.gradient_accumulation_steps
    peak, flops_per_step = peak_flops(dev), raw_model.flops_per_token() * tokens_per_step
    print0(f"{Objective.name}: {raw_model.num_params() / 1e6:.2f}M parameters, {world} process(es) on {dev}, "
           f"{tokens_per_step:,} tokens/step, out_dir={out_dir}, starting at step {step}")
    log_path = open_log(out_dir, step, c) if master else None
    wandb = None
    if c.wandb_log and master:
        try:
            import wandb
        except ImportError:
            raise UserError("--wandb_log=true needs the wandb package: pip install wandb") from None
        wandb.init(project=c.wandb_project, name=c.wandb_run_name or os.path.basename(os.path.abspath(out_dir)),
                   config=dict(c))

    def log(record):
        if master:
            with open(log_path, 'a') as f:
                f.write(json.dumps(record) + '\n')
            if wandb is not None:
                wandb.log(record, step=record['step'])

    saved = [ckpt['step'] if ckpt else None]   # the step ckpt.pt holds

    def save(status):
        states = [rng_state()]
        if ddp:
            states = [None] * world
            dist.all_gather_object(states, rng_state())
        if master:
            save_checkpoint(ckpt_path, raw_model, optimizer, model_cfg, Objective.name, c, meta, script,
                            {'step': step, 'best_val': best_val, 'evaluated_at': evaluated_at}, states)
            write_status(out_dir, status, step, c.max_iters)
        saved[0] = step
        if ddp:
            dist.barrier()

    def diverged(what):
        if master:
            write_status(out_dir, 'diverged', step, c.max_iters)
            log({'step': step, 'event': 'diverged', 'why': what})
        kept = f"{ckpt_path} keeps step {saved[0]}" if saved[0] is not None else "no checkpoint was saved"
        raise UserError(f"step {step}: {what}; the run diverged and stopped ({kept}; lower --learning_rate)",
                        EXIT_DIVERGED)

    # ---- signals: finish the current step, save, exit EXIT_RESUMABLE; a second Ctrl-C stops at once ----
    stop = {'signal': None}

    def on_signal(signum, frame):
        if signum == signal.SIGINT and stop['signal'] == signal.SIGINT:
            raise KeyboardInterrupt
        stop['signal'] = signum
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}

    def stop_requested():
        """One process: the flag, no device sync. DDP: every rank agrees before anyone saves,
        through an all-reduce (a sync), so only at log steps."""
        if not ddp:
            return stop['signal'] is not None
        if step % c.log_interval and step < c.max_iters:
            return False
        flag = torch.tensor([1.0 if stop['signal'] else 0.0], device=dev)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0

    # ---- the loop ----
    model.train()
    t_last, steps_since, loss_acc = time.time(), 0, torch.zeros((), device=dev)
    warned_se = False
    try:
        while True:
            if (step % c.eval_interval == 0 or step >= c.max_iters) and evaluated_at != step:
                model.eval()
                t_eval = time.time()
                windows = (val_data.windows(c.batch_size, c.block_size + 1) if c.eval_iters == 0 else
                           (val_data.batch(c.batch_size, c.block_size + 1, rng(c.seed, 'val', i)) for i in range(c.eval_iters)))
                with autocast:
                    metrics = objective.evaluate(raw_model, (w.to(dev) for w in windows))
                model.train()
                key = 'val_nelbo' if 'val_nelbo' in metrics else 'val_loss'
                val, se = metrics[key], metrics.get(key + '_se', math.nan)
                metrics['epoch'] = step * tokens_per_step / train_data.tokens
                print0(f"step {step} (epoch {metrics['epoch']:.2f}): " + ', '.join(
                    f'{k} {v:.4f}' + (f' (se {metrics[k + "_se"]:.4f})' if k + '_se' in metrics else '')
                    for k, v in metrics.items() if not k.endswith('_se') and k != 'epoch'))
                if se > 0.01 * val and not warned_se:
                    print0(f"warning: the standard error of {key} is {100 * se / val:.1f}% of it; raise --eval_iters "
                           "(0 = the whole validation split) for a steadier value")
                    warned_se = True
                if not math.isfinite(val) or not finite_weights(raw_model):
                    diverged(f"validation loss {val}" if not math.isfinite(val) else "non-finite weights")
                if c.diverge_ratio and val > c.diverge_ratio * best_val:
                    diverged(f"validation loss {val:.4f} is over {c.diverge_ratio:g}x the best {best_val:.4f}")
                evaluated_at, improved = step, val < best_val
                best_val = min(best_val, val)
                log({'step': step, 'loss': metrics['val_loss'], **metrics})
                save('finished' if step >= c.max_iters else 'running')
                if improved and master:
                    keep_best(ckpt_path)
                t_last += time.time() - t_eval   # ms/step counts training steps only
            if stop_requested():
                if not finite_weights(raw_model):  # never save what diverged since the last evaluation
                    diverged("non-finite weights")
                save('interrupted')
                print0(f"signal {stop['signal'] or 'on another rank'}: saved step {step} to {ckpt_path}; "
                       f"exiting {EXIT_RESUMABLE} (rerun with --init_from=resume to continue)")
                if ddp:
                    model = None  # release the DDP wrapper before its process group
                    shutdown_ddp(dist)
                sys.exit(EXIT_RESUMABLE)
            if step >= c.max_iters:
                break
            lr = lr_at(step, c)
            for group in optimizer.param_groups:
                group['lr'] = lr
            for micro in range(micro_per_rank):
                g = rank * micro_per_rank + micro   # this micro-batch's place in the global batch
                window = train_data.batch(c.batch_size, c.block_size + 1, rng(c.seed, 'data', step, g))
                window = window.pin_memory().to(dev, non_blocking=True) if dev.type == 'cuda' else window.to(dev)
                sync = model.no_sync() if ddp and micro < micro_per_rank - 1 else contextlib.nullcontext()
                with sync:
                    with autocast:
                        loss = objective.loss(model, window, step, g)
                    (loss / micro_per_rank).backward()
                loss_acc += loss.detach().float() / micro_per_rank   # on the device: no sync per step
            if c.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), c.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            steps_since += 1
            if step % c.log_interval == 0 or step == c.max_iters:
                train_loss = (loss_acc / steps_since).reshape(1)
                if ddp:
                    dist.all_reduce(train_loss, op=dist.ReduceOp.AVG)
                train_loss = train_loss.item()
                dt = (time.time() - t_last) / steps_since
                rec = {'step': step, 'loss': train_loss, 'lr': lr, 'ms_per_step': 1000 * dt,
                       'tokens_per_s': tokens_per_step / dt}
                line = (f"step {step}/{c.max_iters} | loss {train_loss:.4f} | lr {lr:.2e} | {1000 * dt:.1f} ms/step | "
                        f"{rec['tokens_per_s']:,.0f} tok/s")
                if peak:
                    rec['mfu'] = flops_per_step / dt / world / peak
                    line += f" | mfu {100 * rec['mfu']:.1f}%"
                print0(line + f" | eta {fmt_time((c.max_iters - step) * dt)}")
                if not math.isfinite(train_loss):
                    diverged(f"training loss {train_loss}")
                log(rec)
                t_last, steps_since, loss_acc = time.time(), 0, torch.zeros((), device=dev)
    except KeyboardInterrupt:  # a second Ctrl-C: stop now; say so, the checkpoint is the last save
        if master:
            write_status(out_dir, 'stopped', saved[0] if saved[0] is not None else 0, c.max_iters)
        raise
    finally:
        for s, h in previous.items():
            signal.signal(s, h)

    if master and c.sample_at_end:
        print0('-' * 60)
        print0(objective.sample(raw_model.eval(), Tokenizer(meta)))
        print0('-' * 60)
        print0(f"more samples: python sample.py --out_dir={out_dir}")
    if ddp:
        model = None  # release the DDP wrapper before its process group
        shutdown_ddp(dist)
    if wandb is not None:
        wandb.finish()
    if lock is not None:
        lock.close()
    return raw_model


OBJECTIVE = DiffusionObjective   # what load_run builds for this script's checkpoints


def main():
    train(configure(globals(), rules=RULES, verbose=False), DiffusionObjective, __file__)


if __name__ == '__main__':
    run_cli(main)
