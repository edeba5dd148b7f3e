"""Does TALR's controller do what it exists for: does the running transition rate ``K_t``
follow the target ``R_t``? The ``talr_tracking`` measure reduces the controller's logged
``talr_K``, ``talr_R``, ``talr_Rbar`` and ``talr_U`` (:class:`qatlab.methods.talr.TALRHook`,
every ``log_every`` steps) to the numbers of the 'Does K_t follow R_t?' table of
``docs/results/talr.md``.

``Rbar_t`` is the running average of ``R_t`` with the controller's momentum: what ``K_t`` is
when every step hits its target, so in the cosine's tail (where ``R_t`` falls faster than any
running average) ``K_t`` is compared with it rather than with ``R_t``.
"""

from __future__ import annotations

from typing import Any

from qatlab.measure.registry import (
    Column,
    MeasureContext,
    Section,
    is_number,
    register_measure,
)

TALR_LOGGED = ("talr_K", "talr_R", "talr_Rbar", "talr_U")
FACTOR = 2.0  # K_t "follows" a target within this factor


def _within(k: float, target: float) -> bool:
    """``k / target`` in [1/FACTOR, FACTOR]; a target of 0 is never met."""
    return target > 0 and 1.0 / FACTOR <= k / target <= FACTOR


def tracking_stats(
    records: list[dict[str, Any]], skip: float = 0.2, u0: float | None = None
) -> dict[str, Any]:
    """From a run's ``metrics.jsonl`` records: over the logged TALR steps after the first
    ``skip`` of training (``step > skip * T``, T = the last logged step of the run), the share
    with ``K_t / R_t`` in [1/2, 2] (``talr_in2x_R``), the fraction of training up to which that
    holds without a break (``talr_in2x_R_until``: the first late step outside, over T; 1 if
    none), the share with ``K_t / Rbar_t`` in [1/2, 2] (``talr_in2x_Rbar``), the range of
    ``K_t / Rbar_t`` (``talr_K_Rbar_min``/``max``); over all logged steps, the number with
    ``U = 0`` before the last step T (``talr_U_zero_steps``: the logged ``U`` is ``U_{t+1}``,
    the LR of a step still to come, whose cosine target is above 0; the tracking law sets
    ``U_T = 0`` after the last step, where ``R_T = 0``) and, given ``u0``,
    the largest ``U / u0`` (``talr_U_max_ratio``). Nothing when no TALR record was logged."""
    steps = [r["step"] for r in records if is_number(r.get("step"))]
    tal = [
        r
        for r in records
        if is_number(r.get("step")) and all(is_number(r.get(k)) for k in TALR_LOGGED)
    ]
    if not tal:
        return {}
    total = max(steps)
    late = [r for r in tal if r["step"] > skip * total]
    out: dict[str, Any] = {
        # talr_U is U_{t+1}: the LR of the next step, whose target is above 0 until the end
        "talr_U_zero_steps": sum(r["talr_U"] == 0 for r in tal if r["step"] < total),
        "talr_late_steps": len(late),
    }
    if u0:
        out["talr_U_max_ratio"] = max(r["talr_U"] for r in tal) / u0
    if not late:
        return out
    outside = [r["step"] for r in late if not _within(r["talr_K"], r["talr_R"])]
    bar = [r["talr_K"] / r["talr_Rbar"] for r in late if r["talr_Rbar"] > 0]
    out.update(
        talr_in2x_R=sum(_within(r["talr_K"], r["talr_R"]) for r in late) / len(late),
        talr_in2x_R_until=(outside[0] if outside else total) / total,
        talr_in2x_Rbar=sum(_within(r["talr_K"], r["talr_Rbar"]) for r in late) / len(late),
        talr_K_Rbar_min=min(bar) if bar else None,
        talr_K_Rbar_max=max(bar) if bar else None,
    )
    return out


def initial_lr(ctx: Any) -> float | None:
    """TALR's ``U_0`` of the run ``ctx`` measures: its ``method.u0`` if set, else the run's LR
    (the latent weights' initial LR); None when the context has no run config."""
    cfg = getattr(ctx, "cfg", None)
    if cfg is None:
        return None
    u0 = (getattr(cfg.method, "options", None) or {}).get("u0")
    return float(u0) if u0 else float(cfg.train.lr)


def _check(skip: float = 0.2, u0: float = 0.0) -> None:
    from qatlab.errors import ConfigError

    if not is_number(skip) or not 0 <= skip < 1:
        raise ConfigError(f"talr_tracking: skip must be a fraction in [0, 1), got {skip!r}")
    if not is_number(u0) or u0 < 0:
        raise ConfigError(f"talr_tracking: u0 must be >= 0 (0: the run's LR), got {u0!r}")


@register_measure(
    "talr_tracking",
    columns=[
        Column("talr_in2x_R", "K/R in [1/2, 2] %", 100.0, 0, None, "talr"),
        Column("talr_in2x_R_until", "... unbroken until % of T", 100.0, 0, None, "talr"),
        Column("talr_in2x_Rbar", "K/Rbar in [1/2, 2] %", 100.0, 0, None, "talr"),
        Column("talr_K_Rbar_min", "min K/Rbar", 1.0, 2, None, "talr"),
        Column("talr_K_Rbar_max", "max K/Rbar", 1.0, 2, None, "talr"),
        Column("talr_U_zero_steps", "steps with U = 0", 1.0, 0, None, "talr"),
        Column("talr_U_max_ratio", "max U / U_0", 1.0, 1, None, "talr"),
    ],
    section=Section(
        "talr",
        "TALR: does K_t follow R_t?",
        "Over the controller's logged steps after the first 20% of training: the share with "
        "the running rate K_t within a factor 2 of the target R_t, the fraction of training up "
        "to which that holds without a break, the share within a factor 2 of Rbar_t (the "
        "running average of R_t: what K_t is when every step hits its target), the range of "
        "K_t/Rbar_t; over all logged steps, those with U = 0 before the last step (while the "
        "target of the next step is above 0), and the largest U over U_0 (the LR); mean ± std "
        "over seeds.",
    ),
)
def talr_tracking(ctx: MeasureContext, skip: float = 0.2, u0: float = 0.0) -> dict[str, Any]:
    """How TALR's running transition rate K_t followed its target R_t, from the run's logged
    ``talr_*`` records (:func:`tracking_stats`); ``u0`` 0: the run's ``method.u0`` or LR."""
    _check(skip, u0)
    return tracking_stats(ctx.logged_records(), skip, u0 or initial_lr(ctx))


talr_tracking.check = _check  # checked with the grid, before any cell runs
