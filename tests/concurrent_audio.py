"""Reading several engine requests at once, each on its own thread, as concurrent clients would."""
from __future__ import annotations

import threading

import numpy as np


def audio_of_all(requests, timeout: float = 300) -> dict[int, tuple[np.ndarray, dict]]:
    """{index: (audio, summary)} of `requests`, read concurrently."""
    results: dict[int, tuple[np.ndarray, dict]] = {}
    threads = [threading.Thread(target=lambda i=i, r=r: results.__setitem__(i, (r.audio(), r.summary)))
               for i, r in enumerate(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    return results
