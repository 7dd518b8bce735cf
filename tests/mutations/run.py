"""Mutation check of the README's promises: each break of tests/mutations/breaks.py is applied
to a copy of the repository, and the tests named for it must fail there.

    python tests/mutations/run.py              # every break; exit 1 if any survives
    python tests/mutations/run.py --list       # the breaks, by promise
    python tests/mutations/run.py --only NAME  # one break (repeatable, or NAME,NAME)

The working tree is never touched: the repository (without .git and caches) is copied once
into a temporary folder, and each break runs in a fresh copy of that. Its tests run with the
copy's ``src`` first on ``PYTHONPATH``; a small pytest plugin checks that ``visiontune`` is
imported from there and not from the installed package. Before the breaks, the named tests run
once on the unbroken copy: a test that fails there would "catch" every break for the wrong
reason. A break whose original text is not found exactly once stops the run before anything
is started (the list must move with the code).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

from breaks import BREAKS, Break  # noqa: E402

# Not copied: anywhere, caches and build metadata; at the top, git and what runs leave behind.
IGNORED_ANYWHERE = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", "*.egg-info")
IGNORED_AT_TOP = {".git", ".benchmarks", "runs", "demo"}
GUARD = "visiontune_mutation_guard"
GUARD_SOURCE = textwrap.dedent('''
    """Fails the pytest session unless visiontune is imported from the mutated copy."""
    import os
    from pathlib import Path

    import pytest


    def pytest_configure(config):
        import visiontune

        expected = Path(os.environ["VISIONTUNE_MUTATION_SRC"]).resolve()
        got = Path(visiontune.__file__).resolve()
        if expected not in got.parents:
            raise pytest.UsageError(f"visiontune imported from {got}, not from the copy {expected}")
''')
TIMEOUT_S = 900  # one break's tests; a hang counts as caught, and says so


def check_in_step(breaks: list[Break], root: Path = REPO) -> list[str]:
    """Every break's original text must occur exactly once in its file, and every named test
    file must exist; the problems, one line each."""
    problems = []
    for b in breaks:
        path = root / b.file
        if not path.is_file():
            problems.append(f"{b.name}: {b.file} does not exist")
            continue
        count = path.read_text(encoding="utf-8").count(b.original)
        if count != 1:
            where = "not found" if count == 0 else f"found {count} times"
            problems.append(f"{b.name}: the original text is {where} in {b.file} (the code moved: "
                            f"update tests/mutations/breaks.py): {b.original!r}")
        for test in b.tests:
            if not (root / test.split("::", 1)[0]).is_file():
                problems.append(f"{b.name}: test file of {test} does not exist")
    return problems


def apply(b: Break, root: Path) -> None:
    path = root / b.file
    text = path.read_text(encoding="utf-8")
    assert text.count(b.original) == 1, f"{b.name}: original text not found exactly once"
    path.write_text(text.replace(b.original, b.replacement), encoding="utf-8")


def run_tests(root: Path, tests: list[str], guard_dir: Path, report: Path,
              stop_at_first: bool) -> tuple[int, str, bool]:
    """pytest on ``tests`` inside ``root``: (exit code, output tail, timed out)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=os.pathsep.join([str(root / "src"), str(guard_dir)]),
               VISIONTUNE_MUTATION_SRC=str(root / "src"), PYTHONDONTWRITEBYTECODE="1",
               HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", GUARD, "-p", "no:cacheprovider",
           "-m", "", "--junitxml", str(report), "-o", "junit_family=xunit1",
           *(["-x"] if stop_at_first else []), *(str(root / t) for t in tests)]
    try:
        done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True,
                              timeout=TIMEOUT_S, start_new_session=True)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return -1, out[-3000:], True
    return done.returncode, (done.stdout + done.stderr)[-3000:], False


def outcomes(report: Path) -> dict[str, str]:
    """test id -> passed, failed, error or skipped (from pytest's JUnit XML)."""
    if not report.is_file():
        return {}
    found = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag for child in case}
        found[name] = ("failed" if "failure" in kinds else "error" if "error" in kinds
                       else "skipped" if "skipped" in kinds else "passed")
    return found


def verdict(code: int, seen: dict[str, str], timed_out: bool) -> tuple[str, bool]:
    """(what one break's test run says, whether that is a pass of the check)."""
    if timed_out:
        return "caught (the tests timed out)", True
    values = set(seen.values())
    if code in (1, 2, 3) and values & {"failed", "error"} or code in (2, 3):
        failed = sorted(t for t, o in seen.items() if o in ("failed", "error"))
        return f"caught by {failed[0] if failed else 'a collection error'}", True
    if code == 0 and "passed" in values:
        return "SURVIVED", False
    if code in (0, 5) and values <= {"skipped"}:
        return "NOT RUN: its tests were skipped or not collected", False
    return f"ERROR: pytest exit code {code}", False


def fresh_copy(source: Path, target: Path) -> Path:
    def ignore(folder: str, names: list[str]) -> set[str]:
        top = IGNORED_AT_TOP & set(names) if Path(folder) == source else set()
        return top | IGNORED_ANYWHERE(folder, names)

    shutil.copytree(source, target, ignore=ignore, symlinks=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="list the breaks and exit")
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help="run only these breaks (repeatable, or comma-separated)")
    parser.add_argument("--jobs", type=int, default=2,
                        help="breaks tested at the same time (default 2: their start-up is one core's work)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the run of the named tests on the unbroken copy")
    args = parser.parse_args(argv)

    names = [n for value in args.only for n in value.split(",") if n]
    unknown = sorted(set(names) - {b.name for b in BREAKS})
    if unknown:
        print(f"unknown break(s): {', '.join(unknown)} (see --list)", file=sys.stderr)
        return 2
    chosen = [b for b in BREAKS if not names or b.name in names]

    if args.list:
        for promise in dict.fromkeys(b.promise for b in chosen):
            print(promise)
            for b in (b for b in chosen if b.promise == promise):
                print(f"  {b.name}: {b.file}")
                print(f"      {b.original.strip()!r} -> {b.replacement.strip()!r}")
                for test in b.tests:
                    print(f"      {test}")
        return 0

    problems = check_in_step(chosen)
    if problems:
        print("the break list is out of step with the code:", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        return 2

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="visiontune-mutations-") as tmp:
        tmp = Path(tmp)
        guard_dir = tmp / "guard"
        guard_dir.mkdir()
        (guard_dir / f"{GUARD}.py").write_text(GUARD_SOURCE, encoding="utf-8")
        pristine = fresh_copy(REPO, tmp / "pristine")

        if not args.no_baseline:
            tests = list(dict.fromkeys(t for b in chosen for t in b.tests))
            chunks = [tests[i::args.jobs] for i in range(args.jobs) if tests[i::args.jobs]]
            with ThreadPoolExecutor(max_workers=len(chunks)) as pool:
                runs = list(pool.map(lambda i: run_tests(pristine, chunks[i], guard_dir,
                                                         tmp / f"baseline-{i}.xml", False),
                                     range(len(chunks))))
            bad = sorted(t for i in range(len(chunks)) for t, o in outcomes(tmp / f"baseline-{i}.xml").items()
                         if o in ("failed", "error"))
            print(f"baseline: {len(tests)} test id(s) pass on the unbroken copy "
                  f"[{time.monotonic() - started:.0f} s]", flush=True)
            broken = [(code, tail) for code, tail, timed_out in runs if timed_out or code != 0]
            if broken or bad:
                print(f"the named tests do not pass on the unbroken code: {', '.join(bad) or 'see below'}\n"
                      + "\n".join(tail for _, tail in broken), file=sys.stderr)
                return 2

        def one(number: int, b: Break) -> tuple[str, bool, str]:
            began = time.monotonic()
            copy = fresh_copy(pristine, tmp / f"break-{number}")
            apply(b, copy)
            code, tail, timed_out = run_tests(copy, list(b.tests), guard_dir,
                                              tmp / f"break-{number}.xml", stop_at_first=True)
            text, ok = verdict(code, outcomes(tmp / f"break-{number}.xml"), timed_out)
            shutil.rmtree(copy, ignore_errors=True)
            print(f"{'ok  ' if ok else 'FAIL'} {b.name}: {text} [{time.monotonic() - began:.0f} s]"
                  + ("" if ok else "\n" + textwrap.indent(tail.strip()[-1500:], "      ")), flush=True)
            return text, ok, tail

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = [pool.submit(one, number, b) for number, b in enumerate(chosen, 1)]
            results = [(b, *future.result()) for b, future in zip(chosen, futures)]

    print("\nby promise:")
    for promise in dict.fromkeys(b.promise for b, *_ in results):
        print(f"  {promise}")
        for b, text, ok, _ in (r for r in results if r[0].promise == promise):
            print(f"    {'caught  ' if ok else 'SURVIVED' if text == 'SURVIVED' else 'FAILED  '} {b.name}: {text}")
    failed = [b.name for b, _, ok, _ in results if not ok]
    print(f"\n{len(results) - len(failed)} of {len(results)} break(s) caught "
          f"in {time.monotonic() - started:.0f} s" + (f"; not caught: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
