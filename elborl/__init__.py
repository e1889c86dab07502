"""ELBO-RL: policy-gradient RL for flow-matching text-to-image models with an ELBO likelihood."""

__version__ = "0.1.0"
