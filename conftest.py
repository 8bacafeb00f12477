"""Shared pytest fixtures: a prepared character dataset and tiny trained checkpoints.

Every test runs on CPU with fixed seeds, on the same text with or without ../shared: the
Tiny Shakespeare excerpt shipped in tests/fixtures/ (all 65 characters of the full text; see
tests/fixtures/make_tinyshakespeare_excerpt.py). ../shared (beside the repo) only provides the
GPT-2 BPE files for tiktoken through TIKTOKEN_CACHE_DIR, when present; the tests that need them
skip without them (offline)."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.normpath(os.path.join(REPO, '..', 'shared'))
SHAKESPEARE = os.path.join(REPO, 'tests', 'fixtures', 'tinyshakespeare_excerpt.txt')
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


@pytest.fixture(scope='session')
def char_data(tmp_path_factory):
    """data_dir holding shakespeare_char, prepared by prepare.py."""
    root = tmp_path_factory.mktemp('data')
    run_script('prepare.py', '--dataset=shakespeare_char', f'--input={SHAKESPEARE}', f'--data_dir={root}')
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
