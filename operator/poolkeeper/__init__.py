"""poolkeeper: keeps load-balancer target pools in step with instance lifecycle events."""

__version__ = "0.1.0"
GROUP = "poolkeeper.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
