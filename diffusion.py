"""
diffusion.py: a masked (absorbing-state) discrete diffusion language model in one file.

    python prepare.py                         # Tiny Shakespeare, character level
    python diffusion.py                       # train the default small model on CPU
    python diffusion.py --schedule=cosine     # any setting below is a --key=value
    python diffusion.py config/char_10m.py    # or a config file of `name = value` lines

Top to bottom: settings, the settings parser (configure), the model (shared with gpt.py),
the six noise schedules, the forward process and NELBO loss, data, checkpoints, and one
flat training loop (train) that gpt.py reuses with its own objective.

Forward process (D3PM, Austin et al. 2021; MDLM, Sahoo et al. 2024): each token survives
with probability alpha(t), else becomes MASK. The model is trained with the continuous-time
negative ELBO (MDLM eq. 10), each masked token's cross-entropy weighted by
-alpha'(t) / (1 - alpha(t)). SUBS parameterisation: the MASK logit is -inf, and only masked
positions count in the loss.
"""
import ast
import contextlib
import difflib
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
# setting that `--key=value` (or a config file) overrides. gpt.py takes the same ones.
# I/O
out_dir = ''                    # run folder; '' = out/diffusion-<dataset>-<schedule>-<masking>
init_from = 'scratch'           # 'scratch' (refuses to overwrite a run) | 'resume' | 'auto' (resume if out_dir has ckpt.pt)
eval_interval = 200             # steps between validation + checkpoint
eval_iters = 20                 # validation batches per evaluation
log_interval = 10               # steps between log lines
sample_at_end = True            # print a sample when training finishes
# data
dataset = 'shakespeare_char'    # folder under data_dir written by prepare.py
data_dir = 'data'               # where prepare.py writes datasets
batch_size = 32                 # sequences per micro-step per process
block_size = 128                # tokens per sequence
gradient_accumulation_steps = 1 # micro-steps per optimizer step, summed over all DDP processes
# model (see ModelConfig)
n_layer = 4                     # transformer blocks
n_head = 4                      # attention heads
n_embd = 192                    # width
mlp = 'relu2'                   # 'relu2' (ReLU squared) | 'swiglu'
tie_weights = False             # share token embedding and output head
dropout = 0.0                   # dropout probability (0 for pretraining)
time_cond = False               # condition on the mask rate (diffusion only; MDLM finds it unnecessary)
# diffusion (gpt.py has none of these)
schedule = 'linear'             # noise schedule alpha(t): one of SCHEDULES below
masking = 'uniform'             # 'uniform' | 'entropy' (per-token rate scaled by clamp(2 - ent_norm, 0.5, 1.5))
entropy_file = ''               # .npy of per-token-id normalised entropy; '' = <data_dir>/<dataset>/entropy.npy
loss_weighting = 'nelbo'        # 'nelbo' (-alpha'/(1-alpha), the proper bound) | 'masked_mean' (plain mean over masked tokens)
t_min = 1e-3                    # smallest t drawn: keeps the NELBO weight finite near t=0
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

EXIT_RESUMABLE = 75   # exit code after a signal-triggered save (EX_TEMPFAIL): "run me again"
EXIT_USAGE = 2        # bad settings
DIFFUSION_ONLY = ('schedule', 'masking', 'entropy_file', 'loss_weighting', 't_min', 'time_cond')
MODEL_KEYS = ('n_layer', 'n_head', 'n_embd', 'block_size', 'mlp', 'tie_weights', 'dropout', 'time_cond')


class UserError(Exception):
    """A problem the user can fix; scripts print it as one line and exit with .code."""
    def __init__(self, msg, code=1):
        super().__init__(msg)
        self.code = code


def run_cli(main):
    """Run a script's main(); a UserError becomes one line on stderr and its exit code."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.code)


def is_master():
    return int(os.environ.get('RANK', 0)) == 0


def print0(*args, **kwargs):
    """print on DDP rank 0 only."""
    if is_master():
        print(*args, **kwargs, flush=True)

# -----------------------------------------------------------------------------
# configuration: configure(globals()) applies a config file and --key=value overrides


class Config(dict):
    """The resolved settings; .explicit holds the keys set on the command line or in a file."""
    explicit = frozenset()


def settings_of(g, exclude=()):
    """The settings in a module's globals: lowercase names bound to bool/int/float/str/None."""
    return {k: v for k, v in g.items()
            if k.islower() and not k.startswith('_') and k not in exclude
            and (v is None or type(v) in (bool, int, float, str))}


def shared_settings():
    """diffusion.py's settings minus the diffusion-only ones: gpt.py starts from these."""
    return settings_of(globals(), exclude=DIFFUSION_ONLY)


def _closest(key, keys):
    def score(k):
        initials = ''.join(w[0] for w in k.split('_') if w)
        return max(difflib.SequenceMatcher(None, key, k).ratio(),
                   1.0 if key == initials else 0.0, 0.9 if k.startswith(key) else 0.0)
    return max(sorted(keys), key=score)


def _coerce(key, value, default, from_text):
    """Convert value (text from the command line, or a literal from a file) to default's type."""
    kind = type(default)
    bad = UserError(f"--{key}={value!r}: expected {kind.__name__ if default is not None else 'a literal'}"
                    f" like the default {default!r}", EXIT_USAGE)
    if default is None:
        if not from_text:
            return value
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value  # plain text
    if isinstance(default, bool):
        if not from_text:
            if isinstance(value, bool):
                return value
            raise bad
        low = value.strip().lower()
        if low in ('true', '1', 'yes', 'on'):
            return True
        if low in ('false', '0', 'no', 'off'):
            return False
        raise bad
    if isinstance(default, int):
        if not from_text:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise bad
        try:
            return int(value)
        except ValueError:
            pass
        try:
            f = float(value)  # accept 1e9 for an integer setting
        except ValueError:
            raise bad from None
        if f.is_integer():
            return int(f)
        raise bad
    if isinstance(default, float):
        if not from_text:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            raise bad
        try:
            return float(value)
        except ValueError:
            raise bad from None
    if not from_text and not isinstance(value, str):
        raise bad
    return value


def read_config_file(path):
    """A config file holds `name = literal` lines only; it is parsed, never executed."""
    try:
        with open(path) as f:
            src = f.read()
    except OSError as e:
        raise UserError(f"cannot read config file {path}: {e.strerror}", EXIT_USAGE) from None
    try:
        tree = ast.parse(src, path)
    except SyntaxError as e:
        raise UserError(f"{path}:{e.lineno}: syntax error in config file", EXIT_USAGE) from None
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # a docstring
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)):
            raise UserError(f"{path}:{node.lineno}: a config file may only hold `name = value` lines",
                            EXIT_USAGE)
        name = node.targets[0].id
        try:
            out[name] = ast.literal_eval(node.value)
        except ValueError:
            raise UserError(f"{path}:{node.lineno}: the value of {name} must be a literal "
                            "(number, string, bool or None)", EXIT_USAGE) from None
    return out


def configure(g, argv=None, choices=None, exclude=(), verbose=True):
    """Override the settings in g (a script's globals()) from a config file and --key=value args.

    Values are type-checked against the defaults (an int is accepted for a float; bools take
    true/false/1/0/yes/no; a None default takes any Python literal, else the text); a value
    may contain '='. Unknown keys and bad values raise UserError (exit status 2) naming the
    closest valid key. Updates g in place and returns the resolved Config."""
    argv = sys.argv[1:] if argv is None else argv
    keys = settings_of(g, exclude)
    choices = choices or {}
    explicit = set()

    def apply(key, value, from_text, where):
        if key not in keys:
            raise UserError(f"unknown setting {where}{key}; the closest valid one is "
                            f"--{_closest(key, keys)}", EXIT_USAGE)
        v = _coerce(key, value, keys[key], from_text)
        if key in choices and v not in choices[key]:
            raise UserError(f"--{key}={v!r}: must be one of {', '.join(map(str, choices[key]))}",
                            EXIT_USAGE)
        g[key] = v
        explicit.add(key)

    for arg in argv:
        if arg.startswith('--'):
            key, eq, value = arg[2:].partition('=')
            if not eq:
                if key in keys and isinstance(keys[key], bool):
                    value = 'true'  # --compile means --compile=true
                else:
                    raise UserError(f"{arg}: expected --key=value", EXIT_USAGE)
            apply(key.replace('-', '_'), value, True, '--')
        elif arg.endswith('.py'):
            for key, value in read_config_file(arg).items():
                apply(key, value, False, f'{arg}: ')
        else:
            raise UserError(f"unexpected argument {arg!r}: use --key=value or a config file path",
                            EXIT_USAGE)
    cfg = Config(settings_of(g, exclude))
    cfg.explicit = frozenset(explicit)
    if verbose:
        print0('config: ' + ' '.join(f'{k}={v!r}' for k, v in cfg.items()))
    return cfg

# -----------------------------------------------------------------------------
# the model: one transformer for both objectives; only ModelConfig.causal differs


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


def padded_vocab(n_tokens, multiple=64):
    """Embedding rows for n_tokens real tokens + MASK, rounded up for fast matmuls."""
    return (n_tokens + 1 + multiple - 1) // multiple * multiple


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def rope_table(block_size, head_dim, base=10000.0):
    """cos, sin of shape (block_size, head_dim/2) for rotary position embeddings (Su et al. 2021)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(block_size, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """x: (B, T, H, D); cos, sin: (T, D/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[None, :, None, :].to(x.dtype), sin[None, :, None, :].to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def attend(q, k, v, causal, dropout_p=0.0):
    """The one place where attention direction is decided. q: (B, H, Tq, D), k, v: (B, H, Tk, D).

    causal=False (diffusion): every position attends to every position.
    causal=True (GPT): position i attends to positions <= i. With a KV cache the Tq queries are
    the last Tq of the Tk positions, so the causal mask is aligned bottom-right."""
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
        self.head_dim = cfg.n_embd // cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.q_norm = RMSNorm(self.head_dim)  # QK-norm keeps attention logits bounded
        self.k_norm = RMSNorm(self.head_dim)
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin, cache=None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).unbind(2)  # (B, T, H, D)
        q, k = apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)        # (B, H, T, D)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        y = attend(q, k, v, self.causal, self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


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
            raise ValueError(f"unknown mlp {cfg.mlp!r}: use 'relu2' or 'swiglu'")
        self.proj = nn.Linear(hidden, cfg.n_embd, bias=False)

    def forward(self, x):
        h = self.fc(x)
        if self.kind == 'relu2':
            h = F.relu(h).square()
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

    def forward(self, x, cos, sin, cache=None):
        x = x + self.drop(self.attn(self.norm1(x), cos, sin, cache))
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
        return 6 * matmul + 12 * c.n_layer * c.n_embd * c.block_size

    def forward(self, idx, mask_rate=None, cache=None, select=None):
        """idx: (B, T) token ids. mask_rate: (B,) fraction masked, used when time_cond.
        cache: a KVCache to read and extend (positions continue from cache.pos).
        select: optional (B, T) bool; then only those positions' logits are returned, (M, V).
        Returns logits (B, T, V) with -inf for MASK and padding ids."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.cfg.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.cfg.block_size}")
        x = self.wte(idx)                                        # (B, T, C)
        if self.time_mlp is not None:
            if mask_rate is None:
                raise ValueError("this model is time-conditioned: pass mask_rate")
            x = x + self.time_mlp(timestep_embedding(mask_rate, 256))[:, None, :]
        x = self.drop(x)
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        for block in self.blocks:
            x = block(x, cos, sin, cache)
        if cache is not None:
            cache.pos += T
        x = self.norm(x)
        if select is not None:
            x = x[select]                                        # (M, C)
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
# noise schedules: alpha(t) is the probability that a token is still clean at time t


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
    def __init__(self, name):
        if name not in SCHEDULES:
            raise UserError(f"unknown schedule {name!r}: use one of {', '.join(SCHEDULES)}", EXIT_USAGE)
        self.name = name
        self._alpha, self._dalpha = SCHEDULES[name]

    def alpha(self, t):
        return self._alpha(t)

    def dalpha(self, t):
        return self._dalpha(t)

    def weight(self, t):
        """The continuous-time NELBO weight -alpha'(t) / (1 - alpha(t)) (MDLM eq. 10)."""
        return -self._dalpha(t) / (1 - self._alpha(t))

# -----------------------------------------------------------------------------
# forward process, loss and deterministic randomness


def rng(*key):
    """A torch.Generator seeded by a hash of key: randomness that is a pure function of
    (seed, purpose, step, micro-batch), so resume and DDP need no generator state."""
    h = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(h, 'little') >> 1)


def stratified_times(u0, start, count, total, t_min):
    """Times for sequences start..start+count-1 of a global batch of `total`: one uniform offset
    u0 shared by the whole batch, then evenly spaced (low-variance, stratified), in [t_min, 1)."""
    i = torch.arange(start, start + count, dtype=torch.float64)
    u = torch.remainder(u0 + i / total, 1.0)
    return t_min + (1 - t_min) * u


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
        arr = np.load(path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read entropy file {path}: {e}") from None
    if arr.ndim != 1 or len(arr) != n_tokens:
        raise UserError(f"entropy file {path} has shape {arr.shape}; expected ({n_tokens},), "
                        "one value per token id of the dataset's vocabulary")
    if not np.all(np.isfinite(arr)):
        raise UserError(f"entropy file {path} holds non-finite values")
    return arr


def mask_probs(x, alpha, ent_weight=None):
    """Per-token mask probability: (1 - alpha) for uniform masking, times the token's entropy
    weight (clamped to 1) for entropy masking. x: (B, T); alpha: (B,) -> (B, T) float64."""
    p = (1 - alpha.to(torch.float64))[:, None].expand(x.shape)
    if ent_weight is not None:
        p = (p * ent_weight[x.cpu()]).clamp(max=1.0)
    return p


def draw_mask(x, alpha, gen, ent_weight=None):
    """q(z_t | x): which positions of x (B, T) are MASK at survival probability alpha (B,)."""
    p = mask_probs(x, alpha, ent_weight)
    return (torch.rand(x.shape, generator=gen, dtype=torch.float64) < p).to(x.device)


def masked_ce(model, x, mask, mask_id, mask_rate=None):
    """Replace x at mask with MASK, run the model, and return each sequence's summed
    cross-entropy over its masked positions: (B,) float32. Unmasked positions never count."""
    z = torch.where(mask, mask_id, x)                           # (B, T)
    logits = model(z, mask_rate=mask_rate, select=mask)         # (M, V)
    ce = F.cross_entropy(logits.float(), x[mask], reduction='none')  # (M,) in fp32
    return torch.zeros(x.shape, device=x.device).masked_scatter(mask, ce).sum(1)


def diffusion_loss(model, x, t, schedule, mask_id, gen, ent_weight=None, weighting='nelbo', t_min=0.0):
    """The training loss on clean tokens x (B, T) at times t (B,) float64 on the CPU.

    weighting='nelbo': per sequence, (1 - t_min) * w(t) * sum of masked CE / T, the Monte Carlo
    estimate of the NELBO in nats per token over t in [t_min, 1]. Returns (loss, per_seq).
    weighting='masked_mean': the plain mean CE over masked tokens (the reference code's)."""
    alpha = schedule.alpha(t)
    mask = draw_mask(x, alpha, gen, ent_weight)
    ce_sum = masked_ce(model, x, mask, mask_id, (1 - alpha).float().to(x.device))
    if weighting == 'masked_mean':
        loss = ce_sum.sum() / mask.sum().clamp(min=1)
        return loss, ce_sum / mask.sum(1).clamp(min=1)
    w = ((1 - t_min) * schedule.weight(t)).float().to(x.device)
    per_seq = w * ce_sum / x.size(1)
    return per_seq.mean(), per_seq


class DiffusionObjective:
    """What makes this a diffusion LM; gpt.py's GPTObjective fills the same slots."""
    name = 'diffusion'
    causal = False          # difference 2: bidirectional attention

    def __init__(self, c, n_tokens, vocab_size, micro_total):
        self.c, self.micro_total = c, micro_total
        self.mask_id = n_tokens                     # difference 1: the MASK token
        self.schedule = Schedule(c.schedule)
        self.uniform = Schedule('linear')
        self.ent_weight = None
        self.own_is_uniform = c.schedule == 'linear' and c.masking == 'uniform' and c.loss_weighting == 'nelbo'
        if c.masking == 'entropy':
            path = c.entropy_file or os.path.join(c.data_dir, c.dataset, 'entropy.npy')
            self.ent_weight = entropy_weights(load_entropy(path, n_tokens), vocab_size)

    def loss(self, model, window, step, micro):
        """difference 3 and 4: the NELBO over masked positions. window: (B, block_size + 1);
        the last token is GPT's target only, so both objectives see the same tokens."""
        x = window[:, :-1]
        B = x.size(0)
        u0 = torch.rand((), generator=rng(self.c.seed, 't', step), dtype=torch.float64)
        t = stratified_times(u0, micro * B, B, B * self.micro_total, self.c.t_min)
        loss, _ = diffusion_loss(model, x, t, self.schedule, self.mask_id, rng(self.c.seed, 'mask', step, micro),
                                 self.ent_weight, self.c.loss_weighting, self.c.t_min)
        return loss

    @torch.no_grad()
    def evaluate(self, model, batches):
        """val_loss: the training objective (own schedule and masking) on validation data.
        val_nelbo: the uniform-masking NELBO, the same yardstick for every diffusion model."""
        own, fair = [], []
        for i, window in enumerate(batches):
            x = window[:, :-1]
            B = x.size(0)
            u0 = torch.rand((), generator=rng(self.c.seed, 'val-t', i), dtype=torch.float64)
            t = stratified_times(u0, 0, B, B, self.c.t_min)
            own.append(diffusion_loss(model, x, t, self.schedule, self.mask_id, rng(self.c.seed, 'val-mask', i),
                                      self.ent_weight, self.c.loss_weighting, self.c.t_min)[0])
            if not self.own_is_uniform:  # else the same draws would give the same number again
                fair.append(diffusion_loss(model, x, t, self.uniform, self.mask_id, rng(self.c.seed, 'val-mask', i),
                                           None, 'nelbo', self.c.t_min)[0])
        fair = fair or own
        return {'val_loss': torch.stack(own).mean().item(), 'val_nelbo': torch.stack(fair).mean().item()}

    def sample(self, model, tokenizer):
        """difference 5: generation by iterative unmasking (the samplers live in sample.py)."""
        import sample
        return sample.sample_text(model, tokenizer, 'diffusion', schedule=self.c.schedule)

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
    path = os.path.join(data_dir, dataset, 'meta.json')
    if not os.path.exists(path):
        raise UserError(f"no data at {os.path.join(data_dir, dataset)}; make it with: "
                        f"python prepare.py --dataset={dataset}")
    with open(path) as f:
        return json.load(f)


class TokenData:
    """One split of a dataset: uint16 shards listed in meta.json, memmapped and size-checked.
    Batches are random windows, a pure function of the generator passed in."""
    def __init__(self, data_dir, dataset, split, meta=None):
        self.meta = meta or load_meta(data_dir, dataset)
        info = self.meta.get('splits', {}).get(split)
        if info is None:
            raise UserError(f"{dataset} has no {split} split; rerun python prepare.py --dataset={dataset}")
        self.paths = [os.path.join(data_dir, dataset, s) for s in info['shards']]
        self.sizes = list(info['tokens'])
        self.dtype = np.dtype(self.meta.get('dtype', 'uint16'))
        for path, n in zip(self.paths, self.sizes):
            if not os.path.exists(path):
                raise UserError(f"missing {path}; rerun python prepare.py --dataset={dataset}")
            if os.path.getsize(path) != n * self.dtype.itemsize:
                raise UserError(f"{path} holds {os.path.getsize(path) // self.dtype.itemsize} tokens but "
                                f"meta.json says {n}; rerun python prepare.py --dataset={dataset}")

    def batch(self, batch_size, length, gen):
        """(batch_size, length) int64 windows: a shard chosen in proportion to its windows, then
        an offset within it."""
        counts = torch.tensor([max(n - length + 1, 0) for n in self.sizes], dtype=torch.float64)
        if counts.sum() == 0:
            raise UserError(f"every shard is shorter than {length} tokens; lower --block_size")
        shard = torch.multinomial(counts, batch_size, replacement=True, generator=gen) if len(counts) > 1 \
            else torch.zeros(batch_size, dtype=torch.long)
        offs = (torch.rand(batch_size, generator=gen, dtype=torch.float64) * counts[shard]).long()
        # memmaps are opened per batch, not kept (nanoGPT: a long-lived memmap grows resident memory)
        maps = {s: np.memmap(self.paths[s], dtype=self.dtype, mode='r') for s in set(shard.tolist())}
        return torch.stack([torch.from_numpy(maps[s][o:o + length].astype(np.int64))
                            for s, o in zip(shard.tolist(), offs.tolist())])

# -----------------------------------------------------------------------------
# checkpoints: atomic writes, weights_only loads, one-line errors


def atomic_save(obj, path):
    """torch.save to a temporary file, flush + fsync, then rename: a crash leaves the old file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, 'wb') as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    with contextlib.suppress(OSError):  # make the rename itself durable where the OS allows
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def atomic_write_text(text, path):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, 'w') as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    return ckpt


def build_model(ckpt, path='checkpoint'):
    """Rebuild the (uncompiled) model from the config stored in a checkpoint and load its weights."""
    names = {f.name for f in fields(ModelConfig)}
    unknown = set(ckpt['model_args']) - names
    if unknown:
        raise UserError(f"{path}: model config has unknown fields {sorted(unknown)}")
    model = Transformer(ModelConfig(**ckpt['model_args']))
    try:
        model.load_state_dict(ckpt['model'])
    except RuntimeError as e:
        first = [ln.strip() for ln in str(e).splitlines() if ln.strip()][1:2] or [str(e)[:160]]
        raise UserError(f"{path}: weights do not match the stored model config ({first[0][:160]})") from None
    return model


def load_checkpoint(path, device='cpu'):
    """(model in eval mode on device, checkpoint dict): for sample.py, evaluate.py, visualize.py."""
    ckpt = read_checkpoint(path, device)
    model = build_model(ckpt, path).to(device).eval()
    return model, ckpt


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
# training: one flat loop shared by diffusion.py and gpt.py

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
    if name == 'auto':
        if torch.cuda.is_available():
            name = f'cuda:{local_rank}'
        elif getattr(torch.backends, 'mps', None) and torch.backends.mps.is_available():
            name = 'mps'
        else:
            name = 'cpu'
    elif name == 'cuda':
        name = f'cuda:{local_rank}'
    if name.startswith('cuda') and not torch.cuda.is_available():
        raise UserError("--device=cuda but CUDA is not available here; use --device=cpu")
    return torch.device(name)


def default_out_dir(c, objective):
    if objective == 'diffusion':
        return os.path.join('out', f'diffusion-{c["dataset"]}-{c["schedule"]}-{c["masking"]}')
    return os.path.join('out', f'{objective}-{c["dataset"]}')


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
    extra = {'fused': True} if device.type == 'cuda' else {}
    return torch.optim.AdamW(groups, lr=c.learning_rate, betas=(c.beta1, c.beta2), **extra)


def _resume_config(cfg, ckpt, objective_name, path):
    """The checkpoint's settings, updated by those set explicitly now; the model and the
    objective cannot change under a resumed run."""
    if ckpt['objective'] != objective_name:
        raise UserError(f"{path} holds a {ckpt['objective']} run; resume it with {ckpt['objective']}.py")
    merged = dict(ckpt['config'])
    fixed = set(MODEL_KEYS) | {'dataset', 'schedule', 'masking', 'loss_weighting'}
    for k in sorted(cfg.explicit):
        if k in fixed and k in merged and merged[k] != cfg[k]:
            raise UserError(f"--{k}={cfg[k]!r} differs from the checkpoint's {merged[k]!r}; a resumed run "
                            "keeps its model and objective (start a new --out_dir instead)", EXIT_USAGE)
    for k, v in cfg.items():
        if k in cfg.explicit or k not in merged:
            merged[k] = v
    return merged


def shutdown_ddp(dist):
    """Leave DDP cleanly: wait for every rank, collect the DDP wrapper the caller has just
    dropped (its reducer holds gloo/NCCL work objects, and a gloo worker thread destroying one
    during interpreter shutdown aborts the process), then destroy the group."""
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()


def train(cfg, objective_cls):
    """Train with the settings in cfg (a Config from configure) and an objective class
    (DiffusionObjective here, GPTObjective in gpt.py). Exits with EXIT_RESUMABLE after a
    SIGUSR1/SIGTERM-triggered save; returns normally when max_iters is reached."""
    # ---- processes and devices: DDP from torchrun's environment ----
    ddp = int(os.environ.get('RANK', -1)) != -1
    rank, local_rank, world = 0, 0, 1
    if ddp:
        rank, local_rank = int(os.environ['RANK']), int(os.environ['LOCAL_RANK'])
        world = int(os.environ['WORLD_SIZE'])
    master = rank == 0
    dev = resolve_device(cfg['device'], local_rank)
    if ddp:
        import torch.distributed as dist
        be = cfg['backend'] if cfg['backend'] != 'auto' else ('nccl' if dev.type == 'cuda' else 'gloo')
        if dev.type == 'cuda':
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=be)

    # ---- where the run lives; resume or start ----
    objective_name = objective_cls.name
    explicit = getattr(cfg, 'explicit', frozenset())
    cfg = Config(cfg, out_dir=cfg['out_dir'] or default_out_dir(cfg, objective_name))
    cfg.explicit = explicit
    out_dir = cfg['out_dir']
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')
    mode = cfg['init_from']
    if mode == 'auto':
        mode = 'resume' if os.path.exists(ckpt_path) else 'scratch'
    ckpt = None
    if mode == 'resume':
        ckpt = read_checkpoint(ckpt_path)
        cfg = Config(_resume_config(cfg, ckpt, objective_name, ckpt_path))
        cfg.explicit = explicit
    elif mode == 'scratch':
        if os.path.exists(ckpt_path):
            raise UserError(f"{out_dir} already holds a run; continue it with --init_from=resume, or "
                            "choose another --out_dir (or delete that folder)", EXIT_USAGE)
    else:
        raise UserError(f"--init_from={mode!r}: use scratch, resume or auto", EXIT_USAGE)
    c = type('Settings', (), dict(cfg))  # attribute access: c.batch_size
    if c.gradient_accumulation_steps % world:
        raise UserError(f"gradient_accumulation_steps={c.gradient_accumulation_steps} is not a multiple of "
                        f"the {world} DDP processes", EXIT_USAGE)
    micro_per_rank = c.gradient_accumulation_steps // world
    if master:
        os.makedirs(out_dir, exist_ok=True)

    # ---- data, model, objective ----
    meta = load_meta(c.data_dir, c.dataset)
    train_data = TokenData(c.data_dir, c.dataset, 'train', meta)
    val_data = TokenData(c.data_dir, c.dataset, 'val', meta)
    n_tokens = meta['vocab_size']
    model_cfg = ModelConfig(vocab_size=padded_vocab(n_tokens), mask_id=n_tokens, block_size=c.block_size,
                            n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, mlp=c.mlp,
                            tie_weights=c.tie_weights, causal=objective_cls.causal,
                            time_cond=getattr(c, 'time_cond', False), dropout=c.dropout)
    torch.manual_seed(c.seed)  # identical initial weights on every rank
    model = Transformer(model_cfg) if ckpt is None else build_model(ckpt, ckpt_path)
    objective = objective_cls(c, n_tokens, model_cfg.vocab_size, c.gradient_accumulation_steps)
    model.to(dev)
    optimizer = make_optimizer(model, c, dev)
    step, best_val, evaluated_at = 0, float('inf'), -1
    if ckpt is not None:
        optimizer.load_state_dict(ckpt['optimizer'])
        step, best_val = ckpt['step'], ckpt.get('best_val_loss', float('inf'))
        evaluated_at = ckpt.get('evaluated_at', -1)
    raw_model = model
    torch.manual_seed(c.seed + rank)  # per-rank randomness (dropout)
    random.seed(c.seed + rank)
    np.random.seed(c.seed + rank)
    if ckpt is not None and 'rng' in ckpt:
        states = ckpt['rng']
        if len(states) == world:
            set_rng_state(states[rank])
        else:
            print0(f"note: checkpoint has RNG state for {len(states)} processes, this run has {world}; reseeded")
    if c.compile:
        model = torch.compile(model)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[local_rank] if dev.type == 'cuda' else None)
    amp_dtype = {'auto': torch.bfloat16 if dev.type == 'cuda' else None, 'float32': None,
                 'bfloat16': torch.bfloat16}.get(c.dtype, 'bad')
    if amp_dtype == 'bad':
        raise UserError(f"--dtype={c.dtype!r}: use auto, float32 or bfloat16", EXIT_USAGE)
    autocast = (torch.autocast(device_type=dev.type, dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())
    tokenizer = Tokenizer(meta)

    tokens_per_step = c.batch_size * (c.block_size) * c.gradient_accumulation_steps
    peak = peak_flops(dev)
    flops_per_step = raw_model.flops_per_token() * tokens_per_step
    print0(f"{objective_name}: {raw_model.num_params() / 1e6:.2f}M parameters, {world} process(es) on {dev}, "
           f"{tokens_per_step:,} tokens/step, out_dir={out_dir}, starting at step {step}")
    log_path = os.path.join(out_dir, 'log.jsonl')
    if master:
        if os.path.exists(log_path):  # drop lines from after the checkpoint (a crash, not a signal)
            with open(log_path) as f:
                keep = [ln for ln in f if ln.strip() and json.loads(ln).get('step', 0) <= step]
            atomic_write_text(''.join(keep), log_path)
        with open(log_path, 'a') as f:
            f.write(json.dumps({'step': step, 'event': 'start', 'config': dict(cfg)}) + '\n')

    def log(record):
        if master:
            with open(log_path, 'a') as f:
                f.write(json.dumps(record) + '\n')

    def val_batches():
        for i in range(c.eval_iters):  # the same validation windows at every evaluation
            yield val_data.batch(c.batch_size, c.block_size + 1, rng(c.seed, 'val', i)).to(dev)

    def save(status):
        states = [rng_state()]
        if ddp:
            states = [None] * world
            dist.all_gather_object(states, rng_state())
        if master:
            atomic_save({'model': raw_model.state_dict(), 'optimizer': optimizer.state_dict(),
                         'model_args': asdict(model_cfg), 'objective': objective_name, 'config': dict(cfg),
                         'meta': meta, 'step': step, 'best_val_loss': best_val, 'evaluated_at': evaluated_at,
                         'rng': states, 'data': {'sampler': 'random windows keyed by (seed, step, micro)',
                                                 'seed': c.seed, 'next_step': step}}, ckpt_path)
            atomic_write_text(json.dumps({'status': status, 'step': step, 'max_iters': c.max_iters}) + '\n',
                              os.path.join(out_dir, 'status.json'))
        if ddp:
            dist.barrier()

    # ---- signals: finish the current step, save, exit EXIT_RESUMABLE ----
    stop = {'signal': None}

    def on_signal(signum, frame):
        stop['signal'] = signum
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGUSR1, signal.SIGTERM)}

    def stop_requested():
        flag = torch.tensor([1.0 if stop['signal'] else 0.0], device=dev)
        if ddp:  # every rank agrees before anyone saves
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0

    # ---- the loop ----
    model.train()
    t_last, steps_since, loss_acc = time.time(), 0, 0.0
    try:
        while True:
            if (step % c.eval_interval == 0 or step >= c.max_iters) and evaluated_at != step:
                model.eval()
                with autocast:
                    metrics = objective.evaluate(raw_model, val_batches())
                model.train()
                evaluated_at = step
                key = 'val_nelbo' if 'val_nelbo' in metrics else 'val_loss'
                best_val = min(best_val, metrics[key])
                print0(f"step {step}: " + ', '.join(f'{k} {v:.4f}' for k, v in metrics.items()))
                log({'step': step, 'loss': metrics['val_loss'], **metrics})
                save('finished' if step >= c.max_iters else 'running')
                t_last = time.time()
            if stop_requested():
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
                loss_acc += loss.item() / micro_per_rank
            if c.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), c.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            steps_since += 1
            if step % c.log_interval == 0 or step == c.max_iters:
                train_loss = torch.tensor([loss_acc / steps_since], device=dev)
                if ddp:
                    dist.all_reduce(train_loss, op=dist.ReduceOp.AVG)
                if dev.type == 'cuda':
                    torch.cuda.synchronize(dev)
                dt = (time.time() - t_last) / steps_since
                tok_s = tokens_per_step / dt
                rec = {'step': step, 'loss': train_loss.item(), 'lr': lr, 'ms_per_step': 1000 * dt,
                       'tokens_per_s': tok_s}
                line = (f"step {step} | loss {rec['loss']:.4f} | lr {lr:.2e} | {1000 * dt:.1f} ms/step | "
                        f"{tok_s:,.0f} tok/s")
                if peak:
                    rec['mfu'] = flops_per_step / dt / world / peak
                    line += f" | mfu {100 * rec['mfu']:.1f}%"
                print0(line)
                log(rec)
                t_last, steps_since, loss_acc = time.time(), 0, 0.0
    finally:
        for s, h in previous.items():
            signal.signal(s, h)

    if master and c.sample_at_end:
        print0('-' * 60)
        print0(objective.sample(raw_model.eval(), tokenizer))
        print0('-' * 60)
        print0(f"more samples: python sample.py --out_dir={out_dir}")
    if ddp:
        model = None  # release the DDP wrapper before its process group
        shutdown_ddp(dist)
    return raw_model


CHOICES = {'schedule': tuple(SCHEDULES), 'masking': ('uniform', 'entropy'), 'mlp': ('relu2', 'swiglu'),
           'loss_weighting': ('nelbo', 'masked_mean'), 'init_from': ('scratch', 'resume', 'auto'),
           'dtype': ('auto', 'float32', 'bfloat16'), 'backend': ('auto', 'nccl', 'gloo')}


def main():
    cfg = configure(globals(), choices=CHOICES)
    train(cfg, DiffusionObjective)


if __name__ == '__main__':
    run_cli(main)
