"""
bench/bench_sample.py: diffusion samplers against GPT with a KV cache, measured in one run.

    python bench/bench_sample.py --diffusion_dir=DIR --gpt_dir=DIR          # CPU, 256 new tokens

For each diffusion sampler of sample.py at each step count (default 16, 32, 64) and for GPT
(KV cache, and without it for reference): wall time per sample, forward passes (NFE), tokens/s,
generative perplexity under the GPT run (evaluate.py's reference scorer: the GPT's own NLL of
the sample, first token unscored), and unigram entropy (evaluate.py; nats, mean over samples)
next to the same figures for validation text. Samples are generated one at a time (batch of 1):
the latency of one sample, the same setting for both objectives. Each configuration is timed
`repeats` times and the fastest kept; every row is measured in this run, so the ratios are
side by side on the same machine state. The target checked at the end: a diffusion sampler
at <= 1/3 of GPT's wall time with generative perplexity <= 1.1 x GPT's.

Block diffusion (BD3-LM) runs, --block_dirs=DIR,DIR (diffusion.py --block_len=L): for each, rows
with --block_sampler at 1, 2 and 4 tokens per step on average (L, L/2, L/4 steps per block), and
the threshold sampler (at most L steps per block), each block filled with a KV cache over the
finished blocks (sample.py). --diffusion_dir may then be left out.

    python bench/bench_sample.py --gpt_dir=G --block_dirs=B4,B8,B16 --samplers=threshold --steps=64
"""
import contextlib
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import evaluate  # noqa: E402
import sample  # noqa: E402
from sample import load_checkpoint  # noqa: E402
from diffusion import Schedule  # noqa: E402
from runtime import EXIT_USAGE, TokenData, Tokenizer, UserError, atomic_write_text, configure, rng, run_cli  # noqa: E402

# -----------------------------------------------------------------------------
diffusion_dir = ''              # diffusion.py run folder (MDLM); '' = none (block_dirs only)
block_dirs = ''                 # comma-separated block diffusion run folders (diffusion.py --block_len=L)
block_sampler = 'ancestral_cache'  # their sampler at 1, 2, 4 tokens per step (plus a threshold row)
tokens_per_step = '1,2,4'       # block rows: tokens revealed per step on average (steps per block = L / this)
gpt_dir = ''                    # gpt.py run folder of the same size (also the perplexity reference)
data_dir = ''                   # for validation text as a yardstick; '' = the GPT checkpoint's data_dir
new_tokens = 256                # tokens generated per sample
steps = '16,32,64'              # diffusion step counts, comma-separated
samplers = 'all'                # comma-separated sample.SAMPLERS, or 'all'
num_samples = 8                 # samples per configuration (seeds seed..seed+n-1), one at a time
seed = 1337                     # sample i uses seed + i
temperature = 1.0               # for every row, GPT included
top_k = 0                       # for every row
top_p = 1.0                     # for every row
repeats = 2                     # time each configuration this many times, keep the fastest
threads = 0                     # torch.set_num_threads; 0 = leave as is
json_out = ''                   # also write the rows here
# -----------------------------------------------------------------------------


def timed(fn, n):
    """Run fn() n times; return (its last result, the fastest wall time in seconds)."""
    best, out = float('inf'), None
    for _ in range(n):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def run_config(model, objective, prompt, c, **kw):
    """num_samples single-sample runs -> (tokens list of lists without the prompt, nfe per sample,
    seconds per sample)."""
    seqs, nfe, secs = [], 0, 0.0
    for i in range(c['num_samples']):
        (x, info), dt = timed(lambda: sample.generate_tokens(
            model, objective, prompt, c['new_tokens'], num_samples=1, seed=c['seed'] + i,
            temperature=c['temperature'], top_k=c['top_k'], top_p=c['top_p'], **kw), c['repeats'])
        seqs.append(x[0, len(prompt):].tolist())
        nfe += info['nfe']
        secs += dt
    return seqs, nfe / c['num_samples'], secs / c['num_samples']


def gpt_nocache(model, prompt, c):
    """GPT without the KV cache (gpt.generate use_cache=False): the whole prefix every token."""
    from gpt import generate
    seqs, secs = [], 0.0
    for i in range(c['num_samples']):
        gen = torch.Generator().manual_seed(c['seed'] + i)

        def go():
            x = None
            for _, x, _ in generate(model, torch.tensor([prompt]), c['new_tokens'], c['temperature'], c['top_k'],
                                    c['top_p'], [gen], use_cache=False):
                pass
            return x
        x, dt = timed(go, 1)
        seqs.append(x[0, len(prompt):].tolist())
        secs += dt
    return seqs, c['new_tokens'], secs / c['num_samples']


def main():
    c = configure(globals(), verbose=False)
    block_dirs = [d for d in c['block_dirs'].split(',') if d]
    if not (c['diffusion_dir'] or block_dirs) or not c['gpt_dir']:
        raise UserError("pass --gpt_dir=DIR and --diffusion_dir=DIR and/or --block_dirs=DIR,... (run folders of "
                        "gpt.py and diffusion.py)", EXIT_USAGE)
    if c['threads']:
        torch.set_num_threads(c['threads'])
    names = sample.SAMPLERS if c['samplers'] == 'all' else tuple(c['samplers'].split(','))
    for n in names:
        if n not in sample.SAMPLERS:
            raise UserError(f"--samplers: {n!r} is not one of {', '.join(sample.SAMPLERS)}", EXIT_USAGE)
    step_list = [int(s) for s in c['steps'].split(',')]
    dmodel, dckpt = load_checkpoint(c['diffusion_dir'], 'cpu') if c['diffusion_dir'] else (None, None)
    gmodel, gckpt = load_checkpoint(c['gpt_dir'], 'cpu')
    blocks = [load_checkpoint(d, 'cpu') for d in block_dirs]
    if (dckpt and dckpt['objective'] != 'diffusion') or gckpt['objective'] != 'gpt' or \
            any(sample.model_block_len(m) == 0 for m, _ in blocks):
        raise UserError("--diffusion_dir must hold a diffusion.py run, --gpt_dir a gpt.py run and --block_dirs block "
                        "diffusion runs (diffusion.py --block_len=L)", EXIT_USAGE)
    meta = gckpt['meta']
    tok = Tokenizer(meta)
    ref = evaluate.gpt_ref(c['gpt_dir'], torch.device('cpu'), contextlib.nullcontext())

    def quality(seqs):
        nll, cnt, _ = ref.score(ref.to_ids(seqs, tok, meta))
        return math.exp(nll.sum() / cnt.sum()), evaluate.unigram_entropy(seqs)

    for d, (m, ck) in ([(c['diffusion_dir'], (dmodel, dckpt))] if dckpt else []) + list(zip(block_dirs, blocks)):
        kind = f"block{sample.model_block_len(m)}" if sample.model_block_len(m) else 'diffusion'
        print(f"{kind + ':':<10} {d} (step {ck['step']}, schedule {ck['config']['schedule']}, "
              f"{m.num_params() / 1e6:.2f}M parameters, best val NELBO {ck.get('best_val_loss', float('nan')):.3f})")
    print(f"gpt:       {c['gpt_dir']} (step {gckpt['step']}, {gmodel.num_params() / 1e6:.2f}M parameters, "
          f"best val loss {gckpt.get('best_val_loss', float('nan')):.3f})")
    print(f"{c['num_samples']} samples x {c['new_tokens']} new tokens, batch 1, {torch.get_num_threads()} threads, "
          f"temperature {c['temperature']}, top_k {c['top_k']}, top_p {c['top_p']}; perplexity judge: the GPT run")
    rows = []

    def add(name, steps_, seqs, nfe, secs, **extra):
        ppl, ent = quality(seqs)
        rows.append({'sampler': name, 'steps': steps_, 'nfe': nfe, 'seconds': secs,
                     'tokens_per_s': c['new_tokens'] / secs, 'gen_ppl': ppl, 'entropy': ent, **extra})
        r = rows[-1]
        print(f"  {name:<16} {str(steps_):>5}  NFE {nfe:7.1f}  {secs:7.3f} s  {r['tokens_per_s']:8.0f} tok/s  "
              f"gen PPL {ppl:7.2f}  entropy {ent:.3f}", flush=True)

    gprompt = [tok.eot_id if tok.eot_id is not None else 0]   # GPT starts from one token (a newline here)
    add('gpt (KV cache)', '-', *run_config(gmodel, 'gpt', gprompt, c))
    add('gpt (no cache)', '-', *gpt_nocache(gmodel, gprompt, c))
    for name in names if dmodel is not None else ():
        for k in step_list:
            add(name, k, *run_config(dmodel, 'diffusion', [], c, sampler=name, steps=k,
                                     schedule=Schedule(dckpt['config']['schedule'])))
    for bmodel, bckpt in blocks:   # block diffusion: steps per block
        L = sample.model_block_len(bmodel)
        plans = [(c['block_sampler'], L // int(n)) for n in c['tokens_per_step'].split(',') if L // int(n) >= 1]
        for name, k in plans + [('threshold', L)]:
            add(f"block{L} {name}", f"{k}/blk", *run_config(bmodel, 'diffusion', [], c, sampler=name, steps=k,
                                                            schedule=Schedule(bckpt['config']['schedule'])),
                block_len=L)
    add('gpt (KV cache)', '-', *run_config(gmodel, 'gpt', gprompt, c))     # timed again: drift check
    data = TokenData(c['data_dir'] or gckpt['config']['data_dir'], meta['dataset'], 'val', meta)
    text = data.batch(c['num_samples'], c['new_tokens'], rng(c['seed'], 'bench-refs')).tolist()
    ppl_data, ent_data = quality(text)

    gpt_rows = [r for r in rows if r['sampler'] == 'gpt (KV cache)']
    gpt_s = min(r['seconds'] for r in gpt_rows)
    gpt_ppl = gpt_rows[0]['gen_ppl']
    print()
    print("| sampler | steps | NFE | s/sample | tokens/s | x GPT time | gen PPL | x GPT PPL | entropy |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows[:-1]:
        r['time_ratio'], r['ppl_ratio'] = r['seconds'] / gpt_s, r['gen_ppl'] / gpt_ppl
        print(f"| {r['sampler']} | {r['steps']} | {r['nfe']:.1f} | {r['seconds']:.3f} | {r['tokens_per_s']:.0f} | "
              f"{r['time_ratio']:.2f} | {r['gen_ppl']:.2f} | {r['ppl_ratio']:.2f} | {r['entropy']:.3f} |")
    print(f"| validation text | | | | | | {ppl_data:.2f} | {ppl_data / gpt_ppl:.2f} | {ent_data:.3f} |")
    print(f"GPT (KV cache) timed twice: {gpt_rows[0]['seconds']:.3f} s and {gpt_rows[1]['seconds']:.3f} s per "
          "sample; ratios use the faster")
    ours = [r for r in rows[:-1] if r['sampler'] in sample.SAMPLERS or r.get('block_len')]   # diffusion rows
    hits = [r for r in ours if r['time_ratio'] <= 1 / 3 and r['ppl_ratio'] <= 1.1]
    if hits:
        print("target met (<= 1/3 GPT time, gen PPL <= 1.1 x GPT): " +
              ', '.join(f"{r['sampler']}@{r['steps']} ({r['time_ratio']:.2f}x time, {r['ppl_ratio']:.2f}x PPL, "
                        f"entropy {r['entropy']:.2f} vs GPT {gpt_rows[0]['entropy']:.2f})" for r in hits))
    else:
        fast = [r for r in ours if r['time_ratio'] <= 1 / 3]
        best = min(fast, key=lambda r: r['gen_ppl']) if fast else None
        print("target NOT met: no diffusion sampler at <= 1/3 GPT time has gen PPL <= 1.1 x GPT's"
              + (f"; best at <= 1/3 time: {best['sampler']}@{best['steps']} with {best['ppl_ratio']:.2f}x GPT's PPL"
                 if best else "; none is that fast"))
    if c['json_out']:
        atomic_write_text(json.dumps({'config': dict(c), 'rows': rows, 'validation_text':
                                      {'gen_ppl': ppl_data, 'entropy': ent_data}}, indent=1), c['json_out'])


if __name__ == '__main__':
    run_cli(main)
