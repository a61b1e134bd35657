"""Python client of the mhcflash sampling service (httpx; sync and asyncio).

    from service.client import Client
    with Client("http://127.0.0.1:8000", api_key=None) as client:
        client.wait_ready(timeout=120)
        result = client.sample(64, count=4, seed=7)      # SampleResult: ids, lengths, seeds, PDB text, timings
        result.write_pdbs("samples/")                    # samples/sample_len64_seed7.pdb ... seed10.pdb

    async with AsyncClient(url) as client:
        results = await client.sample_many([64, 100, 128], count=2, seed=0, concurrency=4)

Modules: `sync` (Client), `aio` (AsyncClient, sample_many), `results` (typed responses, PDB files),
`retry` (what is retried and how long it waits: 429 / 503 honouring Retry-After, bounded),
`errors` (one exception hierarchy carrying the server's message), `cli` (`mhcflash client ...`).
Imports httpx only: no torch, no model.
"""

from service.client.aio import AsyncClient
from service.client.errors import (
    ClientError,
    ConnectionFailed,
    FieldError,
    InvalidRequest,
    NotReady,
    Overloaded,
    RequestTimedOut,
    ServerError,
    ServerTimeout,
    ServiceError,
    Unauthorized,
    Unavailable,
    UnexpectedResponse,
)
from service.client.results import Sample, SampleResult, ServiceInfo, ServiceLimits, Timings, write_pdbs
from service.client.retry import RetryEvent, RetryPolicy
from service.client.sync import Client

__all__ = [
    "AsyncClient", "Client", "ClientError", "ConnectionFailed", "FieldError", "InvalidRequest", "NotReady",
    "Overloaded", "RequestTimedOut", "RetryEvent", "RetryPolicy", "Sample", "SampleResult", "ServerError",
    "ServerTimeout", "ServiceError", "ServiceInfo", "ServiceLimits", "Timings", "Unauthorized", "Unavailable",
    "UnexpectedResponse", "write_pdbs",
]
