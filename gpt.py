"""
gpt.py: the autoregressive baseline, the same transformer as diffusion.py by construction.

    python gpt.py                                   # same settings and files as diffusion.py
    python gpt.py --n_layer=4 --n_head=4 --n_embd=128 --block_size=64 --batch_size=12

Everything (model, settings parser, data, optimizer, DDP, bf16, compile, checkpoints,
signal-based resume, logging) is imported from diffusion.py. This file holds only what
differs, the five differences listed in the README:
  1. no MASK token in the input (its embedding row exists, unused, so parameter counts match)
  2. causal attention                        -> GPTObjective.causal (ModelConfig.causal)
  3. next-token cross-entropy                -> GPTObjective.loss
  4. every position counts in the loss       -> GPTObjective.loss
  5. left-to-right generation with KV cache  -> generate()
"""
import torch
import torch.nn.functional as F

import diffusion
from diffusion import KVCache, configure, filter_logits, run_cli, train

# -----------------------------------------------------------------------------
# settings: every shared setting of diffusion.py (units and allowed values are listed there),
# with these defaults changed. The diffusion-only ones (schedule, masking, ...) are absent.
globals().update(diffusion.shared_settings())
out_dir = ''                    # '' = out/gpt-<dataset>
# -----------------------------------------------------------------------------


class GPTObjective:
    name = 'gpt'
    causal = True                                   # difference 2

    def __init__(self, c, n_tokens, vocab_size, micro_total):
        self.c = c

    def loss(self, model, window, step, micro):
        """differences 3 and 4: next-token cross-entropy at every position.
        window: (B, block_size + 1), the same tokens the diffusion objective sees."""
        x, y = window[:, :-1], window[:, 1:]
        logits = model(x)                                             # (B, T, V)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

    @torch.no_grad()
    def evaluate(self, model, batches):
        losses = [self.loss(model, window, 0, 0) for window in batches]
        return {'val_loss': torch.stack(losses).mean().item()}

    def sample(self, model, tokenizer, device):
        import sample
        return sample.sample_text(model, tokenizer, 'gpt', device=device)


@torch.no_grad()
def generate(model, prompt, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, generator=None,
             use_cache=True):
    """difference 5: left-to-right sampling. prompt: (B, P) token ids, P >= 1.
    Yields (step, tokens (B, P + step), changed (B, P + step) bool) after each new token.
    With use_cache the prompt is run once and each new token costs one position's forward
    pass; past block_size the window slides and the cache is rebuilt from the last
    block_size - 1 tokens. temperature=0 is greedy."""
    cfg = model.cfg
    idx = prompt
    B = idx.size(0)
    cache, logits = None, None
    dtype = next(model.parameters()).dtype
    for step in range(1, max_new_tokens + 1):
        if not use_cache:
            logits = model(idx[:, -cfg.block_size:])[:, -1]
        elif cache is None or cache.pos >= cfg.block_size:
            cache = KVCache(cfg, B, cfg.block_size, idx.device, dtype)
            logits = model(idx[:, -(cfg.block_size - 1):], cache=cache)[:, -1]
        nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
        idx = torch.cat([idx, nxt[:, None]], dim=1)
        changed = torch.zeros_like(idx, dtype=torch.bool)
        changed[:, -1] = True
        yield step, idx, changed
        if use_cache and step < max_new_tokens and cache.pos < cfg.block_size:
            logits = model(nxt[:, None], cache=cache)[:, -1]


def sample_next(logits, temperature, top_k, top_p, generator):
    """(B, V) logits -> (B,) ids: greedy at temperature 0, else from the filtered softmax."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = F.softmax(filter_logits(logits.float() / temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def main():
    cfg = configure(globals(), choices={k: v for k, v in diffusion.CHOICES.items()
                                        if k not in diffusion.DIFFUSION_ONLY})
    train(cfg, GPTObjective)


if __name__ == '__main__':
    run_cli(main)
