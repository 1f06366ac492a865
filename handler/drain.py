"""Serving with a graceful drain: on SIGTERM (or SIGINT) stop taking work, finish what is in flight, exit 0.

uvicorn's own handling closes the listening socket at once and waits for open connections. A replica behind a
load balancer should instead keep answering while its prompts finish, so that a request that still reaches it
gets a 503 the balancer retries elsewhere rather than a refused connection, and `/readyz` says "draining". So:

1. the signal sets `executor.accepting = False` (new prompts get 503 `Draining`, `/readyz` 503) and nothing else;
2. while prompts are queued or running, the server keeps listening;
3. once none is left, uvicorn's shutdown runs: the socket closes, open responses are sent, the lifespan ends;
4. if prompts are still in flight `grace_s - margin` seconds after the signal (or a second signal comes), the
   queued ones are cancelled and the running one interrupted, and step 3 runs with what is left of the grace;
5. a watchdog ends the process at `grace_s` should a node ignore the interrupt.

The process then exits 0 at once. uvicorn would re-raise the signal it caught, ending the process with the
signal's status, but a drained replica has nothing to report; and the interpreter's own teardown (unloading torch
takes about half a second) is skipped, since everything is flushed by then: the executor has stopped, files are
written atomically, the logs are flushed last.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from types import FrameType
from typing import Any, NoReturn

import uvicorn

log = logging.getLogger(__name__)
FORCED_EXIT = 1  # the watchdog's status: a node kept running after the interrupt


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: Any, grace_s: float):
        super().__init__(config)
        self.app = app  # the Starlette app: its `state.executor` exists once the lifespan has started
        self.grace_s = float(grace_s)
        # the end of the grace kept to answer the cut prompts and shut down: 1 to 5 s, at most half of it
        self.margin_s = min(5.0, max(1.0, 0.25 * self.grace_s), 0.5 * self.grace_s)
        self.signalled_at: float | None = None
        self.hurry = False  # a second signal: stop waiting for in-flight prompts
        self._watchdog: threading.Thread | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Signal handler (main thread): flags only; the event loop's tick does the rest."""
        executor = getattr(self.app.state, "executor", None)
        if executor is not None:
            executor.accepting = False
        if self.signalled_at is None:
            self.signalled_at = time.monotonic()
        else:
            self.hurry = True
        if not self.started:
            self.should_exit = True  # still starting: nothing is in flight yet

    async def on_tick(self, counter: int) -> bool:
        if self.signalled_at is not None and not self.should_exit:
            self._drain_step()
        return await super().on_tick(counter)

    def _drain_step(self) -> None:
        if self._watchdog is None:
            log.info("draining: no new prompts; finishing %d in flight", self._in_flight())
            self._start_watchdog()
        elapsed = time.monotonic() - self.signalled_at
        if self._in_flight() and not self.hurry and elapsed < self.grace_s - self.margin_s:
            return
        if self._in_flight():
            log.warning("drain grace ending: cancelling %d queued prompts and interrupting the running one",
                        self._in_flight())
            executor = self.app.state.executor
            executor.clear()
            executor.interrupt()
        # uvicorn waits this long for open responses (those of the prompts that just ended) before cutting them
        self.config.timeout_graceful_shutdown = max(0.5, self.grace_s - elapsed - 0.5)
        self.should_exit = True

    def _in_flight(self) -> int:
        executor = getattr(self.app.state, "executor", None)
        return executor.remaining() if executor is not None else 0

    def _start_watchdog(self) -> None:
        deadline = self.signalled_at + self.grace_s

        def watch() -> None:
            time.sleep(max(0.0, deadline - time.monotonic()))
            log.critical("still running %.0f s after the signal; exiting now", self.grace_s)
            logging.shutdown()
            os._exit(FORCED_EXIT)

        self._watchdog = threading.Thread(target=watch, name="drain-watchdog", daemon=True)
        self._watchdog.start()


def serve(app: Any, host: str, port: int, log_level: str, grace_s: float) -> NoReturn:
    """Run `app` until a signal has drained it, then end the process: 0 after a drain, 3 when it never started
    (uvicorn's status for a failed start)."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=None)
    server = DrainingServer(config, app, grace_s)
    server.run()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if server.started else 3)

