"""pefttutor: parameter-efficient finetuning built from scratch, on real models and real data."""

__version__ = "0.1.0"
