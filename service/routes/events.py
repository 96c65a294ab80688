"""``POST /v1/events``: labeled events from authenticated writers, produced to Kafka.

Refused with 422 and nothing produced: anything invalid, pipeline-only fields from a public
writer, and events dated more than ``event_max_future_skew_s`` after this replica's wall clock.
The future-dated ones are also produced to the dead-letter topic with the reason (the trainer's
header format), because event time drives expiry and decay downstream (docs/trust-model.md) and an
operator needs to see who sends them.
"""

from __future__ import annotations

import time
from typing import Annotated

from confluent_kafka import KafkaException
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response

from freshrec.kafka import dead_letter_headers
from service.auth import Writer, require_writer
from service.errors import json_response
from service.schemas import EventsAccepted, Problem, ServedEvent, parse_events
from service.state import ServiceState, service_state

EVENTS_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/EventsRequest"}}}}}
# Recorded as the "source topic" of dead letters that came in over HTTP rather than Kafka.
HTTP_SOURCE = "http:/v1/events"

router = APIRouter()


def _future_events(events: list[ServedEvent], skew_s: float, now: float
                   ) -> list[tuple[int, ServedEvent]]:
    limit = now + skew_s
    return [(i, e) for i, e in enumerate(events) if e.ts > limit]


def _dead_letter_future(st: ServiceState, future: list[tuple[int, ServedEvent]],
                        now: float) -> None:
    skew = st.settings.event_max_future_skew_s
    assert st.sink is not None
    for _, e in future:
        reason = (f"ts: {e.ts:.3f} is {e.ts - now:.0f} s ahead of the service clock "
                  f"(limit event_max_future_skew_s={skew:g})")
        st.sink.produce_now(st.settings.topic_dlq, e.user_id.encode(), e.to_json(),
                            headers=dead_letter_headers(reason, HTTP_SOURCE, -1, -1))
    st.metrics.events_dead_lettered.labels("future_ts").inc(len(future))


@router.post("/v1/events", status_code=202, response_model=EventsAccepted,
             openapi_extra=EVENTS_BODY,
             responses={401: {"model": Problem}, 413: {"model": Problem},
                        415: {"model": Problem}, 422: {"model": Problem},
                        503: {"model": Problem}})
async def events(request: Request, writer: Annotated[Writer, Depends(require_writer)],
                 st: Annotated[ServiceState, Depends(service_state)]) -> Response:
    """Validate labeled events (one or a list) and produce them to the events topic.

    All or nothing: one refused event refuses the request, so a client can retry it whole.
    """
    batch = parse_events(await request.body(), internal=writer is Writer.INTERNAL)
    sink = st.sink
    if sink is None:
        raise HTTPException(503, "not started")
    now = time.time()
    future = _future_events(batch, st.settings.event_max_future_skew_s, now)
    try:
        if future:
            _dead_letter_future(st, future, now)
            single = len(batch) == 1
            raise RequestValidationError([{
                "type": "future_timestamp", "input": e.ts,
                "loc": ("body", "ts") if single else ("body", i, "ts"),
                "msg": f"more than {st.settings.event_max_future_skew_s:g} s after the "
                       "service clock (dead-lettered)"} for i, e in future])
        for e in batch:
            sink.produce_now(st.settings.topic_events, e.user_id.encode(), e.to_json())
    except BufferError:
        raise HTTPException(503, "event queue full, retry later") from None
    except KafkaException as exc:
        # Nothing queued for this event (e.g. the topic is missing after a broker restart):
        # the client retries the whole request; earlier events of a batch may be duplicated,
        # which the trainer's event-id dedup absorbs.
        raise HTTPException(503, f"events topic unavailable, retry later ({exc})") from None
    st.metrics.events_accepted.inc(len(batch))
    return json_response({"accepted": len(batch)}, status_code=202)
