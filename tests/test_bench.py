"""bench/bench_train.py runs end to end at a tiny size: ms/step of both objectives with their graph
breaks (0) and compilations (1), the profile of where an eager step's time goes, and, when
../shared/reference is there, nanoGPT's and the microDLM seed's steps timed beside ours in the
same process; bench/bench_arch.py's variants each change the model and are undone after. Timing
values are printed, never asserted (benchmarks, not timed tests)."""
import importlib.util
import os
import re

import pytest
import torch

import diffusion as D
from conftest import REPO, SHAKESPEARE, SHARED, run_script

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


def test_bench_arch_prints_each_variant():
    out = run_script('bench/bench_arch.py', '--n_layer=1', '--n_head=2', '--n_embd=32', '--block_size=16',
                     '--batch_size=2', '--steps=2').stdout
    found = dict(re.findall(r'^(ours|no QK-norm|no RoPE|GELU for ReLU2|none of the three)\s+([\d.]+) ms/step', out, re.M))
    assert set(found) == {'ours', 'no QK-norm', 'no RoPE', 'GELU for ReLU2', 'none of the three'}, out
    assert re.search(r'^ours\s+[\d.]+ ms/step\s+\+0\.0 ms vs ours$', out, re.M), out


def test_bench_arch_variants_change_the_model_and_are_undone():
    """Each variant's swap changes what the model computes, and the originals come back after."""
    spec = importlib.util.spec_from_file_location('bench_arch', os.path.join(REPO, 'bench', 'bench_arch.py'))
    arch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(arch)
    torch.manual_seed(0)
    model = D.Transformer(D.ModelConfig(vocab_size=128, mask_id=65, block_size=16, n_layer=1, n_head=2, n_embd=32))
    x = torch.randint(0, 65, (2, 16), generator=torch.Generator().manual_seed(0))
    own = {k: getattr(D, k) for k in ('rms_norm', 'apply_rope', 'ReLUSquared')}
    ref = model(x)
    for name, swaps in arch.VARIANTS.items():
        for k, v in swaps.items():
            setattr(D, k, v)
        try:
            changed = not torch.equal(model(x), ref)
        finally:
            for k, v in own.items():
                setattr(D, k, v)
        assert changed == bool(swaps), name
    assert torch.equal(model(x), ref)
