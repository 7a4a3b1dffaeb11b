"""``StopSignal``: SIGINT/SIGTERM stop the training loop after the current step (with a checkpoint)."""

import signal
import threading


class StopSignal:
    """SIGINT/SIGTERM set a flag the loop checks after each step (a second SIGINT interrupts at once)."""

    def __init__(self):
        self.signum, self._old = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
