"""Submitting a prompt to the executor from a request and awaiting its outcome without blocking the event loop."""
from __future__ import annotations

import asyncio
import shutil
from typing import Any

from starlette.concurrency import run_in_threadpool

from engine.errors import InvalidPrompt
from engine.executor import Executor
from engine.jobs import Job, Outcome
from engine.uploads import stage_request_files
from engine.validation import Validated, problem
from handler.body import PromptRequest


async def validate(executor: Executor, request: PromptRequest, strict: bool) -> tuple[Validated, Any]:
    """Stage the request's files and validate the prompt against them (file I/O off the event loop).

    `strict` refuses a prompt with any failing output; otherwise, as ComfyUI's `/prompt` does, the outputs that
    passed run and the errors of the others are reported beside them."""
    scratch, uploads = None, {}
    if request.files:
        scratch, uploads = await run_in_threadpool(stage_request_files, executor.folders, request.files)
    try:
        validated = await run_in_threadpool(executor.validate, request.prompt, uploads)
        if strict and validated.node_errors:
            raise InvalidPrompt(problem("prompt_outputs_failed_validation", "Prompt outputs failed validation",
                                        "some output nodes failed validation"), validated.node_errors)
    except BaseException:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        raise
    return validated, (scratch, uploads)


def submit(executor: Executor, request: PromptRequest, validated: Validated, staged: Any,
           digest: str | None = None) -> tuple[Job, asyncio.Future[Outcome]]:
    """Queue the prompt; the returned future resolves, on the event loop, with the job's outcome."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Outcome] = loop.create_future()

    def resolve(outcome: Outcome) -> None:
        if not future.done():
            future.set_result(outcome)

    def on_done(outcome: Outcome) -> None:  # runs on the executor thread
        if not loop.is_closed():
            loop.call_soon_threadsafe(resolve, outcome)

    scratch, uploads = staged
    job = executor.submit(validated, request.prompt, extra_data=request.extra_data, client_id=request.client_id,
                          front=request.front, number=request.number, prompt_id=request.prompt_id,
                          uploads=uploads, scratch=scratch, digest=digest, on_done=on_done)
    return job, future
