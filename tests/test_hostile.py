"""Crafted files get one line and run nothing (issue: a checkpoint never runs code it brought).

- A checkpoint names the script that made it; every entry point (sample.py, evaluate.py and its
  --ref, visualize.py, prepare.py --entropy --ref) imports a recorded script only under
  sample.trusted_script's rule. A hostile script beside a run folder writes a marker file when
  imported: it must never appear, each refusal is exactly one `error:` line (no traceback), and
  the good checkpoint's tensors are unchanged. So for a malicious pickle.
- meta.json, log.jsonl and config files / --key=value with crafted contents: one line naming the
  field (meta.json, and the prepare command that rewrites it), a skipped line with a note
  (log.jsonl), a bounded parse (configs).
"""
import hashlib
import json
import os
import shutil

import pytest
import torch

import diffusion as D
import report
import runtime as R
from conftest import REPO, TINY, run_script


def attempt(script, *args):
    """A script run that is expected to fail."""
    return run_script(script, *args, check=False)

EVIL = """import pathlib
pathlib.Path({marker!r}).write_text('ran')   # what a hostile script would do on import
"""


def tensors_sha(path):
    ckpt = torch.load(path, weights_only=True)
    h = hashlib.sha256()
    for k, v in sorted(ckpt['model'].items()):
        h.update(k.encode() + v.numpy().tobytes())
    return h.hexdigest()


def one_error_line(r, code=1):
    assert r.returncode == code, (r.returncode, r.stdout[-1000:], r.stderr[-2000:])
    assert 'Traceback' not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), r.stderr
    return lines[0]


@pytest.fixture()
def hostile(tiny_runs, tmp_path):
    """make(kind) -> a run folder whose ckpt.pt is the tiny diffusion run's with a crafted script
    record; the hostile file writes tmp_path/marker when imported."""
    marker = tmp_path / 'marker'
    good = os.path.join(tiny_runs['diffusion'], 'ckpt.pt')
    before = tensors_sha(good)

    def make(kind):
        run = tmp_path / kind
        run.mkdir()
        evil = run / ('diffusion.py' if kind == 'same_name' else 'evil.py')
        evil.write_text(EVIL.format(marker=str(marker)))
        ckpt = torch.load(good, weights_only=True)
        sha = hashlib.sha256(evil.read_bytes()).hexdigest()
        ckpt['script'] = {'absolute': {'path': str(evil), 'sha256': sha},
                          'relative': {'path': 'evil.py', 'sha256': sha},       # resolved in the project, never in cwd
                          'same_name': {'path': str(evil), 'sha256': sha},      # named like the project's own script
                          'not_a_record': ['x'] * 3}[kind] if kind != 'objective' else None
        if kind == 'objective':   # a checkpoint from before scripts were recorded, with a crafted objective
            ckpt['objective'] = '../' * 8 + str(run / 'evil')
        torch.save(ckpt, run / 'ckpt.pt')
        return run
    yield make, marker
    assert not marker.exists(), 'a hostile script ran'
    assert tensors_sha(good) == before


@pytest.mark.parametrize('kind', ['absolute', 'relative', 'same_name', 'objective', 'not_a_record'])
def test_a_checkpoint_never_imports_the_script_it_names(hostile, kind, tmp_path):
    make, marker = hostile
    run = make(kind)
    os.chdir(run)   # a relative record must not be resolved against the current folder
    try:
        line = one_error_line(attempt('sample.py', f'--out_dir={run}', '--device=cpu'))
    finally:
        os.chdir(tmp_path)
    if kind in ('absolute', 'same_name'):
        assert line == (f"error: {run}/ckpt.pt was made by {run}/{'diffusion' if kind == 'same_name' else 'evil'}.py, "
                        f"which is not in this project; if you trust that file, pass "
                        f"--script={run}/{'diffusion' if kind == 'same_name' else 'evil'}.py")
    elif kind == 'relative':
        assert 'was made by evil.py, which is gone' in line
    elif kind == 'objective':
        assert 'unknown objective' in line
    else:
        assert 'not a .py file' in line


def test_every_entry_point_refuses_it(hostile, tiny_runs, char_data, tmp_path):
    make, marker = hostile
    run = make('absolute')
    common = ['--device=cpu', '--max_tokens=256', '--passes=2', '--curve_points=0']
    for script, args in (('evaluate.py', [f'--out_dir={run}', *common]),
                         ('evaluate.py', [f"--out_dir={tiny_runs['diffusion']}", f'--ref={run}', '--num_samples=1',
                                          '--sample_seeds=1', '--steps=2', *common]),
                         ('visualize.py', [f'--diffusion_dir={run}', '--diffusion_only', '--no_animate']),
                         ('prepare.py', ['--entropy', f'--ref={run}', f'--data_dir={char_data}', '--device=cpu'])):
        line = one_error_line(attempt(script, *args))
        assert 'which is not in this project; if you trust that file, pass --script=' in line, (script, line)


def test_a_malicious_pickle_is_refused(tiny_runs, tmp_path):
    marker = tmp_path / 'marker'

    class Payload:
        def __reduce__(self):
            return (os.system, (f'touch {marker}',))
    run = tmp_path / 'pickle'
    run.mkdir()
    torch.save({'model': {}, 'payload': Payload()}, run / 'ckpt.pt')
    for script in ('sample.py', 'evaluate.py'):
        assert 'corrupt or truncated' in one_error_line(attempt(script, f'--out_dir={run}', '--device=cpu'))
    assert not marker.exists()


def test_script_names_a_trusted_file_only_when_it_exists(tiny_runs):
    line = one_error_line(attempt('sample.py', f"--out_dir={tiny_runs['diffusion']}", '--script=/no/such.py'), 2)
    assert '--script=/no/such.py: no such .py file' in line


# ---------------------------------------------------------------- meta.json


def crafted_meta(char_data, tmp_path, change):
    """A copy of the prepared shakespeare_char dataset with change(meta) applied to meta.json."""
    root = tmp_path / 'data'
    shutil.copytree(os.path.join(char_data, 'shakespeare_char'), root / 'shakespeare_char')
    path = root / 'shakespeare_char' / 'meta.json'
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta) if not isinstance(meta, str) else meta)
    return str(root)


def _set(key, value):
    def change(meta):
        node = meta
        *parents, last = key.split('.')
        for p in parents:
            node = node[p]
        node[last] = value
    return change


META_CASES = {  # name: (change, the field the error line names)
    'split_a_string': (_set('splits.train', 'train.bin'), 'splits.train'),
    'shards_null': (_set('splits.train.shards', None), 'splits.train'),
    'shards_lists': (_set('splits.train.shards', [['train.bin']]), 'splits.train.shards'),
    'dtype_unknown': (_set('dtype', 'float128'), 'dtype'),
    'chars_an_int': (_set('chars', 7), 'chars'),
    'chars_short': (lambda m: m.__setitem__('chars', m['chars'][:10]), 'chars'),
    'vocab_huge': (_set('vocab_size', 10 ** 12), 'vocab_size'),
    'shard_absolute': (_set('splits.train.shards', ['/etc/passwd']), 'splits.train.shards'),
    'shard_parent': (_set('splits.val.shards', ['../val.bin']), 'splits.val.shards'),
    'tokens_text': (_set('splits.val.tokens', ['12']), 'splits.val.tokens'),
    'eot_outside': (_set('eot_id', 10 ** 6), 'eot_id'),
}


@pytest.mark.parametrize('name', sorted(META_CASES))
def test_crafted_meta_json_is_one_line_naming_the_field(char_data, tmp_path, name):
    change, field = META_CASES[name]
    data_dir = crafted_meta(char_data, tmp_path, change)
    with pytest.raises(R.UserError) as e:
        R.load_meta(data_dir, 'shakespeare_char')
    msg = str(e.value)
    assert f": {field} " in msg and 'python prepare.py --dataset=shakespeare_char' in msg and '\n' not in msg, msg


def test_deeply_nested_meta_json_and_training_on_it(char_data, tmp_path):
    data_dir = crafted_meta(char_data, tmp_path, lambda m: None)
    path = os.path.join(data_dir, 'shakespeare_char', 'meta.json')
    with open(path, 'w') as f:
        f.write('[' * 100000 + ']' * 100000)
    line = one_error_line(attempt('diffusion.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={tmp_path}/run',
                                     '--max_iters=1'))
    assert 'is not readable JSON' in line and 'python prepare.py --dataset=shakespeare_char' in line
    data_dir = crafted_meta(char_data, tmp_path / 'b', _set('splits.train.shards', ['/etc/passwd']))
    line = one_error_line(attempt('gpt.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={tmp_path}/run2',
                                     '--max_iters=1'))
    assert 'splits.train.shards' in line and '/etc/passwd' in line


def test_a_checkpoint_s_crafted_dataset_description_is_one_line(tiny_runs, tmp_path):
    ckpt = torch.load(os.path.join(tiny_runs['diffusion'], 'ckpt.pt'), weights_only=True)
    ckpt['meta']['chars'] = ckpt['meta']['chars'][:5]   # sample.py decoded past its end (IndexError)
    (tmp_path / 'run').mkdir()
    torch.save(ckpt, tmp_path / 'run' / 'ckpt.pt')
    line = one_error_line(attempt('sample.py', f'--out_dir={tmp_path}/run', '--device=cpu'))
    assert 'its dataset description' in line and 'chars' in line


# ---------------------------------------------------------------- log.jsonl


BAD_LOG_LINES = ['[1, 2, 3]', 'null', '[' * 50000 + ']' * 50000, '{"step": "20", "loss": 1.0}',
                 '{"step": 20, "val_loss": "low"}', '{"step": -1}', '{"loss": 2.0}']


def test_crafted_log_lines_are_skipped_by_resume_and_evaluate(tiny_runs, tmp_path):
    run = tmp_path / 'run'
    shutil.copytree(tiny_runs['diffusion'], run)
    log = run / 'log.jsonl'
    good = log.read_text().splitlines()
    log.write_text('\n'.join(good[:2] + BAD_LOG_LINES + good[2:]) + '\n')
    recs = R.read_log(str(log), warn=False)
    assert len(recs) == len(good) and all(type(r['step']) is int for r in recs)
    assert report.training_log(str(run))['last_val_step'] == 40
    cfg = R.read_checkpoint(str(run))['config']
    r = run_script('diffusion.py', '--init_from=resume', f'--out_dir={run}', f"--data_dir={cfg['data_dir']}",
                   '--max_iters=42', '--device=cpu')
    assert r.stdout.count('note: skipped') == len(BAD_LOG_LINES), r.stdout[-3000:]
    assert all(isinstance(json.loads(line), dict) for line in log.read_text().splitlines())   # rewritten clean
    r = run_script('evaluate.py', f'--out_dir={run}', '--device=cpu', '--max_tokens=256', '--passes=2',
                   '--curve_points=0', '--num_samples=0')
    assert 'training log (step 42)' in r.stdout


# ---------------------------------------------------------------- config files and --key=value


def test_config_files_and_values_are_bounded(tmp_path):
    g = dict(R.settings_of(vars(D)), __file__=os.path.join(REPO, 'diffusion.py'))
    nested = tmp_path / 'nested.py'
    nested.write_text('n_layer = ' + '(' * 100000 + '1' + ')' * 100000 + '\n')
    big = tmp_path / 'big.py'
    big.write_text('# padding\n' * 200000)
    for path, what in ((nested, 'name = value'), (big, 'at most 1 MiB')):
        with pytest.raises(R.UserError, match=what):
            R.configure(dict(g), [str(path)], verbose=False)
    with pytest.raises(R.UserError, match='characters'):
        R.configure(dict(g), ['--dataset=' + 'x' * 20000], verbose=False)
    with pytest.raises(R.UserError, match='must be'):   # a None default takes a number, not nested text
        R.configure(dict(g), ['--lr_decay_iters=' + '[' * 3000 + ']' * 3000], rules=D.RULES, verbose=False)
    r = attempt('diffusion.py', str(nested))
    assert one_error_line(r, 2).endswith('a config file may only hold `name = value` lines (values are literals)')
