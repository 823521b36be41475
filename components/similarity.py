"""How far new images sit from the backbone's source domain, measured without the source data.

Every BatchNorm layer of a pre-trained network remembers the mean and variance of its inputs over
the source data. Feeding a sample of the new images and comparing their statistics with the stored
ones (symmetric KL between per-channel Gaussians) gives a per-layer divergence profile: it says how
different the data is, and *where* in the network the difference lives. The source classifier's
confidence on the new images is reported beside it as a second opinion.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from components.backbones import Backbone
from components.config import SimilarityConfig
from components.domain_profile import DomainProfile, compare_to_profile
from components.features import ImageFiles
from components.images import Preprocessing, eval_transform

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimilarityReport:
    """The similarity score in [0, 1], its bootstrap spread and the evidence behind it."""

    score: float
    low: float  # 5th percentile over bootstrap resamples of the images
    high: float  # 95th percentile
    mean_kl: float
    layer_names: tuple[str, ...]
    layer_kl: tuple[float, ...]  # first layer to last
    source_entropy: float  # mean normalised entropy of the source classifier, 0 = confident
    source_max_prob: float
    n_images: int
    kl_scale: float
    extras: dict[str, float] = field(default_factory=dict)
    bn_score: float | None = None  # exp(-mean_kl / kl_scale); equals score when there is no profile
    profile: dict[str, object] | None = None  # the comparison with a stored domain profile
    # Per BN layer, per channel: the sample's input mean and variance (kept for the domain profile).
    bn_mean: tuple[np.ndarray, ...] = field(default=(), repr=False, compare=False)
    bn_var: tuple[np.ndarray, ...] = field(default=(), repr=False, compare=False)

    def to_dict(self) -> dict[str, object]:
        return {
            "score": self.score,
            "low": self.low,
            "high": self.high,
            "bn_score": self.bn_score,
            "profile": self.profile,
            "mean_kl": self.mean_kl,
            "layer_kl": dict(zip(self.layer_names, self.layer_kl, strict=True)),
            "source_entropy": self.source_entropy,
            "source_max_prob": self.source_max_prob,
            "n_images": self.n_images,
            "kl_scale": self.kl_scale,
            **self.extras,
        }


def _bn_layers(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]


@torch.inference_mode()
def per_image_bn_moments(
    backbone: Backbone, paths: Sequence[str], prep: Preprocessing, batch_size: int, num_workers: int
) -> tuple[list[str], list[np.ndarray], list[np.ndarray], np.ndarray]:
    """For each BN layer, every image's per-channel mean and mean square of the layer's input.

    The source classifier's logits come out of the same forward pass.

    Keeping per-image moments (rather than one pooled batch statistic) is what makes bootstrap
    resampling of the images free: resampled statistics are averages of these rows.
    """
    layers = _bn_layers(backbone.model)
    logits: list[np.ndarray] = []
    firsts: list[list[np.ndarray]] = [[] for _ in layers]
    seconds: list[list[np.ndarray]] = [[] for _ in layers]

    def hook(i: int):
        def record(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].float()
            firsts[i].append(x.mean(dim=(2, 3)).cpu().numpy())
            seconds[i].append((x * x).mean(dim=(2, 3)).cpu().numpy())

        return record

    handles = [m.register_forward_pre_hook(hook(i)) for i, (_, m) in enumerate(layers)]
    try:
        loader = DataLoader(
            ImageFiles(paths, [0] * len(paths), eval_transform(prep)),
            batch_size=batch_size,
            num_workers=num_workers,
        )
        model = backbone.model.eval().to(memory_format=torch.channels_last)
        for images, _ in loader:
            logits.append(
                model(images.contiguous(memory_format=torch.channels_last)).float().numpy()
            )
    finally:
        for h in handles:
            h.remove()
    names = [n for n, _ in layers]
    moments = [np.concatenate(f) for f in firsts], [np.concatenate(s) for s in seconds]
    return names, *moments, np.concatenate(logits)


def symmetric_kl(
    mean_a: np.ndarray, var_a: np.ndarray, mean_b: np.ndarray, var_b: np.ndarray
) -> np.ndarray:
    """Per-channel KL(a||b) + KL(b||a) between univariate Gaussians."""
    diff2 = (mean_a - mean_b) ** 2
    return 0.5 * ((var_a + diff2) / var_b + (var_b + diff2) / var_a) - 1.0


def sample_moments(
    firsts: Sequence[np.ndarray], seconds: Sequence[np.ndarray], rows: np.ndarray, eps: float
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-layer, per-channel mean and variance of the images ``rows`` from per-image moments."""
    means = [f[rows].mean(axis=0) for f in firsts]
    variances = [
        np.maximum(s[rows].mean(axis=0) - m**2, 0.0) + eps
        for s, m in zip(seconds, means, strict=True)
    ]
    return means, variances


def layer_divergences(
    reference: Sequence[tuple[np.ndarray, np.ndarray]],
    firsts: Sequence[np.ndarray],
    seconds: Sequence[np.ndarray],
    rows: np.ndarray,
    eps: float = 1e-3,
) -> np.ndarray:
    """Mean (over channels) symmetric KL at every BN layer between the images ``rows`` and
    ``reference`` (per layer: channel means and variances)."""
    means, variances = sample_moments(firsts, seconds, rows, eps)
    return np.array(
        [
            float(symmetric_kl(m, v, ref_mean, ref_var + eps).mean())
            for m, v, (ref_mean, ref_var) in zip(means, variances, reference, strict=True)
        ]
    )


def source_statistics(layers: Sequence[nn.BatchNorm2d]) -> list[tuple[np.ndarray, np.ndarray]]:
    """What each BN layer remembers of the source data: running mean and variance."""
    return [
        (bn.running_mean.detach().cpu().numpy(), bn.running_var.detach().cpu().numpy())
        for bn in layers
    ]


def score_from_kl(mean_kl: float, kl_scale: float) -> float:
    """Map a mean divergence to [0, 1]: 1 = the source domain itself, 1/e at ``kl_scale``."""
    return math.exp(-mean_kl / kl_scale)


def source_classifier_view(logits: np.ndarray) -> tuple[float, float]:
    """Mean normalised entropy and mean top probability of the source classifier."""
    probs = torch.softmax(torch.from_numpy(logits).float(), dim=1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1) / math.log(probs.shape[1])
    return float(entropy.mean()), float(probs.max(1).values.mean())


def sample_rows(n_paths: int, cfg: SimilarityConfig, seed: int) -> np.ndarray:
    """Which images (row indices, sorted) the similarity stage looks at."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_paths, size=min(cfg.sample_size, n_paths), replace=False))


def combine_scores(bn_score: float, profile_score: float, profile_weight: float) -> float:
    """Weighted geometric mean: either measurement alone can pull the verdict towards 'different'."""
    return float(bn_score ** (1 - profile_weight) * profile_score**profile_weight)


def score_similarity(
    backbone: Backbone,
    paths: Sequence[str],
    cfg: SimilarityConfig,
    seed: int,
    num_workers: int = 2,
    profile: DomainProfile | None = None,
    profile_embeddings: np.ndarray | None = None,
) -> SimilarityReport:
    """Score a sample of ``paths`` against the statistics the backbone stored from its source data,
    and against a stored domain profile when one is given.

    ``profile_embeddings`` are the pooled embeddings of the sampled images (``sample_rows``), in the
    profile's preprocessing; the caller reads them from the feature cache.
    """
    take = sample_rows(len(paths), cfg, seed)
    names, firsts, seconds, logits = per_image_bn_moments(
        backbone, [paths[i] for i in take], backbone.preprocessing, cfg.batch_size, num_workers
    )
    layers = [m for _, m in _bn_layers(backbone.model)]
    eps = layers[0].eps if layers else 1e-3
    source = source_statistics(layers)
    everything = np.arange(len(take))
    rng = np.random.default_rng(seed)
    resamples = [rng.choice(everything, len(take)) for _ in range(cfg.bootstrap_rounds)]
    per_layer = layer_divergences(source, firsts, seconds, everything, eps)
    mean_kl = float(per_layer.mean())
    bn_score = score_from_kl(mean_kl, cfg.kl_scale)
    boot = np.array(
        [
            score_from_kl(
                float(layer_divergences(source, firsts, seconds, r, eps).mean()), cfg.kl_scale
            )
            for r in resamples
        ]
    )
    score, comparison = bn_score, None
    if profile is not None and profile_embeddings is not None:
        same_layers = tuple(names) == profile.bn_layers
        profile_kl = (
            tuple(
                float(v)
                for v in layer_divergences(
                    list(zip(profile.bn_mean, profile.bn_var, strict=True)),
                    firsts,
                    seconds,
                    everything,
                    eps,
                )
            )
            if same_layers
            else ()
        )
        comparison = compare_to_profile(
            profile_embeddings, profile, cfg.mmd_scale, resamples, profile_kl
        )
        score = combine_scores(bn_score, comparison.score, cfg.profile_weight)
        boot = np.array(
            [
                combine_scores(b, p, cfg.profile_weight)
                for b, p in zip(boot, comparison.boot_scores, strict=True)
            ]
        )
    low, high = (
        (float(np.percentile(boot, 5)), float(np.percentile(boot, 95)))
        if len(boot)
        else (score, score)
    )
    entropy, max_prob = source_classifier_view(logits)
    means, variances = sample_moments(firsts, seconds, everything, 0.0)
    log.info(
        "similarity %.3f [%.3f, %.3f], mean KL %.3f over %d images%s",
        score,
        low,
        high,
        mean_kl,
        len(take),
        f", profile MMD² {comparison.mmd2:.4f}" if comparison else "",
    )
    return SimilarityReport(
        score=score,
        low=low,
        high=high,
        mean_kl=mean_kl,
        layer_names=tuple(names),
        layer_kl=tuple(float(v) for v in per_layer),
        source_entropy=entropy,
        source_max_prob=max_prob,
        n_images=len(take),
        kl_scale=cfg.kl_scale,
        bn_score=bn_score,
        profile=None
        if comparison is None
        else {**comparison.to_dict(), "weight": cfg.profile_weight, "n_profile": profile.n_images},
        bn_mean=tuple(means),
        bn_var=tuple(variances),
    )
