"""
diffusion.py: a masked (absorbing-state) discrete diffusion language model in one file.

    python prepare.py                         # Tiny Shakespeare, character level
    python diffusion.py                       # train the default small model on CPU
    python diffusion.py --schedule=cosine     # any setting below is a --key=value
    python diffusion.py config/char_10m.py    # or a config file of `name = value` lines
    python diffusion.py --help                # every setting, its default, range and meaning

Top to bottom: settings, the model (shared with gpt.py), the noise schedules, masking rules and
loss weightings (one registry each), the objective, the ancestral sampler, and one flat training
loop (train) that gpt.py reuses with its own objective. Copy this file (beside it) to change any
of them: a checkpoint records the script that made it, and sample.py, evaluate.py and
visualize.py rebuild the model, objective and samplers from that script. The run plumbing (the
settings parser, data, checkpoints, DDP, logs, signals) is runtime.py's: a copy imports it and
never needs to change it.

Forward process (D3PM, Austin et al. 2021; MDLM, Sahoo et al. 2024): each token survives
with probability alpha(t), else becomes MASK. The model is trained with the continuous-time
negative ELBO (MDLM eq. 10), each masked token's cross-entropy weighted by
-alpha'(t) / (1 - alpha(t)). SUBS parameterisation: the MASK logit is -inf, and only masked
positions count in the loss.
"""
import contextlib
import functools
import math
import os
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from runtime import (EXIT_USAGE, ControlVariate, Run, Tokenizer, UserError, at_least, autocast_for, batch_mean,
                     build_model, configure, in_range, load_entropy, one_of, print0, rng, run_cli, settings_of,
                     to_device)

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

DIFFUSION_ONLY = ('schedule', 'masking', 'entropy_file', 'loss_weighting', 't_min', 'time_cond', 'block_len')


def shared_settings():
    """diffusion.py's settings minus the diffusion-only ones: gpt.py starts from these."""
    return {k: v for k, v in settings_of(globals()).items() if k not in DIFFUSION_ONLY}


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


# -----------------------------------------------------------------------------
# forward process, loss and deterministic randomness



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


def mask_count_cv(t, counts, T, t_min):
    """The control variate of the uniform-masking NELBO estimate, per sequence: (1 - t_min) x the
    sum over its times t (B, k) of w(t) x counts (B, k) / T - (1 - t_min), counts being the tokens
    masked at each t (k = 1, or one per block), w(t) = 1/t the linear schedule's weight. Its mean is
    exactly 0 (E[count] = t x tokens), and it carries the noise of how many tokens happened to be
    masked, which dominates the estimate at small t. Used in training (DiffusionObjective.evaluate)
    and by evaluate.py."""
    return (1 - t_min) * (counts / t).sum(1) / T - (1 - t_min)


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


def default_out_dir(c, objective):
    if objective == 'diffusion':
        blocks = f"-block{c.block_len}" if block_len_of(c.get('block_len', 0), c.block_size) else ''
        return os.path.join('out', f'diffusion-{c.dataset}-{c.schedule}-{c.masking}{blocks}')
    return os.path.join('out', f'{objective}-{c.dataset}')


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


# -----------------------------------------------------------------------------
# training: one flat loop, nanoGPT's shape; the run's plumbing (DDP, the run folder, resume,
# checkpoints, logs, signals, divergence) sits behind the short calls on `run` (runtime.Run)


def train(c, Objective, script):
    """Train with settings c (a Config from configure) and an objective class (DiffusionObjective
    here, GPTObjective in gpt.py); script is the training script's path, recorded in checkpoints.
    Exits with EXIT_RESUMABLE after a SIGUSR1/SIGTERM/Ctrl-C-triggered save, raises UserError
    (EXIT_DIVERGED) when the loss diverges, returns the model when max_iters is reached."""
    # ---- set up: processes, the run folder (locked; started or resumed), data, model, optimizer ----
    run = Run(c, Objective.name, script, default_out_dir(c, Objective.name))
    c, dev, ckpt = run.c, run.dev, run.ckpt
    model_cfg = model_config(c, run.meta, Objective.causal)
    torch.manual_seed(c.seed)  # identical initial weights on every rank
    raw_model = (Transformer(model_cfg) if ckpt is None else
                 build_model(ckpt, ModelConfig, Transformer, run.ckpt_path)).to(dev)
    objective = Objective(c, run.meta)
    optimizer = make_optimizer(raw_model, c, dev)
    step = run.restore(optimizer)   # seeds this rank; a resumed run's optimizer, counters and RNG
    model = run.start(raw_model, optimizer, model_cfg, step)   # the DDP wrapper under torchrun
    autocast = autocast_for(dev, c.dtype)
    micro_per_rank = run.micro_per_rank

    # ---- the loop ----
    model.train()
    loss_sum = torch.zeros((), device=dev)   # the training loss, summed on the device: no sync per step
    with run.signals():   # a signal sets a flag: the step finishes, then run.stop_requested saves
        while True:
            # evaluate and save: every eval_interval steps and at the end
            if (step % c.eval_interval == 0 or step >= c.max_iters) and run.evaluated_at != step:
                model.eval()
                windows = (run.val_data.windows(c.batch_size, c.block_size + 1) if c.eval_iters == 0 else
                           (run.val_data.batch(c.batch_size, c.block_size + 1, rng(c.seed, 'val', i))
                            for i in range(c.eval_iters)))
                with autocast:
                    metrics = objective.evaluate(raw_model, (w.to(dev) for w in windows))
                model.train()
                run.evaluated(step, metrics)   # prints, checks divergence, logs, saves ckpt.pt (and best.pt)
            if run.stop_requested(step) or step >= c.max_iters:
                break
            # one optimizer step over the global batch: micro-batch g of gradient_accumulation_steps,
            # each a random window keyed by (seed, step, g), so resume and DDP need no sampler state
            lr = lr_at(step, c)
            for group in optimizer.param_groups:
                group['lr'] = lr
            for micro in range(micro_per_rank):
                g = run.rank * micro_per_rank + micro   # this micro-batch's place in the global batch
                window = to_device(run.train_data.batch(c.batch_size, c.block_size + 1, rng(c.seed, 'data', step, g)),
                                   dev)
                sync = model.no_sync() if run.ddp and micro < micro_per_rank - 1 else contextlib.nullcontext()
                with sync:
                    with autocast:
                        loss = objective.loss(model, window, step, g)
                    (loss / micro_per_rank).backward()
                loss_sum += loss.detach().float() / micro_per_rank
            if c.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), c.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            # log
            if step % c.log_interval == 0 or step == c.max_iters:
                run.logged(step, lr, loss_sum)   # mean loss since the last line, ms/step, MFU, ETA
                loss_sum = torch.zeros((), device=dev)

    if run.master and c.sample_at_end and not run.interrupted:
        print0('-' * 60)
        print0(objective.sample(raw_model.eval(), Tokenizer(run.meta)))
        print0('-' * 60)
        print0(f"more samples: python sample.py --out_dir={run.out_dir}")
    model = None   # release the DDP wrapper before its process group (run.close)
    run.close()    # after a signal: exits EXIT_RESUMABLE
    return raw_model


OBJECTIVE = DiffusionObjective   # what load_run builds for this script's checkpoints


def main():
    train(configure(globals(), rules=RULES, verbose=False), DiffusionObjective, __file__)


if __name__ == '__main__':
    run_cli(main)
