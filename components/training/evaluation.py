"""Held-out evaluation: accuracy, per-class precision and recall, and a confusion matrix plot."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and in CI
import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from components.common.intervals import wilson_interval
from components.data.splits import SplitData
from components.engine.extraction import ExtractionEngine
from components.engine.images import Preprocessing
from components.training.models import FrozenTransferModel


@dataclass(frozen=True)
class SplitMetrics:
    """One split's figures; the accuracy always travels with its n and 95% Wilson interval."""

    split: str
    n: int
    accuracy: float
    per_class: dict[str, dict[str, float]]  # label -> precision / recall / support
    confusion: list[list[int]]
    accuracy_low: float = 0.0
    accuracy_high: float = 1.0
    # Imbalanced data: plain accuracy rewards the majority class; these weigh every class alike.
    balanced_accuracy: float = float("nan")
    macro_f1: float = float("nan")

    def to_dict(self) -> dict[str, object]:
        return {
            "split": self.split,
            "n": self.n,
            "accuracy": self.accuracy,
            "accuracy_low": self.accuracy_low,
            "accuracy_high": self.accuracy_high,
            "balanced_accuracy": self.balanced_accuracy,
            "macro_f1": self.macro_f1,
            "per_class": self.per_class,
            "confusion": self.confusion,
        }

    def sentence(self) -> str:
        return (
            f"{self.accuracy:.4f} (95% CI {self.accuracy_low:.3f}-{self.accuracy_high:.3f}, "
            f"n={self.n})"
        )


def model_logits(
    model: torch.nn.Module,
    cut: str | None,
    split: SplitData,
    prep: Preprocessing,
    engine: ExtractionEngine,
    batch_size: int,
) -> np.ndarray:
    """Logits for ``split``'s images: from its cached features at ``cut`` when the backbone is
    frozen, else from the images."""
    features = split.features.get(cut) if cut else None
    if isinstance(model, FrozenTransferModel) and features is not None:
        with torch.inference_mode():
            return model.head(torch.from_numpy(features).float()).numpy()
    return engine.predict(model, split.paths, prep, batch_size)


def split_metrics(
    split: str, logits: np.ndarray, labels: np.ndarray, classes: list[str]
) -> SplitMetrics:
    """Accuracy and per-class precision/recall of ``logits`` against integer ``labels``."""
    pred = logits.argmax(1)
    idx = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, pred, labels=idx, zero_division=0
    )
    per_class = {
        c: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "support": int(support[i]),
        }
        for i, c in enumerate(classes)
    }
    cm = confusion_matrix(labels, pred, labels=idx)
    correct = int((pred == labels).sum())
    low, high = wilson_interval(correct, len(labels))
    present = support > 0  # classes absent from this split have no recall to average
    return SplitMetrics(
        split,
        len(labels),
        correct / max(len(labels), 1),
        per_class,
        cm.tolist(),
        low,
        high,
        float(recall[present].mean()) if present.any() else float("nan"),
        float(f1[present].mean()) if present.any() else float("nan"),
    )


def plot_confusion(metrics: SplitMetrics, classes: list[str], path: Path) -> Path:
    """A confusion matrix with counts in the cells."""
    cm = np.asarray(metrics.confusion)
    size = max(4.0, 0.5 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(
        f"{metrics.split}: accuracy {metrics.accuracy:.3f} "
        f"({metrics.accuracy_low:.3f}-{metrics.accuracy_high:.3f}, n={metrics.n})"
    )
    for (i, j), v in np.ndenumerate(cm):
        ax.text(
            j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black"
        )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_learning_curve(history: tuple[dict[str, float], ...], path: Path, title: str) -> Path:
    """Training loss, validation loss and validation accuracy per epoch."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    epochs = range(1, len(history) + 1)
    left.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    left.plot(epochs, [h["val_loss"] for h in history], label="val loss")
    left.set_xlabel("epoch")
    left.legend()
    right.plot(epochs, [h["val_accuracy"] for h in history], color="tab:green")
    right.set_xlabel("epoch")
    right.set_ylabel("val accuracy")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
