"""The one polling loop the tests share: wait for a condition, or fail saying what never happened."""

import subprocess
import time


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.2, proc: subprocess.Popen | None = None,
             tolerate: tuple[type[BaseException], ...] = ()):
    """The predicate's first truthy value. `proc`: fail at once if that process exits; `tolerate`: errors
    that count as "not yet" (a server still starting, say)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the service exited with code {proc.returncode} while waiting for {what}")
        try:
            value = predicate()
        except tolerate:
            value = None
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
