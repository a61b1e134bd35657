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

# NOTE: torch (seconds to import) is imported only once the settings and the port are known to be
# good, so those mistakes are reported at once.
log = logging.getLogger("mhcflash.service")
EXIT_STARTUP = 2  # as the command line's errors a user can fix


class StartupError(RuntimeError):
    """A setting that stops start-up; ``field`` names the setting (``device``, ``max_length``, ...) if one."""

    def __init__(self, message: str, field: str | None = None, value=None) -> None:
        super().__init__(message)
        self.field, self.value = field, value


@dataclass(frozen=True)
class Prepared:
    """What :func:`prepare` made: the device, the loaded weights, the request limits."""

    device: torch.device
    loaded: object  # model.weights_io.LoadedWeights
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
    import torch

    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        found = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if found == 0:
            raise StartupError(f"no CUDA device is available here (torch {torch.__version__}, CUDA build "
                               f"{torch.version.cuda or 'none'}); use cpu or auto", "device", name)
        if (device.index or 0) >= found:
            raise StartupError(f"only {found} CUDA device(s) here (cuda:0 .. cuda:{found - 1})", "device", name)
    return device


def service_limits(settings: ServiceSettings, config) -> SampleLimits:
    """The request limits: the model's lengths narrowed by the settings (`model.limits`), the service's caps."""
    try:
        limits = SampleLimits.for_model(config, min_length=settings.min_length, max_length=settings.max_length,
                                        max_count=settings.max_count, max_total_residues=settings.max_total_residues)
    except LimitsError as exc:
        raise StartupError(str(exc), exc.field, exc.value) from None
    if settings.queue_max_samples < settings.max_count:
        raise StartupError(f"must be at least MHCFLASH_MAX_COUNT ({settings.max_count}): one full request must "
                           f"fit in the queue", "queue_max_samples", settings.queue_max_samples)
    return limits


def prepare(settings: ServiceSettings) -> Prepared:
    """Device, weights and limits. Raises StartupError or `model.weights_io.WeightsError` (naming the file)."""
    from model.weights_io import load_weights

    device = pick_device(settings.device)
    loaded = load_weights(settings.weights, device)
    return Prepared(device, loaded, service_limits(settings, loaded.config))


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
    weights_io = sys.modules.get("model.weights_io")  # its errors name the file; not imported before weights
    known = (StartupError, LimitsError) + ((weights_io.WeightsError,) if weights_io else ())
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
