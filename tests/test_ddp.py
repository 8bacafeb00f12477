"""DDP on CPU with gloo (issue 8): `torchrun --nproc_per_node=2` trains exactly what one process
trains with the same global batch, and a SIGUSR1 under DDP resumes to bit-identical weights.

Why they can match: gradient_accumulation_steps counts the micro-batches of the whole global
batch, and each micro-batch's data, mask and noise level are drawn from generators keyed by
(seed, step, global micro-batch index) (diffusion.rng), so 2 processes x 1 micro-batch see the
same tokens as 1 process x 2 micro-batches; DDP averages the two gradients where one process
sums the two halves. Everything runs on CPU with fixed seeds."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from conftest import REPO, TINY, run_script
from runtime import EXIT_RESUMABLE, read_checkpoint

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="this torch build has no torch.distributed gloo backend")

# 60 steps, evaluations at 0, 20, 40, 60; eval_iters=100 makes an evaluation last ~0.5 s, so a
# signal sent as step 20 starts usually lands during step 20 or its evaluation (test_ddp_resume_exact
# accepts any step).
ARGS = [*TINY, '--max_iters=60', '--eval_interval=20', '--eval_iters=100', '--gradient_accumulation_steps=2']
EVAL_STEP = 20


def torchrun(out_dir, data_dir, *extra, nproc=2):
    """Start `torchrun --standalone --nproc_per_node=nproc diffusion.py` (a free port each time);
    its output goes to out_dir + '.log'. Returns the Popen."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    log = open(out_dir + '.log', 'a')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
           os.path.join(REPO, 'diffusion.py'), *ARGS, f'--data_dir={data_dir}', f'--out_dir={out_dir}', *extra]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return proc


def finish(proc, out_dir, expect=0, timeout=300):
    rc = proc.wait(timeout=timeout)
    with open(out_dir + '.log') as f:
        text = f.read()
    assert rc == expect, f"torchrun exited {rc}, expected {expect}:\n{text[-4000:]}"
    return text


def records(out_dir):
    """log.jsonl as {(step, 'train'|'val'): loss}, without timings and start events (a line still
    being written is skipped)."""
    out = {}
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        for line in f:
            if not line.endswith('\n'):
                break
            r = json.loads(line)
            if 'loss' in r:
                out[(r['step'], 'val' if 'val_loss' in r else 'train')] = r['loss']
    return out


def children(pid):
    """pids whose parent is pid (read from /proc/*/stat)."""
    kids = []
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                with open(f'/proc/{entry}/stat') as f:
                    stat = f.read()
            except OSError:
                continue  # exited meanwhile
            if int(stat.rsplit(')', 1)[1].split()[1]) == pid:
                kids.append(int(entry))
    return kids


def rank_of(pid):
    with open(f'/proc/{pid}/environ', 'rb') as f:
        env = dict(kv.split(b'=', 1) for kv in f.read().split(b'\0') if b'=' in kv)
    return int(env[b'RANK'])


def wait_for_train_step(out_dir, step, proc, timeout=240):
    """Poll log.jsonl until the training record of `step` is there."""
    path = os.path.join(out_dir, 'log.jsonl')
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"torchrun exited {proc.returncode} before step {step}"
        if os.path.exists(path) and (step, 'train') in records(out_dir):
            return
        time.sleep(0.005)
    raise AssertionError(f"no step {step} in {path} after {timeout} s")


@pytest.fixture(scope='module')
def ddp_reference(char_data, tmp_path_factory):
    """An uninterrupted 2-process run: its out_dir."""
    out = str(tmp_path_factory.mktemp('ddp') / 'reference')
    text = finish(torchrun(out, char_data), out)
    assert '2 process(es) on cpu' in text
    return out


def test_ddp_matches_one_process(ddp_reference, char_data, tmp_path):
    """2 processes x 1 micro-batch == 1 process x 2 micro-batches: every logged train and
    validation loss, and the final weights, within float tolerance."""
    single = str(tmp_path / 'single')
    r = run_script('diffusion.py', *ARGS, f'--data_dir={char_data}', f'--out_dir={single}')
    assert '1 process(es) on cpu' in r.stdout
    ddp, one = records(ddp_reference), records(single)
    assert ddp.keys() == one.keys() and len(ddp) == 60 + 4  # 60 train records + 4 evaluations
    worst = max(abs(ddp[k] - one[k]) / abs(one[k]) for k in one)
    assert worst < 1e-5, f"largest relative loss difference {worst:.2e}"
    a, b = read_checkpoint(ddp_reference), read_checkpoint(single)
    assert len(a['rng']) == 2 and len(b['rng']) == 1  # really 2 processes vs 1
    assert a['step'] == b['step'] == 60
    for name, w in b['model'].items():
        torch.testing.assert_close(a['model'][name], w, rtol=1e-5, atol=1e-6, msg=name)


def test_ddp_resume_exact(ddp_reference, char_data, tmp_path):
    """SIGUSR1 to one worker (rank 1, not the one that saves) once step 19 is logged: both ranks
    agree to stop at whichever step the signal lands on (usually step 20 or its evaluation; 19
    when it beats that step's stop check, later under load), every evaluation up to there
    completes, the checkpoint and status.json say that step; resuming under DDP ends
    bit-identical to the uninterrupted run."""
    out = str(tmp_path / 'interrupted')
    proc = torchrun(out, char_data)
    wait_for_train_step(out, EVAL_STEP - 1, proc)  # step 19 done: next come step 20 and its evaluation
    workers = children(proc.pid)
    assert len(workers) == 2, f"expected 2 workers under torchrun, found {workers}"
    rank1 = next(p for p in workers if rank_of(p) == 1)
    os.kill(rank1, signal.SIGUSR1)
    # torchrun reports its workers' exit code 75 as a failure (exit 1)
    text = finish(proc, out, expect=1)
    assert f'exitcode  : {EXIT_RESUMABLE}' in text and 'signal' in text
    with open(os.path.join(out, 'status.json')) as f:
        status = json.load(f)
    stopped = status['step']
    assert status == {'status': 'interrupted', 'step': stopped, 'max_iters': 60} and EVAL_STEP - 1 <= stopped < 60, \
        f"{status}: the signal was sent after step {EVAL_STEP - 1}"
    assert read_checkpoint(out)['step'] == stopped
    # every loss up to the stop, the evaluation in progress included, as in the uninterrupted run
    assert records(out) == {k: v for k, v in records(ddp_reference).items() if k[0] <= stopped}

    finish(torchrun(out, char_data, '--init_from=resume'), out)
    ref, got = read_checkpoint(ddp_reference), read_checkpoint(out)
    assert got['step'] == ref['step'] == 60
    for name, w in ref['model'].items():
        assert torch.equal(got['model'][name], w), f"{name} differs after resume"
    for i, s in ref['optimizer']['state'].items():
        for k, v in s.items():
            assert torch.equal(got['optimizer']['state'][i][k], v), f"optimizer state {i}.{k} differs"
    assert records(out) == records(ddp_reference)  # every logged loss, before and after the resume
