"""Generation constraints JSON Schema cannot state.

- JSON Schema's maxLength counts characters; eventflow's limits count UTF-8
  bytes (an id is 1..=256 bytes, a payload at most
  pipeline.max_payload_bytes bytes). A string of 256 four-byte characters is
  valid by the document and rightly refused by the service.
- JSON Schema's "integer" includes 702.0 (a number whose fraction is
  zero); eventflow's integers (a timestamp, max_deliver, a sequence, a
  limit) are JSON integers, written without a fraction or exponent
  (DESIGN.md: no floats), and the API takes no other numbers.

- Ranges of durations: a subscription's ack_timeout is 100ms to 24h and
  a poll's wait at most server.request_timeout (10s by default); the
  document states their form (a number and a unit), not their range.
- A subscription's start.after must not pass the newest publication
  sequence, which changes as the run posts events: only 0 (always valid)
  is generated.

Bodies and queries that break these rules are not generated. Nothing else
is filtered, and no check is turned off.
"""

import os
import re

import schemathesis

ID_MAX_BYTES = 256
PAYLOAD_MAX_BYTES = int(os.environ.get("EVENTFLOW_MAX_PAYLOAD_BYTES", "65536"))


def _utf8_len(text):
    return len(text.encode("utf-8", "surrogatepass"))


def _within_byte_limits(event):
    if not isinstance(event, dict):
        return True
    event_id = event.get("id")
    payload = event.get("payload")
    if isinstance(event_id, str) and _utf8_len(event_id) > ID_MAX_BYTES:
        return False
    if isinstance(payload, str) and _utf8_len(payload) > PAYLOAD_MAX_BYTES:
        return False
    return True


def _has_float(value):
    if isinstance(value, float):
        return True
    if isinstance(value, dict):
        return any(_has_float(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_float(v) for v in value)
    return False


_DURATION = re.compile(r"^(0|[1-9][0-9]{0,8})(ms|s|m|h)$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}
REQUEST_TIMEOUT_MS = 10_000


def _millis(text):
    match = _DURATION.match(text) if isinstance(text, str) else None
    return int(match.group(1)) * _UNIT_MS[match.group(2)] if match else None


def _path(ctx):
    return getattr(getattr(ctx, "operation", None), "path", "") or ""


@schemathesis.hook
def filter_body(ctx, body):
    events = body if isinstance(body, list) else [body]
    if _has_float(body) or not all(_within_byte_limits(event) for event in events):
        return False
    if _path(ctx) == "/subscriptions/{name}" and isinstance(body, dict):
        timeout = _millis(body.get("ack_timeout"))
        if timeout is not None and not 100 <= timeout <= 86_400_000:
            return False
        start = body.get("start")
        if isinstance(start, dict) and isinstance(start.get("after"), int) and start["after"] > 0:
            return False
    return True


@schemathesis.hook
def filter_query(ctx, query):
    if _path(ctx) == "/subscriptions/{name}/poll" and isinstance(query, dict):
        wait = _millis(query.get("wait"))
        if wait is not None and wait > REQUEST_TIMEOUT_MS:
            return False
    return True
