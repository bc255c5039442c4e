"""DCFF on an unmodified Flax model (linen or nnx): a traced plan, the fused training model, the
compact export.

    dcff = dcff_jax.DCFF(model, images[:1], rates=0.5, apply_kwargs={"train": False})
    print(dcff.plan.table())
    fused = dcff.fused()              # train this (linen: a Module; nnx: a resized copy)
    compact, compact_vars = dcff.compact(fused_variables)   # nnx: dcff.compact(fused_model)

Which convs fuse, and how their widths couple, comes from tracing the model
(dcff_jax.jaxpr.channels): a conv whose outputs only reach channel-wise ops and then convs or dense
layers fuses freely; outputs that meet at a residual add form a group that shares one rate and one
kept width (each conv fusing independently into the same slots); concat branches fuse independently;
a flatten into a dense layer shrinks its input; a depthwise conv follows its producer; a zero pad of
the channels meeting an add (an option-A shortcut) follows the widths. Everything else is reported
with the reason.

Rates: a number for every fusable conv, or a mapping from glob patterns over layer paths
("layer1/*/conv1", "*") to rates, the first matching pattern winning (unmatched convs are not
fused; rate 0 fuses all c filters into c, as the published code's rate-0 layers do); or
target_macs_reduction / target_params_reduction, searched by dcff_jax.search_rates over one
rate per group. Convs of one group must resolve to one rate. `exclude` patterns are never fused;
`unfused` patterns are trained at their group's width without fusion (the published ResNet-50's
downsample convs).

The plan is a value (`Plan.to_json` / `Plan.from_json`), saved beside checkpoints and exports
(`DCFF.save`, `DCFF.export`); building from a saved plan re-traces the model and refuses a model
whose convs no longer match it, so a changed model can never silently remap layers.

Linen: the fused model is a Module wrapping yours whose variables have the same paths; each fused
conv keeps all c filters in params and its fusion state in the "fusion" collection (as
dcff_jax.FusedConv), so `dcff_jax.update_fusion` and `dcff_jax.compact_variables` apply as is.
nnx: the fused model is a copy of yours with each fused conv wrapped (FusedConvNNX) and its
consumers resized; `update_fusion_nnx` updates it in place.

Modules: plan (Plan and how it is made), tracing (the one trace of the model), linen and nnx
(the two rewrites), dcff (the DCFF entry point).
"""

from dcff_jax.any_model.dcff import DCFF, make_plan
from dcff_jax.any_model.linen import FusedLinen
from dcff_jax.any_model.plan import NO_RATE, PLAN_FILE, PLAN_FORMAT, Plan, PlannedConv

# The nnx names are imported on first use (PEP 562): importing flax.nnx takes ~0.4 s, which a
# linen user and every `python -m dcff_jax.main` run would otherwise pay at start.
_NNX_NAMES = ("FusedConvNNX", "FusionState", "compact_nnx", "update_fusion_nnx")


def __getattr__(name: str):
    if name in _NNX_NAMES:
        from dcff_jax.any_model import nnx

        return getattr(nnx, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DCFF",
    "NO_RATE",
    "PLAN_FILE",
    "PLAN_FORMAT",
    "FusedConvNNX",
    "FusedLinen",
    "FusionState",
    "Plan",
    "PlannedConv",
    "compact_nnx",
    "make_plan",
    "update_fusion_nnx",
]
