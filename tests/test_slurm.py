"""slurm_train.sh end-to-end on a real SLURM (issue 8).

tests/local_slurm.sh starts munged, slurmctld and slurmd on this machine (one node, a CPU
partition, everything under a temporary folder, free ports) and stops them afterwards, always.
A tiny 2-process CPU training (torchrun + gloo, the script's real launch path) is submitted,
SIGUSR1 is sent to its batch shell mid-training (what --signal=B:USR1@300 does before the time
limit), and the job must requeue itself, resume from its checkpoint, finish, and end with the
weights of the same run done without interruption. Array mode is checked with DRY_RUN tasks.

Needs root and Debian's `slurm-wlm munge` packages (.ci/run installs them); skipped otherwise."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, TINY, wait_for
from diffusion import SCHEDULES
from runtime import read_checkpoint

SBIN = os.pathsep.join([os.environ.get('PATH', ''), '/usr/sbin', '/sbin'])
NEEDED = ('munged', 'slurmctld', 'slurmd', 'sbatch', 'scontrol', 'scancel', 'squeue')
MISSING = [b for b in NEEDED if shutil.which(b, path=SBIN) is None]
pytestmark = [
    pytest.mark.skipif(bool(MISSING), reason=f"SLURM not installed (no {', '.join(MISSING)}): "
                                              "apt-get install -y slurm-wlm munge"),
    pytest.mark.skipif(os.name != 'posix' or os.geteuid() != 0, reason="a local slurmd must run as root"),
]
LOCAL_SLURM = os.path.join(REPO, 'tests', 'local_slurm.sh')
ARGS = [*TINY, '--max_iters=120', '--eval_interval=40', '--gradient_accumulation_steps=2']


def free_ports(n):
    """n distinct TCP ports that are free now (all bound at once, so never the same one twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(('127.0.0.1', 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def clean_env(**extra):
    """This environment without SLURM_* (pytest itself may run inside a SLURM job)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(('SLURM_', 'SBATCH_'))}
    env.update(PATH=SBIN, OMP_NUM_THREADS='1', PYTHON=sys.executable, PYTHONUNBUFFERED='1', **extra)
    return env


@pytest.fixture(scope='module')
def cluster(tmp_path_factory):
    """A running one-node cluster: the environment that talks to it. Stopped afterwards, always."""
    root = str(tmp_path_factory.mktemp('slurm'))
    ctld_port, slurmd_port = free_ports(2)
    env = clean_env(CTLD_PORT=str(ctld_port), SLURMD_PORT=str(slurmd_port))
    try:
        r = subprocess.run(['bash', LOCAL_SLURM, 'start', root], env=env, capture_output=True, text=True,
                           timeout=60)
        if r.returncode != 0:
            logs = ''.join(open(os.path.join(root, 'log', f)).read()[-1500:]
                           for f in sorted(os.listdir(os.path.join(root, 'log'))))
            pytest.fail(f"local SLURM did not start:\n{r.stdout}{r.stderr}\n{logs}")
        yield dict(env, SLURM_CONF=os.path.join(root, 'slurm.conf'), LOCAL_SLURM_DIR=root)
    finally:
        subprocess.run(['bash', LOCAL_SLURM, 'stop', root], env=env, timeout=60)


def daemon_logs(cluster, chars=2000):
    """The ends of slurmctld's and slurmd's logs, for failure messages."""
    out = ''
    for name in ('slurmctld.log', 'slurmd.log'):
        path = os.path.join(cluster['LOCAL_SLURM_DIR'], 'log', name)
        if os.path.exists(path):
            with open(path) as f:
                out += f"\n--- {name} ---\n" + f.read()[-chars:]
    return out


def slurm(cluster, *cmd, **env):
    """Run a SLURM command against the local cluster (sbatch passes env on to the job)."""
    r = subprocess.run(cmd, cwd=REPO, env=dict(cluster, **env), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"{' '.join(cmd)} failed: {r.stderr}"
    return r.stdout


def job_fields(cluster, job):
    """`scontrol show job` as a dict: JobState, Restarts, ExitCode, ..."""
    return dict(re.findall(r'(\w+)=(\S*)', slurm(cluster, 'scontrol', 'show', 'job', '-o', str(job))))


def train_steps(out_dir):
    """Steps with a training record in log.jsonl so far (a line still being written is skipped)."""
    path = os.path.join(out_dir, 'log.jsonl')
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [r['step'] for r in (json.loads(ln) for ln in f if ln.endswith('\n')) if 'lr' in r]


def losses(out_dir):
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return {(r['step'], 'val' if 'val_loss' in r else 'train'): r['loss'] for r in map(json.loads, f)
                if 'loss' in r}


def test_requeue_resume_exact(cluster, char_data, tmp_path):
    """sbatch slurm_train.sh; SIGUSR1 to the batch shell mid-training -> the workers save, the job
    requeues itself (Restarts=1), resumes from ckpt.pt, finishes, and ends with the weights and
    logged losses of the same run done without interruption."""
    data = f'--data_dir={char_data}'
    # the uninterrupted run: the same script and launch path, outside SLURM
    ref = str(tmp_path / 'reference')
    r = subprocess.run(['bash', os.path.join(REPO, 'slurm_train.sh'), *ARGS, data, f'--out_dir={ref}'],
                       cwd=REPO, env=dict(cluster, NPROC='2'), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "status 'finished'" in r.stdout

    out = str(tmp_path / 'chained')
    job_log = str(tmp_path / 'job.out')
    job = slurm(cluster, 'sbatch', '--parsable', '--gpus-per-node=0', '--cpus-per-task=1', '--time=15',
                f'--output={job_log}', os.path.join(REPO, 'slurm_train.sh'), *ARGS, data, f'--out_dir={out}',
                NPROC='2').strip()

    def text():
        return open(job_log).read() if os.path.exists(job_log) else '(no job log yet)'

    def info():  # for failure messages
        return text() + daemon_logs(cluster)

    def state():
        return job_fields(cluster, job)

    wait_for('training to reach step 10', lambda: max(train_steps(out), default=0) >= 10 or
             state()['JobState'] not in ('PENDING', 'RUNNING'), 180, info)
    assert state()['JobState'] == 'RUNNING', info()
    slurm(cluster, 'scancel', '--signal=USR1', '--batch', job)   # what --signal=B:USR1@300 sends

    # the job saves, requeues itself and waits (Reason=BeginTime); skip SLURM's requeue delay
    wait_for('the requeue', lambda: state()['Restarts'] == '1' and state()['JobState'] == 'PENDING'
             or state()['JobState'] in ('COMPLETED', 'FAILED', 'CANCELLED'), 120, info)
    assert state()['JobState'] == 'PENDING', info()
    with open(os.path.join(out, 'status.json')) as f:
        interrupted = json.load(f)
    assert interrupted['status'] == 'interrupted' and 0 < interrupted['step'] < 120, interrupted
    # slurmd refuses a relaunch whose credential dates from the second the old one was revoked
    # ("Job credential revoked"): let that second pass before making the job eligible at once
    time.sleep(2)
    slurm(cluster, 'scontrol', 'update', f'JobId={job}', 'StartTime=now')

    final = wait_for('the job to end', lambda: state()['JobState'] if state()['JobState'] not in
                     ('PENDING', 'RUNNING', 'CONFIGURING', 'COMPLETING') else None, 240, info)
    fields, log = state(), text()
    assert final == 'COMPLETED' and fields['ExitCode'] == '0:0', info()
    assert fields['Restarts'] == '1', fields
    assert f'requeueing job {job}' in log and 'SIGUSR1 passed to the training processes' in log
    assert '(restart 1)' in log and f"starting at step {interrupted['step']}" in log  # resumed from ckpt
    assert "status 'finished'" in log
    with open(os.path.join(out, 'log.jsonl')) as f:
        starts = [r['step'] for r in map(json.loads, f) if r.get('event') == 'start']
    assert starts == [0, interrupted['step']]
    with open(os.path.join(out, 'slurm_jobs.txt')) as f:
        assert [re.search(r'restart=(\d)', ln).group(1) for ln in f] == ['0', '1']

    a, b = read_checkpoint(ref), read_checkpoint(out)
    assert a['step'] == b['step'] == 120 and len(b['rng']) == 2  # 2 processes each time
    for name, w in a['model'].items():
        assert torch.equal(b['model'][name], w), f"{name} differs from the uninterrupted run"
    assert losses(out) == losses(ref)


def test_array_matrix(cluster, tmp_path):
    """sbatch --array=0-11: every task gets its own (schedule, masking) and readable out_dir."""
    n = len(SCHEDULES) * 2
    logs = str(tmp_path / 'task-%a.out')
    job = slurm(cluster, 'sbatch', '--parsable', f'--array=0-{n - 1}', '--gpus-per-node=0', '--cpus-per-task=1',
                '--time=5', f'--output={logs}', '--export=ALL,DRY_RUN=1',
                os.path.join(REPO, 'slurm_train.sh'), '--max_iters=10').strip()
    paths = [logs.replace('%a', str(i)) for i in range(n)]

    def done():
        return all(os.path.exists(p) and 'command:' in open(p).read() for p in paths)
    wait_for(f'array job {job}', lambda: done() or not slurm(cluster, 'squeue', '-h', '-j', job).strip(), 180)
    seen = set()
    for i, p in enumerate(paths):
        with open(p) as f:
            text = f.read()
        out_dir = re.search(r'^out_dir=(.*)$', text, re.M)
        assert out_dir, f"task {i}: {text[-2000:]}"
        schedule, masking = list(SCHEDULES)[i // 2], ('uniform', 'entropy')[i % 2]
        assert out_dir.group(1) == f'out/diffusion-shakespeare_char-{schedule}-{masking}'
        assert f'--schedule={schedule} --masking={masking}' in text
        seen.add(out_dir.group(1))
    assert len(seen) == n
