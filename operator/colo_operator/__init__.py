"""colo-operator: the kopf operator that runs ColoVMs on Kubernetes."""

__version__ = "0.1.0"
