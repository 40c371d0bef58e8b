"""searchkd: search how best to distill a teacher into a small student."""

__version__ = "0.1.0"
