"""The README and the documentation site (docs/, mkdocs.yml) against the code they describe.

- the site builds with ``mkdocs build --strict`` (no warning), with the command-line reference
  rendered from the argparse parsers and the API reference from the docstrings;
- every relative link and ``#anchor`` in README.md and docs/*.md resolves: anchors of the site's
  pages as Python-Markdown's ``toc`` extension makes them (what MkDocs serves), anchors that the
  README points at as GitHub makes them (where the README is read);
- every ``deeplab ...`` command shown in a code block (and every example in the commands'
  ``--help``) names a subcommand and options that exist, written out in full, and parses;
- the README's Python example runs and prints what its comments say;
- the README's picture was drawn from the packaged default model by its script.

The checkers are plain functions, so that the tests below can also show that they fail.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import io
import re
import shlex
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
README = REPO / "README.md"
HOOK = DOCS / "hooks" / "cli_reference.py"


@functools.lru_cache(maxsize=None)
def _hook():
    spec = importlib.util.spec_from_file_location("cli_reference_hook", HOOK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def _source(path: Path) -> str:
    """The Markdown of a page as MkDocs sees it: docs/cli.md with the hook's reference rendered."""
    text = path.read_text(encoding="utf-8")
    hook = _hook()
    return text.replace(hook.MARKER, hook.render_cli_reference()) if hook.MARKER in text else text


# --------------------------------------------------------------------------- Markdown structure

_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")


def code_blocks(text: str) -> list[tuple[str, str]]:
    """The fenced code blocks of a Markdown text, as ``(language, body)``; indented ones (in a
    list item) too, their body dedented by the fence's indentation."""
    blocks, lines, i = [], text.split("\n"), 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = len(m.group(1)), m.group(2), m.group(3).lower()
        body, i = [], i + 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][indent:] if not lines[i][:indent].strip() else lines[i])
            i += 1
        blocks.append((lang, "\n".join(body)))
        i += 1
    return blocks


def prose(text: str) -> str:
    """The text outside fenced code blocks (fences and code blanked, so line numbers stay)."""
    out, fence = [], None
    for line in text.split("\n"):
        m = _FENCE.match(line)
        if fence is None and m:
            fence = m.group(2)
            out.append("")
        elif fence is not None:
            if line.strip().startswith(fence):
                fence = None
            out.append("")
        else:
            out.append(line)
    return "\n".join(out)


def headings(text: str) -> list[str]:
    """ATX headings outside code blocks, as their Markdown source."""
    return [m.group(1).strip().rstrip("#").strip()
            for m in re.finditer(r"^ {0,3}#{1,6}\s+(.+)$", prose(text), re.M)]


def _plain(heading: str) -> str:
    """A heading's text as rendered: code spans, emphasis and links reduced to their text."""
    text = re.sub(r"`([^`]*)`", r"\1", heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"(\*\*|\*)", "", text)


def github_anchors(text: str) -> set[str]:
    """The anchors GitHub gives a Markdown file's headings (github-slugger's rules): lower case,
    every character that is not a letter, digit, space, hyphen or underscore removed, each
    space a hyphen, a repeated slug suffixed -1, -2..."""
    seen: dict[str, int] = {}
    out = set()
    for h in headings(text):
        slug = "".join(c for c in _plain(h).lower()
                       if c in " -_" or unicodedata.category(c)[0] in "LN").replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def mkdocs_anchors(text: str) -> set[str]:
    """The anchors MkDocs gives a page: Python-Markdown's ``toc`` ids (its slugify: NFKD to
    ASCII, characters other than word characters, spaces and hyphens removed, lower case, runs
    of spaces and hyphens one hyphen; a repeated id suffixed _1, _2...), computed by rendering
    the page with the extensions mkdocs.yml lists."""
    import markdown
    import yaml

    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    names, configs = [], {}
    for ext in config.get("markdown_extensions", []):
        name, options = next(iter(ext.items())) if isinstance(ext, dict) else (ext, None)
        names.append(name)
        if options:
            configs[name] = options
    md = markdown.Markdown(extensions=names, extension_configs=configs)
    md.convert(text)
    ids = set()

    def walk(tokens):
        for t in tokens:
            ids.add(t["id"])
            walk(t["children"])

    walk(md.toc_tokens)
    # Explicit anchors: <a id="..."> / <a name="...">
    ids.update(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", text))
    return ids


_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)


def links(text: str) -> list[str]:
    """Link and image targets outside code: inline ``[t](x)``, reference definitions, HTML."""
    body = re.sub(r"`[^`\n]*`", "", prose(text))
    found = _LINK.findall(body) + _REF_DEF.findall(body)
    found += re.findall(r"<(?:a|img)\s[^>]*(?:href|src)=\"([^\"]+)\"", body)
    return found


def broken_links(path: Path, text: str | None = None) -> list[str]:
    """Every relative link of ``path`` whose file or anchor does not exist, with the reason."""
    text = _source(path) if text is None else text
    problems = []
    for target in links(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if file_part and not dest.exists():
            problems.append(f"{path.name}: {target}: no such file {dest}")
            continue
        if path.parent == DOCS or DOCS in path.parents:
            if DOCS not in dest.parents and dest != DOCS:
                problems.append(f"{path.name}: {target}: outside docs/, so not part of the site")
                continue
        if not anchor:
            continue
        if file_part and (dest.is_dir() or dest.suffix != ".md"):
            problems.append(f"{path.name}: {target}: an anchor into a non-Markdown target")
            continue
        # The README is read on GitHub: its links land on GitHub's rendering of the target. The
        # site's pages are read as MkDocs renders them (with the generated reference).
        if path == README:
            anchors, rules = github_anchors(dest.read_text(encoding="utf-8")), "GitHub"
        else:
            anchors, rules = mkdocs_anchors(text if dest == path else _source(dest)), "MkDocs"
        if anchor not in anchors:
            problems.append(f"{path.name}: {target}: no heading {anchor!r} in {dest.name} ({rules} rules); "
                            f"it has {sorted(anchors)}")
    return problems


# --------------------------------------------------------------------------- deeplab commands

_SHELL_LANGS = {"", "bash", "sh", "shell", "console", "text"}
_SEPARATORS = {"&&", "||", ";", "|", "&"}


class _ParseError(Exception):
    pass


@functools.lru_cache(maxsize=None)
def _raising_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    from deeplab.cli import build_parser

    parser = build_parser()
    subs = _hook().subcommand_parsers(parser)

    def error(message):
        raise _ParseError(message)

    for p in (parser, *subs.values()):
        p.error = error  # argparse calls self.error(); raise instead of exiting
    return parser, subs


def shell_commands(script: str) -> list[list[str]]:
    """The argument lists of every ``deeplab`` invocation in a shell snippet: ``deeplab ARGS``,
    ``python -m deeplab[.cli] ARGS`` and ``torchrun ... -m deeplab ARGS``, one per line after
    joining continuation lines; comments, redirections and the commands around ``&&`` etc. are
    dropped."""
    out = []
    for line in script.replace("\\\n", " ").split("\n"):
        line = re.sub(r"^\s*\$\s+", "", line)
        line = re.sub(r"(?<!\S)\d*(>>?|<)(&\d+|\s*[^\s;&|<>]+)", " ", line)
        try:
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            tokens = list(lexer)
        except ValueError:  # an unbalanced quote in prose inside a text block
            continue
        segment: list[str] = []
        for tok in [*tokens, ";"]:
            if tok not in _SEPARATORS:
                segment.append(tok)
                continue
            words = [w for w in segment if not re.match(r"^[A-Z_][A-Z0-9_]*=", w)]
            if words[:1] == ["deeplab"]:
                out.append(words[1:])
            elif "-m" in words and words.index("-m") + 1 < len(words) \
                    and words[words.index("-m") + 1] in ("deeplab", "deeplab.cli") \
                    and re.search(r"python|torchrun", words[0]):
                out.append(words[words.index("-m") + 2:])
            segment = []
    return out


def check_command(args: list[str], *, fragment: bool = False) -> str | None:
    """Why ``deeplab ARGS`` would not run as written, or None.

    The subcommand must exist and every option be one of its own, spelt out (argparse would
    accept a unique prefix; the docs must not rely on it). ``[...]`` marks optional parts of a
    synopsis and ``...`` elided ones: an elided value stays a value, and a command with an
    elision may leave out required arguments. Then the arguments are parsed by the real parser.
    An inline ``fragment`` of prose (`deeplab eval --report`, `deeplab crf --workers N`) is
    checked for its subcommand and option names only."""
    parser, subs = _raising_parser()
    if not args:
        return None  # `deeplab` alone prints the help
    if args[0] in ("-h", "--help", "--version"):
        return None
    name = args[0]
    if name not in subs:
        return f"no subcommand {name!r} (there are {sorted(subs)})"
    sub = subs[name]
    options = sub._option_string_actions  # argparse keeps its option table private
    cleaned, elided = [], fragment
    for tok in args[1:]:
        tok = tok.lstrip("[").rstrip("]")
        if tok in ("...", "…"):
            prev = cleaned[-1] if cleaned else ""
            action = options.get(prev.split("=")[0]) if prev.startswith("-") else None
            if action is not None and action.nargs != 0 and "=" not in prev:
                cleaned.append("X")  # an elided value
            else:
                elided = True
            continue
        if tok:
            cleaned.append(tok)
    for tok in cleaned:
        if tok.startswith("-") and tok != "-" and not re.match(r"^-\d", tok):
            opt = tok.split("=")[0]
            if opt not in options:
                return f"deeplab {name}: no option {opt!r}"
    if fragment:
        return None
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args([name, *cleaned])
    except _ParseError as e:
        message = str(e)
        if elided and message.startswith("the following arguments are required"):
            return None
        return f"deeplab {name} {' '.join(cleaned)}: {message}"
    except SystemExit as e:  # --help
        if e.code not in (0, None):
            return f"deeplab {name}: exit status {e.code}"
    return None


def documented_commands(path: Path, text: str | None = None) -> list[tuple[list[str], bool]]:
    """The ``deeplab`` commands a page shows: in shell code blocks, and as inline code in its
    prose (``deeplab crf --fp32-lattice``; fragments, which may leave out required arguments)."""
    text = _source(path) if text is None else text
    found = [(args, False) for lang, body in code_blocks(text) if lang in _SHELL_LANGS
             for args in shell_commands(body)]
    for span in re.findall(r"`(deeplab [^`]+)`", prose(text)):
        words = span.split()
        if len(words) > 1 and re.match(r"^([A-Z_<]|\.\.\.)", words[1]):  # `deeplab COMMAND --help`
            continue
        found.extend((args, True) for args in shell_commands(span))
    return found


def bad_commands(path: Path, text: str | None = None) -> list[str]:
    out = []
    for args, fragment in documented_commands(path, text):
        why = check_command(args, fragment=fragment)
        if why:
            out.append(f"{path.name}: {why}")
    return out


# --------------------------------------------------------------------------- the tests


def test_site_builds_without_warnings(tmp_path):
    site = tmp_path / "site"
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(REPO / "mkdocs.yml"),
                          "-d", str(site)], capture_output=True, text=True, cwd=REPO, timeout=600,
                         env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"})
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-5000:]
    assert "WARNING" not in log, log[-5000:]
    # The generated pages hold what they are generated from.
    cli = (site / "cli" / "index.html").read_text(encoding="utf-8")
    _, subs = _raising_parser()
    for name, sub in subs.items():
        assert f'id="deeplab-{name}"' in cli
        for action in sub._actions:
            for opt in action.option_strings:
                assert opt in cli, f"{opt} of deeplab {name} missing from the command-line reference"
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    for name in ("deeplab.models.build_model", "deeplab.weights.load_weights", "deeplab.crf.DenseCRF",
                 "deeplab.data.build_dataset", "deeplab.engine.segment.segment"):
        assert f'id="{name}"' in api, f"{name} missing from the API reference"
    assert (site / "assets" / "camvid_val_overlays.jpg").is_file()


def test_every_page_is_in_the_nav():
    import yaml

    def pages(nav):
        for item in nav:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            if isinstance(value, list):
                yield from pages(value)
            else:
                yield value

    listed = set(pages(yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"]))
    on_disk = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert listed == on_disk


def unclosed_fence(text: str) -> int | None:
    """The line number of a code fence that is never closed (it swallows the rest of the page)."""
    opened = None
    for number, line in enumerate(text.split("\n"), 1):
        m = _FENCE.match(line)
        if opened is None and m:
            opened = (number, m.group(2))
        elif opened is not None and line.strip().startswith(opened[1]):
            opened = None
    return None if opened is None else opened[0]


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_code_fences_are_closed(path):
    assert unclosed_fence(path.read_text(encoding="utf-8")) is None
    assert unclosed_fence("text\n```bash\ndeeplab models\n") == 2


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_links_and_anchors_resolve(path):
    assert broken_links(path) == []


def test_link_checker_finds_broken_links_and_anchors():
    good = "[models](models.md#deeplab-v1-and-v2) [here](#a-b) [web](https://example.org/x#y)\n\n## A: `b`\n"
    assert broken_links(DOCS / "x.md", good) == []
    for bad in ("[m](modelz.md)", "[m](models.md#deeplab-v1-and-v9)", "[h](#a-c)",
                "[s](../scripts/test.sh)", "[r]: models.md#nope", '<img src="assets/none.jpg">'):
        assert broken_links(DOCS / "x.md", good + bad + "\n"), bad
    # The README is checked with GitHub's slugs: a Python-Markdown-only id does not count.
    assert broken_links(README, "[x](docs/models.md#deeplab-v1-and-v2)") == []
    assert broken_links(README, "[x](docs/cli.md#deeplab-segment)")  # generated: not on GitHub
    # A link inside code is not a link.
    assert broken_links(DOCS / "x.md", "`[m](modelz.md)`\n\n```\n[m](modelz.md)\n```\n") == []


def test_slug_rules():
    text = "# The fully connected CRF (`deeplab.crf`)\n## Weights: formats, conversion\n## A\n## A\n## x — y\n"
    assert {"the-fully-connected-crf-deeplabcrf", "weights-formats-conversion", "a", "a_1", "x-y"} \
        == mkdocs_anchors(text)
    assert {"the-fully-connected-crf-deeplabcrf", "weights-formats-conversion", "a", "a-1", "x--y"} \
        == github_anchors(text)


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_documented_commands_parse(path):
    assert bad_commands(path) == []


def test_the_command_checker_reads_the_pages_and_can_fail():
    shown = [args for p in _markdown_files() for args, _ in documented_commands(p)]
    _, subs = _raising_parser()
    assert len(shown) > 100
    assert {args[0] for args in shown if args} == set(subs), "some subcommand is never shown"
    assert shell_commands("mkdir -p runs && deeplab train c.yaml --out r --no-progress 2> r.log # note\n"
                          "torchrun --nproc-per-node 2 -m deeplab.cli eval --dataset camvid \\\n"
                          "    --data-root d") \
        == [["train", "c.yaml", "--out", "r", "--no-progress"], ["eval", "--dataset", "camvid", "--data-root", "d"]]
    ok = ["deeplab segment a.jpg --out o/ --crf", "deeplab eval --dataset camvid --data-root ... --limit 5",
          "deeplab train C.yaml --out R [--set a.b=1 ...] [--resume]", "deeplab models --names"]
    bad = ["deeplab segmnt a.jpg", "deeplab segment a.jpg --out o/ --crff",  # misspelt
           "deeplab segment a.jpg --ou o/",  # a prefix argparse would accept
           "deeplab eval --dataset camvid",  # a required option missing, no elision
           "deeplab eval --dataset camvid --data-root d --limit five",  # a bad value
           "deeplab crf --images i --probs p --out o --palette cityscapes",  # not a choice
           "deeplab models extra"]  # an argument the command does not take
    for cmd in ok:
        assert check_command(shell_commands(cmd)[0]) is None, cmd
    for cmd in bad:
        assert check_command(shell_commands(cmd)[0]) is not None, cmd
    page = "```bash\ndeeplab segment a.jpg --out o/ --crff\n```\nInline: `deeplab crf --fp32-latice`.\n"
    assert len(bad_commands(DOCS / "x.md", page)) == 2
    assert bad_commands(DOCS / "x.md", "Inline: `deeplab crf --workers N`, `deeplab COMMAND --help`.") == []


def test_readme_is_short_and_points_into_the_docs():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 300
    assert "bash scripts/test.sh" in text and "pip install -c constraints.txt -e ." in text
    linked = {t.split("#")[0] for t in links(text)}
    for page in ("getting-started", "models", "weights", "datasets", "training", "evaluation",
                 "segmentation", "crf", "cli", "api", "model-cards", "benchmarks", "development"):
        assert f"docs/{page}.md" in linked


def test_readme_python_example_runs_and_prints_what_it_says(shared_data, monkeypatch, capsys):
    """The README's example, run as shown from the repository root; each ``print(...)  # out``
    must print ``out``."""
    text = README.read_text(encoding="utf-8")
    blocks = [body for lang, body in code_blocks(text) if lang == "python"]
    assert blocks, "the README has no Python example"
    monkeypatch.chdir(REPO)
    for body in blocks:
        code = body.replace("../shared/data", str(shared_data))
        exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
        printed = capsys.readouterr().out.splitlines()
        expected = [m.group(1).strip() for m in re.finditer(r"^print\(.*?\)[ \t]+#[ \t]*(.+)$", body, re.M)]
        assert expected, "each Python example states what it prints (print(...)  # output)"
        assert printed == expected


def test_readme_figure_is_drawn_from_the_packaged_model(camvid_root, tmp_path):
    """The committed picture records the sha256 of the weights it was drawn from; the script
    still draws it."""
    from PIL import Image

    from deeplab.fileio import sha256_file
    from deeplab.weights import default_weights_path

    figure = DOCS / "assets" / "camvid_val_overlays.jpg"
    assert "docs/assets/camvid_val_overlays.jpg" in README.read_text(encoding="utf-8")
    assert figure.stat().st_size < 300_000
    with Image.open(figure) as im:
        recorded = im.info.get("comment", b"").decode()
    assert f"weights sha256 {sha256_file(default_weights_path())}" in recorded, (
        "the README's picture was drawn from other weights: run python scripts/make_readme_figure.py")
    out = tmp_path / "fig.jpg"
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "make_readme_figure.py"), "--data-root",
                          str(camvid_root), "--ids", "0016E5_07959", "--out", str(out)],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    with Image.open(out) as im:
        assert im.width == 3 * 320 + 2 * 4
        assert sha256_file(default_weights_path()) in im.info["comment"].decode()
