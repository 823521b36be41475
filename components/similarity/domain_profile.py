"""A stored profile of a model's training data, and how far new data sits from it.

BatchNorm statistics only exist in networks that have BatchNorm, and only describe the data the
*backbone* was pre-trained on. Every model this pipeline trains therefore saves a profile of its own
training data next to it: the pooled embedding's mean and covariance, a sample of embeddings, the
per-layer BatchNorm input statistics and the counts. A later run (retraining on new data, or
transferring from that model) compares its images with the profile by Fréchet distance and MMD on
embeddings, which works for any architecture.

The profile score is ``exp(-MMD² / mmd_scale)``, where MMD² is the unbiased squared maximum mean
discrepancy with a Gaussian kernel on embeddings centred on the profile's mean and divided by its
overall spread, the bandwidth being the median distance within the profile's sample. That makes
MMD² scale-free: below 2 whatever the network (negative values are noise around 0 and count as 0).
The calibration of ``mmd_scale`` is in docs/decisions.md.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import linalg

log = logging.getLogger(__name__)

PROFILE_CUT = "head"  # the pooled embedding every backbone has
MAX_SAMPLE_ROWS = 512
_SD_FLOOR = 1e-3


@dataclass(frozen=True)
class DomainProfile:
    """What a model's training data looked like, through that model's backbone."""

    backbone: str  # as configured (a name load_backbone accepts), so the profile can be re-embedded
    backbone_weights: str | None
    image_size: int
    n_images: int
    class_counts: dict[str, int]
    mean: np.ndarray  # (D,) pooled embedding mean
    cov: np.ndarray  # (D, D)
    sample: np.ndarray  # (<= MAX_SAMPLE_ROWS, D) embeddings kept for MMD
    bandwidth: float  # Gaussian kernel bandwidth on standardised embeddings
    bn_layers: tuple[str, ...]
    bn_mean: tuple[np.ndarray, ...]  # per layer, per channel, of the layer's input
    bn_var: tuple[np.ndarray, ...]

    @property
    def scale(self) -> float:
        return _overall_scale(self.cov)


def _overall_scale(cov: np.ndarray) -> float:
    # One scale for all dimensions: per-dimension standardisation would blow up the many nearly
    # constant features a network has on a narrow domain, and with them the noise.
    return max(float(np.sqrt(np.trace(cov) / len(cov))), _SD_FLOOR)


def _median_distance(x: np.ndarray) -> float:
    d2 = _sq_dists(x, x)
    upper = d2[np.triu_indices(len(x), k=1)]
    return float(np.sqrt(np.median(upper))) if upper.size else 1.0


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d2, 0.0)


def build_profile(
    embeddings: np.ndarray,
    labels: list[str],
    backbone: str,
    backbone_weights: str | None,
    image_size: int,
    bn_layers: tuple[str, ...],
    bn_mean: tuple[np.ndarray, ...],
    bn_var: tuple[np.ndarray, ...],
    seed: int,
) -> DomainProfile:
    """Summarise the training embeddings (rows) and BatchNorm statistics of one dataset."""
    x = embeddings.astype(np.float64)
    mean = x.mean(0)
    cov = np.cov(x, rowvar=False) if len(x) > 1 else np.zeros((x.shape[1], x.shape[1]))
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(len(x), size=min(MAX_SAMPLE_ROWS, len(x)), replace=False))
    sample = x[keep]
    bandwidth = _median_distance((sample - mean) / _overall_scale(cov))
    values, counts = np.unique(np.asarray(labels), return_counts=True)
    return DomainProfile(
        backbone=backbone,
        backbone_weights=backbone_weights,
        image_size=image_size,
        n_images=len(x),
        class_counts={str(v): int(c) for v, c in zip(values, counts, strict=True)},
        mean=mean,
        cov=cov,
        sample=sample.astype(np.float32),
        bandwidth=bandwidth,
        bn_layers=tuple(bn_layers),
        bn_mean=tuple(np.asarray(m, np.float64) for m in bn_mean),
        bn_var=tuple(np.asarray(v, np.float64) for v in bn_var),
    )


def save_profile(profile: DomainProfile, folder: Path) -> Path:
    """``profile.json`` (readable summary) and ``profile.npz`` (arrays) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"mean": profile.mean, "cov": profile.cov.astype(np.float32), "sample": profile.sample}
    for i, (m, v) in enumerate(zip(profile.bn_mean, profile.bn_var, strict=True)):
        arrays[f"bn_mean_{i}"], arrays[f"bn_var_{i}"] = m, v
    np.savez_compressed(folder / "profile.npz", **arrays)
    meta = {
        "backbone": profile.backbone,
        "backbone_weights": profile.backbone_weights,
        "image_size": profile.image_size,
        "n_images": profile.n_images,
        "class_counts": profile.class_counts,
        "embedding_dim": int(profile.mean.shape[0]),
        "bandwidth": profile.bandwidth,
        "bn_layers": list(profile.bn_layers),
    }
    (folder / "profile.json").write_text(json.dumps(meta, indent=1))
    return folder


def load_profile(folder: Path) -> DomainProfile:
    """Read a profile written by ``save_profile``."""
    meta = json.loads((folder / "profile.json").read_text())
    with np.load(folder / "profile.npz") as data:
        n = len(meta["bn_layers"])
        return DomainProfile(
            backbone=meta["backbone"],
            backbone_weights=meta.get("backbone_weights"),
            image_size=int(meta["image_size"]),
            n_images=int(meta["n_images"]),
            class_counts=dict(meta["class_counts"]),
            mean=data["mean"].astype(np.float64),
            cov=data["cov"].astype(np.float64),
            sample=data["sample"],
            bandwidth=float(meta["bandwidth"]),
            bn_layers=tuple(meta["bn_layers"]),
            bn_mean=tuple(data[f"bn_mean_{i}"] for i in range(n)),
            bn_var=tuple(data[f"bn_var_{i}"] for i in range(n)),
        )


def frechet_distance(
    mean_a: np.ndarray, cov_a: np.ndarray, mean_b: np.ndarray, cov_b: np.ndarray
) -> float:
    """Fréchet distance between two Gaussians (the quantity behind FID).

    tr sqrt(A B) = tr sqrt(A^1/2 B A^1/2), and the latter is symmetric: two symmetric
    eigendecompositions instead of a general matrix square root, several times faster.
    """
    values, vectors = linalg.eigh(cov_a)
    half = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    inner = linalg.eigvalsh(half @ cov_b @ half)
    diff = mean_a - mean_b
    trace_root = float(np.sqrt(np.clip(inner, 0, None)).sum())
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_root)


@dataclass(frozen=True)
class ProfileComparison:
    """New images against a stored profile: distances, the score, and its bootstrap spread."""

    frechet_per_dim: float  # Fréchet distance / embedding dim, on standardised embeddings
    mmd2: float
    score: float
    boot_scores: np.ndarray  # one score per bootstrap resample of the new images
    layer_kl: tuple[float, ...]  # per BN layer, against the profile's statistics

    def to_dict(self) -> dict[str, object]:
        return {
            "frechet_per_dim": self.frechet_per_dim,
            "mmd2": self.mmd2,
            "score": self.score,
            "mean_layer_kl": float(np.mean(self.layer_kl)) if self.layer_kl else None,
        }


def compare_to_profile(
    embeddings: np.ndarray,
    profile: DomainProfile,
    mmd_scale: float,
    resamples: list[np.ndarray],
    layer_kl: tuple[float, ...] = (),
) -> ProfileComparison:
    """Score ``embeddings`` (rows: new images) against ``profile``; ``resamples`` index the rows."""
    scale = profile.scale
    x = (embeddings.astype(np.float64) - profile.mean) / scale
    y = (profile.sample.astype(np.float64) - profile.mean) / scale
    gamma = 1.0 / (2.0 * profile.bandwidth**2)
    k_xx = np.exp(-gamma * _sq_dists(x, x))
    k_xy = np.exp(-gamma * _sq_dists(x, y))
    k_yy = np.exp(-gamma * _sq_dists(y, y))
    k_yy_mean = float(k_yy[~np.eye(len(y), dtype=bool)].mean())

    def mmd2(rows: np.ndarray) -> float:
        # Unbiased: pairs of the same image (the diagonal, and repeats in a bootstrap resample)
        # are left out, so a resample is not pulled towards "different" by its duplicates.
        distinct = rows[:, None] != rows[None, :]
        within = float(k_xx[np.ix_(rows, rows)][distinct].mean())
        return within - 2 * float(k_xy[rows].mean()) + k_yy_mean

    everything = np.arange(len(x))
    value = mmd2(everything)
    cov_x = np.cov(x, rowvar=False) if len(x) > 1 else np.zeros((x.shape[1],) * 2)
    cov_y = profile.cov / scale**2
    fd = frechet_distance(x.mean(0), cov_x, np.zeros(x.shape[1]), cov_y) / x.shape[1]
    boot = np.array([np.exp(-max(mmd2(r), 0.0) / mmd_scale) for r in resamples])
    return ProfileComparison(
        frechet_per_dim=fd,
        mmd2=value,
        score=float(np.exp(-max(value, 0.0) / mmd_scale)),
        boot_scores=boot,
        layer_kl=layer_kl,
    )
