"""What the two model services (target and draft) share: config, lifecycle, codecs.

Layer: above the engine and speculative decoding, below the CLI and tools.
"""
