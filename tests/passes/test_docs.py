"""The public docstrings' examples run and print what they say."""

from __future__ import annotations

import doctest

import revcompile.api


def test_analyze_docstring_example() -> None:
    finder = doctest.DocTestFinder()
    (test,) = finder.find(revcompile.api.analyze, "analyze")
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    assert runner.summarize(verbose=False).failed == 0
