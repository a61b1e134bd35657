"""HTTP sampling service: FastAPI app (`service.app.create_app`), sampling engine, metrics, settings.

Run it with `python -m service` (settings from `MHCFLASH_*` environment variables, see
`service.settings`). Imports `model/`; `model/` never imports `service/`.
"""
