"""A pytest plugin: one line per trace, lowering and backend compile JAX reports
(jax.monitoring): kind, seconds, program, test; appended to $FUN_OUT (default /tmp/fun.txt).
googlenet_compiles_3e2b7fd.log lists a run's backend compiles over 1 s:

PYTHONPATH=experiments/logs/ci_time_20261207 python -m pytest -q -p compiles_plugin ...
"""

import os

import pytest

KINDS = ("backend_compile_duration", "jaxpr_trace_duration", "jaxpr_to_mlir_module_duration")
_current = ["?"]


def _listener(event, duration, **kwargs):
    kind = event.rsplit("/", 1)[-1]
    if kind in KINDS:
        with open(os.environ.get("FUN_OUT", "/tmp/fun.txt"), "a") as f:
            f.write(f"{kind[:5]} {duration:7.3f} {kwargs.get('fun_name', '?')} {_current[0]}\n")


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    from jax import monitoring

    monitoring.register_event_duration_secs_listener(_listener)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _current[0] = item.nodeid.split("::")[-1][:60]
    yield
