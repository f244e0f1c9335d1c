"""The cnbi JupyterHub service (REST + Server-Sent Events)."""
