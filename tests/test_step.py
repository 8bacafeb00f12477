"""The training step is GPU-ready: the loss of both objectives compiles whole (0 graph breaks, one
compilation across steps and mask rates), the static-shape loss equals the plain formulation on
the same draws, its subsampled head stays unbiased, every micro-batch spans [t_min, 1], and
torchrun runs with the default settings (2 processes = 1 process with the same global batch); the
model's own RMSNorm backward and three-op RoPE equal their plain formulations."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounter

import diffusion as D
import runtime as R
from conftest import REPO, TINY
from gpt import GPTObjective

B, T, V = 8, 32, 65


def objective(cls=D.DiffusionObjective, **kw):
    c = R.Config(R.settings_of(vars(D)), **{'batch_size': B, 'block_size': T, 'gradient_accumulation_steps': 1, **kw})
    return cls(c, {'vocab_size': V})


def model(causal=False):
    torch.manual_seed(0)
    return D.Transformer(D.ModelConfig(vocab_size=128, mask_id=V, block_size=T, n_layer=2, n_head=2, n_embd=32,
                                       causal=causal))


def window(seed):
    return torch.randint(0, V, (B, T + 1), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize('schedule, masking', [(s, 'uniform') for s in D.SCHEDULES] +
                         [('cosine', m) for m in D.MASKINGS if m != 'uniform'])
def test_diffusion_loss_compiles_whole_once(schedule, masking, tmp_path):
    torch._dynamo.reset()
    ent = tmp_path / 'entropy.npy'
    np.save(ent, np.random.default_rng(0).gamma(4.0, 0.25, V))
    obj, m = objective(schedule=schedule, masking=masking, entropy_file=str(ent)), model()
    x = window(0)[:, :-1]
    assert torch._dynamo.explain(obj.compute)(m, x, *obj.draws(x, ('s', 0))).graph_break_count == 0
    counter = CompileCounter()
    compiled = torch.compile(obj.compute, backend=counter, fullgraph=True)
    for step in range(5):  # different tokens, times and masks: a different number of masked tokens each step
        x = window(step)[:, :-1]
        compiled(m, x, *obj.draws(x, ('train', step))).backward()
    assert counter.frame_count == 1
    torch._dynamo.reset()


def test_gpt_loss_compiles_whole_once():
    torch._dynamo.reset()
    obj, m = objective(GPTObjective), model(causal=True)
    w = window(0)
    assert torch._dynamo.explain(obj.compute)(m, w[:, :-1], w[:, 1:]).graph_break_count == 0
    counter = CompileCounter()
    compiled = torch.compile(obj.compute, backend=counter, fullgraph=True)
    for step in range(5):
        w = window(step)
        compiled(m, w[:, :-1], w[:, 1:]).backward()
    assert counter.frame_count == 1
    torch._dynamo.reset()


def plain_nelbo(m, x, t, u, schedule, t_min):
    """The formulation before static shapes, written out: boolean indexing of the masked positions,
    the head at those only, each sequence's sum scattered back."""
    mask = u < (1 - schedule.alpha(t))[:, None]
    logits = m(torch.where(mask, V, x), mask_rate=(1 - schedule.alpha(t)).float())[mask]      # (M, V)
    ce = F.cross_entropy(logits, x[mask], reduction='none')
    per_seq = torch.zeros(x.shape).masked_scatter(mask, ce).sum(1)
    return ((1 - t_min) * schedule.weight(t)).float() * per_seq / x.size(1)


@pytest.mark.parametrize('schedule', ['linear', 'cosine', 'sqrt'])
def test_static_loss_equals_the_plain_formulation(schedule):
    obj, m = objective(schedule=schedule), model()
    for step in range(4):
        x = window(step)[:, :-1]
        t, u = obj.draws(x, ('train', step))
        mask = u < (1 - obj.schedule.alpha(t))[:, None]
        if mask.sum() > obj.capacity:
            continue  # (subsampled: see the next test)
        with torch.no_grad():
            new = obj.compute(m, x, t, u)
            old = plain_nelbo(m, x, t, u, obj.schedule, obj.c.t_min).mean()
        assert torch.allclose(new, old, rtol=1e-5, atol=1e-6), (step, new, old)


def test_subsampled_head_is_unbiased():
    """More masked tokens than the head's capacity: a uniform subset weighted M / K. Over many
    independent subsets its mean is the full masked sum (within 4 standard errors), sequence by
    sequence."""
    m = model().eval()
    x = window(1)[:, :-1]
    mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(2)) < 0.6
    with torch.no_grad():
        full = D.masked_ce(m, x, mask, V)                                       # (B,)
        K = int(mask.sum()) // 2
        draws = torch.stack([D.masked_ce(m, x, mask, V, capacity=K,
                                         keys=torch.rand(x.shape, generator=torch.Generator().manual_seed(s)))
                             for s in range(150)])                               # (150, B)
    se = draws.std(0) / math.sqrt(len(draws))
    assert ((draws.mean(0) - full).abs() < 4 * se + 1e-4).all(), (draws.mean(0), full, se)
    assert (draws.std(0) > 0).all()   # it really subsampled


def test_capacity_covers_the_usual_mask_counts():
    for name in D.SCHEDULES:
        obj = objective(schedule=name, batch_size=12, block_size=64)
        counts = []
        for step in range(200):
            x = torch.zeros(12, 64, dtype=torch.long)
            t, u = obj.draws(x, ('train', step))
            counts.append(int((u < 1 - obj.schedule.alpha(t)[:, None]).sum()))
        assert max(counts) <= obj.capacity < 12 * 64 or obj.capacity == 12 * 64, (name, max(counts), obj.capacity)


def test_every_micro_batch_spans_t_min_to_1():
    """With G micro-batches, micro-batch g takes strata g, g + G, ...: each covers [t_min, 1] (one time
    in each of its B equal parts), and together they are the global batch's stratified times."""
    G, u0, t_min = 4, torch.tensor(0.37, dtype=torch.float64), 1e-3
    parts = [D.stratified_times(u0, g, B, B * G, t_min, stride=G) for g in range(G)]
    for t in parts:
        assert sorted(((t - t_min) / (1 - t_min) * B).floor().long().tolist()) == list(range(B))
    together = torch.sort(torch.cat(parts)).values
    assert torch.allclose(together, torch.sort(D.stratified_times(u0, 0, B * G, B * G, t_min)).values)


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="this torch build has no torch.distributed gloo backend")
def test_torchrun_with_default_settings_equals_one_process(char_data, tmp_path):
    """No --gradient_accumulation_steps: 2 processes make a global batch of 2 micro-batches, which
    one process with --gradient_accumulation_steps=2 trains to the same weights."""
    env = dict(os.environ, OMP_NUM_THREADS='1')
    args = [*TINY, f'--data_dir={char_data}', '--max_iters=6', '--eval_interval=3']
    subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                    os.path.join(REPO, 'diffusion.py'), *args, f'--out_dir={tmp_path / "ddp"}'],
                   check=True, capture_output=True, env=env, timeout=300)
    subprocess.run([sys.executable, os.path.join(REPO, 'diffusion.py'), *args, '--gradient_accumulation_steps=2',
                    f'--out_dir={tmp_path / "one"}'], check=True, capture_output=True, env=env, timeout=300)
    a, b = R.read_checkpoint(str(tmp_path / 'ddp')), R.read_checkpoint(str(tmp_path / 'one'))
    assert a['config']['gradient_accumulation_steps'] == 2
    for k, v in a['model'].items():
        assert torch.allclose(v, b['model'][k], atol=1e-6), k


@pytest.mark.parametrize('shape, wshape', [((3, 5, 16), (16,)), ((3, 5, 2, 4, 8), (2, 1, 8))])
def test_rms_norm_function_matches_torch(shape, wshape):
    """diffusion.RMSNormFunction (its own backward) against F.rms_norm and autograd, value and both
    gradients, for one weight (D,) and for q and k's weights stacked (2, 1, D); and gradcheck in float64."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    w = (1 + 0.3 * torch.randn(wshape, generator=gen, dtype=torch.float64)).requires_grad_()
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    ours = D.rms_norm(x, w, 1e-6)
    ref = F.rms_norm(x, (shape[-1],), None, 1e-6) * w        # broadcast weight: F.rms_norm's own takes (D,) only
    torch.testing.assert_close(ours, ref)
    for a, b in zip(torch.autograd.grad(ours, (x, w), g), torch.autograd.grad(ref, (x, w), g)):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda a, b: D.rms_norm(a, b, 1e-6), (x[:2, :2].detach().requires_grad_(), w))
    y = D.rms_norm(x.detach().bfloat16(), w.detach().float())   # low precision in, its own precision out
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), ref.detach(), atol=0.05, rtol=0.02)


def test_rope_rotates_each_pair_by_its_angle():
    """apply_rope against rotation as complex multiplication: the pair (x1_i, x2_i) of the two halves
    of a head is x1_i + i x2_i, times exp(i t theta_i), theta_i = 10000^(-2i/D), at position t; on a
    (B, T, 2, H, D) tensor (q and k together) as on (B, T, H, D)."""
    Tn, D_ = 6, 8
    x = torch.randn(2, Tn, 2, 3, D_, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cos, sin = D.rope_table(Tn, D_)
    theta = 10000.0 ** (-torch.arange(0, D_, 2, dtype=torch.float64) / D_)               # (D/2,)
    turn = torch.polar(torch.ones(Tn, D_ // 2, dtype=torch.float64), torch.arange(Tn)[:, None] * theta)   # (T, D/2)
    z = torch.complex(x[..., :D_ // 2], x[..., D_ // 2:]) * turn[None, :, None, None]
    want = torch.cat([z.real, z.imag], -1)
    torch.testing.assert_close(D.apply_rope(x, cos, sin), want, atol=1e-5, rtol=1e-5)      # tables in float32
    torch.testing.assert_close(D.apply_rope(x[:, :, 0], cos, sin), want[:, :, 0], atol=1e-5, rtol=1e-5)
