"""Ctrl-C that always stops a run, with its one-line message rather than a traceback.

Python raises KeyboardInterrupt wherever the main thread happens to be. Inside a finaliser or a
garbage-collector callback (JAX runs one at every collection) it cannot propagate: Python prints
it as "Exception ignored in ..." with a traceback, drops it, and the run goes on as if Ctrl-C had
not been pressed. The hook here delivers such an interrupt to the main thread again, once the
callback is over, so that it reaches the command's own handler.
"""

from __future__ import annotations

import _thread
import sys
import threading

REDELIVERY_SECONDS = 0.05  # long enough for the swallowing callback to have returned


def catch_interrupts() -> None:
    """Install the hook (once per process; any other unraisable exception still goes to the
    previous hook)."""
    if getattr(sys.unraisablehook, "redelivers_interrupts", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable: sys.UnraisableHookArgs) -> None:
        if not issubclass(unraisable.exc_type, KeyboardInterrupt):
            previous(unraisable)
            return
        # Not from here: the interrupt would be raised at once, inside this hook, and dropped again.
        again = threading.Timer(REDELIVERY_SECONDS, _thread.interrupt_main)
        again.daemon = True
        again.start()

    hook.redelivers_interrupts = True
    sys.unraisablehook = hook
