"""The engine layer: continuous batching of one model (above services.common).

Pure of gRPC and of speculative decoding: speculation plugs in through
:mod:`services.engine.speculation`. One engine thread owns every object here
unless a docstring says otherwise.
"""
