"""The calibration in memory bounded by the batch, not the data set.

:func:`streamed_lockstep` is :func:`~.passes.lockstep` batch by batch: the ANN and the network
being quantised still run side by side node by node in graph order, but every value between the
nodes is held as one chunk per batch in a :class:`ChunkStore` — in memory up to a cap
(``cache_bytes``), in a temporary file beyond it (as the BRECQ/AdaRound implementations cache one
block's inputs at a time, on disk when they do not fit). Each decision is taken from statistics
accumulated over the chunks, then applied chunk by chunk:

* a ReLU call: the per-channel sums of its input on both sides (the bias correction's means;
  per chunk, added in float64), gathered while that input is produced, and the seeded sample
  subset the threshold search reads (about ``max_values`` values per channel,
  :func:`~.search.sample_subset`), gathered across the chunks;
* a refitted conv/linear layer: the seeded sample subset the refit reads (about ``max_rows``
  output positions, :func:`~.refit.refit_rows`) of its quantised input, the ANN's output and
  the residual partner;
* the output: the per-class sums of the ANN's output minus the quantised network's.

A ReLU call's outputs are not held: once its threshold is chosen, each read of them applies the
ReLU (the ANN's side) or the quantiser (the other) to its input's chunk again
(:class:`LazyStream`) — element-wise work, cheaper than writing the values to the file and
reading them back.

The subsets are the ones the in-memory pass draws (same seeds, same sample count), so the result
is the in-memory pass's up to the summation order of the means. What is held at once: the
store's cap, one batch's values of one node, and the subsets (bounded by ``max_values`` and
``max_rows``, not by the number of samples).

Across processes (a :class:`ChunkLayout` with a process group, under ``torchrun``): every rank
reads the same loader and keeps chunk ``k`` of the pass when ``k mod W`` is its rank, so each
rank runs both networks on its ``1/W`` of the samples; the sums are all-reduced and the subsets
assembled from every rank's rows (other ranks add zeros: the values arrive exactly), so every
rank takes the same decisions, those of one process up to the summation order of the sums.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
from collections.abc import Iterable

import torch
from torch import fx

from ..batches import batch_inputs
from ..distributed import all_reduce_sum, check_same_on_ranks, world_of
from .passes import REFITTABLE, feeds_probe, residual_partner
from .quantiser import Probe, normalise_channel_dim
from .refit import can_refit, refit_rows
from .search import sample_subset

__all__ = ["ChunkStore", "ChunkLayout", "Stream", "streamed_inputs", "streamed_lockstep",
           "check_cache_bytes"]


def check_cache_bytes(value) -> None:
    """Refuse a ``cache_bytes`` that is not a positive integer or ``None``."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or value < 1):
        raise ValueError(f"cache_bytes must be a positive integer (bytes) or None, got {value!r}")


class _Chunk:
    """One batch's value of one graph node: in memory, or in a file of the store's folder."""

    __slots__ = ("value", "path", "shape", "dtype", "device", "nbytes")

    def __init__(self, value=None, path=None, shape=None, dtype=None, device=None, nbytes=0):
        self.value, self.path, self.shape, self.dtype = value, path, shape, dtype
        self.device, self.nbytes = device, nbytes


class ChunkStore:
    """Holds chunks (tensors) in memory while their bytes stay within ``cap`` (``None``: no
    cap), in files of a temporary folder beyond it (read back on use, deleted when freed).

    :param cap: the most bytes of chunks held in memory
    """

    def __init__(self, cap: int | None):
        check_cache_bytes(cap)
        self.cap = cap
        self.in_memory = 0
        self.peak = 0  # the most bytes held in memory at once
        self.spilled = 0  # bytes written to files in all
        self._dir: str | None = None
        self._files = 0

    def put(self, value, what: str = "a value") -> _Chunk:
        """A chunk holding ``value`` (a tensor in memory or in a file; anything else as it is).
        A ``ValueError`` if one tensor is larger than the cap."""
        if not isinstance(value, torch.Tensor):
            return _Chunk(value=value)
        nbytes = value.numel() * value.element_size()
        if self.cap is not None and nbytes > self.cap:
            raise ValueError(
                f"cache_bytes={self.cap} is too small for one batch: {what} takes {nbytes} bytes "
                f"for a batch of {value.shape[0] if value.dim() else 1}; raise cache_bytes (or "
                "pass cache_bytes=None for no cap) or use smaller batches")
        if self.cap is None or self.in_memory + nbytes <= self.cap:
            self.in_memory += nbytes
            self.peak = max(self.peak, self.in_memory)
            return _Chunk(value=value, nbytes=nbytes)
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="tpp-calibration-")
        self._files += 1
        path = os.path.join(self._dir, f"{self._files}.bin")
        flat = value.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
        flat.tofile(path)
        self.spilled += nbytes
        return _Chunk(path=path, shape=tuple(value.shape), dtype=value.dtype,
                      device=value.device, nbytes=nbytes)

    def get(self, chunk: _Chunk):
        """The value of ``chunk`` (read back from its file if it has one)."""
        if chunk.path is None:
            return chunk.value
        # one read into a new tensor: about twice as fast as a private memory map of the file
        # (torch.from_file), whose pages are copied one fault at a time when first touched
        raw = torch.empty(chunk.nbytes, dtype=torch.uint8)
        with open(chunk.path, "rb", buffering=0) as f:
            if f.readinto(memoryview(raw.numpy())) != chunk.nbytes:
                raise OSError(f"the calibration's temporary file {chunk.path!r} was cut short")
        return raw.view(chunk.dtype).reshape(chunk.shape).to(chunk.device)

    def free(self, chunk: _Chunk) -> None:
        """Let go of ``chunk`` (idempotent)."""
        if chunk.path is not None:
            try:
                os.remove(chunk.path)
            except FileNotFoundError:
                pass
            chunk.path = None
        elif chunk.value is not None and chunk.nbytes:
            self.in_memory -= chunk.nbytes
        chunk.value, chunk.nbytes = None, 0

    def close(self) -> None:
        """Delete the temporary folder (and whatever is still in it)."""
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


class Stream:
    """One graph value over all batches: a chunk per batch in ``store``."""

    def __init__(self, store: ChunkStore, watch=None):
        self.store, self.chunks, self.watch = store, [], watch

    def add(self, value, what: str = "a value") -> None:
        if self.watch is not None:
            self.watch(len(self.chunks), value)
        self.chunks.append(self.store.put(value, what))

    def __getitem__(self, b: int):
        return self.store.get(self.chunks[b])

    def in_file(self, b: int) -> bool:
        """Whether chunk ``b`` is in a file (what reads it gets a tensor of its own)."""
        return self.chunks[b].path is not None

    def free_chunk(self, b: int) -> None:
        self.store.free(self.chunks[b])

    def free(self) -> None:
        for chunk in self.chunks:
            self.store.free(chunk)


class _Held:
    """A stream read by ``holders`` lazy streams (:class:`LazyStream`): its chunk ``b`` is
    freed once every holder has let go of it."""

    def __init__(self, stream, holders: int, chunks: int):
        self.stream, self.left = stream, [holders] * chunks

    def release(self, b: int) -> None:
        self.left[b] -= 1
        if self.left[b] == 0:
            self.stream.free_chunk(b)


class LazyStream:
    """A ReLU call's output on one side, computed from its input's chunk each time it is read
    (``fn(b, source)``) instead of held: a calibrated ReLU's output is an element-wise function
    of its input, cheaper to recompute than to write to the store's file and read back. Its
    input (``held``) lives until every lazy stream reading it lets go of each chunk."""

    def __init__(self, held: _Held, fn):
        self.held, self.fn = held, fn
        self.store = held.stream.store
        self.freed = [False] * len(held.left)

    def __getitem__(self, b: int):
        return self.fn(b, self.held.stream)

    def in_file(self, b: int) -> bool:
        return False  # every read computes a new tensor, but nothing else may write to it

    def free_chunk(self, b: int) -> None:
        if not self.freed[b]:
            self.freed[b] = True
            self.held.release(b)

    def free(self) -> None:
        for b in range(len(self.freed)):
            self.free_chunk(b)


def _relu_of(b: int, source) -> torch.Tensor:
    """The ANN's ReLU of chunk ``b`` of ``source`` (in place on a chunk just read from a file,
    which no one else sees)."""
    a = source[b]
    return a.relu_() if source.in_file(b) else torch.relu(a)


def _quantised_by(probe: Probe):
    """``fn(b, source)``: ``probe`` (its threshold chosen) applied to chunk ``b`` of
    ``source``."""
    def apply(b: int, source) -> torch.Tensor:
        a = source[b]
        probe.overwrite = source.in_file(b)  # a chunk just read from its file: overwritten
        try:
            return probe(a)
        finally:
            probe.overwrite = False
    return apply


class ChunkLayout:
    """Which samples of the calibration pass the chunks of this process hold.

    Chunk ``k`` of the whole pass (in the order the samples are read) holds the samples
    ``[lo_k, hi_k)``; with a process group of ``W`` ranks, rank ``r`` holds the chunks with
    ``k mod W == r`` (in one process, all of them). :meth:`rows` takes a chunk's rows of a sample
    subset, :meth:`join` puts the rows of every chunk on every rank together in sample order,
    :meth:`reduce` sums over the ranks.

    :param group: the process group sharing the pass (``None``: this process alone)
    """

    def __init__(self, group=None):
        self.group = group
        self.rank, self.size = world_of(group)
        self.reset()

    def reset(self) -> None:
        """Forget every chunk (the inputs are read again)."""
        self.bounds: list = []  # (lo, hi) of each chunk this process holds
        self.total = 0  # samples of the whole pass
        self.chunks = 0  # chunks of the whole pass

    def take(self, n: int) -> bool:
        """Count the pass's next chunk, of ``n`` samples; whether this process holds it."""
        mine = self.chunks % self.size == self.rank
        if mine:
            self.bounds.append((self.total, self.total + n))
        self.chunks += 1
        self.total += n
        return mine

    def rows(self, idx, b: int, value: torch.Tensor) -> torch.Tensor:
        """The rows of ``value`` (chunk ``b``'s) whose sample index is in ``idx`` (sorted;
        ``None``: all rows)."""
        if idx is None:
            return value
        lo, hi = self.bounds[b]
        local = idx[(idx >= lo) & (idx < hi)] - lo
        return value[local.to(value.device)]

    def join(self, parts: dict, idx) -> torch.Tensor:
        """The rows of a subset (``idx``, sorted; ``None``: every sample), in sample order, from
        ``parts`` (chunk ``b`` → its :meth:`rows`) of every rank: in one process their
        concatenation; across processes each rank's rows in place in a zero tensor, all-reduced
        (the other ranks add zeros: exact)."""
        ordered = [parts[b] for b in sorted(parts)]
        if self.size == 1:
            return torch.cat(ordered)
        first = ordered[0]
        n = self.total if idx is None else idx.numel()
        full = first.new_zeros((n, *first.shape[1:]))
        for b, part in zip(sorted(parts), ordered):
            lo, hi = self.bounds[b]
            if idx is not None:
                lo, hi = (int(torch.searchsorted(idx, v)) for v in (lo, hi))
            full[lo:hi] = part
        return all_reduce_sum(full, self.group, dtype=None).to(first.device)

    def reduce(self, value):
        """``value`` (a number or tensor) summed over the ranks (itself in one process)."""
        if self.size == 1:
            return value
        total = all_reduce_sum(value, self.group, dtype=None)
        return total.to(value.device) if isinstance(value, torch.Tensor) else total.item()

    def check(self, fingerprint: float) -> None:
        """Across processes: refuse a loader that is not the same on every rank (a
        ``ValueError`` on every rank)."""
        if self.size > 1:
            check_same_on_ranks([self.total, self.chunks, fingerprint],
                                "the calibration batches (sample count, chunk count, first "
                                "batch's sum)", self.group)


# ------------------------------------------------------------------------------------------------
# the inputs
# ------------------------------------------------------------------------------------------------
def streamed_inputs(batches: Iterable, device, dtype, max_samples, seed: int, chunk_size: int,
                    store: ChunkStore, group=None) -> tuple:
    """The calibration inputs as a :class:`Stream` of chunks of at most ``chunk_size`` samples:
    every sample of ``batches`` if there are at most ``max_samples``, else the ``max_samples``
    samples (chosen with ``seed``, in their order) the in-memory calibration would choose —
    then ``batches`` is read twice (first to count), so a shuffling loader gives another
    subset. With a process group (``group``), this rank's share of the chunks
    (:class:`ChunkLayout`; every chunk on every rank when there are fewer chunks than ranks);
    every rank must pass the same batches.

    :return: ``(stream, layout)``: the chunks this process holds and their :class:`ChunkLayout`
    :raises ValueError: for no batch, no sample, a batch shaped unlike the first, a non-finite
        input, a loader whose second pass holds another number of samples, or (across
        processes) batches that differ between the ranks
    """
    stream, layout = Stream(store), ChunkLayout(group)

    def emit(x):
        for i in range(0, x.shape[0], chunk_size):
            n = min(chunk_size, x.shape[0] - i)
            if not layout.take(n):
                continue
            part = x[i:i + n].to(device=device, dtype=dtype)
            if part.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
                part = part.clone()  # hold this chunk, not the batch it is a view of
            stream.add(part, "the calibration inputs")

    n, shape, fingerprint = 0, None, 0.0
    for batch in batches:
        x = batch_inputs(batch)  # checked as read by the caller (checks.CheckedBatches)
        if shape is None:
            fingerprint = float(x.sum(dtype=torch.float64))
        shape = tuple(x.shape[1:])
        n += x.shape[0]
        if max_samples is None or n <= max_samples:
            if x.shape[0]:
                emit(x)
        elif layout.chunks:  # more than max_samples: only counting from here on
            stream.free()
            stream.chunks = []
            layout.reset()
    if shape is None:
        raise ValueError("the calibration loader yielded no batch: pass at least one batch of "
                         "inputs (e.g. a DataLoader over some training images)")
    if n == 0:
        raise ValueError("the calibration batches hold no samples")
    if max_samples is None or n <= max_samples:
        return _shared_or_alone(stream, layout, fingerprint, batches, device, dtype,
                                max_samples, seed, chunk_size, store)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_samples]
    wanted = torch.zeros(n, dtype=torch.bool)
    wanted[idx] = True
    seen, pending = 0, []
    for batch in batches:
        x = batch_inputs(batch)
        rows = wanted[seen:seen + x.shape[0]]
        seen += x.shape[0]
        if rows.numel() < x.shape[0]:
            break
        pending.append(x[rows.to(x.device)])
        if sum(p.shape[0] for p in pending) >= chunk_size:
            joined = torch.cat(pending)
            cut = joined.shape[0] - joined.shape[0] % chunk_size
            emit(joined[:cut])
            pending = [joined[cut:].clone()]
    if seen != n:
        raise ValueError(f"the calibration loader yielded {seen} samples on its second pass, "
                         f"{n} on its first: it must yield the same samples each time it is "
                         "iterated (it is read twice when it holds more than max_samples)")
    rest = torch.cat(pending) if pending else None
    if rest is not None and rest.shape[0]:
        emit(rest)
    return _shared_or_alone(stream, layout, fingerprint, batches, device, dtype, max_samples,
                            seed, chunk_size, store)


def _shared_or_alone(stream, layout, fingerprint, *again) -> tuple:
    """``(stream, layout)`` once the batches are checked to be the same on every rank; with
    fewer chunks than ranks (some rank would hold none) the inputs read again for this process
    alone: every rank then calibrates on all of them, to the same result."""
    layout.check(fingerprint)
    if layout.chunks >= layout.size:
        return stream, layout
    stream.free()
    return streamed_inputs(*again, group=None)


# ------------------------------------------------------------------------------------------------
# the pass
# ------------------------------------------------------------------------------------------------
def streamed_lockstep(gm: fx.GraphModule, inputs: Stream, layout: ChunkLayout, calibration,
                      refit: bool) -> None:
    """:func:`~.passes.lockstep` over the chunks of ``inputs`` (see the module docstring).

    ``calibration`` (the calibration's :class:`~.calibrate._LayerByLayer`) takes the
    decisions: ``decide(i, dim, means, a_sub, ann_sub, None)`` per ReLU call, and with
    ``refit``, ``refit(name, module, x_q, z_ann, partner, relu)`` per conv/linear layer whose
    input differs between the two sides (on the gathered subsets), and
    ``output(ann_out, q_out)`` per batch of the output.
    """
    store = inputs.store
    modules = dict(gm.named_modules())
    interp = fx.Interpreter(gm)
    env = ({}, {})
    users_left = {n: len(n.users) for n in gm.graph.nodes}
    nb = len(layout.bounds)
    first = True
    pending = {}  # node -> the _ProbeStats of the ReLU call it feeds, filled as it is produced
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if first:
                stream = inputs
            elif node.args:
                stream = Stream(store)
                for _ in range(nb):
                    stream.add(node.args[0])
            else:
                raise ValueError(
                    f"calibration feeds the model one input; its argument {node.target!r} "
                    "has no default value")
            first = False
            env[0][node] = env[1][node] = stream
            continue
        if node.op == "output":
            for b in range(nb):
                outs = []
                for side in (0, 1):
                    interp.env = {a: env[side][a][b] for a in node.all_input_nodes}
                    outs.append(interp.fetch_args_kwargs_from_env(node)[0][0])
                calibration.output(*outs)
            break
        module = modules.get(node.target) if node.op == "call_module" else None
        last = {a for a in node.all_input_nodes if users_left[a] == 1}
        what = f"the value of {node.name!r}"
        watch = _watchers(calibration, node, modules, layout, pending)
        if isinstance(module, Probe):
            src = node.args[0]
            s_ann, s_q = env[0][src], env[1][src]
            stats = pending.pop(src, None)
            if stats is not None:
                stats.decide()
            else:
                _visit(calibration, module, s_q, s_ann, layout)
            if src in last:  # the input's last user: the outputs read it lazily
                env[0][node], env[1][node] = _lazy_outputs(s_ann, s_q, module, nb)
                for side in (0, 1):
                    env[side].pop(src)  # now owned by the lazy outputs, not freed below
            else:
                out_ann, out_q = Stream(store), Stream(store)  # the input is read again later
                for b in range(nb):
                    a_ann = s_ann[b]
                    out_q.add(module(a_ann if s_q is s_ann else s_q[b]), what)
                    out_ann.add(torch.relu(a_ann), what)
                env[0][node], env[1][node] = out_ann, out_q
        elif (refit and isinstance(module, REFITTABLE) and not node.kwargs
              and len(node.args) == 1 and env[0][node.args[0]] is not env[1][node.args[0]]):
            env[0][node], env[1][node] = _refit_layer(calibration, node, module, env, layout,
                                                      modules, node.args[0] in last, what,
                                                      watch)
        elif all(env[0][a] is env[1][a] for a in node.all_input_nodes):
            out = Stream(store, watch[2])
            for b in range(nb):
                interp.env = {a: env[0][a][b] for a in node.all_input_nodes}
                out.add(interp.run_node(node), what)
                for a in last:
                    env[0][a].free_chunk(b)
            env[0][node] = env[1][node] = out
        else:
            outs = (Stream(store, watch[0]), Stream(store, watch[1]))
            for b in range(nb):
                for side in (0, 1):
                    interp.env = {a: env[side][a][b] for a in node.all_input_nodes}
                    outs[side].add(interp.run_node(node), what)
                for a in last:
                    env[0][a].free_chunk(b)
                    env[1][a].free_chunk(b)
            env[0][node], env[1][node] = outs
        for arg in node.all_input_nodes:
            users_left[arg] -= 1
            if users_left[arg] == 0:
                for side in (0, 1):
                    stream = env[side].pop(arg, None)
                    if stream is not None:
                        stream.free()
        _trim()
    interp.env = {}


def _trim() -> None:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim``; nothing
    elsewhere): chunks of a few tens of MB come and go on the heap, and the resident memory
    otherwise keeps the largest mix of them."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None


class _ProbeStats:
    """What ReLU call ``probe`` is calibrated from, accumulated chunk by chunk as its input is
    produced (:meth:`add`, side 0 the ANN's, 1 the quantised network's): the per-channel sums
    of each side (float64) and the rows of the sample subset the threshold search reads."""

    def __init__(self, calibration, probe: Probe, layout: ChunkLayout):
        self.calibration, self.probe, self.layout = calibration, probe, layout
        self.idx = self.dim = self.others = self.dtype = None
        self.sums, self.counts = [0.0, 0.0], [0, 0]
        self.subs = ({}, {})

    def add(self, side: int, b: int, value: torch.Tensor) -> None:
        o, probe = self.calibration.options, self.probe
        if self.dim is None:
            self.dim = normalise_channel_dim(o.channel_dim, value, f"ReLU call {probe.name!r}")
            self.others = [d for d in range(value.dim()) if d != self.dim]
            per_sample = value[0].numel() // value.shape[self.dim] if self.dim else 0
            self.idx = sample_subset(self.layout.total, per_sample, o.max_values,
                                     o.seed + probe.index)
            self.dtype = value.dtype
        # summed in the value's dtype per chunk (sum(dtype=float64) would copy the chunk in
        # float64), the chunks' sums in float64
        total = value.sum(self.others).double()
        if not bool(torch.isfinite(total).all()) and not bool(torch.isfinite(value).all()):
            where = " in the ANN" if side == 0 else ""
            raise ValueError(
                f"ReLU call {probe.name!r} has non-finite (NaN or infinite) activations"
                f"{where} on the calibration data; check the model's weights and the "
                "calibration inputs")
        self.sums[side] = self.sums[side] + total
        self.counts[side] += value.numel() // value.shape[self.dim]
        self.subs[side][b] = self.layout.rows(self.idx, b, value)

    def decide(self) -> None:
        """Calibrate the call from what was added (every chunk of both sides)."""
        # the quantised network's, then the ANN's (summed over the ranks)
        reduce = self.layout.reduce
        means = [(reduce(s) / reduce(c)).to(self.dtype)
                 for s, c in zip(self.sums[::-1], self.counts[::-1])]
        subs = [self.layout.join(part, self.idx) for part in self.subs]
        self.subs = ({}, {})
        self.calibration.decide(self.probe.index, self.dim, means, subs[1], subs[0], None)


def _lazy_outputs(s_ann, s_q, probe: Probe, nb: int) -> tuple:
    """The ANN's and the quantised network's output streams of ReLU call ``probe`` (decided):
    lazy streams (:class:`LazyStream`) of its input streams ``s_ann`` and ``s_q`` (one stream
    when the two sides share it)."""
    if s_q is s_ann:
        held = _Held(s_ann, 2, nb)
        return LazyStream(held, _relu_of), LazyStream(held, _quantised_by(probe))
    return (LazyStream(_Held(s_ann, 1, nb), _relu_of),
            LazyStream(_Held(s_q, 1, nb), _quantised_by(probe)))


def _visit(calibration, probe: Probe, s_q: Stream, s_ann: Stream, layout: ChunkLayout) -> None:
    """Calibrate ReLU call ``probe`` from its input over all chunks (read once more), when its
    statistics were not gathered while the input was produced."""
    stats = _ProbeStats(calibration, probe, layout)
    for b in range(len(layout.bounds)):
        a = s_q[b]
        a_ann = a if s_ann is s_q else s_ann[b]
        stats.add(1, b, a)
        stats.add(0, b, a_ann)
    stats.decide()


def _watchers(calibration, node, modules, layout, pending) -> tuple:
    """Where ``node``'s chunks go as they are produced — the ANN's, the quantised network's,
    and the one value of both: into the statistics of the ReLU call ``node`` alone feeds
    (kept in ``pending``), else nowhere."""
    if not feeds_probe(node, modules):
        return None, None, None
    stats = _ProbeStats(calibration, modules[next(iter(node.users)).target], layout)
    pending[node] = stats

    def both(b, value):
        stats.add(0, b, value)
        stats.add(1, b, value)

    def ann(b, value):
        stats.add(0, b, value)

    def quantised(b, value):
        stats.add(1, b, value)

    return ann, quantised, both


def _refit_layer(calibration, node, module, env, layout, modules, free_input, what,
                 watch) -> tuple:
    """The streams of a refitted conv/linear layer's output on both sides: the ANN's computed
    while the refit's sample subset is gathered, then the fitted layer applied chunk by chunk."""
    o = calibration.options
    store = env[0][node.args[0]].store
    s_ann, s_q = env[0][node.args[0]], env[1][node.args[0]]
    other = residual_partner(node)
    partner = ((env[0][other], env[1][other])
               if other is not None and other in env[1] else None)
    relu = feeds_probe(node, modules) or (
        partner is not None and feeds_probe(next(iter(node.users)), modules))
    out_ann, out_q = Stream(store, watch[0]), Stream(store, watch[1])
    nb = len(layout.bounds)
    fit = can_refit(module, o.max_features)
    idx, subs = None, ({}, {}, {}, {})
    for b in range(nb):
        z = module(s_ann[b])
        out_ann.add(z, what)
        if free_input:
            s_ann.free_chunk(b)
        if not fit:
            continue
        if b == 0:
            channel_dim = -1 if isinstance(module, torch.nn.Linear) else 1
            idx = refit_rows(layout.total, z[0].numel() // z.shape[channel_dim], o.max_rows,
                             o.seed)
        parts = [s_q, None] + ([] if partner is None else list(partner))
        for k, source in enumerate(parts):
            subs[k][b] = layout.rows(idx, b, z if source is None else source[b])
    fitted = module
    if fit:
        x_q, z_ann = layout.join(subs[0], idx), layout.join(subs[1], idx)
        pair = None if partner is None else (layout.join(subs[2], idx),
                                             layout.join(subs[3], idx))
        fitted = calibration.refit(node.target, module, x_q, z_ann, pair, relu)
        del x_q, z_ann, pair, subs
    for b in range(nb):
        out_q.add(fitted(s_q[b]), what)
        if free_input:
            s_q.free_chunk(b)
    return out_ann, out_q
