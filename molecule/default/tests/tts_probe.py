"""Probe run ON a test host with the worker's venv python (the client library of the app):

    tts_probe.py URL spread N        N concurrent short syntheses -> {"ok": n, "workers": [...]}
    tts_probe.py URL slow SECONDS    one request fed a text fragment every 0.5 s for SECONDS, then `end`
                                     -> {"ok": bool, "worker": ..., "audio_bytes": ..., "outcome": ...}
Prints one JSON line; exit code 0 when every request finished with audio.
"""

import asyncio
import json
import sys

from cosyvoice_tts.client import Connection


async def one(url, text=None, fragments=None, interval=0.5, timeout=180.0):
    async with Connection(url) as conn:
        voices = await conn.voices()
        res = await conn.synthesize(voice=voices[0], text=text, fragments=fragments, interval=interval,
                                    timeout=timeout)
        return {"ok": bool(res.ok), "worker": res.worker, "outcome": res.outcome,
                "audio_bytes": len(res.audio), "error": res.error_message}


async def main():
    url, mode, arg = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "spread":
        texts = ["Hi." for i in range(arg)]
        results = await asyncio.gather(*(one(url, text=t) for t in texts), return_exceptions=True)
        good = [r for r in results if isinstance(r, dict) and r["ok"]]
        out = {"ok": len(good), "n": arg, "workers": sorted({r["worker"] for r in good}),
               "errors": [repr(r) if not isinstance(r, dict) else r for r in results
                          if not (isinstance(r, dict) and r["ok"])]}
        print(json.dumps(out), flush=True)
        return 0 if len(good) == arg else 1
    if mode == "slow":
        words = "this stream keeps talking while the cluster is being scaled".split()
        fragments = [words[i % len(words)] + " " for i in range(arg * 2)]
        r = await one(url, fragments=fragments, interval=0.5)
        print(json.dumps(r), flush=True)
        return 0 if r["ok"] else 1
    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
