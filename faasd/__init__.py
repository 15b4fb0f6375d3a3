"""faasd: a self-hosted AWS Lambda for one Linux box.

This module stays import-free: worker processes import `faasd.protocol`
through it and must not pay for the daemon's dependencies.
"""

__version__ = "0.1.0"
