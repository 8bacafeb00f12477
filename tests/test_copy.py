"""A copied diffusion.py is the unit of research: copy it, make one of the four usual edits (a
schedule, a masking rule, a loss weighting, an architecture knob), train, and sample.py,
evaluate.py and visualize.py follow the copy's checkpoint unchanged. Also: the imports of the
top-level scripts run one way."""
import ast
import hashlib
import json
import os
import shutil

import pytest
import torch

import diffusion as D
import evaluate as ev
import runtime as R
import sample as SAMPLE
from conftest import REPO, TINY, run_script

# The four edits, as a user makes them: (anchor in diffusion.py, replacement). Each anchor occurs once.
EDITS = {
    'schedule': [(  # one entry in SCHEDULES
        "SCHEDULES = {  # name: (alpha(t), alpha'(t)), float64 tensors with t in [0, 1]\n",
        "SCHEDULES = {  # name: (alpha(t), alpha'(t)), float64 tensors with t in [0, 1]\n"
        "    'quadratic':      (lambda t: 1 - t ** 2,                     lambda t: -2 * t),\n")],
    'masking': [(  # one function plus its name in MASKINGS
        "MASKINGS = {'uniform': mask_uniform, 'entropy': mask_entropy}",
        "def mask_left_heavy(x, alpha, objective):\n"
        "    \"\"\"The first half of every window is masked 1.5x as often, the second half 0.5x.\"\"\"\n"
        "    scale = torch.where(torch.arange(x.size(1), device=x.device) < x.size(1) // 2, 1.5, 0.5)\n"
        "    return ((1 - alpha)[:, None] * scale[None].double()).clamp(max=1.0)\n\n\n"
        "MASKINGS = {'uniform': mask_uniform, 'entropy': mask_entropy, 'left_heavy': mask_left_heavy}")],
    'weighting': [(  # one function plus its name in LOSS_WEIGHTINGS
        "LOSS_WEIGHTINGS = {'nelbo': weight_nelbo, 'masked_mean': weight_masked_mean}",
        "def weight_unit(ce_sum, n_masked, t, schedule, t_min, T):\n"
        "    \"\"\"Every masked token's cross-entropy counts once, per token of the window.\"\"\"\n"
        "    return (ce_sum / T).mean(), ce_sum / T\n\n\n"
        "LOSS_WEIGHTINGS = {'nelbo': weight_nelbo, 'masked_mean': weight_masked_mean, 'unit': weight_unit}")],
    'architecture': [  # the module code, one setting, one ModelConfig field
        ("mlp = 'relu2'                   # MLP kind: one of MLPS below\n",
         "mlp = 'relu2'                   # MLP kind: one of MLPS below\n"
         "mlp_ratio = 4                   # MLP hidden width / n_embd\n"),
        ("    mlp: str = 'relu2'          # 'relu2' | 'swiglu'\n",
         "    mlp: str = 'relu2'          # 'relu2' | 'swiglu'\n    mlp_ratio: int = 4\n"),
        ("            hidden = 4 * cfg.n_embd\n", "            hidden = cfg.mlp_ratio * cfg.n_embd\n")],
}
RUNS = {  # run name: (script, the settings that put an edit in force)
    'schedule': ('my_diffusion.py', ['--schedule=quadratic']),
    'masking': ('my_diffusion.py', ['--masking=left_heavy']),
    'weighting': ('my_diffusion.py', ['--loss_weighting=unit']),
    'architecture': ('my_diffusion.py', ['--mlp_ratio=3']),
    'gpt': ('my_gpt.py', ['--mlp_ratio=3']),
}


def sha(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


# The sampler and loss pieces the tools take from a run's script (issue: the tools follow the copy's
# sampler and loss too), edited in a second copy so the four edits above keep their meaning: every
# draw of sample_categorical becomes token 7, and masked_ce counts every cross-entropy twice.
TOOL_EDITS = [
    ('    if temperature == 0 or logits.size(0) == 0:\n        return logits.argmax(-1)\n',
     '    return torch.full_like(logits.argmax(-1), 7)   # the test edit: every draw is token 7\n'),
    ('    return per_position.view(-1, block_len).sum(1) if block_len else per_position.view(x.shape).sum(1)\n',
     '    per_position = 2 * per_position   # the test edit: every cross-entropy counts twice\n'
     '    return per_position.view(-1, block_len).sum(1) if block_len else per_position.view(x.shape).sum(1)\n')]
SCRIPTS = [f for f in os.listdir(REPO) if f.endswith('.py') and f not in ('conftest.py', 'test_smoke.py')]


def edited(src, edits):
    for anchor, new in edits:
        assert src.count(anchor) == 1, anchor
        src = src.replace(anchor, new)
    return src


@pytest.fixture(scope='module')
def copies(char_data, tmp_path_factory):
    """A project as the README has it: the scripts, and beside them my_diffusion.py (all four
    edits), my_gpt.py (importing my_diffusion) and my_tools.py (the sampler and loss edits); one
    tiny run per edit: {'dir': the project folder, name: out_dir}."""
    original = sha(os.path.join(REPO, 'diffusion.py'))
    folder = tmp_path_factory.mktemp('project')
    for f in SCRIPTS:
        shutil.copy(os.path.join(REPO, f), folder / f)
    src = open(os.path.join(REPO, 'diffusion.py')).read()
    (folder / 'my_diffusion.py').write_text(edited(src, [e for edit in EDITS.values() for e in edit]))
    (folder / 'my_tools.py').write_text(edited(src, TOOL_EDITS))
    gpt = open(os.path.join(REPO, 'gpt.py')).read()
    assert gpt.count('\nimport diffusion\n') == 1 and gpt.count('\nfrom diffusion import') == 1
    gpt = gpt.replace('\nimport diffusion\n', '\nimport my_diffusion as diffusion\n')
    (folder / 'my_gpt.py').write_text(gpt.replace('\nfrom diffusion import', '\nfrom my_diffusion import'))
    out = {'dir': folder}
    for name, (script, args) in dict(RUNS, tools=('my_tools.py', [])).items():
        out[name] = str(folder / 'runs' / name)
        run_script(str(folder / script), *TINY, f'--data_dir={char_data}', f'--out_dir={out[name]}',
                   '--max_iters=4', '--eval_interval=2', *args)
    assert sha(os.path.join(REPO, 'diffusion.py')) == original, 'the test must not touch diffusion.py'
    return out


def mine(copies, name):
    """A run of the copy, loaded in this process (the repo's sample.py: the copy is outside the
    repo's folder, so the test trusts it explicitly, as --script does)."""
    return SAMPLE.load_run(copies[name], trust=[str(copies['dir'] / dict(RUNS, tools=('my_tools.py',))[name][0])])


@pytest.mark.parametrize('name', list(RUNS))
def test_every_script_follows_the_copy(copies, name):
    run = copies[name]
    ckpt = R.read_checkpoint(run)
    assert ckpt['script']['path'] == str(copies['dir'] / RUNS[name][0])
    here = copies['dir']   # the copy sits beside the scripts: nothing to trust explicitly
    r = run_script(here / 'sample.py', f'--out_dir={run}', '--device=cpu', '--max_new_tokens=12', '--steps=4')
    assert 'NFE' in r.stdout
    r = run_script(here / 'evaluate.py', f'--out_dir={run}', '--device=cpu', '--max_tokens=512', '--passes=2',
                   '--num_samples=2', '--sample_seeds=1', '--steps=4', '--curve_points=2', '--curve_tokens=256')
    assert 'nats/token' in r.stdout
    which = '--gpt' if name == 'gpt' else '--diffusion'
    r = run_script(here / 'visualize.py', f'{which}_dir={run}', f'{which}_only', '--no_animate', '--length=10', '--steps=4')
    assert 'tokens in' in r.stdout


def test_the_schedule_edit_drives_the_ancestral_sampler(copies):
    """From t=1 to t=1/2 the ancestral sampler reveals (alpha(1/2) - alpha(1)) / (1 - alpha(1)) of
    the masks: 3/4 under the copy's quadratic schedule, 1/2 under linear."""
    run = mine(copies, 'schedule')
    assert run.objective.schedule.name == 'quadratic'
    mask = run.model.cfg.mask_id
    frames = SAMPLE.frames(run.model, 'diffusion', [], 32, num_samples=64, sampler='ancestral', steps=2, seed=0,
                           schedule=run.objective.schedule, script=run.script)
    _, x, _ = next(frames)
    revealed = (x != mask).double().mean().item()                       # 2048 positions: sd ~0.01
    assert abs(revealed - 0.75) < 0.05, revealed


def test_the_masking_edit_is_the_rule_trained_with(copies):
    run = mine(copies, 'masking')
    assert run.ckpt['config']['masking'] == 'left_heavy'
    x = torch.zeros(4000, 32, dtype=torch.long)
    alpha = torch.full((4000,), 0.6, dtype=torch.float64)
    m = run.script.draw_mask(x, run.script.MASKINGS['left_heavy'](x, alpha, run.objective), R.rng(0))
    assert abs(m[:, :16].double().mean().item() - 0.6) < 0.01 and abs(m[:, 16:].double().mean().item() - 0.2) < 0.01
    r = run_script('diffusion.py', '--masking=left_heavy', check=False)     # the original has no such rule
    assert r.returncode == 2 and 'one of uniform, entropy' in r.stderr


def test_the_weighting_edit_is_the_loss_trained_with(copies):
    run = mine(copies, 'weighting')
    mod, model = run.script, run.model
    x = torch.randint(0, 60, (8, 32), generator=torch.Generator().manual_seed(0))
    t = torch.linspace(0.1, 0.9, 8, dtype=torch.float64)
    u = torch.rand(x.shape, generator=R.rng(1), dtype=torch.float64)
    with torch.no_grad():
        loss = run.objective.compute(model, x, t, u, capacity=x.numel())
        mask = u < mod.mask_uniform(x, run.objective.schedule.alpha(t), None)
        expected = (D.masked_ce(model, x, mask, model.cfg.mask_id) / 32).mean()
    assert torch.allclose(loss, expected, atol=1e-6)


@pytest.mark.parametrize('name', ['architecture', 'gpt'])
def test_the_architecture_edit_is_in_the_weights(copies, name):
    run = mine(copies, name)
    n_embd = run.model.cfg.n_embd
    assert run.model.cfg.mlp_ratio == 3 and run.model.blocks[0].mlp.fc.weight.shape == (3 * n_embd, n_embd)
    assert run.ckpt['model']['blocks.0.mlp.fc.weight'].shape == (3 * n_embd, n_embd)


def test_the_tools_take_the_sampler_and_loss_from_the_run_s_script(copies):
    """sample.py, visualize.py and evaluate.py use the copy's sample_categorical and masked_ce,
    not the repo's: every sampled token is 7, and the bound is exactly twice the repo's masked_ce's
    on the same draws."""
    here, run = copies['dir'], copies['tools']
    loaded = mine(copies, 'tools')
    seven = loaded.tokenizer.decode([7])
    for sampler in ('ancestral_cache', 'confidence', 'remdm'):
        r = run_script(here / 'sample.py', f'--out_dir={run}', '--device=cpu', '--max_new_tokens=24', '--steps=4',
                       f'--sampler={sampler}')
        assert r.stdout.split('\n' + '-' * 60)[0] == seven * 24, (sampler, r.stdout)
    r = run_script(here / 'visualize.py', f'--diffusion_dir={run}', '--diffusion_only', '--no_animate', '--length=10',
                   '--steps=4')
    assert seven * 10 in r.stdout
    settings = ['--max_tokens=512', '--passes=2', '--num_samples=0', '--curve_points=0', '--discrete=false',
                '--wikitext=false', '--device=cpu']
    run_script(here / 'evaluate.py', f'--out_dir={run}', *settings)
    got = json.load(open(os.path.join(run, 'eval.json')))['likelihood']['continuous']['nats']
    c = R.configure(ev.default_settings(), settings, rules=ev.RULES, verbose=False)
    data = R.TokenData(loaded.ckpt['config']['data_dir'], 'shakespeare_char', 'val')
    w = ev.split_windows(data, loaded.model.cfg.block_size, c.max_tokens)
    repo = ev.likelihood(loaded.model, 'diffusion', w, c, True, ce=D.masked_ce)['continuous']['nats']
    assert got == pytest.approx(2 * repo, rel=1e-6), (got, repo)


def test_a_gone_or_changed_script_is_one_line(copies, tmp_path):
    run = tmp_path / 'run'
    shutil.copytree(copies['architecture'], run)
    script = copies['dir'] / 'my_diffusion.py'
    sample_py = copies['dir'] / 'sample.py'
    keep = script.read_text()
    try:
        script.write_text(keep.replace('    mlp_ratio: int = 4\n', ''))   # the field the checkpoint needs is gone
        r = run_script(sample_py, f'--out_dir={run}', '--device=cpu', check=False)
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert f'{script} changed since it wrote {run}/ckpt.pt; if it still fits that checkpoint, pass --script=' \
            in r.stderr
        r = run_script(sample_py, f'--out_dir={run}', '--device=cpu', f'--script={script}', check=False)
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert f'{script} (--script) changed since it wrote {run}/ckpt.pt and no longer fits it' in r.stderr
        script.write_text(keep + '\n# a comment: the model still fits\n')
        r = run_script(sample_py, f'--out_dir={run}', '--device=cpu', f'--script={script}', '--max_new_tokens=4',
                       '--steps=2')
        assert 'NFE' in r.stdout
        script.unlink()
        r = run_script(sample_py, f'--out_dir={run}', '--device=cpu', check=False)
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert f'was made by {script}, which is gone' in r.stderr
    finally:
        script.write_text(keep)


def test_a_copy_outside_the_project_runs_only_when_named(copies):
    """The repo's sample.py does not import a copy kept in another folder (the checkpoint names it,
    but only the user decides which code runs) until --script names it; nothing else changes."""
    run, script = copies['schedule'], copies['dir'] / 'my_diffusion.py'
    r = run_script('sample.py', f'--out_dir={run}', '--device=cpu', check=False)
    assert r.returncode == 1 and r.stderr.strip() == (
        f"error: {run}/ckpt.pt was made by {script}, which is not in this project; if you trust that file, pass "
        f"--script={script}"), r.stderr
    r = run_script('sample.py', f'--out_dir={run}', '--device=cpu', f'--script={script}', '--max_new_tokens=8',
                   '--steps=2')
    assert 'NFE' in r.stdout


def project_imports():
    """{script: set of the project's top-level scripts it imports (anywhere in the file)}."""
    scripts = {f[:-3] for f in os.listdir(REPO) if f.endswith('.py') and f not in ('conftest.py',)}
    graph = {}
    for s in scripts:
        tree = ast.parse(open(os.path.join(REPO, s + '.py')).read())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                deps |= {a.name.split('.')[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps.add(node.module.split('.')[0])
        graph[s] = deps & scripts - {s}
    return graph


def test_imports_run_one_way():
    graph = project_imports()
    assert graph['runtime'] == set(), graph['runtime']   # the support module imports no script
    assert graph['diffusion'] == {'runtime'}, graph['diffusion']
    assert graph['gpt'] == {'diffusion', 'runtime'}, graph['gpt']
    order, seen = [], set()

    def visit(node, path):
        assert node not in path, f"import circle: {' -> '.join(path + [node])}"
        if node not in seen:
            seen.add(node)
            for dep in sorted(graph[node]):
                visit(dep, path + [node])
            order.append(node)
    for node in sorted(graph):
        visit(node, [])
    assert order.index('runtime') == 0 and order.index('diffusion') == 1
