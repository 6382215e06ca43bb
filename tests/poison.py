"""Poison message bodies: each must end on its first receive, never take a worker down.

name -> (body, the requestId a FAILED result is published under, or None when none can be
read). Bodies name a bucket that does not exist: none of them may get as far as a fetch.
"""

from __future__ import annotations

TASK = '{"requestId": "%s", "functionId": "f", "runtime": "python", "s3Bucket": "b", "s3Key": "k"'
POISON = {
    "not-json": ("this is not json", None),
    "lone-surrogate": (TASK % "p-surrogate" + ', "inputData": "\\ud800"}', "p-surrogate"),
    "nested-50000": ("[" * 50_000 + "]" * 50_000, None),
    "digits-5000": (TASK % "p-digits" + ', "memoryMb": 1' + "0" * 5000 + "}", "p-digits"),
    "nan": (TASK % "p-nan" + ', "inputData": NaN}', "p-nan"),
    "huge-cut-short": (TASK % "p-huge" + ', "inputData": "' + "x" * 900_000, "p-huge"),
    "wrong-type": (TASK % "p-type" + ', "timeoutMs": "soon"}', "p-type"),
    "unknown-runtime": ((TASK % "p-cobol").replace('"python"', '"cobol"') + "}", "p-cobol"),
    "json-null": ("null", None),
}
