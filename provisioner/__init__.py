"""dynvm: dynamic-environment, batch-integrated VM provisioner with high availability."""

__version__ = "0.1.0"
