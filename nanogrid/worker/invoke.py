"""One admitted task's invocation: take a sandbox, put the code in unless it holds it, run,
and turn the outcome into its result (auto-tuner tip, Lambda's REPORT line, timings)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager

from loguru import logger

from nanogrid.common.config import LimitsConfig
from nanogrid.common.errors import CorruptCodePackage
from nanogrid.runners.base import Invocation, RunOutcome, Sandbox

from . import autotuner, diagnose, result, task
from .claim import Claim
from .codestore import CodePackage
from .phases import PhaseClock
from .result import MiB, Result
from .services import Services
from .tracecontext import TraceContext
from .unpack import extract

Stage = Callable[[str], AbstractContextManager[None]]
"""The run's stage context (pipeline.py): hooks see each stage's start and end."""


def invoke(
    services: Services, t: task.Task, package: CodePackage, claim: Claim, clock: PhaseClock,
    stage: Stage, trace: TraceContext | None = None,
) -> Result:
    """Run ``t`` from ``package`` in a sandbox of the services' runner; its result, whatever
    its exit. ``claim``: the run's, with its number and the function's recent peaks;
    ``trace``: the context the function's own spans would be children of."""
    config, runner = services.config, services.runner
    runtime = config.runtimes[t.runtime]
    with stage("sandbox"):
        sandbox = runner.acquire(t.runtime, package.version_key)
    try:
        if sandbox.code_key != package.version_key:
            with stage("unpack"):
                put_code(services, sandbox, package)
        invocation = Invocation(
            request_id=t.request_id,
            function_id=t.function_id,
            argv=runtime.command,
            stdin=t.input_json,
            memory_mb=t.memory_mb,
            timeout_ms=t.timeout_ms,
            max_output_bytes=config.limits.max_output_bytes,
            max_pids=config.limits.max_pids,
            traceparent=trace.traceparent if trace is not None else None,
            tracestate=trace.tracestate if trace is not None else None,
        )
        logger.info(
            f"{runner.marker} running {t.function_id} in {sandbox.name} "
            f"(cold={sandbox.cold_start}, memory={t.memory_mb}MB, timeout={t.timeout_ms}ms)"
        )
        with stage("run"):
            outcome = runner.run(sandbox, invocation)
        outcome = diagnose.hide_paths(
            outcome, runner.code_path(sandbox), config.limits.max_output_bytes
        )
        silent = outcome.exit_code == 0 and not outcome.timed_out and not outcome.stdout.strip()
        hint = diagnose.handler_hint(sandbox.code_dir, runtime.command) if silent else None
    finally:
        runner.release(sandbox)
    return ran(services, t, outcome, sandbox.cold_start, claim, clock, hint)


def put_code(services: Services, sandbox: Sandbox, package: CodePackage) -> None:
    """Unpack ``package`` into ``sandbox``'s code directory. A zip from the host's cache that
    cannot be read is downloaded again, once (codestore.py does not fsync its zips)."""
    try:
        _unpack(sandbox, package, services.config.limits)
    except CorruptCodePackage:
        if package.downloaded:
            raise
        _unpack(sandbox, services.codes.download_again(package), services.config.limits)


def _unpack(sandbox: Sandbox, package: CodePackage, limits: LimitsConfig) -> None:
    shutil.rmtree(sandbox.code_dir, ignore_errors=True)
    sandbox.code_key = None
    extract(package.zip_path, sandbox.code_dir, limits)
    sandbox.code_key = package.version_key


def ran(
    services: Services,
    t: task.Task,
    outcome: RunOutcome,
    cold: bool,
    claim: Claim,
    clock: PhaseClock,
    hint: str | None = None,
) -> Result:
    """The result of a run: the tip (from its peak and the recent ones), the REPORT line.
    The peak goes into the function's history with the result's publish."""
    config = services.config
    peaks = services.history.with_run(outcome.peak_memory_bytes, claim.recent_peaks)
    killed = outcome.exit_code is None or (outcome.exit_code < 0 and not outcome.oom_killed)
    tip = autotuner.recommend(
        outcome.peak_memory_bytes,
        t.memory_mb,
        config.autotuner,
        oom=outcome.oom_killed,
        history_peaks=peaks,
        unfinished=outcome.timed_out or killed,
    )
    logger.debug(
        "[AUTO-TUNER] Measured peak memory {} bytes ({}), recent peaks {}: {} {}",
        outcome.peak_memory_bytes, outcome.peak_source, peaks[1:], tip.code, tip.params,
    )
    res = result.ran(
        t.ids,
        outcome,
        memory_mb=t.memory_mb,
        recommended_mb=tip.recommended_mb,
        tip=tip.tip,
        tip_code=tip.code,
        tip_params=dict(tip.params),
        cold_start=cold,
        attempt=claim.run,
        worker_id=services.worker_id,
        timings=clock.timings(run_ms=outcome.duration_ms),
        hint=hint,
    )
    # Lambda's REPORT line (Init Duration, on cold starts only, is the sandbox's creation),
    # with the auto-tuner's tip: with the run's start, the invocation's two lines. Its
    # numbers are fields of its own in JSON logs (nanogrid/common/logs.py).
    init = f" Init Duration: {clock.ms('sandbox'):.2f} ms" if cold else ""
    logger.bind(
        durationMs=res.duration_millis, maxMemoryBytes=res.peak_memory_bytes, coldStart=cold,
        status=res.status, errorType=res.error_type,
    ).info(
        f"REPORT RequestId: {t.request_id} Duration: {outcome.duration_ms:.2f} ms "
        f"Memory Size: {t.memory_mb} MB Max Memory Used: "
        f"{outcome.peak_memory_bytes // MiB} MB{init} ({outcome.peak_source}) "
        f"[AUTO-TUNER] {tip.tip}"
    )
    return res
