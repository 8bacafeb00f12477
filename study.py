"""
study.py: the whole 6 schedules x 2 maskings matrix plus a GPT baseline, trained, evaluated
and compared by one command, with several seeds per cell.

    python prepare.py && python study.py          # CPU scale, Tiny Shakespeare (see README for time)

Order: the GPT baselines first (seed 0 is also the reference model for the entropy array and
for generative perplexity), then `prepare.py --entropy`, then the 12 diffusion cells x seeds,
`jobs` at a time, then evaluate.py on every run and a table in results/. Every run uses
--init_from=auto, so rerunning after an interruption continues where it stopped, and finished
runs are skipped. At the 124M scale, train with `sbatch --array=0-11 slurm_train.sh
config/fineweb_124m.py` and point --runs_dir at those runs with --train=false.
"""
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from diffusion import SCHEDULES, UserError, configure, run_cli

# -----------------------------------------------------------------------------
runs_dir = 'out/study'          # one folder per run: diffusion-<schedule>-<masking>-s<seed>, gpt-s<seed>
results_dir = 'results'         # comparison table (markdown + JSON) and plots
dataset = 'shakespeare_char'    # prepared by prepare.py
data_dir = 'data'
schedules = ','.join(SCHEDULES) # comma-separated subset of the six
maskings = 'uniform,entropy'    # comma-separated
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


def run(cmd, log_path=None):
    """Run a command; its output goes to log_path (or ours). Raises on failure with the log's tail."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED='1')
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


def common_args():
    return [f'--dataset={dataset}', f'--data_dir={data_dir}', f'--n_layer={n_layer}', f'--n_head={n_head}',
            f'--n_embd={n_embd}', f'--block_size={block_size}', f'--batch_size={batch_size}',
            f'--max_iters={max_iters}', f'--learning_rate={learning_rate}', f'--eval_interval={eval_interval}',
            f'--eval_iters={eval_iters}', f'--device={device}', '--sample_at_end=false', '--init_from=auto',
            '--log_interval=50']


def finished(out_dir):
    path = os.path.join(out_dir, 'status.json')
    return os.path.exists(path) and json.load(open(path)).get('status') == 'finished'


def train_run(script, out_dir, extra):
    if finished(out_dir):
        return 0.0
    os.makedirs(out_dir, exist_ok=True)
    dt = run([sys.executable, script, *common_args(), f'--out_dir={out_dir}', *extra],
             os.path.join(out_dir, 'train.out'))
    print(f"  {out_dir}: {dt:.0f} s", flush=True)
    return dt


def main():
    configure(globals(), verbose=True)
    scheds = [s for s in schedules.split(',') if s]
    masks = [m for m in maskings.split(',') if m]
    bad = [s for s in scheds if s not in SCHEDULES] + [m for m in masks if m not in ('uniform', 'entropy')]
    if bad:
        raise UserError(f"unknown schedule or masking {bad}", 2)
    t_start = time.time()
    gpt_dirs = [os.path.join(runs_dir, f'gpt-s{s}') for s in range(seeds)]
    diff_dirs = {(sc, m, s): os.path.join(runs_dir, f'diffusion-{sc}-{m}-s{s}')
                 for sc in scheds for m in masks for s in range(seeds)}
    ref = gpt_dirs[0]
    entropy = os.path.join(data_dir, dataset, 'entropy.npy')
    if train:
        print(f"training {len(gpt_dirs)} GPT baselines and {len(diff_dirs)} diffusion runs, {jobs} at a time")
        with ThreadPoolExecutor(jobs) as pool:
            list(pool.map(lambda sd: train_run('gpt.py', sd[1], [f'--seed={sd[0]}']), enumerate(gpt_dirs)))
        if 'entropy' in masks and not os.path.exists(entropy):
            run([sys.executable, 'prepare.py', '--entropy', f'--ref={ref}', f'--dataset={dataset}',
                 f'--data_dir={data_dir}'])
        with ThreadPoolExecutor(jobs) as pool:
            list(pool.map(lambda item: train_run('diffusion.py', item[1],
                                                 [f'--schedule={item[0][0]}', f'--masking={item[0][1]}',
                                                  f'--seed={item[0][2]}', f'--entropy_file={entropy}']),
                          diff_dirs.items()))
    t_train = time.time() - t_start
    all_dirs = gpt_dirs + list(diff_dirs.values())
    missing = [d for d in all_dirs if not os.path.exists(os.path.join(d, 'ckpt.pt'))]
    if missing:
        raise UserError(f"no checkpoint in {missing[0]} (and {len(missing) - 1} more); run with --train=true")
    os.makedirs(results_dir, exist_ok=True)
    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(lambda d: run([sys.executable, 'evaluate.py', f'--out_dir={d}', f'--ref={ref}',
                                     f'--device={device}', *eval_args.split()], os.path.join(d, 'eval.out')),
                      all_dirs))
    run([sys.executable, 'evaluate.py', '--compare', *all_dirs, f'--results_dir={results_dir}', '--group_seeds=true'])
    total = time.time() - t_start
    with open(os.path.join(results_dir, 'study_time.json'), 'w') as f:
        json.dump({'train_seconds': round(t_train), 'total_seconds': round(total), 'runs': len(all_dirs),
                   'jobs': jobs, 'threads': threads}, f)
    print(f"study done in {total / 60:.1f} min (training {t_train / 60:.1f} min); see {results_dir}/")


if __name__ == '__main__':
    run_cli(main)
