"""Shared pytest fixtures: a prepared character dataset and tiny trained checkpoints.

Every test runs on CPU with fixed seeds, on the same text with or without ../shared: the
Tiny Shakespeare excerpt shipped in tests/fixtures/ (all 65 characters of the full text; see
tests/fixtures/make_tinyshakespeare_excerpt.py). ../shared (beside the repo) only provides the
GPT-2 BPE files for tiktoken through TIKTOKEN_CACHE_DIR, when present; the tests that need them
skip without them (offline). Every test runs in an empty temporary folder, never the repo, so
a default out_dir (out/...) or data_dir (data) can never reach the repo's own out/ and data/."""
import os
import subprocess
import sys
import time

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


@pytest.fixture(scope='session', autouse=True)
def outside_the_repo(tmp_path_factory):
    """The whole session runs in an empty temporary folder (and so do run_script's subprocesses):
    relative defaults such as out_dir='out/diffusion-...' or data_dir='data' land there, not in
    the repo, where a user's quick start may have left a run that a test would trip over."""
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp('cwd'))
    yield os.getcwd()
    os.chdir(cwd)


def run_script(script, *args, check=True, timeout=600, **kw):
    """Run one of the project's scripts in a subprocess (in the current folder, a temporary one
    under pytest: see outside_the_repo); returns the result."""
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '1'))
    r = subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, args)], env=env,
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


def wait_for(what, check, timeout, info=lambda: '', proc=None, poll=0.05):
    """Poll check() until it returns something true (returned); fails after timeout seconds, or
    at once when proc (a Popen) exits first. info() adds context to the failure message."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        assert proc is None or proc.poll() is None, f"the run exited {proc.returncode} before {what}\n{info()}"
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{info()}")
