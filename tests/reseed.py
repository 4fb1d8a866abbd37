"""A pytest plugin that re-runs the hypothesis fuzzers un-derandomized, with seed ``$RESEED`` (default 1) and, if
``$RESEED_N`` is set, that many examples each. The fuzzers are derandomized so that CI draws the same cases every
run; this draws others, to find what the fixed cases miss:

    RESEED=7 PYTHONPATH=tests .venv/bin/python -m pytest -p reseed -m "not slow" tests/test_engine_fuzz.py
"""
import os

from hypothesis import settings


def pytest_collection_modifyitems(items):
    seed = int(os.environ.get("RESEED", "1"))
    n = os.environ.get("RESEED_N")
    for item in items:
        fn = getattr(item, "obj", None)
        if fn is None or not hasattr(fn, "hypothesis"):
            continue
        kw = dict(derandomize=False, database=None)
        if n:
            kw["max_examples"] = int(n)
        # (a test's settings cannot be decorated twice: replaced where hypothesis keeps them)
        fn._hypothesis_internal_use_settings = settings(fn._hypothesis_internal_use_settings, **kw)
        fn._hypothesis_internal_use_seed = seed
