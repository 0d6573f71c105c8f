"""The report's advice in plain words, computed from the numbers: which strategy, and which head stands for
feature extraction."""

from __future__ import annotations

from pipeline.heads.trained import TrainedHead, held_out
from pipeline.results.model_rows import ModelRow
from pipeline.results.stats import Comparison


def _with_interval(row: ModelRow) -> str:
    s = row.scores
    return f"{row.accuracy:.1%}, 95% interval {s['accuracy_low']:.1%} to {s['accuracy_high']:.1%}"


def recommend(head: ModelRow, tuned: ModelRow | None, comparison: Comparison | None) -> str:
    """Plain words computed from the numbers: which strategy, and why. `comparison` is fine-tuning (a) against
    the chosen head (b) on the same test images; with no measurable difference the cheaper run is advised."""
    if tuned is None or comparison is None:
        return f"Only feature extraction was measured: {head.name} reaches {_with_interval(head)} test accuracy."
    c, n = comparison, int(head.scores["n_test"])
    evidence = (
        f"on the same {n} test images they disagree on {c.mcnemar.a_only + c.mcnemar.b_only}: "
        f"{c.mcnemar.a_only} right only after fine-tuning, {c.mcnemar.b_only} only with {head.name} (McNemar's "
        f"exact test p = {c.mcnemar.p_value:.3g}; the difference is {100 * c.difference:+.1f} points, exact 95% "
        f"interval {100 * c.interval[0]:+.1f} to {100 * c.interval[1]:+.1f})"
    )
    costs = f"{tuned.train_seconds:.0f} s of fine-tuning against {head.train_seconds:.0f} s for {head.name} "
    costs += "including extraction"
    if c.verdict == "a":
        return (
            f"Fine-tuning ({_with_interval(tuned)}) is more accurate than {head.name} on frozen features "
            f"({_with_interval(head)}): {evidence}; it costs {costs}. Use fine-tuning."
        )
    if c.verdict == "b":
        return (
            f"{head.name} on frozen features ({_with_interval(head)}) is more accurate than fine-tuning "
            f"({_with_interval(tuned)}): {evidence}; it costs {costs}. Use feature extraction."
        )
    cheaper = "feature extraction" if head.train_seconds <= tuned.train_seconds else "fine-tuning"
    return (
        f"No measurable difference between fine-tuning ({_with_interval(tuned)}) and {head.name} on frozen "
        f"features ({_with_interval(head)}): {evidence}. Choose on cost ({costs}): use {cheaper}."
    )


def choice_of_head(heads: list[TrainedHead], chosen: TrainedHead, rows: list[ModelRow]) -> str:
    """How the head compared with fine-tuning was chosen, and what the test split would have said."""
    text = (
        f"**Head.** {chosen.model_name}, chosen among {len(heads)} heads by its held-out accuracy "
        f"({held_out(chosen)['val_accuracy']:.4f}) on {chosen.selection}. Ties go to the first in params.yaml."
    )
    best_on_test = max((r for r in rows if r.strategy == "feature_extraction"), key=lambda r: r.accuracy)
    if best_on_test.name != chosen.model_name:
        text += (
            f" {best_on_test.name} scores higher on test ({best_on_test.accuracy:.4f} against "
            f"{next(r for r in rows if r.name == chosen.model_name).accuracy:.4f}), but the test split only scores: a "
            "head chosen on it would report an optimistic accuracy."
        )
    return text


def wise_words(wise: ModelRow, tuned: ModelRow, comparison: Comparison) -> str:
    """WiSE-FT against plain fine-tuning (`comparison`: `wise` as a, `tuned` as b, on the same test images): the
    alpha chosen on val (its details: alpha and curve), and what the test split says of it."""
    chosen, c = wise.scores["wise"], comparison
    val = {p["alpha"]: p["val_accuracy"] for p in chosen["curve"]}
    at_one = f", {val[1.0]:.4f} at alpha 1 ({tuned.name})" if 1.0 in val else ""
    return (
        f"**WiSE-FT.** {wise.name} is {tuned.name}'s weights mixed with those it started from at alpha "
        f"{chosen['alpha']:g}, chosen on the val split ({val[chosen['alpha']]:.4f} val accuracy{at_one}). On test: "
        f"{_with_interval(wise)} against {_with_interval(tuned)} ({100 * c.difference:+.1f} points, exact 95% "
        f"interval {100 * c.interval[0]:+.1f} to {100 * c.interval[1]:+.1f}; they disagree on "
        f"{c.mcnemar.a_only + c.mcnemar.b_only} images, McNemar's p = {c.mcnemar.p_value:.3g})."
    )
