"""The models a service answers with, by version: each read from the model store, verified, warmed up, with its own
micro-batcher and pipeline. The pixel budget is one for all of them, so no model's requests starve the others'.

- The default model (the one the service starts with) answers requests that name no version. It is pinned: never
  unloaded, never evicted.
- At most `max_models` are loaded, the default included. Loading one more unloads the least recently used other one,
  after the new one has loaded: a load that fails costs no served model (for that moment, one more model is in
  memory).
- A load reads, verifies and warms the model up in a thread, so the served models keep answering meanwhile; it takes
  requests only once warm. Loads and unloads run one at a time.
- Only the default model is compiled (when compiling is on). torch.compile keeps at most 8 compiled graphs of the
  network's forward, shared by every model of the architecture: each compiled load adds two (one per input shape),
  and from the fourth load on the new ones ran eagerly with a warning; what it compiled also stays in memory after
  an unload (docs/operations.md has the figures). So a loaded model runs uncompiled (PyTorch eager, or ONNX Runtime
  where the backend's `auto` picks it without compiling), and loads without the compile's wait.
- A load that fails (a name that is no version, a version not in the store, a bad model.json, a missing or corrupt
  weights file, a failed warm-up) raises with the reason and changes nothing.
- Unloading takes the model out at once (new requests for it are refused); the requests already using it finish on
  it; then its micro-batcher stops and its memory is given back.
- With several server processes (workers), SharedModels keeps them serving the same versions.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import gc
import itertools
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Protocol

import torch

from app.ml.card import ModelCard
from app.ml.checkpoint import atomic_write_json, list_versions, load_checkpoint, read_card, resolve_model_folder
from app.ml.errors import CellSegError, CheckpointError, InvalidOptionError
from app.ml.imageio import ImageLimits
from app.ml.options import InferenceOptions
from app.ml.serving.batcher import MicroBatcher
from app.ml.serving.budget import PixelBudget
from app.ml.serving.pipeline import SegmentationPipeline
from app.ml.serving.predictor import Predictor

log = logging.getLogger("cellseg.registry")


class ModelNotFoundError(CellSegError):
    """The version is not in the model store (or, for an unload, not loaded)."""


class ModelNotLoadedError(CellSegError):
    """The version is in the store but not loaded: requests for it are refused until it is."""


class ModelNotReadyError(CellSegError):
    """The model is loaded but not warmed up yet, or its warm-up failed."""


class PinnedModelError(CellSegError):
    """The default model cannot be unloaded, nor evicted to make room for another."""


class ModelLoadError(CellSegError):
    """Loading failed for a reason other than the model folder's content (the warm-up failed, say)."""


class ServingOptions(Protocol):
    """The service's settings a registry reads (app.config.Settings has them by these names)."""

    model_store: Path
    max_models: int
    max_batch: int
    max_wait_ms: float
    max_queue: int
    warmup: bool

    @property
    def inference(self) -> InferenceOptions: ...


class ServingObserver(Protocol):
    """Where the served models report what they do (app.api.metrics.Metrics)."""

    def observe_batch(self, model: str, size: int, seconds: float, depth: int) -> None: ...

    def observe_skipped(self, count: int) -> None: ...

    def observe_stage(self, stage: str, seconds: float) -> None: ...


class _Unobserved:
    def observe_batch(self, model: str, size: int, seconds: float, depth: int) -> None:
        pass

    def observe_skipped(self, count: int) -> None:
        pass

    def observe_stage(self, stage: str, seconds: float) -> None:
        pass


@dataclass(frozen=True)
class LoadedModel:
    """A model read from the store, verified and on its device, not yet warmed up."""

    predictor: Predictor
    card: ModelCard  # as the service shows it: without the paths of the machine that trained it

    @property
    def version(self) -> str:
        return self.predictor.version


def load_model(options: ServingOptions, version: str | None = None, compile: bool = True) -> LoadedModel:
    """The model `version` of the store (None: the store's default), its weights checked against their sha256.
    Blocking. Compiled as the options say, unless `compile` is false; it compiles while warming up, so without a
    warm-up compiling is off."""
    checkpoint = load_checkpoint(resolve_model_folder(options.model_store, version))
    inference = options.inference
    inference = replace(inference, compile=inference.compile and compile and options.warmup)
    predictor = Predictor.from_checkpoint(checkpoint, inference)
    return LoadedModel(predictor, checkpoint.card.without_host_paths())


def release_memory() -> None:
    """Give the memory of objects just dropped back to the system: collect reference cycles, empty PyTorch's CUDA
    cache, and have glibc return its free heap pages (the service keeps freed blocks in the heap, app.cli.tune_malloc,
    so without this an unloaded model's weights stay resident)."""
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class ServedModel:
    """One loaded version: its predictor, micro-batcher and pipeline, and how it is being used."""

    def __init__(
        self,
        loaded: LoadedModel,
        batcher: MicroBatcher,
        pipeline: SegmentationPipeline,
        pinned: bool,
        turns: Iterator[int],
    ) -> None:
        self.version, self.card, self.predictor = loaded.version, loaded.card, loaded.predictor
        self.batcher, self.pipeline, self.pinned = batcher, pipeline, pinned
        self.ready, self.status = False, "warming up"
        self.loaded_at, self.last_used_at = time.time(), None  # wall clock, to show
        self.in_flight = 0  # requests using it now
        self._turns = turns
        self.turn = next(turns)  # when it was last used (or loaded), in the registry's order: the LRU goes first
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def in_use(self) -> Iterator[ServedModel]:
        """Count a request as using the model while inside: unloading it waits for the requests inside."""
        self.in_flight += 1
        self._idle.clear()
        self.turn, self.last_used_at = next(self._turns), time.time()
        try:
            yield self
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self._idle.set()

    async def drained(self) -> None:
        """Return once no request uses the model."""
        await self._idle.wait()


@dataclass(frozen=True)
class Change:
    """What a load or an unload did."""

    version: str
    status: Literal["loaded", "already loaded", "unloaded"]
    seconds: float
    evicted: str | None = None  # the model a load unloaded to make room
    drained: int = 0  # requests an unload let finish on the model first


class SharedModels:
    """The versions loaded beside the default, in a file every worker process of one server reads.

    A worker that loads or unloads a version does it under a lock on the file, having first caught up with it, then
    writes it; every other worker notices the change at its next request (one stat of the file) and catches up in
    the background, and a request for a version listed but not loaded there yet waits for it. So a load or unload
    answered by one worker reaches every worker.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._seen: tuple[int, int] | None = None

    def changed(self) -> bool:
        """Whether the file changed since this process last read or wrote it."""
        return self._stamp() != self._seen

    def read(self) -> list[str]:
        """The versions listed; changed() is false from now until the next write."""
        stamp = self._stamp()  # before reading: a write in between makes the next changed() true, never missed
        versions = self.peek()
        self._seen = stamp
        return versions

    def peek(self) -> list[str]:
        """The versions listed, leaving changed() as it is."""
        try:
            return json.loads(self.path.read_text())["versions"]
        except FileNotFoundError:
            return []

    def write(self, versions: list[str]) -> None:
        atomic_write_json(self.path, {"versions": versions})
        self._seen = self._stamp()

    @contextlib.asynccontextmanager
    async def locked(self) -> AsyncIterator[None]:
        """Hold the file's lock (between processes) while inside; waits for it in a thread, off the event loop."""
        with (self.path.parent / f"{self.path.name}.lock").open("a") as handle:
            await asyncio.to_thread(fcntl.flock, handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _stamp(self) -> tuple[int, int]:
        try:
            status = self.path.stat()
        except FileNotFoundError:
            return (0, 0)
        return (status.st_ino, status.st_mtime_ns)  # a write replaces the file: a new inode


class ModelRegistry:
    """The models a service answers with, by version (see the module's doc). Used from one event loop."""

    def __init__(
        self,
        options: ServingOptions,
        default: LoadedModel,
        budget: PixelBudget,
        limits: ImageLimits,
        observer: ServingObserver | None = None,
        shared: SharedModels | None = None,
    ) -> None:
        self.options, self.budget, self.limits, self.shared = options, budget, limits, shared
        self.observer = observer or _Unobserved()
        self.default = default.version
        self.max_models = options.max_models
        self.loading: str | None = None  # the version being loaded now, if any
        self._turns = itertools.count()
        self._lock = asyncio.Lock()  # loads and unloads, one at a time
        self._failed: dict[str, str] = {}  # with SharedModels: versions listed there that failed to load here
        self._sync: asyncio.Task | None = None
        self._models: dict[str, ServedModel] = {}
        self._add(default, pinned=True)

    # ------------------------------------------------------------------ state

    @property
    def default_model(self) -> ServedModel:
        return self._models[self.default]

    @property
    def models(self) -> list[ServedModel]:
        """The loaded models, the default first, then by version."""
        return sorted(self._models.values(), key=lambda m: (not m.pinned, m.version))

    def available(self) -> list[str]:
        """The versions in the store."""
        return list_versions(self.options.model_store)

    def card(self, version: str) -> ModelCard:
        """model.json of a version in the store (loaded or not), without the training machine's paths."""
        self._check_in_store(version)
        served = self._models.get(version)
        if served is not None:
            return served.card
        with self._store_relative_paths():
            return read_card(Path(self.options.model_store) / version).without_host_paths()

    @property
    def depth(self) -> int:
        """Network inputs waiting, over every model."""
        return sum(served.batcher.depth for served in self._models.values())

    def is_full(self, version: str | None) -> bool:
        """Whether a request for `version` (None: the default) could not start now: the pixel budget (one for all
        models) is spent, or that model's queue is full."""
        served = self._models.get(version or self.default)
        return served.pipeline.is_full if served else self.budget.used >= self.budget.in_flight

    # ------------------------------------------------------------------ start and stop

    def start(self) -> None:
        """Start the default model's micro-batcher (in the running event loop); it is ready once warm_up_default
        has run."""
        self.default_model.batcher.start()

    async def warm_up_default(self) -> None:
        """Warm the default model up in a thread (compiling it, when on); a failure leaves it not ready, saying why.
        With other workers, then catch up with the versions they have loaded."""
        served = self.default_model
        try:
            if self.options.warmup:
                compiling = served.predictor.options.compile
                served.status = "warming up the model (compiling it)" if compiling else "warming up"
                await asyncio.to_thread(served.predictor.warm_up)
        except Exception as exc:  # the service keeps running, not ready, saying why
            served.status = f"failed while warming up: {exc}"
            log.critical("the model failed while warming up: %s", exc, exc_info=exc)
            return
        served.ready, served.status = True, "ready"
        self._log_serving(served)
        if self.shared is not None:
            self._start_sync()

    async def close(self) -> None:
        """Stop every model's micro-batcher."""
        if self._sync is not None:
            self._sync.cancel()
        for served in list(self._models.values()):
            served.ready = False
            await served.batcher.stop()

    # ------------------------------------------------------------------ requests

    async def acquire(self, version: str | None) -> ServedModel:
        """The model of `version` (None: the default), ready for a request; the caller holds it with `in_use()`
        before its next await. ModelNotFoundError (not in the store), ModelNotLoadedError, ModelNotReadyError, or
        ModelLoadError (listed as loaded by the other workers, but it failed to load in this one)."""
        version = version or self.default  # model= left empty too
        if self.shared is not None:
            await self._follow_shared(version)
        served = self._models.get(version)
        if served is None:
            self._check_in_store(version)
            if version in self._failed:
                raise ModelLoadError(
                    f"model {version} is loaded in the other workers but failed to load in this one (process "
                    f"{os.getpid()}): {self._failed[version]}"
                )
            raise ModelNotLoadedError(f"model version {version!r} is in the store but not loaded ({self._listing()})")
        if not served.ready:
            raise ModelNotReadyError(f"not ready yet ({served.status}); retry in a few seconds")
        return served

    # ------------------------------------------------------------------ loads and unloads

    async def load(self, version: str) -> Change:
        """Load `version`, warm it up and serve it, unloading the least recently used other model first if
        `max_models` are loaded. A no-op for a version already loaded."""
        self._check_in_store(version)
        started = time.perf_counter()
        async with self._lock, self._shared_lock():
            await self._catch_up()
            if version in self._models:
                return Change(version, "already loaded", time.perf_counter() - started)
            if len(self._models) >= self.max_models and self._least_recently_used() is None:
                raise PinnedModelError(
                    f"cannot load {version}: at most {self.max_models} model(s) may be loaded (CELLSEG_MAX_MODELS) "
                    f"and the default model {self.default} is never unloaded"
                )
            loaded = await self._load_and_warm(version)  # raises with nothing changed
            evicted = self._least_recently_used() if len(self._models) >= self.max_models else None
            if evicted is not None:
                await self._retire(evicted)
            served = self._serve(loaded)
            self._write_shared()
        self._log_serving(served, evicted=evicted)
        return Change(version, "loaded", time.perf_counter() - started, evicted=evicted)

    async def unload(self, version: str) -> Change:
        """Stop serving `version`: refuse new requests for it now, let those using it finish, then free it.
        PinnedModelError for the default, ModelNotFoundError for a version not loaded."""
        started = time.perf_counter()
        async with self._lock, self._shared_lock():
            await self._catch_up()
            if version == self.default:
                raise PinnedModelError(
                    f"model {version} is the default model: it answers requests without model= and is never "
                    "unloaded (serve another default by setting CELLSEG_MODEL_VERSION and restarting)"
                )
            if version not in self._models:
                raise ModelNotFoundError(f"model version {version!r} is not loaded ({self._listing()})")
            drained = await self._retire(version, before_freeing=self._write_shared)
        log.info("unloaded model %s", version, extra={"model_version": version, "drained": drained})
        return Change(version, "unloaded", time.perf_counter() - started, drained=drained)

    async def sync(self) -> None:
        """With SharedModels: load and unload so this worker serves the versions listed there."""
        async with self._lock:
            await self._catch_up()

    # ------------------------------------------------------------------ inside

    def _add(self, loaded: LoadedModel, pinned: bool) -> ServedModel:
        options, observer, version = self.options, self.observer, loaded.version
        max_batch = options.max_batch or (8 if loaded.predictor.device.type == "cuda" else 1)
        batcher = MicroBatcher(
            loaded.predictor.run_network,
            loaded.predictor.steps.stack,
            max_batch,
            options.max_wait_ms / 1000,
            options.max_queue,
            observe_batch=lambda size, seconds: observer.observe_batch(version, size, seconds, self.depth),
            observe_skipped=observer.observe_skipped,
        )
        pipeline = SegmentationPipeline(loaded.predictor, batcher, self.limits, observer.observe_stage, self.budget)
        served = self._models[version] = ServedModel(loaded, batcher, pipeline, pinned, self._turns)
        return served

    def _serve(self, loaded: LoadedModel) -> ServedModel:
        """A loaded and warmed up model, taking requests from now on."""
        served = self._add(loaded, pinned=False)
        served.batcher.start()
        served.ready, served.status = True, "ready"
        self._failed.pop(served.version, None)
        return served

    async def _load_and_warm(self, version: str) -> LoadedModel:
        self.loading = version
        try:
            return await asyncio.to_thread(self._read_and_warm, version)
        finally:
            self.loading = None

    def _read_and_warm(self, version: str) -> LoadedModel:
        try:
            with self._store_relative_paths():  # never compiled: see the module's doc
                loaded = load_model(self.options, version, compile=False)
            if self.options.warmup:
                loaded.predictor.warm_up()
        except CellSegError:  # a bad model folder or option: CheckpointError, InvalidOptionError, with the reason
            raise
        except Exception as exc:  # torch's own (out of memory, say)
            log.error("model %s failed to load: %s", version, exc, exc_info=exc)
            raise ModelLoadError(f"model {version} failed to load: {exc}") from exc
        return loaded

    @contextlib.contextmanager
    def _store_relative_paths(self) -> Iterator[None]:
        """A CheckpointError names files by their path; an answer names them from the store on (`<version>/...`),
        keeping the service's folders to itself."""
        try:
            yield
        except CheckpointError as exc:
            raise CheckpointError(str(exc).replace(f"{Path(self.options.model_store)}{os.sep}", "")) from None

    def _least_recently_used(self) -> str | None:
        """The version to unload to make room: the least recently used one that is not pinned."""
        candidates = [served for served in self._models.values() if not served.pinned]
        return min(candidates, key=lambda served: served.turn).version if candidates else None

    async def _retire(self, version: str, before_freeing: Callable[[], None] | None = None) -> int:
        """Take `version` out (new requests for it are refused), let the requests using it finish, stop its
        micro-batcher and free its memory; returns how many requests were using it."""
        served = self._models.pop(version)
        served.ready, served.status = False, "unloading"
        if before_freeing is not None:
            before_freeing()
        drained = served.in_flight
        await served.drained()
        await served.batcher.stop()
        del served  # the last reference: the predictor, the batcher and the pipeline go with it
        await asyncio.to_thread(release_memory)
        return drained

    def _listing(self) -> str:
        return "loaded: " + ", ".join(served.version for served in self.models)

    def _check_in_store(self, version: str) -> None:
        if Path(version).name != version or version in {"", ".", ".."} or "\\" in version:
            raise InvalidOptionError(
                f"{version!r} is not a model version: a version is the name of a folder in the model store, without "
                "'/' or '..'"
            )
        if version not in self._models and version not in (available := self.available()):
            raise ModelNotFoundError(
                f"model version {version!r} not found in the model store; available: {', '.join(available) or 'none'}"
            )

    def _log_serving(self, served: ServedModel, evicted: str | None = None) -> None:
        where = {"model_version": served.version, **served.predictor.how_it_runs(), "evicted": evicted}
        message = (
            "serving model %(model_version)s on %(device)s with %(backend)s in %(precision)s (compiled: %(compiled)s)"
        )
        log.info(message, where, extra=where)

    # ------------------------------------------------------------------ several workers

    def _shared_lock(self) -> contextlib.AbstractAsyncContextManager[None]:
        return self.shared.locked() if self.shared is not None else contextlib.nullcontext()

    def _write_shared(self) -> None:
        if self.shared is not None:
            self.shared.write(sorted(version for version in self._models if version != self.default))

    def _start_sync(self) -> None:
        if self._sync is None or self._sync.done():
            self._sync = asyncio.get_running_loop().create_task(self.sync(), name="models-sync")

    def follow(self) -> None:
        """With SharedModels: start catching up with the other workers, in the background, if they loaded or
        unloaded a version since this worker last looked."""
        if self.shared is not None and self.shared.changed():
            self._start_sync()

    async def _follow_shared(self, version: str) -> None:
        """follow(); while catching up, a request for a version the other workers loaded or unloaded waits for it."""
        assert self.shared is not None
        self.follow()
        if self._sync is None or self._sync.done() or version == self.default:
            return
        if (version in self._models) != (version in self.shared.peek()):
            await asyncio.shield(self._sync)

    async def _catch_up(self) -> None:
        """Under the lock: unload what the shared file no longer lists, load what it lists and is not here."""
        if self.shared is None:
            return
        listed = [version for version in self.shared.read() if version != self.default]
        for version in [v for v in self._models if v != self.default and v not in listed]:
            await self._retire(version)
            log.info("unloaded model %s, as another worker did", version, extra={"model_version": version})
        for version in listed:
            if version in self._models or len(self._models) >= self.max_models:
                continue
            try:
                loaded = await self._load_and_warm(version)
            except CellSegError as exc:  # requests for it say why (acquire)
                self._failed[version] = str(exc)
                log.error("model %s, loaded by another worker, failed to load here: %s", version, exc)
                continue
            served = self._serve(loaded)
            self._log_serving(served)
