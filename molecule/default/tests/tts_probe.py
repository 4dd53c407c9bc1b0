"""Probe run ON a test host with the worker's venv python (the client library of the app):

    tts_probe.py URL spread N        N concurrent short syntheses -> {"ok": n, "workers": [...]}
    tts_probe.py URL slow SECONDS    one request fed a text fragment every 0.5 s for SECONDS, then `end`
                                     -> {"ok": bool, "worker": ..., "audio_bytes": ..., "outcome": ...}
    tts_probe.py URL dashscope N     N tasks one after another on one connection of the cloud CosyVoice
                                     protocol (URL: .../api-ws/v1/inference) -> {"ok": n, "audio_bytes": [...], ...}
Prints one JSON line; exit code 0 when every request finished with audio.
"""

import asyncio
import json
import sys

from websockets.asyncio.client import connect

from cosyvoice_tts.client import Connection


async def one(url, text=None, fragments=None, interval=0.5, timeout=180.0):
    async with Connection(url) as conn:
        voices = await conn.voices()
        res = await conn.synthesize(voice=voices[0], text=text, fragments=fragments, interval=interval,
                                    timeout=timeout)
        return {"ok": bool(res.ok), "worker": res.worker, "outcome": res.outcome,
                "audio_bytes": len(res.audio), "error": res.error_message}


def _ds(action, task_id, payload):
    return json.dumps({"header": {"action": action, "task_id": task_id, "streaming": "duplex"}, "payload": payload})


async def dashscope(url, tasks, timeout=180.0):
    """The cloud protocol as the dashscope SDK speaks it: run-task, continue-task, finish-task, per task."""
    results = []
    async with asyncio.timeout(timeout):
        async with connect(url, additional_headers={"Authorization": "Bearer sk-test"}, max_size=None) as ws:
            for i in range(tasks):
                task_id = f"molecule-{i}"
                await ws.send(_ds("run-task", task_id, {
                    "model": "cosyvoice-v2", "task_group": "audio", "task": "tts", "function": "SpeechSynthesizer",
                    "input": {}, "parameters": {"voice": "\u82f1\u6587\u5973", "format": "pcm", "sample_rate": 16000}}))
                events, audio, error = [], 0, None
                async for msg in ws:
                    if isinstance(msg, bytes):
                        audio += len(msg)
                        continue
                    header = json.loads(msg)["header"]
                    events.append(header["event"])
                    if header["event"] == "task-started":
                        await ws.send(_ds("continue-task", task_id, {"input": {"text": "Hello from the cloud"}}))
                        await ws.send(_ds("continue-task", task_id, {"input": {"text": " protocol."}}))
                        await ws.send(_ds("finish-task", task_id, {"input": {}}))
                    elif header["event"] in ("task-finished", "task-failed"):
                        error = header.get("error_message")
                        break
                results.append({"ok": events[-1:] == ["task-finished"] and audio > 0, "audio_bytes": audio,
                                "events": sorted(set(events)), "error": error})
    return results


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
    if mode == "dashscope":
        results = await dashscope(url, arg)
        good = [r for r in results if r["ok"]]
        print(json.dumps({"ok": len(good), "n": arg, "audio_bytes": [r["audio_bytes"] for r in results],
                          "events": sorted({e for r in results for e in r["events"]}),
                          "errors": [r["error"] for r in results if not r["ok"]]}), flush=True)
        return 0 if len(good) == arg else 1
    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
