"""
study.py: three studies, each trained, evaluated and reported by one command, several seeds each.

    python prepare.py && python study.py                  # --study=schedules (see README for time)
    python study.py --study=epochs                        # the data-constrained race
    python study.py --study=stall                         # the seed's settings: do schedules stall?
    python study.py --study=epochs --quick                # any of them CI-sized (numbers meaningless)

schedules: the whole 6 schedules x 2 maskings matrix plus a GPT baseline, and block diffusion
(BD3-LM) rows at block_lens 4 and 16 (uniform masking, --block_schedule), between GPT (block
length 1) and MDLM (block length block_size).

Order: the GPT baselines first (seed 0 is also the reference model for the entropy array and
for generative perplexity), then `prepare.py --entropy`, then the 12 diffusion cells and the
block diffusion cells x seeds, `jobs` at a time, then evaluate.py on every run and a table in
results/. Every run uses --init_from=auto, so rerunning after an interruption continues where
it stopped, and finished runs are skipped. At the 124M scale, train with `sbatch --array=0-11
slurm_train.sh config/fineweb_124m.py` and point --runs_dir at those runs with --train=false.
"""
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from diffusion import MASKINGS, SCHEDULES
from runtime import UserError, ckpt_file, configure, one_of, read_log, run_cli
from report import md_table, pyplot, seed_ci, summarise_cells, write_json

# -----------------------------------------------------------------------------
study = 'schedules'             # 'schedules' (the 6 x 2 matrix) | 'epochs' (the data-constrained race) | 'stall' (the seed's settings)
quick = False                   # a CI-sized run of the study: a tiny model, a few steps, 2 seeds, its own folders (numbers meaningless)
runs_dir = ''                   # one folder per run; '' = out/study (schedules), out/race (epochs), out/stall
results_dir = 'results'         # comparison table (markdown + JSON) and plots
dataset = 'shakespeare_char'    # prepared by prepare.py
data_dir = 'data'               # where prepare.py wrote it
schedules = ','.join(SCHEDULES) # comma-separated subset of the six
maskings = ','.join(MASKINGS)   # comma-separated subset of MASKINGS
block_lens = '4,16'             # block diffusion (BD3-LM) rows: comma-separated block lengths dividing block_size; '' = none
block_schedule = 'clipped_cosine'  # their schedule (uniform masking): the best uniform cell of results/study.md
seeds = 3                       # seeds per cell: 0, 1, ...
jobs = 2                        # training processes at once (one per CPU core)
threads = 1                     # torch threads per process
train = True                    # False: only evaluate and compare existing runs
# the CPU-scale model and schedule for every run (diffusion and GPT alike)
n_layer = 4
n_head = 4
n_embd = 128
block_size = 64
batch_size = 12
max_iters = 1000
learning_rate = 1e-3
eval_interval = 250
eval_iters = 50                 # validation batches: the training log's val_nelbo within ~0.7% (standard error)
device = 'cpu'
# evaluation (evaluate.py): gen PPL from 2 x 64 samples of block_size tokens per run (95% CI ~4%)
eval_args = '--passes=2 --max_tokens=32768 --curve_points=5 --curve_tokens=8192 --num_samples=64 --sample_seeds=2'
# the data-constrained race (--study=epochs): the first race_tokens of the train split, repeated
race_tokens = 100000            # training tokens (characters here: 10% of Tiny Shakespeare's train split)
race_epochs = 50                # diffusion epochs (passes over race_tokens)
race_gpt_epochs = 25            # GPT epochs: its best comes early, then it overfits
race_evals = 25                 # validations per run, evenly spaced, each on the whole validation split
race_schedule = 'clipped_cosine'  # the diffusion contenders' schedule (uniform masking): the study's best
race_block_len = 16             # a block-diffusion contender (BD3-LM) of this block length; 0 = none
race_min_lr = 1e-4              # cosine decay from learning_rate to this over each run
# the stall check (--study=stall)
stall_schedules = 'linear,clipped_cosine,sigmoid'  # linear: the control
# -----------------------------------------------------------------------------
HERE = os.path.dirname(os.path.abspath(__file__))


def script(name):
    return os.path.join(HERE, name)


def run(c, cmd, log_path=None):
    """Run a command; its output goes to log_path (or ours). Raises on failure with the log's tail."""
    env = dict(os.environ, OMP_NUM_THREADS=str(c.threads), PYTHONUNBUFFERED='1')
    t0 = time.time()
    if log_path:
        with open(log_path, 'a') as f:
            r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    else:
        r = subprocess.run(cmd, env=env)
    if r.returncode != 0:
        tail = open(log_path).read()[-2000:] if log_path else ''
        raise UserError(f"{' '.join(cmd)} exited {r.returncode}{': ' + tail.splitlines()[-1] if tail else ''}")
    return time.time() - t0


def common_args(c):
    return [f'--dataset={c.dataset}', f'--data_dir={c.data_dir}', f'--n_layer={c.n_layer}', f'--n_head={c.n_head}',
            f'--n_embd={c.n_embd}', f'--block_size={c.block_size}', f'--batch_size={c.batch_size}',
            f'--max_iters={c.max_iters}', f'--learning_rate={c.learning_rate}', f'--eval_interval={c.eval_interval}',
            f'--eval_iters={c.eval_iters}', f'--device={c.device}', '--sample_at_end=false', '--init_from=auto',
            '--log_interval=50']


def finished(out_dir):
    path = os.path.join(out_dir, 'status.json')
    return os.path.exists(path) and json.load(open(path)).get('status') == 'finished'


def train_run(c, script_path, out_dir, extra):
    if finished(out_dir):
        return 0.0
    os.makedirs(out_dir, exist_ok=True)
    dt = run(c, [sys.executable, script_path, *common_args(c), f'--out_dir={out_dir}', *extra],
             os.path.join(out_dir, 'train.out'))
    print(f"  {out_dir}: {dt:.0f} s", flush=True)
    return dt


def study_schedules(c):
    """The 6 x 2 matrix, GPT and block rows: results/study.md, study.json, cells.png, cell_curves.png, and
    runs/ (evaluate.py --compare: every run's row and plots)."""
    scheds = [s for s in c.schedules.split(',') if s]
    masks = [m for m in c.maskings.split(',') if m]
    bad = [s for s in scheds if s not in SCHEDULES] + [m for m in masks if m not in MASKINGS]
    if bad:
        raise UserError(f"unknown schedule or masking {bad}", 2)
    try:
        lens = [int(b) for b in c.block_lens.split(',') if b.strip()]
    except ValueError:
        lens = [0]
    if any(not 0 < b < c.block_size or c.block_size % b for b in lens) or c.block_schedule not in SCHEDULES:
        raise UserError(f"--block_lens={c.block_lens!r}, --block_schedule={c.block_schedule!r}: block lengths divide "
                        f"block_size={c.block_size} (and are smaller); schedules: {', '.join(SCHEDULES)}", 2)
    t_start = time.time()
    gpt_dirs = [os.path.join(c.runs_dir, f'gpt-s{s}') for s in range(c.seeds)]
    diff_dirs = {(sc, m, s): os.path.join(c.runs_dir, f'diffusion-{sc}-{m}-s{s}')
                 for sc in scheds for m in masks for s in range(c.seeds)}
    block_dirs = {(b, s): os.path.join(c.runs_dir, f'diffusion-block{b}-{c.block_schedule}-uniform-s{s}')
                  for b in lens for s in range(c.seeds)}
    ref = gpt_dirs[0]
    entropy = os.path.join(c.data_dir, c.dataset, 'entropy.npy')
    if c.train:
        print(f"training {len(gpt_dirs)} GPT baselines, {len(diff_dirs)} diffusion runs and {len(block_dirs)} block "
              f"diffusion runs, {c.jobs} at a time")
        with ThreadPoolExecutor(c.jobs) as pool:
            list(pool.map(lambda sd: train_run(c, script('gpt.py'), sd[1], [f'--seed={sd[0]}']), enumerate(gpt_dirs)))
        if 'entropy' in masks and not os.path.exists(entropy):
            run(c, [sys.executable, script('prepare.py'), '--entropy', f'--ref={ref}', f'--dataset={c.dataset}',
                 f'--data_dir={c.data_dir}'])
        todo = [(d, [f'--schedule={sc}', f'--masking={m}', f'--seed={s}', f'--entropy_file={entropy}'])
                for (sc, m, s), d in diff_dirs.items()]
        todo += [(d, [f'--block_len={b}', f'--schedule={c.block_schedule}', '--masking=uniform', f'--seed={s}'])
                 for (b, s), d in block_dirs.items()]
        with ThreadPoolExecutor(c.jobs) as pool:
            list(pool.map(lambda item: train_run(c, script('diffusion.py'), *item), todo))
    t_train = time.time() - t_start
    all_dirs = gpt_dirs + list(block_dirs.values()) + list(diff_dirs.values())
    missing = [d for d in all_dirs if not os.path.exists(ckpt_file(d))]
    if missing:
        raise UserError(f"no checkpoint in {missing[0]} (and {len(missing) - 1} more); run with --train=true")
    os.makedirs(c.results_dir, exist_ok=True)

    def evaluated(d):  # an eval.json newer than the checkpoint: --compare checks its settings too
        e, c = os.path.join(d, 'eval.json'), ckpt_file(d)
        return os.path.exists(e) and os.path.getmtime(e) > os.path.getmtime(c)
    with ThreadPoolExecutor(c.jobs) as pool:  # evaluate in parallel; --compare below reuses each eval.json
        list(pool.map(lambda d: run(c, [sys.executable, script('evaluate.py'), f'--out_dir={d}', f'--ref={ref}',
                                     f'--device={c.device}', *c.eval_args.split()], os.path.join(d, 'eval.out')),
                      [d for d in all_dirs if not evaluated(d)]))
    run(c, [sys.executable, script('evaluate.py'), '--compare', *all_dirs, f"--report_dir={os.path.join(c.results_dir, 'runs')}", '--compare_plots=false', f'--device={c.device}',
         f'--ref={ref}', *c.eval_args.split()])
    summarise_cells(all_dirs, c.results_dir)
    total = time.time() - t_start
    if c.train:  # the time of a whole study (an evaluation-only rerun would overwrite it with its own)
        with open(os.path.join(c.results_dir, 'study_time.json'), 'w') as f:
            json.dump({'train_seconds': round(t_train), 'total_seconds': round(total), 'runs': len(all_dirs),
                       'jobs': c.jobs, 'threads': c.threads}, f)
    print(f"study done in {total / 60:.1f} min (training {t_train / 60:.1f} min); see {c.results_dir}/")



# -----------------------------------------------------------------------------
# the data-constrained race: the same few tokens repeated for many epochs (Prabhudesai et al. 2025,
# "Diffusion Beats Autoregressive in Data-Constrained Settings"; Ni et al. 2025, "Diffusion Language
# Models are Super Data Learners": GPT overfits early, masked diffusion keeps improving)


def race_runs(c):
    """{model name: (script, epochs, extra args)} of the race's contenders."""
    diff = [f'--schedule={c.race_schedule}', '--masking=uniform']
    runs = {'GPT': (script('gpt.py'), c.race_gpt_epochs, []),
            f'diffusion ({c.race_schedule})': (script('diffusion.py'), c.race_epochs, diff)}
    if c.race_block_len:
        runs[f'block diffusion L={c.race_block_len}'] = (script('diffusion.py'), c.race_epochs,
                                                         diff + [f'--block_len={c.race_block_len}'])
    return runs


def run_dir(c, name, seed, epochs):
    """out/race/<model>-<tokens>k-e<epochs>-s<seed>: another race reuses the runs it shares."""
    kind = 'gpt' if name == 'GPT' else (f'block{c.race_block_len}-' if 'block' in name else 'diffusion-') + c.race_schedule
    return os.path.join(c.runs_dir, f'{kind}-{c.race_tokens / 1000:g}k-e{epochs:g}-s{seed}')


def study_epochs(c):
    """Train every contender on the first race_tokens of the train split for many epochs, validating
    on the whole validation split race_evals times; keep each run's best checkpoint (best.pt);
    report the curves (race.png), each model's best and when, and whether diffusion passes GPT."""
    spe = c.race_tokens / (c.batch_size * c.block_size)                 # optimizer steps per epoch
    runs = race_runs(c)
    t0, trained = time.time(), 0.0
    if c.train:
        todo = []
        for name, (script, epochs, extra) in runs.items():
            steps = max(1, round(epochs * spe))
            every = max(1, steps // c.race_evals)
            cost = steps * (2 if 'block' in name else 1)                 # a block model's pass is twice as long
            for s in range(c.seeds):
                todo.append((cost, script, run_dir(c, name, s, epochs),
                             [f'--seed={s}', f'--train_tokens={c.race_tokens}', '--eval_iters=0', f'--max_iters={steps}',
                              f'--eval_interval={every}', f'--min_lr={c.race_min_lr}', *extra]))
        print(f"the race: {len(todo)} runs on the first {c.race_tokens:,} training tokens ({spe:.0f} steps per epoch), "
              f"{c.jobs} at a time")
        todo.sort(key=lambda item: -item[0])                            # the longest first: less idle at the end
        with ThreadPoolExecutor(c.jobs) as pool:
            trained = sum(pool.map(lambda item: train_run(c, *item[1:]), todo))   # 0 for runs already finished
    curves = {}
    for name, (_, epochs, _) in runs.items():
        for s in range(c.seeds):
            d = run_dir(c, name, s, epochs)
            recs = [r for r in read_log(os.path.join(d, 'log.jsonl')) if 'val_loss' in r]
            if not recs or not finished(d):
                raise UserError(f"{d} has not finished; run python study.py --study=epochs (it continues where it stopped)")
            key = 'val_nelbo' if 'val_nelbo' in recs[-1] else 'val_loss'
            last = {r['step']: r for r in recs}                          # a resumed run logs a step once more
            curves.setdefault(name, []).append([(r['epoch'], r[key]) for r in sorted(last.values(), key=lambda r: r['step'])])
    report = race_report(c, curves)
    if trained:  # the cost of what this command trained: wall time, and the runs' own times summed
        report.update(seconds=round(time.time() - t0), run_seconds=round(trained))
    md = race_markdown(c, report)
    os.makedirs(c.results_dir, exist_ok=True)
    stem = os.path.join(c.results_dir, f'race-{c.race_tokens / 1000:g}k')
    write_json(report, stem + '.json')
    with open(stem + '.md', 'w') as f:
        f.write(md)
    race_plot(c, curves, report, stem + '.png')
    print(md)


def race_report(c, curves):
    """Each model's best value (mean, sd and 95% CI over seeds) and the epoch it came at; the
    first validation at which diffusion's mean curve is below GPT's mean best."""
    models = {}
    for name, runs in curves.items():
        best = [min(run, key=lambda p: p[1]) for run in runs]            # (epoch, value) per seed
        n = min(map(len, runs))
        mean_curve = [(runs[0][i][0], statistics.fmean(run[i][1] for run in runs)) for i in range(n)]
        models[name] = {'best': statistics.fmean(b[1] for b in best), 'best_sd': statistics.stdev(b[1] for b in best)
                        if len(best) > 1 else 0.0, 'best_ci95': seed_ci([b[1] for b in best])[1] or 0.0,
                        'best_epoch': statistics.fmean(b[0] for b in best), 'best_per_seed': best,
                        'last': mean_curve[-1][1], 'last_epoch': mean_curve[-1][0], 'mean_curve': mean_curve}
    gpt = models.get('GPT')
    for name, m in models.items():
        if gpt is None or m is gpt:
            continue
        below = [e for e, v in m['mean_curve'] if v < gpt['best']]
        m['passes_gpt_best_at_epoch'] = below[0] if below else None
        m['seeds_passing'] = sum(b[1] < gpt['best'] for b in m['best_per_seed'])
        # the first of GPT's validations after its best at which GPT's mean curve is above this model's
        # (interpolated at the same epoch): from there on GPT's last checkpoint is the worse model
        ep, val = zip(*m['mean_curve'])
        worse = [e for e, v in gpt['mean_curve'] if e >= gpt['best_epoch'] and ep[0] <= e <= ep[-1]
                 and v > float(np.interp(e, ep, val))]
        m['gpt_worse_from_epoch'] = worse[0] if worse else None
    return {'models': models, 'tokens': c.race_tokens, 'seeds': c.seeds,
            'settings': {k: c[k] for k in ('n_layer', 'n_head', 'n_embd', 'block_size', 'batch_size', 'learning_rate',
                                            'race_min_lr', 'race_epochs', 'race_gpt_epochs', 'race_evals',
                                            'race_schedule', 'race_block_len')}}


def race_markdown(c, report):
    models = report['models']
    rows = []
    for name, m in models.items():
        passes = m.get('passes_gpt_best_at_epoch', '-')
        rows.append([name, 'NLL' if name == 'GPT' else 'NELBO (bound on NLL)',
                     f"{m['best']:.4f} ± {m['best_ci95']:.4f}", f"{m['best_epoch']:.1f}",
                     f"{m['last']:.4f} (epoch {m['last_epoch']:.0f})",
                     '-' if name == 'GPT' else ('never' if passes is None else f"epoch {passes:.1f}") +
                     ('' if name == 'GPT' else f"; {m['seeds_passing']}/{report['seeds']} seeds' best"),
                     '-' if name == 'GPT' or m['gpt_worse_from_epoch'] is None else f"epoch {m['gpt_worse_from_epoch']:.1f}"])
    cost = (f", {report['seconds'] / 60:.1f} minutes on {c.jobs} CPU processes (the runs' own times sum to "
            f"{report['run_seconds'] / 60:.1f} minutes)" if 'seconds' in report else '')
    notes = [f"{report['seeds']} seeds per model on the first {report['tokens']:,} tokens of the train split{cost}; "
             f"{c.race_evals} validations per run, evenly spaced, each on the whole validation split (val_nelbo with "
             "stratified times and a control variate; standard errors in each run's log.jsonl); each run's best "
             "checkpoint is its best.pt.",
             "best: mean ± 95% CI over seeds (Student's t) of each run's lowest validation value, nats per token; "
             "its epoch: mean over seeds. The diffusion value is an upper bound on its NLL, GPT's is exact.",
             "passes GPT's best: the first validation at which the model's mean curve is below GPT's mean best. "
             "GPT's curve above it: the first of GPT's validations after its best at which GPT's mean is above this "
             "model's mean at the same epoch (GPT overfitting: its checkpoint at that epoch is the worse model)."]
    return '# The data-constrained race\n\n' + md_table(
        ['model', 'measure', 'best (nats/token)', 'best at epoch', 'at the end', "passes GPT's best",
         "GPT's curve above it from"], rows, notes)


def race_plot(c, curves, report, path):
    """Validation NLL / NELBO against epochs: mean line and a band of ± one sd over seeds per model."""
    plt = pyplot(print)
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(9, 4.8))
    for (name, runs), color in zip(curves.items(), ('black', 'tab:blue', 'tab:orange', 'tab:green')):
        n = min(map(len, runs))
        ep = [runs[0][i][0] for i in range(n)]
        vals = [[run[i][1] for run in runs] for i in range(n)]
        mean = [statistics.fmean(v) for v in vals]
        sd = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals]
        ax.plot(ep, mean, color=color, label=name + (' (NLL)' if name == 'GPT' else ' (NELBO)'))
        ax.fill_between(ep, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)], color=color,
                        alpha=0.2, lw=0)
        m = report['models'][name]
        ax.plot([m['best_epoch']], [m['best']], marker='*', ms=12, color=color, ls='none')
    gpt = report['models'].get('GPT')
    if gpt:
        ax.axhline(gpt['best'], color='black', ls=':', lw=1, label=f"GPT's best {gpt['best']:.3f}")
    lo = min(m['best'] for m in report['models'].values())
    ax.set_ylim(lo - 0.1, lo + 0.9)
    ax.set(xlabel=f"epochs over {report['tokens']:,} training tokens", ylabel='validation nats/token',
           title=f"data-constrained race: mean ± sd over {report['seeds']} seeds; * = best")
    ax.grid(alpha=0.3)
    ax.legend(loc='upper left', bbox_to_anchor=(1.01, 1), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

# -----------------------------------------------------------------------------
# do clipped_cosine and sigmoid stall at the micro-dLLM seed's settings? (its 124M report says they did)
SEED_LR = ['--learning_rate=3e-4', '--min_lr=3e-4', '--warmup_iters=0']   # the seed: constant 3e-4, no warmup
SEED_LOSS = ['--loss_weighting=masked_mean', '--dtype=bfloat16']           # masked-mean loss, bf16
STALL_SEED = SEED_LR + SEED_LOSS
STALL_VARIANTS = {  # name: (run folder suffix, args); each variant after 'seed' puts back one of ours
    'ours': ('ours', []),
    'seed': ('seed', STALL_SEED),
    'seed, NELBO weighting': ('seed-nelbo', STALL_SEED + ['--loss_weighting=nelbo']),
    'seed, float32': ('seed-float32', STALL_SEED + ['--dtype=float32']),
    'seed, our lr (1e-3, warmup, cosine)': ('seed-our', SEED_LOSS),
}


def study_stall(c):
    """Each of stall_schedules under each variant, 1 seed: the training curve of the uniform bound
    and whether it stalls (stops improving while far above where our settings get)."""
    scheds = [s for s in c.stall_schedules.split(',') if s]
    runs = {(sc, v): os.path.join(c.runs_dir, f"{sc}-{suffix}") for sc in scheds
            for v, (suffix, _) in STALL_VARIANTS.items()}
    t0 = time.time()
    if c.train:
        with ThreadPoolExecutor(c.jobs) as pool:
            list(pool.map(lambda kv: train_run(c, script('diffusion.py'), kv[1], [f'--schedule={kv[0][0]}', '--seed=0',
                                                                          *STALL_VARIANTS[kv[0][1]][1]]), runs.items()))
    rows, table = [], []
    for (sc, v), d in runs.items():
        val = [(r['step'], r['val_nelbo']) for r in read_log(os.path.join(d, 'log.jsonl')) if 'val_nelbo' in r]
        if not val or not finished(d):
            raise UserError(f"{d} has not finished; run python study.py --study=stall")
        half = [x for st, x in val if st <= val[-1][0] // 2][-1]
        gain = half - val[-1][1]
        table.append({'schedule': sc, 'variant': v, 'curve': val, 'final': val[-1][1], 'gain_second_half': gain})
        rows.append([sc, v, ' → '.join(f"{x:.3f}" for _, x in val), f"{val[-1][1]:.4f}", f"{gain:+.4f}"])
    out = {'runs': table, 'seconds': round(time.time() - t0) if c.train else None}
    os.makedirs(c.results_dir, exist_ok=True)
    write_json(out, os.path.join(c.results_dir, 'stall.json'))
    md = '# Do schedules stall at the seed\'s settings?\n\n' + md_table(
        ['schedule', 'settings', f'val_nelbo every {c.eval_interval} steps', 'final', 'fall over the second half'],
        rows, [f"seed = the micro-dLLM seed's settings: {' '.join(STALL_SEED)}; each 'seed, X' variant puts back "
               f"one of this project's defaults. {c.max_iters} steps, seed 0, the study's model; val_nelbo: the "
               "uniform-masking bound on the validation split, from the training log."])
    with open(os.path.join(c.results_dir, 'stall.md'), 'w') as f:
        f.write(md)
    print(md)

# -----------------------------------------------------------------------------
QUICK = {  # --quick: every study end to end in CI time; the numbers mean nothing
    'n_layer': 1, 'n_head': 2, 'n_embd': 32, 'block_size': 16, 'batch_size': 8, 'max_iters': 12, 'eval_interval': 6,
    'eval_iters': 2, 'seeds': 2, 'schedules': 'linear', 'maskings': 'uniform', 'block_lens': '4',
    'eval_args': '--passes=2 --max_tokens=256 --curve_points=2 --curve_tokens=64 --num_samples=2 --sample_seeds=1 '
                 '--steps=4',
    'race_tokens': 640, 'race_epochs': 4, 'race_gpt_epochs': 2, 'race_evals': 4, 'race_block_len': 4,
    'stall_schedules': 'clipped_cosine',
}


def main():
    c = configure(globals(), rules={'study': one_of(('schedules', 'epochs', 'stall'))}, verbose=False)
    if c.quick:
        c.update({k: v for k, v in QUICK.items() if k not in c.explicit})
    print('config: ' + ' '.join(f'{k}={v!r}' for k, v in c.items()))
    if not c.runs_dir:
        c.runs_dir = {'schedules': 'out/study', 'epochs': 'out/race', 'stall': 'out/stall'}[c.study] + \
            ('-quick' if c.quick else '')
    {'schedules': study_schedules, 'epochs': study_epochs, 'stall': study_stall}[c.study](c)


if __name__ == '__main__':
    run_cli(main)
