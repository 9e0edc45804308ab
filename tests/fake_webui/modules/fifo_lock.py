"""``modules/fifo_lock.py`` as in the WebUI: a first-in-first-out, NON-reentrant lock.

``acquire`` takes no timeout, exactly like the real one: a thread that takes it twice hangs.
"""
from __future__ import annotations

import collections
import threading


class FIFOLock:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inner_lock = threading.Lock()
        self._pending_threads: collections.deque = collections.deque()

    def acquire(self, blocking: bool = True) -> bool:
        with self._inner_lock:
            lock_acquired = self._lock.acquire(False)
            if lock_acquired:
                return True
            elif not blocking:
                return False
            release_event = threading.Event()
            self._pending_threads.append(release_event)
        release_event.wait()
        return self._lock.acquire()

    def release(self) -> None:
        with self._inner_lock:
            if self._pending_threads:
                release_event = self._pending_threads.popleft()
                release_event.set()
            self._lock.release()

    __enter__ = acquire

    def __exit__(self, t, v, tb) -> None:
        self.release()
