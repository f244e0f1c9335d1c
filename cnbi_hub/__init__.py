"""cnbi_hub: build custom notebook images from JupyterLab and spawn servers on them."""

from ._version import __version__

__all__ = ["__version__"]


def _jupyter_labextension_paths():
    """The built Lab extension (the Image Builder panel), found by JupyterLab in development."""
    return [{"src": "labextension", "dest": "cnbi-hub"}]


def _jupyter_server_extension_points():
    """The jupyter_server extension forwarding {base_url}cnbi/api/ to the hub's cnbi service."""
    from .serverextension import CNBIServerExtension

    return [{"module": "cnbi_hub", "app": CNBIServerExtension}]
