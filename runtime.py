"""
runtime.py: the run plumbing every script shares, one import away from the lesson.

diffusion.py holds what a researcher copies it to change (the model, the schedules, maskings and
loss weightings, the objective, the ancestral sampler and the training loop); this file holds what
keeps a run safe and exact, which a copy imports and never needs to edit:

  errors and the CLI      UserError (one line and an exit code), run_cli, print0
  settings                configure(globals()): config files and --key=value, rules, --help
  data                    meta.json (checked field by field), the tokenizer, token shards, fingerprints
  files and checkpoints   atomic writes, weights_only loads, logs, the RNG state
  devices                 resolve_device, autocast, TF32 / heap tuning, peak FLOPs for MFU
  Run                     one training run's processes (DDP from torchrun's environment) and its
                          folder: the lock, start or resume, checkpoints and best.pt, status.json,
                          log.jsonl and W&B, signals, divergence, the ETA

It imports no script of the project; every script imports it (runtime <- diffusion <- gpt <-
sample <- evaluate/visualize/report <- prepare/study).
"""
import ast
import contextlib
import ctypes
import difflib
import errno
import gc
import hashlib
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict, fields

import numpy as np
import torch

EXIT_USAGE = 2        # bad settings
EXIT_DIVERGED = 3     # the loss went non-finite or exploded; the last good checkpoint is kept
EXIT_RESUMABLE = 75   # exit code after a signal-triggered save (EX_TEMPFAIL): "run me again"


class UserError(Exception):
    """A problem the user can fix; scripts print it as one line and exit with .code."""
    def __init__(self, msg, code=1):
        super().__init__(msg)
        self.code = code


def run_cli(main):
    """Run a script's main(); a UserError becomes one line on stderr (rank 0 only under torchrun)
    and its exit code. Matched by class name, so a copied script's UserError counts too."""
    try:
        main()
    except Exception as e:
        if not any(k.__name__ == 'UserError' for k in type(e).__mro__):
            raise
        if is_master():
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(getattr(e, 'code', 1))
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)


def is_master():
    return int(os.environ.get('RANK', 0)) == 0


def print0(*args, **kwargs):
    """print on DDP rank 0 only."""
    if is_master():
        print(*args, **kwargs, flush=True)

# -----------------------------------------------------------------------------
# configuration: configure(globals()) applies config files and --key=value overrides


class Config(dict):
    """Resolved settings with attribute access (c.batch_size); .explicit: the keys the user set."""
    explicit = frozenset()

    def __getattr__(self, k):
        return self[k] if k in self else object.__getattribute__(self, k)

    def __setattr__(self, k, v):
        object.__setattr__(self, k, frozenset(v)) if k == 'explicit' else self.__setitem__(k, v)


def settings_of(g):
    """The settings in a module's globals: lowercase names bound to bool/int/float/str/None."""
    return {k: v for k, v in g.items() if k.islower() and not k.startswith('_') and type(v) in SETTING_TYPES}


SETTING_TYPES = (bool, int, float, str, type(None))




def one_of(options):  # rules: (test, text); configure checks the values given against them
    return lambda v: v in options, 'one of ' + ', '.join(map(str, options))


def at_least(lo, optional=False):
    return lambda v: (optional and v is None) or (v is not None and v >= lo), f">= {lo}" + (" or None" * optional)


def in_range(lo, hi, hi_open=False):
    return (lambda v: lo <= v < hi if hi_open else lo <= v <= hi), f"in [{lo}, {hi}{')' if hi_open else ']'}"


def _value(key, value, default):
    """value (text from the command line, or a literal from a config file) as default's type."""
    kind = type(default)
    if isinstance(value, str) and len(value) > MAX_VALUE_CHARS:
        raise UserError(f"--{key}: a value of {len(value):,} characters (at most {MAX_VALUE_CHARS:,})", EXIT_USAGE)
    if isinstance(value, str) and kind not in (str, type(None)):
        low = value.lower()
        if kind is bool and low in ('true', '1', 'yes', 'on', 'false', '0', 'no', 'off'):
            return low in ('true', '1', 'yes', 'on')
        with contextlib.suppress(ValueError, SyntaxError):
            value = float(value) if kind is not bool else value   # 1e9 is fine for an int setting
    elif isinstance(value, str) and default is None:
        with contextlib.suppress(ValueError, SyntaxError, TypeError, RecursionError, MemoryError):
            value = ast.literal_eval(value)
    if kind is float and type(value) in (int, float):
        return float(value)
    if kind is int and type(value) is float and value.is_integer():
        return int(value)
    if (default is None and type(value) in SETTING_TYPES) or type(value) is kind:
        return value
    raise UserError(f"--{key}={_short(value)}: expected {kind.__name__} like the default {default!r}", EXIT_USAGE)


def _short(value, width=60):
    """repr(value), cut to width characters: error lines stay lines."""
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + '...'



MAX_CONFIG_BYTES = 1 << 20   # a config file or one --key=value: bounded before it is parsed
MAX_VALUE_CHARS = 10000


def read_config_file(path):
    """A config file holds `name = literal` lines only; it is parsed, never executed. Its size is
    bounded, and so is its nesting (the parser's own limits become the one-line error)."""
    try:
        if os.path.getsize(path) > MAX_CONFIG_BYTES:
            raise UserError(f"{path}: a config file is at most {MAX_CONFIG_BYTES >> 20} MiB", EXIT_USAGE)
        tree = ast.parse(open(path).read(), path)
        return {n.targets[0].id: ast.literal_eval(n.value) for n in tree.body
                if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))}   # docstrings aside
    except OSError as e:
        raise UserError(f"cannot read config file {path}: {e.strerror}", EXIT_USAGE) from None
    except (SyntaxError, ValueError, AttributeError, IndexError, TypeError, RecursionError, MemoryError):
        raise UserError(f"{path}: a config file may only hold `name = value` lines (values are literals)",
                        EXIT_USAGE) from None


def _closest(key, keys):
    def score(k):
        initials = ''.join(w[0] for w in k.split('_') if w)   # lr -> learning_rate
        return max(difflib.SequenceMatcher(None, key, k).ratio(), key == initials, 0.9 * k.startswith(key))
    return max(sorted(keys), key=score)


def print_help(keys, rules, sources):
    """Every setting with its default, its rule and the comment after it in the source."""
    doc = {}
    for path in sources:  # the first file that comments a setting wins
        for line in open(path):
            name, eq, rest = line.partition('=')
            if eq and name.strip().isidentifier() and not line[0].isspace() and '#' in rest:
                doc.setdefault(name.strip(), rest.split('#', 1)[1].strip())
    print(f"usage: python {os.path.basename(sys.argv[0])} [config.py ...] [--key=value ...]\n\nsettings:")
    for k, v in keys.items():
        print(f"  --{k}={v!r}" + (f"  [{rules[k][1]}]" if k in rules else '') + f"\n      {doc.get(k, '')}")


def configure(g, argv=None, rules=None, sources=None, verbose=True):
    """Override the settings in g (a script's globals(), or a dict of defaults) from config files
    and --key=value args: types follow the defaults, values must pass rules ({name: (test, text)}),
    an unknown key is an error naming the closest one. --help/-h lists the settings (comments
    from sources, the files that define them) and exits 0. Updates g; returns the Config."""
    argv = sys.argv[1:] if argv is None else argv
    keys, rules, explicit = settings_of(g), rules or {}, []
    if '--help' in argv or '-h' in argv:
        print_help(keys, rules, sources or [g['__file__']])
        sys.exit(0)
    for arg in argv:
        if arg.startswith('--'):
            key, eq, value = arg[2:].partition('=')
            items = [(key.replace('-', '_'), value if eq else None)]
        elif arg.endswith('.py'):
            items = read_config_file(arg).items()
        else:
            raise UserError(f"unexpected argument {arg!r}: use --key=value or a config file (--help lists the "
                            "settings)", EXIT_USAGE)
        for key, value in items:
            if key not in keys:
                raise UserError(f"unknown setting {key}; the closest valid one is --{_closest(key, keys)} "
                                "(--help lists them)", EXIT_USAGE)
            if value is None:  # --compile means --compile=true
                if type(keys[key]) is not bool:
                    raise UserError(f"{arg}: expected --{key}=value", EXIT_USAGE)
                value = True
            g[key] = _value(key, value, keys[key])
            test, text = rules.get(key, (lambda v: True, ''))
            try:
                ok = test(g[key])
            except TypeError:   # text where a None default wants a number, say
                ok = False
            if not ok:
                raise UserError(f"--{key}={_short(g[key])}: must be {text}", EXIT_USAGE)
            explicit.append(key)
    cfg = Config(settings_of(g))
    cfg.explicit = explicit
    if verbose:
        print0('config: ' + ' '.join(f'{k}={v!r}' for k, v in cfg.items()))
    return cfg

# -----------------------------------------------------------------------------
# data: meta.json + uint16 token files (one or many shards per split) written by prepare.py


class Tokenizer:
    """Character or GPT-2 BPE tokenizer described by a dataset's meta.json."""
    def __init__(self, meta):
        self.kind = meta['tokenizer']
        self.n_tokens = meta['vocab_size']
        self.mask_id = self.n_tokens
        self.eot_id = meta.get('eot_id')
        if self.kind == 'char':
            self.itos = meta['chars']
            self.stoi = {ch: i for i, ch in enumerate(self.itos)}
        elif self.kind == 'gpt2':
            self.enc = gpt2_encoding()
        else:
            raise UserError(f"unknown tokenizer {self.kind!r} in meta.json")

    def encode(self, text):
        if self.kind == 'char':
            missing = sorted(set(text) - set(self.stoi))
            if missing:
                raise UserError(f"characters not in the vocabulary: {''.join(missing)!r}")
            return [self.stoi[ch] for ch in text]
        return self.enc.encode_ordinary(text)

    def decode(self, ids, mask_str='_'):
        """ids -> text; MASK shows as mask_str, padding ids as nothing."""
        out, run = [], []
        for i in (int(i) for i in ids):
            if i < self.n_tokens:
                run.append(i)
                continue
            if run:
                out.append(self._decode(run))
                run = []
            if i == self.mask_id:
                out.append(mask_str)
        if run:
            out.append(self._decode(run))
        return ''.join(out)

    def _decode(self, ids):
        return ''.join(self.itos[i] for i in ids) if self.kind == 'char' else self.enc.decode(ids)


def gpt2_encoding():
    """tiktoken's GPT-2 BPE; offline it uses ../shared/tiktoken_cache when that exists."""
    shared = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'shared', 'tiktoken_cache')
    if 'TIKTOKEN_CACHE_DIR' not in os.environ and os.path.isdir(shared):
        os.environ['TIKTOKEN_CACHE_DIR'] = shared
    import tiktoken
    try:
        return tiktoken.get_encoding('gpt2')
    except OSError as e:  # requests' connection errors are OSErrors
        raise UserError(f"cannot load the GPT-2 BPE files ({type(e).__name__}); without network, set "
                        "TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cached files") from None


def load_meta(data_dir, dataset):
    """A dataset's meta.json, checked to be what prepare.py writes."""
    path = os.path.join(data_dir, dataset, 'meta.json')
    again = f"; make it again with: python prepare.py --dataset={dataset}"
    if not os.path.exists(path):
        raise UserError(f"no data at {os.path.join(data_dir, dataset)}; make it with: "
                        f"python prepare.py --dataset={dataset}")
    try:
        with open(path, encoding='utf-8') as f:
            meta = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise UserError(f"{path} is not readable JSON ({type(e).__name__}){again}") from None
    return check_meta(meta, path, again)


SHARD_DTYPES = {'uint16': 1 << 16, 'uint32': 1 << 32}   # a shard's dtype: the token ids it can hold
MAX_VOCAB = 1 << 24                                      # far beyond any tokenizer; an embedding of 2^24 rows


def check_meta(meta, where, again=''):
    """A dataset description (meta.json, or the copy a checkpoint keeps) checked field by field
    before anything reads it: what prepare.py writes, with vocab_size within what the shards'
    dtype can hold and shard names plain file names inside the dataset folder. A bad field is one
    line naming it (again: how to make the file anew). Returns meta."""
    def bad(field, what):
        raise UserError(f"{where}: {field} {what}{again}")

    def show(v):
        return repr(v)[:40]

    def whole(v, lo=0):
        return type(v) is int and v >= lo
    if not isinstance(meta, dict):
        bad('the file', 'is not a JSON object')
    if meta.get('tokenizer') not in ('char', 'gpt2'):
        bad('tokenizer', f"is {show(meta.get('tokenizer'))}, not 'char' or 'gpt2'")
    dtype = meta.get('dtype', 'uint16')
    if dtype not in SHARD_DTYPES:
        bad('dtype', f"is {show(dtype)}, not one of {', '.join(SHARD_DTYPES)}")
    most = min(SHARD_DTYPES[dtype], MAX_VOCAB)
    V = meta.get('vocab_size')
    if not (whole(V, 1) and V <= most):
        bad('vocab_size', f"is {show(V)}, not a whole number in 1..{most:,} (what {dtype} shards hold)")
    chars = meta.get('chars')
    if meta['tokenizer'] == 'char' and not (isinstance(chars, (str, list)) and len(chars) == V and
                                            all(isinstance(ch, str) and len(ch) == 1 for ch in chars) and
                                            len(set(chars)) == V):
        bad('chars', f"is not {V:,} distinct characters, one per token id")
    if meta.get('eot_id') is not None and not (whole(meta['eot_id']) and meta['eot_id'] < V):
        bad('eot_id', f"is {show(meta['eot_id'])}, not a token id below {V:,}")
    for key in ('dataset', 'fingerprint'):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            bad(key, f"is {show(meta[key])}, not text")
    splits = meta.get('splits')
    if not (isinstance(splits, dict) and splits):
        bad('splits', "is not an object of splits")
    for name, info in splits.items():
        if not (isinstance(info, dict) and isinstance(info.get('shards'), list) and isinstance(info.get('tokens'), list)
                and len(info['shards']) == len(info['tokens'])):
            bad(f"splits.{name}", "is not {'shards': [file names], 'tokens': [counts]} of one length")
        for shard, n in zip(info['shards'], info['tokens']):
            if not (isinstance(shard, str) and shard == os.path.basename(shard) and shard not in ('', '.', '..')
                    and '\\' not in shard and not os.path.isabs(shard)):
                bad(f"splits.{name}.shards", f"holds {show(shard)}, not a plain file name in the dataset folder")
            if not whole(n):
                bad(f"splits.{name}.tokens", f"holds {show(n)}, not a token count")
    return meta


def data_identity(meta):
    """What must not change under a run: tokenizer, vocabulary and the token files' fingerprint."""
    return {k: meta.get(k) for k in ('tokenizer', 'vocab_size', 'chars', 'fingerprint')}


def _from_difference(a, b, width=40):
    """a and b cut to width characters from a little before where they first differ."""
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    start = max(0, i - 10)
    return tuple(('...' if start else '') + s[start:start + width] for s in (a, b))


def check_same_data(meta, ckpt_meta, where):
    """A one-line refusal when data prepared now differs from the data a checkpoint was made on."""
    now, then = data_identity(meta), data_identity(ckpt_meta)
    if then.get('fingerprint') is None or now.get('fingerprint') is None:
        now.pop('fingerprint'), then.pop('fingerprint')  # data prepared before fingerprints existed
    bad = [k for k in now if now[k] != then[k]]
    if bad:
        show = {k: _from_difference(str(then[k]), str(now[k])) for k in bad}
        raise UserError(f"{where} was made on other data: {meta.get('dataset')} now differs in "
                        + ', '.join(f"{k} ({a!r} then, {b!r} now)" for k, (a, b) in show.items()))


class TokenData:
    """One split of a dataset: uint16 shards listed in meta.json, memmapped and size-checked.
    Batches are random windows, a pure function of the generator passed in. limit > 0: only the
    first `limit` tokens of the split (a data-constrained run repeats them epoch after epoch)."""
    def __init__(self, data_dir, dataset, split, meta=None, limit=0):
        self.meta = meta or load_meta(data_dir, dataset)
        again = f"; rerun python prepare.py --dataset={dataset}"
        info = self.meta['splits'].get(split)
        if info is None:
            raise UserError(f"{dataset} has no {split} split{again}")
        self.paths = [os.path.join(data_dir, dataset, s) for s in info['shards']]
        self.sizes = list(info['tokens'])
        self.dtype = np.dtype(self.meta.get('dtype', 'uint16'))
        self.vocab = self.meta['vocab_size']
        for path, n in zip(self.paths, self.sizes):
            if not os.path.exists(path):
                raise UserError(f"missing {path}{again}")
            if os.path.getsize(path) != n * self.dtype.itemsize:
                raise UserError(f"{path} holds {os.path.getsize(path) // self.dtype.itemsize} tokens but "
                                f"meta.json says {n}{again}")
        if limit:
            if limit > sum(self.sizes):
                raise UserError(f"--train_tokens={limit} is more than the {sum(self.sizes):,} tokens of the {split} split")
            ends = np.cumsum([0] + self.sizes)
            self.sizes = [int(min(n, max(limit - e, 0))) for n, e in zip(self.sizes, ends)]
        self.tokens = sum(self.sizes)

    def batch(self, batch_size, length, gen):
        """(batch_size, length) int64 windows: a shard chosen in proportion to its windows, then
        an offset within it. Ids outside the vocabulary are a one-line error naming the shard."""
        counts = torch.tensor([max(n - length + 1, 0) for n in self.sizes], dtype=torch.float64)
        if counts.sum() == 0:
            raise UserError(f"every shard is shorter than {length} tokens; lower --block_size")
        shard = torch.multinomial(counts, batch_size, replacement=True, generator=gen) if len(counts) > 1 \
            else torch.zeros(batch_size, dtype=torch.long)
        offs = (torch.rand(batch_size, generator=gen, dtype=torch.float64) * counts[shard]).long()
        # memmaps are opened per batch, not kept (nanoGPT: a long-lived memmap grows resident memory)
        maps = {s: np.memmap(self.paths[s], dtype=self.dtype, mode='r') for s in set(shard.tolist())}
        rows = [maps[s][o:o + length] for s, o in zip(shard.tolist(), offs.tolist())]
        out = torch.from_numpy(np.stack(rows).astype(np.int64))
        if out.max() >= self.vocab:
            s = shard[int((out >= self.vocab).any(1).nonzero()[0])]
            raise UserError(f"{self.paths[s]} holds token id {int(out.max())}, outside the vocabulary of "
                            f"{self.vocab}; rerun python prepare.py --dataset={self.meta.get('dataset')}")
        return out

    def windows(self, batch_size, length):
        """Every whole window of `length` tokens of the split in order, each starting at the last
        token of the one before (so each token is in some window's first length - 1, the part
        diffusion sees, and GPT predicts each token once), as (<= batch_size, length) batches."""
        for path, n in zip(self.paths, self.sizes):
            data = np.memmap(path, dtype=self.dtype, mode='r')
            starts = range(0, n - length + 1, length - 1)    # windows overlap by GPT's target token
            for i in range(0, len(starts), batch_size):
                yield torch.from_numpy(np.stack([data[o:o + length] for o in starts[i:i + batch_size]]).astype(np.int64))


def fingerprint(data_dir, dataset, meta):
    """A cheap fingerprint of a dataset's token files: sizes and hashes of their first and last
    64 KiB (hashing 20 GB of FineWeb at every start would take minutes)."""
    h = hashlib.blake2b(digest_size=8)
    for split in sorted(meta['splits']):
        for shard in meta['splits'][split]['shards']:
            path = os.path.join(data_dir, dataset, shard)
            with open(path, 'rb') as f:
                size = os.fstat(f.fileno()).st_size
                h.update(f"{shard}:{size}".encode() + f.read(65536))
                f.seek(max(size - 65536, 0))
                h.update(f.read(65536))
    return h.hexdigest()

def load_entropy(path, n_tokens):
    """Read an entropy .npy (one value per token id of the dataset, mean 1); clear errors."""
    if not os.path.exists(path):
        raise UserError(f"no entropy file at {path}; make one with: python prepare.py --entropy "
                        f"--ref=OUT_DIR_OF_A_GPT_RUN (or pass --entropy_file=PATH)")
    try:
        arr = np.load(path, allow_pickle=False)
        ok = arr.ndim == 1 and np.issubdtype(arr.dtype, np.number)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read entropy file {path}: {str(e)[:100]}") from None
    if not ok or len(arr) != n_tokens:
        raise UserError(f"entropy file {path} holds {arr.dtype} of shape {arr.shape}; expected ({n_tokens},) "
                        "numbers, one per token id of the dataset's vocabulary")
    if not np.all(np.isfinite(arr)):
        raise UserError(f"entropy file {path} holds non-finite values")
    return arr



# -----------------------------------------------------------------------------
# files and checkpoints: atomic writes, weights_only loads, one-line errors, the script that made
# them, and the randomness that makes a resumed run exact


def atomic_write(path, write, mode='wb'):
    """write(f) into a temporary file, fsync, rename over path: a crash leaves the old file, and a
    full disk or a file size limit leaves it too (the temporary file is removed; one-line error
    with the size written and the previous file's)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save: its zip writer turns the OSError into a RuntimeError
        size = os.path.getsize(tmp) if os.path.exists(tmp) else 0
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if not isinstance(e, OSError):
            if not isinstance(e.__context__, OSError):
                raise
            e = e.__context__
        full = e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
        old = os.path.getsize(path) if os.path.exists(path) else 0
        mib = lambda n: f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"
        raise UserError(f"cannot write {path}: {e.strerror}" + (
            f" (stopped at {mib(size)}" + (f" of about {mib(old)}, the size of the previous file, which is kept"
                                            if old else "") + "; free space there"
            + (" or raise the file size limit (ulimit -f)" if e.errno == errno.EFBIG else "") + ")" if full else "")) from None
    with contextlib.suppress(OSError):  # make the rename itself durable where the OS allows
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def atomic_save(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text, path):
    atomic_write(path, lambda f: f.write(text), 'w')


def remove_stale_temps(folder):
    """Delete `*.tmp.<pid>` files of processes that no longer run (a kill -9 during a save)."""
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        pid = name.rpartition('.tmp.')[2]
        if '.tmp.' in name and pid.isdigit() and int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(folder, name))
            except PermissionError:
                pass  # alive, another user's


LOG_NUMBERS = ('loss', 'val_loss', 'val_nelbo', 'val_loss_se', 'val_nelbo_se', 'epoch', 'lr', 'ms_per_step',
               'tokens_per_s', 'mfu')   # a log record's numeric fields (when present)


def log_record(line):
    """One line of log.jsonl as a record ({'step': int >= 0, ...}, numbers where numbers are
    written), or None: a torn line (kill -9, full disk) or anything else that is not a record."""
    try:
        rec = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not (isinstance(rec, dict) and type(rec.get('step')) is int and rec['step'] >= 0 and
            all(type(rec[k]) in (int, float) for k in LOG_NUMBERS if rec.get(k) is not None) and
            isinstance(rec.get('event', ''), str)):
        return None
    return rec


def read_log(path, warn=True):
    """The records of a log.jsonl; a line that is not one (a torn last line, or a crafted one) is
    skipped with a note."""
    recs = []
    with contextlib.suppress(FileNotFoundError), open(path, encoding='utf-8', errors='replace') as f:
        lines = f.read().splitlines()
        for i, line in enumerate(lines):
            rec = log_record(line)
            if rec is not None:
                recs.append(rec)
            elif warn and line.strip():
                print0(f"note: skipped a torn line {i + 1} of {path}" if not line.rstrip().endswith('}') else
                       f"note: skipped line {i + 1} of {path}: not a log record")
    return recs


def script_info(path):
    """What a checkpoint records of the script that made it: its path and a hash of its source."""
    with open(path, 'rb') as f:
        return {'path': os.path.abspath(path), 'sha256': hashlib.sha256(f.read()).hexdigest()}


def ckpt_file(path):
    """The checkpoint a path names: a run folder's ckpt.pt, or the .pt file given (best.pt, say)."""
    path = os.fspath(path)
    return path if path.endswith('.pt') and not os.path.isdir(path) else os.path.join(path, 'ckpt.pt')


def read_checkpoint(path, device='cpu'):
    """torch.load(weights_only=True) with one-line errors for missing, corrupt or foreign files.
    path: a run folder (its ckpt.pt) or a checkpoint file."""
    path = ckpt_file(path)
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}; train one with: python diffusion.py "
                        f"--out_dir={os.path.dirname(path) or '.'} (or gpt.py)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, foreign object: all mean "not usable"
        raise UserError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
    need = {'model': dict, 'model_args': dict, 'objective': str, 'config': dict, 'meta': dict, 'step': int}
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in need):
        raise UserError(f"{path} is not a checkpoint of this project (missing "
                        f"{[k for k in need if not isinstance(ckpt, dict) or k not in ckpt]})")
    wrong = [k for k, kind in need.items() if not isinstance(ckpt[k], kind)]
    if wrong:
        raise UserError(f"{path} is not a checkpoint of this project ({', '.join(wrong)} of the wrong type)")
    check_meta(ckpt['meta'], f"{path} (its dataset description)")
    ckpt['path'] = path
    return ckpt


def build_model(ckpt, ModelConfig, Transformer, path='checkpoint'):
    """Rebuild the (uncompiled) model from the config stored in a checkpoint and load its weights,
    with the model classes of the script that rebuilds it (diffusion.py's, or a copy's)."""
    unknown = set(ckpt['model_args']) - {f.name for f in fields(ModelConfig)}
    if unknown:
        raise UserError(f"{path}: model config has unknown fields {sorted(unknown)}")
    model = Transformer(ModelConfig(**ckpt['model_args']))
    try:
        model.load_state_dict(ckpt['model'])
    except RuntimeError as e:
        first = [ln.strip() for ln in str(e).splitlines() if ln.strip()][1:2] or [str(e)[:160]]
        raise UserError(f"{path}: weights do not match the stored model config ({first[0][:160]})") from None
    return model


def rng_state():
    s = np.random.get_state()
    state = {'python': random.getstate(), 'torch': torch.get_rng_state(),
             'numpy': [s[0], torch.from_numpy(s[1].astype(np.int64)), s[2], s[3], s[4]]}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    random.setstate((state['python'][0], tuple(state['python'][1]), state['python'][2]))
    torch.set_rng_state(state['torch'].cpu())
    n = state['numpy']
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'].cpu())
def rng(*key):
    """A torch.Generator seeded by a hash of key: randomness that is a pure function of
    (seed, purpose, step, micro-batch), so resume and DDP need no generator state."""
    h = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(h, 'little') >> 1)



def to_device(tensor, dev):
    """Host to device without stalling the device's queue (pinned memory, non-blocking copy)."""
    return tensor.pin_memory().to(dev, non_blocking=True) if dev.type == 'cuda' else tensor.to(dev)

# -----------------------------------------------------------------------------
# validation statistics: a mean with its standard error, and a control variate (training's
# val_nelbo and evaluate.py's estimator use both)


def batch_mean(values, sizes):
    """(mean, standard error) of per-batch values (a list of 0-d tensors) weighted by their
    sizes; the standard error from the batches' spread (nan for one batch). One sync, here."""
    v = torch.stack(values).double().cpu()
    w = torch.tensor(sizes, dtype=torch.float64)
    w = w / w.sum()
    mean, k = float((w * v).sum()), len(sizes)
    return mean, float((w ** 2 * (v - mean) ** 2).sum() * k / (k - 1)) ** 0.5 if k > 1 else float('nan')


class ControlVariate:
    """Estimates f - beta c with beta = cov(f, c) / var(c) fitted on the (f, c) pairs added before:
    never on the draws it corrects, so the estimate stays unbiased and successive estimates
    uncorrelated (Glasserman 2003, "Monte Carlo Methods in Financial Engineering", sec. 4.1).
    Running sums n, f, c, fc, cc kept on the device (no host sync)."""
    def __init__(self, device='cpu'):
        self.sums = torch.zeros(5, dtype=torch.float64, device=device)

    def beta(self):
        n, sf, sc, sfc, scc = self.sums
        n = n.clamp(min=1)
        var = scc - sc * sc / n
        return torch.where(var > 0, (sfc - sf * sc / n) / var.clamp(min=1e-30), 0.0)

    def correct(self, f, c):
        """f - beta c with the beta of the pairs so far (both (B,) float64); then adds these pairs."""
        out = f - self.beta() * c
        self.sums += torch.stack([torch.ones_like(self.sums[0]) * len(f), f.sum(), c.sum(), (f * c).sum(), (c * c).sum()])
        return out


# -----------------------------------------------------------------------------
# devices: which one, its autocast, its speed settings, its peak FLOP/s (for MFU)

PEAK_FLOPS = [  # dense bf16 FLOP/s by device-name substring, first match wins; add yours
    ('H200', 989e12), ('H100 PCIe', 756e12), ('H100', 989e12), ('A100', 312e12),
    ('L40S', 362e12), ('L4', 121e12), ('A10G', 70e12), ('4090', 165e12), ('V100', 125e12),
]


def peak_flops(device):
    if device.type != 'cuda':
        return None
    name = torch.cuda.get_device_name(device)
    return next((f for key, f in PEAK_FLOPS if key in name), None)


def resolve_device(name, local_rank=0):
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' | 'mps' -> a torch.device that exists here, else a one-line error."""
    if name == 'auto':
        if torch.cuda.is_available():
            name = f'cuda:{local_rank}'
        elif getattr(torch.backends, 'mps', None) and torch.backends.mps.is_available():
            name = 'mps'
        else:
            name = 'cpu'
    elif name == 'cuda':
        name = f'cuda:{local_rank}'
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device={name!r}: use auto, cpu, cuda, cuda:N or mps", EXIT_USAGE) from None
    if dev.type == 'cuda' and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise UserError(f"--device={name} but that CUDA device is not available here; use --device=cpu", EXIT_USAGE)
    if dev.type == 'mps' and not (getattr(torch.backends, 'mps', None) and torch.backends.mps.is_available()):
        raise UserError("--device=mps but MPS is not available here; use --device=cpu", EXIT_USAGE)
    if dev.type not in ('cpu', 'cuda', 'mps'):
        raise UserError(f"--device={name!r}: use auto, cpu, cuda, cuda:N or mps", EXIT_USAGE)
    return dev


def autocast_for(dev, dtype):
    """bfloat16 autocast on CUDA by default (the loss is computed in fp32), none elsewhere."""
    amp = {'auto': torch.bfloat16 if dev.type == 'cuda' else None, 'float32': None, 'bfloat16': torch.bfloat16}[dtype]
    return torch.autocast(device_type=dev.type, dtype=amp) if amp is not None else contextlib.nullcontext()




def tune_backend(dev):
    """Settings that change speed, not results. CUDA: TF32 matmuls where fp32 remains. CPU under
    glibc (Linux): freed memory stays in the heap (mallopt) instead of going back to the OS, so
    each step's big activations reuse mapped pages instead of page-faulting fresh ones (hundreds of
    faults a step): 1.5-2.5 ms of a 57 ms step at nanoGPT's CPU recipe size, measured process
    against process. bench/bench_train.py times every contender of ours with it set."""
    if dev.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    elif dev.type == 'cpu' and sys.platform.startswith('linux'):
        try:
            libc = ctypes.CDLL(None)
            libc.mallopt(-1, 1 << 30)      # M_TRIM_THRESHOLD: keep up to 1 GiB of freed heap
            libc.mallopt(-3, 32 << 20)     # M_MMAP_THRESHOLD: blocks under 32 MiB from the heap, not mmap
        except (OSError, AttributeError):  # another C library: its own policy
            pass


def fmt_time(s):
    """Seconds as 4m05s or 2h07m (log lines' ETA; prepare.py and sample.py use it too)."""
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"

# -----------------------------------------------------------------------------
# a training run: its processes and its folder, behind the short calls that train() makes


def check_settings(c):
    """Checks between settings (each alone is checked by a script's RULES), and warnings for odd pairs."""
    if c.n_embd % c.n_head or (c.n_embd // c.n_head) % 2:
        raise UserError(f"--n_embd={c.n_embd} must be a multiple of --n_head={c.n_head} with an even quotient "
                        "(the head size, for rotary embeddings)", EXIT_USAGE)
    if c.get('block_len') and c.block_size % c.block_len:
        raise UserError(f"--block_len={c.block_len} must divide --block_size={c.block_size} (0 or block_size: MDLM)",
                        EXIT_USAGE)
    decay = c.lr_decay_iters if c.lr_decay_iters is not None else c.max_iters
    for bad, what in ((c.warmup_iters > c.max_iters, f"warmup_iters={c.warmup_iters} is longer than the run: the "
                       "learning rate never reaches its peak"),
                      (c.eval_interval > c.max_iters > 0, f"eval_interval={c.eval_interval} > max_iters: validation "
                       "runs only at the start and the end"),
                      (decay < c.max_iters, f"lr_decay_iters={decay} < max_iters: the last "
                       f"{c.max_iters - decay} steps run at min_lr")):
        if bad:
            print0(f"warning: {what}")


def lock_run(out_dir):
    """One run per out_dir: an exclusive lock on out_dir/lock, held until the process ends (the OS
    drops it however the process ends, so a killed run never blocks the next). fcntl on POSIX,
    msvcrt on Windows, imported here so that every script imports on either."""
    os.makedirs(out_dir, exist_ok=True)
    f = open(os.path.join(out_dir, 'lock'), 'a+')
    try:
        try:
            import fcntl
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:
            import msvcrt
            f.seek(0)
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or '?'
        f.close()
        raise UserError(f"{out_dir} is in use by another run (pid {holder}); wait for it, or choose another "
                        "--out_dir", EXIT_USAGE) from None
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def start_or_resume(c, objective_name):
    """(settings, checkpoint or None). Resuming takes the checkpoint's settings, updated by those
    set explicitly now; the model (every field of the checkpoint's model config), data and
    objective cannot change under a resumed run."""
    path = ckpt_file(c.out_dir)
    mode = c.init_from if c.init_from != 'auto' else ('resume' if os.path.exists(path) else 'scratch')
    if mode == 'scratch':
        if os.path.exists(path):
            raise UserError(f"{c.out_dir} already holds a run; continue it with --init_from=resume, or "
                            "choose another --out_dir (or delete that folder)", EXIT_USAGE)
        return c, None
    ckpt = read_checkpoint(path)
    if ckpt['objective'] != objective_name:
        raise UserError(f"{path} holds a {ckpt['objective']} run; resume it with {ckpt['objective']}.py")
    merged = Config(ckpt['config'])
    fixed = set(ckpt['model_args']) | {'dataset', 'schedule', 'masking', 'loss_weighting'}
    for k in sorted(c.explicit):
        if k in fixed and k in merged and merged[k] != c[k]:
            raise UserError(f"--{k}={c[k]!r} differs from the checkpoint's {merged[k]!r}; a resumed run "
                            "keeps its model and objective (start a new --out_dir instead)", EXIT_USAGE)
    merged.update({k: v for k, v in c.items() if k in c.explicit or k not in merged})
    merged.explicit = c.explicit
    return merged, ckpt


def finite_weights(model):
    return all(torch.isfinite(p).all() for p in model.parameters())


class Run:
    """One training run, as train() sees it: set up in __init__, then a few short calls per step.

    Processes: DDP from torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE), one device each;
    rank 0 (.master) alone writes files. The folder (out_dir): locked (one run per folder), its
    stale temporary files removed, the run started or resumed (a resumed run takes the
    checkpoint's settings, updated by those set explicitly now), the data checked to be what a
    resumed run was trained on. Then it keeps, for the loop: ckpt.pt (every rank's RNG state,
    atomic) and best.pt, status.json (running | finished | interrupted | stopped | diverged),
    log.jsonl (and W&B, resumed into the same W&B run), the stop flag of SIGUSR1/SIGTERM/Ctrl-C,
    the divergence checks, and the log line's timing, MFU and ETA."""

    def __init__(self, c, objective_name, script, default_out_dir):
        # ---- processes and devices ----
        self.ddp = int(os.environ.get('RANK', -1)) != -1
        self.rank, self.local_rank, self.world = ((int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))
                                                  if self.ddp else (0, 0, 1))
        self.master = self.rank == 0
        self.dev = resolve_device(c.device, self.local_rank)
        if self.ddp:
            import torch.distributed as dist
            self.dist = dist
            if self.dev.type == 'cuda':
                torch.cuda.set_device(self.dev)
            dist.init_process_group(backend=c.backend if c.backend != 'auto' else
                                    ('nccl' if self.dev.type == 'cuda' else 'gloo'))
        # ---- where the run lives: lock it, then start or resume ----
        explicit = c.explicit
        c = Config(c, out_dir=c.out_dir or default_out_dir)
        c.explicit = explicit
        self.objective_name, self.out_dir = objective_name, c.out_dir
        self.ckpt_path = ckpt_file(c.out_dir)
        self.lock = lock_run(c.out_dir) if self.master else None
        if self.master:
            remove_stale_temps(c.out_dir)
        c, self.ckpt = start_or_resume(c, objective_name)
        print0('config: ' + ' '.join(f'{k}={v!r}' for k, v in c.items()))   # after a resume: the run's own
        check_settings(c)
        c.gradient_accumulation_steps = c.gradient_accumulation_steps or self.world   # global batch: G micro-batches
        if c.gradient_accumulation_steps % self.world:
            raise UserError(f"gradient_accumulation_steps={c.gradient_accumulation_steps} is not a multiple of "
                            f"the {self.world} DDP processes", EXIT_USAGE)
        self.c, self.micro_per_rank = c, c.gradient_accumulation_steps // self.world
        # ---- data, checked to be what a resumed run was trained on ----
        meta = load_meta(c.data_dir, c.dataset)
        self.train_data = TokenData(c.data_dir, c.dataset, 'train', meta, limit=c.train_tokens)
        self.val_data = TokenData(c.data_dir, c.dataset, 'val', meta)
        self.meta = dict(meta, fingerprint=fingerprint(c.data_dir, c.dataset, meta))
        if self.ckpt is not None:
            check_same_data(self.meta, self.ckpt['meta'], self.ckpt_path)
        self.script = script_info(script)
        self.saved = self.ckpt['step'] if self.ckpt else None   # the step ckpt.pt holds
        self.stop_signal, self.interrupted, self.wandb = None, False, None

    def restore(self, optimizer):
        """Seed this rank, then restore the optimizer, the loop counters and every RNG from a
        resumed run's checkpoint. Returns the step to start from."""
        c, ckpt = self.c, self.ckpt
        torch.manual_seed(c.seed + self.rank)  # per-rank randomness (dropout)
        random.seed(c.seed + self.rank)
        np.random.seed(c.seed + self.rank)
        self.best_val, self.evaluated_at, step = float('inf'), -1, 0
        if ckpt is not None:
            optimizer.load_state_dict(ckpt['optimizer'])
            states = ckpt.get('rng', [])
            if len(states) == self.world:
                set_rng_state(states[self.rank])
            else:
                print0(f"note: checkpoint has RNG state for {len(states)} processes, this run has {self.world}; "
                       "reseeded")
            step, self.best_val = ckpt['step'], ckpt.get('best_val_loss', float('inf'))
            self.evaluated_at = ckpt.get('evaluated_at', -1)
        return step

    def start(self, raw_model, optimizer, model_cfg, step):
        """Wrap the model for DDP, say what runs, open log.jsonl and W&B. Returns the model to train."""
        c = self.c
        self.raw_model, self.optimizer, self.model_args = raw_model, optimizer, asdict(model_cfg)
        model = raw_model   # with --compile the objective compiles its loss, the model's forward included
        tune_backend(self.dev)
        if self.ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP
            model = DDP(model, device_ids=[self.local_rank] if self.dev.type == 'cuda' else None)
        self.tokens_per_step = c.batch_size * c.block_size * c.gradient_accumulation_steps
        self.peak, self.flops_per_step = peak_flops(self.dev), raw_model.flops_per_token() * self.tokens_per_step
        print0(f"{self.objective_name}: {raw_model.num_params() / 1e6:.2f}M parameters, {self.world} process(es) on "
               f"{self.dev}, {self.tokens_per_step:,} tokens/step, out_dir={self.out_dir}, starting at step {step}")
        self.log_path = self.open_log(step) if self.master else None
        if c.wandb_log and self.master:
            self.wandb = start_wandb(c, self.out_dir, (self.ckpt or {}).get('wandb_id'))
        self.t_last, self.logged_at, self.warned_se = time.time(), step, False
        return model

    # ---- files ----
    def open_log(self, step):
        """log.jsonl without the lines written after the checkpoint (a crash), plus a start record."""
        path = os.path.join(self.out_dir, 'log.jsonl')
        keep = [r for r in read_log(path) if r.get('step', 0) <= step]
        atomic_write_text(''.join(json.dumps(r) + '\n' for r in keep + [{'step': step, 'event': 'start',
                                                                            'config': dict(self.c)}]), path)
        return path

    def log(self, record):
        if self.master:
            with open(self.log_path, 'a') as f:
                f.write(json.dumps(record) + '\n')
            if self.wandb is not None:
                self.wandb.log(record, step=record['step'])

    def write_status(self, status, step):
        atomic_write_text(json.dumps({'status': status, 'step': step, 'max_iters': self.c.max_iters}) + '\n',
                          os.path.join(self.out_dir, 'status.json'))

    def save(self, step, status):
        """ckpt.pt: everything needed to continue exactly (weights, optimizer, settings, data
        identity, the script that trained it, the loop counters and every rank's RNG state), atomic;
        then status.json."""
        states = [rng_state()]
        if self.ddp:
            states = [None] * self.world
            self.dist.all_gather_object(states, rng_state())
        if self.master:
            atomic_save({'model': self.raw_model.state_dict(), 'optimizer': self.optimizer.state_dict(),
                         'model_args': self.model_args, 'objective': self.objective_name, 'config': dict(self.c),
                         'meta': self.meta, 'script': self.script, 'step': step, 'best_val_loss': self.best_val,
                         'evaluated_at': self.evaluated_at, 'rng': states, 'wandb_id': self.wandb_id(),
                         'data': {'sampler': 'random windows keyed by (seed, step, micro)', 'seed': self.c['seed']}},
                        self.ckpt_path)
            self.write_status(status, step)
        self.saved = step
        if self.ddp:
            self.dist.barrier()

    def wandb_id(self):
        if self.wandb is not None:
            return self.wandb.run.id
        return (self.ckpt or {}).get('wandb_id')

    def keep_best(self):
        """best.pt: a hard link to the checkpoint just written (no copy; ckpt.pt is later replaced by a
        rename, so best.pt keeps these bytes). Atomic like every file of a run."""
        best = os.path.join(self.out_dir, 'best.pt')
        tmp = f"{best}.tmp.{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        try:
            os.link(self.ckpt_path, tmp)
        except OSError:  # a filesystem without hard links
            with open(self.ckpt_path, 'rb') as f:
                data = f.read()
            atomic_write(best, lambda out: out.write(data))
            return
        os.replace(tmp, best)

    # ---- the loop's calls ----
    def evaluated(self, step, metrics):
        """After a validation: print it, check for divergence, log it, save ckpt.pt (and best.pt when
        it improved). The time it took does not count in ms/step."""
        c, t_eval = self.c, time.time()
        key = 'val_nelbo' if 'val_nelbo' in metrics else 'val_loss'
        val, se = metrics[key], metrics.get(key + '_se', math.nan)
        metrics['epoch'] = step * self.tokens_per_step / self.train_data.tokens
        print0(f"step {step} (epoch {metrics['epoch']:.2f}): " + ', '.join(
            f'{k} {v:.4f}' + (f' (se {metrics[k + "_se"]:.4f})' if k + '_se' in metrics else '')
            for k, v in metrics.items() if not k.endswith('_se') and k != 'epoch'))
        if se > 0.01 * val and not self.warned_se:
            print0(f"warning: the standard error of {key} is {100 * se / val:.1f}% of it; raise --eval_iters "
                   "(0 = the whole validation split) for a steadier value")
            self.warned_se = True
        if not math.isfinite(val) or not finite_weights(self.raw_model):
            self.diverged(step, f"validation loss {val}" if not math.isfinite(val) else "non-finite weights")
        if c.diverge_ratio and val > c.diverge_ratio * self.best_val:
            self.diverged(step, f"validation loss {val:.4f} is over {c.diverge_ratio:g}x the best {self.best_val:.4f}")
        self.evaluated_at, improved = step, val < self.best_val
        self.best_val = min(self.best_val, val)
        self.log({'step': step, 'loss': metrics['val_loss'], **metrics})
        self.save(step, 'finished' if step >= c.max_iters else 'running')
        if improved and self.master:
            self.keep_best()
        self.t_last += time.time() - t_eval   # ms/step counts training steps only

    def logged(self, step, lr, loss_sum):
        """A log line every log_interval steps: the mean training loss since the last one (loss_sum,
        summed on the device: its one host sync, averaged over the DDP ranks), the speed, MFU, ETA."""
        c, n = self.c, step - self.logged_at
        train_loss = (loss_sum / n).reshape(1)
        if self.ddp:
            self.dist.all_reduce(train_loss, op=self.dist.ReduceOp.AVG)
        train_loss = train_loss.item()
        dt = (time.time() - self.t_last) / n
        rec = {'step': step, 'loss': train_loss, 'lr': lr, 'ms_per_step': 1000 * dt,
               'tokens_per_s': self.tokens_per_step / dt}
        line = (f"step {step}/{c.max_iters} | loss {train_loss:.4f} | lr {lr:.2e} | {1000 * dt:.1f} ms/step | "
                f"{rec['tokens_per_s']:,.0f} tok/s")
        if self.peak:
            rec['mfu'] = self.flops_per_step / dt / self.world / self.peak
            line += f" | mfu {100 * rec['mfu']:.1f}%"
        print0(line + f" | eta {fmt_time((c.max_iters - step) * dt)}")
        if not math.isfinite(train_loss):
            self.diverged(step, f"training loss {train_loss}")
        self.log(rec)
        self.t_last, self.logged_at = time.time(), step

    def diverged(self, step, what):
        if self.master:
            self.write_status('diverged', step)
            self.log({'step': step, 'event': 'diverged', 'why': what})
        kept = f"{self.ckpt_path} keeps step {self.saved}" if self.saved is not None else "no checkpoint was saved"
        raise UserError(f"step {step}: {what}; the run diverged and stopped ({kept}; lower --learning_rate)",
                        EXIT_DIVERGED)

    @contextlib.contextmanager
    def signals(self):
        """While the loop runs, SIGUSR1, SIGTERM and Ctrl-C only set the stop flag (the loop finishes
        its step, saves and exits EXIT_RESUMABLE); a second Ctrl-C stops at once, status 'stopped'
        with the step ckpt.pt holds."""
        def on_signal(signum, frame):
            if signum == signal.SIGINT and self.stop_signal == signal.SIGINT:
                raise KeyboardInterrupt
            self.stop_signal = signum
        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        except KeyboardInterrupt:  # a second Ctrl-C: stop now; say so, the checkpoint is the last save
            if self.master:
                self.write_status('stopped', self.saved if self.saved is not None else 0)
            raise
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def stop_requested(self, step):
        """After a signal: save (status 'interrupted') and return True. One process: a flag, no device
        sync. DDP: every rank agrees before anyone saves, through an all-reduce (a sync), so only at
        log steps."""
        if not self.ddp:
            stop = self.stop_signal is not None
        elif step % self.c.log_interval and step < self.c.max_iters:
            stop = False
        else:
            flag = torch.tensor([1.0 if self.stop_signal else 0.0], device=self.dev)
            self.dist.all_reduce(flag, op=self.dist.ReduceOp.MAX)
            stop = flag.item() > 0
        if stop:
            if not finite_weights(self.raw_model):  # never save what diverged since the last evaluation
                self.diverged(step, "non-finite weights")
            self.save(step, 'interrupted')
            print0(f"signal {self.stop_signal or 'on another rank'}: saved step {step} to {self.ckpt_path}; "
                   f"exiting {EXIT_RESUMABLE} (rerun with --init_from=resume to continue)")
            self.interrupted = True
        return stop

    def close(self):
        """Leave DDP cleanly (the caller has dropped its DDP wrapper: its reducer holds gloo/NCCL work
        objects, and a gloo worker thread destroying one during interpreter shutdown aborts the
        process), finish W&B, release the lock; after a signal, exit EXIT_RESUMABLE."""
        if self.ddp:
            self.dist.barrier()
            gc.collect()
            self.dist.destroy_process_group()
        if self.interrupted:
            sys.exit(EXIT_RESUMABLE)
        if self.wandb is not None:
            self.wandb.finish()
        if self.lock is not None:
            self.lock.close()


def start_wandb(c, out_dir, run_id=None):
    """A W&B run for this training run; a resumed or requeued run continues the W&B run its
    checkpoint names (run_id, ckpt['wandb_id']) instead of opening a new one."""
    try:
        import wandb
    except ImportError:
        raise UserError("--wandb_log=true needs the wandb package: pip install wandb") from None
    wandb.init(project=c.wandb_project, name=c.wandb_run_name or os.path.basename(os.path.abspath(out_dir)),
               config=dict(c), id=run_id, resume='allow' if run_id else None)
    return wandb
