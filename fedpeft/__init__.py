"""fedpeft: privacy-preserving federated parameter-efficient fine-tuning on Flower."""

__version__ = "0.1.0"
