"""
bench/bench_evaluate.py: throughput and confidence-interval width of evaluate.py's default
likelihood evaluation on the Tiny Shakespeare validation split, measured in one run.

    python bench/bench_evaluate.py --out_dir=RUN            # a diffusion.py run (trained first if absent)

If out_dir holds no checkpoint, the default diffusion model is trained there first for
train_iters steps on CPU. Then, side by side on the same windows: a bare forward pass over the
split (the floor), the continuous-time NELBO with evaluate.py's defaults (control variate on),
the same without the control variate, and the discrete any-order bound (each timed `repeats`
times, the fastest kept: the machine may be shared). Each row: seconds,
tokens/s (tokens scored x passes / s), the estimate, its 95% CI half-width absolute and relative,
and the passes that would bring the relative half-width to `target` (CI ~ 1 / sqrt(passes)).
"""
import contextlib
import json
import math
import os
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import evaluate  # noqa: E402
from sample import load_checkpoint  # noqa: E402
from runtime import TokenData, UserError, atomic_write_text, configure, run_cli, settings_of  # noqa: E402

# -----------------------------------------------------------------------------
out_dir = 'out/bench-eval'      # diffusion run folder to evaluate; trained here first when it has no ckpt.pt
data_dir = ''                   # '' = the checkpoint's data_dir
train_iters = 300               # steps to train the default model when out_dir has no checkpoint
target = 0.01                   # relative CI half-width to project the passes for
threads = 0                     # torch.set_num_threads; 0 = leave as is
repeats = 1                     # time every row this many times and keep the fastest (the figures are identical)
json_out = ''                   # also write the rows here
# -----------------------------------------------------------------------------


def main():
    c = dict(configure(globals(), verbose=False))
    if c['threads']:
        torch.set_num_threads(c['threads'])
    if not os.path.exists(os.path.join(c['out_dir'], 'ckpt.pt')):
        print(f"training the default diffusion model for {c['train_iters']} steps in {c['out_dir']} ...", flush=True)
        extra = [f"--data_dir={os.path.abspath(c['data_dir'])}"] if c['data_dir'] else []
        r = subprocess.run([sys.executable, os.path.join(REPO, 'diffusion.py'),
                            f"--out_dir={os.path.abspath(c['out_dir'])}",
                            f"--max_iters={c['train_iters']}", '--device=cpu', '--sample_at_end=false',
                            f"--eval_interval={c['train_iters']}", *extra], cwd=REPO)
        if r.returncode != 0:
            raise UserError(f"training the benchmark model failed (exit {r.returncode})")
    model, ckpt = load_checkpoint(c['out_dir'], 'cpu')
    if ckpt['objective'] != 'diffusion':
        raise UserError(f"{c['out_dir']} holds a {ckpt['objective']} run; this benchmark needs a diffusion run")
    ev = {**settings_of(vars(evaluate)), 'device': 'cpu'}       # evaluate.py's defaults
    ddir = evaluate.resolve_data_dir(ckpt, c['data_dir'])
    data = TokenData(ddir, ckpt['config']['dataset'], ev['split'], ckpt['meta'])
    L = model.cfg.block_size
    w = evaluate.split_windows(data, L, ev['max_tokens'])
    x = w[:, 1:]
    n_tok = x.numel()
    print(f"{c['out_dir']}: step {ckpt['step']}, {model.num_params() / 1e6:.2f}M parameters, "
          f"{ckpt['config']['dataset']} {ev['split']}: {n_tok:,} tokens in {len(x)} windows of {L}; "
          f"{torch.get_num_threads()} thread(s); evaluate.py defaults: passes={ev['passes']}, "
          f"batch_size={ev['batch_size']}, t_min={ev['t_min']}")
    print(f"load average before: {' '.join(f'{v:.1f}' for v in os.getloadavg())} on {os.cpu_count()} cores")
    rows = []
    with torch.no_grad():
        model(x[:ev['batch_size']])                        # warm-up: allocator, kernels
        dt = math.inf
        for _ in range(c['repeats']):
            t0 = time.time()
            for b in range(0, len(x), ev['batch_size']):
                model(x[b:b + ev['batch_size']])
            dt = min(dt, time.time() - t0)
    rows.append({'name': 'bare forward (1 pass, all logits)', 'seconds': dt, 'tokens_per_s': n_tok / dt})
    for name, fn, cv in (('continuous NELBO (default: control variate)', evaluate.continuous_batch, True),
                         ('continuous NELBO, no control variate', evaluate.continuous_batch, False),
                         ('discrete any-order bound', evaluate.discrete_batch, False)):
        dt = math.inf
        for _ in range(c['repeats']):  # deterministic: every repeat gives the same estimate
            est, tokens, t, beta = evaluate.monte_carlo(model, x, fn, ev['passes'], ev['batch_size'], ev['seed'],
                                                        ev['t_min'], cv, contextlib.nullcontext())
            dt = min(dt, t)
        e = evaluate.summarize(est, tokens, dt, name, char=ckpt['meta']['tokenizer'] == 'char')
        rows.append({'name': name, 'seconds': dt, 'tokens_per_s': e['tokens_per_s'], 'nats': e['nats'],
                     'ci95': e['ci95'], 'rel_ci95': e['rel_ci95'], 'ppl': e['ppl'], 'bits': e['bits'],
                     'passes_for_target': math.ceil(ev['passes'] * (e['rel_ci95'] / c['target']) ** 2)})
    label = f"passes for {100 * c['target']:g}%"
    print(f"{'':46}{'seconds':>9}{'tokens/s':>11}{'nats/token':>12}{'95% CI':>9}{'rel CI':>8}{'BPC':>8}{label:>16}")
    for r in rows:
        if 'nats' in r:
            print(f"{r['name']:46}{r['seconds']:9.1f}{r['tokens_per_s']:11,.0f}{r['nats']:12.4f}{r['ci95']:9.4f}"
                  f"{100 * r['rel_ci95']:7.2f}%{r['bits']:8.4f}{r['passes_for_target']:16d}")
        else:
            print(f"{r['name']:46}{r['seconds']:9.1f}{r['tokens_per_s']:11,.0f}")
    base = rows[0]['tokens_per_s']
    print("time per token vs a bare forward pass: " + ', '.join(
        f"{r['name'].split(' (')[0]} {base / r['tokens_per_s']:.2f}x" for r in rows[1:]))
    print(f"control variate: CI {rows[2]['ci95'] / rows[1]['ci95']:.2f}x narrower "
          f"({(rows[2]['ci95'] / rows[1]['ci95']) ** 2:.1f}x fewer passes for the same CI)")
    total = sum(r['seconds'] for r in rows[1:]) - rows[2]['seconds']
    print(f"default evaluation (continuous + discrete): {total:.0f} s; headline (continuous) relative 95% CI "
          f"{100 * rows[1]['rel_ci95']:.2f}% (target {100 * c['target']:g}%: "
          f"{'met' if rows[1]['rel_ci95'] <= c['target'] else 'NOT met'})")
    print(f"load average after: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    if c['json_out']:
        atomic_write_text(json.dumps(rows, indent=1) + '\n', c['json_out'])


if __name__ == '__main__':
    run_cli(main)
