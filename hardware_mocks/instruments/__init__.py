"""One module per simulated instrument; each defines a :class:`~hardware_mocks.server.Simulator`."""
