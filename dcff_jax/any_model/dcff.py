"""DCFF: the entry point (plan, fused model, compact model, save, load, export)."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from flax import linen as nn

from dcff_jax.any_model import linen, saving
from dcff_jax.any_model.linen import FusedLinen
from dcff_jax.any_model.plan import (
    Plan,
    check_plan,
    check_rates_given,
    plan_from_trace,
    plan_widths,
)
from dcff_jax.any_model.tracing import is_nnx, trace_model
from dcff_jax.errors import ConfigError

# --- The entry point --------------------------------------------------------------------------


class DCFF:
    """DCFF for an unmodified Flax model: its plan, fused training model and compact export.

    Args:
      model: a flax.linen Module or an nnx.Module, unchanged (traced in eval mode).
      example: an input batch (NHWC; only its shape and dtype are used).
      rates: one rate for every fusable conv, or {glob over module paths: rate} (first match
        wins; unmatched convs are not fused; rate 0 fuses c filters into c).
      exclude: glob patterns of convs never fused (their group is not fused either).
      unfused: glob patterns of convs in a fused group that are not fused but trained directly
        at the group's kept width (the published ResNet-50's downsample convs).
      target_macs_reduction / target_params_reduction: instead of rates, search one rate per
        group for these fractions of conv + dense MACs and of trainable parameters removed
        (dcff_jax.search_rates; either or both).
      plan: a saved Plan (Plan.from_json) instead of rates; the model is checked against it.
      apply_kwargs: the linen call's eval-mode arguments, e.g. {"train": False}.
    """

    def __init__(
        self,
        model,
        example,
        rates: float | Mapping[str, float] | None = None,
        *,
        exclude: Sequence[str] = (),
        unfused: Sequence[str] = (),
        target_macs_reduction: float | None = None,
        target_params_reduction: float | None = None,
        plan: Plan | None = None,
        apply_kwargs: Mapping[str, Any] | None = None,
    ):
        self.model = model
        self.is_nnx = is_nnx(model)
        self.apply_kwargs = dict(apply_kwargs or {})
        self._example = jax.ShapeDtypeStruct(tuple(example.shape), example.dtype)
        self._traced = trace_model(model, example, self.apply_kwargs)
        if plan is None:
            targets = (target_macs_reduction, target_params_reduction)
            check_rates_given(rates, targets)
            plan = plan_from_trace(self._traced, self.is_nnx, rates, exclude, targets, unfused)
        else:
            check_plan(plan, self._traced, self.is_nnx)
        self.plan = plan

    def replanned(
        self,
        rates: float | Mapping[str, float] | None = None,
        *,
        exclude: Sequence[str] = (),
        unfused: Sequence[str] = (),
        target_macs_reduction: float | None = None,
        target_params_reduction: float | None = None,
    ) -> DCFF:
        """The same model's DCFF with another plan (the constructor's planning options),
        without tracing the model again."""
        targets = (target_macs_reduction, target_params_reduction)
        check_rates_given(rates, targets)
        new = copy.copy(self)
        new.plan = plan_from_trace(self._traced, self.is_nnx, rates, exclude, targets, unfused)
        return new

    def counts(
        self, convention: str = "thop", *, compact: bool = True, uncounted: Sequence[str] = ()
    ):
        """FLOPs and params (dcff_jax.flops.Counts) of the plan's compact model (compact=False:
        of the model as given), at the example's batch, counted from the one trace: no model
        is built. convention: "thop" (linen only: nnx layer calls are not seen) or "macs".
        uncounted: paths of layers left out."""
        if self.is_nnx and convention != "macs":
            raise ConfigError(
                f"convention {convention!r} counts layer calls, which an nnx model does not "
                "show: count it with convention='macs'"
            )
        kept = plan_widths(self.plan, self._traced, self.is_nnx) if compact else None
        return self._traced.counts(kept, convention, tuple(uncounted))

    def _linen_layers(self, fused: bool) -> tuple:
        layers = [
            (c.path, c.kept, c.filters if fused and c.fused else 0, 0)
            for c in self.plan.convs
            if c.fused or c.resized
        ]
        layers += [(path, 0, 0, 1) for path in self.plan.followers]
        return tuple(layers)

    def fused(self):
        """The fused training model (linen: a Module; nnx: a resized copy of the model).

        A layer whose width the plan narrows keeps its first channels' values, unscaled: nnx
        copies them from the model (zero, constant, N(0, s) or pretrained weights are kept as
        they are); linen modules hold no values, so pass yours through `fused_variables`
        (`fused().init` draws fresh values at the new widths instead)."""
        if self.is_nnx:
            from dcff_jax.any_model.nnx import fuse_nnx

            return fuse_nnx(self.model, self.plan, self._traced)
        return FusedLinen(self.model, self._linen_layers(True))

    def fused_variables(self, variables, key: jax.Array | None = None):
        """linen: the fused model's variables from the model's `variables` (full width), as
        nnx's `fused()` makes them: narrowed layers keep their first channels' values unscaled,
        fused convs all their filters; the "fusion" state is fresh (from `key`, default 0).

        Raises ConfigError if `variables` are not the traced model's (paths or shapes)."""
        return linen.fused_variables(self, variables, key)

    def compact_model(self) -> nn.Module:
        """linen: the compact model (plain convs at the kept widths) for compact_variables."""
        if self.is_nnx:
            raise TypeError("for an nnx model, call compact(fused_model)")
        return FusedLinen(self.model, self._linen_layers(False))

    def compact(self, fused):
        """linen: fused variables -> (compact Module, its variables); nnx: fused model -> the
        compact model. Eval-mode logits are the fused model's."""
        if self.is_nnx:
            from dcff_jax.any_model.nnx import compact_nnx

            return compact_nnx(fused)
        from dcff_jax.deploy.compact import compact_variables

        return self.compact_model(), compact_variables(fused)

    # --- Checkpoints and exports, each with its plan -------------------------------------------

    def save(self, directory: str, fused) -> None:
        """Write a fused training state (linen: its variables; nnx: the fused model) to
        `directory` as an orbax checkpoint ("state") beside the plan ("plan.json"), so that
        `DCFF.load` can refuse a model that changed since."""
        saving.save(self, directory, fused)

    @classmethod
    def load(cls, directory: str, model, example, apply_kwargs=None):
        """(DCFF, fused) from a `save`d directory: linen fused variables, or the nnx fused model.

        Raises ConfigError if `model` no longer matches the saved plan, MissingFileError if
        the directory has no plan, DataError if the checkpoint cannot be read."""
        dcff = cls(model, example, plan=saving.read_plan(directory), apply_kwargs=apply_kwargs)
        return saving.load_state(dcff, directory, example)

    def export(self, directory: str, fused, example) -> tuple[Any, Any]:
        """Write the compact model of `fused` (linen variables or the nnx fused model) to
        `directory`: its variables (orbax, "variables"), the plan, and `model.stablehlo`, the
        eval-mode function images -> logits with the variables inside and any batch size,
        loadable with jax alone (jax.export.deserialize(...).call(images)), its conv widths
        padded to multiples of 8 (deploy.stablehlo.STABLEHLO_PAD_TO; the same logits, faster on
        a CPU).
        Returns the compact (model, variables) for linen, (model, None) for nnx."""
        return saving.export(self, directory, fused, example)


def make_plan(model, example, rates=None, **options) -> Plan:
    """The plan alone: DCFF(model, example, rates, **options).plan (see DCFF for the options)."""
    return DCFF(model, example, rates, **options).plan
