"""stfs: a streaming FUSE file system serving a read-only view of a backing directory."""

__version__ = "0.1.0"
