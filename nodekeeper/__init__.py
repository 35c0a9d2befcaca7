"""nodekeeper: a CRI image service in front of containerd that keeps pods starting when
their registry does not answer."""

__version__ = "0.1.0"
