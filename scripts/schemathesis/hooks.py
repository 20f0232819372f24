"""Generation constraints JSON Schema cannot state.

- JSON Schema's maxLength counts characters; eventflow's limits count UTF-8
  bytes (an id is 1..=256 bytes, a payload at most
  pipeline.max_payload_bytes bytes). A string of 256 four-byte characters is
  valid by the document and rightly refused by the service.
- JSON Schema's "integer" includes 702.0 (a number whose fraction is
  zero); eventflow's timestamp is a JSON integer, written without a
  fraction or exponent (DESIGN.md: no floats).

Bodies that break these rules are not generated. Nothing else is
filtered, and no check is turned off.
"""

import os

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
    if isinstance(event.get("timestamp"), float):
        return False
    return True


@schemathesis.hook
def filter_body(ctx, body):
    events = body if isinstance(body, list) else [body]
    return all(_within_byte_limits(event) for event in events)
