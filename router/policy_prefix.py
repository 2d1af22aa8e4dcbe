"""Which instance holds which prompt prefix, for the ``prefix_affinity`` policy (pure).

A prompt is cut into blocks (``block`` token ids, or ``4 * block``
characters of a text prompt: about four characters per token) and each block
gets a hash chained over the ones before it, so equal hashes mean equal
prefixes, as in vLLM's automatic prefix caching. The table remembers, for each
block hash, the instance the last request with that prefix went to: the one
whose KV cache most likely still holds it. Bounded, least recently used
blocks go first.
"""

from __future__ import annotations

from collections import OrderedDict

#: Characters per token assumed for text prompts.
CHARS_PER_TOKEN = 4


def prefix_blocks(prompt: str | tuple[int, ...] | list[int], block: int) -> tuple[int, ...]:
    """Chained hashes of the prompt's full blocks (a shorter prompt has none)."""
    if isinstance(prompt, str):
        size, h = block * CHARS_PER_TOKEN, hash("text")
    else:
        size, h = block, hash("tokens")
        prompt = tuple(prompt)
    hashes = []
    for start in range(0, len(prompt) - size + 1, size):
        h = hash((h, prompt[start:start + size]))
        hashes.append(h)
    return tuple(hashes)


class PrefixTable:
    """Block hash -> the instance that last received a prompt with that prefix."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._owner: OrderedDict[int, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._owner)

    def match(self, blocks: tuple[int, ...]) -> dict[str, int]:
        """Instance id -> how many leading blocks of ``blocks`` it holds."""
        held: dict[str, int] = {}
        for depth, h in enumerate(blocks, 1):
            owner = self._owner.get(h)
            if owner is None:
                break
            held[owner] = depth
        return held

    def record(self, blocks: tuple[int, ...], instance_id: str) -> None:
        """The prompt went to ``instance_id``: it now holds every block."""
        for h in blocks:
            self._owner[h] = instance_id
            self._owner.move_to_end(h)
        while len(self._owner) > self.capacity:
            self._owner.popitem(last=False)

    def forget(self, instance_id: str) -> None:
        """The instance left (or restarted): its cache is gone."""
        for h in [h for h, owner in self._owner.items() if owner == instance_id]:
            del self._owner[h]
