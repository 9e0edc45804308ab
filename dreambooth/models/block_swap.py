"""Block swap (``blocks_to_swap``): only some of a transformer's blocks on the GPU at a time, the
others' frozen weights in (pinned) host memory, copied in ahead of their turn on a stream of
their own while the GPU computes the block before — the technique of kohya's ``blocks_to_swap``
and OneTrainer's layer offload. Flux.1's 57 blocks hold 99 % of its 11.9 B weights, so swapping
S of them saves S/57 of the base on the card.

A model may run its blocks as several chains one after another (Flux: 19 double-stream blocks,
then 38 single-stream ones of less than half the size); each chain is swapped on its own
(:func:`install` shares the blocks to swap out over the chains by their length, as kohya counts
Flux's single blocks as half blocks), so the card holds a few blocks of each kind.

The schedule, per chain. Of K blocks, R = K − S are resident. A forward pass runs blocks 0 … K−1, and its
backward (gradient checkpointing recomputes each block as the backward reaches it) runs them
again K−1 … 0. Before block i runs, the resident window is the R blocks from i on (forward) or
the R blocks up to i (backward), kept inside 0 … K−1: blocks outside it are dropped (they are
done with for this pass), blocks inside it and not yet here are copied in (prefetched), and the
GPU waits for block i's copy only. At rest — before each forward — the window is 0 … R−1. So at
most R blocks' weights are on the card, and each swapped block is copied in twice per step
(forward and backward).

Why it is correct. The frozen weights never change, so a block is dropped by pointing its
tensors at empty ones (nothing is copied back) and brought in by pointing them at a device copy
of the host tensor. Gradient checkpointing is required (refused without it): without it autograd
would keep each block's weights for the backward; with it the recomputed block's saved tensors
alias the storage they were computed with, so a block dropped before a late part of its backward
has run keeps that storage alive until then. On CUDA each copy is made on the copy stream and
recorded on the compute stream, so the allocator does not reuse its memory while the GPU still
reads it. A block used while it is dropped fails loudly (an empty weight), which the CPU tests
rely on: on the CPU the "device copy" is the host tensor itself.
"""
from __future__ import annotations

import torch


def swappable_tensors(block: torch.nn.Module) -> list[torch.Tensor]:
    """The block's frozen parameters and its buffers: what is swapped (anything that trains, an
    adapter's weights inside the block, stays on the device)."""
    params = [p for p in block.parameters() if not p.requires_grad]
    return params + list(block.buffers())


def window(position: int, resident: int, count: int, backward: bool) -> range:
    """The blocks that should be on the device while block ``position`` runs: ``resident`` of
    them from ``position`` on (forward) or up to it (backward), kept inside 0 … count−1."""
    if backward:
        first = max(position - resident + 1, 0)
    else:
        first = min(position, count - resident)
    return range(first, first + resident)


def to_device_but(model: torch.nn.Module, blocks: list[torch.nn.Module], device) -> None:
    """``model`` on ``device`` but for ``blocks`` (and what is inside them), left where they are
    for :func:`install`."""
    left = {id(m) for block in blocks for m in block.modules()}
    for module in model.modules():
        if id(module) not in left:
            for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
                tensor.data = tensor.data.to(device)


def split_swapped(swapped: int, lengths: list[int]) -> list[int]:
    """How many blocks of each chain (of ``lengths``) are swapped for ``swapped`` in all: in
    proportion to the chains' lengths, each chain keeping at least one block resident."""
    if not 0 < swapped <= sum(lengths) - len(lengths):
        raise ValueError(f"blocks_to_swap must be between 1 and {sum(lengths) - len(lengths)} "
                         f"for this model (got {swapped})")
    counts = [min(n - 1, swapped * n // sum(lengths)) for n in lengths]
    while sum(counts) < swapped:  # what rounding left, to the chain with the most room
        room = [n - 1 - c for n, c in zip(lengths, counts)]
        counts[room.index(max(room))] += 1
    return counts


def install(model: torch.nn.Module, chains: list[list[torch.nn.Module]], swapped: int, device,
            trace: list | None = None) -> list["BlockSwap"]:
    """Swap ``swapped`` of the blocks of ``chains`` (each a list of blocks in the order they
    run; all still on the host); a chain with none to swap goes to ``device`` whole."""
    swaps = []
    for chain, count in zip(chains, split_swapped(swapped, [len(c) for c in chains])):
        if count:
            swaps.append(BlockSwap(model, chain, count, device, trace=trace))
        else:
            for block in chain:
                block.to(device)
    return swaps


class BlockSwap:
    """Keeps ``len(blocks) - swapped`` of ``model``'s ``blocks`` (in the order they run) on
    ``device``; :meth:`close` gives every block its weights back on the host. ``trace`` (for
    tests and the bench) records ("load" | "drop", block index) and ("run", block index, the
    resident blocks) as they happen."""

    def __init__(self, model: torch.nn.Module, blocks: list[torch.nn.Module], swapped: int,
                 device, *, trace: list | None = None):
        count = len(blocks)
        if not 0 < swapped < count:
            raise ValueError(f"blocks_to_swap must be between 1 and {count - 1} for a model of "
                             f"{count} blocks (got {swapped})")
        self.blocks, self.count, self.resident_count = blocks, count, count - swapped
        self.device = torch.device(device)
        self.trace = trace
        self.backward = False
        cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if cuda else None
        # Blocks that ever leave: those dropped in the forward (0 … S−1) and those not resident
        # at rest (R … K−1); with S < R the middle ones stay on the device throughout.
        self.moving = sorted(set(range(swapped)) | set(range(self.resident_count, count)))
        self.host: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for index, block in enumerate(blocks):
            if index not in self.moving:
                block.to(self.device)
                continue
            self.host[index] = [(t, t.data.pin_memory() if cuda else t.data)
                                for t in swappable_tensors(block)]
            for tensor in block.parameters():  # what trains inside a moving block stays here
                if tensor.requires_grad:
                    tensor.data = tensor.data.to(self.device)
        self.here: set[int] = set(range(count)) - set(self.moving)  # resident now
        self.pending: dict[int, list[torch.Tensor]] = {}  # copied in, not yet waited for
        self.events: dict[int, torch.cuda.Event] = {}
        for index in self.moving:
            self._drop(index)
        self._arrange(window(0, self.resident_count, count, backward=False))
        self.handles = [model.register_forward_pre_hook(self._model_starts),
                        model.register_forward_hook(self._model_ends)]
        for index, block in enumerate(blocks):
            self.handles.append(block.register_forward_pre_hook(self._before_block(index)))

    # -- the hooks ------------------------------------------------------------------------
    def _model_starts(self, module, args) -> None:
        self.backward = False  # a new forward pass (whatever the last one left) starts at 0
        self._arrange(window(0, self.resident_count, self.count, backward=False))

    def _model_ends(self, module, args, output) -> None:
        self.backward = True  # any block run from now on is a recomputation in the backward

    def _before_block(self, index: int):
        def hook(module, args) -> None:
            self._arrange(window(index, self.resident_count, self.count, self.backward))
            self._wait(index)
            if self.trace is not None:
                self.trace.append(("run", index, self.resident()))
        return hook

    # -- moving weights -------------------------------------------------------------------
    def _arrange(self, wanted: range) -> None:
        """Drop the moving blocks outside ``wanted``, then start copying in those inside it."""
        for index in sorted(self.here - set(wanted)):
            if index in self.host:
                self._drop(index)
        for index in wanted:
            if index not in self.here:
                self._load(index)

    def _drop(self, index: int) -> None:
        for tensor, host in self.host[index]:
            tensor.data = torch.empty(0, dtype=host.dtype, device=self.device)
        self.here.discard(index)
        self.pending.pop(index, None)
        self.events.pop(index, None)
        if self.trace is not None:
            self.trace.append(("drop", index))

    def _load(self, index: int) -> None:
        if self.copy_stream is None:  # the CPU: the host tensors are the device's
            for tensor, host in self.host[index]:
                tensor.data = host
        else:
            # Not ordered after the compute stream (that would forbid the overlap): the copy
            # reads pinned host memory and writes memory of the copy stream's own pool.
            copies = []
            with torch.cuda.stream(self.copy_stream):
                for tensor, host in self.host[index]:
                    tensor.data = host.to(self.device, non_blocking=True)
                    copies.append(tensor.data)
                event = torch.cuda.Event()
                event.record(self.copy_stream)
            self.pending[index], self.events[index] = copies, event
        self.here.add(index)
        if self.trace is not None:
            self.trace.append(("load", index))

    def _wait(self, index: int) -> None:
        """Block ``index`` is on the device, its copy finished before the GPU computes with it."""
        if index not in self.here:
            self._load(index)
        copies = self.pending.pop(index, None)
        if copies is None:
            return
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(self.events.pop(index))
        for tensor in copies:  # freed later, the memory waits for the compute stream's use
            tensor.record_stream(compute)

    def resident(self) -> list[int]:
        """The blocks whose weights are on the device now."""
        return sorted(self.here)

    def close(self) -> None:
        """Hooks removed; every moving block's weights back in host memory (the model whole on
        the CPU side for its blocks, as the run's release expects)."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
        if self.copy_stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
        for index, tensors in self.host.items():
            for tensor, host in tensors:
                tensor.data = host
        self.here = set(range(self.count))
        self.pending.clear()
        self.events.clear()
