"""Never lose a good run: each fault of the issue reproduced on a tiny model, with its exit code,
its one-line message (`error: ...`, never a traceback) and the proof that no good data was lost
(the good checkpoint's tensors unchanged, torch.equal on every one).

  1 divergence          exit 3 naming the step; the val-ratio guard on a resume; best.pt is the
                        best step; a checkpoint with a NaN weight is refused by every reader
  2 two runs, one dir   the second exits 2 naming the first's pid; a SIGKILLed run's lock never blocks
  3 torn log line       resume, auto and evaluate.py work and say so once
  4 data identity       other chars, rewritten token files, ids above the vocabulary, bad meta.json
  5 full disk           a file size limit below the checkpoint's size; stale *.tmp.<pid> files
  6 nonsense settings   every script, a table of bad values: one line, no traceback
  7 Ctrl-C              finishes the step, saves, exits 75, resumes bit-identical; a second one
                        (in the step or the save) exits 130 at once, losing nothing
  8 sampling progress   sample.Progress prints an eta

Signals and waits never assume timing: a signal may land on any step (the result is compared
with an uninterrupted run of the same length) and every wait is for a condition, with a
generous deadline. CPU only, fixed seeds, everything in tmp_path. About a minute on 2 cores."""
import concurrent.futures
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import runtime as R
import sample
from conftest import REPO, SHAKESPEARE, TINY, run_script, wait_for

DEADLINE = 180  # seconds any wait on another process may take before the test fails (never reached when healthy)


# ---------------------------------------------------------------- helpers
def one_line_error(r, code):
    """The line of a run that failed the way a user should see it: exit code `code` (None: any
    non-zero), stderr exactly one line starting 'error: ', no traceback."""
    assert 'Traceback' not in r.stderr, r.stderr
    if code is None:
        assert r.returncode != 0, (r.returncode, r.stdout[-2000:], r.stderr)
    else:
        assert r.returncode == code, (r.returncode, r.stdout[-2000:], r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), r.stderr
    return lines[0]


def weights(path):
    """A checkpoint's model tensors (path: a run folder or a .pt file)."""
    return R.read_checkpoint(str(path))['model']


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} changed"


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def train_args(data_dir, out_dir, *extra):
    return [*TINY, f'--data_dir={data_dir}', f'--out_dir={out_dir}', *extra]


def popen(script, *args, log):
    """A repo script in the background, its stdout and stderr to the file `log`."""
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
    with open(log, 'w') as f:
        return subprocess.Popen([sys.executable, os.path.join(REPO, script), *map(str, args)], env=env,
                                stdout=f, stderr=subprocess.STDOUT)


def log_records(out_dir):
    """log.jsonl's complete lines (a line still being written is left out)."""
    path = os.path.join(out_dir, 'log.jsonl')
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith('\n')]


def trained_to(out_dir, step):
    """True once log.jsonl holds a training record of `step` or later (the signal handlers are
    installed by then)."""
    return lambda: any('lr' in r and r['step'] >= step for r in log_records(out_dir))


def status(out_dir):
    with open(os.path.join(out_dir, 'status.json')) as f:
        return json.load(f)


def temps(out_dir):
    return sorted(n for n in os.listdir(out_dir) if '.tmp.' in n)


def dead_pid():
    """A pid no process has: that of a child that has exited and been reaped."""
    p = subprocess.Popen(['true'])
    p.wait()
    with pytest.raises(ProcessLookupError):
        os.kill(p.pid, 0)
    return p.pid


def run_all(cases, timeout=300):
    """Run [(script, args)] two at a time; the results in order."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda c: run_script(c[0], *c[1], check=False, timeout=timeout), cases))


def nan_checkpoint(good_run, out_dir):
    """out_dir/ckpt.pt: good_run's checkpoint with one NaN weight."""
    ckpt = R.read_checkpoint(good_run)
    del ckpt['path']  # read_checkpoint adds it
    ckpt['model']['wte.weight'][0, 0] = float('nan')
    os.makedirs(out_dir)
    torch.save(ckpt, os.path.join(out_dir, 'ckpt.pt'))
    return str(out_dir)


# ---------------------------------------------------------------- 1. divergence
def test_divergence_exits_3_naming_the_step_and_keeps_a_finite_checkpoint(char_data, tmp_path):
    out = str(tmp_path / 'run')
    r = run_script('diffusion.py', *train_args(char_data, out, '--learning_rate=1e3', '--warmup_iters=0',
                                               '--max_iters=30', '--eval_interval=10'), check=False)
    line = one_line_error(r, R.EXIT_DIVERGED)
    st = status(out)
    assert st['status'] == 'diverged' and line.startswith(f"error: step {st['step']}: "), (st, line)
    assert 'diverged' in line and 'learning_rate' in line
    ckpt = R.read_checkpoint(out)  # the step-0 checkpoint: finite, and the message says it is the one kept
    assert f"keeps step {ckpt['step']}" in line
    assert all(torch.isfinite(v).all() for v in ckpt['model'].values())
    assert any(rec.get('event') == 'diverged' for rec in log_records(out))


def test_val_ratio_guard_stops_a_resumed_run_and_keeps_the_good_checkpoint(tiny_runs, tmp_path):
    out = copy_run(tiny_runs['diffusion'], tmp_path / 'run')
    good, good_step = weights(out), R.read_checkpoint(out)['step']
    r = run_script('diffusion.py', f'--out_dir={out}', '--init_from=resume', '--learning_rate=100',
                   f'--max_iters={good_step + 20}', '--eval_interval=10', '--device=cpu', check=False)
    line = one_line_error(r, R.EXIT_DIVERGED)
    assert 'x the best' in line and f"keeps step {good_step}" in line, line  # the ratio guard, not a NaN
    assert status(out)['status'] == 'diverged'
    assert_same_weights(weights(out), good)
    assert R.read_checkpoint(os.path.join(out, 'best.pt'))['step'] == good_step


def test_best_pt_is_the_checkpoint_of_the_lowest_val_nelbo(tiny_runs, tmp_path):
    """A resumed run at a higher rate: validation goes up and down (evaluated every 5 steps);
    best.pt is the checkpoint of the step with the lowest val_nelbo in log.jsonl."""
    out = copy_run(tiny_runs['diffusion'], tmp_path / 'run')
    run_script('diffusion.py', f'--out_dir={out}', '--init_from=resume', '--learning_rate=0.02', '--max_iters=60',
               '--eval_interval=5', '--device=cpu')
    vals = {rec['step']: rec['val_nelbo'] for rec in log_records(out) if 'val_nelbo' in rec}
    best_step = min(vals, key=vals.get)
    best = R.read_checkpoint(os.path.join(out, 'best.pt'))
    assert best['step'] == best_step and best['best_val_loss'] == vals[best_step], (best['step'], vals)
    if best_step != max(vals):  # best.pt is not simply the last checkpoint
        last = weights(out)
        assert any(not torch.equal(best['model'][k], last[k]) for k in last)


def test_non_finite_weights_are_refused_by_every_reader(tiny_runs, tmp_path):
    bad = nan_checkpoint(tiny_runs['diffusion'], tmp_path / 'nan')
    results = run_all([('sample.py', [f'--out_dir={bad}', '--device=cpu']),
                       ('evaluate.py', [f'--out_dir={bad}', '--device=cpu', '--num_samples=0', '--passes=2']),
                       ('visualize.py', ['--diffusion_only', f'--diffusion_dir={bad}', '--device=cpu'])])
    for r in results:
        assert 'non-finite weights' in one_line_error(r, 1)
    with pytest.raises(R.UserError, match='non-finite weights'):
        sample.load_run(bad)


# ---------------------------------------------------------------- 2. two runs on one out_dir
def test_second_run_on_a_busy_out_dir_exits_2_and_a_killed_runs_lock_never_blocks(char_data, tmp_path):
    out = str(tmp_path / 'run')
    lock = os.path.join(out, 'lock')
    first = popen('diffusion.py', *train_args(char_data, out, '--max_iters=1000000', '--eval_interval=1000000',
                                              '--log_interval=1000'), log=str(tmp_path / 'first.log'))
    try:
        def holds_lock():
            if not os.path.exists(lock):
                return False
            with open(lock) as f:
                return f.read().strip() == str(first.pid)
        wait_for(f"pid {first.pid} in {lock}", holds_lock, DEADLINE, proc=first, poll=0.01)
        second = run_script('diffusion.py', *train_args(char_data, out, '--init_from=auto', '--max_iters=6'),
                            check=False, timeout=DEADLINE)
        line = one_line_error(second, R.EXIT_USAGE)
        assert f"pid {first.pid}" in line and 'in use' in line, line
    finally:
        first.kill()  # SIGKILL: no handler runs, the lock file keeps its pid
        first.wait()
    with open(lock) as f:
        assert f.read().strip() == str(first.pid)  # stale
    run_script('diffusion.py', *train_args(char_data, out, '--init_from=auto', '--max_iters=6'))
    assert R.read_checkpoint(out)['step'] == 6 and status(out)['status'] == 'finished'
    assert temps(out) == []


# ---------------------------------------------------------------- 3. a torn last line in log.jsonl
def test_torn_log_line_is_skipped_once_by_resume_auto_and_evaluate(tiny_runs, tmp_path):
    out = copy_run(tiny_runs['diffusion'], tmp_path / 'run')
    log = os.path.join(out, 'log.jsonl')

    def tear():
        with open(log, 'a') as f:
            f.write('{"step": 41, "loss": 3.')  # half a line: a kill -9 or a full disk mid-write

    for i, mode in enumerate(('resume', 'auto')):
        tear()
        r = run_script('diffusion.py', f'--out_dir={out}', f'--init_from={mode}', f'--max_iters={42 + 2 * i}',
                       '--device=cpu')
        assert r.stdout.count('skipped a torn line') == 1, r.stdout[-2000:]
        assert 'Traceback' not in r.stderr
        with open(log) as f:
            assert all(json.loads(line) for line in f)  # rewritten without the torn line
    tear()
    r = run_script('evaluate.py', f'--out_dir={out}', '--device=cpu', '--max_tokens=2048', '--passes=2',
                   '--curve_points=0', '--num_samples=0')
    assert 'Traceback' not in r.stderr and 'NELBO' in r.stdout
    with open(os.path.join(out, 'eval.json')) as f:
        assert json.load(f)['training']['last_val_step'] == 44


# ---------------------------------------------------------------- 4. data identity
def test_other_characters_with_the_same_vocabulary_size_are_refused(tiny_runs, tmp_path):
    """z -> ~ everywhere: the same 65 characters in number, the same token files byte for byte
    (z and ~ both sort last), yet every z now decodes as ~."""
    with open(SHAKESPEARE) as f:
        text = f.read()
    assert 'z' in text and '~' not in text
    (tmp_path / 'other.txt').write_text(text.replace('z', '~'))
    data = str(tmp_path / 'data')
    run_script('prepare.py', '--dataset=shakespeare_char', f"--input={tmp_path / 'other.txt'}", f'--data_dir={data}')
    out = copy_run(tiny_runs['diffusion'], tmp_path / 'run')
    good = weights(out)
    r = run_script('diffusion.py', f'--out_dir={out}', '--init_from=resume', f'--data_dir={data}', '--max_iters=45',
                   '--device=cpu', check=False)
    line = one_line_error(r, 1)
    assert 'other data' in line and "z' then" in line and "~' now" in line, line
    assert_same_weights(weights(out), good)


def test_rewritten_token_files_are_refused_by_fingerprint(tiny_runs, char_data, tmp_path):
    data = shutil.copytree(char_data, tmp_path / 'data')
    path = data / 'shakespeare_char' / 'train.bin'
    ids = np.fromfile(path, dtype=np.uint16)
    ids[:1000] = ids[:1000][::-1].copy()  # same size, same vocabulary, other tokens
    ids.tofile(path)
    out = copy_run(tiny_runs['diffusion'], tmp_path / 'run')
    good = weights(out)
    r = run_script('diffusion.py', f'--out_dir={out}', '--init_from=resume', f'--data_dir={data}', '--max_iters=45',
                   '--device=cpu', check=False)
    assert 'fingerprint' in one_line_error(r, 1)
    assert_same_weights(weights(out), good)


def test_token_ids_above_the_vocabulary_and_bad_meta_json(char_data, tmp_path):
    over = shutil.copytree(char_data, tmp_path / 'over')
    path = over / 'shakespeare_char' / 'train.bin'
    np.full(os.path.getsize(path) // 2, 70, dtype=np.uint16).tofile(path)  # meta.json still says 65
    garbage = shutil.copytree(char_data, tmp_path / 'garbage')
    (garbage / 'shakespeare_char' / 'meta.json').write_bytes(random.Random(0).randbytes(300))
    listed = shutil.copytree(char_data, tmp_path / 'listed')
    (listed / 'shakespeare_char' / 'meta.json').write_text('[1, 2, 3]\n')
    results = run_all([('diffusion.py', train_args(d, tmp_path / f'run-{d.name}', '--max_iters=3', '--eval_interval=3'))
                       for d in (over, garbage, listed)])
    assert str(path) in one_line_error(results[0], 1) and 'vocabulary' in results[0].stderr
    assert 'not readable JSON' in one_line_error(results[1], 1)
    assert 'meta.json: the file is not a JSON object; make it again with' in one_line_error(results[2], 1)


# ---------------------------------------------------------------- 5. full disk
def test_a_full_disk_keeps_the_checkpoint_and_leaves_no_temporary_file(tiny_runs, tmp_path):
    out = copy_run(tiny_runs['diffusion'], tmp_path / 'run')
    good = weights(out)
    limit = os.path.getsize(os.path.join(out, 'ckpt.pt')) // 2

    def file_size_limit():  # in the child: writes past `limit` bytes fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    r = run_script('diffusion.py', f'--out_dir={out}', '--init_from=resume', '--max_iters=45', '--device=cpu',
                   check=False, preexec_fn=file_size_limit)
    line = one_line_error(r, None)
    assert 'ckpt.pt' in line and 'File too large' in line and 'KiB' in line and 'kept' in line, line
    assert temps(out) == []
    assert_same_weights(weights(out), good)


def test_stale_temporary_files_are_removed_and_live_ones_kept(tiny_runs, tmp_path):
    out = copy_run(tiny_runs['diffusion'], tmp_path / 'run')
    dead, live = dead_pid(), os.getpid()
    names = [f'ckpt.pt.tmp.{dead}', f'best.pt.tmp.{dead}', f'ckpt.pt.tmp.{live}']
    for name in names:
        (tmp_path / 'run' / name).write_bytes(b'half a checkpoint')
    run_script('diffusion.py', f'--out_dir={out}', '--init_from=resume', '--device=cpu')  # starts, has nothing to do
    assert temps(out) == [f'ckpt.pt.tmp.{live}']


# ---------------------------------------------------------------- 6. nonsense settings
def test_nonsense_settings_give_one_line_and_no_traceback(tiny_runs, char_data, tmp_path):
    diff = tiny_runs['diffusion']
    ent = tmp_path / 'strings.npy'
    np.save(ent, np.array(list('abcdefghijklmnopqrstuvwxyz') * 3)[:65])  # strings, not numbers
    bad = {
        'diffusion.py': ['--t_min=1', '--t_min=2', '--t_min=-0.5', '--gradient_accumulation_steps=-1', '--max_iters=-5',
                         '--batch_size=0', '--block_size=-1', '--n_embd=100 --n_head=3', '--n_head=0', '--device=tpu',
                         '--eval_interval=0', '--log_interval=0', '--eval_iters=-1', '--dropout=2',
                         f'--masking=entropy --entropy_file={ent}'],
        'gpt.py': ['--t_min=0.5', '--n_embd=100 --n_head=3', '--device=tpu'],
        'sample.py': ['--max_new_tokens=-5', '--steps=0', '--top_p=0', '--trace=/nonexistent/dir/t.json'],
        'evaluate.py': ['--batch_size=0', '--passes=1'],
        'visualize.py': ['--fps=0', '--width=5', '--gpt_only'],
        'prepare.py': ['--val_fraction=1', '--shard_size=0', '--dataset=nope'],
    }
    base = {'sample.py': [f'--out_dir={diff}', '--device=cpu'], 'evaluate.py': [f'--out_dir={diff}', '--device=cpu'],
            'visualize.py': ['--diffusion_only', f'--diffusion_dir={diff}', '--device=cpu'],
            'prepare.py': [f"--data_dir={tmp_path / 'prep'}", f'--input={SHAKESPEARE}']}
    cases = []
    for script, settings in bad.items():
        for i, setting in enumerate(settings):
            before = base.get(script) or train_args(char_data, tmp_path / f'{script}-{i}', '--max_iters=3',
                                                    '--eval_interval=3')
            cases.append((script, [*before, *setting.split()]))
    failures = []
    for (script, args), r in zip(cases, run_all(cases)):
        lines = r.stderr.strip().splitlines()
        if r.returncode == 0 or 'Traceback' in r.stderr or len(lines) > 2 or \
                not any(ln.startswith('error: ') for ln in lines):
            failures.append(f"{script} {' '.join(args[-2:])}: exit {r.returncode}\n{r.stderr[-1500:]}")
        if '--trace=' in args[-1]:
            assert r.stdout == '', "the bad --trace must fail before sampling"
        if '--masking=entropy' in args:
            assert 'entropy file' in one_line_error(r, 1)
    assert not failures, '\n'.join(failures)
    assert not os.path.exists(tmp_path / 'prep')  # prepare.py checks its settings before it writes anything


# ---------------------------------------------------------------- 7. Ctrl-C
CTRL_C_STEPS = 200


@pytest.fixture(scope='module')
def straight_run(char_data, tmp_path_factory):
    """An uninterrupted run of CTRL_C_STEPS steps: its out_dir and the arguments that made it."""
    args = train_args(char_data, tmp_path_factory.mktemp('straight') / 'run', f'--max_iters={CTRL_C_STEPS}',
                      '--eval_interval=50')
    run_script('diffusion.py', *args)
    return args


def interrupted_run(straight_args, out, log):
    """The straight run's settings in out, sent a SIGINT once step 5 is logged: the finished
    process and its arguments."""
    args = [a for a in straight_args if not a.startswith('--out_dir=')] + [f'--out_dir={out}']
    proc = popen('diffusion.py', *args, log=log)
    try:
        wait_for("step 5 in log.jsonl", trained_to(out, 5), DEADLINE, proc=proc, poll=0.01)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=DEADLINE)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc, args


def resume_and_compare(args, out, straight_args):
    """Resume to the end: the final weights equal the straight run's, bit for bit, and every
    step is logged exactly once."""
    run_script('diffusion.py', *args, '--init_from=resume')
    straight = next(a.split('=', 1)[1] for a in straight_args if a.startswith('--out_dir='))
    assert_same_weights(weights(out), weights(straight))
    assert [r['step'] for r in log_records(out) if 'lr' in r] == list(range(1, CTRL_C_STEPS + 1))
    assert temps(out) == []


def test_ctrl_c_finishes_the_step_saves_exits_75_and_resumes_bit_identical(straight_run, tmp_path):
    out, log = str(tmp_path / 'run'), str(tmp_path / 'run.log')
    proc, args = interrupted_run(straight_run, out, log)
    with open(log) as f:
        text = f.read()
    assert proc.returncode == R.EXIT_RESUMABLE, text[-3000:]
    assert 'Traceback' not in text and 'error:' not in text
    st = status(out)
    assert st['status'] == 'interrupted' and 5 <= st['step'] < CTRL_C_STEPS, st  # whichever step it landed on
    assert R.read_checkpoint(out)['step'] == st['step'] and f"saved step {st['step']}" in text
    assert max(r['step'] for r in log_records(out) if 'lr' in r) == st['step']  # that step finished and was logged
    resume_and_compare(args, out, straight_run)


# The second Ctrl-C must land after the first was handled, which no outside sender can time (two
# SIGINTs sent back to back reach Python's handler once, as one). So the run sends them to itself,
# through a wrapped objective, at a fixed step: os.kill runs the Python handler before it returns.
DOUBLE_CTRL_C = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import diffusion as D
import runtime as R
at, where = int(sys.argv[2]), sys.argv[3]   # the step of the first Ctrl-C; where the second lands


def ctrl_c():
    os.kill(os.getpid(), signal.SIGINT)


class Objective(D.DiffusionObjective):
    def loss(self, model, window, step, micro):
        if step == at:
            ctrl_c()                            # the first: finish this step, save, exit 75
            if where == 'step':
                ctrl_c()                        # the second, in the same step
            else:                               # the second, halfway through writing the checkpoint
                save = R.atomic_save
                def second_during_save(obj, path):
                    R.atomic_save = save
                    R.atomic_write(path, lambda f: (f.write(b'half a checkpoint'), ctrl_c()))
                R.atomic_save = second_during_save
        return super().loss(model, window, step, micro)


R.run_cli(lambda: D.train(R.configure(vars(D), sys.argv[4:], rules=D.RULES), Objective, D.__file__))
"""


@pytest.mark.parametrize('where', ['step', 'save'])
def test_second_ctrl_c_stops_at_once_and_loses_nothing(straight_run, tmp_path, where):
    """A second Ctrl-C during the step the first one lets finish, or during the save that follows:
    exit 130 at once with one line; ckpt.pt still holds the last evaluation's checkpoint (a
    half-written one stays a *.tmp.<pid> file, removed when the run starts again), and resuming
    ends bit-identical to the straight run."""
    out = str(tmp_path / 'run')
    args = [a for a in straight_run if not a.startswith('--out_dir=')] + [f'--out_dir={out}']
    (tmp_path / 'double_ctrl_c.py').write_text(DOUBLE_CTRL_C)
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
    r = subprocess.run([sys.executable, str(tmp_path / 'double_ctrl_c.py'), REPO, '60', where, *args], env=env,
                       check=False, capture_output=True, text=True, timeout=DEADLINE)
    assert one_line_error(r, 130) == 'error: interrupted (Ctrl-C)'
    assert R.read_checkpoint(out)['step'] == 50
    assert json.load(open(os.path.join(out, 'status.json'))) == {'status': 'stopped', 'step': 50, 'max_iters': 200}
    assert len(temps(out)) == (where == 'save')
    resume_and_compare(args, out, straight_run)


# ---------------------------------------------------------------- 8. progress of long samples
def test_progress_prints_done_and_eta_on_stderr(capsys):
    mask = 65
    x = torch.tensor([[1, 2, 3, mask, mask, 4, mask, mask, mask, mask]])  # a 2-token prompt, 2 of 8 new revealed
    p = sample.Progress('diffusion', [1, 2], 8, mask, every=0)
    p.update(x)
    err = capsys.readouterr().err.strip()
    assert '2/8 tokens' in err and 'eta' in err, err
    p = sample.Progress('gpt', [1, 2], 8, mask, every=0)
    p.update(torch.tensor([[1, 2, 5, 6, 7]]))
    err = capsys.readouterr().err.strip()
    assert '3/8 tokens' in err and 'eta' in err, err
    quiet = sample.Progress('diffusion', [1, 2], 8, mask)  # every 10 s: nothing yet
    quiet.update(x)
    assert capsys.readouterr().err == ''
