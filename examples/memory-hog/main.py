"""Touches inputData.mb MiB (default 100) so the auto-tuner has something to measure."""

import json
import sys

mb = json.load(sys.stdin).get("mb", 100)
block = bytearray(mb * 1024 * 1024)
for i in range(0, len(block), 4096):
    block[i] = 1
print(f"touched {mb} MiB")
