"""Threefry lowered without loops in the tests' processes: the same random bits, compiled in
half the time.

On the CPU, JAX lowers its threefry2x32 hash (behind every jax.random draw) as a 5-iteration
loop; on other platforms, as its 20 rounds unrolled. Both are the same integer arithmetic, so
they give the same bits (tests/test_init.py checks it on several draws). A jitted model init
draws once per parameter, one loop each: GoogLeNet's init compiled in 7.8-7.9 s with the loops
and in 4.2-4.4 s unrolled at the tests' -O0 (experiments/RESULTS.md, issue 25). Users get
JAX's lowering; only the tests' processes (conftest.py, and the warm server's children,
warm_python.py) take this one. With a JAX that no longer has these internals, nothing changes.
"""


def lower_threefry_on_cpu(unrolled: bool = True) -> bool:
    """Registers JAX's unrolled threefry lowering for the CPU (unrolled=False: JAX's own, with
    the loop, back); whether this JAX has them."""
    try:
        from jax._src.interpreters import mlir
        from jax._src.random import threefry2x32
    except ImportError:
        return False
    name = "_threefry2x32_lowering_rule" if unrolled else "_threefry2x32_cpu_lowering_rule"
    rule = getattr(threefry2x32, name, None)
    primitive = getattr(threefry2x32, "threefry2x32_p", None)
    if rule is None or primitive is None:
        return False
    mlir.register_lowering(primitive, rule, platform="cpu")
    return True
