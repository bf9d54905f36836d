"""Pure protocol codecs: bytes in, bytes out. No I/O, no asyncio, no ophyd-async.

Each module encodes commands, tells when a reply frame is complete, and decodes
replies into typed values, raising :class:`labctl.devices.errors.ProtocolError`
(garbled) or :class:`~labctl.devices.errors.CommandRejectedError` (refused) with
the raw reply attached.
"""
