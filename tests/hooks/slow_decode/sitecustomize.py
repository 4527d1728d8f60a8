"""Test-only (tests/test_extract.py, the kill-and-resume test): slow the extract stage's decoding, in every
process of a run, so that a kill lands mid-run.

A test puts this folder first on ``PYTHONPATH`` of the ``extract`` it starts; Python imports this module at
start-up in the driver and in every Ray worker (they inherit the environment). When ``pipeline.decode`` is
imported, its ``probe`` (the first call of each video's decode task) is wrapped to sleep
:data:`DELAY_S` first. Nothing is imported early: the run imports ``pipeline`` from where it always does.
"""
import importlib.abc
import sys
import time

DELAY_S = 0.5
TARGET = "pipeline.decode"


def _slow(fn):
    def probe(*args, **kwargs):
        time.sleep(DELAY_S)
        return fn(*args, **kwargs)

    return probe


class _Patcher(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        try:
            import importlib.util
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            module.probe = _slow(module.probe)

        loader.exec_module = exec_and_patch
        return spec


sys.meta_path.insert(0, _Patcher())
