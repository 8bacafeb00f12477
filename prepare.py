"""
prepare.py: turn text into the token files diffusion.py and gpt.py train on.

    python prepare.py                                  # Tiny Shakespeare, characters (~2 s)
    python prepare.py --dataset=shakespeare            # Tiny Shakespeare, GPT-2 BPE (~5 s)
    python prepare.py --dataset=fineweb_edu            # first 1e9 GPT-2 tokens of FineWeb-Edu sample-10BT (network)
    python prepare.py --dataset=fineweb_edu --input=docs.parquet --max_tokens=1e6 --shard_size=1e5
    python prepare.py --dataset=wikitext2 --input=../shared/data/wikitext-2   # test + val splits, for evaluation
    python prepare.py --dataset=tinystories
    python prepare.py --entropy --ref=out/gpt-shakespeare_char                  # per-token-id entropy array

Every dataset is written in one format: data/<dataset>/meta.json plus uint16 token files
listed in it per split ("splits": {"train": {"shards": [...], "tokens": [...]}, "val": ...}).
meta.json also says how to decode: "tokenizer" ('char' with "chars", or 'gpt2' with "eot_id"),
"vocab_size" (real tokens; MASK is id vocab_size and is added by the model).

The GPT-2 datasets all go through one path, local files included: the `datasets` library
streams rows (from the HF hub, or with its local 'json' / 'parquet' / 'text' loaders for
--input), worker processes tokenise them (GPT-2 BPE, the end-of-text token before every
document), and the token stream is cut into fixed-size shards. Each shard is written to a
temporary name and renamed when complete, and progress.json records where the stream stands
after it, so a rerun continues after the last complete shard.

Every dataset is built in data/<dataset>/partial/ and moved into data/<dataset>/ only when complete
(meta.json, the only thing a loader reads first, last), so a failed or interrupted run never
touches a dataset prepared before. A run that fails takes back what it made: the folders it
created and the files it added, the build folder too, unless the error says to rerun the same
command to continue (exit 75: its complete shards are kept there). Settings are checked before
anything is read or written.
"""
import contextlib
import gc
import itertools
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from runtime import EXIT_RESUMABLE, UserError, atomic_write_text, configure, fmt_time, gpt2_encoding, one_of, run_cli

# -----------------------------------------------------------------------------
dataset = 'shakespeare_char'    # which dataset to prepare: shakespeare_char | shakespeare | fineweb_edu | tinystories | wikitext2
input = ''                      # local source instead of the network: a .txt, .jsonl/.json or .parquet file, or a folder with files per split named train*, valid*/val*, test*
data_dir = 'data'               # output root: data/<dataset>/ (a folder; created when missing)
val_fraction = 0.1              # shakespeare_char only: last fraction of the text kept for validation, in (0, 1)
# GPT-2 BPE datasets
max_tokens = 1_000_000_000      # tokens in the train split at most (>= 1): the first ones of the source's stream
val_tokens = -1                 # tokens in the val split at most (>= 1), taken from the head of the train stream when the source has no validation split; -1 = the dataset's default (BPE_DATASETS)
shard_size = 100_000_000        # tokens per .bin shard, 1 .. 2**32 (one is held in memory; a split's last shard may be shorter)
num_proc = 0                    # tokeniser worker processes (>= 0); 0 = one per CPU core, 1 = tokenise in this process
text_field = 'text'             # column holding the text in .jsonl / .parquet rows (not empty)
resume = True                   # continue an interrupted run with the same settings after its last complete shard; false = start over
# entropy array: python prepare.py --entropy --ref=OUT_DIR --dataset=NAME
entropy = False                 # write data/<dataset>/entropy.npy instead of preparing data
ref = ''                        # reference causal LM: a gpt.py out_dir (or its ckpt.pt), or hf:NAME_OR_DIR for GPT-2 through transformers (local weights only)
entropy_tokens = 0              # target tokens scored (>= 0), in evenly spaced windows over the train split; 0 = the whole split
batch_size = 8                  # windows per forward pass for --entropy (>= 1)
script = ''                     # --entropy: .py files you trust to rebuild --ref (comma-separated): see sample.py --help
device = 'auto'                 # --entropy: 'auto' (cuda, then mps, then cpu) | 'cpu' | 'cuda' | 'cuda:1' | 'mps'
# -----------------------------------------------------------------------------

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, '..', 'shared')
SHAKESPEARE_URL = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'
SHARED_SHAKESPEARE = os.path.join(SHARED, 'data', 'tinyshakespeare.txt')
EOT_TEXT = '<|endoftext|>'      # documents separator in .txt releases (TinyStories)
PROGRESS_EVERY = 10.0           # seconds between progress lines
TASK_DOCS, TASK_CHARS = 4096, 1 << 20   # the most documents / characters in one worker task
STAGE = 'partial'               # the build folder in data/<dataset>/: moved into place when complete
MIN_SPLIT_TOKENS = 8            # the fewest tokens a split may get (fewer when capped lower)
MAX_SHARD_SIZE = 1 << 32        # tokens: a shard's buffer (2 bytes a token) is held in memory
EXIT_USAGE = 2                  # exit code for bad settings, as diffusion.configure's


def check_settings(c):
    """Every setting's range, checked once, before anything is read or written: the first
    fault is a one-line error (exit 2). configure() has already checked types and choices."""
    out = os.path.join(c.data_dir, c.dataset)
    rules = [  # (setting, holds, what is wrong otherwise)
        ('data_dir', c.data_dir.strip() != '', 'must name a folder'),
        ('data_dir', not os.path.exists(c.data_dir) or os.path.isdir(c.data_dir), 'is a file, not a folder'),
        ('dataset', not os.path.exists(out) or os.path.isdir(out), f'{out} is a file, not a dataset folder'),
        ('val_fraction', 0 < c.val_fraction < 1, 'must be a fraction strictly between 0 and 1'),
        ('max_tokens', c.max_tokens >= 1, 'must be a positive number of tokens'),
        ('val_tokens', c.val_tokens == -1 or c.val_tokens >= 1,
         "must be a positive number of tokens, or -1 for the dataset's default"),
        ('shard_size', 1 <= c.shard_size <= MAX_SHARD_SIZE, f'must be between 1 and {MAX_SHARD_SIZE:,} tokens'),
        ('num_proc', c.num_proc >= 0, 'must be a number of processes, or 0 for one per CPU core'),
        ('text_field', c.text_field.strip() != '', 'must name a column'),
        ('entropy_tokens', c.entropy_tokens >= 0, 'must be a number of tokens, or 0 for the whole split'),
        ('batch_size', c.batch_size >= 1, 'must be a positive number of windows'),
        ('device', re.fullmatch(r'auto|cpu|mps|cuda(:\d+)?', c.device), 'must be auto, cpu, cuda, cuda:N or mps'),
        ('ref', c.ref or not c.entropy, '--entropy needs --ref=OUT_DIR_OF_A_GPT_RUN (or hf:gpt2 with transformers)'),
    ]
    if c.input and not c.entropy:
        rules += [('input', os.path.exists(c.input), 'no such file or folder'),
                  ('input', not (c.dataset in ('shakespeare_char', 'shakespeare') and os.path.isdir(c.input)),
                   f'is a folder; --dataset={c.dataset} reads one text file')]
    for key, ok, problem in rules:
        if not ok:
            raise UserError(f"--{key}={getattr(c, key)!r}: {problem}", EXIT_USAGE)


def download(url, path):
    """Fetch url to path (atomically); a clear error when there is no network."""
    print(f"downloading {url}")
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            data = r.read()
    except (urllib.error.URLError, OSError) as e:
        raise UserError(f"cannot download {url} ({getattr(e, 'reason', e)}); no network? "
                        f"pass a local copy with --input=PATH") from None
    tmp = path + '.tmp'
    try:
        with open(tmp, 'wb') as f:
            f.write(data)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


def utf8_error(path):
    """(offset, byte) of the first byte of the file that is not UTF-8, or None; read in chunks."""
    base, carry = 0, b''
    with open(path, 'rb') as f:
        while True:
            chunk = f.read(1 << 24)
            buf = carry + chunk
            try:
                buf.decode('utf-8')
                base, carry = base + len(buf), b''
            except UnicodeDecodeError as e:
                if chunk and e.start >= len(buf) - 3:  # perhaps a character cut by the chunk's end
                    base, carry = base + e.start, buf[e.start:]
                else:
                    return base + e.start, buf[e.start]
            if not chunk:
                return None


def not_utf8(path, offset, byte):
    return UserError(f"{path} is not UTF-8 text (byte 0x{byte:02x} at offset {offset:,}); convert it first, "
                     f"e.g. iconv -f latin1 -t utf-8")


def read_text(path):
    """The text of a UTF-8 file; a one-line error for what is not one (other encodings, binary files)."""
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        text = data.decode('utf-8')
    except UnicodeDecodeError as e:
        raise not_utf8(path, e.start, data[e.start]) from None
    nul = data.find(0)
    if nul >= 0:  # UTF-8 has no 0 byte in a multi-byte character: binary data
        raise UserError(f"{path} is binary, not text (a NUL byte at offset {nul:,})")
    return text


class Undo:
    """What a run that fails takes back, so that it leaves data_dir as it found it: the files it
    added to data_dir and data_dir/<dataset> (temporary ones included), the build folder it
    started (kept when the error is resumable, EXIT_RESUMABLE, and it holds shards: a rerun
    continues from them; only this process's temporary files go) and the folders it created,
    once empty. A dataset prepared before is never touched: a new one is built in STAGE and moved
    into place only when complete (publish)."""
    def __init__(self, data_dir, name):
        self.dirs = [os.path.abspath(data_dir), os.path.abspath(os.path.join(data_dir, name))]
        self.created, path = [], os.path.join(self.dirs[1], STAGE)
        while not os.path.isdir(path) and path != os.path.dirname(path):
            self.created.append(path)  # innermost first
            path = os.path.dirname(path)
        self.before = {d: set(os.listdir(d)) for d in self.dirs if os.path.isdir(d)}
        self.builds = []  # build folders this run started afresh

    def __call__(self, resumable):
        tmp, stage = f'.tmp.{os.getpid()}', os.path.join(self.dirs[1], STAGE)
        for b in self.builds:
            if not (resumable and os.path.isdir(b) and any(n.endswith('.bin') for n in os.listdir(b))):
                shutil.rmtree(b, ignore_errors=True)  # kept only when it holds shards to continue from
        doomed = [os.path.join(stage, n) for n in os.listdir(stage) if n.endswith(tmp)] if os.path.isdir(stage) else []
        for d in self.dirs:
            if os.path.isdir(d):
                doomed += [os.path.join(d, n) for n in set(os.listdir(d)) - self.before.get(d, set())
                           if os.path.isfile(os.path.join(d, n))]
        for path in doomed:
            with contextlib.suppress(OSError):  # never hide the error that brought us here
                os.remove(path)
        for d in self.created:
            with contextlib.suppress(OSError):
                os.rmdir(d)  # only when empty


def new_build(stage, undo):
    """stage, emptied or created: a build folder that a failed run removes."""
    shutil.rmtree(stage, ignore_errors=True)
    os.makedirs(stage)
    undo.builds.append(stage)
    return stage


def publish(stage, out, meta):
    """Move a complete build from stage into out, replacing the dataset there: the old meta.json
    goes first (a loader never reads old and new shards under one meta.json), then the new shards
    are moved in, the old ones not replaced are removed, and meta.json is written last. Killed
    in between, out has no meta.json and stage keeps progress.json: a rerun finishes the move."""
    names = [s for e in meta['splits'].values() for s in e['shards']]
    sizes = [n for e in meta['splits'].values() for n in e['tokens']]
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(out, 'meta.json'))
    for name, n in zip(names, sizes):
        src, dst = os.path.join(stage, name), os.path.join(out, name)
        if os.path.exists(src):
            os.replace(src, dst)
        elif not (os.path.exists(dst) and os.path.getsize(dst) == 2 * n):  # moved before being killed
            raise UserError(f"{src} is missing; rebuild with --resume=false")
    for name in os.listdir(out):
        if (name.endswith(('.bin', '.bin.tmp')) and name not in names) or name == 'progress.json':
            os.remove(os.path.join(out, name))
    write_meta(out, meta)
    shutil.rmtree(stage)


def write_tokens(path, arr):
    """Write a uint16 token array to path: a temporary file, fsync, rename. A crash leaves
    either no file or the complete one under the final name, never part of it."""
    tmp = path + '.tmp'
    try:
        with open(tmp, 'wb') as f:
            arr.tofile(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


def write_meta(out, meta):
    atomic_write_text(json.dumps(meta, indent=1) + '\n', os.path.join(out, 'meta.json'))


def shakespeare_path(path, root):
    """--input, else ../shared's copy, else a download into root."""
    if path:
        if not os.path.isfile(path):
            raise UserError(f"--input={path}: no such file")
        if os.path.getsize(path) == 0:
            raise UserError(f"--input={path} is empty: nothing to prepare")
        return path
    if os.path.exists(SHARED_SHAKESPEARE):
        return SHARED_SHAKESPEARE
    path = os.path.join(root, 'tinyshakespeare.txt')
    if not os.path.exists(path):
        os.makedirs(root, exist_ok=True)
        download(SHAKESPEARE_URL, path)
    return path


def prepare_shakespeare_char(c, undo):
    """Character-level Tiny Shakespeare: 65 characters, 90/10 train/val split (as nanoGPT)."""
    source = shakespeare_path(c.input, c.data_dir)
    text = read_text(source)
    chars = sorted(set(text))
    n = len(text)
    if n == 0:
        raise UserError(f"{source} is empty: nothing to prepare")
    n_train = int(n * (1 - c.val_fraction))  # nanoGPT: int(n * 0.9), Tiny Shakespeare 1,003,854 / 111,540
    if min(n_train, n - n_train) < MIN_SPLIT_TOKENS:
        raise UserError(f"{source} has {n:,} characters: too few for a train and a val split of at least "
                        f"{MIN_SPLIT_TOKENS} characters each (--val_fraction={c.val_fraction} gives train {n_train:,}, "
                        f"val {n - n_train:,})")
    if len(chars) > 1 << 16:
        raise UserError(f"{source} has {len(chars):,} distinct characters; uint16 token files hold at most 65,536")
    stoi = {ch: i for i, ch in enumerate(chars)}
    ids = np.array([stoi[ch] for ch in text], dtype=np.uint16)
    out = os.path.join(c.data_dir, 'shakespeare_char')
    stage = new_build(os.path.join(out, STAGE), undo)
    splits = {}
    for name, part in (('train', ids[:n_train]), ('val', ids[n_train:])):
        try:
            write_tokens(os.path.join(stage, f'{name}.bin'), part)
        except OSError as e:  # a full disk
            raise UserError(f"writing {stage} failed ({type(e).__name__}: {first_line(e)})") from None
        splits[name] = {'shards': [f'{name}.bin'], 'tokens': [int(len(part))]}
    publish(stage, out, {'dataset': 'shakespeare_char', 'tokenizer': 'char', 'vocab_size': len(chars),
                         'chars': ''.join(chars), 'dtype': 'uint16', 'source': os.path.abspath(source),
                         'splits': splits})
    print(f"{source}: {len(text):,} characters, vocabulary {len(chars)} (+ MASK = id {len(chars)})")
    print(f"wrote {out}: train {splits['train']['tokens'][0]:,} tokens, val {splits['val']['tokens'][0]:,} tokens")

# -----------------------------------------------------------------------------
# GPT-2 BPE datasets: one streaming, sharding, resumable path for all of them


@dataclass
class Spec:
    about: str                          # what the data is (meta.json "version")
    hub: str = ''                       # HF hub dataset id; '' = a text file (downloaded or --input)
    config: str = None                  # hub config name
    splits: dict = field(default_factory=lambda: {'train': 'train'})  # our split -> hub split
    whole: bool = False                 # a split is one document (its rows joined), not one per row
    val_tokens: int = None              # default cap of the val split (None = all of it)


BPE_DATASETS = {
    'shakespeare': Spec('Tiny Shakespeare (Karpathy char-rnn input.txt), one document', whole=True,
                        val_tokens=33_000),  # about 10% of its 338,025 GPT-2 tokens
    'fineweb_edu': Spec('FineWeb-Edu sample-10BT (Lozhkov et al. 2024), streamed in hub order',
                        hub='HuggingFaceFW/fineweb-edu', config='sample-10BT', val_tokens=10_000_000),
    'tinystories': Spec('TinyStories (Eldan & Li 2023)', hub='roneneldan/TinyStories',
                        splits={'train': 'train', 'val': 'validation'}, val_tokens=10_000_000),
    'wikitext2': Spec('WikiText-2 (Merity et al. 2016)', hub='Salesforce/wikitext', config='wikitext-2-raw-v1',
                      splits={'val': 'validation', 'test': 'test'}, whole=True),
}
SPLIT_WORDS = {'train': {'train', 'training'}, 'val': {'val', 'valid', 'validation', 'dev'}, 'test': {'test'}}


_ENC = None  # set in the main process before the workers fork, so they inherit it


def encode_docs(texts):
    """Worker: a list of documents -> (tokens (N,) uint16, lengths (D,) int64). Each document
    is preceded by the end-of-text token (as GPT-2's training data), so the token stream reads
    EOT doc0 EOT doc1 ... and every window of it can tell where documents start. With no special
    token allowed or disallowed, encode_to_numpy is encode_ordinary without a Python list: the
    text '<|endoftext|>' inside a document stays ordinary text, never the EOT id."""
    enc = _ENC or gpt2_encoding()
    encoded = [enc.encode_to_numpy(t, disallowed_special=()) for t in texts]   # uint32 arrays
    lengths = np.array([len(e) + 1 for e in encoded], dtype=np.int64)
    out = np.empty(int(lengths.sum()), dtype=np.uint16)  # GPT-2 ids < 50257 fit in uint16
    starts = np.cumsum(lengths) - lengths
    out[starts] = enc.eot_token
    for e, s in zip(encoded, starts.tolist()):
        out[s + 1:s + 1 + len(e)] = e
    return out, lengths


def _worker_init():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    gc.disable()  # tasks make no reference cycles; collections would only cost time


@contextlib.contextmanager
def worker_pool(n):
    """n tokeniser processes (None when n <= 1: tokenise in this process). Forked on Linux,
    before the dataset reader starts any thread, so workers start at once and inherit _ENC."""
    if n <= 1:
        yield None
        return
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context('fork' if 'fork' in methods and sys.platform != 'darwin' else 'spawn')
    gc.freeze()  # the workers' garbage collector never walks (and so never copies) the parent's objects
    try:
        pool = ctx.Pool(n, initializer=_worker_init)
    finally:
        gc.unfreeze()
    try:
        yield pool
    finally:
        pool.terminate()
        pool.join()


def doc_batches(docs):
    """Group documents into worker tasks of at most TASK_DOCS documents or ~TASK_CHARS characters:
    large enough that the per-task cost (pickling, result handling, ~1 ms) is small."""
    batch, chars = [], 0
    for d in docs:
        batch.append(d)
        chars += len(d)
        if len(batch) >= TASK_DOCS or chars >= TASK_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def tokenize(batches, pool, depth=None):
    """(tokens, lengths) per batch, in input order. At most `depth` batches are in flight, so
    a stream of any length is read only as fast as the workers tokenise it (Pool.imap would
    read the whole input ahead into memory)."""
    if pool is None:
        yield from map(encode_docs, batches)
        return
    depth = depth or 2 * pool._processes + 2
    pending = deque()
    for b in batches:
        pending.append(pool.apply_async(encode_docs, (b,)))
        if len(pending) >= depth:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def check_network(hub):
    """Fail in one line, at once, when the HF hub cannot be reached (the datasets library would
    retry for ~25 s and then raise a long traceback)."""
    offline = [k for k in ('HF_HUB_OFFLINE', 'HF_DATASETS_OFFLINE')
               if os.environ.get(k, '').strip().lower() in ('1', 'true', 'yes', 'on')]
    if offline:
        raise UserError(f"{hub} streams from the Hugging Face hub but {offline[0]} is set; "
                        "pass a local copy with --input=PATH (.parquet, .jsonl or .txt, or a folder of them)")
    url = urllib.parse.urlparse(os.environ.get('HF_ENDPOINT', 'https://huggingface.co'))
    host, port = url.hostname, url.port or (443 if url.scheme == 'https' else 80)
    try:
        socket.create_connection((host, port), timeout=10).close()
    except OSError as e:
        raise UserError(f"cannot reach {host} to stream {hub} ({e.strerror or e}); no network? pass a "
                        "local copy with --input=PATH (.parquet, .jsonl or .txt, or a folder of them)") from None


def loader_kind(files):
    """The `datasets` packaged loader for these files: 'parquet', 'json' or 'text'."""
    def kind(f):
        f = f.lower().removesuffix('.gz').removesuffix('.zst')
        return 'parquet' if f.endswith('.parquet') else 'json' if f.endswith(('.jsonl', '.json')) else 'text'
    kinds = {kind(f) for f in files}
    if len(kinds) > 1:
        raise UserError(f"{', '.join(files)}: mixed file types ({', '.join(sorted(kinds))}); one kind per split")
    return kinds.pop()


def local_files(path, spec):
    """{our split: [files]} for --input: a file is the dataset's first split (train, or test
    for evaluation-only datasets); a folder gives each split the files whose name has the split's
    word in it (TinyStoriesV2-GPT4-train.txt, valid.txt, validation-00000-of-00001.parquet)."""
    if not os.path.exists(path):
        raise UserError(f"--input={path}: no such file or folder")
    path = os.path.abspath(path)
    if os.path.isfile(path):
        return {'train' if 'train' in spec.splits else next(iter(spec.splits)): [path]}
    found = {}
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        for split in spec.splits:
            if os.path.isfile(full) and SPLIT_WORDS[split] & set(re.split(r'[^a-z0-9]+', name.lower())):
                found.setdefault(split, []).append(full)
    if not found:
        raise UserError(f"--input={path}: no file named after a split ({', '.join(spec.splits)}) in that folder")
    return found


def check_files(files):
    """Fail at once on what the `datasets` loaders would fail on obscurely: an empty file."""
    for f in (f for fs in files.values() for f in fs):
        if os.path.getsize(f) == 0:
            raise UserError(f"{f} is empty: nothing to prepare")


def read_docs(spec, split, files, field_name):
    """The documents (str) of one split, streamed through the `datasets` library: the hub
    dataset, or its local json / parquet / text loaders for files. Text files are read whole
    and cut at '<|endoftext|>' lines (TinyStories' .txt release) unless the dataset is one document."""
    import datasets
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its errors are ours to report, in one line
    datasets.disable_progress_bars()
    if files:
        kind = loader_kind(files)
        extra = {'sample_by': 'document'} if kind == 'text' else {}
        ds = datasets.load_dataset(kind, data_files=files, split='train', streaming=True, **extra)
        field_name = 'text' if kind == 'text' else field_name
        cut = kind == 'text' and not spec.whole
        where = ', '.join(files)
    else:
        ds = datasets.load_dataset(spec.hub, spec.config, split=spec.splits[split], streaming=True)
        cut, where = False, spec.hub

    def rows():
        for row in ds:
            text = row.get(field_name)
            if not isinstance(text, str):
                raise UserError(f"{where}: rows have no text column {field_name!r} (columns: "
                                f"{', '.join(row)}); set --text_field")
            if cut:
                yield from (part.strip() for part in text.split(EOT_TEXT) if part.strip())
            else:
                yield text
    if spec.whole:
        yield ''.join(rows())  # hub rows are lines that keep their '\n'; a text file is one row
    else:
        yield from rows()


def read_checked(docs, split, files):
    """The documents of read_docs, with its failures as one-line errors: a dropped connection
    or unreadable file (OSError) is resumable, the complete shards stay; text that is not UTF-8
    names the file and the byte; anything else the `datasets` library raises, its first line."""
    where = ', '.join(files) if files else f"the {split} split from the hub"
    try:
        yield from docs
    except UserError:
        raise
    except ImportError as e:
        raise UserError(f"the GPT-2 BPE datasets need the `datasets` package (pip install datasets): {e}") from None
    except OSError as e:
        raise UserError(f"reading {split} failed ({type(e).__name__}: {first_line(e)}); rerun the same command to "
                        "continue after the last complete shard", EXIT_RESUMABLE) from None
    except UnicodeDecodeError as e:
        for f in files or ():
            if loader_kind([f]) != 'parquet' and not f.lower().endswith(('.gz', '.zst')):
                bad = utf8_error(f)
                if bad:
                    raise not_utf8(f, *bad) from None
        raise UserError(f"{where}: text that is not UTF-8 ({first_line(e)})") from None
    except Exception as e:
        raise UserError(f"cannot read {where} ({type(e).__name__}: {first_line(e)})") from None


def first_line(e):
    return (str(e).strip().splitlines() or [''])[0][:200]


def fmt_rate(r):
    return f"{r / 1e6:.2f}M" if r >= 1e6 else f"{r / 1e3:.1f}k" if r >= 1e3 else f"{r:.0f}"


class ShardWriter:
    """The shards of one dataset, built in the folder `out` (data/<dataset>/STAGE), and
    progress.json, the record of every complete shard and of where the source stream stands
    after it (document index, token offset in that document)."""
    def __init__(self, out, build, shard_size, fresh, undo):
        self.out, self.shard_size = out, shard_size
        self.path = os.path.join(out, 'progress.json')
        state = None
        if not fresh and os.path.exists(self.path):
            try:
                with open(self.path) as f:
                    state = json.load(f)
            except (OSError, ValueError) as e:
                raise UserError(f"cannot read {self.path} ({type(e).__name__}); pass --resume=false to start "
                                "over") from None
            if not isinstance(state, dict) or not state.get('shards'):
                state = None  # nothing kept yet: nothing to protect
            elif state.get('build') != build:
                diff = [f"{k} {state.get('build', {}).get(k)!r} vs {v!r}" for k, v in build.items()
                        if state.get('build', {}).get(k) != v]
                raise UserError(f"{out} holds an unfinished run with other settings ({'; '.join(diff)}); "
                                "rerun with those settings to finish it, or pass --resume=false to start over")
        if state is None:  # start over in an empty folder
            new_build(out, undo)
            state = {'build': build, 'streams_done': 0, 'shards': []}
            self.save(state)
        self.state = state

    def save(self, state=None):
        atomic_write_text(json.dumps(state or self.state) + '\n', self.path)

    def tokens(self, split):
        return sum(s['tokens'] for s in self.state['shards'] if s['split'] == split)

    def flush(self, split, arr, stream, next_pos):
        k = sum(s['split'] == split for s in self.state['shards'])
        name = f'{split}_{k:06d}.bin'
        write_tokens(os.path.join(self.out, name), arr)
        self.state['shards'].append({'split': split, 'file': name, 'tokens': int(len(arr)), 'stream': stream,
                                     'next': list(map(int, next_pos))})
        self.save()

    def resume_point(self, stream):
        """(document index, token offset) where stream `stream` continues."""
        mine = [s for s in self.state['shards'] if s['stream'] == stream]
        return tuple(mine[-1]['next']) if mine else (0, 0)

    def splits(self):
        out = {}
        for s in self.state['shards']:
            e = out.setdefault(s['split'], {'shards': [], 'tokens': []})
            e['shards'].append(s['file'])
            e['tokens'].append(s['tokens'])
        return out


class Progress:
    def __init__(self, total, done):
        self.total, self.start_done, self.done = total, done, done
        self.t0 = self.last = time.time()

    def add(self, n, label, force=False):
        self.done += n
        now = time.time()
        if not force and now - self.last < PROGRESS_EVERY:
            return
        self.last = now
        rate = (self.done - self.start_done) / max(now - self.t0, 1e-9)
        line = f"{label}: {self.done:,} tokens"
        if self.total:
            line += f" of {self.total:,} ({100 * self.done / self.total:.1f}%)"
        line += f" | {fmt_rate(rate)} tokens/s"
        if self.total:
            eta = (self.total - self.done) / rate if rate > 0 else float('inf')
            line += f" | ETA {fmt_time(eta) if math.isfinite(eta) else '?'}"
        print(line, flush=True)


def write_stream(writer, index, docs, targets, pool, progress):
    """Tokenise one source stream and cut it into the splits of `targets` [(split, cap)...],
    in order: e.g. [('val', 1e7), ('train', 1e9)] puts the stream's first 1e7 tokens in val
    and the next 1e9 in train. Resumes after the last complete shard of this stream."""
    shard_size = writer.shard_size
    first_doc, skip = writer.resume_point(index)
    count = {split: writer.tokens(split) for split, _ in targets}

    def capped(t):
        split, cap = targets[t]
        return cap is not None and count[split] >= cap
    t = 0
    while t < len(targets) and capped(t):
        t += 1
    if t == len(targets):
        return
    buf, fill, doc_base = np.empty(shard_size, dtype=np.uint16), 0, first_doc
    docs = itertools.islice(docs, first_doc, None)  # resume: documents before are skipped unread by the workers
    for toks, lengths in tokenize(doc_batches(docs), pool):
        ends = np.cumsum(lengths)                   # (D,) end of each document in toks
        pos, skip = skip, 0
        while pos < len(toks):
            split, cap = targets[t]
            left = shard_size - fill if cap is None else min(shard_size - fill, cap - count[split] - fill)
            take = min(len(toks) - pos, left)
            buf[fill:fill + take] = toks[pos:pos + take]
            fill, pos = fill + take, pos + take
            progress.add(take, split)
            if fill == shard_size or (cap is not None and count[split] + fill == cap):
                k = int(np.searchsorted(ends, pos, side='right'))  # the document holding token pos
                writer.flush(split, buf[:fill], index, (doc_base + k, pos - (ends[k - 1] if k else 0)))
                count[split] += fill
                fill = 0
                split_done = cap is not None and count[split] == cap
                progress.add(0, split, force=split_done)  # a line at the end of each split
                while t < len(targets) and capped(t):
                    t += 1
                if t == len(targets):
                    return
        doc_base += len(lengths)
    split = targets[t][0]
    if fill:  # the source ended: its last, shorter shard
        writer.flush(split, buf[:fill], index, (doc_base, 0))
        count[split] += fill
    progress.add(0, split, force=True)
    short = [s for s, cap in targets if count[s] < min(MIN_SPLIT_TOKENS, MIN_SPLIT_TOKENS if cap is None else cap)]
    if short:
        raise UserError(f"the source ended after {sum(count.values()):,} tokens: too few for the {short[0]} split ("
                        + ', '.join(f"{s} {count[s]:,}" for s, _ in targets) + f"; a split needs {MIN_SPLIT_TOKENS} "
                        "at least); give a longer source" + (" or lower --val_tokens" if len(targets) > 1 else ''))


def source_version(name, spec, files):
    if files is None:
        return f"{spec.about}; HF hub {spec.hub}" + (f" config {spec.config}" if spec.config else '')
    if name == 'wikitext2':  # the two public releases differ: word-level tokenised (<unk>, @-@) or raw
        with open(next(iter(files.values()))[0], encoding='utf-8', errors='replace') as f:
            head = f.read(1 << 20)
        kind = ('tokenised release (wikitext-2-v1: <unk> tokens, " @-@ " splits)' if '<unk>' in head
                else 'raw release (wikitext-2-raw-v1)')
        return f"{spec.about}, {kind}; local files"
    return f"{spec.about}; local files"


def prepare_bpe(name, c, undo):
    """Prepare one of BPE_DATASETS with GPT-2 BPE: shards + meta.json under data_dir/name."""
    global _ENC
    spec = BPE_DATASETS[name]
    if name == 'shakespeare':
        files = {'train': [os.path.abspath(shakespeare_path(c.input, c.data_dir))]}
    else:
        files = local_files(c.input, spec) if c.input else None
    if files:
        check_files(files)
    vt = spec.val_tokens if c.val_tokens < 0 else c.val_tokens
    splits = list(files) if files else list(spec.splits)
    streams = []  # (source split, [(our split, cap), ...]): val first, so it is the head when carved
    if 'val' in splits:
        streams.append(('val', [('val', vt)]))
    if 'train' in splits:
        streams.append(('train', ([] if 'val' in splits else [('val', vt)]) + [('train', c.max_tokens)]))
    if 'test' in splits:
        streams.append(('test', [('test', None)]))
    source = ({s: f for s, f in files.items()} if files else
              {s: f"{spec.hub}:{spec.config or ''}:{h}" for s, h in spec.splits.items()})
    build = {'dataset': name, 'tokenizer': 'gpt2', 'source': source, 'streams': streams,
             'shard_size': c.shard_size, 'text_field': c.text_field}
    build = json.loads(json.dumps(build))  # tuples -> lists, as read back from progress.json
    out = os.path.join(c.data_dir, name)
    stage = os.path.join(out, STAGE)
    meta_path = os.path.join(out, 'meta.json')
    if c.resume and os.path.exists(meta_path):
        try:
            with open(meta_path) as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = {}  # unreadable: prepare it again
        if isinstance(old, dict) and old.get('build') == build:
            for split, info in old['splits'].items():
                for shard, n in zip(info['shards'], info['tokens']):
                    p = os.path.join(out, shard)
                    if not os.path.exists(p) or os.path.getsize(p) != 2 * n:
                        raise UserError(f"{p} holds {os.path.getsize(p) // 2 if os.path.exists(p) else 0} tokens but "
                                        f"meta.json says {n}; rebuild with --resume=false")
            print(f"{out} is already prepared with these settings ({old['tokens']:,} tokens); --resume=false redoes it")
            return
    if files is None:
        check_network(spec.hub)  # before anything is written
    _ENC = gpt2_encoding()
    n_proc = c.num_proc or (len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count())
    writer = ShardWriter(stage, build, c.shard_size, not c.resume, undo)
    caps = [cap for _, targets in streams for _, cap in targets]
    total = None if None in caps else sum(caps)
    progress = Progress(total, sum(s['tokens'] for s in writer.state['shards']))
    if writer.state['shards']:
        print(f"resuming after {len(writer.state['shards'])} complete shards ({progress.done:,} tokens)")
    print(f"{name}: GPT-2 BPE with {n_proc} tokeniser process(es), shards of {c.shard_size:,} tokens -> {out}",
          flush=True)
    with worker_pool(n_proc) as pool:
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # after the fork: workers keep the default
        try:
            for i, (src, targets) in enumerate(streams):
                if i < writer.state['streams_done']:
                    continue
                docs = read_checked(read_docs(spec, src, files and files[src], c.text_field), src,
                                    files and files[src])
                try:
                    write_stream(writer, i, docs, targets, pool, progress)
                except OSError as e:  # a full disk: the shards written so far stay
                    raise UserError(f"writing {stage} failed ({type(e).__name__}: {first_line(e)}); rerun the same "
                                    "command to continue after the last complete shard", EXIT_RESUMABLE) from None
                writer.state['streams_done'] = i + 1
                writer.save()
        except KeyboardInterrupt:
            kept = len(writer.state['shards'])
            raise UserError(f"interrupted; {kept} complete shards are kept in {stage}: rerun the same command to "
                            "continue" if kept else "interrupted before the first shard was complete: nothing is "
                            "kept; rerun the same command to start again", EXIT_RESUMABLE) from None
        finally:
            signal.signal(signal.SIGTERM, previous)
    dt = time.time() - progress.t0
    print(f"done: {progress.done - progress.start_done:,} tokens tokenised in {dt:.1f} s "
          f"({fmt_rate((progress.done - progress.start_done) / max(dt, 1e-9))} tokens/s)")
    splits = writer.splits()
    meta = {'dataset': name, 'tokenizer': 'gpt2', 'vocab_size': _ENC.n_vocab, 'eot_id': _ENC.eot_token,
            'dtype': 'uint16', 'source': source, 'version': source_version(name, spec, files),
            'documents': 'the end-of-text token (eot_id) precedes every document',
            'tokens': sum(sum(e['tokens']) for e in splits.values()), 'splits': splits, 'build': build}
    publish(stage, out, meta)
    print(f"wrote {out}: " + ', '.join(f"{s} {sum(e['tokens']):,} tokens in {len(e['shards'])} shard(s)"
                                       for s, e in splits.items()))


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt

# -----------------------------------------------------------------------------
# per-token-id entropy of a reference causal LM, for --masking=entropy


def load_reference(ref_path, meta, dev, script=''):
    """(logits function (B, T) -> (B, T, >= vocab), block size, description) of the reference LM:
    evaluate.py's reference loader (a gpt.py run, or hf:NAME through transformers)."""
    from evaluate import load_ref
    from sample import trust_list
    ref = load_ref(ref_path, dev, contextlib.nullcontext(), trust_list(script))
    if not ref.same_vocab(meta):
        raise UserError(f"--ref={ref_path} ({ref.name}) does not use the vocabulary of {meta['dataset']} "
                        f"({meta['tokenizer']}, {meta['vocab_size']} tokens): the vocabularies must match")
    return (lambda idx: ref.fwd(idx)[0]), ref.block_size, ref.name


def entropy_windows(sizes, block, cap):
    """(shard, start, length) windows of block + 1 tokens (the input and its targets), one
    token overlapping, so every token but a shard's first is a target exactly once; a shard's
    tail is a shorter window. With cap > 0: ceil(cap / block) full windows spread evenly."""
    full, tails = [], []
    for s, n in enumerate(sizes):
        for start in range(0, n - 1, block):
            (full if start + block + 1 <= n else tails).append((s, start, min(block + 1, n - start)))
    if cap and cap < len(full) * block + sum(w[2] - 1 for w in tails):
        k = min(len(full), math.ceil(cap / block))
        return [full[i] for i in np.unique(np.linspace(0, len(full) - 1, k).round().astype(int))]
    return full + tails


def make_entropy(c):
    """Write data/<dataset>/entropy.npy: for each token id, the mean predictive entropy (nats) of
    the reference LM over the positions where that id is the next token, divided by the mean
    over all scored positions (so its occurrence-weighted mean is 1; unseen ids get 1)."""
    import torch
    import torch.nn.functional as F
    from runtime import TokenData, Tokenizer, load_meta, resolve_device
    if not c.ref:
        raise UserError("--entropy needs --ref=OUT_DIR_OF_A_GPT_RUN (or hf:gpt2 with transformers)")
    meta = load_meta(c.data_dir, c.dataset)
    data = TokenData(c.data_dir, c.dataset, 'train', meta)      # checks every shard's size
    dev = resolve_device(c.device)
    logits_fn, block, about = load_reference(c.ref, meta, dev, c.script)
    V = meta['vocab_size']
    windows = entropy_windows(data.sizes, block, c.entropy_tokens)
    total = sum(w[2] - 1 for w in windows)
    print(f"entropy of {about} on {c.dataset} train: {total:,} target tokens in {len(windows):,} windows of "
          f"up to {block} on {dev}", flush=True)
    sums = torch.zeros(V, dtype=torch.float64)
    counts = torch.zeros(V, dtype=torch.int64)
    maps = [np.memmap(p, dtype=data.dtype, mode='r') for p in data.paths]
    autocast = (torch.autocast(device_type='cuda', dtype=torch.bfloat16) if dev.type == 'cuda'
                else contextlib.nullcontext())
    progress = Progress(total, 0)
    groups = itertools.groupby(windows, key=lambda w: w[2])    # full windows first, then each tail
    with torch.no_grad():
        for length, group in groups:
            group = list(group)
            for i in range(0, len(group), c.batch_size):
                x = torch.from_numpy(np.stack([maps[s][o:o + n] for s, o, n in group[i:i + c.batch_size]])
                                     .astype(np.int64)).to(dev)    # (B, L + 1)
                with autocast:
                    logits = logits_fn(x[:, :-1])                  # (B, L, >= V)
                logp = F.log_softmax(logits[..., :V].float(), dim=-1)  # (B, L, V)
                ent = -logp.exp().mul_(logp).sum(-1)               # (B, L) predictive entropy, nats
                tgt = x[:, 1:].flatten().cpu()
                sums.index_add_(0, tgt, ent.flatten().double().cpu())
                counts += torch.bincount(tgt, minlength=V)
                progress.add(tgt.numel(), 'entropy')
    sums, counts = sums.numpy(), counts.numpy()
    seen = counts > 0
    mean = sums.sum() / counts.sum()                               # over occurrences
    ent_norm = np.where(seen, sums / np.maximum(counts, 1), mean) / mean
    out = os.path.join(c.data_dir, c.dataset, 'entropy.npy')
    tmp = out + '.tmp'
    with open(tmp, 'wb') as f:
        np.save(f, ent_norm.astype(np.float32))
    os.replace(tmp, out)
    info = {'ref': about, 'split': 'train', 'tokens_scored': int(counts.sum()), 'entropy_tokens': c.entropy_tokens,
            'mean_entropy_nats': float(mean), 'ids_seen': int(seen.sum()), 'vocab_size': V,
            'coverage': float(seen.mean()),
            'normalisation': 'divided by the mean over scored positions (occurrence-weighted mean 1); unseen ids = 1'}
    atomic_write_text(json.dumps(info, indent=1) + '\n', os.path.join(c.data_dir, c.dataset, 'entropy.json'))
    if meta['tokenizer'] == 'gpt2':
        gpt2_encoding()  # Tokenizer needs the BPE files: point tiktoken at ../shared's copy when unset
    tok = Tokenizer(meta)
    frequent = np.flatnonzero(counts >= max(10, np.sort(counts)[-min(V, 100)]))  # the common ids
    order = frequent[np.argsort(ent_norm[frequent])]
    show = lambda ids: ' '.join(repr(tok.decode([i])) for i in ids)  # noqa: E731
    print(f"vocabulary coverage: {seen.sum():,} of {V:,} ids ({100 * seen.mean():.1f}%) are targets in the "
          f"{counts.sum():,} scored tokens; unseen ids get the mean")
    print(f"mean entropy {mean:.4f} nats; normalised range {ent_norm.min():.3f} .. {ent_norm.max():.3f}")
    if len(order):
        print(f"easiest common tokens: {show(order[:5])}; hardest: {show(order[::-1][:5])}")
    print(f"wrote {out} ({V} values, occurrence-weighted mean 1)")


DATASETS = {'shakespeare_char': prepare_shakespeare_char,
            **{name: (lambda c, undo, name=name: prepare_bpe(name, c, undo)) for name in BPE_DATASETS}}


def main(argv=None):
    """Settings are applied to a copy of this module's globals, so main can be called again
    (tests do) without one call's settings leaking into the next. A run that fails leaves
    data_dir as it found it (Undo)."""
    c = configure(dict(globals()), argv, rules={'dataset': one_of(DATASETS)}, verbose=False)
    check_settings(c)
    undo = Undo(c.data_dir, c.dataset)
    try:
        if c.entropy:
            make_entropy(c)
        else:
            DATASETS[c.dataset](c, undo)
    except BaseException as e:
        undo(resumable=isinstance(e, UserError) and e.code == EXIT_RESUMABLE)
        raise


if __name__ == '__main__':
    run_cli(main)
