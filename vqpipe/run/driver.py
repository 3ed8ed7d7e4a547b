"""The only module that knows Ray: GPU-pinned actors pull shard URLs from the driver's queue.

Each :class:`ShardWorker` loads the model once and calls :func:`vqpipe.run.shard_job.process_shard`
for shard after shard. The driver owns retries (actors run with ``max_task_retries=0``): an actor
death requeues its shard, a shard that fails ``ray.max_retries`` times is recorded under
``_vqpipe/failed/``, a worker that shows no progress for ``ray.shard_timeout_s`` is restarted and
its shard requeued, stragglers are re-run elsewhere, and commit markers decide which attempt's
output stands, so no sample is written twice. The run stops early, with its bookkeeping done, on
a stop signal, on workers whose constructor keeps failing, and on a full output storage.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError

import vqpipe
from vqpipe import faults
from vqpipe.config import RunConfig
from vqpipe.encode.encoder import TokenEncoder
from vqpipe.encode.fidelity import guard_verdict
from vqpipe.model.loading import load_model, pick_device
from vqpipe.output.layout import failure_record
from vqpipe.output.retry import is_storage_full
from vqpipe.records import deterministic, shard_failure
from vqpipe.run.bookkeeping import Records
from vqpipe.run.guard import failure_verdict
from vqpipe.run.outcome import Outcome
from vqpipe.run.plan import Plan
from vqpipe.run.progress import Progress
from vqpipe.run.shard_job import ShardResult, make_settings, process_shard
from vqpipe.run.stop import StopRequest
from vqpipe.torch_threads import single_threaded_pool

log = logging.getLogger(__name__)

# Only shards running longer than this are duplicated onto idle workers at the end of the queue.
SPECULATE_AFTER_S = 5.0
# A worker whose constructor raises this many times in a row stops the run: it will not get better.
MAX_START_FAILURES = 3


class ShardWorker:
    """A Ray actor holding one model on one device (state once, shards many)."""

    def __init__(self, config: RunConfig):
        faults.worker_start()
        model = load_model(config.model)
        device = pick_device()
        self.encoder = TokenEncoder.from_config(model, device, config)
        self.job = make_settings(config.input, config.preprocess, config.output, model, self.encoder.precision,
                                 config.model.audit_samples)
        self.pool = single_threaded_pool(config.decode_threads, "vqpipe-decode")
        self.current: tuple[str, int, float] | None = None
        self.resolution = config.preprocess.resolution

    def ready(self) -> dict:
        return {"node": socket.gethostname(), "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "device": str(self.encoder.device),
                "precision": self.encoder.precision,
                "batches": self.encoder.describe(self.resolution)}

    def process(self, url: str, stem: str) -> ShardResult:
        self.current = (stem, 0, time.time())
        try:
            result = process_shard(url, stem, self.job, self.encoder, self.pool, on_progress=self._progress)
        finally:
            self.current = None
        # The per-sample failure list is in the shard's marker; the driver keeps only the counts, so
        # its memory stays small however many shards a run has.
        return dataclasses.replace(result, failures=[])

    def heartbeat(self) -> tuple[str, int, float] | None:
        """``(stem, rows so far, time of last progress)`` of the shard in hand."""
        return self.current

    def _progress(self, rows: int) -> None:
        self.current = (self.current[0], rows, time.time()) if self.current else None


@dataclass
class Attempt:
    url: str
    stem: str
    worker: int
    started: float
    progress_at: float  # driver clock: when the worker last reported progress on it
    beat: float | None = None  # the worker's own time stamp of that progress


@dataclass(frozen=True)
class WorkerSpec:
    """What actors the driver starts: :class:`ShardWorker`, or a stand-in with its methods
    (``ready``, ``process``, ``heartbeat``) for measuring the driver alone."""

    cls: type
    count: int
    num_gpus: float
    num_cpus: float


def worker_spec(config: RunConfig) -> WorkerSpec:
    n, gpw, cpw = worker_shape(config)
    return WorkerSpec(ShardWorker, n, gpw, cpw)


def init_ray(config: RunConfig) -> None:
    if ray.is_initialized():
        return
    # `ray job submit` runs the driver with RAY_ADDRESS set: join that cluster, not a private one.
    address = config.ray.address or os.environ.get("RAY_ADDRESS") or None  # RAY_ADDRESS="" is unset
    if address is None:
        start_embedded_ray()
    else:
        ray.init(address=address, log_to_driver=False)


def start_embedded_ray(**resources) -> None:
    """A private single-node Ray with the dashboard off.

    ``address="local"`` always starts a new cluster: a plain ``init()`` may attach to another
    cluster on this machine or trip over a stale ``/tmp/ray/ray_current_cluster``. (Ray resolves
    a loopback node address to the machine's reachable IP, so it cannot be pinned to 127.0.0.1.)

    Because it listens on that address, it keeps the token authentication Ray turns on by default
    for a new cluster (a token in ``~/.ray/auth_token``, created on first use; ``RAY_AUTH_MODE``,
    when the user set it, decides instead). Only Ray's notice about that default is dropped: it
    would tell every user of the demo how to turn the protection off.
    """
    _quiet_auth_notice()
    ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": _package_path()}}, **resources)


def _package_path() -> str:
    """The workers' PYTHONPATH, led by the folder this vqpipe is imported from.

    Ray puts the driver's current folder first on its workers' ``sys.path``: run from a folder
    holding a ``vqpipe/`` directory (a clone), a worker would import that as a namespace package
    and fail. A regular package anywhere on the path wins over a namespace one, so naming this
    package's own folder makes every worker import the driver's vqpipe, from any folder."""
    parent = str(Path(vqpipe.__file__).resolve().parent.parent)
    return os.pathsep.join(p for p in (parent, os.environ.get("PYTHONPATH")) if p)


def _worker_env() -> dict | None:
    """Fault-injection settings (crash tests) travel to the actors explicitly: actor processes
    inherit the cluster's environment, not the driver's."""
    return {"env_vars": {faults.ENV: os.environ[faults.ENV]}} if faults.ENV in os.environ else None


def init_error(err: RayActorError) -> str:
    """The constructor's own error, one line, out of Ray's account of an actor that failed to start."""
    lines = [line.strip() for line in str(err).splitlines()]
    errors = [line for line in lines if re.match(r"^(?:[a-z_]\w*\.)*[A-Z]\w*: \S", line)]
    return (errors[-1] if errors else _first_line(err))[:500]


class _DropTokenAuthNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def _quiet_auth_notice() -> None:
    # Setting RAY_AUTH_MODE=token ourselves would be the plain way, but Ray then skips refreshing
    # its cached config in this process, which goes on without a token and is refused by its own GCS.
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _DropTokenAuthNotice) for f in logger.filters):
        logger.addFilter(_DropTokenAuthNotice())


def worker_shape(config: RunConfig) -> tuple[int, float, int]:
    """``(num_workers, gpus_per_worker, cpus_per_worker)`` clamped to what the cluster has, so no
    actor waits forever for a GPU that does not exist."""
    resources = ray.cluster_resources()
    gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 1.0)
    gpw = config.ray.gpus_per_worker
    gpw = (1.0 if gpus >= 1 else 0.0) if gpw == "auto" else float(gpw)
    if gpw > gpus:
        raise RuntimeError(f"ray.gpus_per_worker={gpw} but the cluster has {gpus:g} GPUs")
    cpw = min(config.ray.cpus_per_worker, max(1, int(cpus)))
    n = config.ray.num_workers
    if n == "auto":
        n = int(gpus // gpw) if gpw else 1
    limit = int(gpus // gpw) if gpw else max(1, int(cpus // cpw))
    if n > limit:
        log.warning("ray.num_workers=%d but the cluster fits %d workers (%g GPUs, %g CPUs): using %d",
                    n, limit, gpus, cpus, limit)
        n = limit
    return max(1, n), gpw, cpw


class Driver:
    """Hands shards to workers from a queue and owns retries, hung workers, stragglers and the guard.

    The loop never sleeps or blocks on one worker: pings and heartbeats are answered through
    ``ray.wait``, and failure records are written by a background thread."""

    def __init__(self, config: RunConfig, plan: Plan, progress: Progress, stop: StopRequest | None = None):
        self.config, self.plan, self.progress = config, plan, progress
        self.stop = stop or StopRequest()
        self.queue = collections.deque(plan.pending)
        self.outcome = Outcome()
        self.in_flight: dict[ray.ObjectRef, Attempt] = {}
        self.restarting: dict[ray.ObjectRef, int] = {}  # ping ref -> worker index
        self.ping_later: list[tuple[float, int]] = []  # (when, worker index): workers still restarting
        self.beats: dict[ray.ObjectRef, ray.ObjectRef] = {}  # heartbeat ref -> the attempt's ref
        self.start_failures: collections.Counter = collections.Counter()  # worker index -> in a row
        self.idle: list[int] = []
        self.guard_seen: list[ShardResult] = []
        self.records = Records(config)
        self.beat_every = min(30.0, max(0.5, config.ray.shard_timeout_s / 4))
        self._last_beat = 0.0

    def run(self, spec: WorkerSpec | None = None) -> Outcome:
        spec = spec or worker_spec(self.config)
        self.spec = spec
        self.workers = [self._new_worker() for _ in range(min(spec.count, max(1, len(self.queue))))]
        for i in range(len(self.workers)):
            self._ping(i)
        log.info("%d workers (%g GPU, %g CPU each), %d shards to do", len(self.workers), spec.num_gpus,
                 spec.num_cpus, len(self.queue))
        try:
            self._loop()
        finally:
            for worker in self.workers:
                ray.kill(worker)
            self.records.close()
        if self.stop.requested:
            self.outcome.interrupted = self.stop.signum
        return self.outcome

    def _loop(self) -> None:
        while (self.queue or self.in_flight) and not self.outcome.stopped and not self.stop.requested:
            self._assign()
            self._collect(timeout=1.0)
            self._ping_due()
            self._watch_progress()
            if self.records.storage_full and not self.outcome.fatal:
                self.outcome.fatal = f"output storage full ({self.records.storage_full}): free space and run again"

    def _new_worker(self):
        spec = self.spec
        return ray.remote(spec.cls).options(
            num_gpus=spec.num_gpus, num_cpus=spec.num_cpus, max_restarts=-1, max_task_retries=0,
            max_concurrency=2, runtime_env=_worker_env()).remote(self.config)

    def _ping(self, index: int) -> None:
        self.restarting[self.workers[index].ready.remote()] = index

    def _assign(self) -> None:
        while self.idle and self.queue:
            url = self.queue.popleft()
            if self.plan.stems[url] in self.outcome.committed:
                continue
            self._submit(self.idle.pop(), url)
        if self.idle and not self.queue and self.config.ray.speculative:
            self._speculate()

    def _submit(self, worker: int, url: str) -> None:
        stem = self.plan.stems[url]
        ref = self.workers[worker].process.remote(url, stem)
        now = time.time()
        self.in_flight[ref] = Attempt(url, stem, worker, now, now)

    def _speculate(self) -> None:
        """Near the end, re-run the oldest shard no one else is already duplicating."""
        running = collections.Counter(a.stem for a in self.in_flight.values())
        for attempt in sorted(self.in_flight.values(), key=lambda a: a.started):
            if not self.idle:
                return
            if running[attempt.stem] == 1 and time.time() - attempt.started > SPECULATE_AFTER_S:
                log.info("speculatively re-running %s on an idle worker", attempt.stem)
                self._submit(self.idle.pop(), attempt.url)
                running[attempt.stem] += 1

    def _collect(self, timeout: float) -> None:
        refs = list(self.in_flight) + list(self.restarting) + list(self.beats)
        if not refs:
            time.sleep(min(timeout, 0.05))  # nothing to wait on: only re-pings are due
            return
        done, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        if done:  # take everything else that is ready too, without waiting
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in done:
            if ref in self.restarting:
                self._worker_back(ref)
            elif ref in self.beats:
                self._heartbeat(ref)
            elif ref in self.in_flight:
                self._finish(ref, self.in_flight.pop(ref))
        self.progress.update(self.outcome)

    def _worker_back(self, ref: ray.ObjectRef) -> None:
        index = self.restarting.pop(ref)
        try:
            info = ray.get(ref)
        except RayActorError as err:
            self._not_started(index, err)
            return
        log.info("worker %d ready on %s (device %s, GPU ids %s, %s, %s)", index, info["node"], info["device"],
                 info["gpu_ids"], info["precision"], info["batches"])
        self.start_failures.pop(index, None)
        self.idle.append(index)

    def _not_started(self, index: int, err: RayActorError) -> None:
        if not err.actor_init_failed:
            # Still restarting (Ray answers ActorUnavailableError meanwhile): ask again shortly.
            self.ping_later.append((time.time() + 1.0, index))
            return
        # The constructor raised: Ray does not restart such an actor, so start a new one, a few times.
        self.start_failures[index] += 1
        error = init_error(err)
        if self.start_failures[index] >= MAX_START_FAILURES:
            self.outcome.fatal = f"workers cannot start ({self.start_failures[index]} tries in a row): {error}"
            return
        log.warning("worker %d failed to start (%s): starting it again", index, error)
        self.workers[index] = self._new_worker()
        self._ping(index)

    def _ping_due(self) -> None:
        now = time.time()
        due = [i for when, i in self.ping_later if when <= now]
        self.ping_later = [(when, i) for when, i in self.ping_later if when > now]
        for index in due:
            self._ping(index)

    def _finish(self, ref: ray.ObjectRef, attempt: Attempt) -> None:
        try:
            result: ShardResult = ray.get(ref)
        except RayActorError as err:
            self._failed_attempt(attempt, f"worker died: {_first_line(err)}")
            self._ping(attempt.worker)
            return
        except RayTaskError as err:
            self.idle.append(attempt.worker)
            cause = err.cause if err.cause else err
            if is_storage_full(cause):  # every shard would fail the same way: stop, do not retry
                self.outcome.fatal = f"output storage full ({_first_line(cause)}): free space and run again"
                return
            self._failed_attempt(attempt, _first_line(cause))
            return
        except RayError as err:  # e.g. a result that could not be deserialized or was lost
            self.idle.append(attempt.worker)
            self._failed_attempt(attempt, _first_line(err))
            return
        self.idle.append(attempt.worker)
        # An attempt that lost the commit race (result.committed False) found the shard committed by
        # another attempt, whose result may never arrive (it may have died after committing): either
        # way the shard is done, and the loser's output was discarded by the sink.
        if attempt.stem not in self.outcome.committed:
            self.outcome.committed[attempt.stem] = result
            self.outcome.failed.pop(attempt.stem, None)
            if attempt.stem in self.plan.failed_before:  # a failure record of an earlier run
                self.records.remove(failure_record(attempt.stem))
            self._guard(result)
            self._abandon_duplicates(attempt.stem)

    def _abandon_duplicates(self, stem: str) -> None:
        """Restart workers still running a shard that just committed elsewhere: a hung straggler
        would otherwise keep the run from ending. Their output is uncommitted, so it is never seen."""
        for ref, other in list(self.in_flight.items()):
            if other.stem == stem:
                del self.in_flight[ref]
                self._restart(other.worker)

    def _restart(self, worker: int) -> None:
        ray.kill(self.workers[worker], no_restart=False)
        self._ping(worker)

    def _failed_attempt(self, attempt: Attempt, error: str) -> None:
        stem = attempt.stem
        if stem in self.outcome.committed or any(a.stem == stem for a in self.in_flight.values()):
            return  # another attempt of this shard committed or is still running
        self.outcome.attempts[stem] += 1
        log.warning("shard %s attempt %d failed: %s", stem, self.outcome.attempts[stem], error)
        if self.outcome.attempts[stem] < self.config.ray.max_retries:
            self.queue.append(attempt.url)
            return
        self.outcome.failed[stem] = error
        self.records.write(failure_record(stem), shard_failure(attempt.url, stem, self.outcome.attempts[stem], error))

    def _watch_progress(self) -> None:
        """Ask busy workers how far they are, now and then; act on attempts that stopped moving."""
        now = time.time()
        if now - self._last_beat >= self.beat_every:
            self._last_beat = now
            asked = set(self.beats.values())
            for ref, attempt in self.in_flight.items():
                if ref not in asked:
                    self.beats[self.workers[attempt.worker].heartbeat.remote()] = ref
        timeout = self.config.ray.shard_timeout_s
        for ref, attempt in list(self.in_flight.items()):
            if now - attempt.progress_at > timeout and ref in self.in_flight:
                self._stalled(ref, attempt, now - attempt.progress_at)

    def _heartbeat(self, ref: ray.ObjectRef) -> None:
        attempt = self.in_flight.get(self.beats.pop(ref))
        try:
            beat = ray.get(ref)
        except RayError:
            return  # the worker died: its shard's own answer says so
        # The worker's clock only tells whether it moved: progress is timed on the driver's clock.
        if attempt is not None and beat and beat[0] == attempt.stem and beat[2] != attempt.beat:
            attempt.beat, attempt.progress_at = beat[2], time.time()

    def _stalled(self, ref: ray.ObjectRef, attempt: Attempt, quiet_s: float) -> None:
        """A worker hung mid-shard (a stuck read, a stopped process): restart it and requeue its
        shard. Its partial output is uncommitted, so nothing of it is ever seen."""
        log.warning("shard %s shows no progress for %.0f s on worker %d: restarting the worker and "
                    "requeueing the shard", attempt.stem, quiet_s, attempt.worker)
        del self.in_flight[ref]
        self._restart(attempt.worker)
        self._failed_attempt(attempt, f"no progress for {quiet_s:.0f} s (ray.shard_timeout_s)")

    def _guard(self, result: ShardResult) -> None:
        """Look at the first ``ray.guard_shards`` shards once they are in: a failure reason that
        dominates them, or audits under ``model.min_code_agreement``, stop the run."""
        cfg = self.config.ray
        if len(self.guard_seen) >= cfg.guard_shards:
            return
        self.guard_seen.append(result)
        if len(self.guard_seen) < min(cfg.guard_shards, self.plan.total):
            return
        self.outcome.aborted = (failure_verdict(self.guard_seen, cfg.guard_fail_fraction, self.config)
                                or guard_verdict([r.audit for r in self.guard_seen],
                                                 self.config.model.min_code_agreement))


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return deterministic(f"{type(err).__name__}: {text[-1] if text else ''}")[:500]


class GpuReconstruct:
    """``vqpipe decode``'s decoder pass as a Ray task holding one GPU of the cluster: the driver of
    a cluster job usually runs on a CPU-only head node. The task loads the model on its worker."""

    def __init__(self, config: RunConfig):
        self.model = config.model
        self.task = ray.remote(num_gpus=1)(_reconstruct_on_worker)
        self.ran_on: dict | None = None  # node and GPU ids of the last call

    def __call__(self, codes, latents, meta: dict):
        images, self.ran_on = ray.get(self.task.remote(self.model, codes, latents, meta))
        log.info("decoded %d images on %s (GPU ids %s)", len(images), self.ran_on["node"], self.ran_on["gpu_ids"])
        return images


def gpu_reconstruct(config: RunConfig) -> GpuReconstruct | None:
    """A decoder pass on a GPU worker when the config names a cluster (``ray.address`` or
    ``RAY_ADDRESS``) that has GPUs; None (decode here) otherwise: a local decode starts no Ray."""
    if (config.ray.address or os.environ.get("RAY_ADDRESS")) is None:
        return None
    init_ray(config)
    if ray.cluster_resources().get("GPU", 0.0) < 1:
        return None
    return GpuReconstruct(config)


def _reconstruct_on_worker(model_config, codes, latents, meta: dict):
    from vqpipe.read.decode_job import reconstruct_images

    model = load_model(model_config).to(pick_device())
    where = {"node": socket.gethostname(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
             "device": str(pick_device())}
    return reconstruct_images(model, codes, latents, meta), where


def run_on_ray(config: RunConfig, plan: Plan, progress: Progress, stop: StopRequest | None = None,
               spec: WorkerSpec | None = None) -> Outcome:
    stop = stop or StopRequest()
    init_ray(config)
    stop.install()  # again: ray.init replaced the SIGTERM handler
    if not plan.pending:
        return Outcome(interrupted=stop.signum)
    return Driver(config, plan, progress, stop).run(spec)

