"""How the service and the operator read their settings: a config file, then JSON in an
environment variable (hubconfig.configure writes it; a Deployment sets it), then the command
line, which wins."""

from __future__ import annotations

import json
import os

from traitlets.config import Application, Config


def load_layered_config(app: Application, env_var: str, upgrade_sections=None) -> None:
    """Apply `app.config_file` if it exists, then `$env_var` — a JSON object of the app's own
    options plus sections named after other configurables ({"PhaseWork": {...}}) — then the
    command line again, so it wins over both."""
    if os.path.exists(app.config_file):
        app.load_config_file(app.config_file)
    if os.environ.get(env_var):
        options = json.loads(os.environ[env_var])
        sections = {k: v for k, v in options.items() if k[:1].isupper()}
        if upgrade_sections:
            sections = upgrade_sections(sections, app.log)
        own = {k: v for k, v in options.items() if not k[:1].isupper()}
        app.update_config(Config({type(app).__name__: own, **sections}))
    app.update_config(app.cli_config)
