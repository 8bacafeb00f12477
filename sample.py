"""
sample.py: generate text from any checkpoint (diffusion or GPT, told apart by the checkpoint).

    python sample.py --out_dir=out/diffusion-shakespeare_char-linear-uniform
    python sample.py --out_dir=out/gpt-shakespeare_char --start="ROMEO:"

The sampling code lives here and is shared by diffusion.py (its end-of-training sample),
evaluate.py and visualize.py. Every sampler is a generator of (step, tokens, changed).
"""
import math
import time

import torch
import torch.nn.functional as F

from diffusion import configure, filter_logits, load_checkpoint, resolve_device, run_cli, Tokenizer, UserError

# -----------------------------------------------------------------------------
out_dir = ''                    # run folder holding ckpt.pt
sampler = 'confidence'          # diffusion sampler (GPT checkpoints always sample left to right)
steps = 64                      # diffusion denoising steps per block
num_samples = 1                 # samples, generated as one batch
max_new_tokens = 0              # tokens to generate; 0 = the model's block_size
start = ''                      # prompt text, or FILE:path
temperature = 1.0               # 0 = greedy
top_k = 0                       # keep the k most likely tokens; 0 = all
top_p = 1.0                     # nucleus sampling mass; 1.0 = all
seed = 1337                     # sampling seed
device = 'auto'                 # 'auto' | 'cpu' | 'cuda' | 'mps'
# -----------------------------------------------------------------------------

SAMPLERS = ('confidence',)


@torch.no_grad()
def confidence_sampler(model, x, steps, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """The reference implementation's sampler. x: (B, L) with MASK where tokens are wanted.
    A cosine count schedule decides how many masked positions stay masked after each step;
    the most confident of the sampled tokens are revealed. Yields (step, x, changed)."""
    mask_id = model.cfg.mask_id
    x = x.clone()
    n0 = (x == mask_id).sum(1)                                     # (B,) masked at the start
    for step in range(1, steps + 1):
        masked = x == mask_id
        if not masked.any():
            break
        keep = torch.ceil(n0 * math.cos(math.pi / 2 * step / steps)).long()  # (B,) still masked after
        if step == steps:
            keep = torch.zeros_like(keep)  # cos(pi/2) is 6e-17, not 0: reveal everything at the end
        n_reveal = masked.sum(1) - keep
        logits = model(x, mask_rate=masked.float().mean(1)).float()  # (B, L, V)
        if temperature == 0:
            tok = logits.argmax(-1)
        else:
            probs = F.softmax(filter_logits(logits / temperature, top_k, top_p), -1)
            tok = torch.multinomial(probs.flatten(0, 1), 1, generator=generator).view(x.shape)
        conf = F.softmax(logits, -1).gather(-1, tok[..., None]).squeeze(-1)  # (B, L)
        conf = conf.masked_fill(~masked, -1.0)
        order = conf.argsort(dim=1, descending=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(x.size(1), device=x.device).expand_as(order))
        changed = masked & (rank < n_reveal[:, None])
        x = torch.where(changed, tok, x)
        yield step, x, changed


def frames(model, objective, prompt, max_new_tokens, *, num_samples=1, sampler='confidence', steps=64,
           temperature=1.0, top_k=0, top_p=1.0, seed=1337, **opts):
    """The one entry point every consumer uses (diffusion.py, evaluate.py, visualize.py).
    prompt: list of token ids. Yields (step, tokens, changed): tokens (num_samples, P + n) with
    MASK where not yet revealed (GPT: the tokens so far), changed a bool mask of the same shape."""
    dev = next(model.parameters()).device
    gen = torch.Generator(device=dev).manual_seed(seed)
    if objective == 'gpt':
        from gpt import generate
        first = list(prompt) or [0]
        x = torch.tensor([first] * num_samples, device=dev)
        yield from generate(model, x, max_new_tokens, temperature, top_k, top_p, gen)
        return
    x = torch.tensor([list(prompt) + [model.cfg.mask_id] * max_new_tokens] * num_samples, device=dev)
    yield from confidence_sampler(model, x, steps, temperature, top_k, top_p, gen)


def generate_tokens(model, objective, prompt, max_new_tokens, **kw):
    """Run frames() to the end: (tokens (B, L), {'nfe', 'seconds', 'tokens_per_s'})."""
    t0, nfe, x = time.time(), 0, None
    for nfe, x, _ in frames(model, objective, prompt, max_new_tokens, **kw):
        pass
    dt = time.time() - t0
    return x, {'nfe': nfe, 'seconds': dt, 'tokens_per_s': x.size(0) * max_new_tokens / max(dt, 1e-9)}


def sample_text(model, tokenizer, objective, device='cpu', n=None, seed=1337, schedule=None):
    """One sample of n tokens (default block_size) as text: used at the end of training."""
    n = n or model.cfg.block_size
    prompt = [] if objective == 'diffusion' else [tokenizer.eot_id or 0]
    x, _ = generate_tokens(model, objective, prompt, n - len(prompt), seed=seed, steps=min(64, n))
    return tokenizer.decode(x[0].tolist())


def main():
    configure(globals(), choices={'sampler': SAMPLERS}, verbose=False)
    if not out_dir:
        raise UserError("pass --out_dir=DIR, a run folder made by diffusion.py or gpt.py")
    dev = resolve_device(device)
    model, ckpt = load_checkpoint(out_dir, dev)
    tok = Tokenizer(ckpt['meta'])
    text = start
    if text.startswith('FILE:'):
        with open(text[5:], encoding='utf-8') as f:
            text = f.read()
    prompt = tok.encode(text) if text else []
    n = max_new_tokens or model.cfg.block_size - len(prompt)
    if ckpt['objective'] == 'gpt' and not prompt:
        prompt = [tok.eot_id if tok.eot_id is not None else 0]
    x, info = generate_tokens(model, ckpt['objective'], prompt, n, num_samples=num_samples, steps=steps,
                              temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    dt, nfe = info['seconds'], info['nfe']
    for i in range(num_samples):
        print(tok.decode(x[i].tolist()))
        print('-' * 60)
    print(f"{ckpt['objective']}: {num_samples} x {n} tokens, {nfe} forward passes, {dt:.2f} s, "
          f"{num_samples * n / dt:,.0f} tokens/s")


if __name__ == '__main__':
    run_cli(main)
