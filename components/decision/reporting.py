"""The decision report: what the pipeline measured, what it chose, and why, in a few lines."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from components.common.plan import TransferPlan
from components.data.counting import DatasetCounts
from components.similarity.scores import SimilarityReport


def plot_similarity_profile(report: SimilarityReport, path: Path) -> Path:
    """Per-layer divergence from the source statistics, first layer to last (log scale)."""
    fig, ax = plt.subplots(figsize=(9, 3.5))
    ax.bar(range(len(report.layer_kl)), np.maximum(report.layer_kl, 1e-4), color="tab:blue")
    ax.set_yscale("log")
    ax.set_xlabel("BatchNorm layer (input side to output side)")
    ax.set_ylabel("symmetric KL to source stats")
    ax.set_title(
        f"similarity {report.score:.2f} [{report.low:.2f}, {report.high:.2f}], mean KL {report.mean_kl:.2f}"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_probe(plan: TransferPlan, path: Path) -> Path | None:
    """Linear-probe accuracy per cut point, the chosen cut highlighted."""
    if plan.probe is None:
        return None
    probe = plan.probe
    fig, ax = plt.subplots(figsize=(7, 3.2))
    colours = ["tab:orange" if c == probe.chosen else "tab:gray" for c in probe.cuts]
    ax.bar(probe.cuts, probe.means, yerr=probe.stds, color=colours)
    ax.set_ylim(0, 1)
    ax.set_ylabel("probe accuracy (CV)")
    ax.set_title(f"cut chosen: {probe.chosen}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def decision_markdown(
    counts: DatasetCounts, similarity: SimilarityReport, plan: TransferPlan
) -> str:
    """A short human-readable report of the decision and the numbers behind it."""
    worst = np.argsort(similarity.layer_kl)[::-1][:3]
    lines = [
        f"# Transfer decision: case {plan.case}",
        "",
        plan.reason,
        "",
        "## Size",
        f"{counts.total} usable images in {len(counts.classes)} classes; smallest class has "
        f"{counts.min_train_per_class} training images (large from {plan.large_images_per_class}).",
        *(
            [
                f"**Imbalanced**: the largest class has {counts.imbalance_ratio:.1f}x the training "
                "images of the smallest; training weighs the classes alike (`train.class_weights`) "
                "and balanced accuracy and macro-F1 are reported beside accuracy."
            ]
            if counts.imbalanced
            else []
        ),
        "",
        counts.to_markdown(),
        "",
        f"- {final_fit_sentence(counts, plan)}",
        "",
        "## Similarity to the source domain",
        f"- score **{similarity.score:.3f}** (90% bootstrap interval {similarity.low:.3f}-{similarity.high:.3f}, "
        f"threshold {plan.similar_threshold:.2f}){' - **uncertain**' if plan.uncertain else ''}",
        f"- mean symmetric KL to the backbone's BatchNorm statistics: {similarity.mean_kl:.3f} over "
        f"{similarity.n_images} images (score = exp(-KL / {similarity.kl_scale}))",
        "- largest differences at: "
        + ", ".join(f"{similarity.layer_names[i]} ({similarity.layer_kl[i]:.2f})" for i in worst),
        f"- source classifier: mean normalised entropy {similarity.source_entropy:.3f}, "
        f"mean top probability {similarity.source_max_prob:.3f}",
    ]
    if similarity.profile is not None:
        prof = similarity.profile
        lines += [
            f"- against the stored domain profile ({prof['n_profile']} training images): MMD² "
            f"{prof['mmd2']:.4f}, Fréchet distance per dimension {prof['frechet_per_dim']:.3f}, "
            f"profile score {prof['score']:.3f}; combined with the BatchNorm score "
            f"{similarity.bn_score:.3f} (profile weight {prof['weight']})",
        ]
    if plan.resolution is not None:
        r = plan.resolution
        lines += ["", "## Input resolution", f"- {r['reason']}"]
        if r.get("frozen"):
            lines.append(f"- for frozen features (the rule's case): {r['frozen']['reason']}")
        measured = [c for c in r["candidates"] if c["probe_accuracy"] is not None or c["seconds"]]
        if measured:
            lines += ["", "| size | probe accuracy (CV) | std | seconds |", "|---|---|---|---|"]
            lines += [
                f"| {c['size']} px{' (chosen)' if c['size'] == r['chosen'] else ''} | "
                + ("-" if c["probe_accuracy"] is None else f"{c['probe_accuracy']:.3f}")
                + " | "
                + ("-" if c["probe_std"] is None else f"{c['probe_std']:.3f}")
                + f" | {c['seconds']} |"
                for c in measured
            ]
    if plan.probe is not None:
        lines += [
            "",
            f"## Probe per cut point ({plan.probe.folds}-fold CV on the training split)",
            "| cut | accuracy | std |",
            "|---|---|---|",
        ]
        lines += [
            f"| {c}{' (chosen)' if c == plan.probe.chosen else ''} | {m:.3f} | {s:.3f} |"
            for c, m, s in zip(plan.probe.cuts, plan.probe.means, plan.probe.stds, strict=True)
        ]
    if plan.verification is not None:
        v = plan.verification
        lines += ["", "## Verification against the runner-up case"]
        if "inner_accuracy" in v:
            lines += [
                f"- nested split: {v['n_inner_train']} training / {v['n_inner_val']} held-out images; "
                f"the runner-up must win by more than {v['margin']:.3f} (one standard error)"
                + (", a tie: settled by strategy.verify_ties" if v.get("tie") else ""),
                "",
                "| case | px | nested accuracy [95% interval] | seconds |",
                "|---|---|---|---|",
            ]
            sizes, intervals = v.get("image_size") or {}, v.get("inner_interval") or {}
            lines += [
                f"| {c}{' (kept)' if int(c) == v['chosen_case'] else ''} | {sizes.get(c, '-')} "
                f"| {a:.3f}{_interval(intervals.get(c))} | {v['inner_seconds'][c]} |"
                for c, a in v["inner_accuracy"].items()
            ]
            if v.get("reused_from"):
                lines.append(
                    f"- measured in run {v['reused_from']} and reused: "
                    f"{100 * float(v['changed_since']):.1f}% of the files changed since "
                    "(strategy.verify_reuse_max_change)"
                )
        else:
            lines.append(
                f"- case {v['runner_up']} {'would be' if v['run'] else 'was not'} checked: {v['reason']} "
                f"(mode {v['mode']}"
                + (f", estimate {v['estimated_seconds']} s)" if v["estimated_seconds"] else ")")
            )
    return "\n".join(lines) + "\n"


def final_fit_sentence(counts: DatasetCounts, plan: TransferPlan) -> str:
    """Which images the final model learns from and which only judge it. Not refitted on
    train + validation: the promotion gate falls back to the validation split when there is no
    test split, and the reported validation accuracy must stay an estimate on unseen images."""
    split = counts.per_split
    chooses = (
        "the L2 strength by k-fold cross-validation on it"
        if plan.case in (1, 2)
        else "the epoch kept by its validation accuracy"
    )
    return (
        f"Final fit: on the training split only ({split.get('train', 0)} images), "
        f"{chooses}; the validation split ({split.get('val', 0)}) is an honest estimate and the "
        f"test split ({split.get('test', 0)}) is scored once, by the final model and the "
        "promotion gate. Not refitted on train + validation."
    )


def _interval(bounds: object) -> str:
    return f" [{bounds[0]:.3f}, {bounds[1]:.3f}]" if isinstance(bounds, list | tuple) else ""
