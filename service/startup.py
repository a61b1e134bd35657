"""Start-up of the service: everything an operator's input can break, checked before serving.

`python -m service` and `mhcflash serve` both run :func:`main`: read the settings, bind the port,
pick the device, load the weights and fix the request limits (`prepare`), and only then start
uvicorn on the bound socket. Any of these failing (a bad `MHCFLASH_*` value or flag, a weights
path or file that cannot be loaded, `MHCFLASH_DEVICE=cuda` without a GPU, a port in use, limits the
model cannot meet) prints one line on stderr and exits with :data:`EXIT_STARTUP`, nothing else: no
traceback, and no server log lines, since uvicorn has not started.

An app created without a prepared start-up (the in-process tests, another ASGI server) runs
:func:`prepare` in its lifespan, so both paths check the same things.
"""

from __future__ import annotations

import errno
import logging
import socket
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from model.limits import LimitsError, SampleLimits
from service.settings import ServiceSettings

if TYPE_CHECKING:
    import torch

    from model.sampler import Sampler

# NOTE: torch and the model (`model.sampler`, seconds to import) are imported only once the settings and
# the port are known to be good, so those mistakes are reported at once.
log = logging.getLogger("mhcflash.service")
EXIT_STARTUP = 2  # as the command line's errors a user can fix


class StartupError(RuntimeError):
    """A setting that stops start-up; ``field`` names the setting (``device``, ``max_length``, ...) if one."""

    def __init__(self, message: str, field: str | None = None, value=None) -> None:
        super().__init__(message)
        self.field, self.value = field, value


@dataclass(frozen=True)
class Prepared:
    """What :func:`prepare` made: the sampler (weights loaded on the device), the request limits."""

    sampler: Sampler
    limits: SampleLimits


def read_settings(given: dict | None = None) -> ServiceSettings:
    """`ServiceSettings` from `given` (command-line flags) over `MHCFLASH_*`; StartupError naming the bad ones."""
    from pydantic import ValidationError

    given = given or {}
    try:
        return ServiceSettings(**given)
    except ValidationError as exc:
        problems = []
        for e in exc.errors():
            name = str(e["loc"][0]) if e["loc"] else "settings"
            problems.append(f"{source(name, e.get('input'), given)}: {e['msg']}")
        raise StartupError("; ".join(problems)) from None


def source(field: str, value, flags=()) -> str:
    """How the operator wrote a setting: `--max-length 2000` if it came from a flag, else `MHCFLASH_MAX_LENGTH=2000`."""
    if field in flags:
        return f"--{field.replace('_', '-')} {value}"
    return f"MHCFLASH_{field.upper()}={value}"


def pick_device(name: str) -> torch.device:
    """`auto`: the first GPU if any, else the CPU. A CUDA device that is not there is a StartupError."""
    from model.sampler import DeviceError
    from model.sampler import pick_device as model_pick_device

    try:
        return model_pick_device(name)
    except DeviceError as exc:
        raise StartupError(str(exc), "device", name) from None


def service_limits(settings: ServiceSettings, config) -> SampleLimits:
    """The request limits: the model's lengths narrowed by the settings (`model.limits`), the service's caps."""
    try:
        limits = SampleLimits.for_model(config, min_length=settings.min_length, max_length=settings.max_length,
                                        max_count=settings.max_count, max_total_residues=settings.max_total_residues,
                                        default_steps=settings.default_steps)
    except LimitsError as exc:
        raise StartupError(str(exc), exc.field, exc.value) from None
    if settings.queue_max_samples < settings.max_count:
        raise StartupError(f"must be at least MHCFLASH_MAX_COUNT ({settings.max_count}): one full request must "
                           f"fit in the queue", "queue_max_samples", settings.queue_max_samples)
    return limits


def prepare(settings: ServiceSettings) -> Prepared:
    """Device, weights and limits. Raises StartupError or `model.sampler.WeightsError` (naming the file)."""
    from model.sampler import Sampler

    sampler = Sampler.load(settings.weights, device=pick_device(settings.device), precision=settings.precision)
    return Prepared(sampler, service_limits(settings, sampler.config))


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (uvicorn listens on it); StartupError if the address cannot be used."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        hint = "; stop the other server or choose another port" if exc.errno == errno.EADDRINUSE else ""
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror or exc}{hint}", "port", port) from None
    sock.set_inheritable(True)
    return sock


def explain(exc: BaseException, flags=()) -> str:
    """One line for a start-up failure, naming the setting (as flag or variable) where there is one."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    sampler = sys.modules.get("model.sampler")  # WeightsError names the file; not imported before the weights
    known = (StartupError, LimitsError) + ((sampler.WeightsError,) if sampler else ())
    if isinstance(exc, StartupError) and exc.field is not None:
        text = f"{source(exc.field, exc.value, flags)}: {text}"
    elif not isinstance(exc, known):
        text = f"{type(exc).__name__}: {text}"
    return text


def main(given: dict | None = None) -> int:
    """Check everything, then serve until SIGTERM / Ctrl-C. Returns the exit status (see the module docstring)."""
    given = {k: v for k, v in (given or {}).items() if v is not None}
    settings, sock = None, None
    try:
        settings = read_settings(given)
        logging.basicConfig(level=settings.log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        sock = bind_socket(settings.host, settings.port)
        prepared = prepare(settings)
    except Exception as exc:  # every start-up failure is one line, then exit
        if sock is not None:
            sock.close()
        print(f"error: cannot start the service: {explain(exc, given)}", file=sys.stderr, flush=True)
        if settings is not None and settings.log_level == "debug":
            log.debug("start-up failure", exc_info=exc)
        return EXIT_STARTUP
    import uvicorn

    from service.app import create_app

    app = create_app(settings)
    app.state.service.prepared = prepared
    port = sock.getsockname()[1]
    log.info("listening on http://%s:%d (GET /ready once warmed up; Ctrl-C or SIGTERM drains and stops)",
             settings.host, port)
    server = uvicorn.Server(uvicorn.Config(
        app, log_level=settings.log_level, access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s) or None))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # pragma: no cover - Ctrl-C while starting
        pass
    finally:
        sock.close()
    return 0 if server.started else 3  # uvicorn's start-up failure code (the lifespan failed)
