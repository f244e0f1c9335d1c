# Enable cnbi_hub: drop this file into a JupyterHub config directory (The Littlest JupyterHub's
# /opt/tljh/config/jupyterhub_config.d/, or a z2jh `hub.extraConfig` entry) and adjust.
#
# It registers the hub-managed `cnbi` service on 127.0.0.1, its scopes and roles, and lets
# single-user servers' tokens reach it (the JupyterLab Image Builder panel uses them).
import os

from cnbi_hub.hubconfig import configure

configure(
    c,  # noqa: F821 - `c` is the config object JupyterHub passes to config files
    url=os.environ.get("CNBI_SERVICE_URL", "http://127.0.0.1:10101"),
    service_config={
        "data_dir": os.environ.get("CNBI_DATA_DIR", "/srv/cnbi"),
        # the images users build on; one entry per image, shown in the Lab panel
        "base_images": [
            {
                "image": os.environ.get("CNBI_BASE_IMAGE", "quay.io/jupyter/minimal-notebook:2024-10-07"),
                "displayName": "Minimal notebook",
                "description": "Python and JupyterLab from Jupyter's docker-stacks",
            }
        ],
    },
)
