"""The figures written in docs/*.md that come from a quick command still come from it
(benchmarks/docs_check.py: the commands are read from the documents and rerun as written)."""

from __future__ import annotations

import sys

import pytest

from conftest import REPO, SHARED

sys.path.insert(0, str(REPO / "benchmarks"))
import docs_check  # noqa: E402

@pytest.mark.realdata
@pytest.mark.slow  # the real MobileNetV2 on ../shared/data: tens of seconds each
@pytest.mark.parametrize("name", docs_check.QUICK)
def test_the_figures_in_the_docs_come_from_their_command(name, tmp_path):
    if not (SHARED / "data").is_dir() or not (SHARED / "models" / "mobilenetv2-12-int8.onnx").is_file():
        pytest.skip(f"real data or the MobileNetV2 not present under {SHARED} (see ../shared/data/README.md)")
    check = docs_check.CHECKS[name]
    expected, actual = docs_check.run_check(check, tmp_path)
    problems = docs_check.differences(expected, actual, check.tolerance)
    assert not problems, f"docs/{check.doc} ({name}): rerun `python benchmarks/docs_check.py --only {name} --show`\n" + "\n".join(problems)


def test_the_checker_compares_words_exactly_and_numbers_within_the_tolerance():
    assert docs_check.differences("a 1.52 b", "a 1.52 b", docs_check._scores) == []
    assert docs_check.differences("a 1.524 b", "a 1.52 b", docs_check._scores)  # a changed figure is found
    assert docs_check.differences("| x | 92.7 |", "| x | 92.8 |", docs_check._percent) == []  # a unit of the last digit
    assert docs_check.differences("| x | 92.7 |", "| x | 100.0 |", docs_check._percent)
    assert docs_check.differences("true,false", "false,false", docs_check._scores)
    assert docs_check.commands("D=../d; B=onnx:m\nlakead fit $D/a -c x \\\n  --backbone $B  # note\n") == [
        ["fit", "../d/a", "-c", "x", "--backbone", "onnx:m"]]
