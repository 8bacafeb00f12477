"""
study.py: the whole 6 schedules x 2 maskings matrix plus a GPT baseline, trained, evaluated
and compared by one command, with several seeds per cell; and block diffusion (BD3-LM) rows at
block_lens 4 and 16 (uniform masking, --block_schedule), between GPT (block length 1) and MDLM
(block length block_size).

    python prepare.py && python study.py          # CPU scale, Tiny Shakespeare (see README for time)

Order: the GPT baselines first (seed 0 is also the reference model for the entropy array and
for generative perplexity), then `prepare.py --entropy`, then the 12 diffusion cells and the
block diffusion cells x seeds, `jobs` at a time, then evaluate.py on every run and a table in
results/. Every run uses --init_from=auto, so rerunning after an interruption continues where
it stopped, and finished runs are skipped. At the 124M scale, train with `sbatch --array=0-11
slurm_train.sh config/fineweb_124m.py` and point --runs_dir at those runs with --train=false.
"""
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor


import evaluate
from diffusion import MASKINGS, SCHEDULES, UserError, configure, run_cli

# -----------------------------------------------------------------------------
runs_dir = 'out/study'          # one folder per run: diffusion-<schedule>-<masking>-s<seed>, gpt-s<seed>
results_dir = 'results'         # comparison table (markdown + JSON) and plots
dataset = 'shakespeare_char'    # prepared by prepare.py
data_dir = 'data'
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
eval_iters = 20
device = 'cpu'
# evaluation (evaluate.py)
eval_args = '--passes=2 --max_tokens=32768 --curve_points=5 --curve_tokens=8192 --num_samples=8 --sample_seeds=1'  # for evaluate.py
# -----------------------------------------------------------------------------


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


def train_run(c, script, out_dir, extra):
    if finished(out_dir):
        return 0.0
    os.makedirs(out_dir, exist_ok=True)
    dt = run(c, [sys.executable, script, *common_args(c), f'--out_dir={out_dir}', *extra],
             os.path.join(out_dir, 'train.out'))
    print(f"  {out_dir}: {dt:.0f} s", flush=True)
    return dt


def main():
    c = configure(globals(), verbose=True)
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
            list(pool.map(lambda sd: train_run(c, 'gpt.py', sd[1], [f'--seed={sd[0]}']), enumerate(gpt_dirs)))
        if 'entropy' in masks and not os.path.exists(entropy):
            run(c, [sys.executable, 'prepare.py', '--entropy', f'--ref={ref}', f'--dataset={c.dataset}',
                 f'--data_dir={c.data_dir}'])
        todo = [(d, [f'--schedule={sc}', f'--masking={m}', f'--seed={s}', f'--entropy_file={entropy}'])
                for (sc, m, s), d in diff_dirs.items()]
        todo += [(d, [f'--block_len={b}', f'--schedule={c.block_schedule}', '--masking=uniform', f'--seed={s}'])
                 for (b, s), d in block_dirs.items()]
        with ThreadPoolExecutor(c.jobs) as pool:
            list(pool.map(lambda item: train_run(c, 'diffusion.py', *item), todo))
    t_train = time.time() - t_start
    all_dirs = gpt_dirs + list(block_dirs.values()) + list(diff_dirs.values())
    missing = [d for d in all_dirs if not os.path.exists(os.path.join(d, 'ckpt.pt'))]
    if missing:
        raise UserError(f"no checkpoint in {missing[0]} (and {len(missing) - 1} more); run with --train=true")
    os.makedirs(c.results_dir, exist_ok=True)
    def evaluated(d):  # an eval.json newer than the checkpoint: --compare checks its settings too
        e, c = os.path.join(d, 'eval.json'), os.path.join(d, 'ckpt.pt')
        return os.path.exists(e) and os.path.getmtime(e) > os.path.getmtime(c)
    with ThreadPoolExecutor(c.jobs) as pool:  # evaluate in parallel; --compare below reuses each eval.json
        list(pool.map(lambda d: run(c, [sys.executable, 'evaluate.py', f'--out_dir={d}', f'--ref={ref}',
                                     f'--device={c.device}', *c.eval_args.split()], os.path.join(d, 'eval.out')),
                      [d for d in all_dirs if not evaluated(d)]))
    run(c, [sys.executable, 'evaluate.py', '--compare', *all_dirs, f'--report_dir={c.results_dir}', f'--device={c.device}',
         f'--ref={ref}', *c.eval_args.split()])
    evaluate.summarise_cells(all_dirs, c.results_dir)
    total = time.time() - t_start
    if c.train:  # the time of a whole study (an evaluation-only rerun would overwrite it with its own)
        with open(os.path.join(c.results_dir, 'study_time.json'), 'w') as f:
            json.dump({'train_seconds': round(t_train), 'total_seconds': round(total), 'runs': len(all_dirs),
                       'jobs': c.jobs, 'threads': c.threads}, f)
    print(f"study done in {total / 60:.1f} min (training {t_train / 60:.1f} min); see {c.results_dir}/")


if __name__ == '__main__':
    run_cli(main)
