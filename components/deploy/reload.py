"""The served model, and hot reload when its registry alias moves.

``ModelHolder.current`` is the one reference a request reads; a reload builds the new
``OnnxClassifier`` completely (download, session, warm-up run) and then replaces that reference in
one assignment. Requests that already read the old one keep it until they finish, so none is
dropped; the old version's files are deleted once the swap is made (its session is in memory).
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from components.deploy import tracking
from components.deploy.classifier import OnnxClassifier
from components.engine.images import Preprocessing

log = logging.getLogger(__name__)

_BARE_NAME = re.compile(r"models:/[^/@]+/?")


def with_alias(model_uri: str, alias: str) -> str:
    """``models:/NAME`` as ``models:/NAME@alias``; a URI with a version or alias unchanged."""
    return f"{model_uri.rstrip('/')}@{alias}" if _BARE_NAME.fullmatch(model_uri) else model_uri


class RegistrySource:
    """Registered versions of one model, downloaded into a folder of their own for serving."""

    def __init__(self, model_uri: str, tracking_uri: str, threads: int | None = None) -> None:
        self.model_uri = model_uri
        self.tracking_uri = tracking_uri
        self.follows_alias = "@" in model_uri
        self._threads = threads
        self._root = Path(tempfile.mkdtemp(prefix="served-models-"))

    def resolve(self) -> tuple[str, str]:
        """The model's name and the version the URI names now (one registry query)."""
        return tracking.resolve_model_version(self.model_uri, self.tracking_uri)

    def load(self, name: str, version: str) -> OnnxClassifier:
        """Download ``version``, open its session and run it once, ready to take requests."""
        dst = self._root / f"v{version}"
        dst.mkdir(parents=True, exist_ok=True)
        onnx_path, labels, prep = tracking.load_registered(
            f"models:/{name}/{version}", self.tracking_uri, dst
        )
        model = OnnxClassifier(
            onnx_path,
            labels,
            Preprocessing.from_dict(prep),
            name=name,
            version=version,
            threads=self._threads,
        )
        model.warm_up()
        return model

    def discard(self, version: str) -> None:
        """Delete a version's files once it is no longer served (its session stays usable)."""
        shutil.rmtree(self._root / f"v{version}", ignore_errors=True)

    def close(self) -> None:
        """Delete every downloaded file."""
        shutil.rmtree(self._root, ignore_errors=True)


class ModelHolder:
    """The model being served, following a registry alias when it came from one.

    ``refresh`` loads the version the alias points at whenever it differs from the one served;
    a holder without a source, or whose URI names a version, never changes.
    """

    def __init__(self, model: OnnxClassifier, source: RegistrySource | None = None) -> None:
        self.current = model
        self.source = source
        self._listeners: list[Callable[[OnnxClassifier], None]] = []

    @classmethod
    def from_registry(
        cls, model_uri: str, tracking_uri: str, threads: int | None = None
    ) -> ModelHolder:
        """Load the version ``model_uri`` names now (``models:/NAME@alias`` or ``/VERSION``)."""
        source = RegistrySource(model_uri, tracking_uri, threads)
        try:
            return cls(source.load(*source.resolve()), source)
        except BaseException:
            source.close()
            raise

    @property
    def follows_alias(self) -> bool:
        return self.source is not None and self.source.follows_alias

    def on_swap(self, listener: Callable[[OnnxClassifier], None]) -> None:
        """Tell ``listener`` the model served now, and every later one once it is live."""
        self._listeners.append(listener)
        listener(self.current)

    def refresh(self) -> bool:
        """Check the alias once; load and switch to its version if it moved. True on a switch.

        Blocking (registry query, download, session build): run it off the event loop.
        """
        if self.source is None or not self.source.follows_alias:
            return False
        name, version = self.source.resolve()
        if version == self.current.version:
            return False
        new = self.source.load(name, version)
        old, self.current = self.current, new
        log.info("now serving %s version %s (was %s)", name, version, old.version)
        for listener in self._listeners:
            listener(new)
        self.source.discard(old.version)
        return True

    def close(self) -> None:
        """Delete the downloaded files (loaded sessions keep working)."""
        if self.source is not None:
            self.source.close()
