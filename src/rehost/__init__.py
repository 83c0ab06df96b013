"""rehost: move servers and disk images into a cloud or KVM fleet."""

__version__ = "0.1.0"
