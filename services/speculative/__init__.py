"""Speculative decoding (above the engine, below the model services).

``speculator.Speculator`` implements the engine's ``Speculation`` interface;
``state`` holds a sequence's round state and the ``Proposer`` interface,
``remote`` the proposer over a draft service's stream, ``sync`` the
target/draft sync protocol, ``rejection_sampler`` the acceptance rule and
``gamma`` the adaptive gamma. Split after vLLM's proposer / scorer /
rejection sampler; algorithms from Leviathan et al. (2023) and Chen et al. (2023).
"""
