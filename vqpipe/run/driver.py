"""The only module that knows Ray: GPU-pinned actors pull shard URLs from the driver's queue.

Each :class:`ShardWorker` loads the model once and calls :func:`vqpipe.run.shard_job.process_shard`
for shard after shard. The driver owns retries (actors run with ``max_task_retries=0``): an actor
death requeues its shard, a shard that fails ``ray.max_retries`` times is recorded under
``_vqpipe/failed/``, stragglers are re-run elsewhere, and commit markers decide which attempt's
output stands, so no sample is written twice.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError

from vqpipe import faults
from vqpipe.config import RunConfig
from vqpipe.encode.encoder import TokenEncoder
from vqpipe.encode.fidelity import guard_verdict
from vqpipe.model.loading import load_model, pick_device
from vqpipe.output.folder import remove_json, write_json
from vqpipe.output.layout import failure_record
from vqpipe.records import sum_reasons
from vqpipe.run.outcome import Outcome
from vqpipe.run.plan import Plan
from vqpipe.run.progress import Progress
from vqpipe.run.shard_job import ShardResult, make_settings, process_shard

log = logging.getLogger(__name__)

# Only shards running longer than this are duplicated onto idle workers at the end of the queue.
SPECULATE_AFTER_S = 5.0


class ShardWorker:
    """A Ray actor holding one model on one device (state once, shards many)."""

    def __init__(self, config: RunConfig):
        model = load_model(config.model)
        device = pick_device()
        self.encoder = TokenEncoder.from_config(model, device, config)
        self.job = make_settings(config.input, config.preprocess, config.output, model, self.encoder.precision,
                                 config.model.audit_samples)
        workers = config.preprocess.decode_workers
        self.pool = ThreadPoolExecutor(config.ray.cpus_per_worker if workers == "auto" else workers,
                                       thread_name_prefix="vqpipe-decode")
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


def init_ray(config: RunConfig) -> None:
    if ray.is_initialized():
        return
    # `ray job submit` runs the driver with RAY_ADDRESS set: join that cluster, not a private one.
    address = config.ray.address or os.environ.get("RAY_ADDRESS")
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
    ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False, **resources)


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
    """Hands shards to workers from a queue and owns retries, stragglers and the guard."""

    def __init__(self, config: RunConfig, plan: Plan, progress: Progress):
        self.config, self.plan, self.progress = config, plan, progress
        self.queue = collections.deque(plan.pending)
        self.outcome = Outcome()
        self.in_flight: dict[ray.ObjectRef, Attempt] = {}
        self.restarting: dict[ray.ObjectRef, int] = {}  # ping ref -> worker index
        self.idle: list[int] = []
        self.guard_seen: list[ShardResult] = []

    def run(self) -> Outcome:
        n, gpw, cpw = worker_shape(self.config)
        # Fault-injection settings (crash tests) travel to the actors like any env var would not:
        # actor processes inherit the cluster's environment, not the driver's.
        env = {faults.ENV: os.environ[faults.ENV]} if faults.ENV in os.environ else {}
        cls = ray.remote(ShardWorker).options(num_gpus=gpw, num_cpus=cpw, max_restarts=-1, max_task_retries=0,
                                              max_concurrency=2, runtime_env={"env_vars": env} if env else None)
        self.workers = [cls.remote(self.config) for _ in range(min(n, max(1, len(self.queue))))]
        for i, worker in enumerate(self.workers):
            self.restarting[worker.ready.remote()] = i
        log.info("%d workers (%g GPU, %d CPU each), %d shards to do", len(self.workers), gpw, cpw, len(self.queue))
        while (self.queue or self.in_flight) and not self.outcome.aborted:
            self._assign()
            self._collect(timeout=1.0)
            self._check_stragglers()
        for worker in self.workers:
            ray.kill(worker)
        return self.outcome

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
        self.in_flight[ref] = Attempt(url, stem, worker, time.time())

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
        refs = list(self.in_flight) + list(self.restarting)
        if not refs:
            time.sleep(min(timeout, 0.05))
            return
        done, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        for ref in done:
            if ref in self.restarting:
                self._worker_back(ref)
            else:
                self._finish(ref, self.in_flight.pop(ref))
        self.progress.update(self.outcome)

    def _worker_back(self, ref: ray.ObjectRef) -> None:
        index = self.restarting.pop(ref)
        try:
            info = ray.get(ref)
            log.info("worker %d ready on %s (device %s, GPU ids %s, %s, %s)", index, info["node"], info["device"],
                     info["gpu_ids"], info["precision"], info["batches"])
            self.idle.append(index)
        except RayActorError:
            # Still restarting (Ray answers ActorUnavailableError meanwhile): ask again shortly.
            time.sleep(1.0)
            self.restarting[self.workers[index].ready.remote()] = index

    def _finish(self, ref: ray.ObjectRef, attempt: Attempt) -> None:
        try:
            result: ShardResult = ray.get(ref)
        except RayActorError as err:
            self._failed_attempt(attempt, f"worker died: {_first_line(err)}")
            self.restarting[self.workers[attempt.worker].ready.remote()] = attempt.worker
            return
        except RayTaskError as err:
            self.idle.append(attempt.worker)
            self._failed_attempt(attempt, _first_line(err.cause if err.cause else err))
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
            remove_json(self.config, failure_record(attempt.stem))  # failed in an earlier run
            self._guard(result)
            self._abandon_duplicates(attempt.stem)

    def _abandon_duplicates(self, stem: str) -> None:
        """Restart workers still running a shard that just committed elsewhere: a hung straggler
        would otherwise keep the run from ending. Their output is uncommitted, so it is never seen."""
        for ref, other in list(self.in_flight.items()):
            if other.stem == stem:
                del self.in_flight[ref]
                ray.kill(self.workers[other.worker], no_restart=False)
                self.restarting[self.workers[other.worker].ready.remote()] = other.worker

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
        write_json(self.config, failure_record(stem), {
            "source": attempt.url, "stem": stem, "attempts": self.outcome.attempts[stem], "error": error,
            "failed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })

    def _check_stragglers(self) -> None:
        if not self.idle:
            return
        now = time.time()
        timeout = self.config.ray.shard_timeout_s
        running = collections.Counter(a.stem for a in self.in_flight.values())
        for ref, attempt in list(self.in_flight.items()):
            if running[attempt.stem] > 1 or not self.idle or now - attempt.started < timeout:
                continue
            try:
                beat = ray.get(self.workers[attempt.worker].heartbeat.remote(), timeout=5)
            except (GetTimeoutError, RayActorError):
                beat = None
            last = beat[2] if beat and beat[0] == attempt.stem else attempt.started
            if now - last > timeout:
                log.warning("shard %s shows no progress for %.0f s: handing it to another worker", attempt.stem,
                            now - last)
                self._submit(self.idle.pop(), attempt.url)
                running[attempt.stem] += 1

    def _guard(self, result: ShardResult) -> None:
        """Look at the first ``ray.guard_shards`` shards once they are in: a failure reason that
        dominates them, or audits under ``model.min_code_agreement``, stop the run."""
        cfg = self.config.ray
        if len(self.guard_seen) >= cfg.guard_shards:
            return
        self.guard_seen.append(result)
        if len(self.guard_seen) < min(cfg.guard_shards, self.plan.total):
            return
        self.outcome.aborted = (self._failure_verdict()
                                or guard_verdict([r.audit for r in self.guard_seen],
                                                 self.config.model.min_code_agreement))

    def _failure_verdict(self) -> str | None:
        cfg = self.config.ray
        reasons = sum_reasons(r.failures_by_reason for r in self.guard_seen)
        total = sum(r.rows for r in self.guard_seen) + sum(reasons.values())
        if cfg.guard_fail_fraction <= 0 or not reasons or not total:
            return None
        reason, count = next(iter(reasons.items()))  # most frequent first
        if count / total >= cfg.guard_fail_fraction:
            return guard_message(reason, count, total, len(self.guard_seen), self.config)
        return None


def guard_message(reason: str, count: int, total: int, shards: int, config: RunConfig) -> str:
    hints = {
        "no_image": f"input.image_keys is {list(config.input.image_keys)}: check the member extensions in "
                    "your shards (e.g. `tar tf shard.tar | head`)",
        "too_small": f"preprocess.min_size={config.preprocess.min_size} may be too high for this corpus",
        "decode_error": "the image members may not be images, or the shards may be damaged",
        "non_finite": "the model produces NaN/Inf on these inputs: check preprocess.value_range and precision",
    }
    return (f"stopping early: {count} of {total} samples in the first {shards} shards failed with "
            f"'{reason}'. Likely fix: {hints.get(reason, 'check the config against the corpus')}. "
            f"Raise ray.guard_fail_fraction or set it to 0 to run anyway.")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[-1] if text else ''}"[:500]


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


def run_on_ray(config: RunConfig, plan: Plan, progress: Progress) -> Outcome:
    init_ray(config)
    if not plan.pending:
        return Outcome()
    return Driver(config, plan, progress).run()

