"""Technique 2: layer checkpointing with disk offload, weight streaming and selective caching.

Plain training keeps every activation that backward needs; for Llama-3.2 3B that is ~180 KiB
per token per layer, 5 GiB per 1024 tokens. Checkpointing keeps only each decoder layer's
input (T x D: 12 KiB per token per layer) and recomputes the layer in backward:

    forward:  h_{i+1} = layer_i(h_i) under no_grad;  store.put(h_i)
    backward: h_i = store.get();  recompute layer_i(h_i) with grad;  back-propagate g_{i+1}

which is the same arithmetic, so loss and gradients are bit-identical to no checkpointing.
Going further, as Table 1's `+ Checkpointing` row implies, the layer inputs leave the device
(`lowmem.offload`: disk by default) and each layer's quantized weights live in a safetensors
file that is read only while that layer runs forward or recomputes (weight streaming). With
both, nothing per layer is resident when the LM head and loss hit the peak: Llama at 2048
tokens keeps 28 x 2048 x 3072 x 4 B = 0.66 GiB of inputs and 1.62 GiB of INT4 layer weights
off the device.

Backward reads layer i - 1's input and weights while layer i runs (`prefetch`): a double
buffer of one T x D input and one layer's INT4 weights (63 MB on Llama). `best` turns it off,
reading each when its layer starts, and streams the tied embedding / LM head as well
(`lowmem.vocab_stream`). The recompute's output only roots the layer's backward, so its
T x D values are freed before that backward starts (autograd runs from its graph node), and a
tiled MLP does not compute them at all (the layer's tiles, `lowmem.tiled_mlp`, are told so
for the recompute). A layer's MLP weights are released as soon as the MLP's backward is done:
the attention backward that follows runs without them (45 MiB of INT4 codes and scales on
Llama); with the MLP-first backward (best) the forward releases the attention's weights once
the attention has run, and the MLP's before the layer's last residual add.
Weights move only through `lowmem.weights.StreamedWeights` (one store entry a layer).

The MLP's backward first (`mlp_first`, beyond the paper; best with disk offload). A decoder
layer is out = h + mlp(norm(h)) with h = x + attention(x). Recomputing it whole and running
autograd keeps the attention's saved tensors (x, norm(x) for the LoRA A gradients, q, the
attention output: four T x D on Llama) alive through the MLP's backward, which itself holds h,
its gradient and the layer output's gradient g: seven T x D where `best` peaked at 1024-4096
tokens. But the MLP's output feeds only the residual add, so its gradient is g, known before
any recompute, and dh = g + J_mlp(h)^T g needs only h and g. With a tiled MLP
(`lowmem.tiled_mlp`) the backward therefore runs in two phases:

    1. dh from h and g, tile by tile ("store": h was kept in the store by the forward, one
       more T x D written and read per layer; "recompute": h from a recompute of the layer
       under no_grad, one more attention forward per layer), written into g's own buffer
       where autograd handed g to this backward alone (`lowmem.tiled_mlp.sole_owner`: the
       engine holds g until the layer's backward returns, so a separate dh would be one more
       T x D through phase 2), else over h;
    2. recompute the attention with grad (the tiles only note h's graph node) and back-
       propagate dh from h.

Phase 1 holds h and g / dh (and x with "recompute"); phase 2 holds what the attention's
backward held before, less one T x D (dh is g). With `attention_rows` (best from 4096 tokens)
phase 2 is `lowmem.attention_rows`: the attention half recomputed and back-propagated a block
of query rows at a time, K and V whole, dx written into dh's buffer, and the layer's forward
runs its attention in the same blocks. Loss and gradients are bit-identical (the
same sums in the same order). Llama-3.2 3B, best, simulated: 0.256 -> 0.190 GiB at 1024
tokens, 0.347 -> 0.258 at 2048 (0.248 with `lowmem.rope`'s per-head RoPE, the forward then
holding the peak), 0.933 -> 0.840 at 8192 (experiments/LOG.md, session 8).

Selective activation caching (`cache_policy`) names frozen linear layers whose outputs are kept
in the store during forward; the recompute then reads them instead of running those matmuls,
and their input gradient is grad_y W, which needs the weight, not the activation
(`lowmem.weights.frozen_matmul` with the cached y). Any frozen layer with a
`lowmem.weights.FrozenWeight` is streamed and can be cached. Policies:
"none", "attention" (q, k, v, o projections), "mlp" (gate, up, down), "all_linear".
"""

from __future__ import annotations

import contextlib
import time
import weakref
from functools import partial

import torch

from lowmem.architectures import Architecture
from lowmem.attention_rows import AttentionRows
from lowmem.models import architecture_of, base_model
from lowmem.offload import make_store, reclaim
from lowmem.rng import replayed_rng, saved_rng
from lowmem.tiled_mlp import tiles_of
from lowmem.vocab_stream import stream_vocab
from lowmem.weights import FrozenWeight, StreamedWeights, frozen_matmul

POLICIES = {
    "none": (),
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
    "all_linear": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}


MLP_FIRST = ("off", "recompute", "store")


class Checkpointing:
    """Shared state of one model's checkpointed layers: stores, mode, counters."""

    def __init__(
        self, offload, meter, stream_weights, root=None, async_writes=True, prefetch=True
    ) -> None:
        # folders of killed runs under this root go first, under any offload and meter (a
        # listing of the root); a disk store then checks the root and refuses a bad one
        reclaim(root)
        self.store = make_store(offload, meter, root, async_writes)  # inputs, cached outputs
        self.weights = make_store(offload, meter, root, async_writes) if stream_weights else None
        self.prefetch = prefetch  # read layer i - 1 while layer i runs backward (double buffer)
        # "record" during checkpointed forward, "replay" during recompute, "peek" during a
        # recompute under no_grad that a replay follows (a layer's MLP-first backward)
        self.mode = "plain"
        self.recompute_s = 0.0
        self.layers: list[CheckpointedLayer] = []

    def stats(self) -> dict:
        out = {"recompute_s": self.recompute_s}
        for name, store in (("activations", self.store), ("weights", self.weights)):
            if store is not None:
                out.update({f"{name}_{k}": v for k, v in store.stats.items()})
        return out

    def close(self) -> None:
        for store in (self.store, self.weights):
            if store is not None:
                store.close()


class CheckpointedLayer:
    """Takes over a decoder layer's `forward`: same call, checkpointed (and streamed) underneath.

    The layer stays where it is, so parameter names (and saved adapters) do not change.
    """

    def __init__(
        self,
        layer: torch.nn.Module,
        index: int,
        state: Checkpointing,
        arch: Architecture,
        mlp_first: str = "off",
        attention_rows: int = 0,
    ) -> None:
        self.layer, self.index, self.mlp_first = layer, index, mlp_first
        self.inner_forward = layer.forward
        self._state = weakref.ref(state)  # the model owns the state, not the other way round
        self.tiles = tiles_of(layer, arch)  # its tiled MLP, told when its output is unused
        self.weights = None  # the frozen weights, in the weight store between uses
        if state.weights is not None:
            frozen = {n: m for n, m in layer.named_modules() if isinstance(m, FrozenWeight)}
            self.weights = StreamedWeights(frozen, state.weights, f"w{index}")
        self.rows = None  # the attention half in blocks of query rows (lowmem.attention_rows)
        if attention_rows:
            self.rows = AttentionRows(layer, arch.attention, attention_rows)
            self.rows.install()
            covered = {id(p) for p in (*self.tiles.params, *self.rows.params)}
            other = [
                n for n, p in layer.named_parameters() if p.requires_grad and id(p) not in covered
            ]
            if other:
                raise ValueError(
                    f"bad attention_rows={attention_rows} for a layer with trainable {other[0]} "
                    "outside its attention, input norm and tiled MLP: must be 0"
                )
        self.mlp_name = mlp = arch.mlp  # its streamed weights are released after its backward
        # (by a hook on the MLP input's gradient; the MLP-first backward releases them itself)
        streams_mlp = self.weights is not None and mlp_first == "off"
        if streams_mlp and any(n.startswith(f"{mlp}.") for n in self.weights.weights):
            layer.get_submodule(mlp).register_forward_pre_hook(self._release_mlp_after_its_backward)
        if self.weights is not None and mlp_first != "off":  # (best; the paper rows keep them)
            for part in (arch.attention, mlp):  # each part's weights go once its forward ran
                hook = partial(self._release_after_forward, f"{part}.")
                layer.get_submodule(part).register_forward_hook(hook)
        layer.forward = self.forward
        layer.lowmem_checkpoint = self

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        params = [p for p in self.layer.parameters() if p.requires_grad]
        return _LayerCheckpoint.apply(hidden_states, (self, kwargs), *params)

    def load_weights(self) -> None:
        if self.weights is not None:
            self.weights.load()

    def unload_weights(self, prefix: str = "") -> None:
        if self.weights is not None:
            self.weights.release(prefix)

    def outputs_unused(self):
        """For the recompute: its tiled MLP need not compute values nobody reads."""
        return contextlib.nullcontext() if self.tiles is None else self.tiles.values_unused()

    def _release_after_forward(self, prefix: str, module, args, output) -> None:
        # in the checkpointed forward nothing after a part reads its weights (Llama-3.2 3B:
        # 16 MiB for q, k, v, o, 45 MiB for the MLP); a recompute keeps them for its backward
        if self._state().mode == "record":
            self.unload_weights(prefix)

    def _release_mlp_after_its_backward(self, mlp, args) -> None:
        # the MLP input's gradient is complete once every MLP node has run backward
        x = args[0]
        if self._state().mode == "replay" and x.requires_grad:
            x.register_hook(lambda grad: self.unload_weights(f"{self.mlp_name}."))


class _LayerCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, call, *params):
        wrapper, kwargs = call
        state = wrapper._state()
        ctx.call, ctx.hidden_requires_grad = call, hidden.requires_grad
        ctx.rng = saved_rng(wrapper.layer, hidden.device)
        state.store.put(f"h{wrapper.index}", {"h": hidden})
        _prefetch_weights(state, wrapper.index + 1)
        keep = contextlib.nullcontext()
        if wrapper.mlp_first == "store":  # the MLP input waits in the store for backward
            keep = wrapper.tiles.intercepted(partial(_keep_mlp_input, ctx, wrapper))
        with torch.no_grad(), _mode(state, "record"), _weights_of(wrapper), keep:
            return wrapper.inner_forward(hidden, **kwargs)

    @staticmethod
    def backward(ctx, grad_out):
        wrapper, kwargs = ctx.call
        params = [p for p in wrapper.layer.parameters() if p.requires_grad]
        # the weights stay loaded through this layer's backward (a tiled MLP recomputes there)
        with _weights_of(wrapper):
            if wrapper.mlp_first == "off":
                grads = _backward(ctx, wrapper, kwargs, params, grad_out)
            else:
                grads = _backward_mlp_first(ctx, wrapper, kwargs, params, grad_out)
        grad_hidden = grads.pop(0) if ctx.hidden_requires_grad else None
        return (grad_hidden, None, *grads)


def _layer_input(ctx, state: Checkpointing, i: int) -> torch.Tensor:
    """Layer i's input, read back from the store (and layer i - 1's asked for, with prefetch)."""
    hidden = state.store.get(f"h{i}")["h"].detach().requires_grad_(ctx.hidden_requires_grad)
    if i > 0 and state.prefetch:
        state.store.prefetch(f"h{i - 1}")
    _prefetch_weights(state, i - 1)
    return hidden


def _backward(ctx, wrapper, kwargs, params, grad_out) -> list:
    """Recompute the layer with grad and back-propagate grad_out through it."""
    state = wrapper._state()
    hidden = _layer_input(ctx, state, wrapper.index)
    start = time.perf_counter()
    inputs = ([hidden] if ctx.hidden_requires_grad else []) + params
    with torch.enable_grad(), _mode(state, "replay"), replayed_rng(ctx.rng):
        with wrapper.outputs_unused():
            out = wrapper.inner_forward(hidden, **kwargs)
    state.recompute_s += time.perf_counter() - start
    # back-propagate from out's graph node, not from out: its T x D values are not needed, so
    # they are freed before the layer's backward starts
    edge = torch.autograd.graph.get_gradient_edge(out)
    del out
    return list(torch.autograd.grad(edge, inputs, grad_out))


def _keep_mlp_input(ctx, wrapper: CheckpointedLayer, h: torch.Tensor) -> torch.Tensor:
    """In forward, for mlp_first="store": the MLP input h waits in the store for backward."""
    ctx.mlp_rng = saved_rng(wrapper.tiles.rng_module, h.device)
    wrapper._state().store.put(f"m{wrapper.index}", {"h": h})
    return wrapper.tiles.values(h)


def _zeros_like(h: torch.Tensor) -> torch.Tensor:
    return h.new_zeros(()).expand_as(h)  # the layer adds it to h: its values are never read


def _backward_mlp_first(ctx, wrapper, kwargs, params, grad_out) -> list:
    """The layer's gradients with the MLP's backward done before the attention is recomputed
    with grad (the module docstring): dh from the stored MLP input ("store") or from a
    recompute under no_grad ("recompute"; "peek": cached outputs stay for the replay), then the
    attention's recompute and its backward from dh."""
    state, tiles, i = wrapper._state(), wrapper.tiles, wrapper.index
    start = time.perf_counter()
    first: dict = {}
    if wrapper.mlp_first == "store":
        if state.prefetch:
            state.store.prefetch(f"h{i}")
        h = state.store.get(f"m{i}")["h"]
        with replayed_rng(ctx.mlp_rng):
            first["grads"] = tiles.backward_first(h, grad_out)
        del h
        hidden = _layer_input(ctx, state, i)
        if i > 0 and state.prefetch:
            state.store.prefetch(f"m{i - 1}")
        backward_s = time.perf_counter() - start
    else:
        hidden = _layer_input(ctx, state, i)

        def mlp_backward(h):
            begin = time.perf_counter()
            first["grads"] = tiles.backward_first(h, grad_out, keep=hidden)
            first["s"] = time.perf_counter() - begin
            return _zeros_like(h)

        with torch.no_grad(), _mode(state, "peek"), replayed_rng(ctx.rng):
            with tiles.intercepted(mlp_backward):
                wrapper.inner_forward(hidden, **kwargs)
        backward_s = first["s"]
    grad_h, mlp_grads = first["grads"]
    wrapper.unload_weights(f"{wrapper.mlp_name}.")  # the attention runs without them
    ours = {id(p) for p in tiles.params}
    inputs = ([hidden] if ctx.hidden_requires_grad else []) + params
    mlp_grads = iter(mlp_grads)
    if wrapper.rows is not None:  # its recompute is inside its backward (not in recompute_s)
        attention = wrapper.rows.backward(hidden, grad_h, kwargs)  # dx into grad_h
        return [
            next(mlp_grads) if id(t) in ours else grad_h if t is hidden else attention.get(id(t))
            for t in inputs
        ]
    rest = [t for t in inputs if id(t) not in ours]  # the attention's parameters, the input
    grads = iter(())
    if rest:
        captured = []

        def capture(h):
            captured.append(h)
            return _zeros_like(h)

        with torch.enable_grad(), _mode(state, "replay"), replayed_rng(ctx.rng):
            with tiles.intercepted(capture):
                wrapper.inner_forward(hidden, **kwargs)  # its T x D output is freed at once
        edge = torch.autograd.graph.get_gradient_edge(captured.pop())
    state.recompute_s += time.perf_counter() - start - backward_s
    if rest:
        grads = iter(torch.autograd.grad(edge, rest, grad_h))
    return [next(mlp_grads) if id(t) in ours else next(grads) for t in inputs]


class _mode:
    def __init__(self, state: Checkpointing, mode: str) -> None:
        self.state, self.mode = state, mode

    def __enter__(self):
        self.previous, self.state.mode = self.state.mode, self.mode

    def __exit__(self, *exc):
        self.state.mode = self.previous


class _weights_of:
    """Load a layer's streamed weights for the block; the autograd graph keeps what it saved."""

    def __init__(self, wrapper: CheckpointedLayer) -> None:
        self.wrapper = wrapper

    def __enter__(self):
        self.wrapper.load_weights()

    def __exit__(self, *exc):
        self.wrapper.unload_weights()


def _prefetch_weights(state: Checkpointing, index: int) -> None:
    if state.prefetch and state.weights is not None and 0 <= index < len(state.layers):
        state.layers[index].weights.prefetch()


class CachedLinear(torch.nn.Module):
    """A frozen linear (with a `frozen` weight) whose output is recorded in forward and
    replayed in the recompute; backward is grad_y W from the weight."""

    def __init__(self, inner: torch.nn.Module, key: str, state: Checkpointing) -> None:
        super().__init__()
        self.inner, self.key, self._state = inner, key, weakref.ref(state)
        self.in_features, self.out_features = inner.in_features, inner.out_features

    @property
    def frozen(self) -> FrozenWeight:
        return self.inner.frozen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self._state()
        if state.mode == "record":
            y = self.inner(x)
            state.store.put(self.key, {"y": y})
            return y
        if state.mode in ("replay", "peek"):  # a peek is followed by a replay
            y = state.store.get(self.key, keep=state.mode == "peek")["y"]
            chunk = getattr(self.inner, "chunk", 0)
            return frozen_matmul(x, self.inner.frozen, chunk, cached=y)
        return self.inner(x)


def apply_checkpoint(
    model: torch.nn.Module,
    offload: str = "disk",
    stream_weights: bool = True,
    cache_policy: str = "none",
    meter: str = "cpu",
    offload_dir: str | None = None,
    async_writes: bool = True,
    prefetch: bool = True,
    vocab_chunk: int = 0,
    mlp_first: str = "off",
    attention_rows: int = 0,
) -> Checkpointing:
    """Checkpoint every decoder layer of a (peft) Hugging Face causal LM, in place.

    prefetch=False reads each layer's input and weights only when its backward starts (no
    second layer on the device); vocab_chunk > 0 also streams the quantized embedding / LM head
    in chunks of that many rows (`lowmem.vocab_stream`; needs stream_weights).

    Comes last (as in `lowmem.stack.apply_stack`): the layers it finds are the ones it streams
    and caches, so quantize and tile first; `apply_quantize` and `apply_tiled_mlp` refuse a
    checkpointed model.

    mlp_first ("off", "recompute", "store": MLP_FIRST) runs each layer's tiled MLP backward
    before its attention is recomputed with grad (the module docstring); every layer must then
    have a tiled MLP that feeds only the residual add. attention_rows > 0 (with mlp_first on)
    runs each layer's attention half in blocks of that many query rows, forward and backward
    (`lowmem.attention_rows`); cache_policy must then be "none".
    """
    if cache_policy not in POLICIES:
        raise ValueError(f"bad cache_policy={cache_policy!r}: must be one of {tuple(POLICIES)}")
    if mlp_first not in MLP_FIRST:
        raise ValueError(f"bad mlp_first={mlp_first!r}: must be one of {MLP_FIRST}")
    if attention_rows and (mlp_first == "off" or cache_policy != "none"):
        raise ValueError(
            f"bad attention_rows={attention_rows!r} with mlp_first={mlp_first!r}, "
            f"cache_policy={cache_policy!r}: must be 0 unless mlp_first is on and nothing is cached"
        )
    arch = architecture_of(model)
    base = base_model(model)
    layers = arch.decoder_layers(base)
    for layer in layers if mlp_first != "off" else ():
        tiles = tiles_of(layer, arch)
        if tiles is None or not tiles.skippable:
            why = "not tiled (apply_tiled_mlp first)" if tiles is None else "not residual-only"
            raise ValueError(
                f"bad mlp_first={mlp_first!r} for a {type(layer).__name__} whose MLP is {why}: "
                "must be 'off'"
            )
    state = Checkpointing(offload, meter, stream_weights, offload_dir, async_writes, prefetch)
    weakref.finalize(base, state.close)  # files go when the model goes, or at exit
    for i, layer in enumerate(layers):
        _wrap_cached_linears(layer, i, POLICIES[cache_policy], state)
        state.layers.append(CheckpointedLayer(layer, i, state, arch, mlp_first, attention_rows))
    if vocab_chunk and state.weights is not None:
        stream_vocab(model, state.weights, vocab_chunk)
    base.lowmem_checkpointing = state
    base.config.use_cache = False  # as transformers does under gradient checkpointing: a KV
    # cache would keep every layer's K and V (2 x 1024 floats per token per layer on Llama)
    return state


def checkpointing_of(model: torch.nn.Module) -> Checkpointing | None:
    """The Checkpointing state of a model that `apply_checkpoint` changed, else None."""
    base = base_model(model)
    return getattr(base, "lowmem_checkpointing", None)


def _wrap_cached_linears(layer, index, names, state) -> None:
    for name, module in list(layer.named_modules()):
        leaf = name.rpartition(".")[2]
        parent_name = name.rpartition(".")[0]
        if isinstance(getattr(module, "frozen", None), FrozenWeight) and (
            leaf in names or (leaf == "base_layer" and parent_name.rpartition(".")[2] in names)
        ):
            setattr(
                layer.get_submodule(parent_name),
                leaf,
                CachedLinear(module, f"a{index}.{name}", state),
            )
