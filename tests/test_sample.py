"""sample.py: every sampler leaves no MASK and never touches context, caching is exact, batches
equal single runs, long texts are generated in windows that condition on the text so far."""
import json
import os

import pytest
import torch

from conftest import run_script
from diffusion import ModelConfig, Schedule, Transformer, sample_categorical
from runtime import Tokenizer
import sample
from sample import load_checkpoint

DIFFUSION_SAMPLERS = sample.SAMPLERS


@pytest.fixture(scope='module')
def dmodel(tiny_runs):
    model, ckpt = load_checkpoint(tiny_runs['diffusion'], 'cpu')
    return model, ckpt


@pytest.fixture(scope='module')
def gmodel(tiny_runs):
    return load_checkpoint(tiny_runs['gpt'], 'cpu')


def run(model, objective, prompt, n, **kw):
    kw.setdefault('steps', 8)
    return sample.generate_tokens(model, objective, prompt, n, **kw)


@pytest.mark.parametrize('name', DIFFUSION_SAMPLERS)
def test_no_mask_and_context_fixed(dmodel, name):
    """Prompt and infilling context never change in any frame; no MASK is left at the end."""
    model, ckpt = dmodel
    tok = Tokenizer(ckpt['meta'])
    mask = model.cfg.mask_id
    prompt = sample.encode_prompt(tok, 'ROMEO:[MASK:5] my lord[MASK:3]!\n')
    P = len(prompt)
    assert prompt.count(mask) == 8 and P == 24
    fixed = torch.tensor([t != mask for t in prompt])
    ref = torch.tensor(prompt)
    last, remasked = None, 0
    for step, x, changed in sample.frames(model, 'diffusion', prompt, 10, num_samples=2, sampler=name, steps=6,
                                          seed=3, schedule=Schedule('clipped_cosine' if name == 'ancestral' else 'linear'),
                                          remdm_eta=0.5):
        assert x.shape == (2, P + 10) and changed.shape == x.shape
        assert torch.equal(x[:, :P][:, fixed], ref[fixed].expand(2, -1)), f"context changed at step {step}"
        assert not changed[:, :P][:, fixed].any()
        if last is not None:
            remasked += int((changed & (x == mask) & (last != mask)).sum())
        last = x
    assert not (last == mask).any()
    assert (remasked > 0) == (name == 'remdm')   # only ReMDM takes revealed tokens back


def test_cache_is_exact_with_fewer_passes(dmodel):
    model, ckpt = dmodel
    kw = dict(num_samples=3, steps=40, seed=11, schedule=Schedule(ckpt['config']['schedule']))
    x1, info1 = run(model, 'diffusion', [], 20, sampler='ancestral', **kw)
    x2, info2 = run(model, 'diffusion', [], 20, sampler='ancestral_cache', **kw)
    assert torch.equal(x1, x2)
    assert info1['nfe'] == 40 and info2['nfe'] < info1['nfe']   # 40 steps, 20 tokens: idle steps skipped


def test_threshold_one_reveals_one_token_per_step(dmodel):
    model, _ = dmodel
    n = 12
    seen = 0
    stats = {}
    for step, x, changed in sample.frames(model, 'diffusion', [1, 2], n, num_samples=2, sampler='threshold',
                                          steps=n, threshold=1.0, stats=stats):
        assert changed.sum(1).tolist() == [1, 1]
        seen += 1
    assert seen == n and stats['nfe'] == n


def test_threshold_reveals_confident_positions_in_parallel(dmodel):
    """A low threshold reveals several tokens per step: fewer passes than tokens."""
    model, _ = dmodel
    x, info = run(model, 'diffusion', [], 20, sampler='threshold', steps=20, threshold=0.01)
    assert info['nfe'] < 20 and not (x == model.cfg.mask_id).any()


@pytest.mark.parametrize('name', DIFFUSION_SAMPLERS + ('gpt',))
def test_batch_equals_single_runs(dmodel, gmodel, name):
    model = (gmodel if name == 'gpt' else dmodel)[0]
    objective = 'gpt' if name == 'gpt' else 'diffusion'
    kw = dict(steps=6, top_k=20, top_p=0.95, temperature=0.9, sampler='confidence' if name == 'gpt' else name)
    batch, _ = run(model, objective, [5, 6, 7], 16, num_samples=4, seed=100, **kw)
    singles = torch.cat([run(model, objective, [5, 6, 7], 16, num_samples=1, seed=100 + i, **kw)[0]
                         for i in range(4)])
    assert torch.equal(batch, singles)
    assert len({tuple(r) for r in batch.tolist()}) > 1   # the samples differ from each other
    again, _ = run(model, objective, [5, 6, 7], 16, num_samples=4, seed=100, **kw)
    assert torch.equal(batch, again)                   # deterministic under a seed


@pytest.mark.parametrize('name', ('ancestral_cache', 'remask'))
def test_long_generation_conditions_on_previous_block(dmodel, name):
    """3 x block_size tokens: windows after the first keep block_size - stride tokens of the text
    so far as their fixed prefix, and those tokens are what the final text holds there."""
    model, _ = dmodel
    W, mask = model.cfg.block_size, model.cfg.mask_id
    inputs = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: inputs.append(args[0].clone()), with_kwargs=True)
    try:
        x, info = run(model, 'diffusion', [], 3 * W, num_samples=2, sampler=name, steps=4)
    finally:
        hook.remove()
    assert x.shape == (2, 3 * W) and not (x == mask).any()
    full = [w for w in inputs if w.size(0) == 2]                  # ancestral_cache may pass changed rows only
    firsts = [w for i, w in enumerate(full) if i == 0 or (full[i - 1][0] != mask).sum() > (w[0] != mask).sum()]
    # window k >= 1 starts at k * W/2 (stride W/2): its first W/2 tokens are fixed context
    assert len(firsts) == 5                                       # W, then four windows of W/2 new tokens
    assert (firsts[0] == mask).all()
    for k, w in enumerate(firsts[1:], 1):
        a = k * W // 2
        assert torch.equal(w[:, :W // 2], x[:, a:a + W // 2])     # conditioned on the text so far
        assert (w[:, W // 2:] == mask).all()
    # the context matters: the same window with a different prefix gives different logits
    w = firsts[1].clone()
    with torch.no_grad():
        l1 = model(w)[:, W // 2:]
        w[:, :W // 2] = x[:, :W // 2].flip(1)
        l2 = model(w)[:, W // 2:]
    assert not torch.allclose(l1, l2)


def test_gpt_long_generation_and_no_infill(gmodel):
    model, _ = gmodel
    x, info = run(model, 'gpt', [0], 2 * model.cfg.block_size, num_samples=2)
    assert x.shape == (2, 1 + 2 * model.cfg.block_size)
    with pytest.raises(sample.UserError, match='infill'):
        run(model, 'gpt', [0, model.cfg.mask_id], 4)


def test_time_conditioned_model():
    """A time-conditioned model gets mask_rate (the fraction masked) from every sampler."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, mask_id=40, block_size=16, n_layer=1, n_head=2, n_embd=16,
                                    time_cond=True)).eval()
    for name in DIFFUSION_SAMPLERS:
        x, _ = run(model, 'diffusion', [1, 2, 3], 10, sampler=name, steps=4)
        assert not (x == 40).any() and x[0, :3].tolist() == [1, 2, 3]


def test_sample_categorical_float64_gumbel():
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = p.log().expand(20000, 4)
    freq = torch.bincount(sample_categorical(logits, gen), minlength=4).double() / 20000
    assert torch.allclose(freq, p.double(), atol=0.015)
    assert sample_categorical(logits[:3], gen, temperature=0).tolist() == [0, 0, 0]
    assert sample_categorical(logits[:50], gen, top_k=1).eq(0).all()
    top2 = sample_categorical(logits[:500], gen, top_p=0.7)  # 0.5 + 0.3 reach 0.7
    assert set(top2.tolist()) == {0, 1}


def test_encode_prompt_placeholders(dmodel):
    _, ckpt = dmodel
    tok = Tokenizer(ckpt['meta'])
    ids = sample.encode_prompt(tok, 'a[MASK]b[MASK:3]')
    assert ids == tok.encode('a') + [tok.mask_id] + tok.encode('b') + [tok.mask_id] * 3
    assert tok.decode(ids) == 'a_b___'
    with pytest.raises(sample.UserError, match='at least one'):
        sample.encode_prompt(tok, '[MASK:0]')


def test_cli_infill_trace_and_errors(tiny_runs, tmp_path):
    trace = tmp_path / 'trace.json'
    r = run_script('sample.py', f"--out_dir={tiny_runs['diffusion']}", '--device=cpu', '--sampler=remask',
                   '--steps=4', '--num_samples=2', '--start=ROMEO:[MASK:6]\n', f'--trace={trace}')
    assert 'NFE 4 forward passes' in r.stdout and 'tokens/s' in r.stdout
    texts = r.stdout.split('-' * 60)[:2]
    assert all(t.strip().startswith('ROMEO:') and '_' not in t for t in texts)
    data = json.loads(trace.read_text())
    assert len(data['frames']) == 4 and data['meta']['sampler'] == 'remask'
    assert data['frames'][0]['text'][0].count('_') < 6 and '_' not in data['frames'][-1]['text'][0]
    r = run_script('sample.py', f"--out_dir={tiny_runs['gpt']}", '--device=cpu', '--max_new_tokens=20')
    assert 'gpt (KV cache): 1 x 20 tokens' in r.stdout
    r = run_script('sample.py', f"--out_dir={tiny_runs['gpt']}", '--device=cpu', '--start=a[MASK]', check=False)
    assert r.returncode == 2 and r.stderr.strip().count('\n') == 0 and 'infill' in r.stderr
    r = run_script('sample.py', f"--out_dir={tiny_runs['diffusion']}", '--sampler=nope', check=False)
    assert r.returncode == 2 and 'must be one of' in r.stderr
    r = run_script('sample.py', f"--out_dir={tiny_runs['diffusion']}", '--top_p=0', '--device=cpu', check=False)
    assert r.returncode == 2 and 'top_p' in r.stderr
    assert not os.path.exists(tmp_path / 'missing.json')
