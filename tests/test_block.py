"""Block diffusion (BD3-LM, Arriola et al. 2025; diffusion.py --block_len=L): the attention masks
against a brute-force construction, the vectorised [x_t ; x_0] pass against block-by-block passes,
block_len = block_size is today's MDLM to the bit, the block NELBO against an exact integral over
every mask, block_len = 1 is next-token cross-entropy, the loss compiles whole, KV-cached block
sampling equals uncached sampling, prompts and infilling keep their context, generation rolls past
block_size, and (end to end, through the scripts) train + sample + evaluate + the race."""
import itertools
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounter

import diffusion as D
import runtime as R
import evaluate as ev
import sample
import visualize
from conftest import TINY, run_script

V = 65


def tiny(T=8, L=2, vocab=V, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = D.ModelConfig(vocab_size=D.padded_vocab(vocab), mask_id=vocab, block_size=T, n_layer=2, n_head=2,
                        n_embd=32, block_len=L, **kw)
    return D.Transformer(cfg).eval()


def objective(B=8, T=32, **kw):
    c = R.Config(R.settings_of(vars(D)), **{'batch_size': B, 'block_size': T, 'gradient_accumulation_steps': 1, **kw})
    return D.DiffusionObjective(c, {'vocab_size': V})


def tokens(B, T, seed=0, vocab=V):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- attention masks
def brute_vectorised(T, L):
    """The BD3-LM mask over [x_t ; x_0] written as a loop over (query, key) pairs."""
    m = torch.zeros(2 * T, 2 * T, dtype=torch.bool)
    for i in range(2 * T):
        for j in range(2 * T):
            q_clean, k_clean, bq, bk = i >= T, j >= T, (i % T) // L, (j % T) // L
            if not q_clean:   # noisy query: its own noisy block, and clean blocks strictly before it
                m[i, j] = (not k_clean and bq == bk) or (k_clean and bk < bq)
            else:             # clean query: clean blocks up to its own
                m[i, j] = k_clean and bk <= bq
    return m


def brute_plain(Tq, Tk, L):
    """Block-causal over positions 0..Tk-1, the queries being the last Tq of them."""
    m = torch.zeros(Tq, Tk, dtype=torch.bool)
    for i in range(Tq):
        for j in range(Tk):
            m[i, j] = j // L <= (Tk - Tq + i) // L
    return m


@pytest.mark.parametrize('T, L', [(8, 1), (8, 2), (8, 4), (12, 3)])
def test_attention_masks_match_a_brute_force_loop(T, L):
    assert torch.equal(D._block_mask(2 * T, 2 * T, L, True, 'cpu'), brute_vectorised(T, L))
    for Tq, Tk in [(T, T), (2 * L, 3 * L), (L, 3 * L), (3, 7), (1, T)]:
        got = D._block_mask(Tq, Tk, L, False, 'cpu')
        want = brute_plain(Tq, Tk, L)
        assert torch.equal(got if got is not None else torch.ones(Tq, Tk, dtype=torch.bool), want), (Tq, Tk)
        assert (got is None) == bool(want.all())   # no mask at all when every key is visible (a cached block)
    # block_len 1: the clean stream is GPT's causal attention
    assert torch.equal(D._block_mask(T, T, 1, False, 'cpu'), torch.ones(T, T, dtype=torch.bool).tril())


@pytest.mark.parametrize('time_cond', [False, True])
def test_vectorised_pass_equals_block_by_block_passes(time_cond):
    """One pass over [x_t ; x_0] gives each noisy block the logits it gets from a plain pass over
    (clean blocks before it ; itself), and from a KV cache holding those clean blocks."""
    T, L, B = 12, 3, 3
    model = tiny(T, L, time_cond=time_cond)
    x = tokens(B, T)
    mask = torch.rand(B, T, generator=torch.Generator().manual_seed(1)) < 0.5
    z = torch.where(mask, model.cfg.mask_id, x)
    rate = torch.rand(B, T // L, generator=torch.Generator().manual_seed(2)).repeat_interleave(L, 1)
    with torch.no_grad():
        vec = model(z, mask_rate=rate, x0=x)[..., :V]                          # (B, T, V)
        for a in range(0, T, L):
            r = torch.cat([torch.zeros(B, a), rate[:, a:a + L]], 1)
            plain = model(torch.cat([x[:, :a], z[:, a:a + L]], 1), mask_rate=r)[:, a:, :V]
            assert torch.allclose(vec[:, a:a + L], plain, atol=1e-5), a
            cache = D.KVCache(model.cfg, B, T, 'cpu', torch.float32)
            if a:
                model(x[:, :a], mask_rate=torch.zeros(B, a), cache=cache)
            cached = model(z[:, a:a + L], mask_rate=rate[:, a:a + L], cache=cache)[..., :V]
            assert torch.allclose(vec[:, a:a + L], cached, atol=1e-5), a


# ---------------------------------------------------------------- the objective
def test_block_len_block_size_is_todays_mdlm(monkeypatch):
    """block_len = block_size (and 0) is the MDLM path: the same draws give the same loss and
    gradients to the bit, and no block mask is ever built."""
    def forbidden(*a):
        raise AssertionError('a block mask was built for an MDLM model')
    monkeypatch.setattr(D, '_block_mask', forbidden)
    monkeypatch.setattr(D, '_cached_block_mask', forbidden)
    x = tokens(8, 32, seed=3)
    out = []
    for bl in (0, 32):
        obj = objective(block_len=bl, schedule='cosine')
        m = tiny(32, bl)
        assert obj.block_len == 0 and m.block_len == 0 and all(b.attn.block_len == 0 for b in m.blocks)
        t, u = obj.draws(x, ('train', 5))
        loss = obj.compute(m.train(), x, t, u)
        loss.backward()
        out.append((t, loss.detach(), [p.grad.clone() for p in m.parameters()]))
    (t0, l0, g0), (t1, l1, g1) = out
    assert t0.shape == (8,) and torch.equal(t0, t1) and torch.equal(l0, l1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))


def test_draws_one_time_per_block_stratified():
    obj = objective(B=4, T=32, block_len=8)
    t, u = obj.draws(tokens(4, 32), ('train', 0))
    assert t.shape == (16,) and u.shape == (4, 32)
    strata = ((t - obj.c.t_min) / (1 - obj.c.t_min) * 16).floor().long()
    assert sorted(strata.tolist()) == list(range(16))                 # one time per stratum over all blocks
    for seq in strata.view(4, 4):                                      # and every sequence spans [t_min, 1]
        assert sorted((seq // 4).tolist()) == [0, 1, 2, 3]


@pytest.mark.parametrize('name', ['linear', 'cosine'])
def test_block_nelbo_matches_brute_force_integral(name):
    """The block loss's mean over draws equals sum over blocks of the integral over t of the exact
    expectation over all 2^L masks of the block (each block's CE computed by a plain pass over the
    clean blocks before it and the masked block), / T."""
    T, L, t_min = 4, 2, 1e-3
    model, s = tiny(T, L, vocab=5), D.Schedule(name)
    x = torch.tensor([[1, 3, 0, 2]])
    n = 4000  # midpoint rule on [t_min, 1]
    tq = t_min + (1 - t_min) * (torch.arange(n, dtype=torch.float64) + 0.5) / n
    q = (1 - s.alpha(tq))[:, None]
    exact = 0.0
    with torch.no_grad():
        for a in range(0, T, L):
            for m in itertools.product([False, True], repeat=L):
                m = torch.tensor(m)
                k = int(m.sum())
                z = torch.where(m, 5, x[0, a:a + L])
                logits = model(torch.cat([x[:, :a], z[None]], 1))[0, a:]
                ce = float(F.cross_entropy(logits[m], x[0, a:a + L][m], reduction='sum')) if k else 0.0
                exact += ((1 - t_min) * (s.weight(tq) * q[:, 0] ** k * (1 - q[:, 0]) ** (L - k)).mean() * ce / T).item()
        B, est = 64, []
        for step in range(200):
            u0 = torch.rand((), generator=R.rng(7, step), dtype=torch.float64)
            tt = D.stratified_times(u0, 0, B * T // L, B * T // L, t_min)
            loss, per_seq = D.diffusion_loss(model, x.expand(B, T), tt, s, 5, R.rng(8, step), t_min=t_min, block_len=L)
            assert torch.allclose(per_seq.mean(), loss)
            est.append(loss.item())
    est = np.array(est)
    se = est.std(ddof=1) / math.sqrt(len(est))
    assert abs(est.mean() - exact) < 4 * se, (est.mean(), exact, se)
    assert se < 0.05 * exact


@pytest.mark.parametrize('name', ['linear', 'cosine'])
def test_block_len_1_loss_is_next_token_cross_entropy(name):
    """block_len = 1, the autoregressive limit (gpt.py's objective): each block is one token, its
    masked CE given the clean prefix is the next-token CE, and over t the NELBO weight integrates
    to alpha(t_min) - alpha(1) (1 - t_min for linear). So the loss's expectation is that multiple of
    the model's exact next-token NLL in GPT's units (F.cross_entropy, mean nats per token), which a
    loop of plain causal passes computes independently of the vectorised pass."""
    T, B = 16, 8
    model = tiny(T, 1)
    x = tokens(B, T, seed=4)
    with torch.no_grad():
        logits = torch.stack([model(torch.cat([x[:, :i], torch.full((B, 1), V)], 1))[:, -1] for i in range(T)], 1)
        nll = F.cross_entropy(logits.flatten(0, 1), x.flatten())          # GPTObjective.compute's formula
        vec = F.cross_entropy(model(torch.full((B, T), V), x0=x).flatten(0, 1), x.flatten())
        assert torch.allclose(nll, vec, atol=1e-5)
        obj = objective(B, T, block_len=1, schedule=name)
        est = np.array([obj.compute(model, x, *obj.draws(x, ('train', s))).item() for s in range(300)])
    s = D.Schedule(name)
    scale = (s.alpha(torch.tensor(obj.c.t_min, dtype=torch.float64)) - s.alpha(torch.tensor(1.0, dtype=torch.float64)))
    se = est.std(ddof=1) / math.sqrt(len(est))
    assert abs(est.mean() - scale.item() * nll.item()) < 4 * se + 1e-4, (est.mean(), scale.item() * nll.item(), se)


@pytest.mark.parametrize('schedule, masking, time_cond', [('linear', 'uniform', False), ('cosine', 'entropy', True)])
def test_block_loss_compiles_whole_once(schedule, masking, time_cond, tmp_path):
    torch._dynamo.reset()
    ent = tmp_path / 'entropy.npy'
    np.save(ent, np.random.default_rng(0).gamma(4.0, 0.25, V))
    obj = objective(block_len=4, schedule=schedule, masking=masking, entropy_file=str(ent), time_cond=time_cond)
    m = tiny(32, 4, time_cond=time_cond).train()
    x = tokens(8, 32)
    assert torch._dynamo.explain(obj.compute)(m, x, *obj.draws(x, ('s', 0))).graph_break_count == 0
    counter = CompileCounter()
    compiled = torch.compile(obj.compute, backend=counter, fullgraph=True)
    for step in range(4):  # different tokens, times and masks each step
        x = tokens(8, 32, seed=step)
        compiled(m, x, *obj.draws(x, ('train', step))).backward()
    assert counter.frame_count == 1
    torch._dynamo.reset()


def test_block_len_must_divide_block_size():
    c = R.Config(R.settings_of(vars(D)), block_size=32, block_len=5)
    with pytest.raises(R.UserError, match='must divide'):
        R.check_settings(c)
    assert D.default_out_dir(R.Config(R.settings_of(vars(D)), block_len=4), 'diffusion').endswith('-block4')
    assert D.default_out_dir(R.Config(R.settings_of(vars(D)), block_len=128), 'diffusion').endswith('-uniform')


# ---------------------------------------------------------------- sampling
@pytest.fixture(scope='module')
def block_run(char_data, tmp_path_factory):
    """A tiny block model (blocks of 4, block_size 32) trained 40 steps through diffusion.py."""
    out = str(tmp_path_factory.mktemp('block') / 'run')
    run_script('diffusion.py', *TINY, f'--data_dir={char_data}', f'--out_dir={out}', '--max_iters=40',
               '--eval_interval=20', '--block_len=4', '--schedule=cosine')
    return out


@pytest.fixture(scope='module')
def bmodel(block_run):
    return sample.load_run(block_run)


@pytest.mark.parametrize('name', sample.SAMPLERS)
def test_cached_block_sampling_equals_uncached(bmodel, name):
    """Same seeds, same tokens with and without the KV cache, for every sampler, with a prompt
    ending inside a block and 2.5 windows of text (the window rolls); the cache runs far fewer
    positions through the model."""
    model = bmodel.model
    prompt = list(range(10, 16))                                       # one block of context + 2 fixed positions
    seq = torch.tensor([prompt + [model.cfg.mask_id] * 74] * 2)
    out, positions = [], []
    for use_cache in (True, False):
        seen = []
        hook = model.register_forward_pre_hook(lambda m, a: seen.append(a[0].size(1)))
        try:
            for _, x, _ in D.generate_blocks(model, seq, sample.SAMPLER_FNS[name], 6,
                                             [torch.Generator().manual_seed(s) for s in (1, 2)], use_cache,
                                             schedule=bmodel.objective.schedule, remdm_eta=0.3):
                pass
        finally:
            hook.remove()
        out.append(x)
        positions.append(sum(seen))
    assert torch.equal(out[0], out[1])
    assert not (out[0] == model.cfg.mask_id).any() and out[0][:, :6].tolist() == [prompt] * 2
    assert positions[0] < positions[1] / 2, positions
    framed, _ = sample.generate_tokens(model, 'diffusion', prompt, 74, num_samples=2, seed=1, sampler=name, steps=6,
                                       schedule=bmodel.objective.schedule, remdm_eta=0.3)
    assert torch.equal(framed, out[0])                                  # sample.frames is the cached path


def test_cached_equals_uncached_time_conditioned():
    """A time-conditioned block model: the context is fed with mask rate 0 and the block with its
    own, cached or not; an infilling span past the first window stays as written."""
    model = tiny(16, 4, time_cond=True)
    torch.nn.init.normal_(model.lm_head.weight, std=1.0)              # peaked predictions: no near-ties
    seq = torch.full((3, 40), V)
    seq[:, :5], seq[:, 20:22] = 7, 3
    for name in ('ancestral_cache', 'remdm'):
        outs = []
        for use_cache in (True, False):
            for _, x, _ in D.generate_blocks(model, seq, sample.SAMPLER_FNS[name], 5,
                                             [torch.Generator().manual_seed(i) for i in range(3)], use_cache,
                                             schedule=D.Schedule('cosine')):
                pass
            outs.append(x)
        assert torch.equal(*outs) and not (outs[0] == V).any()
        assert (outs[0][:, :5] == 7).all() and (outs[0][:, 20:22] == 3).all()


def test_prompt_and_infill_keep_context_and_blocks_fill_in_order(bmodel):
    model, tok = bmodel.model, bmodel.tokenizer
    mask = model.cfg.mask_id
    prompt = sample.encode_prompt(tok, 'ROMEO:[MASK:5] my lord[MASK:3]!\n')
    P = len(prompt)
    fixed = torch.tensor([t != mask for t in prompt])
    ref = torch.tensor(prompt)
    last = None
    for step, x, changed in sample.frames(model, 'diffusion', prompt, 10, num_samples=2, sampler='remask', steps=2,
                                          seed=3):
        assert torch.equal(x[:, :P][:, fixed], ref[fixed].expand(2, -1)), f"context changed at step {step}"
        blocks = changed.any(0).nonzero().squeeze(1) // 4
        assert blocks.min() == blocks.max(), 'one block at a time'
        assert not (x[:, :4 * int(blocks[0])] == mask).any(), 'the blocks before it are finished'
        last = x
    assert not (last == mask).any()


def test_generation_past_block_size_rolls_the_window(bmodel):
    """3 x block_size tokens: each block past the first window is generated given the last
    block_size - block_len tokens, prefilled again in the block's first pass."""
    model = bmodel.model
    W, L = model.cfg.block_size, 4
    inputs = []
    hook = model.register_forward_pre_hook(lambda m, a: inputs.append(a[0].clone()))
    try:
        x, info = sample.generate_tokens(model, 'diffusion', [], 3 * W, sampler='confidence', steps=2, seed=5)
    finally:
        hook.remove()
    assert x.shape == (1, 3 * W) and not (x == model.cfg.mask_id).any()
    assert info['nfe'] == len(inputs) == 2 * (3 * W // L) and max(w.size(1) for w in inputs) == W
    for b in range(W // L, 3 * W // L):                                 # past the first window
        first = inputs[2 * b]
        a = b * L
        assert first.size(1) == W and torch.equal(first[:, :W - L], x[:, a + L - W:a])
        assert (first[:, W - L:] == model.cfg.mask_id).all()


def test_objective_sample_and_race(bmodel, block_run):
    """The end-of-training sample and visualize's race fill block after block."""
    text = bmodel.objective.sample(bmodel.model, bmodel.tokenizer, n=24, steps=12)
    assert len(text) == 24 and '_' not in text
    frames = visualize.record(bmodel.model, 'diffusion', [], 24, torch.device('cpu'), sampler='confidence', steps=4)
    done = [sum(t != bmodel.model.cfg.mask_id for t in f.ids) for f in frames]
    assert done == sorted(done) and done[-1] == 24 and len(frames) == 1 + 6 * 4
    first_unfinished = [next((i for i, t in enumerate(f.ids) if t == bmodel.model.cfg.mask_id), 24) for f in frames]
    assert all(f % 4 == 0 or f == 24 for f in first_unfinished[::4])      # a block is done every 4 frames


# ---------------------------------------------------------------- the scripts, end to end
def test_train_sample_evaluate_compare_end_to_end(block_run, tiny_runs, tmp_path):
    """diffusion.py --block_len trained the block_run fixture; sample.py, evaluate.py (its own
    bound, both estimators) and the comparison table beside GPT's exact NLL."""
    ckpt = R.read_checkpoint(block_run)
    assert ckpt['model_args']['block_len'] == 4 and ckpt['config']['block_len'] == 4
    r = run_script('sample.py', f'--out_dir={block_run}', '--device=cpu', '--start=ROMEO:', '--max_new_tokens=20',
                   '--steps=4')
    assert 'block diffusion (block_len 4) ancestral_cache, 4 steps/block: 1 x 20 tokens' in r.stdout
    assert r.stdout.startswith('ROMEO:')
    common = ['--device=cpu', '--max_tokens=2048', '--passes=2', '--num_samples=2', '--sample_seeds=1', '--steps=4',
              '--curve_points=2', '--curve_tokens=256', f"--ref={tiny_runs['gpt']}"]
    r = run_script('evaluate.py', f'--out_dir={block_run}', *common)
    assert 'block diffusion, block_len 4' in r.stdout and 'block NELBO (BD3-LM, blocks of 4' in r.stdout
    res = json.load(open(os.path.join(block_run, 'eval.json')))
    lik = res['likelihood']
    assert res['block_len'] == 4 and lik['block_len'] == 4 and lik['headline'] == 'continuous'
    assert 1.0 < lik['continuous']['nats'] < 5.0 and 1.0 < lik['discrete']['nats'] < 5.0
    assert math.isfinite(res['samples']['mean']['samples_gen_ppl'])
    report = tmp_path / 'report'
    r = run_script('evaluate.py', '--compare', block_run, tiny_runs['gpt'], f'--report_dir={report}', *common)
    table = (report / 'compare.md').read_text()
    assert '| block diffusion L=4 |' in table and '(exact)' in table


def test_block_estimators_on_a_known_model():
    """At block_len 1 the discrete estimator is the exact autoregressive NLL (one token per block,
    k = 1): deterministic, equal to the loop of causal passes; the continuous one agrees within
    its CI."""
    model = tiny(16, 1)
    x = tokens(32, 16, seed=9)
    with torch.no_grad():
        logits = torch.stack([model(torch.cat([x[:, :i], torch.full((32, 1), V)], 1))[:, -1] for i in range(16)], 1)
        nll = F.cross_entropy(logits.flatten(0, 1), x.flatten()).item()
        d, _ = ev.block_discrete_batch(model, x, R.rng(0), R.rng(1))
        assert abs(d.mean().item() - nll) < 1e-5
        est, toks, dt, _ = ev.monte_carlo(model, x, ev.block_continuous_batch, 8, 16, 0, 1e-4)
    e = ev.summarize(est, toks, dt, 'continuous', char=True)
    assert abs(e['nats'] - nll) < 2 * e['ci95'] + 1e-3, (e['nats'], e['ci95'], nll)
