"""Helpers for tests that fork a child and SIGKILL it."""

from __future__ import annotations

import threading


def own_progress_lock() -> None:
    """Give a forked child its own tqdm write lock.

    A forked child shares the parent's tqdm multiprocessing lock (a process-shared semaphore). A
    child killed while it draws a progress bar holds that lock forever, and the parent's next
    progress bar then blocks for good. Call this first thing in the child.
    """
    from tqdm import auto, std

    for cls in {std.tqdm, auto.tqdm}:
        cls.set_lock(threading.RLock())
