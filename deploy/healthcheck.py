#!/usr/bin/env python3
"""The image's HEALTHCHECK: healthy once the service is ready to segment (GET /ready answers 200: the default model
loaded and warmed up), not merely alive: /health answers within seconds of the start, about a minute before the
model can (compiling), and compose starts the proxy in front only once the service is healthy.

Reads the port and the API key the service reads (CELLSEG_PORT, CELLSEG_API_KEY: /ready needs the key when one is
set). Docker keeps what it prints in `docker inspect`'s .State.Health.Log: what /ready says the service is doing.
"""

import os
import sys
import urllib.error
import urllib.request

port = os.environ.get("CELLSEG_PORT") or "8000"
host = os.environ.get("CELLSEG_HOST") or "0.0.0.0"
host = "127.0.0.1" if host in {"0.0.0.0", "::"} else host  # the address to reach when it listens on every one
key = os.environ.get("CELLSEG_API_KEY") or ""
request = urllib.request.Request(f"http://{host}:{port}/ready", headers={"X-API-Key": key} if key else {})
try:
    with urllib.request.urlopen(request, timeout=4) as answer:
        print(answer.status, answer.read(300).decode(errors="replace"))
except urllib.error.HTTPError as exc:
    print(exc.code, exc.read(300).decode(errors="replace"))
    sys.exit(1)
except OSError as exc:
    print(f"no answer from {request.full_url}: {exc}")
    sys.exit(1)
