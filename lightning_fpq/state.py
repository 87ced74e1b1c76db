"""``QuantState``: the one owner of the mutable state of quantized training.

Every ``QuantLinear`` of a model holds the same ``QuantState`` and asks it, at each call, for
its ``LayerSpec``, its backend and its stochastic-rounding generator. Everything that changes
during a run lives here and nowhere else:

- the active recipe, and the spec each registered layer resolves to under it;
- the backend chosen for each layer and device, and one history entry per recipe stage;
- the stochastic-rounding generators (one per layer and device, ``torch`` or ``philox``);
- the listeners of the *switch event*: ``set_recipe`` with a different recipe tells each of
  them ``(old, new)`` (the precision plugin converts and logs there; callbacks can listen too).

Lookups are one dict read, and the dicts are replaced rather than updated in place, so a
``torch.compile``'d model guards on a constant and recompiles once after a switch. This module
knows recipes and backends, nothing of Lightning.
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Optional, Union

import torch

from . import _config, backends
from .philox import NoiseGenerator, PhiloxGenerator
from .recipe import QuantRecipe, clean_module_name
from .spec import LayerSpec

SwitchListener = Callable[[QuantRecipe, QuantRecipe], None]
RNG_KINDS = ("torch", "philox")
"""The kinds of stochastic-rounding generator (``QuantState(rng=...)``)."""
_MISSING = object()


class QuantState:
    """The active recipe and everything derived from it, shared by every ``QuantLinear``.

    Args:
        recipe: the initial recipe (a ``QuantRecipe``, a name or a YAML path).
        backend: "auto" or a layer backend of :mod:`lightning_fpq.backends` ("emulated",
            "compiled", "triton", "torchao_float8", "transformer_engine"); a forced backend
            this machine cannot run raises ``backends.BackendUnavailableError``.
        seed: base seed of the stochastic-rounding generators (one per layer and device,
            seeded from ``seed``, ``rank`` and the layer's name); ``None`` takes
            ``torch.initial_seed()`` when the first generator is made.
        rng: what the generators are. "torch": ``torch.Generator``s whose ``torch.rand`` draws
            every backend reads as a float32 tensor (one per stochastically rounded operand).
            "philox": counter-based ``PhiloxGenerator``s (``lightning_fpq.philox``, the stream
            of Triton's ``tl.rand4x``): the Triton kernels and the compiled quantizer compute
            the draws where they use them and no noise tensor is written or read; the
            reference computes the same draws in torch. Either way every backend rounds
            identically; the two streams differ from each other.
        rank: mixed into the seed so that data-parallel ranks draw different noise.
        save_quantized_weight: save q4(W) for the backward pass (computed in forward while
            W is read anyway). ``False`` saves W itself and quantizes it again in backward:
            less memory under FSDP2, where the saved q4(W) would be a full unsharded copy.
        cache_weights: keep each layer's q2(W) and q4(W) until W changes, so that gradient
            accumulation micro-batches and validation batches quantize W once per optimizer
            step. Costs two W-sized tensors per layer between steps; off by default. Valid when
            weights change through in-place ops on the Parameter or by replacement (optimizers,
            ``load_state_dict``), which bump its version counter; writes through ``.data`` do not.
    """

    def __init__(
        self,
        recipe: Union[QuantRecipe, str] = "paper",
        *,
        backend: str = "auto",
        seed: Optional[int] = None,
        rng: str = "torch",
        rank: int = 0,
        save_quantized_weight: bool = True,
        cache_weights: bool = False,
    ) -> None:
        self._backend = backends.check_backend(backend)
        backends.require(self._backend)  # a forced backend this machine cannot run: say so now
        self.rng = _config.choice(rng, RNG_KINDS, what="rng")
        self.seed = seed
        self.rank = rank
        self.save_quantized_weight = save_quantized_weight
        self.cache_weights = cache_weights
        self._recipe = QuantRecipe.coerce(recipe)
        self._specs: dict[str, Optional[LayerSpec]] = {}  # registered layers -> spec under the recipe
        self._backends: dict[tuple[str, str], str] = {}  # (layer, device type) -> backend
        self._generators: dict[tuple[str, str], NoiseGenerator] = {}
        self._listeners: list[SwitchListener] = []
        #: one entry per recipe stage whose backends were resolved:
        #: ``{"recipe": short_str, "device": type, "backends": {backend: n_layers}}``
        self.history: list[dict[str, Any]] = []

    # -------------------------------------------------------------------- recipe
    @property
    def recipe(self) -> QuantRecipe:
        return self._recipe

    def set_recipe(self, recipe: Union[QuantRecipe, str]) -> QuantRecipe:
        """Make ``recipe`` the active recipe; every layer uses it from its next call on.

        Setting the recipe that is already active changes nothing (no event, no recompile).
        Otherwise the layers' specs and backends are resolved anew and each listener hears
        ``(old, new)``."""
        new = QuantRecipe.coerce(recipe)
        old = self._recipe
        if new == old:
            return old
        self._recipe = new
        self._specs = {name: new.layer_spec(name) for name in self._specs}
        self._backends = {}
        for listener in list(self._listeners):
            listener(old, new)
        return new

    def subscribe(self, listener: SwitchListener) -> None:
        """Call ``listener(old, new)`` after every switch of recipe."""
        if listener not in self._listeners:
            self._listeners.append(listener)

    def unsubscribe(self, listener: SwitchListener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    # -------------------------------------------------------------------- layers
    def register(self, name: str) -> Optional[LayerSpec]:
        """Remember a layer (so switches resolve it too) and return its spec."""
        name = clean_module_name(name)
        if name not in self._specs:
            self._specs = {**self._specs, name: self._recipe.layer_spec(name)}  # a new dict: graphs guard on it
        return self._specs[name]

    @property
    def layer_names(self) -> list[str]:
        return list(self._specs)

    def layer_spec(self, name: str) -> Optional[LayerSpec]:
        """The active spec of the layer called ``name`` (``None``: not quantized)."""
        spec = self._specs.get(name, _MISSING)
        return self._register_uncompiled(name) if spec is _MISSING else spec  # type: ignore[return-value]

    @torch.compiler.disable
    def _register_uncompiled(self, name: str) -> Optional[LayerSpec]:
        return self.register(name)

    @contextmanager
    def unquantized(self) -> Iterator[None]:
        """Within the block every registered layer runs its plain GEMM (no switch event: the
        recipe stays active and comes back on exit), e.g. to measure what quantization costs
        the current weights."""
        specs = self._specs
        self._specs = dict.fromkeys(specs)  # a new dict: compiled graphs guard on it
        try:
            yield
        finally:
            self._specs = specs

    @contextmanager
    def rng_preserved(self) -> Iterator[None]:
        """Restore every stochastic-rounding generator on exit (a measurement that runs the
        quantized model must not move the training run's noise)."""
        saved = {key: gen.get_state() for key, gen in self._generators.items()}
        try:
            yield
        finally:
            # a generator first made inside the block is dropped: training makes it afresh, same seed
            self._generators = {key: gen for key, gen in self._generators.items() if key in saved}
            for key, state in saved.items():
                self._generators[key].set_state(state)

    # ------------------------------------------------------------------ backends
    @property
    def backend(self) -> str:
        """The requested layer backend ("auto" or a forced one)."""
        return self._backend

    def set_backend(self, backend: str) -> None:
        backend = backends.check_backend(backend)
        backends.require(backend)
        self._backend = backend
        self._backends = {}

    def backend_choice(self, name: str, device: torch.device) -> tuple[str, str]:
        """``(backend, reason)`` for layer ``name`` on ``device`` under the active recipe.

        Raises ``backends.BackendUnavailableError`` when a forced backend cannot run there."""
        spec = self.layer_spec(name)
        if spec is None or spec.is_identity:
            return backends.UNQUANTIZED, "the active recipe leaves this layer in the compute dtype"
        return backends.choose(self._backend, spec, device)

    def layer_backend(self, name: str, device: torch.device) -> str:
        """The backend that runs layer ``name`` on ``device`` now (cached until the next switch)."""
        if self._backend == "emulated":
            return "emulated"
        hit = self._backends.get((name, device.type))
        return hit if hit is not None else self._choose_backend(name, device)

    @torch.compiler.disable
    def _choose_backend(self, name: str, device: torch.device) -> str:
        backend, reason = self.backend_choice(name, device)
        if self._backend != "auto" and backend != self._backend:
            warnings.warn(f"layer {name!r}: {reason}; the recipe is unchanged", stacklevel=3)
        self._remember({name: backend}, device)
        return backend

    def _remember(self, chosen: dict[str, str], device: torch.device) -> None:
        # a new dict, not an update in place: compiled graphs guard on the one they saw
        self._backends = {**self._backends, **{(name, device.type): b for name, b in chosen.items()}}

    @torch.compiler.disable
    def resolve_backends(self, device: torch.device) -> dict[str, tuple[str, str]]:
        """Choose, and cache, the backend of every registered layer on ``device`` now:
        ``{layer: (backend, reason)}``. Called outside compiled code after a switch, so that a
        ``torch.compile``'d model finds every choice made (no graph break in forward). The first
        resolution of a stage adds its entry to :attr:`history`."""
        choices = {name: self.backend_choice(name, device) for name in self._specs}
        self._remember({n: b for n, (b, _) in choices.items() if b != backends.UNQUANTIZED}, device)
        stage = {"recipe": self._recipe.short_str(), "device": device.type}
        if not self.history or {k: self.history[-1][k] for k in stage} != stage:
            counts: dict[str, int] = {}
            for backend, _ in choices.values():
                counts[backend] = counts.get(backend, 0) + 1
            self.history.append({**stage, "backends": counts})
        return choices

    # --------------------------------------------------------------- generators
    def generator(self, name: str, device: torch.device) -> NoiseGenerator:
        """The stochastic-rounding generator of layer ``name`` on ``device`` (reproducible:
        seeded from the state's seed, the rank and the name; a ``torch.Generator`` or a
        ``PhiloxGenerator`` as :attr:`rng` says)."""
        key = (name, str(device))
        gen = self._generators.get(key)
        if gen is None:
            if self.seed is None:
                self.seed = torch.initial_seed() % (2**63)
            gen = torch.Generator(device=device) if self.rng == "torch" else PhiloxGenerator()
            gen.manual_seed((self.seed + 1_000_003 * self.rank + zlib.crc32(name.encode())) % (2**63))
            self._generators[key] = gen
        return gen

    # --------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The recipe, the backend asked for, the seed, the kind of generator and every
        generator's state."""
        return {
            "recipe": self._recipe.to_dict(),
            "backend": self._backend,
            "seed": self.seed,
            "rng_kind": self.rng,
            "rng": {f"{name}@{dev}": gen.get_state() for (name, dev), gen in self._generators.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the recipe (a switch, when it differs), the seed and the generators.

        ``state["rng"]`` is one process's generator states, or a list of them indexed by rank
        (a data-parallel checkpoint): each rank takes its own."""
        saved_kind = state.get("rng_kind", "torch")  # checkpoints from before rng= drew with torch
        if saved_kind != self.rng and state.get("rng"):
            raise ValueError(
                f"the checkpoint's stochastic-rounding generators are rng={saved_kind!r}, this run has "
                f"rng={self.rng!r}: resume with rng={saved_kind!r} (the two streams cannot continue each other)"
            )
        if "recipe" in state:
            self.set_recipe(QuantRecipe.from_dict(state["recipe"]))
        if state.get("seed") is not None:
            self.seed = state["seed"]
        rng = state.get("rng", {})
        if isinstance(rng, list):
            if self.rank >= len(rng):
                raise ValueError(
                    f"the checkpoint holds stochastic-rounding generators for {len(rng)} rank(s), not for rank "
                    f"{self.rank}: resume with the same number of processes"
                )
            rng = rng[self.rank]
        for key, value in rng.items():
            name, _, dev = key.rpartition("@")
            self.generator(name, torch.device(dev)).set_state(value)

    def __repr__(self) -> str:
        return f"QuantState({self._recipe.short_str()}, backend={self._backend!r}, layers={len(self._specs)})"
