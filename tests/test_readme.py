"""The docs equal the code: every signature the README shows for a public function of ``sparsevila_ops`` is
the real one, and the repository carries its own op contract (no pointers to documents outside it)."""
import ast
import inspect
import re
import subprocess
from pathlib import Path

import pytest

import sparsevila_ops as so

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PUBLIC = {n: getattr(so, n) for n in so.__all__ if callable(getattr(so, n))}
# A code span that is exactly `name(...)` or `sparsevila_ops.name(...)` for a public name.
SPAN = re.compile(r"`(?:sparsevila_ops\.)?(" + "|".join(sorted(PUBLIC, key=len, reverse=True)) + r")\((.*?)\)`")


def _shown_signatures(text: str):
    """(name, params source, line) of every span that parses as a parameter list. A span that does not (a call
    with literal arguments, such as ``use_backend("reference")``) is an example, not a signature; a table row
    that starts with a public name must always be a signature."""
    found = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for m in SPAN.finditer(line):
            name, params = m.group(1), m.group(2)
            try:
                ast.parse(f"def {name}({params}): pass")
            except SyntaxError:
                assert not line.startswith(f"| {m.group(0)}"), f"README.md:{lineno}: {m.group(0)} is not a signature"
                continue
            found.append((name, params, lineno))
    return found


def _params(name: str, params: str):
    """[(name, kind, default)] of ``def name(params)``, as ``inspect`` would report them."""
    args = ast.parse(f"def {name}({params}): pass").body[0].args
    P = inspect.Parameter
    out = []
    positional = [(a, P.POSITIONAL_ONLY) for a in args.posonlyargs] + [(a, P.POSITIONAL_OR_KEYWORD) for a in args.args]
    defaults = [P.empty] * (len(positional) - len(args.defaults)) + [ast.literal_eval(d) for d in args.defaults]
    out += [(a.arg, kind, d) for (a, kind), d in zip(positional, defaults)]
    if args.vararg:
        out.append((args.vararg.arg, P.VAR_POSITIONAL, P.empty))
    out += [(a.arg, P.KEYWORD_ONLY, P.empty if d is None else ast.literal_eval(d))
            for a, d in zip(args.kwonlyargs, args.kw_defaults)]
    if args.kwarg:
        out.append((args.kwarg.arg, P.VAR_KEYWORD, P.empty))
    return out


def _actual(fn):
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


SHOWN = _shown_signatures(README.read_text())


def test_readme_shows_a_signature_for_every_public_function():
    assert set(PUBLIC) - {name for name, _, _ in SHOWN} == set()


@pytest.mark.parametrize("name,params,lineno", SHOWN, ids=[f"{n}@{ln}" for n, _, ln in SHOWN])
def test_readme_signature_equals_the_code(name, params, lineno):
    shown, actual = _params(name, params), _actual(PUBLIC[name])
    assert shown == actual, (f"README.md:{lineno} shows {name}({params});\nthe code is {name}"
                             f"{inspect.signature(PUBLIC[name])}")


def test_signature_parser_sees_kinds_and_defaults():
    """The comparison is strict: a wrong name, a lost ``*`` or a wrong default each fail it."""
    actual = _actual(so.prune_visual_tokens)
    assert _params("f", "salience, seg_lens, keep_ratio, *, group=1") == actual
    for wrong in ("salience, seg_lens, keep_ratio, group=1", "salience, seg_lens, keep_ratio, *, group=4",
                  "salience, lens, keep_ratio, *, group=1"):
        assert _params("f", wrong) != actual


def _repo_files():
    """Files git tracks or would track (untracked, not ignored), outside bench/results."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / f for f in out.splitlines() if not f.startswith("bench/results/") and (ROOT / f).is_file()]


# Documents that live outside the repository: the op contract is docs/ops.md, the targets bench/NOTES.md.
OUTSIDE = re.compile(r"\b(?:DESIGN|ANCHORS)\.md\b|\.\./shared\b")


def test_no_file_points_at_documents_outside_the_repository():
    hits = []
    for path in _repo_files():
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        rel = path.relative_to(ROOT).as_posix()
        hits += [f"{rel}:{i}: {line.strip()}" for i, line in enumerate(text.splitlines(), 1)
                 if OUTSIDE.search(line)]
    assert not hits, "point at docs/ops.md or bench/NOTES.md instead:\n" + "\n".join(hits)


def test_op_contract_is_in_the_repository():
    doc = (ROOT / "docs" / "ops.md").read_text()
    for name in PUBLIC:
        if name != "use_backend":
            assert f"`{name}(" in doc, f"docs/ops.md does not show {name}"
