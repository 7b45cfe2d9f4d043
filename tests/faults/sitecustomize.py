"""Fault injection for tests: put this folder on PYTHONPATH and set DLSWEEP_TEST_FAULT to a Python
expression over a TrainConfig's fields (e.g. ``labels == 20``); every process that trains, Ray's
workers included, then raises inside ``train`` for the configs it matches."""

import os

FAULT = os.environ.get("DLSWEEP_TEST_FAULT")
if FAULT:
    import dataclasses

    import dlcore.train as T

    _real = T.train

    def train(cfg, report=None, data=None, **kw):
        if eval(FAULT, {}, dataclasses.asdict(cfg)):  # noqa: S307 -- the test's own expression
            raise RuntimeError(f"injected fault: {FAULT}")
        return _real(cfg, report, data, **kw)

    T.train = train
