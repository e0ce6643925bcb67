"""hsflow: HS-code recommendation from product photos."""
__version__ = "0.1.0"
