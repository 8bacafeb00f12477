"""
gpt.py: the autoregressive baseline, the same transformer as diffusion.py by construction.

    python gpt.py                                   # same settings and files as diffusion.py
    python gpt.py --n_layer=4 --n_head=4 --n_embd=128 --block_size=64 --batch_size=12

Everything else is imported: the model, optimizer and training loop from diffusion.py, and
through it the run plumbing of runtime.py (settings parser, data, DDP, bf16, compile,
checkpoints, signal-based resume, logging). This file holds only what differs, the five
differences listed in the README:
  1. no MASK token in the input (its embedding row exists, unused, so parameter counts match)
  2. causal attention                        -> GPTObjective.causal (ModelConfig.causal)
  3. next-token cross-entropy                -> GPTObjective.loss
  4. every position counts in the loss       -> GPTObjective.loss
  5. left-to-right generation with KV cache  -> generate()
A copy of this file that imports a copy of diffusion.py (`import my_diffusion as diffusion`)
trains and samples with the copy's model.
"""
import torch
import torch.nn.functional as F

import diffusion
from diffusion import KVCache, filter_logits, train
from runtime import batch_mean, configure, run_cli

# settings: diffusion.py's, less its diffusion block, with these defaults changed
DEFAULTS = dict(diffusion.shared_settings(), out_dir='')   # out_dir '' = out/gpt-<dataset>
RULES = {k: v for k, v in diffusion.RULES.items() if k in DEFAULTS}


class GPTObjective:
    name = 'gpt'
    causal = True                                   # difference 2

    def __init__(self, c, meta):
        self.c = c
        if c.compile:
            self.compute = torch.compile(self.compute)

    def compute(self, model, x, y):
        """differences 3 and 4: next-token cross-entropy at every position. x, y: (B, T)."""
        logits = model(x)                                             # (B, T, V)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

    def loss(self, model, window, step, micro):
        """window: (B, block_size + 1), the same tokens the diffusion objective sees."""
        return self.compute(model, window[:, :-1], window[:, 1:])

    @torch.no_grad()
    def evaluate(self, model, batches):
        losses, sizes = zip(*[(self.loss(model, window, 0, 0), len(window)) for window in batches])
        mean, se = batch_mean(losses, sizes)
        return {'val_loss': mean, 'val_loss_se': se}

    def sample(self, model, tokenizer, n=None, seed=1337):
        """One sample of n tokens (default block_size) from the EOT (or first) token, as text."""
        dev = next(model.parameters()).device
        prompt = torch.tensor([[tokenizer.eot_id or 0]], device=dev)
        for _, x, _ in generate(model, prompt, (n or model.cfg.block_size) - 1,
                                generator=torch.Generator(dev).manual_seed(seed)):
            pass
        return tokenizer.decode(x[0].tolist())


OBJECTIVE = GPTObjective   # what sample.load_run builds for this script's checkpoints


@torch.no_grad()
def generate(model, prompt, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, generator=None,
             use_cache=True):
    """difference 5: left-to-right sampling. prompt: (B, P) token ids, P >= 1.
    generator: one torch.Generator for the batch, or a list of B (row i samples with generator[i],
    so a batch draws what B single-row calls would). temperature=0 is greedy.
    Yields (step, tokens (B, P + step), changed (B, P + step) bool, only the new column) per token.

    With use_cache the prompt is run once and each new token costs one position's forward pass
    while the sequence fits in block_size. Past block_size the window of the last block_size
    tokens slides, and every position's hidden state depends on where the window starts, so
    nothing cached can be reused exactly: each token then re-runs the whole window, as without
    the cache. The cache therefore never changes the result, only the cost."""
    if prompt.size(1) < 1:
        raise ValueError("generate needs a prompt of at least one token (e.g. the EOT or newline id)")
    cfg = model.cfg
    dtype = next(model.parameters()).dtype
    if torch.is_autocast_enabled(prompt.device.type):  # keys/values come out in the autocast dtype
        dtype = torch.get_autocast_dtype(prompt.device.type)
    idx, cache = prompt, None
    for step in range(1, max_new_tokens + 1):
        if not use_cache or idx.size(1) > cfg.block_size:
            logits = model(idx[:, -cfg.block_size:])[:, -1]              # (B, V), the whole window
        elif cache is None:
            cache = KVCache(cfg, idx.size(0), cfg.block_size, idx.device, dtype)
            logits = model(idx, cache=cache)[:, -1]                      # prefill the prompt
        else:
            logits = model(idx[:, -1:], cache=cache)[:, -1]              # only the newest token
        nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
        idx = torch.cat([idx, nxt[:, None]], dim=1)
        changed = torch.zeros_like(idx, dtype=torch.bool)
        changed[:, -1] = True
        yield step, idx, changed


def sample_next(logits, temperature, top_k, top_p, generator):
    """(B, V) logits -> (B,) ids: greedy at temperature 0, else from the filtered softmax.
    generator: a torch.Generator (or None) for all rows, or a list with one per row."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = F.softmax(filter_logits(logits.float() / temperature, top_k, top_p), dim=-1)  # (B, V)
    if isinstance(generator, (list, tuple)):
        if len(generator) != probs.size(0):
            raise ValueError(f"{len(generator)} generators for a batch of {probs.size(0)}")
        return torch.cat([torch.multinomial(p[None], 1, generator=g) for p, g in zip(probs, generator)]).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def main():
    train(configure(dict(DEFAULTS), rules=RULES, sources=[__file__, diffusion.__file__], verbose=False), GPTObjective,
          __file__)


if __name__ == '__main__':
    run_cli(main)
