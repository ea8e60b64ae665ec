"""POST /v1/feedback: a client's judgement of a response it got, by the response's id.

    {"id": "chatcmpl-...", "label": "up"}                    # or "down"
    {"id": "cmpl-...", "score": -0.5, "comment": "wrong year"}   # a number in [-1, 1]

The feedback is filed under the adapter and version that answered (the server remembers its recent
responses, and the registry its captured ones), counted in peftkit_feedback_total{adapter,version,label},
and stored in the registry's database when the server has one (a second feedback on the same response
replaces the first). A response is the tenant's that asked for it: another tenant's id gets the very
same 404 as an id never issued.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from fastapi import Depends, FastAPI
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.concurrency import run_in_threadpool

from ..registry.traffic import Feedback, label_of, put_feedback, samples_of_response
from .apierrors import ApiError
from .capture import Observer, Served
from .tenants import Access, Caller

NOT_FOUND = "no response with this id was served to you (feedback is taken on recent and captured responses)"


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=256)
    score: float | None = Field(None, ge=-1, le=1, allow_inf_nan=False)
    label: Literal["up", "down"] | None = None
    comment: str = Field("", max_length=4000)

    @model_validator(mode="after")
    def _one_judgement(self) -> FeedbackRequest:
        if (self.score is None) == (self.label is None):
            raise ValueError('give either "score" (a number from -1 to 1) or "label" ("up" or "down")')
        return self

    @property
    def value(self) -> float:
        return self.score if self.score is not None else {"up": 1.0, "down": -1.0}[self.label or "up"]


def install_feedback(
    app: FastAPI, observer: Observer, registry: Any | None, access: Access, caller: Any
) -> None:
    """Add POST /v1/feedback behind `caller` (the API key dependency)."""
    authenticated = Depends(caller)

    @app.post("/v1/feedback")
    async def feedback(req: FeedbackRequest, who: Caller = authenticated) -> dict[str, Any]:
        access.admit(who)
        tenant = who.tenant.name if who.tenant else ""
        served = observer.served(req.id)
        if served is None and registry is not None:
            served = await run_in_threadpool(_captured, registry, req.id)
        if served is None or served.tenant != tenant:  # the same answer: no tenant learns another's ids
            raise ApiError(404, NOT_FOUND, param="id", code="response_not_found")
        label = label_of(req.value)
        comment = observer.policy.scrub(req.comment)
        record = Feedback(req.id, time.time(), served.name, served.version, served.model, tenant, req.value,
                          label, comment)  # fmt: skip
        replaced = None
        if registry is not None:
            replaced = await run_in_threadpool(put_feedback, registry.db, record)
        if observer.metrics is not None:
            observer.metrics.feedback.labels(*observer.labels(served.name, served.version), label).inc()
        return {
            "object": "feedback",
            "id": req.id,
            "score": req.value,
            "label": label,
            "stored": registry is not None,
            "replaced": replaced is not None,
        }


def _captured(registry: Any, response_id: str) -> Served | None:
    found = samples_of_response(registry.db, response_id)
    if not found:
        return None
    s = found[0]
    return Served(s.name, s.version, s.model, s.tenant, s.at)
