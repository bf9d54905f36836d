"""labctl: closed-loop electrolyte discovery for battery labs."""

__version__ = "0.1.0"
