"""`mhcflash client`: call a running sampling service from the shell (typer sub-app of `service.cli`).

    mhcflash client sample --url http://127.0.0.1:8000 --length 64 --count 4 --seed 7 --out samples/
    mhcflash client info --url http://127.0.0.1:8000

The paths written go to stdout (one a line), progress and a summary to stderr. A failure prints one
line (`error: ...`, with the server's message) and exits 2 when the request or the output directory
needs fixing (422, 401, an existing file), 1 otherwise (unreachable, overloaded, server error).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Annotated

import typer

client_app = typer.Typer(help="Call a running sampling service over HTTP: sample backbones into PDB files, "
                              "read its /info.", no_args_is_help=True, rich_markup_mode=None)

EXIT_FAILED, EXIT_USAGE = 1, 2

Url = Annotated[str, typer.Option("--url", envvar="MHCFLASH_URL", metavar="URL",
                                  help="Base URL of the service, e.g. http://127.0.0.1:8000.")]
ApiKey = Annotated[str | None, typer.Option("--api-key", envvar="MHCFLASH_API_KEY", metavar="KEY", show_default=False,
                                            help="Sent as X-API-Key (when the service requires one).")]

Attempts = Annotated[int, typer.Option(min=1, help="Requests per call at most, retries included (1: no "
                                                         "retries).")]


def _fail(message: str, code: int) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _exit_code(exc: Exception) -> int:
    from service.client import InvalidRequest, Unauthorized

    return EXIT_USAGE if isinstance(exc, (InvalidRequest, Unauthorized, FileExistsError, ValueError)) else EXIT_FAILED


@client_app.command("sample")
def sample(
    url: Url,
    length: Annotated[list[int], typer.Option("--length", "-l", metavar="<int>",
                                              help="Residues per sample (repeatable: one request each).")],
    count: Annotated[int, typer.Option("--count", "-n", help="Samples per length.")] = 1,
    seed: Annotated[int | None, typer.Option(help="Seed of the first sample; sample i uses seed + i "
                                                  "(default: random seeds, in the file names).")] = None,
    noise_scale: Annotated[float | None, typer.Option(help="Noise scale (default: the service's, 0.6).",
                                                      show_default=False)] = None,
    steps: Annotated[int | None, typer.Option(help="Sampling steps, 1 .. the model's T (default: the "
                                              "service's).", show_default=False)] = None,
    out: Annotated[Path, typer.Option(help="Directory for the PDB files.")] = Path("samples"),
    prefix: Annotated[str, typer.Option(help="Start of each file name.")] = "sample",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing files.")] = False,
    api_key: ApiKey = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each answer.")] = 660.0,
    attempts: Attempts = 5,
    concurrency: Annotated[int, typer.Option(min=1, help="Requests in flight at most.")] = 4,
) -> None:
    """Sample backbones from a running service; write one CA-only PDB file per sample.

    Files are named <prefix>_len<L>_seed<S>.pdb, as by `mhcflash sample`; with several
    --length, request i starts at seed + i * count, so all samples get consecutive seeds. An
    existing file is never replaced without --overwrite (with --seed this is checked before
    sampling). 429 and 503 answers are retried after the server's Retry-After.
    """
    from service.client import AsyncClient, ClientError, RetryPolicy
    from service.client.results import pdb_name, write_pdbs

    if not overwrite and seed is not None:
        names = [pdb_name(prefix, n, seed + i * count + j) for i, n in enumerate(length) for j in range(count)]
        existing = [out / name for name in names if (out / name).exists()]
        if existing:
            _fail(f"{existing[0]} exists; not overwritten (pass --overwrite, or another --out or --prefix)",
                  EXIT_USAGE)

    def say_retry(event) -> None:
        typer.echo(f"{url}: {event.reason}, retrying in {event.delay_s:.1f} s (attempt {event.attempt + 1} of "
                   f"{attempts})", err=True)

    async def run():
        async with AsyncClient(url, api_key=api_key, timeout=timeout, retry=RetryPolicy(max_attempts=attempts),
                               on_retry=say_retry) as client:
            return await client.sample_many(length, count, seed, noise_scale, steps=steps, concurrency=concurrency)

    t0 = time.monotonic()
    try:
        results = asyncio.run(run())
        paths = write_pdbs([s for r in results for s in r.samples], out, prefix=prefix, overwrite=overwrite)
    except (ClientError, OSError, ValueError) as exc:
        _fail(str(exc), _exit_code(exc))
    for path in paths:
        typer.echo(str(path))
    first = results[0]
    typer.echo(f"{len(paths)} samples from {first.model} ({first.mode}, weights {first.weights_sha256[:12]}) "
               f"in {time.monotonic() - t0:.1f} s -> {out}", err=True)


@client_app.command("info")
def info(
    url: Url,
    api_key: ApiKey = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the answer.")] = 30.0,
    attempts: Attempts = 5,
) -> None:
    """Print the service's /info as JSON: model, mode, weights hash, device, attention backend, limits."""
    from service.client import Client, ClientError, RetryPolicy

    try:
        with Client(url, api_key=api_key, timeout=timeout, retry=RetryPolicy(max_attempts=attempts)) as client:
            data = client.info().raw
    except (ClientError, ValueError) as exc:
        _fail(str(exc), _exit_code(exc))
    typer.echo(json.dumps(data, indent=2))
