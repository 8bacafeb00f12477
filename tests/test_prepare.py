"""prepare.py (issue 4): the GPT-2 BPE path (FineWeb-Edu, TinyStories, WikiText-2, Shakespeare)
on local files through the `datasets` loaders, exact tokens, resume after a crash and after a
signal, one-line errors, and the per-token-id entropy array from a tiny reference GPT. Then its
faults: text that is not UTF-8, empty and too short texts, failed runs that left folders behind
or lost a prepared dataset, settings checked at parse time, and nanoGPT's char split.

Offline (no GPT-2 BPE files cached), the tests that need them skip, saying so.
About 60 s on 2 busy cores: python -m pytest -q tests/test_prepare.py"""
import contextlib
import io
import itertools
import json
import os
import random
import re
import subprocess
import sys
import traceback

import numpy as np
import pytest

import runtime as R
import prepare as P
from conftest import REPO, SHAKESPEARE, SHARED, TINY, run_script

EXPECTED_FILES = {'val': [500, 200], 'train': [500] * 12}   # --val_tokens=700 --max_tokens=6000 --shard_size=500
FINEWEB_ARGS = ['--dataset=fineweb_edu', '--shard_size=500', '--val_tokens=700', '--max_tokens=6000', '--num_proc=2']


@pytest.fixture(scope='module')
def enc():
    """tiktoken's GPT-2 BPE: the one thing these tests may need the network for (when no cache
    has it, e.g. ../shared/tiktoken_cache). Offline the tests that use it skip, told so at once
    by the error prepare.py reports (a failed name lookup), not by waiting out a timeout."""
    try:
        return P.gpt2_encoding()
    except R.UserError as e:
        pytest.skip(f"offline: GPT-2 BPE files unavailable ({e})")


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
    shards = [f for e in meta['splits'].values() for f in e['shards']]
    assert sorted(os.listdir(os.path.join(root, 'fineweb_edu'))) == sorted(shards + ['meta.json'])  # no partial/
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
    x = R.TokenData(root, 'fineweb_edu', 'train').batch(4, 65, R.rng(0))
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
    assert os.listdir(out) == ['partial']                                        # nothing a loader reads
    names = sorted(os.listdir(out / 'partial'))
    assert 'progress.json' in names and 'train_000002.bin.tmp' in names
    assert [n for n in names if n.endswith('.bin')] == ['train_000000.bin', 'train_000001.bin',
                                                        'val_000000.bin', 'val_000001.bin']
    with pytest.raises(R.UserError, match='no data at'):
        R.load_meta(str(tmp_path), 'fineweb_edu')

    r = run_interrupted(tmp_path, args, at=4, mode='term')  # shards 5..8 of the run, 8 unrecorded
    assert r.returncode == R.EXIT_RESUMABLE, r.stderr[-2000:]
    assert 'resuming after 4 complete shards' in r.stdout
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: interrupted; 7 complete shards'), r.stderr[-2000:]
    assert len([n for n in os.listdir(out / 'partial') if n.endswith('.bin')]) == 8   # kept (the 8th unrecorded)

    P.main(args + ['--num_proc=1'])  # the worker count is not part of the output
    assert 'resuming after 7 complete shards' in capsys.readouterr().out
    assert shard_bytes(tmp_path, 'fineweb_edu') == shard_bytes(fineweb[0], 'fineweb_edu')
    meta = json.load(open(out / 'meta.json'))
    assert meta['splits'] == json.load(open(os.path.join(fineweb[0], 'fineweb_edu', 'meta.json')))['splits']
    assert not (out / 'partial').exists()
    P.main(args)  # complete: nothing to do
    assert 'already prepared' in capsys.readouterr().out


def test_resume_refuses_other_settings_and_bad_shards(fineweb, doc_files, tmp_path):
    args = [a for a in FINEWEB_ARGS if not a.startswith('--num_proc')] + [
        '--num_proc=1', f"--input={doc_files['parquet']}", f'--data_dir={tmp_path}']
    # an unfinished run with other settings is not silently mixed with this one
    os.makedirs(tmp_path / 'fineweb_edu' / 'partial')
    shard = {'split': 'val', 'file': 'val_000000.bin', 'tokens': 1, 'stream': 0, 'next': [0, 1]}
    (tmp_path / 'fineweb_edu' / 'partial' / 'progress.json').write_text(
        json.dumps({'build': {'shard_size': 1}, 'shards': [shard]}))
    with pytest.raises(R.UserError, match='other settings.*--resume=false'):
        P.main(args)
    P.main(args + ['--resume=false'])
    assert shard_bytes(tmp_path, 'fineweb_edu') == shard_bytes(fineweb[0], 'fineweb_edu')  # 1 process = 2
    # a .bin whose size does not match meta.json: one line from prepare.py and from the loader
    shard = tmp_path / 'fineweb_edu' / 'train_000003.bin'
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(R.UserError, match='train_000003.bin holds 499 tokens but meta.json says 500'):
        P.main(args)
    with pytest.raises(R.UserError, match='train_000003.bin holds 499 tokens but meta.json says 500'):
        R.TokenData(str(tmp_path), 'fineweb_edu', 'train')


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
    with pytest.raises(R.UserError, match='must be one of .*fineweb_edu') as e:
        P.main(['--dataset=fineweb'])
    assert e.value.code == 2
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    with pytest.raises(R.UserError, match='HF_HUB_OFFLINE is set; pass a local copy with --input'):
        P.main(['--dataset=fineweb_edu', f'--data_dir={tmp_path}', '--num_proc=1'])
    monkeypatch.delenv('HF_HUB_OFFLINE')
    monkeypatch.setenv('HF_ENDPOINT', 'http://127.0.0.1:9')  # nothing listens there: refused at once
    with pytest.raises(R.UserError, match='cannot reach 127.0.0.1 .*--input=PATH'):
        P.main(['--dataset=tinystories', f'--data_dir={tmp_path}', '--num_proc=1'])
    with pytest.raises(R.UserError, match='no such file or folder'):
        P.main(['--dataset=fineweb_edu', f'--input={tmp_path}/missing.parquet', f'--data_dir={tmp_path}'])
    assert os.listdir(tmp_path) == []  # the failed runs left nothing behind


def test_one_line_errors_reading_rows(enc, tmp_path):
    """Found while reading, so after the GPT-2 BPE files are loaded: needs them (skips offline)."""
    (tmp_path / 'rows.jsonl').write_text('{"content": "hello"}\n')
    with pytest.raises(R.UserError, match="no text column 'text' .*content.*--text_field"):
        P.main(['--dataset=fineweb_edu', f'--input={tmp_path}/rows.jsonl', f'--data_dir={tmp_path}', '--num_proc=1'])
    assert os.listdir(tmp_path) == ['rows.jsonl']


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
    meta = R.load_meta(root, 'shakespeare_char')
    V = meta['vocab_size']
    ent = R.load_entropy(os.path.join(root, 'shakespeare_char', 'entropy.npy'), V)   # the trainer's own check
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
    with pytest.raises(R.UserError, match='vocabularies must match'):
        P.main(['--entropy', f'--ref={ref}', '--dataset=fineweb_edu', f'--data_dir={fineweb[0]}', '--device=cpu'])
    with pytest.raises(R.UserError, match='transformers|no local weights'):
        P.main(['--entropy', '--ref=hf:gpt2-not-here', '--dataset=fineweb_edu', f'--data_dir={fineweb[0]}',
                '--device=cpu'])
    with pytest.raises(R.UserError, match='needs --ref'):
        P.main(['--entropy', '--dataset=shakespeare_char', f'--data_dir={root}'])
    np.save(tmp_path / 'short.npy', np.ones(5))
    with pytest.raises(R.UserError, match=r'expected \(11,\)'):
        R.load_entropy(str(tmp_path / 'short.npy'), 11)


# ---------------------------------------------------------------- faults: one-line errors, nothing lost
def cli(*args):
    """`python prepare.py ARGS`, run in this process: (exit code, stdout, stderr). An exception
    that escapes run_cli is what the script would print as a traceback, so it goes to stderr as one."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            P.run_cli(lambda: P.main(list(args)))
            code = 0
        except SystemExit as e:
            code = e.code
        except BaseException:
            traceback.print_exc()
            code = 1
    return code, out.getvalue(), err.getvalue()


def assert_one_line_error(result, match, code=1):
    rc, _, err = result
    lines = err.strip().splitlines()
    assert rc == code and 'Traceback' not in err and len(lines) == 1, (rc, err)
    assert lines[0].startswith('error: ') and re.search(match, lines[0]), lines[0]


def text_of(n, seed=0):
    """n characters of deterministic text (one of them not ASCII)."""
    return ''.join(random.Random(seed).choices('abcdefghij klmnopé\n', k=n))


def tree(root):
    """{path under root: bytes} of every file under root, and None for every folder."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            found[os.path.relpath(path, root)] = None if name in dirs else open(path, 'rb').read()
    return found


LATIN1 = 'Once upon a time in the café, a naïve cat sat.\n'.encode('latin-1') * 50   # 0xe9 at offset 27


def test_char_split_is_nanogpts(tmp_path):
    """n_train = int(n * (1 - val_fraction)): nanoGPT's int(n * 0.9) on Tiny Shakespeare's
    length, 1,115,394 characters -> 1,003,854 / 111,540 (not 1,003,855 / 111,539)."""
    n = 1_115_394
    text = text_of(n)
    (tmp_path / 'input.txt').write_text(text, encoding='utf-8')
    code, out, err = cli(f"--input={tmp_path / 'input.txt'}", f'--data_dir={tmp_path}')
    assert code == 0, err
    meta = json.load(open(tmp_path / 'shakespeare_char' / 'meta.json'))
    assert (meta['splits']['train']['tokens'], meta['splits']['val']['tokens']) == ([int(n * 0.9)], [111_540])
    assert int(n * 0.9) == 1_003_854 and 'train 1,003,854 tokens, val 111,540 tokens' in out
    train, val = (np.fromfile(tmp_path / 'shakespeare_char' / f'{s}.bin', dtype=np.uint16) for s in ('train', 'val'))
    assert ''.join(np.array(list(meta['chars']))[np.concatenate([train, val])]) == text
    assert sorted(os.listdir(tmp_path / 'shakespeare_char')) == ['meta.json', 'train.bin', 'val.bin']
    code, _, err = cli(f"--input={tmp_path / 'input.txt'}", f'--data_dir={tmp_path}', '--val_fraction=0.25')
    meta = json.load(open(tmp_path / 'shakespeare_char' / 'meta.json'))
    assert code == 0 and meta['splits']['val']['tokens'] == [n - int(n * 0.75)], err


def test_text_that_is_not_utf8_is_one_line_error(tmp_path):
    """Latin-1 and binary files: the file, the byte and its offset, in one line; nothing written."""
    (tmp_path / 'latin1.txt').write_bytes(LATIN1)
    (tmp_path / 'image.png').write_bytes(b'\x89PNG\r\n\x1a\n' + bytes(range(256)) * 4)
    (tmp_path / 'zeros.bin').write_bytes(b'ab' + bytes(100))       # valid UTF-8, but binary
    data = tmp_path / 'data'
    assert_one_line_error(cli(f"--input={tmp_path / 'latin1.txt'}", f'--data_dir={data}'),
                          r'latin1\.txt is not UTF-8 text \(byte 0xe9 at offset 27\)')
    assert_one_line_error(cli(f"--input={tmp_path / 'image.png'}", f'--data_dir={data}'),
                          r'image\.png is not UTF-8 text \(byte 0x89 at offset 0\)')
    assert_one_line_error(cli(f"--input={tmp_path / 'zeros.bin'}", f'--data_dir={data}'),
                          r'zeros\.bin is binary, not text \(a NUL byte at offset 2\)')
    # the script itself: exit 1, one line, no traceback
    r = run_script('prepare.py', f"--input={tmp_path / 'latin1.txt'}", f'--data_dir={data}', check=False)
    assert_one_line_error((r.returncode, r.stdout, r.stderr), r'is not UTF-8 text \(byte 0xe9 at offset 27\)')
    assert not data.exists()


def test_empty_and_too_short_texts_are_refused(tmp_path):
    """An empty text gave a 0-token, vocabulary-0 dataset (a bare AssertionError later); each
    split must get MIN_SPLIT_TOKENS = 8 tokens: 70 characters give val 7 (refused), 80 give 8."""
    data = tmp_path / 'data'
    (tmp_path / 'empty.txt').write_text('')
    for dataset in ('shakespeare_char', 'shakespeare'):   # the BPE one is refused before any tokeniser
        assert_one_line_error(cli(f'--dataset={dataset}', f"--input={tmp_path / 'empty.txt'}", f'--data_dir={data}'),
                              r'empty\.txt is empty: nothing to prepare')
    (tmp_path / 'short.txt').write_text(text_of(70))
    assert_one_line_error(cli(f"--input={tmp_path / 'short.txt'}", f'--data_dir={data}'),
                          r'short\.txt has 70 characters: too few .* at least 8 .*train 63, val 7')
    assert not data.exists()
    (tmp_path / 'enough.txt').write_text(text_of(80))
    assert cli(f"--input={tmp_path / 'enough.txt'}", f'--data_dir={data}')[0] == 0
    assert [R.TokenData(str(data), 'shakespeare_char', s).sizes for s in ('train', 'val')] == [[72], [8]]


def test_failed_runs_leave_nothing_behind(tmp_path, monkeypatch):
    """No network (refused at once: 127.0.0.1:9), or a download that is not text: the folders
    the run created and the files it added are gone; folders that were there stay."""
    monkeypatch.setattr(P, 'SHARED_SHAKESPEARE', str(tmp_path / 'no-shared-copy.txt'))
    monkeypatch.setattr(P, 'SHAKESPEARE_URL', 'http://127.0.0.1:9/input.txt')
    monkeypatch.setenv('HF_ENDPOINT', 'http://127.0.0.1:9')
    for var in ('HF_HUB_OFFLINE', 'HF_DATASETS_OFFLINE'):
        monkeypatch.delenv(var, raising=False)
    data = tmp_path / 'new' / 'data'
    for dataset, match in (('shakespeare_char', r'cannot download http://127\.0\.0\.1:9/input\.txt .*--input=PATH'),
                           ('shakespeare', 'cannot download'),
                           ('fineweb_edu', r'cannot reach 127\.0\.0\.1 .*--input=PATH'),
                           ('tinystories', 'cannot reach 127.0.0.1')):
        assert_one_line_error(cli(f'--dataset={dataset}', f'--data_dir={data}', '--num_proc=1'), match)
        assert os.listdir(tmp_path) == [], dataset
    # downloaded, then refused: the download goes too
    monkeypatch.setattr(P, 'download', lambda url, path: open(path, 'wb').write(LATIN1))
    assert_one_line_error(cli(f'--data_dir={data}'), r'tinyshakespeare\.txt is not UTF-8 text')
    assert os.listdir(tmp_path) == []
    # folders that were there before stay, empty as they were
    (tmp_path / 'pre' / 'shakespeare_char').mkdir(parents=True)
    assert_one_line_error(cli(f"--data_dir={tmp_path / 'pre'}"), 'not UTF-8')
    assert tree(tmp_path) == {'pre': None, os.path.join('pre', 'shakespeare_char'): None}


def test_failed_reprepare_keeps_the_prepared_dataset(tmp_path, monkeypatch):
    """A good dataset, then re-prepares that fail (bad text, bad settings, a full disk while
    writing the new one): the good dataset's files stay byte-identical; a good re-prepare
    replaces it."""
    data = tmp_path / 'data'
    for name, text in (('good.txt', text_of(5000)), ('other.txt', text_of(3000, seed=1))):
        (tmp_path / name).write_text(text, encoding='utf-8')
    (tmp_path / 'latin1.txt').write_bytes(LATIN1)
    (tmp_path / 'empty.txt').write_text('')
    (tmp_path / 'short.txt').write_text('too short')
    assert cli(f"--input={tmp_path / 'good.txt'}", f'--data_dir={data}')[0] == 0
    before = tree(data)
    assert sorted(before) == ['shakespeare_char'] + [os.path.join('shakespeare_char', f)
                                                     for f in ('meta.json', 'train.bin', 'val.bin')]
    for args, match in (([f"--input={tmp_path / 'latin1.txt'}"], 'not UTF-8'),
                        ([f"--input={tmp_path / 'empty.txt'}"], 'is empty'),
                        ([f"--input={tmp_path / 'short.txt'}"], 'too few'),
                        ([f"--input={tmp_path / 'other.txt'}", '--val_fraction=1.5'], 'strictly between 0 and 1')):
        rc, out, err = cli(*args, f'--data_dir={data}')
        assert_one_line_error((rc, out, err), match, code=2 if 'val_fraction' in args[-1] else 1)
        assert tree(data) == before, args
    write_tokens = P.write_tokens

    def full_disk(path, arr):
        if path.endswith('val.bin'):
            raise OSError(28, 'No space left on device')
        write_tokens(path, arr)
    monkeypatch.setattr(P, 'write_tokens', full_disk)
    assert_one_line_error(cli(f"--input={tmp_path / 'other.txt'}", f'--data_dir={data}'),
                          r'writing .*partial failed \(OSError: .*No space left on device\)')
    assert tree(data) == before
    monkeypatch.setattr(P, 'write_tokens', write_tokens)
    assert cli(f"--input={tmp_path / 'other.txt'}", f'--data_dir={data}')[0] == 0
    after = tree(data)
    assert sorted(after) == sorted(before) and after != before
    assert sum(R.TokenData(str(data), 'shakespeare_char', 'train').sizes) == int(3000 * 0.9)


def test_failed_bpe_reprepare_keeps_the_prepared_dataset(enc, tmp_path, monkeypatch):
    """The GPT-2 path: a re-prepare that fails halfway through its source (a Latin-1 file after
    good ones, shards of the new build already written) leaves the prepared dataset byte-
    identical and no build folder; other unreadable sources fail in one line, leaving nothing."""
    stories = [f"Once upon a time there was a {w}. It was happy.\n" for w in ('cat', 'dog', 'fox', 'owl') * 5]
    data = tmp_path / 'data'
    args = ['--dataset=tinystories', '--num_proc=1', '--shard_size=50', f'--data_dir={data}']
    v1, v2 = tmp_path / 'v1', tmp_path / 'v2'
    v1.mkdir()
    v2.mkdir()
    (v1 / 'train.txt').write_text('<|endoftext|>\n'.join(stories))
    (v1 / 'valid.txt').write_text('<|endoftext|>\n'.join(stories[:4]))
    assert cli(*args, f'--input={v1}')[0] == 0
    before = tree(data)
    (v2 / 'a-train.txt').write_text('<|endoftext|>\n'.join(stories[::-1]))
    (v2 / 'b-train.txt').write_bytes(LATIN1)
    (v2 / 'valid.txt').write_text('<|endoftext|>\n'.join(stories[4:8]))
    monkeypatch.setattr(P, 'TASK_DOCS', 2)            # small tasks: shards are written before b-train.txt is read
    written, write_tokens = [], P.write_tokens
    monkeypatch.setattr(P, 'write_tokens', lambda path, arr: (written.append(path), write_tokens(path, arr)))
    assert_one_line_error(cli(*args, f'--input={v2}'), r'b-train\.txt is not UTF-8 text \(byte 0xe9 at offset 27\)')
    assert len(written) > 3 and all(os.sep + 'partial' + os.sep in w for w in written)
    assert tree(data) == before
    # other sources, into a data_dir of their own: one line each, nothing left
    (tmp_path / 'latin1.jsonl').write_bytes(b'{"text": "caf\xe9"}\n')
    (tmp_path / 'empty.jsonl').write_text('')
    (tmp_path / 'not.parquet').write_bytes(LATIN1)
    (tmp_path / 'short.txt').write_text('Too short.')
    fresh = tmp_path / 'fresh'
    for dataset, name, match in (
            ('fineweb_edu', 'latin1.jsonl', r'latin1\.jsonl is not UTF-8 text \(byte 0xe9 at offset 13\)'),
            ('fineweb_edu', 'empty.jsonl', r'empty\.jsonl is empty'),
            ('fineweb_edu', 'not.parquet', r'cannot read .*not\.parquet \(ArrowInvalid: .*parquet'),
            ('shakespeare', 'short.txt', r'ended after \d+ tokens: too few for the val split')):
        assert_one_line_error(cli(f'--dataset={dataset}', f'--input={tmp_path / name}', f'--data_dir={fresh}',
                                  '--num_proc=1'), match)
        assert not fresh.exists(), name



def test_a_dropped_connection_keeps_only_shards_to_continue_from(fineweb, doc_files, tmp_path, monkeypatch):
    """A reading error is resumable (exit 75): the build folder stays when it holds complete
    shards, and the rerun continues to the uninterrupted run's bytes; with no shard yet written,
    nothing stays."""
    data = tmp_path / 'data'
    args = [a for a in FINEWEB_ARGS if not a.startswith('--num_proc')] + [
        '--num_proc=1', f"--input={doc_files['parquet']}", f'--data_dir={data}']
    read_docs = P.read_docs

    def dropping(n):
        def read(spec, split, files, field_name):
            yield from itertools.islice(read_docs(spec, split, files, field_name), n)
            raise ConnectionError('Connection reset by peer')
        return read
    monkeypatch.setattr(P, 'TASK_DOCS', 8)
    monkeypatch.setattr(P, 'read_docs', dropping(0))
    assert_one_line_error(cli(*args), r'reading train failed \(ConnectionError: Connection reset by peer\); rerun '
                          'the same command to continue', code=R.EXIT_RESUMABLE)
    assert not data.exists()
    monkeypatch.setattr(P, 'read_docs', dropping(60))
    assert_one_line_error(cli(*args), 'reading train failed', code=R.EXIT_RESUMABLE)
    kept = sorted(os.listdir(data / 'fineweb_edu' / 'partial'))
    assert os.listdir(data / 'fineweb_edu') == ['partial'] and 'progress.json' in kept and len(kept) > 3, kept
    assert not [n for n in kept if 'tmp' in n]
    monkeypatch.setattr(P, 'read_docs', read_docs)
    code, out, err = cli(*args)
    assert code == 0 and f'resuming after {len(kept) - 1} complete shards' in out, err
    assert shard_bytes(data, 'fineweb_edu') == shard_bytes(fineweb[0], 'fineweb_edu')
    assert not (data / 'fineweb_edu' / 'partial').exists()


BAD_SETTINGS = [  # (arguments, what the one line says); {tmp} is the test's folder
    (['--val_fraction=0'], 'strictly between 0 and 1'), (['--val_fraction=1'], 'strictly between 0 and 1'),
    (['--val_fraction=-0.1'], 'strictly between'), (['--val_fraction=nan'], 'strictly between'),
    (['--val_fraction=half'], 'expected float'),
    (['--max_tokens=0'], 'positive'), (['--max_tokens=-5'], 'positive'), (['--max_tokens=1.5'], 'expected int'),
    (['--val_tokens=0'], 'or -1'), (['--val_tokens=-2'], 'or -1'),
    (['--shard_size=0'], 'between 1 and'), (['--shard_size=1e30'], 'between 1 and'),
    (['--num_proc=-1'], 'number of processes'),
    (['--text_field='], 'must name a column'), (['--data_dir='], 'must name a folder'),
    (['--data_dir={tmp}/a_file'], 'is a file, not a folder'),
    (['--data_dir={tmp}', '--dataset=shakespeare'], 'is a file, not a dataset folder'),
    (['--entropy_tokens=-1'], 'number of tokens'), (['--batch_size=0'], 'positive number of windows'),
    (['--device=gpu'], 'auto, cpu, cuda'), (['--device=cuda:x'], 'auto, cpu, cuda'),
    (['--entropy'], 'needs --ref'), (['--entropy', '--ref=out/x', '--batch_size=-1'], 'positive'),
    (['--input={tmp}/missing.txt'], 'no such file or folder'),
    (['--input={tmp}', '--dataset=shakespeare'], 'is a folder; --dataset=shakespeare reads one text file'),
    (['--dataset=fineweb'], 'must be one of'), (['--resume=maybe'], 'expected bool'),
    (['--max_token=5'], 'unknown setting'), (['max_tokens=5'], 'unexpected argument'),
]


@pytest.mark.parametrize('args,match', BAD_SETTINGS, ids=[' '.join(a) for a, _ in BAD_SETTINGS])
def test_bad_settings_fail_at_parse_time_in_one_line(args, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # were a setting let through, nothing lands in the repo
    (tmp_path / 'a_file').write_text('x')
    (tmp_path / 'shakespeare').write_text('x')
    rc, out, err = cli(f'--data_dir={tmp_path}/data', *(a.format(tmp=tmp_path) for a in args))
    assert rc != 0 and 'Traceback' not in err and len(err.strip().splitlines()) <= 2, (rc, err)
    assert rc == 2 and re.search(match, err), err
    assert sorted(os.listdir(tmp_path)) == ['a_file', 'shakespeare']  # nothing read, nothing written


def test_bad_settings_through_the_script(tmp_path):
    for args in (['--val_fraction=1'], ['--shard_size=0', '--dataset=fineweb_edu'], ['--num_proc=-2']):
        r = run_script('prepare.py', f'--data_dir={tmp_path}/data', *args, check=False)
        assert r.returncode == 2 and 'Traceback' not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert os.listdir(tmp_path) == []
