"""Shared pytest fixtures: a prepared character dataset and tiny trained checkpoints.

Every test runs on CPU with fixed seeds. ../shared (beside the repo) is used when present:
Tiny Shakespeare, and the GPT-2 BPE files for tiktoken through TIKTOKEN_CACHE_DIR."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.normpath(os.path.join(REPO, '..', 'shared'))
SHAKESPEARE = os.path.join(SHARED, 'data', 'tinyshakespeare.txt')
TIKTOKEN_CACHE = os.path.join(SHARED, 'tiktoken_cache')

if os.path.isdir(TIKTOKEN_CACHE) and 'TIKTOKEN_CACHE_DIR' not in os.environ:
    os.environ['TIKTOKEN_CACHE_DIR'] = TIKTOKEN_CACHE

# A tiny model that trains in seconds on 2 cores.
TINY = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=8',
        '--eval_iters=2', '--log_interval=1', '--sample_at_end=false', '--device=cpu', '--warmup_iters=5']


def run_script(script, *args, check=True, timeout=600, **kw):
    """Run one of the project's scripts in a subprocess from the repo root; returns the result."""
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '1'))
    r = subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, args)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} exited {r.returncode}:\n{r.stdout[-3000:]}\n"
                             f"{r.stderr[-3000:]}")
    return r


def sample_text_file(path, n_chars=200_000):
    """Tiny Shakespeare from ../shared when present, else a deterministic stand-in text."""
    if os.path.exists(SHAKESPEARE):
        return SHAKESPEARE
    import random
    rnd = random.Random(0)
    words = ['the', 'king', 'and', 'queen', 'of', 'my', 'lord', 'thou', 'art', 'good', 'love', 'night']
    lines = []
    while sum(map(len, lines)) < n_chars:
        lines.append(rnd.choice(['ROMEO:', 'JULIET:', 'KING:']) + '\n' +
                     ' '.join(rnd.choice(words) for _ in range(rnd.randint(4, 12))).capitalize() + '.\n')
    with open(path, 'w') as f:
        f.write('\n'.join(lines))
    return path


@pytest.fixture(scope='session')
def char_data(tmp_path_factory):
    """data_dir holding shakespeare_char, prepared by prepare.py."""
    root = tmp_path_factory.mktemp('data')
    text = sample_text_file(str(root / 'input.txt'))
    run_script('prepare.py', '--dataset=shakespeare_char', f'--input={text}', f'--data_dir={root}')
    return str(root)


@pytest.fixture(scope='session')
def tiny_runs(char_data, tmp_path_factory):
    """{'diffusion': out_dir, 'gpt': out_dir}: tiny models trained 40 steps on shakespeare_char."""
    root = tmp_path_factory.mktemp('runs')
    runs = {}
    for script, name in (('diffusion.py', 'diffusion'), ('gpt.py', 'gpt')):
        out = str(root / name)
        run_script(script, *TINY, f'--data_dir={char_data}', f'--out_dir={out}', '--max_iters=40',
                   '--eval_interval=20')
        runs[name] = out
    return runs
