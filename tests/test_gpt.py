"""gpt.py (issue 3): the same transformer as diffusion.py, causal; next-token loss; KV-cache
generation that never changes the result; signal + resume that is bit-identical on CPU.

The tiny checkpoints come from conftest's tiny_runs (both scripts, the same TINY settings)."""
import json
import os
import signal
import subprocess
import sys

import torch

from conftest import REPO, TINY, run_script
from sample import load_checkpoint
from diffusion import KVCache, ModelConfig, Transformer
from runtime import EXIT_RESUMABLE, build_model, read_checkpoint
from gpt import generate


def valid_logits(model, x):
    """(B, T, mask_id) logits of the real tokens (MASK and padding are -inf by construction)."""
    return model(x)[..., :model.cfg.mask_id]


def test_causal_leak(tiny_runs):
    """Changing token t moves GPT logits only at positions >= t; diffusion logits everywhere."""
    for objective, out in tiny_runs.items():
        model, ckpt = load_checkpoint(out)
        assert ckpt['objective'] == objective and model.cfg.causal == (objective == 'gpt')
        T, V = model.cfg.block_size, model.cfg.mask_id
        x = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            base = valid_logits(model, x)                               # (2, T, V)
            for t in (0, 5, T - 1):
                y = x.clone()
                y[:, t] = (y[:, t] + 1) % V
                moved = (valid_logits(model, y) - base).abs().amax(-1)  # (2, T)
                if objective == 'gpt':
                    assert torch.equal(moved[:, :t], torch.zeros(2, t)), (t, moved[:, :t])
                    assert (moved[:, t:] > 0).all(), (t, moved[:, t:])
                else:
                    assert (moved > 0).all(), (t, moved)


def assert_same_architecture(d_out, g_out):
    d, g = read_checkpoint(d_out), read_checkpoint(g_out)
    assert (d['objective'], g['objective']) == ('diffusion', 'gpt')
    # the model configs differ in the attention direction only (MASK row included in both)
    assert {**d['model_args'], 'causal': True} == g['model_args'] and not d['model_args']['causal']
    assert {k: v.shape for k, v in d['model'].items()} == {k: v.shape for k, v in g['model'].items()}
    n_d = build_model(d, ModelConfig, Transformer).num_params()
    n_g = build_model(g, ModelConfig, Transformer).num_params()
    assert n_d == n_g > 0
    return n_d


def test_same_parameter_count(tiny_runs, char_data, tmp_path):
    """Both scripts, given the same settings, build models of identical shape and size."""
    assert_same_architecture(tiny_runs['diffusion'], tiny_runs['gpt'])
    # other settings through the real command lines: max_iters=0 saves the initial model
    args = (*TINY, f'--data_dir={char_data}', '--max_iters=0', '--eval_iters=1', '--n_embd=48', '--n_head=3',
            '--mlp=swiglu', '--tie_weights=true')
    outs = {s: str(tmp_path / s) for s in ('diffusion', 'gpt')}
    for s, out in outs.items():
        run_script(f'{s}.py', *args, f'--out_dir={out}')
    n = assert_same_architecture(outs['diffusion'], outs['gpt'])
    assert n != build_model(read_checkpoint(tiny_runs["gpt"]), ModelConfig, Transformer).num_params()  # the settings took effect


def record_lengths(model):
    """Attach a hook that records the length T of every forward pass; returns the list."""
    lengths = []
    model.register_forward_pre_hook(lambda mod, args: lengths.append(args[0].size(1)))
    return lengths


def run(model, prompt, n, **kw):
    *_, (step, tokens, changed) = generate(model, prompt, n, **kw)
    assert step == n and tokens.shape == changed.shape == (prompt.size(0), prompt.size(1) + n)
    assert torch.equal(tokens[:, :prompt.size(1)], prompt) and changed.sum() == prompt.size(0)
    return tokens


def confident_model(model_args, scale=10.0):
    """A random GPT of the given shape with its matrices scaled up: peaked, context-dependent
    greedy choices (a 40-step tiny model only repeats ' a a a'), so equal outputs mean something."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**model_args)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    return model


def test_kv_cache_greedy_equals_no_cache(tiny_runs):
    """Greedy tokens with the cache equal those without it, inside block_size (one position per
    forward pass) and past it (the window slides and is re-run: the cache cannot be reused)."""
    trained, ckpt = load_checkpoint(tiny_runs['gpt'])
    prompt = torch.tensor([[0, 1, 2, 3, 4], [10, 11, 12, 13, 14]])      # (2, 5): rows differ
    for model in (trained, confident_model(ckpt['model_args'])):
        bs = model.cfg.block_size                                       # 32
        n = 2 * bs                                                      # ends past block_size
        lengths = record_lengths(model)
        cached = run(model, prompt, n, temperature=0, use_cache=True)
        cached_lengths, lengths[:] = list(lengths), []
        plain = run(model, prompt, n, temperature=0, use_cache=False)
        assert torch.equal(cached, plain)
        # the cache is used while the sequence fits: prompt once, then one token per pass
        fit = bs - prompt.size(1) + 1                                   # passes while length <= bs
        assert cached_lengths == [5] + [1] * (fit - 1) + [bs] * (n - fit)
        assert lengths == [min(5 + i, bs) for i in range(n)]
    assert not torch.equal(cached[0, 5:], cached[1, 5:]) and len(set(cached[0, 5:].tolist())) > 5


def test_cached_logits_match(tiny_runs):
    """The cache path generate() takes (prefill, then one token per pass) gives, position by
    position, the logits of one full forward pass: the token equality above is not luck."""
    model, _ = load_checkpoint(tiny_runs['gpt'])
    T, V = model.cfg.block_size, model.cfg.mask_id
    x = torch.randint(0, V, (3, T), generator=torch.Generator().manual_seed(1))
    cache = KVCache(model.cfg, 3, T, 'cpu', torch.float32)
    with torch.no_grad():
        steps = [model(x[:, :4], cache=cache)[..., :V]] + [model(x[:, t:t + 1], cache=cache)[..., :V]
                                                            for t in range(4, T)]
        torch.testing.assert_close(torch.cat(steps, 1), valid_logits(model, x), rtol=1e-5, atol=1e-5)


def test_sampling_seeded_batched(tiny_runs):
    """Sampling (temperature, top-k, top-p) is deterministic under a seed; the cache does not
    change it; with one generator per row a batch equals the same rows sampled one by one."""
    model, _ = load_checkpoint(tiny_runs['gpt'])
    prompt = torch.tensor([[0, 1, 2], [5, 6, 7], [0, 1, 2]])
    opts = dict(temperature=0.8, top_k=20, top_p=0.95)

    def gens(*seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    a = run(model, prompt, 40, generator=gens(1, 2, 3), **opts)
    b = run(model, prompt, 40, generator=gens(1, 2, 3), **opts, use_cache=False)
    assert torch.equal(a, b)
    rows = [run(model, prompt[i:i + 1], 40, generator=gens(s), **opts) for i, s in enumerate((1, 2, 3))]
    assert torch.equal(a, torch.cat(rows))
    assert not torch.equal(a[0], a[2])                                 # same prompt, other seed
    one = run(model, prompt, 40, generator=torch.Generator().manual_seed(1), **opts)
    assert torch.equal(one, run(model, prompt, 40, generator=torch.Generator().manual_seed(1), **opts))


def read_log(out):
    with open(os.path.join(out, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


def test_training_lowers_loss(tiny_runs):
    log = read_log(tiny_runs['gpt'])
    val = {r['step']: r['val_loss'] for r in log if 'val_loss' in r}
    train = [r['loss'] for r in log if 'lr' in r]
    assert sorted(val) == [0, 20, 40] and len(train) == 40
    assert val[0] > 4.0                       # ~ln(65): an untrained model's next-char loss
    assert val[40] < val[20] < val[0] and val[40] < val[0] - 0.4   # 4.18 -> 3.76 -> 3.60
    assert sum(train[-5:]) / 5 < sum(train[:5]) / 5 - 0.4           # 4.16 -> 3.63


def test_sigusr1_resume_bit_identical(tiny_runs, char_data, tmp_path):
    """SIGUSR1 mid-run: save, exit 75; --init_from=resume then ends with exactly the weights of
    the uninterrupted tiny_runs['gpt'] run (same settings, 40 steps)."""
    out = str(tmp_path / 'gpt')
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '1'))
    cmd = [sys.executable, os.path.join(REPO, 'gpt.py'), *TINY, f'--data_dir={char_data}', f'--out_dir={out}',
           '--max_iters=40', '--eval_interval=20']
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as p:
        lines = []
        for line in p.stdout:
            lines.append(line)
            if line.startswith('step 3/'):
                p.send_signal(signal.SIGUSR1)
        rc = p.wait(timeout=120)
    assert rc == EXIT_RESUMABLE, ''.join(lines)
    with open(os.path.join(out, 'status.json')) as f:
        status = json.load(f)
    assert status['status'] == 'interrupted' and 3 <= status['step'] < 40, status
    r = run_script('gpt.py', '--init_from=resume', f'--out_dir={out}', '--sample_at_end=true')
    assert 'more samples: python sample.py' in r.stdout          # GPTObjective.sample ran at the end
    with open(os.path.join(out, 'status.json')) as f:
        assert json.load(f)['status'] == 'finished'
    done, ref = read_checkpoint(out), read_checkpoint(tiny_runs['gpt'])
    assert done['step'] == ref['step'] == 40
    assert done['model'].keys() == ref['model'].keys()
    for k, v in ref['model'].items():
        assert torch.equal(done['model'][k], v), k
    assert [r['val_loss'] for r in read_log(out) if 'val_loss' in r] == \
        [r['val_loss'] for r in read_log(tiny_runs['gpt']) if 'val_loss' in r]
    # a gpt run cannot be continued by diffusion.py: one line, naming the right script
    r = run_script('diffusion.py', '--init_from=resume', f'--out_dir={out}', check=False)
    assert r.returncode == 1 and 'resume it with gpt.py' in r.stderr and len(r.stderr.strip().splitlines()) == 1
