"""Probe run ON the load balancer with the system python3 (standard library only: the LB has no app venv):

    lb_probe.py speech URL FORMAT     POST an OpenAI-style speech request (JSON body, as the openai SDK sends it)
                                      -> {"status", "content_type", "bytes", "head", "request_id", ...}
    lb_probe.py handshake URL         WebSocket opening handshake (RFC 6455), then a close frame
                                      -> {"status", "upgrade", "accept_ok"}
    lb_probe.py error METHOD URL      a request that must fail (POST: an empty JSON object as the body)
                                      -> {"status", "allow", "code" (the OpenAI-style error code)}
Prints one JSON line; exit code 0 when the request got its answer (the test judges it).
"""

import base64
import hashlib
import json
import os
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def speech(url, fmt):
    # voice "英文女" (a built-in speaker of the tiny test model), escaped: the script travels through a shell
    body = json.dumps({"model": "tts-1", "voice": "\u82f1\u6587\u5973", "input": "Hello there.",
                       "response_format": fmt})
    req = urllib.request.Request(url, data=body.encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": "Bearer test"})
    try:
        with urllib.request.urlopen(req, timeout=240) as r:
            data = r.read()  # the whole chunked body (IncompleteRead if the stream was cut)
            return {"status": r.status, "content_type": r.headers.get("Content-Type"), "bytes": len(data),
                    "head": data[:4].hex(), "request_id": r.headers.get("X-Request-Id"),
                    "transfer_encoding": r.headers.get("Transfer-Encoding")}
    except urllib.error.HTTPError as e:
        return {"status": e.code, "content_type": e.headers.get("Content-Type"),
                "body": e.read().decode(errors="replace")[:1000]}


def error(method, url):
    req = urllib.request.Request(url, data=b"{}" if method == "POST" else None, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return {"status": r.status, "body": r.read(200).decode(errors="replace")}
    except urllib.error.HTTPError as e:
        body = e.read().decode(errors="replace")
        try:
            code = json.loads(body)["error"]["code"]
        except (ValueError, KeyError, TypeError):
            code = None
        return {"status": e.code, "allow": e.headers.get("Allow"), "code": code, "body": body[:1000]}


def handshake(url):
    u = urllib.parse.urlsplit(url)
    key = base64.b64encode(os.urandom(16)).decode()
    with socket.create_connection((u.hostname, u.port or 80), timeout=30) as s:
        s.sendall((f"GET {u.path} HTTP/1.1\r\nHost: {u.netloc}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer test\r\n"
                   "\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                break
            head += chunk
        lines = head.split(b"\r\n\r\n", 1)[0].decode(errors="replace").split("\r\n")
        status = int(lines[0].split()[1]) if len(lines[0].split()) > 1 else 0
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)}
        if status == 101:
            # a masked close frame, code 1000
            mask = os.urandom(4)
            s.sendall(bytes([0x88, 0x82]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(b"\x03\xe8")))
    expected = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
    return {"status": status, "status_line": lines[0], "upgrade": headers.get("upgrade", ""),
            "accept_ok": headers.get("sec-websocket-accept") == expected}


def main():
    mode, url = sys.argv[1], sys.argv[-1]
    if mode == "speech":
        out = speech(sys.argv[2], sys.argv[3])
    elif mode == "handshake":
        out = handshake(url)
    elif mode == "error":
        out = error(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
