"""bench/bench_train.py runs end to end at a tiny size: ms/step of both objectives with their graph
breaks (0) and compilations (1), the profile of where an eager step's time goes, and, when
../shared/reference is there, nanoGPT's and the microDLM seed's steps timed beside ours in the
same process. Timing values are printed, never asserted (benchmarks, not timed tests)."""
import os
import re

import pytest

from conftest import SHAKESPEARE, SHARED, run_script

TINY_BENCH = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=4', '--steps=3',
              '--processes=false']


def rows(out):
    """{name: [the numbers after it]} for the table lines of the in-process section."""
    table = {}
    for line in out.splitlines():
        m = re.match(r'^((?:diffusion|gpt)\.py(?: --compile)?|nanoGPT model\.py(?: --compile)?|microDLM diffusion\.py)'
                     r'\s+([\d.,\s]+)$', line)
        if m:
            table[m.group(1)] = [float(v.replace(',', '')) for v in m.group(2).split()]
    return table


def test_bench_train_ours():
    out = run_script('bench/bench_train.py', *TINY_BENCH, "--reference_dir=", timeout=900).stdout
    table = rows(out)
    for name in ('diffusion.py', 'gpt.py'):
        ms, ratio, tokens_per_s, breaks, compiles = table[name]
        assert ms > 0 and ratio > 0 and tokens_per_s > 0
        assert (breaks, compiles) == (0, 1), out
    assert 'floor' in out and 'no reference implementations' in out
    profile = out[out.index("where an eager step's time goes"):]
    for name in ('diffusion.py', 'gpt.py'):
        line = next(l for l in profile.splitlines() if l.startswith(name))
        forward, backward, clip, optimizer = map(float, line.split('|')[0].split()[1:])
        assert forward > 0 and backward > 0 and clip > 0 and optimizer > 0


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED, 'reference', 'nanoGPT')),
                    reason="the reference implementations live in ../shared/reference (absent here)")
def test_bench_train_references_in_process():
    out = run_script('bench/bench_train.py', *TINY_BENCH, '--profile=false', f'--text={SHAKESPEARE}',
                     timeout=900).stdout
    table = rows(out)
    assert {'diffusion.py', 'gpt.py', 'nanoGPT model.py', 'microDLM diffusion.py'} <= set(table), out
    assert all(table[k][0] > 0 for k in table)
    assert re.search(r'^nanoGPT model\.py\s+[\d.]+x\s+[\d.]+x$', out, re.M), out   # its ratios to ours
