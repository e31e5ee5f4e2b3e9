"""Where the new blocks of a LLaMA Pro expansion go, and which block each one copies.

One rule, used by both the in-memory `kpro.expand` and the streaming checkpoint expansion:

    interleave  after every N/P original blocks, a copy of the block just before it
                (N=32, P=8: new blocks at 4, 9, 14, ..., 39, copying originals 3, 7, 11, ..., 31)
    top         P copies of the last block, after it (new blocks N ... N+P-1)
    bottom      P copies of the first block, before it (new blocks 0 ... P-1)
"""
from __future__ import annotations

POSITIONS = ("interleave", "top", "bottom")
# New blocks per original block at most: far past any expansion worth its disk (LLaMA Pro adds 1 per 4), and
# what keeps a typo's extra digits (--blocks 99999999999999 --position top) from a layout list that exhausts memory.
MAX_NEW_PER_BLOCK = 1024


def expansion_layout(num_blocks: int, num_new_blocks: int, position: str = "interleave") -> list[tuple[int, bool]]:
    """For each block of the expanded model, in order: (index of the original block it comes from, is it new)."""
    check_expansion(num_blocks, num_new_blocks, position)
    originals = [(i, False) for i in range(num_blocks)]
    if position == "top":
        return originals + [(num_blocks - 1, True)] * num_new_blocks
    if position == "bottom":
        return [(0, True)] * num_new_blocks + originals
    group = num_blocks // num_new_blocks
    layout = []
    for i in range(num_blocks):
        layout.append((i, False))
        if (i + 1) % group == 0:
            layout.append((i, True))
    return layout


def new_block_indices(num_blocks: int, num_new_blocks: int, position: str = "interleave") -> list[int]:
    """Indices of the new blocks in the expanded model (interleave, N=32, P=8: [4, 9, 14, ..., 39])."""
    return [i for i, (_, new) in enumerate(expansion_layout(num_blocks, num_new_blocks, position)) if new]


def check_expansion(num_blocks: int, num_new_blocks, position: str) -> None:
    if position not in POSITIONS:
        raise ValueError(f"unknown expansion position {position!r}; choose from {', '.join(POSITIONS)}")
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks <= 0:
        raise ValueError(f"the number of original blocks must be a positive integer, got {num_blocks!r}")
    if isinstance(num_new_blocks, bool) or not isinstance(num_new_blocks, int) or num_new_blocks <= 0:
        raise ValueError(f"the number of new blocks must be a positive integer, got {num_new_blocks!r}")
    if num_new_blocks > MAX_NEW_PER_BLOCK * num_blocks:
        raise ValueError(f"{num_new_blocks} new blocks are more than {MAX_NEW_PER_BLOCK} times the model's "
                         f"{num_blocks} blocks ({MAX_NEW_PER_BLOCK * num_blocks} at most): check the number of new "
                         "blocks")
    if position == "interleave" and num_blocks % num_new_blocks:
        divisors = [p for p in range(1, num_blocks + 1) if num_blocks % p == 0]
        raise ValueError(f"interleave needs the number of new blocks to divide the {num_blocks} original blocks; "
                         f"{num_new_blocks} does not (choose one of {', '.join(map(str, divisors))}, "
                         "or position 'top' or 'bottom')")
