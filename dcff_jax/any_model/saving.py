"""DCFF's checkpoints and exports on disk, each beside its plan (plan.json): save, load,
export (variables, plan and StableHLO)."""

from __future__ import annotations

from typing import Any

import jax

from dcff_jax.any_model.plan import PLAN_FILE, Plan


def save(dcff, directory: str, fused) -> None:
    """DCFF.save."""
    _write(directory, "state", _state_of(fused, dcff.is_nnx), dcff.plan)


def load_state(dcff, directory: str, example):
    """(dcff, fused) with the fused state `save` wrote to `directory` (DCFF.load)."""
    if dcff.is_nnx:
        fused = dcff.fused()
        abstract = _state_of(fused, True)
    else:
        fused = None
        abstract = jax.eval_shape(
            lambda x: dcff.fused().init(jax.random.key(0), x, **dcff.apply_kwargs),
            jax.ShapeDtypeStruct(tuple(example.shape), example.dtype),
        )
    restored = _restore(directory, "state", abstract)
    if dcff.is_nnx:
        from flax import nnx

        nnx.update(fused, restored)
        return dcff, fused
    return dcff, restored


def export(dcff, directory: str, fused, example) -> tuple[Any, Any]:
    """DCFF.export."""
    from dcff_jax import storage
    from dcff_jax.deploy.stablehlo import STABLEHLO, batch_polymorphic_stablehlo

    if dcff.is_nnx:
        from flax import nnx

        model, variables = dcff.compact(fused), None
        graphdef, state = nnx.split(model)

        def logits(x):
            return nnx.merge(graphdef, state)(x)

    else:
        model, variables = dcff.compact(fused)

        def logits(x):
            return model.apply(variables, x, **dcff.apply_kwargs)

    _write(
        directory,
        "variables",
        _state_of(model if dcff.is_nnx else variables, dcff.is_nnx),
        dcff.plan,
    )
    module = batch_polymorphic_stablehlo(logits, example.shape[1:], example.dtype)
    storage.write_text_atomic(storage.resolve(directory) / STABLEHLO, module)
    return model, variables


def _state_of(fused, is_nnx: bool):
    if not is_nnx:
        return fused
    from flax import nnx

    return nnx.state(fused)


def _write(directory: str, name: str, tree, plan: Plan) -> None:
    import orbax.checkpoint as ocp

    from dcff_jax import storage

    root = storage.ensure_dir(storage.resolve(directory))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(root / name, tree, force=True)
        checkpointer.wait_until_finished()
    storage.write_text_atomic(root / PLAN_FILE, plan.to_json())


def read_plan(directory: str) -> Plan:
    from dcff_jax import storage
    from dcff_jax.errors import MissingFileError

    path = storage.resolve(directory) / PLAN_FILE
    if not path.exists():
        raise MissingFileError(f"{path} does not exist: {directory} is not a dcff-jax save")
    return Plan.from_json(path.read_text())


def _restore(directory: str, name: str, abstract):
    import orbax.checkpoint as ocp

    from dcff_jax import storage
    from dcff_jax.errors import DataError

    try:
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore(storage.resolve(directory) / name, abstract)
    except Exception as e:
        raise DataError(
            f"{directory}/{name} is corrupt or unreadable ({type(e).__name__}: {e})"
        ) from e
