"""The client CLI (python -m cosyvoice_tts.client) against an in-process worker with the test-only fake engine
of tests/test_server.py. The real worker process is driven by the same CLI in tests/e2e."""

from __future__ import annotations

import asyncio
import json
import socket
import wave

from test_server import FakeEngine, Harness, run

from cosyvoice_tts import client


async def cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = await asyncio.to_thread(client.main, list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_text_to_wav(tmp_path, capsys):
    async def main():
        async with Harness() as h:
            out = tmp_path / "a.wav"
            rc, stdout, _ = await cli(capsys, "--url", h.url, "--text", "Hello there. Bye now.", "--out", str(out),
                                      "--seed", "2")  # fmt: skip
            assert rc == 0, stdout
            assert stdout.startswith("synthesis: ok") and "audio_s=0.2" in stdout and f"out={out}" in stdout
            with wave.open(str(out)) as w:
                assert (w.getframerate(), w.getnchannels(), w.getnframes()) == (24000, 1, 4800)
            assert h.engine.requests[-1].params.voice == "alice"  # the worker's first voice by default
            assert h.engine.requests[-1].params.seed == 2

    run(main())


def test_simulate_stream_reports_first_audio(capsys):
    async def main():
        async with Harness() as h:
            rc, stdout, _ = await cli(capsys, "--url", h.url, "--simulate-stream", "--json", "--voice", "bob",
                                      "--text", "One two three. Four five six.", "--fragment-interval-ms", "5")  # fmt: skip
            assert rc == 0, stdout
            d = json.loads(stdout)
            assert d["check"] == "stream" and d["ok"] and d["outcome"] == "finished"
            assert d["first_audio_ms"] > 0 and d["server_stats"]["segments"] == 2
            assert h.engine.requests[-1].pushed == ["One two three.", "Four five six."]

    run(main())


def test_interrupt_check_passes(capsys):
    async def main():
        async with Harness(FakeEngine(interval=0.02, chunks_per_segment=300)) as h:
            rc, stdout, _ = await cli(capsys, "--url", h.url, "--test-interrupt", "--json")
            assert rc == 0, stdout
            d = json.loads(stdout)
            assert d["outcome"] == "cancelled" and d["frames_after_cancel"] == 0 and d["cancel_ack_ms"] >= 0
            assert d["follow_up"].startswith("finished")
            assert h.engine.requests[0].cancelled

    run(main())


def test_interrupt_check_fails_when_request_finishes_first(capsys):
    async def main():
        async with Harness(FakeEngine(interval=0.0, chunks_per_segment=3)) as h:
            rc, stdout, _ = await cli(capsys, "--url", h.url, "--test-interrupt", "--cancel-after", "5")
            assert rc == 1 and "FAILED" in stdout and "expected 'cancelled'" in stdout

    run(main())


def test_failures_exit_non_zero(capsys):
    async def main():
        async with Harness(auth_token="tok") as h:
            rc, _, err = await cli(capsys, "--url", h.url, "--text", "Hi.")
            assert rc == 1 and "HTTP 401" in err
            rc, stdout, _ = await cli(capsys, "--url", h.url, "--token", "tok", "--voice", "nobody", "--text", "Hi.")
            assert rc == 1 and "unknown_voice" in stdout
            rc, stdout, _ = await cli(capsys, "--url", h.url, "--token", "tok", "--list-voices")
            assert rc == 0 and stdout.split() == ["alice", "bob", "fail"]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        rc, _, err = await cli(capsys, "--url", f"ws://127.0.0.1:{port}/ws", "--text", "Hi.")
        assert rc == 1 and "cannot connect" in err

    run(main())
