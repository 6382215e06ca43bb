"""Reads inputData (JSON on stdin) and answers with a greeting and a sum."""

import json
import os
import sys

data = json.load(sys.stdin)
name = data.get("name", "world")
numbers = data.get("numbers", [])
print(json.dumps({
    "greeting": f"Hello, {name}!",
    "sum": sum(numbers),
    "requestId": os.environ.get("NANOGRID_REQUEST_ID"),
}))
