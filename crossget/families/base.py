"""The model-family protocol, and installing the patch on one encoder tower.

A model family (one file under :mod:`crossget.families`) subclasses :class:`Family`: it
names the model classes it patches, finds their towers (:class:`Tower` records: where the
encoder and its layers are, which subclasses replace the layer and attention classes, how
the inputs give the anchor token and padding), states the analytic cost of a tower, and
how its cross tokens reach a joint space for the loss. :class:`Family` does the rest the
same way for every encoder family (validation, budgets, class swaps, hooks, cross-token
parameters); a family whose budget is not a per-layer schedule of its towers (LLaVA:
visual tokens for a language model) overrides :meth:`Family.patch` and friends.

Everything crossget puts on a module lives in one attribute, :data:`ATTR`, a
:class:`Record`; hooks are bound methods of small objects, so a patched model copies
and pickles like any other.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from crossget.config import DEFAULT_GUIDANCE, PatchConfig
from crossget.record import mark, record, swap_class, unmark
from crossget.schedule import EncoderCost, flops_ratio, resolve_r, solve_flops, token_counts
from crossget.state import TowerSettings, TowerState

CROSS_PARAM = "crossget_cross_tokens"  # parameter on an encoder: theta, [layers, C]
ENCODER_OPTIONS = frozenset(
    {"r", "flops", "towers", "prop_attn", "metric", "importance", "guidance", "guidance_scale", "schedule",
     "text_len", "image_size", "trace_sources"}
)


@dataclass(frozen=True)
class FlopsPlan:
    """What a ``flops=`` target is measured against (docs/method.md §7): the analytic cost of
    every tower that runs, the towers whose schedules are solved, and what the method adds
    per tower (keyword arguments of :meth:`EncoderCost.flops`: the cross token, the matching
    product). :meth:`Family.patch` solves with it and :func:`crossget.calibrate` searches
    with it, so a constant and a calibrated schedule are compared at the same estimate.
    """

    costs: dict[str, EncoderCost]
    reduced: tuple[str, ...]
    added: dict[str, dict]

    def ratio(self, schedules: Mapping[str, list[int] | tuple[int, ...]]) -> float:
        """Estimated FLOPs of ``{tower: per-layer r}`` over the stock model's (towers left out run unreduced)."""
        return flops_ratio(self.costs, schedules, self.added)

    def solve(self, target: float) -> tuple[dict[str, list[int]], float]:
        """The constant schedule of :func:`crossget.schedule.solve_flops` and its estimate."""
        return solve_flops(target, self.costs, self.reduced, self.added)


@dataclass
class Tower:
    """Where one encoder lives in a model and how to patch it.

    Attributes:
        kind: ``"vision"`` or ``"text"``.
        module: the tower (its pre-hook reads the inputs).
        encoder: the module that runs the layers (its hooks start/finish the state).
        layers: the encoder layers, in order.
        layer_class / attention_class: patched subclasses to swap in.
        attention_attr: path of the attention module inside a layer (``self_attn``;
            dotted for nested modules, e.g. BLIP text's ``attention.self``).
        causal: text with causal attention (positions must stay ordered).
        restore_length: give the encoder output its input length back (text pooling).
        read_inputs: ``(tower args, kwargs) -> (anchor [B] or None, valid [B, N0] or None)``
            (a picklable callable).
        hidden: width ``C``.
    """

    kind: str
    module: nn.Module
    encoder: nn.Module
    layers: list[nn.Module]
    layer_class: type
    attention_class: type
    attention_attr: str
    causal: bool
    restore_length: bool
    read_inputs: Callable[[tuple, dict], tuple[torch.Tensor | None, torch.Tensor | None]]
    hidden: int
    heads: int
    protect_anchor: bool = True  # False: no token anchors the tower (SigLIP vision)
    protect_leading: int = 0  # leading tokens that never merge besides the anchor

    @property
    def state(self) -> TowerState | None:
        rec = record(self.encoder)
        return rec.state if rec is not None else None

    @classmethod
    def of(
        cls,
        kind: str,
        module: nn.Module,
        layer_class: type,
        attention_class: type,
        *,
        layers: list[nn.Module] | None = None,
        attention_attr: str = "self_attn",
        causal: bool = False,
        restore_length: bool = False,
        read_inputs: Callable[[tuple, dict], tuple[torch.Tensor | None, torch.Tensor | None]] | None = None,
        protect_anchor: bool = True,
        protect_leading: int = 0,
    ) -> Tower:
        """The record of a Hugging Face tower ``module`` whose ``encoder`` runs its layers
        (``encoder.layers`` unless given) and whose config has ``hidden_size`` and
        ``num_attention_heads``."""
        return cls(
            kind=kind, module=module, encoder=module.encoder,
            layers=list(module.encoder.layers) if layers is None else layers,
            layer_class=layer_class, attention_class=attention_class, attention_attr=attention_attr,
            causal=causal, restore_length=restore_length, read_inputs=read_inputs or no_inputs,
            hidden=module.config.hidden_size, heads=module.config.num_attention_heads,
            protect_anchor=protect_anchor, protect_leading=protect_leading,
        )


def no_inputs(args: tuple, kwargs: dict) -> tuple[None, None]:
    """Vision towers: the anchor (CLS) is token 0, no padding."""
    return None, None


@dataclass
class TowerHooks:
    """The tower's three hooks, as methods of one picklable object."""

    state: TowerState
    read_inputs: Callable[[tuple, dict], tuple[torch.Tensor | None, torch.Tensor | None]]

    def tower_pre(self, _module, args, kwargs):
        self.state.anchor, self.state.input_valid = self.read_inputs(args, kwargs)

    def encoder_pre(self, _module, args, kwargs):
        self.state.start(kwargs.get("inputs_embeds", args[0] if args else None))

    def encoder_post(self, _module, _args, _kwargs, output):
        output.last_hidden_state = self.state.finish(output.last_hidden_state)
        return output


def drop_cross_tokens(module: nn.Module, state_dict: dict, prefix: str, _local_metadata: dict) -> None:
    """State-dict hook: the cross tokens are not part of the model's checkpoint."""
    state_dict.pop(prefix + CROSS_PARAM, None)


def allow_missing_cross_tokens(module: nn.Module, incompatible_keys) -> None:
    """Load hook: a stock state dict (without cross tokens) loads strictly; theta stays as it is."""
    for key in [k for k in incompatible_keys.missing_keys if k.rpartition(".")[2] == CROSS_PARAM]:
        incompatible_keys.missing_keys.remove(key)


def install(tower: Tower, settings: TowerSettings, theta: nn.Parameter | None = None) -> TowerState:
    """Patch ``tower`` in place (it must not be patched).

    ``theta``: cross tokens to reuse (e.g. trained ones kept across a reconfiguration);
    zeros are created when the method needs them and none are given.
    """
    state = TowerState(settings=settings, heads=tower.heads, causal=tower.causal, restore_length=tower.restore_length,
                       protect_anchor=tower.protect_anchor, protect_leading=tower.protect_leading)
    hooks = TowerHooks(state, tower.read_inputs)
    mark(tower.module, handles=[tower.module.register_forward_pre_hook(hooks.tower_pre, with_kwargs=True)])
    handles = [
        tower.encoder.register_forward_pre_hook(hooks.encoder_pre, with_kwargs=True),
        tower.encoder.register_forward_hook(hooks.encoder_post, with_kwargs=True),
    ]
    if tower.encoder is tower.module:
        handles += record(tower.module).handles
    # checkpoints stay stock: theta is not in state_dict() (it travels in crossget.save_cross_tokens
    # files), and a stock state dict loads strictly into the patched model
    handles += [tower.encoder.register_state_dict_post_hook(drop_cross_tokens),
                tower.encoder.register_load_state_dict_post_hook(allow_missing_cross_tokens)]
    mark(tower.encoder, state=state, handles=handles)
    for i, layer in enumerate(tower.layers):
        attn = layer.get_submodule(tower.attention_attr)
        swap_class(layer, tower.layer_class, state=state, layer=i)
        swap_class(attn, tower.attention_class, state=state, layer=i)
    if settings.uses_cross_token:
        if theta is None or theta.shape != (len(tower.layers), tower.hidden):
            ref = next(tower.encoder.parameters())
            theta = nn.Parameter(torch.zeros(len(tower.layers), tower.hidden, dtype=ref.dtype, device=ref.device))
        setattr(tower.encoder, CROSS_PARAM, theta)
        state.cross_tokens = theta
    elif theta is not None:
        setattr(tower.encoder, CROSS_PARAM, theta)  # unused now, kept for a later re-patch
    return state


def uninstall(tower: Tower) -> nn.Parameter | None:
    """Undo :func:`install`: original classes, no hooks, no cross-token parameters.

    Returns the removed cross tokens (or None)."""
    if tower.state is None:
        return None
    for layer in tower.layers:
        unmark(layer.get_submodule(tower.attention_attr))
        unmark(layer)
    unmark(tower.encoder)
    unmark(tower.module)
    theta = getattr(tower.encoder, CROSS_PARAM, None)
    if theta is not None:
        delattr(tower.encoder, CROSS_PARAM)
    return theta


# --------------------------------------------------------------------------- protocol
def similarity_width(method: str, importance: str, metric: str, hidden: int, heads: int) -> int:
    """The width of the ``N x N`` products one merging layer computes, for the cost model: the
    metric's (``"keys"``: every head's keys, ``hidden``; ``"keys_mean"``: ``hidden // heads``),
    plus ``hidden`` when CrossGET's attention-received importance recomputes ``Q K^T`` there."""
    width = hidden // heads if metric == "keys_mean" else hidden
    return width + hidden * (method == "crossget" and importance == "attention")


class Family:
    """What a model family provides. Subclasses set the class attributes and either the three
    anatomy functions (``find_towers``, ``tower_record``, ``cost``) or override :meth:`towers` and
    :meth:`encoder_cost`; the rest has defaults for encoder families.

    Attributes:
        name: shown in errors (``"CLIP"``).
        classes: model classes the family patches.
        methods: the methods it runs (of :data:`crossget.config.METHODS`).
        options: the :class:`~crossget.config.PatchConfig` fields it reads besides ``method``.
        importance: the importance rules it offers.
        default_guidance: the guidance rule of ``method="crossget"`` when a config names none.
        find_towers: ``model -> {kind: tower module}``.
        tower_record: ``(kind, tower module) -> Tower``.
        cost: ``(tower module, kind, text_len, image_size) -> EncoderCost``.
    """

    name: str = ""
    classes: tuple[type, ...] = ()
    methods: tuple[str, ...] = ("none", "tome", "crossget")
    options: frozenset[str] = ENCODER_OPTIONS
    importance: tuple[str, ...] = ("cross", "attention", "none")
    default_guidance: str = DEFAULT_GUIDANCE
    find_towers: Callable[[nn.Module], dict[str, nn.Module]] | None = None
    tower_record: Callable[[str, nn.Module], Tower] | None = None
    cost: Callable[..., EncoderCost] | None = None

    # ---------------------------------------------------------------- anatomy
    def towers(self, model: nn.Module) -> dict[str, Tower]:
        """The model's towers by kind (``vision`` / ``text``)."""
        return {kind: self.tower_record(kind, m) for kind, m in self.find_towers(model).items()}

    def encoder_cost(
        self, module: nn.Module, kind: str, text_len: int | None = None, image_size: int | None = None
    ) -> EncoderCost:
        """Analytic cost of one tower, for :func:`crossget.schedule.solve_flops` (``text_len``
        tokens of text, images of ``image_size`` pixels; None: the config's)."""
        return self.cost(module, kind, text_len, image_size)

    def joint_projection(self, model: nn.Module, kind: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """``[*, C] -> [*, P]`` into the joint space the cross-token loss aligns in (weights
        detached); None if the model has none."""
        return None

    def install_glue(self, model: nn.Module) -> None:
        """Model-level additions beyond the towers (BLIP: bias into cross-attention masks)."""

    def uninstall_glue(self, model: nn.Module) -> None:
        """Undo :meth:`install_glue`; by default the glue is a list of hook handles, removed."""
        rec = record(model)
        if rec is None or rec.glue is None:
            return
        for h in rec.glue:
            h.remove()
        unmark(model, ("glue",))

    def image_tokens(self, model: nn.Module, image_size: Any = None) -> int:
        """``<image>`` placeholders an image (of ``image_size``, where the count depends on
        it) needs in a prompt, as the model is patched now; families with a language model.

        Raises:
            TypeError: the family feeds no language model.
        """
        raise TypeError(f"{self.name} models feed no language model: they have no image placeholders")

    def adapt_processor(self, processor: Any, model: nn.Module) -> Any:
        """Make the family's processor write :meth:`image_tokens` placeholders; returns it.

        Raises:
            TypeError: the family feeds no language model, or it is not the family's processor.
        """
        raise TypeError(f"{self.name} models feed no language model: there is no processor to adapt")

    def default_towers(self, found: Mapping[str, Tower]) -> tuple[str, ...]:
        return ("vision",) if "vision" in found else tuple(found)

    # ---------------------------------------------------------------- validation
    def check(self, cfg: PatchConfig) -> None:
        """ValueError for a method or an option this family does not take (names the family)."""
        if cfg.method not in self.methods:
            raise ValueError(f"method must be one of {self.methods} for {self.name} models, got {cfg.method!r}")
        extra = sorted(set(cfg.explicit()) - self.options - {"flops_estimate"})
        if extra:
            hint = " (keep= counts visual tokens fed to a language model: LLaVA)" if "keep" in extra else ""
            if "site" in extra:
                hint += " (site= chooses where LLaVA-NeXT / LLaVA-OneVision reduce)"
            raise ValueError(
                f"{', '.join(k + '=' for k in extra)} is not an option of the {self.name} family{hint}; "
                f"it takes {', '.join(sorted(self.options))}"
            )
        if cfg.importance not in self.importance:
            raise ValueError(f"importance must be one of {self.importance} for {self.name} models, got {cfg.importance!r}")

    # ---------------------------------------------------------------- patching
    def reduced_towers(self, found: Mapping[str, Tower], cfg: PatchConfig) -> tuple[str, ...]:
        """The towers ``cfg`` reduces: ``towers=``, else those a per-tower ``r`` names, else the
        family's default.

        Raises:
            ValueError: none, or a name the model has no tower for.
        """
        if cfg.towers is not None:
            reduced = cfg.towers
        elif isinstance(cfg.r, Mapping):
            reduced = tuple(cfg.r)  # a schedule per tower names the towers it reduces
        else:
            reduced = self.default_towers(found)
        if not reduced or any(t not in found for t in reduced):
            raise ValueError(f"towers must name some of {tuple(found)}, got {cfg.towers!r}")
        return tuple(reduced)

    def flops_plan(self, model: nn.Module, cfg: PatchConfig, found: Mapping[str, Tower] | None = None) -> FlopsPlan:
        """The cost model a ``flops=`` target of ``cfg`` is solved against: every tower's cost at
        ``cfg.text_len`` / ``cfg.image_size``, what ``cfg.method`` adds (one cross token through
        every layer with cross-token importance; CrossGET's complete-graph or ToMe's bipartite
        similarity product over the metric width) and the reduced towers."""
        found = self.towers(model) if found is None else found
        reduced = self.reduced_towers(found, cfg)
        costs = {k: self.encoder_cost(t.module, k, cfg.text_len, cfg.image_size) for k, t in found.items()}
        match = {"crossget": "complete", "tome": "bipartite"}.get(cfg.method)
        added = {
            k: {"extra": int(cfg.uses_cross_token), "match": match,
                "metric_dim": similarity_width(cfg.method, cfg.importance, cfg.resolved_metric, t.hidden, t.heads)}
            for k, t in found.items()
        }
        return FlopsPlan(costs, reduced, added)

    def patch(self, model: nn.Module, cfg: PatchConfig) -> PatchConfig:
        """Patch ``model`` in place as ``cfg`` asks; returns the resolved config."""
        found = self.towers(model)
        method, metric = cfg.method, cfg.resolved_metric
        reduced = self.reduced_towers(found, cfg)
        r = cfg.r
        if r is not None and cfg.flops is not None:
            raise ValueError("give either r= or flops=, not both")
        if r is None and cfg.flops is None:
            if method != "none":
                raise ValueError("give r= (tokens per layer) or flops= (target FLOPs ratio)")
            r = 0
        cross = cfg.uses_cross_token  # every tower then carries a cross token
        if cfg.flops is not None:
            schedules, estimate = self.flops_plan(model, cfg, found).solve(cfg.flops)
        else:
            estimate = None
            schedules = {}
            for k in reduced:
                r_k = r[k] if isinstance(r, Mapping) else r
                schedules[k] = resolve_r(r_k, len(found[k].layers), name=f"r for the {k} tower")
            if isinstance(r, Mapping) and set(r) - set(reduced):
                raise ValueError(f"r names towers {sorted(set(r) - set(reduced))} that are not reduced: {reduced}")

        # reconfiguring: fresh classes and hooks, trained cross tokens carried over
        thetas = {kind: uninstall(tower) for kind, tower in found.items()}
        kept = dict(record(model).kept) if record(model) is not None and record(model).kept else {}
        thetas = {kind: theta if theta is not None else kept.get(kind) for kind, theta in thetas.items()}
        self.uninstall_glue(model)
        kept = {}
        for kind, tower in found.items():
            if kind in schedules:
                sched = schedules[kind]
            elif cross:
                sched = [0] * len(tower.layers)  # runs its cross token for the loss, never merges
            else:
                if thetas[kind] is not None:
                    kept[kind] = thetas[kind]  # an unpatched tower's trained theta waits for a later re-patch
                continue
            settings = TowerSettings(kind, tuple(sched), method, cfg.prop_attn, metric, cfg.trace_sources,
                                     importance=cfg.importance, guidance=cfg.guidance,
                                     guidance_scale=cfg.guidance_scale)
            install(tower, settings, thetas[kind])
        self.install_glue(model)
        mark(model, kept=kept or None)
        return cfg.replace(r={k: tuple(v) for k, v in schedules.items()}, towers=tuple(reduced), metric=metric,
                           flops_estimate=estimate)

    def unpatch(self, model: nn.Module) -> None:
        for tower in self.towers(model).values():
            uninstall(tower)
        self.uninstall_glue(model)

    def states(self, model: nn.Module) -> dict[str, TowerState]:
        return {k: t.state for k, t in self.towers(model).items() if t.state is not None}

    def tokens_per_layer(
        self, model: nn.Module, text_len: int | None = None, image_size: int | None = None
    ) -> dict[str, list[int]]:
        out = {}
        for kind, tower in self.towers(model).items():
            if tower.state is None:
                continue
            cost = self.encoder_cost(tower.module, kind, text_len, image_size)
            r = tower.state.settings.r if tower.state.settings.method != "none" else [0] * len(tower.layers)
            out[kind] = [m for _, m in token_counts(cost.n_tokens, r, cost.protected)]
        return out

    def cross_token_pairs(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected image and text cross tokens ``[L, B, P]`` of the last forward, paired layer
        by layer (docs/method.md §3): the deepest ``min(L_vision, L_text)`` layers.

        Raises:
            ValueError: the model has no two towers with cross tokens, or no forward ran.
        """
        st = self.states(model)
        if not all(k in st and st[k].settings.uses_cross_token for k in ("vision", "text")):
            raise ValueError("cross_token_loss needs both towers patched with method='crossget'")
        outs = {k: st[k].cross_outputs for k in ("vision", "text")}
        if not outs["vision"] or not outs["text"]:
            raise ValueError("run a forward through both towers before cross_token_loss")
        project = {k: self.joint_projection(model, k) for k in ("vision", "text")}
        if project["vision"] is None or project["text"] is None:
            raise ValueError(
                f"cross_token_loss needs a joint image-text space (projections), which {type(model).__name__} has not"
            )
        depth = min(len(outs["vision"]), len(outs["text"]))
        u = project["vision"](torch.stack(outs["vision"][-depth:]))
        v = project["text"](torch.stack(outs["text"][-depth:]))
        if u.shape[1] != v.shape[1]:
            raise ValueError(
                f"cross_token_loss pairs images and texts one to one: got {u.shape[1]} images, {v.shape[1]} texts"
            )
        return u, v
