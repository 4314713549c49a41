"""Peak resident memory of this process while a block runs, above what it held just before (Linux).

torch allocates outside Python's allocator, so tracemalloc sees nothing; the kernel's high-water mark of
the resident set (VmHWM, reset through /proc/self/clear_refs) sees every page touched, in any thread.
"""

from __future__ import annotations

import ctypes
import threading
import time

def rss_bytes(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def release_free_memory() -> None:
    """Give the pages of glibc's free blocks (every arena) back to the kernel: memory a previous block
    freed but kept must be faulted in again, and so counted, when it is reused."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakRSS:
    """`with PeakRSS() as m: ...` then `m.extra`: peak resident bytes during the block minus those before.

    Resets the kernel's high-water mark where allowed; elsewhere samples the resident set every 2 ms.
    """

    def __enter__(self) -> "PeakRSS":
        release_free_memory()
        self.before = rss_bytes()
        self._sampler = None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
        except OSError:
            self._peak, self._stop = self.before, threading.Event()
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        if self._sampler is None:
            peak = rss_bytes("VmHWM")
        else:
            self._stop.set()
            self._sampler.join()
            peak = max(self._peak, rss_bytes())
        self.extra = max(0, peak - self.before)
