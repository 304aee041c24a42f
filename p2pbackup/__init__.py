"""p2pbackup: peer-to-peer encrypted, deduplicated, erasure-coded backup.

See docs/architecture.md for the layers and README.md for a quick start.
"""

__version__ = "0.1.0"
