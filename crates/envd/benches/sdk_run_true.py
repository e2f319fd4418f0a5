"""Times `commands.run("true")` through the official e2b SDK against a running envd.

Usage: sdk_run_true.py URL TOKEN ITERATIONS [USER]. Prints one JSON object with latencies in ms.
"""

import json
import sys
import time

from packaging.version import Version
from e2b import ConnectionConfig, Sandbox

url, token, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
user = (sys.argv[4] if len(sys.argv) > 4 else "") or None
cfg = ConnectionConfig(
    sandbox_url=url,
    api_key="unused",
    extra_sandbox_headers={"X-Access-Token": token, "E2b-Sandbox-Id": "bench", "E2b-Sandbox-Port": "49983"},
)
sbx = Sandbox(
    sandbox_id="bench",
    sandbox_domain=None,
    envd_version=Version("0.6.4"),
    envd_access_token=token,
    traffic_access_token=None,
    connection_config=cfg,
)
for _ in range(10):  # warm the connection pool
    sbx.commands.run("true", user=user)
samples = []
for _ in range(n):
    t = time.perf_counter()
    sbx.commands.run("true", user=user)
    samples.append((time.perf_counter() - t) * 1000)
print(json.dumps({"samples_ms": samples}))
