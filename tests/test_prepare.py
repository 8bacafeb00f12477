"""prepare.py (issue 4): the GPT-2 BPE path (FineWeb-Edu, TinyStories, WikiText-2, Shakespeare)
on local files through the `datasets` loaders, exact tokens, resume after a crash and after a
signal, one-line errors, and the per-token-id entropy array from a tiny reference GPT.

About 60 s on 2 busy cores: python -m pytest -q tests/test_prepare.py"""
import contextlib
import io
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

import diffusion as D
import prepare as P
from conftest import REPO, SHAKESPEARE, SHARED, TINY, run_script

EXPECTED_FILES = {'val': [500, 200], 'train': [500] * 12}   # --val_tokens=700 --max_tokens=6000 --shard_size=500
FINEWEB_ARGS = ['--dataset=fineweb_edu', '--shard_size=500', '--val_tokens=700', '--max_tokens=6000', '--num_proc=2']


@pytest.fixture(scope='module')
def enc():
    try:
        return P.gpt2_encoding()
    except D.UserError as e:
        pytest.skip(f"GPT-2 BPE files unavailable offline: {e}")


def make_docs(n=150):
    """Documents with what tokenisers trip on: unicode, emoji, newlines, runs of spaces, an
    empty document and the literal text '<|endoftext|>' (which must stay ordinary text)."""
    rnd = random.Random(0)
    words = ['the', 'river', 'Éire', 'naïve', '東京', '🙂', 'data', '1984', '-', '\n', '\n\n', '  ', "can't",
             'tab\there', 'Straße', 'x' * 30, '.', ',']
    docs = [' '.join(rnd.choice(words) for _ in range(rnd.randint(1, 80))) for _ in range(n)]
    docs[3] = ''
    docs[7] = 'a literal <|endoftext|> inside a document is ordinary text'
    return docs


def reference_stream(enc, docs):
    """EOT doc0 EOT doc1 ...: what prepare.py must write, computed with tiktoken directly."""
    return np.array([t for d in docs for t in [enc.eot_token] + enc.encode_ordinary(d)], dtype=np.uint16)


def read_split(root, name, split):
    meta = json.load(open(os.path.join(root, name, 'meta.json')))
    return np.concatenate([np.fromfile(os.path.join(root, name, f), dtype=np.uint16)
                           for f in meta['splits'][split]['shards']])


def shard_bytes(root, name):
    folder = os.path.join(root, name)
    return {f: open(os.path.join(folder, f), 'rb').read() for f in sorted(os.listdir(folder)) if f.endswith('.bin')}


@pytest.fixture(scope='module')
def doc_files(tmp_path_factory):
    """The same documents as parquet and as jsonl (with an extra column the loader must ignore)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    root = tmp_path_factory.mktemp('docs')
    docs = make_docs()
    pq.write_table(pa.table({'id': list(range(len(docs))), 'text': docs}), str(root / 'docs.parquet'))
    with open(root / 'docs.jsonl', 'w') as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({'id': i, 'text': d}) + '\n')
    return {'docs': docs, 'parquet': str(root / 'docs.parquet'), 'jsonl': str(root / 'docs.jsonl')}


@pytest.fixture(scope='module')
def fineweb(doc_files, enc, tmp_path_factory):
    """An uninterrupted FineWeb-path run on the parquet file, 2 worker processes."""
    root = str(tmp_path_factory.mktemp('fineweb'))
    r = run_script('prepare.py', *FINEWEB_ARGS, f"--input={doc_files['parquet']}", f'--data_dir={root}')
    return root, r.stdout


def test_fineweb_shards_decode_to_the_documents(fineweb, doc_files, enc):
    root, stdout = fineweb
    meta = json.load(open(os.path.join(root, 'fineweb_edu', 'meta.json')))
    assert (meta['tokenizer'], meta['vocab_size'], meta['eot_id'], meta['dtype']) == ('gpt2', 50257, 50256, 'uint16')
    assert {s: e['tokens'] for s, e in meta['splits'].items()} == EXPECTED_FILES
    assert meta['tokens'] == 6700 and 'tokens/s' in stdout and 'ETA' in stdout
    assert not os.path.exists(os.path.join(root, 'fineweb_edu', 'progress.json'))
    # val is the head of the stream, train the 6000 tokens after it; the rest is never read
    stream = np.concatenate([read_split(root, 'fineweb_edu', 'val'), read_split(root, 'fineweb_edu', 'train')])
    ref = reference_stream(enc, doc_files['docs'])
    assert len(ref) > 6700 and np.array_equal(stream, ref[:6700])
    # decoding: EOT before every document, each complete document comes back exactly
    cuts = np.flatnonzero(stream == enc.eot_token)
    assert cuts[0] == 0
    complete = [enc.decode(stream[a + 1:b].tolist()) for a, b in zip(cuts[:-1], cuts[1:])]
    assert complete == doc_files['docs'][:len(complete)] and len(complete) > 20
    assert '<|endoftext|>' in complete[7]
    # the loader reads it like any other dataset
    x = D.TokenData(root, 'fineweb_edu', 'train').batch(4, 65, D.rng(0))
    assert x.shape == (4, 65) and int(x.max()) < 50257


CRASH = r'''
import os, signal, sys
sys.path.insert(0, {repo!r})
import prepare
prepare.TASK_DOCS = 8                              # many small worker tasks in flight: order must hold
orig, calls = prepare.write_tokens, [0]
def write_tokens(path, arr):
    calls[0] += 1
    if calls[0] == {at} and {mode!r} == 'kill':    # half a shard on disk, then die as if SIGKILLed
        with open(path + '.tmp', 'wb') as f:
            arr[:len(arr) // 2].tofile(f)
        os._exit(9)
    orig(path, arr)
    if calls[0] == {at}:                           # a complete shard not yet recorded, then SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)
prepare.write_tokens = write_tokens
sys.argv = ['prepare.py'] + {args!r}
prepare.run_cli(prepare.main)
'''


def run_interrupted(tmp_path, args, at, mode):
    script = tmp_path / f'interrupt_{mode}.py'
    script.write_text(CRASH.format(repo=REPO, at=at, mode=mode, args=list(args)))
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    return subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                          timeout=300)


def test_interrupted_runs_resume_to_identical_shards(fineweb, doc_files, tmp_path, capsys):
    """Killed while writing shard 5 (jsonl input this time), resumed and stopped by SIGTERM
    after shard 8, resumed again: the same bytes as the uninterrupted parquet run (which had
    all documents in one worker task; these runs have 8 per task, 2 workers)."""
    args = FINEWEB_ARGS + [f"--input={doc_files['jsonl']}", f'--data_dir={tmp_path}']
    out = tmp_path / 'fineweb_edu'
    r = run_interrupted(tmp_path, args, at=5, mode='kill')
    assert r.returncode == 9, r.stderr[-2000:]
    names = sorted(os.listdir(out))
    assert 'meta.json' not in names and 'train_000002.bin.tmp' in names          # nothing a loader reads
    assert [n for n in names if n.endswith('.bin')] == ['train_000000.bin', 'train_000001.bin',
                                                        'val_000000.bin', 'val_000001.bin']
    with pytest.raises(D.UserError, match='no data at'):
        D.load_meta(str(tmp_path), 'fineweb_edu')

    r = run_interrupted(tmp_path, args, at=4, mode='term')  # shards 5..8 of the run, 8 unrecorded
    assert r.returncode == D.EXIT_RESUMABLE, r.stderr[-2000:]
    assert 'resuming after 4 complete shards' in r.stdout
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: interrupted; 7 complete shards'), r.stderr[-2000:]

    P.main(args + ['--num_proc=1'])  # the worker count is not part of the output
    assert 'resuming after 7 complete shards' in capsys.readouterr().out
    assert shard_bytes(tmp_path, 'fineweb_edu') == shard_bytes(fineweb[0], 'fineweb_edu')
    meta = json.load(open(out / 'meta.json'))
    assert meta['splits'] == json.load(open(os.path.join(fineweb[0], 'fineweb_edu', 'meta.json')))['splits']
    P.main(args)  # complete: nothing to do
    assert 'already prepared' in capsys.readouterr().out


def test_resume_refuses_other_settings_and_bad_shards(fineweb, doc_files, tmp_path):
    args = [a for a in FINEWEB_ARGS if not a.startswith('--num_proc')] + [
        '--num_proc=1', f"--input={doc_files['parquet']}", f'--data_dir={tmp_path}']
    # an unfinished run with other settings is not silently mixed with this one
    os.makedirs(tmp_path / 'fineweb_edu')
    shard = {'split': 'val', 'file': 'val_000000.bin', 'tokens': 1, 'stream': 0, 'next': [0, 1]}
    (tmp_path / 'fineweb_edu' / 'progress.json').write_text(json.dumps({'build': {'shard_size': 1}, 'shards': [shard]}))
    with pytest.raises(D.UserError, match='other settings.*--resume=false'):
        P.main(args)
    P.main(args + ['--resume=false'])
    assert shard_bytes(tmp_path, 'fineweb_edu') == shard_bytes(fineweb[0], 'fineweb_edu')  # 1 process = 2
    # a .bin whose size does not match meta.json: one line from prepare.py and from the loader
    shard = tmp_path / 'fineweb_edu' / 'train_000003.bin'
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(D.UserError, match='train_000003.bin holds 499 tokens but meta.json says 500'):
        P.main(args)
    with pytest.raises(D.UserError, match='train_000003.bin holds 499 tokens but meta.json says 500'):
        D.TokenData(str(tmp_path), 'fineweb_edu', 'train')


def test_text_files_tinystories_and_shakespeare(enc, tmp_path):
    """A folder with one .txt per split (TinyStories' release: stories between '<|endoftext|>'
    lines) and Shakespeare as one document: the same path, in one process."""
    stories = [f"Once upon a time there was a {w}.\n\nThe end." for w in ('cat', 'dog', 'fox', 'owl', 'bee', 'elk')]
    src = tmp_path / 'src'
    src.mkdir()
    (src / 'TinyStories-train.txt').write_text('\n<|endoftext|>\n'.join(stories[:4]) + '\n<|endoftext|>\n')
    (src / 'TinyStories-valid.txt').write_text('\n<|endoftext|>\n'.join(stories[4:]))
    (src / 'README.md').write_text('ignored: named after no split')
    P.main(['--dataset=tinystories', f'--input={src}', f'--data_dir={tmp_path}', '--num_proc=1'])
    assert np.array_equal(read_split(str(tmp_path), 'tinystories', 'train'), reference_stream(enc, stories[:4]))
    assert np.array_equal(read_split(str(tmp_path), 'tinystories', 'val'), reference_stream(enc, stories[4:]))

    text = open(SHAKESPEARE, encoding='utf-8').read()
    P.main(['--dataset=shakespeare', f'--input={SHAKESPEARE}', f'--data_dir={tmp_path}', '--num_proc=1'])
    val, train = read_split(str(tmp_path), 'shakespeare', 'val'), read_split(str(tmp_path), 'shakespeare', 'train')
    assert len(val) == 33_000 and np.array_equal(np.concatenate([val, train]), reference_stream(enc, [text]))


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED, 'data', 'wikitext-2')), reason='no ../shared/data/wikitext-2')
def test_wikitext2_from_the_shared_release(enc, tmp_path):
    folder = os.path.join(SHARED, 'data', 'wikitext-2')
    P.main(['--dataset=wikitext2', f'--input={folder}', f'--data_dir={tmp_path}', '--num_proc=1'])
    meta = json.load(open(tmp_path / 'wikitext2' / 'meta.json'))
    assert sorted(meta['splits']) == ['test', 'val'] and 'tokenised release' in meta['version']
    for split, name in (('test', 'test.txt'), ('val', 'valid.txt')):
        text = open(os.path.join(folder, name), encoding='utf-8').read()
        assert np.array_equal(read_split(str(tmp_path), 'wikitext2', split), reference_stream(enc, [text]))


def test_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(D.UserError, match='must be one of .*fineweb_edu') as e:
        P.main(['--dataset=fineweb'])
    assert e.value.code == 2
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    with pytest.raises(D.UserError, match='HF_HUB_OFFLINE is set; pass a local copy with --input'):
        P.main(['--dataset=fineweb_edu', f'--data_dir={tmp_path}', '--num_proc=1'])
    monkeypatch.delenv('HF_HUB_OFFLINE')
    monkeypatch.setenv('HF_ENDPOINT', 'http://127.0.0.1:9')  # nothing listens there: refused at once
    with pytest.raises(D.UserError, match='cannot reach 127.0.0.1 .*--input=PATH'):
        P.main(['--dataset=tinystories', f'--data_dir={tmp_path}', '--num_proc=1'])
    with pytest.raises(D.UserError, match='no such file or folder'):
        P.main(['--dataset=fineweb_edu', f'--input={tmp_path}/missing.parquet', f'--data_dir={tmp_path}'])


def test_missing_text_column_is_one_line(enc, tmp_path):
    """prepare.py loads the GPT-2 BPE files before it reads the rows: needs them (enc skips offline)."""
    (tmp_path / 'rows.jsonl').write_text('{"content": "hello"}\n')
    with pytest.raises(D.UserError, match="no text column 'text' .*content.*--text_field"):
        P.main(['--dataset=fineweb_edu', f'--input={tmp_path}/rows.jsonl', f'--data_dir={tmp_path}', '--num_proc=1'])


# ---------------------------------------------------------------- entropy array
def entropy_corpus(n_units=12000, seed=0):
    """'!' once, then units 'x' <random digit 0-7> 'y': after 'x' the next character is
    uniform over 8 digits (entropy ln 8 = 2.08 nats); after a digit or 'y' it is certain."""
    rnd = random.Random(seed)
    return '!' + ''.join(f'x{rnd.randrange(8)}y' for _ in range(n_units))


@pytest.fixture(scope='module')
def entropy_run(tmp_path_factory):
    root = tmp_path_factory.mktemp('entropy')
    (root / 'corpus.txt').write_text(entropy_corpus())
    P.main([f"--input={root / 'corpus.txt'}", f'--data_dir={root}'])
    ref = str(root / 'ref')
    run_script('gpt.py', *TINY, f'--data_dir={root}', f'--out_dir={ref}', '--max_iters=80', '--eval_interval=80',
               '--learning_rate=3e-3')
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        P.main(['--entropy', f'--ref={ref}', '--dataset=shakespeare_char', f'--data_dir={root}', '--device=cpu'])
    return str(root), ref, stdout.getvalue()


def test_entropy_array_ranks_random_tokens_above_determined_ones(entropy_run):
    root, ref, stdout = entropy_run
    meta = D.load_meta(root, 'shakespeare_char')
    V = meta['vocab_size']
    ent = D.load_entropy(os.path.join(root, 'shakespeare_char', 'entropy.npy'), V)   # the trainer's own check
    assert ent.shape == (V,) == (11,)
    counts = np.bincount(np.fromfile(os.path.join(root, 'shakespeare_char', 'train.bin'), np.uint16)[1:], minlength=V)
    assert abs((ent * counts).sum() / counts.sum() - 1) < 1e-5      # mean 1 over occurrences
    ids = {ch: meta['chars'].index(ch) for ch in meta['chars']}
    assert ent[ids['!']] == 1.0                                     # never a target: the mean
    digits = np.array([ent[ids[str(d)]] for d in range(8)])
    assert digits.min() > 3 * max(ent[ids['x']], ent[ids['y']]), ent
    assert 'vocabulary coverage: 10 of 11 ids (90.9%)' in stdout
    info = json.load(open(os.path.join(root, 'shakespeare_char', 'entropy.json')))
    assert info['tokens_scored'] == counts.sum()
    assert np.all(np.abs(digits * info['mean_entropy_nats'] - np.log(8)) < 0.3)   # nats: uniform over 8 digits


def test_entropy_windows_cover_every_target_once():
    sizes, block = [10, 5, 1], 4
    windows = P.entropy_windows(sizes, block, cap=0)
    assert all(n <= block + 1 for _, _, n in windows)
    for s, n in enumerate(sizes):
        targets = sorted(t for w, o, k in windows if w == s for t in range(o + 1, o + k))
        assert targets == list(range(1, n))          # each token but the shard's first, once
    capped = P.entropy_windows([1000], block, cap=40)  # 10 full windows spread over the shard
    assert [o for _, o, _ in capped] == [0, 112, 220, 332, 440, 552, 660, 772, 880, 992]


def test_entropy_reference_errors(entropy_run, fineweb, tmp_path):
    root, ref, _ = entropy_run
    with pytest.raises(D.UserError, match='vocabularies must match'):
        P.main(['--entropy', f'--ref={ref}', '--dataset=fineweb_edu', f'--data_dir={fineweb[0]}', '--device=cpu'])
    with pytest.raises(D.UserError, match='transformers|no local weights'):
        P.main(['--entropy', '--ref=hf:gpt2-not-here', '--dataset=fineweb_edu', f'--data_dir={fineweb[0]}',
                '--device=cpu'])
    with pytest.raises(D.UserError, match='needs --ref'):
        P.main(['--entropy', '--dataset=shakespeare_char', f'--data_dir={root}'])
    np.save(tmp_path / 'short.npy', np.ones(5))
    with pytest.raises(D.UserError, match=r'expected \(11,\)'):
        D.load_entropy(str(tmp_path / 'short.npy'), 11)
