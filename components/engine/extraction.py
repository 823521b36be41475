"""The extraction engine: the one place that runs a backbone over images.

One engine serves a whole flow run. It owns the engine choice (ONNX Runtime streams on CPU, PyTorch
with bf16 autocast on CUDA), batching, decoding and the content-addressed row caches. Embedding,
similarity, domain profiles, the probe and evaluation all ask it for rows; it computes only what
its caches lack, and computes each image once: an image in the similarity sample gets its pooled
features and its BatchNorm moments from the same forward pass (``passes.FeaturesAndMoments``).

Measured on 2 CPUs (``docs/benchmarks.md``): ONNX Runtime runs the backbone 2.5-3x as fast as
channels-last PyTorch end to end, and one single-threaded stream per CPU, each decoding its own
batch, beat one two-threaded session fed by loader processes by 1.2-1.4x.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from torch import nn
from torch.utils.data import DataLoader

from components.common.config import TrainConfig
from components.common.errors import PipelineError
from components.common.progress import Progress, ProgressCallback, within
from components.engine.backbones import Backbone
from components.engine.cache import MOMENTS_SUFFIX, RowCache, cache_key
from components.engine.images import EvalTransform, ImageFiles, Preprocessing, decode_batch
from components.engine.onnx_graphs import (
    available_cpus,
    cached_graph,
    cpu_eval_copy,
    feature_session,
)
from components.engine.passes import (
    BnMoments,
    FeaturesAndMoments,
    PooledFeatureStack,
    RowLayout,
    row_layout,
)

log = logging.getLogger(__name__)

# Measured end to end with ONNX Runtime streams on 2 CPUs: the best batch holds about this many
# pixels (8 images at 224 px: 142 img/s against 131 at 32; 64 at 64 px: 1,770-1,990 against 1,410
# at 8), since a smaller batch's activations stay in cache and its first run allocates less.
PIXELS_PER_CPU_BATCH = 8 * 224 * 224
CUDA_BATCH = 64
# Loader workers for the PyTorch engine (the ONNX engine decodes in its own streams).
NUM_WORKERS = 2
ENGINES = ("auto", "onnxruntime", "torch")


@dataclass(frozen=True)
class _Graph:
    """One of the engine's two passes: its module, its cached ONNX file and its row type."""

    wrap: Callable[[nn.Module], nn.Module]
    file_name: str
    output_name: str
    dtype: type
    autocast: bool  # bf16 on CUDA: features tolerate it; moments keep float32 as the reference


FEATURES = _Graph(PooledFeatureStack, "extractor.onnx", "features", np.float16, True)
FEATURES_AND_MOMENTS = _Graph(
    FeaturesAndMoments, "features_and_moments.onnx", "rows", np.float32, False
)


def extraction_batch(image_size: int, device: torch.device) -> int:
    """Images per extraction batch: ``CUDA_BATCH`` on a GPU; on a CPU the power of two nearest
    below ``PIXELS_PER_CPU_BATCH`` pixels (8 at 224 px, 64 at 64 px), between 1 and 128."""
    if device.type == "cuda":
        return CUDA_BATCH
    fits = max(1, PIXELS_PER_CPU_BATCH // (image_size * image_size))
    return min(128, 2 ** (fits.bit_length() - 1))


def choose_device(preference: str) -> torch.device:
    """CUDA when asked for or available (``auto``), else CPU."""
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def choose_engine(engine: str, device: torch.device) -> str:
    """``auto``: ONNX Runtime on CPU, where it is fastest; PyTorch with bf16 autocast on CUDA."""
    if engine not in ENGINES:
        raise ValueError(f"unknown feature engine {engine!r}; expected one of {ENGINES}")
    if engine == "auto":
        return "torch" if device.type == "cuda" else "onnxruntime"
    return engine


def with_progress(
    batches: Iterable[object],
    n: int,
    total: int | None = None,
    verb: str = "embedding",
    on_progress: ProgressCallback | None = None,
) -> Progress:
    """``batches`` (``total`` of them, or ``len(batches)``) with the progress of ``n`` images."""
    return Progress(batches, total, f"{verb} {n} images", "batch", on_progress=on_progress)


def image_loader(
    paths: Sequence[str], prep: Preprocessing, batch_size: int, num_workers: int, pin: bool
) -> DataLoader:
    """Batches of ``paths`` decoded in worker processes, so decoding overlaps inference."""
    return DataLoader(
        ImageFiles(paths, [0] * len(paths), EvalTransform(prep)),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=pin,
    )


def stream_plan(n_images: int, batch_size: int, cpus: int) -> tuple[int, int]:
    """How many batches run at once, and how many ONNX Runtime threads each gets.

    One single-threaded stream per CPU, each decoding a batch and then running it: one stream's
    decoding fills the other's gaps, and no ONNX Runtime thread waits at a barrier for a sibling
    that a decoder pre-empted. Spare CPUs (fewer batches than CPUs) go to the streams' threads.
    """
    batches = max(1, -(-n_images // batch_size))
    streams = min(cpus, batches)
    return streams, max(1, cpus // streams)


def run_streams(
    session: onnxruntime.InferenceSession,
    paths: Sequence[str],
    prep: Preprocessing,
    batch_size: int,
    streams: int,
    dtype: type = np.float16,
    verb: str = "embedding",
    on_progress: ProgressCallback | None = None,
) -> np.ndarray:
    """The session's first output for every image in ``paths``, row by row (``verb`` names the
    work in the progress shown; ``on_progress`` hears of every batch).

    ``streams`` threads each decode a batch and run it. Threads suffice: Pillow's decoders and
    resampling, NumPy's normalisation and ONNX Runtime all release the GIL while they work.
    """
    name = session.get_inputs()[0].name

    def rows(batch: Sequence[str]) -> np.ndarray:
        return session.run(None, {name: decode_batch(batch, prep)})[0].astype(dtype)

    batches = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
    pool = ThreadPoolExecutor(streams, thread_name_prefix="embed")
    try:
        return np.concatenate(
            list(
                with_progress(pool.map(rows, batches), len(paths), len(batches), verb, on_progress)
            )
        )
    finally:
        pool.shutdown(cancel_futures=True)  # on an error, queued batches are dropped, not run


class ExtractionEngine:
    """Runs ``backbone`` over images and remembers every row it computed.

    Built once per flow run and handed to every stage, so the backbone is built once, each cache
    folder is read from disk once and each ONNX Runtime session is opened once.
    """

    def __init__(
        self,
        backbone: Backbone,
        cache_root: Path,
        device: torch.device | None = None,
        engine: str = "auto",
        num_workers: int = NUM_WORKERS,
        moments_batch_size: int | None = None,
        batch_size: int | None = None,
        cpus: int | None = None,
    ) -> None:
        self.backbone = backbone
        self.cache_root = Path(cache_root)
        self.device = device or choose_device("auto")
        self.engine = choose_engine(engine, self.device)
        self.num_workers = num_workers
        self.moments_batch_size = moments_batch_size
        self.batch_size = batch_size  # None: sized to the image and device (extraction_batch)
        # CPUs the ONNX Runtime streams share; None: every CPU this process may use. A Dask
        # worker passes its own thread count, so workers on one machine do not oversubscribe it.
        self.cpus = cpus
        self.layout: RowLayout = row_layout(backbone.model)
        self._caches: dict[str, RowCache] = {}
        self._sessions: dict[tuple[Path, int], onnxruntime.InferenceSession] = {}
        self._lock = threading.Lock()  # tasks may run in threads; one extraction at a time

    @classmethod
    def for_training(
        cls,
        backbone: Backbone,
        cache_root: Path,
        train: TrainConfig,
        moments_batch_size: int | None = None,
        cpus: int | None = None,
    ) -> ExtractionEngine:
        """The engine on the device, engine and loader workers that ``train`` sets."""
        return cls(
            backbone,
            cache_root,
            choose_device(train.device),
            train.feature_engine,
            train.num_workers,
            moments_batch_size,
            cpus=cpus,
        )

    @property
    def native(self) -> Preprocessing:
        """The backbone's own preprocessing: where its BatchNorm statistics were measured."""
        return self.backbone.preprocessing

    def features(
        self,
        paths: Sequence[str],
        shas: Sequence[str],
        prep: Preprocessing,
        moments_for: Collection[str] = (),
        on_progress: ProgressCallback | None = None,
    ) -> dict[str, np.ndarray]:
        """Pooled features at every cut point, one array per cut point, rows in ``shas`` order.

        Images whose sha256 is in ``moments_for`` also get their BatchNorm moments at ``prep``
        computed and cached in the same pass, so a later ``moments`` call reads them.
        ``on_progress`` hears how much of what the caches lacked is computed (1.0 at the end).
        """
        self._fill(paths, shas, prep, set(moments_for), on_progress)
        rows = self._cache(cache_key(self.backbone, prep)).get(shas)
        return self.layout.features(rows, self.backbone.cut_points)

    def moments(
        self,
        paths: Sequence[str],
        shas: Sequence[str],
        prep: Preprocessing | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> BnMoments:
        """Every image's BatchNorm input moments and source logits at ``prep`` (default: native)."""
        prep = prep or self.native
        self._fill(paths, shas, prep, set(shas), on_progress)
        return self.layout.moments(self._cache(self._moments_key(prep)).get(shas))

    def missing_features(self, shas: Sequence[str], prep: Preprocessing) -> list[str]:
        """``shas`` (each once, in order) whose features at ``prep`` are not cached yet."""
        return self._cache(cache_key(self.backbone, prep)).missing(shas)

    def feature_batch(self, prep: Preprocessing) -> int:
        """Images per batch of the feature pass at ``prep``: shards cut at whole batches run the
        same batches as one process would."""
        return self._batch(FEATURES, prep)

    def prepare(self, prep: Preprocessing) -> None:
        """Export (or find) the feature graph at ``prep`` now, so shards in other processes load
        one file instead of each exporting it. A graph that cannot be trusted is left to them:
        they fall back to PyTorch the same way."""
        if self.engine != "onnxruntime":
            return
        try:
            self._graph_file(FEATURES, prep)
        except (PipelineError, torch.onnx.OnnxExporterError) as err:
            log.warning("%s unusable: %s", FEATURES.file_name, err)

    def refresh(self, prep: Preprocessing) -> int:
        """Read the feature rows at ``prep`` that other processes cached since this engine last
        looked (the shards of a Dask run); returns how many."""
        return self._cache(cache_key(self.backbone, prep)).refresh()

    @torch.inference_mode()
    def predict(
        self,
        model: nn.Module,
        paths: Sequence[str],
        prep: Preprocessing,
        batch_size: int,
        on_progress: ProgressCallback | None = None,
    ) -> np.ndarray:
        """``model``'s outputs for ``paths`` (in PyTorch on the engine's device; uncached, since
        a trained model is not the backbone the caches are keyed by)."""
        return self._torch_rows(model, paths, prep, batch_size, True, on_progress)

    def _moments_key(self, prep: Preprocessing) -> str:
        return cache_key(self.backbone, prep) + MOMENTS_SUFFIX

    def _cache(self, key: str) -> RowCache:
        if key not in self._caches:
            self._caches[key] = RowCache(self.cache_root / key)
        return self._caches[key]

    def _fill(
        self,
        paths: Sequence[str],
        shas: Sequence[str],
        prep: Preprocessing,
        moments_for: set[str],
        on_progress: ProgressCallback | None = None,
    ) -> None:
        with self._lock:
            features = self._cache(cache_key(self.backbone, prep))
            moments = self._cache(self._moments_key(prep)) if moments_for else None
            with_moments = [s for s in moments.missing(shas) if s in moments_for] if moments else []
            both = set(with_moments)
            features_only = [s for s in features.missing(shas) if s not in both]
            log.info(
                "engine: %d images at %d px, %d to compute (%d with BatchNorm moments) (%s)",
                len(shas),
                prep.image_size,
                len(features_only) + len(with_moments),
                len(with_moments),
                self.engine,
            )
            first_path = {s: p for p, s in zip(paths, shas, strict=True)}
            # One fraction over both passes, each weighted by its images.
            split = len(with_moments) / max(1, len(with_moments) + len(features_only))
            if with_moments:
                rows = self._rows(
                    FEATURES_AND_MOMENTS,
                    [first_path[s] for s in with_moments],
                    prep,
                    within(on_progress, 0.0, split),
                )
                lacking = set(features.missing(with_moments))
                keep = [i for i, s in enumerate(with_moments) if s in lacking]
                n = self.layout.n_features
                if keep:
                    features.add(
                        [with_moments[i] for i in keep], rows[keep, :n].astype(FEATURES.dtype)
                    )
                moments.add(with_moments, rows[:, n:])
            if features_only:
                rows = self._rows(
                    FEATURES,
                    [first_path[s] for s in features_only],
                    prep,
                    within(on_progress, split, 1.0),
                )
                features.add(features_only, rows)
        if on_progress is not None:
            on_progress(1.0, len(shas), len(shas))  # also when the caches held everything

    def _batch(self, graph: _Graph, prep: Preprocessing) -> int:
        if graph is FEATURES_AND_MOMENTS and self.moments_batch_size:
            return self.moments_batch_size
        return self.batch_size or extraction_batch(prep.image_size, self.device)

    def _rows(
        self,
        graph: _Graph,
        paths: Sequence[str],
        prep: Preprocessing,
        on_progress: ProgressCallback | None = None,
    ) -> np.ndarray:
        batch = self._batch(graph, prep)
        if self.engine == "onnxruntime":
            rows = self._onnx_rows(graph, paths, prep, batch, on_progress)
            if rows is not None:
                return rows
        module = graph.wrap(self.backbone.model)
        rows = self._torch_rows(module, paths, prep, batch, graph.autocast, on_progress)
        return rows.astype(graph.dtype)

    def _onnx_rows(
        self,
        graph: _Graph,
        paths: Sequence[str],
        prep: Preprocessing,
        batch: int,
        on_progress: ProgressCallback | None = None,
    ) -> np.ndarray | None:
        streams, threads = stream_plan(len(paths), batch, self.cpus or available_cpus())
        try:
            path = self._graph_file(graph, prep)
            if (path, threads) not in self._sessions:
                self._sessions[path, threads] = feature_session(path, self.device, threads)
        except (PipelineError, torch.onnx.OnnxExporterError) as err:
            log.warning("%s unusable, computing its rows with PyTorch: %s", graph.file_name, err)
            return None
        session = self._sessions[path, threads]
        return run_streams(
            session, paths, prep, batch, streams, graph.dtype, on_progress=on_progress
        )

    def _graph_file(self, graph: _Graph, prep: Preprocessing) -> Path:
        return cached_graph(
            graph.wrap(cpu_eval_copy(self.backbone.model)).eval(),
            prep.image_size,
            self.cache_root / cache_key(self.backbone, prep) / graph.file_name,
            graph.output_name,
        )

    @torch.inference_mode()
    def _torch_rows(
        self,
        module: nn.Module,
        paths: Sequence[str],
        prep: Preprocessing,
        batch_size: int,
        autocast: bool,
        on_progress: ProgressCallback | None = None,
    ) -> np.ndarray:
        device = self.device
        # Moved for the pass and back: the module may share its weights with the run's backbone.
        module = module.to(device).eval()
        if device.type == "cpu":
            module = module.to(memory_format=torch.channels_last)
        loader = image_loader(paths, prep, batch_size, self.num_workers, pin=device.type == "cuda")
        cast = torch.autocast(
            device.type, dtype=torch.bfloat16, enabled=autocast and device.type == "cuda"
        )
        chunks = []
        try:
            for images, _ in with_progress(loader, len(paths), on_progress=on_progress):
                x = images.to(device, non_blocking=True).contiguous(
                    memory_format=torch.channels_last
                )
                with cast:
                    out = module(x)
                chunks.append(out.float().cpu().numpy())
        finally:
            module.to("cpu", memory_format=torch.contiguous_format)
        return np.concatenate(chunks)
