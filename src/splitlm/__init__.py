"""splitlm: run a large language model split between an edge device and a cloud server.

The Python API (splitlm.api): `Device` (the device side: generate, chat, stream), `serve` (the cloud
part), `export_plan`, `profile`, `profile_device` and `choose_plan`. Imported on first use, so that `import splitlm` stays light
and torch-free.
"""

__version__ = "0.1.0"

_API = ("Device", "serve", "export_plan", "profile", "profile_device", "choose_plan")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from splitlm import api

        return getattr(api, name)
    raise AttributeError(f"module 'splitlm' has no attribute {name!r}")
