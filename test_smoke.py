"""Smoke tests for diffusion.py: formulas against independent computations, the forward
process, the NELBO estimator, SUBS, training, exact resume after a real signal, and errors.
Runs on CPU in about a minute on 2 cores: python -m pytest -q test_smoke.py"""
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import diffusion as D
import runtime as R
from conftest import REPO, TINY, run_script

ENDPOINTS = {  # alpha(0), alpha(1), written out independently of the code under test
    'linear': (1.0, 0.0), 'cosine': (1.0, 0.0), 'loglinear': (1.0, 1e-3), 'sqrt': (1.0, 0.0),
    'clipped_cosine': (0.95, 0.05), 'sigmoid': (1 / (1 + math.exp(-5)), 1 / (1 + math.exp(5))),
}


# ---------------------------------------------------------------- schedules
@pytest.mark.parametrize('name', list(D.SCHEDULES))
def test_schedule_endpoints_monotone_and_derivative(name):
    s = D.Schedule(name)
    a0, a1 = ENDPOINTS[name]
    t01 = torch.tensor([0.0, 1.0], dtype=torch.float64)
    assert torch.allclose(s.alpha(t01), torch.tensor([a0, a1], dtype=torch.float64), atol=1e-12)
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    assert (s.alpha(t).diff() < 0).all(), 'alpha must decrease strictly'
    # alpha' against autograd, away from t=0 where sqrt's derivative is infinite
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(s.alpha(t).sum(), t)
    assert torch.allclose(s.dalpha(t.detach()), grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('name', list(D.SCHEDULES))
def test_nelbo_weight_against_finite_differences(name):
    s = D.Schedule(name)
    t = torch.linspace(0.02, 0.98, 49, dtype=torch.float64)
    h = 1e-6
    dalpha_fd = (s.alpha(t + h) - s.alpha(t - h)) / (2 * h)
    expected = -dalpha_fd / (1 - s.alpha(t))
    assert torch.allclose(s.weight(t), expected, rtol=1e-6)
    assert torch.isfinite(s.weight(torch.tensor([1e-3, 1.0], dtype=torch.float64))).all()


def test_unknown_schedule_is_a_user_error():
    with pytest.raises(R.UserError, match='unknown schedule'):
        D.Schedule('cosin')


# ---------------------------------------------------------------- forward process
def test_uniform_mask_rate_matches_one_minus_alpha():
    s = D.Schedule('cosine')
    x = torch.randint(0, 50, (64, 500), generator=torch.Generator().manual_seed(0))
    for t in (0.1, 0.5, 0.9):
        alpha = s.alpha(torch.full((64,), t, dtype=torch.float64))
        rate = D.draw_mask(x, D.mask_uniform(x, alpha, None), R.rng(0, t)).double().mean().item()
        p = 1 - math.cos(math.pi / 2 * t)
        se = math.sqrt(p * (1 - p) / x.numel())
        assert abs(rate - p) < 4 * se, (t, rate, p)


def test_entropy_weighting_shifts_masks_to_low_entropy_tokens():
    # three token ids: low entropy (weight 1.5), average (1.0), high entropy (weight 0.5 after clamp)
    ent_norm = np.array([0.2, 1.0, 2.5])
    w = D.entropy_weights(ent_norm, vocab_size=8)
    assert w[:3].tolist() == [1.5, 1.0, 0.5] and w[3:].eq(1).all()
    x = torch.arange(3).repeat(200_00).view(100, -1)  # equal counts of each id
    for one_minus_alpha in (0.3, 0.8):
        alpha = torch.full((100,), 1 - one_minus_alpha, dtype=torch.float64)
        objective = type('Stub', (), {'entropy_weight': lambda self, device: w})()  # what DiffusionObjective gives
        mask = D.draw_mask(x, D.mask_entropy(x, alpha, objective), R.rng(1, one_minus_alpha))
        for tok, weight in enumerate((1.5, 1.0, 0.5)):
            p = min(one_minus_alpha * weight, 1.0)  # the spec: (1-alpha) * clamp(2 - ent, .5, 1.5), at most 1
            rate = mask[x == tok].double().mean().item()
            se = math.sqrt(max(p * (1 - p), 1e-12) / (x == tok).sum().item())
            assert abs(rate - p) < 4 * se + 1e-12, (tok, one_minus_alpha, rate, p)


def test_entropy_file_errors(tmp_path):
    with pytest.raises(R.UserError, match='no entropy file'):
        R.load_entropy(str(tmp_path / 'missing.npy'), 65)
    np.save(tmp_path / 'short.npy', np.ones(10))
    with pytest.raises(R.UserError, match='expected \\(65,\\)'):
        R.load_entropy(str(tmp_path / 'short.npy'), 65)


# ---------------------------------------------------------------- NELBO estimator
def _tiny_model(T=4, vocab=5, causal=False):
    torch.manual_seed(0)
    cfg = D.ModelConfig(vocab_size=8, mask_id=vocab, block_size=T, n_layer=1, n_head=2, n_embd=16, causal=causal)
    return D.Transformer(cfg).eval()


@pytest.mark.parametrize('name', ['linear', 'cosine'])
def test_nelbo_estimator_matches_brute_force_integral(name):
    """The stratified-t Monte Carlo estimator's mean equals the integral over t of the exact
    expectation over all 2^T masks (enumerated), computed by quadrature."""
    T, t_min = 4, 1e-3
    model, s = _tiny_model(T), D.Schedule(name)
    x = torch.tensor([[1, 3, 0, 2]])
    with torch.no_grad():
        masks = torch.tensor(list(itertools.product([False, True], repeat=T)))  # (16, T)
        ce = D.masked_ce(model, x.expand(len(masks), T), masks, model.cfg.mask_id)  # (16,)
        n = 4000  # midpoint rule on [t_min, 1]
        t = t_min + (1 - t_min) * (torch.arange(n, dtype=torch.float64) + 0.5) / n
        q = 1 - s.alpha(t)[:, None]                                     # (n, 1) mask probability
        k = masks.sum(1)[None].double()                                # (1, 16)
        p_mask = q ** k * (1 - q) ** (T - k)                            # (n, 16)
        integrand = s.weight(t) * (p_mask * ce.double()[None]).sum(1) / T
        exact = ((1 - t_min) * integrand.mean()).item()
        # the estimator: 200 steps x 64 sequences of stratified t
        B, est = 64, []
        for step in range(200):
            u0 = torch.rand((), generator=R.rng(7, step), dtype=torch.float64)
            tt = D.stratified_times(u0, 0, B, B, t_min)
            loss, per_seq = D.diffusion_loss(model, x.expand(B, T), tt, s, model.cfg.mask_id, R.rng(8, step),
                                             t_min=t_min)
            est.append(loss.item())
    est = np.array(est)
    se = est.std(ddof=1) / math.sqrt(len(est))
    assert abs(est.mean() - exact) < 4 * se, (est.mean(), exact, se)
    assert se < 0.05 * exact


def test_stratified_times_cover_the_unit_interval_evenly():
    t = D.stratified_times(torch.tensor(0.3, dtype=torch.float64), 0, 8, 8, 0.0)
    assert sorted(((t * 8) // 1).long().tolist()) == list(range(8))  # one per stratum
    # slices of a global batch (ranks / micro-steps) together give the same strata
    parts = torch.cat([D.stratified_times(torch.tensor(0.3, dtype=torch.float64), s, 4, 8, 0.0) for s in (0, 4)])
    assert torch.equal(parts, t)


# ---------------------------------------------------------------- SUBS: MASK is never predicted
def test_mask_is_never_predicted():
    model = _tiny_model()
    with torch.no_grad():
        model.lm_head.weight[model.cfg.mask_id] = 100.0  # try hard to make MASK the argmax
        logits = model(torch.tensor([[5, 5, 1, 5]]))
    assert torch.isinf(logits[..., model.cfg.mask_id:]).all() and (logits[..., model.cfg.mask_id:] < 0).all()
    assert (logits.argmax(-1) < model.cfg.mask_id).all()
    assert torch.isfinite(logits[..., :model.cfg.mask_id]).all()


def test_loss_counts_masked_positions_only():
    model = _tiny_model()
    x = torch.tensor([[1, 3, 0, 2]])
    mask = torch.tensor([[False, True, False, False]])
    with torch.no_grad():
        full = model(torch.where(mask, model.cfg.mask_id, x))[0, 1]
        expected = -torch.log_softmax(full, -1)[3]
        assert torch.allclose(D.masked_ce(model, x, mask, model.cfg.mask_id), expected[None], atol=1e-6)


# ---------------------------------------------------------------- training
def _records(out_dir):
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


def test_tiny_model_loss_falls(tiny_runs):
    recs = [r for r in _records(tiny_runs['diffusion']) if 'lr' in r]
    first = np.mean([r['loss'] for r in recs[:5]])
    last = np.mean([r['loss'] for r in recs[-5:]])
    assert last < first - 0.3, (first, last)
    vals = [r['val_nelbo'] for r in _records(tiny_runs['diffusion']) if 'val_nelbo' in r]
    assert vals[-1] < vals[0]
    ckpt = R.read_checkpoint(tiny_runs['diffusion'])
    assert ckpt['objective'] == 'diffusion' and ckpt['step'] == 40 and ckpt['config']['schedule'] == 'linear'


@pytest.mark.parametrize('masking', list(D.MASKINGS))
def test_every_schedule_and_masking_trains(char_data, tmp_path, masking):
    """All six schedules x both maskings run 3 steps in-process and give finite losses."""
    meta = R.load_meta(char_data, 'shakespeare_char')
    ent = tmp_path / 'entropy.npy'
    np.save(ent, np.random.default_rng(0).gamma(4.0, 0.25, meta['vocab_size']))
    for name in D.SCHEDULES:
        out = tmp_path / f'{name}-{masking}'
        g = dict(vars(D))
        cfg = R.configure(g, [*TINY, f'--data_dir={char_data}', f'--out_dir={out}', '--max_iters=3',
                              '--eval_interval=3', f'--schedule={name}', f'--masking={masking}',
                              f'--entropy_file={ent}'], rules=D.RULES, verbose=False)
        D.train(cfg, D.DiffusionObjective, D.__file__)
        recs = _records(out)
        assert all(math.isfinite(r['loss']) for r in recs if 'loss' in r)
        assert recs[-1]['step'] == 3 and 'val_nelbo' in recs[-1]


def _final_weights(out_dir):
    return R.read_checkpoint(out_dir)['model']


def test_sigusr1_then_resume_is_bit_identical(char_data, tmp_path):
    args = [*TINY, f'--data_dir={char_data}', '--max_iters=150', '--eval_interval=50']
    run_script('diffusion.py', *args, f'--out_dir={tmp_path / "straight"}')

    out = tmp_path / 'interrupted'
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, 'diffusion.py'), *args, f'--out_dir={out}'],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = out / 'log.jsonl'
    deadline = time.time() + 120
    while time.time() < deadline:  # signal once training is under way (step >= 20)
        if log.exists() and any(json.loads(ln).get('step', 0) >= 20 for ln in log.read_text().splitlines()):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == R.EXIT_RESUMABLE, output
    status = json.loads((out / 'status.json').read_text())
    assert status['status'] == 'interrupted' and 20 <= status['step'] < 150, (status, output)
    run_script('diffusion.py', *args, f'--out_dir={out}', '--init_from=resume')
    a, b = _final_weights(tmp_path / 'straight'), _final_weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [r['step'] for r in _records(out) if 'lr' in r]
    assert steps == list(range(1, 151)), 'every step logged exactly once across the interruption'


def test_scratch_refuses_to_overwrite_a_run(tiny_runs):
    r = run_script('diffusion.py', *TINY, f'--out_dir={tiny_runs["diffusion"]}', check=False)
    assert r.returncode == 2 and 'already holds a run' in r.stderr


# ---------------------------------------------------------------- settings and errors
def _one_line_error(r, code=2):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == code, (r.returncode, r.stderr)
    assert len(lines) == 1 and lines[0].startswith('error: '), r.stderr
    return lines[0]


def test_unknown_key_names_the_closest_one():
    assert '--learning_rate' in _one_line_error(run_script('diffusion.py', '--lerning_rate=1e-3', check=False))
    assert '--learning_rate' in _one_line_error(run_script('diffusion.py', '--lr=1e-3', check=False))


def test_bad_type_and_bad_choice():
    assert 'batch_size' in _one_line_error(run_script('diffusion.py', '--batch_size=abc', check=False))
    assert 'linear' in _one_line_error(run_script('diffusion.py', '--schedule=cosin', check=False))


def test_missing_data_says_which_prepare_command(tmp_path):
    # its own out_dir: the default one (out/diffusion-...) may hold a run, and that error comes first
    line = _one_line_error(run_script('diffusion.py', f'--data_dir={tmp_path}', f"--out_dir={tmp_path / 'run'}",
                                      '--device=cpu', check=False), 1)
    assert 'python prepare.py --dataset=shakespeare_char' in line


def test_configure_types_files_and_equals_signs(tmp_path):
    g = {'learning_rate': 1e-3, 'max_iters': 10, 'compile': False, 'out_dir': '', 'min_lr': None}
    cfg_file = tmp_path / 'c.py'
    cfg_file.write_text('"""doc"""\nmax_iters = 2000\nlearning_rate = 3\n')
    cfg = R.configure(g, [str(cfg_file), '--out_dir=a=b', '--compile', '--min_lr=1e-5', '--max_iters=1e3'],
                      verbose=False)
    assert cfg == {'learning_rate': 3.0, 'max_iters': 1000, 'compile': True, 'out_dir': 'a=b', 'min_lr': 1e-5}
    assert isinstance(g['learning_rate'], float) and cfg.explicit == set(g)
    cfg_file.write_text('import os\n')
    with pytest.raises(R.UserError, match='name = value'):
        R.configure(g, [str(cfg_file)], verbose=False)
    with pytest.raises(R.UserError, match='expected int'):
        R.configure(g, ['--max_iters=2.5'], verbose=False)


def test_corrupt_and_foreign_checkpoints_give_one_line_errors(tiny_runs, tmp_path):
    good = os.path.join(tiny_runs['diffusion'], 'ckpt.pt')
    bad = tmp_path / 'truncated'
    bad.mkdir()
    (bad / 'ckpt.pt').write_bytes(open(good, 'rb').read()[:5000])
    assert 'corrupt or truncated' in _one_line_error(
        run_script('sample.py', f'--out_dir={bad}', '--device=cpu', check=False), 1)
    other = tmp_path / 'foreign'
    other.mkdir()
    torch.save({'weights': torch.zeros(2)}, other / 'ckpt.pt')
    with pytest.raises(R.UserError, match='not a checkpoint of this project'):
        R.read_checkpoint(str(other))
    ckpt = R.read_checkpoint(good)
    ckpt['model_args']['n_embd'] = 64
    with pytest.raises(R.UserError, match='do not match'):
        R.build_model(ckpt, D.ModelConfig, D.Transformer)


# ---------------------------------------------------------------- block diffusion, end to end
def test_block_model_trains_samples_and_evaluates(char_data, tmp_path):
    """The smallest BD3-LM run through the scripts (tests/test_block.py checks the maths)."""
    out = str(tmp_path / 'block')
    run_script('diffusion.py', *TINY, f'--data_dir={char_data}', f'--out_dir={out}', '--max_iters=4',
               '--eval_interval=4', '--block_len=8')
    assert R.read_checkpoint(out)['model_args']['block_len'] == 8
    r = run_script('sample.py', f'--out_dir={out}', '--device=cpu', '--max_new_tokens=16', '--steps=2')
    assert 'block diffusion (block_len 8)' in r.stdout
    r = run_script('evaluate.py', f'--out_dir={out}', '--device=cpu', '--max_tokens=512', '--passes=2',
                   '--num_samples=0', '--curve_points=0')
    assert 'block NELBO (BD3-LM, blocks of 8' in r.stdout
