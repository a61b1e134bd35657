"""What the app holds while it runs (`app.state.service`), and how a route gets it (a `state: State` parameter)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

from service.metrics import ServiceMetrics
from service.settings import ServiceSettings

if TYPE_CHECKING:
    from model.limits import SampleLimits
    from model.sampler import Sampler
    from service.engine import SamplingEngine
    from service.startup import Prepared

__all__ = ["ServiceState", "State", "get_state"]


class ServiceState:
    """Everything the lifespan builds: the sampler (the model), the engine, the request limits."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.metrics = ServiceMetrics()  # from creation on: responses during start-up are counted too
        self.prepared: Prepared | None = None  # set by service.startup.main; else the lifespan prepares
        self.sampler: Sampler | None = None
        self.engine: SamplingEngine | None = None
        self.limits: SampleLimits | None = None
        self.ready = False
        self.started = time.time()


def get_state(request: Request) -> ServiceState:
    """FastAPI dependency: this app's `ServiceState`."""
    return request.app.state.service


State = Annotated[ServiceState, Depends(get_state)]  # a route's `state: State` parameter
