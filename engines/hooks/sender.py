"""The hook's sender: evicted request ids go from the engine's thread to ``{index_url}/evict`` without blocking it.

:meth:`EvictionReporter.report` only appends to a bounded queue (``PREFIXGATE_HOOK_QUEUE``, default 100,000;
overflow is dropped and counted). A daemon thread coalesces ids for a few milliseconds and POSTs
``{"request_ids": [...]}`` over one kept-alive connection with the bearer token from ``PREFIXGATE_ADMIN_TOKEN``.
Connection failures, 408, 429 and 5xx are retried with exponential backoff for as long as the gateway is down
(nothing is dropped for it); any other refusal drops the batch and counts it. The simulated engine
(``engines.sim``) sends with this same class.
"""

from __future__ import annotations

import atexit
import collections
import functools
import logging
import os
import threading
import time
import urllib.parse
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import http.client

# http.client and json are imported where used: an engine process that never evicts does not pay for them
# (http.client ~20 ms).

__all__ = ["EvictionReporter"]

logger = logging.getLogger("prefixgate.hook")


class EvictionReporter:
    """Posts evicted request ids to ``{index_url}/evict`` from a daemon thread; :meth:`report` never blocks."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        max_queue: int = 100_000,
        max_batch: int = 2048,
        coalesce_s: float = 0.005,
        timeout_s: float = 2.0,
        backoff_s: tuple[float, float] = (0.05, 5.0),
        exact_url: bool = False,
    ) -> None:
        """``url`` is the gateway's base URL (ids go to ``{url}/evict``), or with ``exact_url`` the URL to POST to."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.url = url
        self.target = url if exact_url else url.rstrip("/") + "/evict"
        self._https = parts.scheme == "https"
        self._address = (parts.hostname, parts.port)
        self._path = (parts.path or "/") if exact_url else parts.path.rstrip("/") + "/evict"
        if exact_url and parts.query:
            self._path += "?" + parts.query
        self._headers = {"Content-Type": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._max_queue, self._max_batch = max_queue, max_batch
        self._coalesce_s, self._timeout_s, self._backoff_s = coalesce_s, timeout_s, backoff_s
        self.stats = {"accepted": 0, "dropped": 0, "sent": 0, "posts": 0, "failed_posts": 0, "rejected": 0}
        self._reset()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=functools.partial(_reset_after_fork, weakref.ref(self)))

    def _reset(self) -> None:
        # Also runs in a forked child: the parent's thread, locks and socket are not usable there.
        self._queue: collections.deque[str] = collections.deque()
        self._wakeup = threading.Event()
        self._settled = threading.Condition()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: http.client.HTTPConnection | None = None
        self._conn_used = False
        self._busy = False
        self._closing = False
        self._failing = False
        self._warned_at = 0.0
        self._dropped_seen = self.stats["dropped"]

    @property
    def queued(self) -> int:
        """Ids waiting to be sent (not counting a batch being posted or retried)."""
        return len(self._queue)

    def report(self, request_ids: Iterable[str]) -> int:
        """Queue ids for sending; returns how many were accepted (the rest were dropped and counted)."""
        queue, room, accepted = self._queue, self._max_queue - len(self._queue), 0
        for rid in request_ids:
            if accepted < room:
                queue.append(rid)
                accepted += 1
            else:
                self.stats["dropped"] += 1
        if accepted:
            self.stats["accepted"] += accepted
            if self._thread is None:
                self._start()
            if not self._wakeup.is_set():
                self._wakeup.set()
        return accepted

    def _start(self) -> None:
        with self._lock:
            if self._thread is None and not self._closing:
                self._thread = threading.Thread(target=self._run, name="prefixgate-evict-sender", daemon=True)
                self._thread.start()
                atexit.register(self.close, 0.5)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued id was sent or given up; ``False`` on timeout (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        with self._settled:
            while self._queue or self._busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._settled.wait(min(remaining, 0.05))
        return True

    def close(self, timeout: float = 2.0) -> None:
        """Make one last attempt for what is queued (bounded by ``timeout``), then stop the thread."""
        self._closing = True
        self._stop.set()
        self._wakeup.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        if thread is None or not thread.is_alive():
            self._disconnect()

    def _run(self) -> None:
        pending: list[str] = []
        backoff = self._backoff_s[0]
        while True:
            if not pending:
                if not self._queue:
                    if self._closing:
                        break
                    self._wakeup.wait(5.0)
                    self._wakeup.clear()  # a report after this sets it again; one before it left an id
                    continue
                if not self._closing and len(self._queue) < self._max_batch:
                    time.sleep(self._coalesce_s)  # let a burst of evictions join one request
            self._busy = True
            pending = self._take(pending)
            if pending and not self._post(pending):
                if self._closing:
                    break
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self._backoff_s[1])
                continue
            pending, backoff = [], self._backoff_s[0]
            if self.stats["dropped"] != self._dropped_seen:
                self._dropped_seen = self.stats["dropped"]
                self._warn("prefixgate hook: eviction queue full (%d ids): reports dropped", self._max_queue)
            with self._settled:
                self._busy = False
                self._settled.notify_all()
        with self._settled:
            self._busy = False
            self._queue.clear()
            self._settled.notify_all()
        self._disconnect()

    def _take(self, pending: list[str]) -> list[str]:
        batch = dict.fromkeys(pending)
        queue = self._queue
        while queue and len(batch) < self._max_batch:
            batch[queue.popleft()] = None
        return list(batch)

    def _post(self, ids: list[str]) -> bool:
        """One POST; ``True`` when the batch is done with (accepted, or refused for good)."""
        import http.client
        import json

        body = json.dumps({"request_ids": ids}).encode()
        for _attempt in range(2):
            reused = self._conn is not None and self._conn_used
            try:
                conn = self._conn or self._connect()
                conn.request("POST", self._path, body, self._headers)
                response = conn.getresponse()
                response.read()
            except (OSError, http.client.HTTPException) as exc:
                self._disconnect()
                if reused:
                    continue  # the server closed an idle kept-alive connection: retry once on a fresh one
                self.stats["failed_posts"] += 1
                self._failing = True
                self._warn("prefixgate hook: cannot reach %s (%s); retrying with backoff", self.url, exc)
                return False
            self._conn_used = True
            if response.will_close:
                self._disconnect()
            self.stats["posts"] += 1
            if 200 <= response.status < 300:
                self.stats["sent"] += len(ids)
                if self._failing:
                    self._failing = False
                    logger.info("prefixgate hook: %s reachable again [stats %s]", self.url, self.stats)
                return True
            if response.status in (408, 429) or response.status >= 500:
                self.stats["failed_posts"] += 1
                self._failing = True
                self._warn("prefixgate hook: %s answered %d; retrying with backoff", self.target, response.status)
                return False
            self.stats["rejected"] += len(ids)
            self._warn("prefixgate hook: %s refused the report (HTTP %d); dropped", self.target, response.status)
            return True
        return False

    def _connect(self) -> http.client.HTTPConnection:
        import http.client

        host, port = self._address
        factory = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        self._conn = factory(host, port, timeout=self._timeout_s)
        self._conn_used = False
        return self._conn

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _warn(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._warned_at >= 30.0:
            self._warned_at = now
            logger.warning(message + " [stats %s]", *args, self.stats)


def _reset_after_fork(ref: weakref.ref[EvictionReporter]) -> None:
    reporter = ref()
    if reporter is not None:
        reporter._reset()
