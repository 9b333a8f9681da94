"""lit-align: alignment objectives as small Lightning modules on one shared backbone."""

__version__ = "0.1.0"
