"""README.md's commands, read at test time: every fenced ```bash block parses in bash
(`bash -n`), and no command passes a double-quoted argument holding a literal backslash-n:
in bash, "a\\nb" stays backslash + n (the program gets no newline), the trap of copying
`--start="ROMEO:\\nJULIET:"`; $'a\\nb' or a real newline inside the quotes give one."""
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

README = os.path.join(REPO, 'README.md')
BASH = shutil.which('bash')


def bash_blocks(path=README):
    """[(README line number of the block's first line, text)] of every fenced ```bash block."""
    blocks, opened, lang, lines = [], None, None, []
    with open(path, encoding='utf-8') as f:
        for number, line in enumerate(f, 1):
            fence = line.strip()
            if opened is None and fence.startswith('```'):
                opened, lang, lines = number, fence[3:].strip(), []
            elif opened is not None and fence == '```':
                if lang == 'bash':
                    blocks.append((opened + 1, ''.join(lines)))
                opened = None
            elif opened is not None:
                lines.append(line)
    assert opened is None, f"README.md:{opened}: a ``` block is never closed"
    return blocks


def backslash_n_in_double_quotes(text):
    """Offsets in text of each backslash-n that bash keeps as those two characters because it
    stands inside double quotes. Follows bash's quoting: '...' (no escapes), $'...' (ANSI-C
    quoting, where \\n is a newline: fine), "..." (a backslash escapes only $ ` " \\ and a
    newline, so "\\\\n" is an escaped backslash, then n), a backslash outside quotes, and
    # comments (from a word's start to the end of the line)."""
    found, i, n, quote = [], 0, len(text), None
    while i < n:
        c = text[i]
        if quote is None:
            if c == '\\':
                i += 2
                continue
            if c == '#' and (i == 0 or text[i - 1] in ' \t\n;&|()'):
                i = text.find('\n', i)
                if i < 0:
                    break
                continue
            if c == "'":
                ansi = i > 0 and text[i - 1] == '$' and (i < 2 or text[i - 2] != '\\')
                i += 1
                while i < n and text[i] != "'":  # $'...' honours \' inside; '...' has no escapes
                    i += 2 if ansi and text[i] == '\\' else 1
            elif c == '"':
                quote = '"'
        else:  # inside "..."
            if c == '\\':
                if i + 1 < n and text[i + 1] == 'n':
                    found.append(i)
                i += 2
                continue
            if c == '"':
                quote = None
        i += 1
    return found


def test_detector_on_known_cases():
    """The quoting rules above on the cases that matter, so that a clean README means something."""
    flagged = ['--start="ROMEO:[MASK:40]\\nJULIET:"', 'echo "a\\nb"', 'x="$y\\n"', 'a "b \\"c\\" \\n d"',
               "echo 'it''s' \"\\n\"", "echo $'a' \"\\n\""]
    clean = ["--start=$'ROMEO:[MASK:40]\\nJULIET:'", "echo 'a\\nb'", 'echo "a\\\\nb"', 'echo a\\nb',
             '--start="ROMEO:\nJULIET:"', 'ls  # say "a\\nb" here', "echo $'it\\'s \\n' \"ok\"", 'echo "#" "x"']
    assert [t for t in flagged if len(backslash_n_in_double_quotes(t)) != 1] == []
    assert [t for t in clean if backslash_n_in_double_quotes(t)] == []


def test_readme_has_bash_blocks():
    blocks = bash_blocks()
    assert blocks, 'README.md has no ```bash block'
    # the test command after the <!-- test-command --> marker (what .ci/run runs) is one of them
    readme = open(README, encoding='utf-8').read()
    assert '<!-- test-command -->\n```bash\n' in readme


@pytest.mark.skipif(BASH is None, reason='no bash on the PATH')
def test_every_bash_block_parses():
    bad = []
    for line, text in bash_blocks():
        r = subprocess.run([BASH, '-n'], input=text, capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            # bash names lines of its stdin "bash: line N:": make them README.md lines
            msg = re.sub(r'line (\d+)', lambda m: f"README.md:{line + int(m.group(1)) - 1}", r.stderr.strip())
            bad.append(f"block at README.md:{line}: {msg}")
    assert not bad, '\n'.join(bad)


def test_no_backslash_n_inside_double_quotes():
    bad = []
    for line, text in bash_blocks():
        for offset in backslash_n_in_double_quotes(text):
            number = line + text.count('\n', 0, offset)
            bad.append(f"README.md:{number}: {text.splitlines()[number - line].strip()}")
    assert not bad, ('a double-quoted "\\n" reaches the program as a backslash and an n, not a newline; '
                     "use $'...\\n...' or a real line break:\n" + '\n'.join(bad))


def cheap_commands():
    """[(README line, command, comment)]: the README's commands that need no data and run in a
    second: `python SCRIPT ... --help`, and examples whose comment shows the error they give."""
    out = []
    for line, text in bash_blocks():
        for i, cmd in enumerate(text.splitlines()):
            code, _, comment = cmd.partition('  # ')
            code, comment = code.strip(), comment.strip()
            if code.startswith('python ') and (code.endswith(' --help') or comment.startswith('error:')):
                out.append((line + i, code, comment))
    return out


def test_the_readme_has_cheap_commands():
    assert any(c.endswith('--help') for _, c, _ in cheap_commands())
    assert any(m.startswith('error:') for _, _, m in cheap_commands())


@pytest.mark.parametrize('line, command, comment', cheap_commands())
def test_cheap_readme_commands_do_what_they_say(line, command, comment, tmp_path):
    """Pasted into bash (in an empty folder, the scripts taken from the repo), each does what the
    README says: --help exits 0 with the settings; an error example prints that one line and exits
    with the code in its comment."""
    words = shlex.split(command)
    words[1] = os.path.join(REPO, words[1])
    r = subprocess.run([sys.executable, *words[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    if command.endswith('--help'):
        assert r.returncode == 0 and '--' in r.stdout and r.stderr == '', f"README.md:{line}: {command}"
        return
    want = re.match(r'(error: .*?)(?: \(exit (\d+)\))?$', comment)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(want.group(1)), f"README.md:{line}: {command}\n{r.stderr}"
    assert r.returncode == int(want.group(2) or 1), f"README.md:{line}: exit {r.returncode}"
