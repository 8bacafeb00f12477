"""
bench/bench_gpt.py: gpt.py's speed, each figure measured side by side with its comparison in one run.

    python bench/bench_gpt.py                                  # random-init models, nanoGPT CPU recipe size
    python bench/bench_gpt.py --out_dir=out/gpt-shakespeare_char   # generation from a trained checkpoint
    python bench/bench_gpt.py --new_tokens=256 --num_samples=4 --threads=1 --train_steps=0

1. Generation, tokens/s with and without the KV cache. Greedy decoding of new_tokens tokens from a one-token prompt; the two modes alternate
`repeats` times and the median time of each is reported, so machine load hits both alike.
Both modes must produce the same tokens (gpt.generate's cache never changes the result).
Without the cache step i re-runs all i positions (O(n^2) positions in total); with it, each
step runs one position against the cached keys and values.

2. Training, ms per optimizer step of GPTObjective and DiffusionObjective on models of the same
size (train_batch x train_block random tokens; the token values do not change the cost). The two
alternate step by step, which goes first alternating too, so both see the same machine load.
"""
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import diffusion  # noqa: E402
from diffusion import (DiffusionObjective, ModelConfig, Transformer, UserError, configure,  # noqa: E402
                       make_optimizer, padded_vocab, rng, run_cli)
from gpt import GPTObjective, generate  # noqa: E402
from sample import load_checkpoint  # noqa: E402

# -----------------------------------------------------------------------------
out_dir = ''                    # a gpt.py run folder; '' = a random-init model of the size below
n_layer = 4                     # model size (generation: when out_dir is ''), nanoGPT's CPU recipe
n_head = 4
n_embd = 128
vocab = 65                      # real tokens when out_dir is '' (Tiny Shakespeare characters)
new_tokens = 256                # tokens generated per sample
num_samples = 1                 # batch size
repeats = 3                     # timed runs per mode (after one warm-up run each)
train_steps = 50                # training steps timed per objective (after 5 warm-up steps); 0 = skip
train_batch = 12                # sequences per training step (nanoGPT's CPU recipe)
train_block = 64                # tokens per sequence in training (nanoGPT's CPU recipe)
threads = 0                     # torch CPU threads; 0 = torch's default
seed = 1337                     # weights of the random-init model
# -----------------------------------------------------------------------------


def timed(model, prompt, use_cache):
    """(seconds, tokens (B, 1 + new_tokens)) of one greedy generation."""
    t0 = time.perf_counter()
    *_, (_, tokens, _) = generate(model, prompt, new_tokens, temperature=0, use_cache=use_cache)
    return time.perf_counter() - t0, tokens


def train_ms():
    """{'gpt': [(wall ms, CPU ms) per step], 'diffusion': [...]}: the two objectives' training steps,
    alternating. CPU time (this process's, all threads) barely moves when other processes load the
    machine, wall time does: both are reported."""
    c = diffusion.Config(diffusion.settings_of(vars(diffusion)), seed=seed, batch_size=train_batch,
                         block_size=train_block)  # diffusion.py's defaults
    runs = {}
    for objective in (GPTObjective, DiffusionObjective):
        torch.manual_seed(seed)
        model = Transformer(ModelConfig(vocab_size=padded_vocab(vocab), mask_id=vocab, block_size=train_block,
                                        n_layer=n_layer, n_head=n_head, n_embd=n_embd, causal=objective.causal))
        runs[objective.name] = (model.train(), make_optimizer(model, c, torch.device('cpu')),
                                objective(c, {'vocab_size': vocab}))
    times = {name: [] for name in runs}
    warmup = 5
    for step in range(warmup + train_steps):
        window = torch.randint(0, vocab, (train_batch, train_block + 1), generator=rng(seed, 'bench', step))
        for name in (list(runs) if step % 2 else list(runs)[::-1]):
            model, optimizer, objective = runs[name]
            t0, c0 = time.perf_counter(), time.process_time()
            loss = objective.loss(model, window, step, 0)   # what train() does per step, one micro-batch
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss.item()
            if step >= warmup:
                times[name].append((1000 * (time.perf_counter() - t0), 1000 * (time.process_time() - c0)))
    return times


def main():
    configure(globals(), verbose=False)
    if new_tokens < 1 or num_samples < 1 or repeats < 1 or train_batch < 1 or train_block < 2:
        raise UserError("new_tokens, num_samples, repeats, train_batch must be at least 1, train_block 2")
    if threads:
        torch.set_num_threads(threads)
    if out_dir:
        model, ckpt = load_checkpoint(out_dir, 'cpu')
        if ckpt['objective'] != 'gpt':
            raise UserError(f"{out_dir} holds a {ckpt['objective']} model; this benchmark needs a gpt.py run")
        where = f"{out_dir} (step {ckpt['step']})"
    else:
        torch.manual_seed(seed)
        # block_size = new_tokens: the last forward pass sees the prompt + new_tokens - 1 tokens
        model = Transformer(ModelConfig(vocab_size=padded_vocab(vocab), mask_id=vocab, block_size=new_tokens,
                                        n_layer=n_layer, n_head=n_head, n_embd=n_embd, causal=True)).eval()
        where = 'random init'
    c = model.cfg
    print(f"model: {where}, {model.num_params() / 1e6:.2f}M parameters, n_layer={c.n_layer} n_head={c.n_head} "
          f"n_embd={c.n_embd} block_size={c.block_size}; {torch.get_num_threads()} CPU thread(s)")
    if new_tokens > c.block_size:
        print(f"note: past block_size={c.block_size} every token re-runs the window in both modes "
              "(see gpt.generate), so the ratio shrinks")
    prompt = torch.zeros(num_samples, 1, dtype=torch.long)
    times = {True: [], False: []}
    outputs = {}
    for i in range(repeats + 1):                       # run 0 of each mode is a warm-up
        for use_cache in (True, False):
            dt, outputs[use_cache] = timed(model, prompt, use_cache)
            if i:
                times[use_cache].append(dt)
    if not torch.equal(outputs[True], outputs[False]):
        raise SystemExit("error: generation with and without the KV cache differ")
    n = num_samples * new_tokens
    speed = {k: n / statistics.median(v) for k, v in times.items()}
    print(f"generate {num_samples} x {new_tokens} tokens, greedy, median of {repeats}:")
    print(f"  with KV cache    {speed[True]:9,.0f} tokens/s  ({1000 * statistics.median(times[True]):.0f} ms)")
    print(f"  without cache    {speed[False]:9,.0f} tokens/s  ({1000 * statistics.median(times[False]):.0f} ms)")
    print(f"  speedup          {speed[True] / speed[False]:9.2f}x  (identical tokens)")
    if train_steps > 0:
        times = train_ms()
        wall = {k: statistics.median(w for w, _ in v) for k, v in times.items()}
        cpu = {k: statistics.median(c for _, c in v) for k, v in times.items()}
        print(f"training step, batch {train_batch} x block {train_block}, n_layer={n_layer} n_head={n_head} "
              f"n_embd={n_embd}, median of {train_steps} alternating steps each:")
        print(f"  gpt              {wall['gpt']:9.1f} ms/step wall  {cpu['gpt']:9.1f} ms/step CPU")
        print(f"  diffusion        {wall['diffusion']:9.1f} ms/step wall  {cpu['diffusion']:9.1f} ms/step CPU")
        print(f"  gpt / diffusion  {wall['gpt'] / wall['diffusion']:9.2f}               "
              f"{cpu['gpt'] / cpu['diffusion']:9.2f}")


if __name__ == '__main__':
    run_cli(main)
