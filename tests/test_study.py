"""The study's statistics and its three studies (issue: the study's conclusions made robust).

- t975 and the incomplete beta it rests on (report.py), against closed forms and published table values;
- the final fill of masks left at t = 0 samples like every other step (argmax only on request);
- the training loop's val_nelbo: its control variate has mean 0, the estimate stays unbiased
  (against the plain estimate over many draws) with a smaller spread, and its standard error is
  honest (against the spread of repeated evaluations);
- eval_iters=0 validates on every token of the split, train_tokens trains on the first N only;
- study.py --quick end to end for each study (schedules, epochs, stall).
"""
import importlib.util
import json
import math
import os
import statistics

import numpy as np
import pytest
import torch

import diffusion as d
import runtime as R
import evaluate as ev
import report
import sample
from conftest import TINY, run_script


# ---------------------------------------------------------------- t975


def test_incomplete_beta_matches_closed_forms():
    # integer a, b: I_x(a, b) = P(Binomial(a + b - 1, x) >= a)
    for a, b, x in ((2, 3, 0.4), (1, 1, 0.3), (5, 2, 0.9), (3, 7, 0.05)):
        n = a + b - 1
        exact = sum(math.comb(n, j) * x ** j * (1 - x) ** (n - j) for j in range(a, n + 1))
        assert report.incomplete_beta(a, b, x) == pytest.approx(exact, rel=1e-12)
    # a = b = 1/2: the arcsine law
    for x in (0.01, 0.3, 0.5, 0.97):
        assert report.incomplete_beta(0.5, 0.5, x) == pytest.approx(2 / math.pi * math.asin(math.sqrt(x)), rel=1e-12)


def test_t975_exact():
    """Closed forms at 1 and 2 degrees of freedom, and the published table (4 decimals) beyond."""
    assert report.t975(1) == pytest.approx(math.tan(math.pi * 0.475), rel=1e-10)              # Cauchy: 12.7062
    assert report.t975(2) == pytest.approx(0.95 / math.sqrt(2 * 0.975 * 0.025), rel=1e-10)     # 4.3027
    table = {3: 3.1824, 4: 2.7764, 5: 2.5706, 10: 2.2281, 20: 2.0860, 30: 2.0423, 120: 1.9799}
    for df, t in table.items():
        assert report.t975(df) == pytest.approx(t, abs=5e-5), df
    assert report.t975(math.inf) == pytest.approx(1.959964, abs=1e-6)
    assert 4.3027 > report.t975(2.5) > 3.1824      # Welch-Satterthwaite degrees of freedom are not integers


# ---------------------------------------------------------------- final fill


class Fixed(torch.nn.Module):
    """A 'model' whose logits favour token 0 (prob ~0.6) over 1..4, at every position."""
    def __init__(self):
        super().__init__()
        self.cfg = d.ModelConfig(vocab_size=64, mask_id=5, block_size=8)
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, mask_rate=None, **_):
        logits = torch.full((*x.shape, 64), -1e9)
        logits[..., :5] = torch.tensor([1.8, 0.0, 0.0, 0.0, 0.0])
        return logits


def final_fill_tokens(final_fill, temperature=1.0, n=64):
    model, sched = Fixed(), d.Schedule('clipped_cosine')     # alpha(0) = 0.95: 5% of the masks left at t = 0
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    x = torch.full((n, 8), 5)
    left, out = None, None
    for _, out, changed in d.generate(model, x, 4, gens, sched, temperature=temperature, final_fill=final_fill):
        left = changed
    return out, left


def test_final_fill_samples_like_every_step():
    out, left = final_fill_tokens('sample')
    filled = out[left]
    assert (out != 5).all() and left.sum() > 10                # something was left at t = 0, and it got filled
    share = (filled == 0).float().mean().item()
    assert 0.3 < share < 0.9 and len(set(filled.tolist())) > 1  # sampled (p(0) ~ 0.6), not all argmax
    out, left = final_fill_tokens('argmax')
    assert (out[left] == 0).all()                              # the explicit option: greedy
    out, left = final_fill_tokens('sample', temperature=0.0)
    assert (out[left] == 0).all()                              # temperature 0 is greedy everywhere


def test_final_fill_is_an_option_of_every_script(tiny_runs, tmp_path):
    r = run_script('sample.py', f"--out_dir={tiny_runs['diffusion']}", '--final_fill=nope', '--device=cpu', check=False)
    assert r.returncode == R.EXIT_USAGE and "final_fill" in r.stderr and 'Traceback' not in r.stderr
    assert 'final_fill' in ev.EVAL_KEYS       # recorded in every eval.json's settings


# ---------------------------------------------------------------- val_nelbo: control variate, standard error


@pytest.fixture(scope='module')
def trained(tiny_runs):
    run = sample.load_run(os.path.join(tiny_runs['diffusion'], 'ckpt.pt'))
    val = R.TokenData(run.ckpt['config']['data_dir'], run.ckpt['config']['dataset'], 'val')
    return run, val


def val_nelbo(run, val, seed, iters, cv=True):
    obj = run.objective
    obj._cv, obj.c.seed = None, seed
    if not cv:
        obj.control_variate = lambda t, u: torch.zeros(u.size(0), dtype=torch.float64)
    try:
        return obj.evaluate(run.model, (val.batch(8, run.model.cfg.block_size + 1, R.rng(0, 'val', i))
                                        for i in range(iters)))
    finally:
        obj.__dict__.pop('control_variate', None)


def test_control_variate_has_mean_zero(trained):
    run, val = trained
    obj = run.objective
    x = val.batch(512, run.model.cfg.block_size + 1, R.rng(0, 'cv'))[:, :-1]
    t, u = obj.draws(x, ('cv', 0))
    c = obj.control_variate(t, u)
    # independent computation: (1 - t_min) / t x (tokens with u < t) / T - (1 - t_min)
    expect = (1 - obj.c.t_min) / t * (u < t[:, None]).sum(1) / x.size(1) - (1 - obj.c.t_min)
    assert torch.allclose(c, expect.double())
    assert abs(c.mean().item()) < 3 * c.std().item() / math.sqrt(len(c))


def test_val_nelbo_unbiased_less_noisy_and_its_se_honest(trained):
    """Same data, 16 independent sets of draws: the control-variate estimate and the plain one
    agree in mean (within 3 standard errors), the former spreads less, and the standard error
    it reports matches the spread of the repeats."""
    run, val = trained
    with_cv = [val_nelbo(run, val, s, 6) for s in range(16)]
    plain = [val_nelbo(run, val, s, 6, cv=False)['val_nelbo'] for s in range(16)]
    a = [m['val_nelbo'] for m in with_cv]
    diff = statistics.fmean(a) - statistics.fmean(plain)
    assert abs(diff) < 3 * math.hypot(statistics.stdev(a), statistics.stdev(plain)) / 4
    assert statistics.stdev(a) < statistics.stdev(plain)
    # the batches hold the same windows every time, so the repeats' spread is the Monte Carlo part only;
    # the reported se also counts the windows' spread, so it can only be larger (never smaller)
    se = statistics.fmean(m['val_nelbo_se'] for m in with_cv)
    assert se > 0.7 * statistics.stdev(a)


def test_eval_whole_split_and_train_tokens(char_data, tmp_path):
    meta = R.load_meta(char_data, 'shakespeare_char')
    val = R.TokenData(char_data, 'shakespeare_char', 'val', meta)
    wins = torch.cat(list(val.windows(8, 33)))
    n = val.tokens
    assert (wins[1:, 0] == wins[:-1, -1]).all()                  # each window starts on the last one's end
    data = np.memmap(val.paths[0], dtype=np.uint16, mode='r')
    assert torch.equal(wins[:, :-1].reshape(-1), torch.from_numpy(data[:len(wins) * 32].astype(np.int64)))
    assert n - len(wins) * 32 < 33                               # every token but a last partial window
    part = R.TokenData(char_data, 'shakespeare_char', 'train', meta, limit=1000)
    assert part.tokens == 1000
    b = part.batch(64, 33, R.rng(0, 'x'))
    first = np.memmap(part.paths[0], dtype=np.uint16, mode='r')[:1000].astype(np.int64)
    windows = {tuple(first[i:i + 33]) for i in range(1000 - 32)}
    assert all(tuple(r.tolist()) in windows for r in b)           # every window lies in the first 1000 tokens
    with pytest.raises(R.UserError, match='more than'):
        R.TokenData(char_data, 'shakespeare_char', 'train', meta, limit=10 ** 9)
    out = tmp_path / 'run'
    r = run_script('diffusion.py', *TINY, f'--data_dir={char_data}', f'--out_dir={out}', '--max_iters=4',
                   '--eval_interval=2', '--eval_iters=0', '--train_tokens=2000')
    recs = [json.loads(line) for line in open(out / 'log.jsonl')]
    vals = [x for x in recs if 'val_nelbo' in x]
    assert [x['step'] for x in vals] == [0, 2, 4] and vals[-1]['epoch'] == pytest.approx(4 * 8 * 32 / 2000)
    assert all(x['val_nelbo_se'] > 0 for x in vals) and '(se ' in r.stdout


# ---------------------------------------------------------------- the studies, CI-sized


@pytest.mark.parametrize('study', ['schedules', 'epochs', 'stall'])
def test_study_quick(study, char_data, tmp_path):
    res = tmp_path / 'results'
    run_script('study.py', f'--study={study}', '--quick', f'--data_dir={char_data}', f'--runs_dir={tmp_path / "runs"}',
               f'--results_dir={res}', timeout=900)
    if study == 'schedules':
        cells = json.loads((res / 'study.json').read_text())['cells']
        assert [c['objective'] for c in cells] == ['gpt', 'diffusion', 'diffusion']
        assert all(c['gen_ppl_pooled']['n'] == 4 and c['nats_ci95'] is not None for c in cells)
        assert all(c['final_fill'] == ['sample'] for c in cells[1:])
        assert (res / 'runs' / 'compare.md').exists()
        plots = importlib.util.find_spec('matplotlib') is not None
        assert (res / 'cells.png').exists() == plots and (res / 'cell_curves.png').exists() == plots
    elif study == 'epochs':
        rep = json.loads((res / 'race-0.64k.json').read_text())
        assert set(rep['models']) == {'GPT', 'diffusion (clipped_cosine)', 'block diffusion L=4'}
        for name, m in rep['models'].items():
            assert len(m['best_per_seed']) == 2 and m['best'] == pytest.approx(
                statistics.fmean(b[1] for b in m['best_per_seed']))
            assert m['last_epoch'] == pytest.approx(2 if name == 'GPT' else 4, abs=0.2)
        for s in range(2):   # each run kept its best checkpoint
            assert os.path.exists(tmp_path / 'runs' / f'diffusion-clipped_cosine-0.64k-e4-s{s}' / 'best.pt')
        assert '| GPT | NLL |' in (res / 'race-0.64k.md').read_text()
        # the plot needs the optional matplotlib; without it the report says so and goes on
        assert (res / 'race-0.64k.png').exists() == (importlib.util.find_spec('matplotlib') is not None)
    else:
        runs = json.loads((res / 'stall.json').read_text())['runs']
        assert len(runs) == 5 and {r['variant'] for r in runs} >= {'ours', 'seed'}
        cfg = json.loads(open(tmp_path / 'runs' / 'clipped_cosine-seed' / 'status.json').read())
        assert cfg['status'] == 'finished'
