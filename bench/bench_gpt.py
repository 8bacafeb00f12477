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

Training speed (both objectives, against the matmul floor and the reference implementations)
is bench/bench_train.py's.
"""
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from diffusion import ModelConfig, Transformer, padded_vocab  # noqa: E402
from runtime import UserError, configure, run_cli  # noqa: E402
from gpt import generate  # noqa: E402
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
threads = 0                     # torch CPU threads; 0 = torch's default
seed = 1337                     # weights of the random-init model
# -----------------------------------------------------------------------------


def timed(model, prompt, use_cache):
    """(seconds, tokens (B, 1 + new_tokens)) of one greedy generation."""
    t0 = time.perf_counter()
    *_, (_, tokens, _) = generate(model, prompt, new_tokens, temperature=0, use_cache=use_cache)
    return time.perf_counter() - t0, tokens


def main():
    configure(globals(), verbose=False)
    if new_tokens < 1 or num_samples < 1 or repeats < 1:
        raise UserError("new_tokens, num_samples and repeats must be at least 1")
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

if __name__ == '__main__':
    run_cli(main)
