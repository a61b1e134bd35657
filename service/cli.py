"""``mhcflash``, the console command: the offline workflow of ``model.cli`` plus the service's commands.

    mhcflash data | train | sample | selfcheck | evaluate    (model.cli)
    mhcflash serve        the HTTP sampling service (uvicorn)
    mhcflash client       call a running service: sample into PDB files, read /info (service/client/cli.py)

The service depends on the model, never the reverse: this module adds ``serve`` and ``client`` to
``model.cli.app``, and the console script (pyproject ``[project.scripts]``) points here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from model.cli import _fail, _user_errors, app
from service.client.cli import client_app  # imports only typer at load time; httpx on first use

__all__ = ["app"]


@app.command()
@_user_errors
def serve(
    weights: Annotated[Path | None, typer.Option(help="Weights directory or root (default: "
                                                    "$MHCFLASH_WEIGHTS or the shipped weights).")] = None,
    host: Annotated[str | None, typer.Option(help="Bind address (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8000).")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda | cuda:N")] = None,
) -> None:
    """Run the HTTP sampling service (POST /sample, /metrics, /health, /ready).

    Settings not given here come from MHCFLASH_* environment variables (see docs/SERVICE.md). A setting,
    weights file, device or port that cannot be used prints one line and exits 2.
    """
    try:
        from service.startup import main as run_service
    except ImportError as exc:
        _fail(f"the service's dependencies are not installed ({exc}); install the project with its dependencies")
    code = run_service({"weights": weights, "host": host, "port": port, "device": device})
    if code:
        raise typer.Exit(code)


app.add_typer(client_app, name="client")


def main() -> None:  # pragma: no cover - console entry for `python -m service.cli`
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
