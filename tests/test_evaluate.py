"""evaluate.py (issue 6): likelihood estimators with honest CIs, GPT NLL, gen PPL, the masking at
evaluation not following the checkpoint, and the CLI (--json, eval.json cache, --compare).

The tiny checkpoints come from conftest's tiny_runs; the known-distribution checks use a stub
"model" that outputs a fixed categorical distribution (no training, milliseconds)."""
import importlib.util
import json
import math
import os
import shutil
from dataclasses import asdict

import numpy as np
import pytest
import torch

import diffusion as D
import evaluate as ev
import report
from conftest import run_script
from sample import load_checkpoint
from diffusion import ModelConfig, Schedule, Transformer, diffusion_loss, padded_vocab
from runtime import TokenData, Tokenizer, UserError, atomic_save, read_checkpoint, rng, Config

PROBS = torch.tensor([8, 4, 2, 1, 1], dtype=torch.float64) / 16     # a fixed categorical over 5 tokens
ENTROPY = float(-(PROBS * PROBS.log()).sum())                       # its entropy, nats


class CategoricalStub(torch.nn.Module):
    """A "model" with diffusion.Transformer's call signature that outputs the same categorical
    distribution at every position whatever the input: the exact model of i.i.d. data from it."""
    def __init__(self, probs, block_size):
        super().__init__()
        V = len(probs)
        self.cfg = ModelConfig(vocab_size=padded_vocab(V), mask_id=V, block_size=block_size)
        logp = torch.full((self.cfg.vocab_size,), float('-inf'))
        logp[:V] = probs.log().float()
        self.register_buffer('logp', logp)
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # evaluate.py finds the device from parameters()

    def forward(self, idx, mask_rate=None, cache=None, select=None):
        logits = self.logp.expand(*idx.shape, -1)                    # (B, T, V)
        return logits.flatten(0, 1)[select] if select is not None else logits   # select: flat positions


def exact_iid_data(n_windows, L, seed=0):
    """(n_windows, L) tokens whose counts are exactly proportional to PROBS, in random order:
    their mean NLL under PROBS is exactly ENTROPY, so the estimators' target is known."""
    n = n_windows * L
    assert n % 16 == 0
    ids = torch.repeat_interleave(torch.arange(len(PROBS)), (PROBS * n).round().long())
    return ids[torch.randperm(n, generator=torch.Generator().manual_seed(seed))].view(n_windows, L)


def settings(**kw):
    """evaluate.py's default settings with overrides, as main() would pass them."""
    return Config({**ev.default_settings(), 'device': 'cpu', **kw})


def estimate(model, x, fn, passes=4, seed=0, batch_size=16, control_variate=True, raw=False):
    cv = control_variate and fn is ev.continuous_batch
    est, tokens, dt, _ = ev.monte_carlo(model, x, fn, passes, batch_size, seed, 1e-4, cv)
    e = ev.summarize(est, tokens, dt, fn.__name__, char=True)
    return (e, est, tokens) if raw else e


def test_known_distribution_nelbo_matches_entropy():
    """Both estimators, for the exact model of the data, land on the analytic entropy within
    their 95% CI: 40 evaluations with different seeds pooled (160 passes) are within the pooled
    CI, and each evaluation's own CI covers the entropy about 95% of the time (neither vacuous
    nor too narrow: measured 94-97% over 200 seeds). A wrong model lands far outside."""
    L = 32
    x = exact_iid_data(128, L)
    model = CategoricalStub(PROBS, L)
    for fn in (ev.continuous_batch, ev.discrete_batch):
        covered, widths, pooled = 0, [], []
        for seed in range(40):
            e, est, tokens = estimate(model, x, fn, seed=seed, raw=True)
            covered += abs(e['nats'] - ENTROPY) <= e['ci95']
            widths.append(e['rel_ci95'])
            pooled.append(est)
        assert covered >= 34, (fn.__name__, covered)                # 95% of 40 = 38; 34 is 2 sd below
        assert 0.005 < np.mean(widths) < 0.1, (fn.__name__, np.mean(widths))
        p = ev.summarize(np.concatenate(pooled, axis=1), tokens, 1.0, fn.__name__, char=True)
        assert abs(p['nats'] - ENTROPY) <= p['ci95'] < 0.01, (fn.__name__, p['nats'], p['ci95'], ENTROPY)
        assert p['ppl_lo'] <= math.exp(ENTROPY) <= p['ppl_hi'] and p['bits'] == pytest.approx(p['nats'] / math.log(2))
        wrong = estimate(CategoricalStub(torch.full((5,), 0.2, dtype=torch.float64), L), x, fn)
        assert wrong['nats'] - ENTROPY > 3 * (wrong['ci95'] + e['ci95'])   # log 5 = 1.609 vs 1.300


def test_continuous_estimator_is_diffusion_loss():
    """Without the control variate the continuous estimate is exactly diffusion.diffusion_loss with
    the linear schedule and uniform masking. The control variate keeps the mean and removes the
    noise of how many tokens were masked: all of it when every token costs the same (a uniform
    model), and about a third of the variance for the categorical stub (measured over 200 seeds)."""
    L = 32
    x = exact_iid_data(4, L)
    model = CategoricalStub(PROBS, L)
    f, c = ev.continuous_batch(model, x, rng('t'), rng('m'), 1e-3)
    u0 = torch.rand((), generator=rng('t'), dtype=torch.float64)
    t = ev.stratified_times(u0, 0, 4, 4, 1e-3)
    _, per_seq = diffusion_loss(model, x, t, Schedule('linear'), model.cfg.mask_id, rng('m'), t_min=1e-3)
    assert torch.allclose(f.float(), per_seq, rtol=1e-6)
    x = exact_iid_data(64, L)
    model = CategoricalStub(torch.full((5,), 0.2, dtype=torch.float64), L)
    plain = estimate(model, x, ev.continuous_batch, control_variate=False)
    cv = estimate(model, x, ev.continuous_batch)
    assert abs(plain['nats'] - cv['nats']) < plain['ci95'] + cv['ci95']
    assert cv['ci95'] < 0.2 * plain['ci95'], (cv['ci95'], plain['ci95'])


def test_estimators_agree_on_tiny_model(tiny_runs):
    """On a trained tiny model (no time conditioning) the continuous and discrete estimators
    estimate the same number (integrating t out given k masked tokens gives weight 1/k)."""
    model, ckpt = load_checkpoint(tiny_runs['diffusion'])
    data = TokenData(ckpt['config']['data_dir'], ckpt['config']['dataset'], 'val', ckpt['meta'])
    w = ev.split_windows(data, model.cfg.block_size, 64 * model.cfg.block_size)
    assert w.shape == (64, model.cfg.block_size + 1)
    lik = ev.likelihood(model, 'diffusion', w, settings(passes=4, batch_size=16, curve_points=3, curve_tokens=512),
                        char=True)
    a, b = lik['continuous'], lik['discrete']
    assert abs(a['nats'] - b['nats']) <= report.t975(min(a['df'], b['df'])) * math.hypot(a['se'], b['se']), (a, b)
    assert a['rel_ci95'] < 0.05 and b['rel_ci95'] < 0.05
    assert a['bits_unit'] == 'bits/char'
    curve = lik['curve']
    assert [p['mask_rate'] for p in curve] == sorted(p['mask_rate'] for p in curve) and len(curve) == 3
    assert all(0 <= p['accuracy'] <= 1 and 0 <= p['entropy'] <= math.log(model.cfg.mask_id) for p in curve)


def test_gpt_nll_matches_hand_computation(tiny_runs):
    """gpt_exact on a short sequence = -log p(x_i | x_<i) summed by hand, one prefix at a time."""
    model, ckpt = load_checkpoint(tiny_runs['gpt'])
    data = TokenData(ckpt['config']['data_dir'], ckpt['config']['dataset'], 'val', ckpt['meta'])
    seq = ev.split_windows(data, 11, 0)[3]                                   # 12 tokens
    est, tokens, _ = ev.gpt_exact(model, seq[None], batch_size=8)
    with torch.no_grad():
        hand = [-torch.log_softmax(model(seq[None, :i])[0, -1].double(), -1)[seq[i]].item() for i in range(1, 12)]
    assert tokens.tolist() == [11]
    assert est[0, 0] == pytest.approx(sum(hand) / 11, rel=1e-5)
    e = ev.summarize(est, tokens, 1.0, 'exact', char=True)
    assert e['ci95'] == 0 and e['ppl'] == pytest.approx(math.exp(sum(hand) / 11), rel=1e-5)


def test_gen_ppl_matches_direct_computation(tiny_runs):
    """Gen PPL of a fixed text under a fixed reference = exp(mean NLL) computed one prefix at a
    time, also past the reference's block_size (chunks of block_size targets, context restarting)."""
    ref = ev.gpt_ref(tiny_runs['gpt'], torch.device('cpu'), ev.contextlib.nullcontext())
    model, ckpt = load_checkpoint(tiny_runs['gpt'])
    data = TokenData(ckpt['config']['data_dir'], ckpt['config']['dataset'], 'val', ckpt['meta'])
    bs = model.cfg.block_size
    text = Tokenizer(ckpt['meta']).decode(ev.split_windows(data, 2 * bs + 4, 0)[0].tolist())
    for n in (bs // 2, 2 * bs + 5):                  # within one window; three chunks
        ids = ref.encode(text[:n])
        nll, count, feats = ref.score([ids])
        hand = []
        with torch.no_grad():
            for i in range(1, n):                    # the first token has no context: not scored
                start = (i - 1) // bs * bs           # the chunk holding target i starts here
                logits = model(torch.tensor([ids[start:i]]))[0, -1].double()
                hand.append(-torch.log_softmax(logits, -1)[ids[i]].item())
        assert count.tolist() == [n - 1]
        assert math.exp(nll[0] / count[0]) == pytest.approx(math.exp(np.mean(hand)), rel=1e-5)
        assert feats.shape == (1, model.cfg.n_embd)


def test_transformers_reference_matches_direct_computation(tmp_path):
    """--ref=hf:PATH (a GPT-2-shaped model through transformers, local files only): the sequence
    is scored after <|endoftext|>, every token counted; features are the last hidden state."""
    transformers = pytest.importorskip('transformers', reason='transformers is optional (--ref=gpt2)')
    pytest.importorskip('tiktoken')
    cfg = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=1, n_head=2)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    hf.save_pretrained(tmp_path / 'tiny-gpt2')
    ref = ev.load_ref(f"hf:{tmp_path / 'tiny-gpt2'}", torch.device('cpu'), None)
    ids = ref.encode('First Citizen: before we proceed any further, hear me speak.')
    nll, count, feats = ref.score([ids])
    full = torch.tensor([[50256] + ids])
    with torch.no_grad():
        logp = torch.log_softmax(hf(full).logits[0].double(), -1)           # (T, V)
    hand = -logp[torch.arange(len(ids)), full[0, 1:]].sum().item()
    assert count.tolist() == [len(ids)] and nll[0] == pytest.approx(hand, rel=1e-5)
    assert feats.shape == (1, 32)
    assert ref.same_vocab({'tokenizer': 'gpt2'}) and not ref.same_vocab({'tokenizer': 'char'})


def test_text_statistics():
    seqs = [[0, 1, 0, 1], [2, 2, 2, 2]]
    assert ev.distinct_n(seqs, 1) == 3 / 8
    assert ev.distinct_n(seqs, 2) == 3 / 6           # (0,1) (1,0) (2,2)
    assert ev.unigram_entropy(seqs) == pytest.approx((math.log(2) + 0.0) / 2)


def test_masking_at_evaluation_does_not_follow_checkpoint(tiny_runs, tmp_path, monkeypatch):
    """The same weights saved as an entropy-masked cosine run (with an entropy file that would
    triple the mask rate of some tokens) get exactly the uniform run's scores, and the masks drawn
    at evaluation hit every token id at the same rate."""
    uni = str(tmp_path / 'uniform')
    shutil.copytree(tiny_runs['diffusion'], uni)
    ckpt = read_checkpoint(uni)
    V = ckpt['meta']['vocab_size']
    ent = np.where(np.arange(V) < V // 2, 0.0, 2.0)                   # weights 1.5 and 0.5 (x3 apart)
    np.save(tmp_path / 'entropy.npy', ent / ent.mean())
    ent_dir = str(tmp_path / 'entropy')
    os.makedirs(ent_dir)
    ckpt['config'] = {**ckpt['config'], 'schedule': 'cosine', 'masking': 'entropy', 'loss_weighting': 'masked_mean',
                      'entropy_file': str(tmp_path / 'entropy.npy')}
    atomic_save(ckpt, os.path.join(ent_dir, 'ckpt.pt'))
    seen = []
    real = D.masked_ce   # evaluate.py takes it from the run's script, here the repo's diffusion.py
    monkeypatch.setattr(D, 'masked_ce', lambda m, x, mask, *a: seen.append((x.clone(), mask.clone())) or
                        real(m, x, mask, *a))
    c = settings(max_tokens=2048, passes=2, num_samples=0, curve_points=0)
    a, b = ev.evaluate_run(uni, c, log=lambda *_: None), ev.evaluate_run(ent_dir, c, log=lambda *_: None)
    assert (b['schedule'], b['masking']) == ('cosine', 'entropy')
    for key in ('continuous', 'discrete'):
        assert a['likelihood'][key]['nats'] == b['likelihood'][key]['nats']
        assert a['likelihood'][key]['ci95'] == b['likelihood'][key]['ci95']
    x = torch.cat([s[0].flatten() for s in seen])
    m = torch.cat([s[1].flatten() for s in seen]).double()
    low, high = m[x < V // 2].mean().item(), m[x >= V // 2].mean().item()
    assert abs(low - high) < 0.05, (low, high)         # entropy masking would make these ~3x apart
    assert os.path.exists(os.path.join(ent_dir, 'eval.json'))


def test_bpe_model_zero_shot_wikitext2(tmp_path):
    """A GPT-2 BPE checkpoint is also scored zero-shot on data_dir/wikitext2 (its test split, two
    shards here); without that dataset the evaluation says so and goes on."""
    V = 50257
    root = tmp_path / 'data'

    def make(name, splits):  # prepare.py's format: meta.json + uint16 token files per split
        d = root / name
        d.mkdir(parents=True)
        meta = {'dataset': name, 'tokenizer': 'gpt2', 'vocab_size': V, 'eot_id': V - 1, 'dtype': 'uint16',
                'splits': {}}
        g = np.random.default_rng(0)
        for split, sizes in splits.items():
            names = [f'{split}_{i}.bin' for i in range(len(sizes))]
            for fn, n in zip(names, sizes):
                g.integers(0, V, n).astype(np.uint16).tofile(d / fn)
            meta['splits'][split] = {'shards': names, 'tokens': list(sizes)}
        (d / 'meta.json').write_text(json.dumps(meta))
        return meta
    meta = make('bpe', {'train': [1000], 'val': [300]})
    cfg = ModelConfig(vocab_size=padded_vocab(V), mask_id=V, block_size=16, n_layer=1, n_head=2, n_embd=16)
    torch.manual_seed(0)
    run = tmp_path / 'run'
    run.mkdir()
    atomic_save({'model': Transformer(cfg).state_dict(), 'model_args': asdict(cfg), 'objective': 'diffusion',
                 'config': {'data_dir': str(root), 'dataset': 'bpe', 'schedule': 'linear', 'masking': 'uniform'},
                 'meta': meta, 'step': 0}, str(run / 'ckpt.pt'))
    c = settings(max_tokens=0, passes=2, num_samples=0, curve_points=0)
    res = ev.evaluate_run(str(run), c, log=lambda *_: None)
    assert 'wikitext2' not in res and any('WikiText-2 skipped: not prepared' in n for n in res['notes'])
    assert res['likelihood']['windows'] == 299 // 16
    make('wikitext2', {'val': [200], 'test': [150, 170]})
    wt = ev.evaluate_run(str(run), c, log=lambda *_: None)['wikitext2']
    assert wt['split'] == 'test' and wt['windows'] == 149 // 16 + 169 // 16
    assert wt['continuous']['bits_unit'] == 'bits/token' and 'discrete' in wt
    # an untrained model predicts nearly uniformly over the real tokens: NELBO ~ ln V
    assert abs(wt['continuous']['nats'] - math.log(V)) < 0.02 * math.log(V)


def test_cli_json_cache_and_compare(tiny_runs, tmp_path):
    """evaluate.py --json with a reference model; then --compare reuses that run's eval.json,
    evaluates the other run, and writes the markdown table (+ plots with matplotlib)."""
    d, g = str(tmp_path / 'diff'), str(tmp_path / 'gpt')
    shutil.copytree(tiny_runs['diffusion'], d)
    shutil.copytree(tiny_runs['gpt'], g)
    small = ['--max_tokens=2048', '--passes=2', '--curve_points=3', '--curve_tokens=256', '--num_samples=12',
             '--sample_seeds=2', '--steps=8', '--device=cpu']
    out = str(tmp_path / 'e.json')
    r = run_script('evaluate.py', f'--out_dir={d}', f'--ref={g}', f'--json={out}', *small)
    assert 'NELBO, continuous' in r.stdout and 'gen PPL' in r.stdout and 'seed validation block' in r.stdout
    res = json.load(open(out))
    assert res == json.load(open(os.path.join(d, 'eval.json')))
    lik = res['likelihood']
    for key in ('continuous', 'discrete'):
        e = lik[key]
        assert e['nats_lo'] < e['nats'] < e['nats_hi'] and e['ppl'] == pytest.approx(math.exp(e['nats']))
        assert e['tokens'] == 2048 // 32 * 32 and e['passes'] == 2
    s = res['samples']
    assert len(s['per_seed']) == 2 and s['mean']['samples_gen_ppl'] > 1 and s['mean']['data_gen_ppl'] > 1
    assert s['reference'].startswith('gpt.py run')
    if importlib.util.find_spec('mauve'):
        assert 0 <= s['mean']['mauve'] <= 1 and 'final hidden state' in s['mauve_features']
    else:
        assert any('mauve-text is not installed' in n for n in s['notes'])
    sb = res['seed_block']
    assert len(sb['accuracy_per_t']) == 3 and 0 < sb['change_rate'] <= 1 and 0 <= sb['distinct_2'] <= 1
    assert res['training']['last_val_loss'] is not None and res['training']['last_val_nelbo'] is not None

    report = str(tmp_path / 'report')
    r = run_script('evaluate.py', '--compare', d, g, f'--report_dir={report}', *small)
    assert f'{d}: using eval.json' in r.stdout                       # cached: not evaluated again
    table = open(os.path.join(report, 'compare.md')).read()
    rows = [ln for ln in table.splitlines() if ln.startswith('| ') and 'objective' not in ln]
    assert len(rows) == 2 and '| diffusion | linear | uniform |' in table and '(exact)' in table
    comp = json.load(open(os.path.join(report, 'compare.json')))
    assert [row['objective'] for row in comp['rows']] == ['diffusion', 'gpt']
    assert comp['rows'][0]['nats'] == res['likelihood']['continuous']['nats']
    if importlib.util.find_spec('matplotlib'):
        assert all(os.path.getsize(p) > 1000 for p in comp['plots']) and len(comp['plots']) == 2
    else:
        assert comp['plots'] == []


def test_bad_input_is_one_line(tiny_runs, tmp_path):
    r = run_script('evaluate.py', '--compare', check=False)
    assert r.returncode == 2 and r.stderr.count('\n') == 1 and '--compare needs run folders' in r.stderr
    run = str(tmp_path / 'run')
    shutil.copytree(tiny_runs['diffusion'], run)
    with pytest.raises(UserError, match='at least 2 are needed') as e:
        ev.evaluate_run(run, settings(passes=1, num_samples=0, max_tokens=512), log=lambda *_: None)
    assert e.value.code == 2
    with pytest.raises(UserError, match='was made on other data'):
        ckpt = read_checkpoint(run)
        ckpt['meta'] = {**ckpt['meta'], 'chars': ckpt['meta']['chars'][::-1]}
        atomic_save(ckpt, os.path.join(run, 'ckpt.pt'))
        ev.evaluate_run(run, settings(num_samples=0, max_tokens=512), log=lambda *_: None)
    with pytest.raises(UserError, match='must be autoregressive'):
        ev.gpt_ref(tiny_runs['diffusion'], torch.device('cpu'), ev.contextlib.nullcontext())
    with pytest.raises(UserError, match='not a run folder'):
        ev.load_ref(str(tmp_path / 'nothing'), torch.device('cpu'), None)
    assert ev.fold_compare(['--compare', 'a', 'b', '--passes=3']) == ['--passes=3', '--compare=a,b']


def test_study_cells_table(tiny_runs, tmp_path):
    """study.py's table (report.summarise_cells): one row per cell, mean and spread over seeds."""
    runs = []
    for name in ('gpt', 'diffusion'):
        runs.append(str(tmp_path / name))
        shutil.copytree(tiny_runs[name], runs[-1])
        run_script('evaluate.py', f'--out_dir={runs[-1]}', '--device=cpu', '--max_tokens=512', '--passes=2',
                   '--num_samples=2', '--sample_seeds=1', '--steps=4', '--curve_points=0', f'--ref={tiny_runs["gpt"]}')
    report.summarise_cells(runs, str(tmp_path))
    md = (tmp_path / 'study.md').read_text()
    cells = json.loads((tmp_path / 'study.json').read_text())['cells']
    assert [c['objective'] for c in cells] == ['gpt', 'diffusion'] and all(c['seeds'] == 1 for c in cells)
    assert md.count('\n| ') == 2 and md.startswith('| model |') and '| GPT |' in md and '| diffusion | linear | uniform |' in md
    assert cells[1]['bound_as_trained'] and cells[1]['mask_rates_trained'] == [0.0, 1.0]


def test_a_checkpoint_file_is_scored_itself(tiny_runs, tmp_path):
    """--out_dir=RUN/best.pt scores best.pt (not the folder's ckpt.pt) and keeps its figures in
    RUN/eval-best.json, beside ckpt.pt's eval.json."""
    run = tmp_path / 'run'
    shutil.copytree(tiny_runs['diffusion'], run)
    best = run / 'best.pt'
    assert ev.eval_json(str(run)) == str(run / 'eval.json') and ev.eval_json(str(best)) == str(run / 'eval-best.json')
    run_script('evaluate.py', f'--out_dir={best}', '--device=cpu', '--max_tokens=256', '--passes=2',
               '--num_samples=0', '--curve_points=0')
    res = json.load(open(run / 'eval-best.json'))
    assert res['checkpoint'] == str(best) and res['ckpt_step'] == torch.load(best, weights_only=True)['step']
    assert not (run / 'eval.json').exists()
