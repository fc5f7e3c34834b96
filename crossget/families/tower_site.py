"""The tower site of LLaVA-NeXT and LLaVA-OneVision (``site="tower"``): visual tokens merged
inside the vision tower's layers up to the feature layer, as LLaVA-1.5 does
(:mod:`crossget.families.llava`), every tile alike.

The tower runs every tile of a batch (each image's base tile and grid tiles) as one batch, so
one per-layer schedule gives each tile the same number of tokens: ``keep`` per tile reach the
projector (after ``vision_feature_select_strategy``'s CLS drop). Merged tokens no longer form
the tile's grid, which ``pack_image_features`` would unpad and close with ``image_newline``
per row; the patched packing lays them out "flat" instead, as the original LLaVA code's
``mm_patch_merge_type="flat"`` does: each image's tiles concatenated, base tile first, in tile
order, no ``image_newline`` (it marks the end of a grid row, and merged tokens have no rows;
``flat`` appends none either). An image alone in its prompt then gives
``tiles(image size) x keep`` tokens (:meth:`TowerSiteFamily.image_tokens`), an image of a
OneVision multi-image prompt (one tile) ``keep``. When nothing merges (``r=0``, ``method="none"``,
``keep`` = a tile's tokens) upstream's packing runs and the counts are the stock ones.

- ``tome`` / ``crossget`` (/ ``none``): the vision family's patched layers
  (:func:`crossget.families.clip.tower`, :func:`crossget.families.siglip.tower`), a schedule
  merging only before the earliest selected feature layer (:func:`~crossget.families.llava.schedule_for_keep`,
  :func:`~crossget.families.llava.feature_schedule`). CLIP's CLS is protected and first; SigLIP
  protects no token and its cross token starts as the mean patch
  (:func:`~crossget.families.siglip.install_vision_glue`).
- ``visionzip`` (LLaVA-NeXT's CLIP): the layer whose output is the feature layer selects
  per tile as VisionZip does (:mod:`crossget.methods.visionzip`, CLS attention), ``keep`` per tile.

Budgets: ``keep`` tokens per tile, ``r`` per tower layer (zero from the feature layer on), or
``flops``, a ratio of :meth:`TowerSiteFamily.prefill_flops` for one image (tower on every tile,
projector, LM) solved into ``keep``, hence ``r``.

Shapes: ``T`` tiles of an image, ``K`` tokens per tile, ``D`` the LM's width.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from crossget.config import MERGING, PatchConfig
from crossget.families.base import Tower, install, similarity_width, uninstall
from crossget.families.llava import feature_schedule, hidden_state_indices, schedule_for_keep, tokens_at_layer
from crossget.families.visual_site import (
    DEFAULT_TEXT_LEN,
    LM_METHODS,
    ImageSize,
    PackedSiteFamily,
    PackedSiteModel,
    Site,
    anyres_tiles,
    check_keep,
    image_hw,
    site_and_lm_flops,
)
from crossget.methods import fastv, visionzip
from crossget.record import record, swap_class, unmark
from crossget.schedule import EncoderCost, token_counts, vit_layer_flops
from crossget.state import TowerSettings

__all__ = ["TiledImageTokens", "TowerSite", "TowerSiteFamily", "TowerSiteModel", "flat_layout",
           "unmerged"]

TOWER_ONLY = ("r", "contextual", "metric")  # options that only the tower site reads


@dataclass(eq=False)
class TowerSite(Site):
    """What a tower-site patch put on the base model (its record's ``glue``).

    Attributes (besides :class:`~crossget.families.visual_site.Site`'s; ``keep`` is per tile):
        flat: something merged or selected: the tiles' tokens are laid out flat.
        head: SigLIP's pooling head swapped to read merged tokens (None: none).
        visionzip_layer: the CLIP layer selecting as VisionZip (None: not installed).
    """

    flat: bool = False
    head: nn.Module | None = None
    visionzip_layer: nn.Module | None = None

    @property
    def reduces(self) -> bool:
        """Never at the projector site."""
        return False

    def counting(self) -> str:
        if self.flat:
            return f"keep={self.keep} per tile at the tower site, tiles concatenated"
        return "the stock count per image (nothing merges at the tower site)"


def flat_layout(features: Sequence[torch.Tensor], per_tile: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each image's ``[T_i, K, D]`` projected tile features as ``[T_i * K, D]`` (base tile first,
    in tile order) and the lengths ``[images]``.

    Raises:
        ValueError: a tile has other than ``per_tile`` tokens (inputs of another size than
            the tower's tiles).
    """
    out = []
    for i, f in enumerate(features):
        if f.shape[1] != per_tile:
            raise ValueError(f"image {i}'s tiles give {f.shape[1]} tokens each, the tower site was patched for "
                             f"{per_tile}: feed tiles of the tower's image_size")
        out.append(f.reshape(-1, f.shape[-1]))
    lengths = torch.tensor([len(f) for f in out], dtype=torch.long, device=features[0].device)
    return out, lengths


class TowerSiteModel(PackedSiteModel):
    """The patched base model's overrides (before upstream's class among the bases): at the tower
    site with something merged, the flat layout (:func:`flat_layout`) instead of upstream's packing."""

    def pack_image_features(self, image_features: Any, image_sizes: Any, *args: Any, **kwargs: Any) -> Any:
        site = record(self).glue
        if isinstance(site, TowerSite) and site.flat:
            return flat_layout(image_features, site.keep)
        return super().pack_image_features(image_features, image_sizes, *args, **kwargs)


@contextmanager
def unmerged(tower: nn.Module):
    """Run the patched vision ``tower`` (a module whose ``encoder`` crossget patched) without
    merging inside the block (OneVision's video frames need their grid); nothing if unpatched."""
    rec = record(tower.encoder)
    state = rec.state if rec is not None else None
    if state is None:
        yield
        return
    settings = state.settings
    state.settings = replace(settings, r=(0,) * len(settings.r))
    try:
        yield
    finally:
        state.settings = settings


@dataclass(frozen=True)
class TiledImageTokens:
    """A processor's ``replace_image_token`` writing ``per_tile`` placeholders per tile of each
    image (tower site, flat layout): its anyres tiles (``pinpoints``, ``tile`` pixels), or one
    tile for an image of a multi-image prompt (``multi_image``: OneVision's ``batch_num_images``)."""

    token: str
    per_tile: int
    pinpoints: tuple
    tile: int
    multi_image: bool = False

    def __call__(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        counts = image_inputs.get("batch_num_images") if self.multi_image else None
        if counts is not None and _prompt_images(counts, image_idx) != 1:
            return self.token * self.per_tile
        size = tuple(int(s) for s in torch.as_tensor(image_inputs["image_sizes"][image_idx]).tolist())
        return self.token * (anyres_tiles(size, [list(p) for p in self.pinpoints], self.tile) * self.per_tile)


def _prompt_images(counts: Sequence[int], image_idx: int) -> int:
    """Images in the prompt holding image ``image_idx``."""
    seen = 0
    for n in counts:
        seen += int(n)
        if image_idx < seen:
            return int(n)
    return 1


class TowerSiteFamily(PackedSiteFamily):
    """:class:`~crossget.families.visual_site.PackedSiteFamily` with the tower site.

    A subclass sets :attr:`tower_methods`, :attr:`tower_importance` and implements
    :meth:`vision_record` (and :meth:`install_vision_glue` if the tower needs more than its layers).
    """

    options = PackedSiteFamily.options | {"r", "prop_attn", "metric", "trace_sources", "contextual"}
    importance = ("cross", "attention", "none")
    tower_methods: tuple[str, ...] = ("none", "tome", "crossget")
    tower_importance: str = "cross"  # the rule importance="cross" runs at the tower site
    multi_image: bool = False  # images of multi-image prompts run one tile (OneVision)
    tower_kind: str = ""  # the vision towers the tower site patches, in errors

    # ---------------------------------------------------------------- per family
    def vision_record(self, model: nn.Module) -> Tower | None:
        """The vision tower's :class:`~crossget.families.base.Tower` record (None: a tower class
        the family cannot patch)."""
        raise NotImplementedError

    def install_vision_glue(self, vision: Tower, state: Any) -> tuple[list, nn.Module | None]:
        """What the patched tower needs besides its layers: ``(hook handles, swapped head)``."""
        return [], None

    def tower_tiles(self, model: nn.Module, image_size: Any) -> int:
        """Tiles the tower runs for an image of ``image_size``."""
        return self.tiles(model, image_size)

    # ---------------------------------------------------------------- sites
    def resolve_site(self, method: str, site: str | None) -> str | None:
        """``"tower"`` or ``"projector"``: ``visionzip`` runs at the tower, the other reducing
        methods at the projector unless ``site="tower"``; None for FastV / DART.

        Raises:
            ValueError: a site the method does not run at here.
        """
        if method in LM_METHODS:
            return super().resolve_site(method, site)
        site = site or ("tower" if method == "visionzip" else "projector")
        if site == "tower" and method not in self.tower_methods:
            raise ValueError(f"method={method!r} does not run at {self.name}'s tower site (it takes "
                             f"{self.tower_methods}); use site='projector' or leave site unset")
        if site == "projector" and method == "visionzip":
            raise ValueError("visionzip selects inside the vision tower (CLS attention at the feature layer): "
                             "site must be 'tower' (or unset)")
        return site

    def tower_shape(self, model: nn.Module) -> tuple[int, int, int, int]:
        """``(tokens per tile entering the tower, tokens per tile reaching the projector unmerged,
        layers, reducible layers)``: the layers before the earliest selected feature layer may merge."""
        cfg = self.base_model(model).config
        vcfg = cfg.vision_config
        n0 = (vcfg.image_size // vcfg.patch_size) ** 2 + self.tower_extra
        reducible = min(hidden_state_indices(cfg.vision_feature_layer, vcfg.num_hidden_layers))
        return n0, n0 - (cfg.vision_feature_select_strategy == "default"), vcfg.num_hidden_layers, reducible

    def tower_schedule(self, model: nn.Module, keep: int) -> list[int]:
        """Per-layer ``r`` of every tower layer giving ``keep`` tokens per tile at the feature layer.

        Raises:
            ValueError: ``keep`` out of ``[1, per tile]`` or below what the reducible layers reach.
        """
        n0, per_tile, layers, reducible = self.tower_shape(model)
        check_keep(keep, per_tile, "a tile (the tower's tokens per tile reaching the projector)")
        target = keep + (n0 - per_tile)  # the CLS "default" drops is still there at the feature layer
        if target == n0:
            return [0] * layers
        if reducible == 0:
            raise ValueError("vision_feature_layer selects the embeddings: no tower layer can merge")
        try:
            sched = schedule_for_keep(n0, reducible, target, protected=self.tower_extra)
        except ValueError as err:
            raise ValueError(f"keep={keep} per tile is out of reach at the tower site: {err}") from None
        return sched + [0] * (layers - reducible)

    # ---------------------------------------------------------------- patching
    def patch(self, model: nn.Module, cfg: PatchConfig) -> PatchConfig:
        """``site="tower"``: :meth:`patch_tower`; otherwise the projector site (or FastV / DART),
        as :meth:`~crossget.families.visual_site.SiteFamily.patch`, the resolved site reported.

        Raises:
            ValueError: a tower-only option (``r``, ``contextual``, ``metric``, ``prop_attn=False``,
                ``trace_sources``, ``importance="attention"``) away from the tower site, or what
                the site's patch raises.
        """
        site = self.resolve_site(cfg.method, cfg.site)
        if site == "tower":
            return self.patch_tower(model, cfg)
        extra = [f"{k}=" for k in TOWER_ONLY if getattr(cfg, k) is not None]
        extra += ["prop_attn=False"] * (not cfg.prop_attn) + ["trace_sources=True"] * cfg.trace_sources
        extra += ["importance='attention'"] * (cfg.importance == "attention")
        if extra:
            where = f"the {site} site" if site else "the language model"
            raise ValueError(f"{', '.join(extra)} is for site='tower' (merging in the vision tower's layers); "
                             f"{self.name} runs method={cfg.method!r} at {where}")
        return super().patch(model, cfg)

    def patch_tower(self, model: nn.Module, cfg: PatchConfig) -> PatchConfig:
        """The tower site. Budgets (give one): ``keep`` tokens per tile reaching the projector,
        ``r`` per tower layer (an int for each layer before the feature layer, or one per layer,
        zero from it on; ``{"vision": r}``), or ``flops`` (solved into ``keep``, hence ``r``, on
        :meth:`prefill_flops` for one image of ``image_size``, default :meth:`reference_size`).
        ``visionzip`` reads ``r`` as the count CrossGET's schedule ``r`` gives, ``contextual``
        as LLaVA-1.5 does.

        Raises:
            TypeError: a vision tower the family cannot patch.
            ValueError: bad budgets (not an int, zero, more than a tile has, below what the
                layers before the feature layer reach), towers, ``fastv_layer`` (FastV's),
                ``contextual`` away from VisionZip, or feature layers VisionZip cannot select at.
        """
        base = self.base_model(model)
        vision = self.vision_record(model)
        if vision is None:
            raise TypeError(f"{self.name}'s tower site patches {self.tower_kind} vision towers; this one is "
                            f"{type(base.vision_tower).__name__}")
        method, r = cfg.method, cfg.r
        if cfg.fastv_layer is not None:  # read by FastV / DART only: refused rather than ignored
            raise ValueError(f"fastv_layer= is FastV's / DART's layer in the language model; method={method!r} "
                             f"runs in {self.name}'s vision tower (site='tower'), which has no such setting")
        if cfg.contextual is not None and method != "visionzip":  # read by VisionZip only
            raise ValueError(f"contextual= is VisionZip's count of contextual tokens; method={method!r} has none")
        n0, per_tile, layers, reducible = self.tower_shape(model)
        strategy = base.config.vision_feature_select_strategy
        if cfg.towers not in (None, (), ("vision",)):
            raise ValueError(f"{self.name}'s tower site reduces the vision tower: towers must be ('vision',) or None, "
                             f"got {cfg.towers!r}")
        if sum(x is not None for x in (r, cfg.keep, cfg.flops)) > 1:
            raise ValueError("give one of r=, keep= or flops=")
        if isinstance(r, Mapping):
            if set(r) - {"vision"}:
                raise ValueError(f"{self.name}'s tower site reduces the vision tower only; r names "
                                 f"{sorted(set(r) - {'vision'})}")
            r = r.get("vision", 0)
        if method == "visionzip":
            if not isinstance(base.config.vision_feature_layer, int):
                raise ValueError("visionzip selects tokens of one feature layer; this model concatenates several")
            if reducible == 0:
                raise ValueError("visionzip needs a tower layer before vision_feature_layer")
        importance = cfg.importance
        if method == "crossget" and importance == "cross":
            importance = self.tower_importance
        metric = cfg.resolved_metric
        size = self.default_image(model, cfg.image_size)
        text_len = DEFAULT_TEXT_LEN if cfg.text_len is None else cfg.text_len
        sched, estimate = None, None
        if method == "none":
            keep = per_tile
        elif cfg.flops is not None:
            keep, estimate = self.solve_tower_keep(model, cfg.flops, method, size, text_len)
        elif cfg.keep is not None:
            keep = check_keep(cfg.keep, per_tile, "a tile (the tower's tokens per tile reaching the projector)")
        elif r is not None:
            sched = feature_schedule(r, layers, reducible)
            keep = tokens_at_layer(n0, sched, reducible, self.tower_extra) - (n0 - per_tile)
        else:
            raise ValueError("give r= (tokens per tower layer), keep= (tokens per tile) or flops= (prefill ratio)")
        if method in MERGING and sched is None:
            sched = self.tower_schedule(model, keep)
        split = None
        if method == "visionzip" and keep != per_tile:
            room = keep - (strategy == "full")  # with "full", CLS is one of the features
            try:
                split = visionzip.split_budget(room, n0 - 1, cfg.contextual)
            except ValueError as err:
                raise ValueError(f"{err} for keep={keep}") from None

        theta = uninstall(vision)  # trained cross tokens carried over a reconfiguration
        self.unpatch(model)
        s = TowerSite(method, keep, self.name, self.stock_counts,
                      flat=split is not None or (method in MERGING and any(sched)))
        if method in MERGING:
            settings = TowerSettings(
                "vision", tuple(sched), method, cfg.prop_attn, metric, cfg.trace_sources,
                importance=importance if method == "crossget" else "cross",
                guidance=cfg.guidance, guidance_scale=cfg.guidance_scale,
            )
            state = install(vision, settings, theta)
            s.handles, s.head = self.install_vision_glue(vision, state)
        elif split is not None:
            s.visionzip_layer = vision.layers[reducible - 1]
            visionzip.install(s.visionzip_layer, *split)
        swap_class(base, self.patched_class, glue=s, handles=s.handles)
        return PatchConfig(
            method=method, r={"vision": tuple(sched)} if method in MERGING else None, keep=keep, flops=cfg.flops,
            flops_estimate=estimate, towers=("vision",) if method in MERGING else (), prop_attn=cfg.prop_attn,
            metric=metric, importance=importance, guidance=cfg.guidance, guidance_scale=cfg.guidance_scale,
            text_len=cfg.text_len if cfg.flops is None else text_len, image_size=cfg.image_size,
            trace_sources=cfg.trace_sources, contextual=split[1] if split is not None else None, site="tower",
        )

    def unpatch(self, model: nn.Module) -> None:
        s = self.site(model)
        if isinstance(s, TowerSite):
            if s.head is not None:
                unmark(s.head)
            if s.visionzip_layer is not None:
                visionzip.uninstall(s.visionzip_layer)
        vision = self.vision_record(model)
        if vision is not None:
            uninstall(vision)
        super().unpatch(model)

    def towers(self, model: nn.Module) -> dict[str, Tower]:
        """The vision tower when the tower site patched it (else none: the projector site or the LM)."""
        vision = self.vision_record(model)
        return {"vision": vision} if vision is not None and vision.state is not None else {}

    # ---------------------------------------------------------------- counts
    def image_tokens(self, model: nn.Module, image_size: Any = None) -> int:
        """At the tower site with something merged: ``tiles(image_size) x keep`` (an image of a
        multi-image prompt: one tile); otherwise :meth:`SiteFamily.image_tokens`.

        Raises:
            ValueError: no ``image_size`` where the count depends on it.
        """
        s = self.site(model)
        if isinstance(s, TowerSite) and s.flat:
            if image_size is None:
                raise ValueError(f"{self.name}'s visual-token count at the tower site is tiles x keep, and the tiles "
                                 f"depend on the image size: {self.size_hint}")
            return self.tower_tiles(model, image_size) * s.keep
        return super().image_tokens(model, image_size)

    def adapt_processor(self, processor: Any, model: nn.Module) -> Any:
        """As :meth:`SiteFamily.adapt_processor`; at the tower site with something merged the
        processor writes ``tiles x keep`` per image (:class:`TiledImageTokens`)."""
        s = self.site(model)
        if not (isinstance(s, TowerSite) and s.flat):
            return super().adapt_processor(processor, model)
        if not isinstance(processor, self.processor_class):
            raise TypeError(f"expected a {self.processor_class.__name__}, got {type(processor).__name__}")
        self.configure_processor(processor, model)
        cfg = self.base_model(model).config
        processor.replace_image_token = TiledImageTokens(
            processor.image_token, s.keep, tuple(tuple(p) for p in cfg.image_grid_pinpoints),
            cfg.vision_config.image_size, self.multi_image)
        return processor

    def prefill_flops(self, model: nn.Module, method: str = "none", keep: int | None = None,
                      image_size: ImageSize | None = None, text_len: int = DEFAULT_TEXT_LEN,
                      fastv_layer: int = fastv.DEFAULT_LAYER, site: str | None = None) -> float:
        """:meth:`PackedSiteFamily.prefill_flops`, or at the tower site (``site="tower"``, the
        default of ``visionzip``; ``keep`` per tile): the tower on every tile with the schedule
        giving ``keep`` (``tome`` / ``crossget``: the similarity product of each merging layer on
        the method's default metric, CrossGET's cross token through every layer; ``visionzip``:
        layers after the selecting one on its tokens), the projector on ``keep`` tokens per tile,
        every LM layer on ``tiles x keep`` visual tokens (the stock count when nothing merges)."""
        if self.resolve_site(method, site) != "tower":
            return super().prefill_flops(model, method, keep, image_size, text_len, fastv_layer)
        cfg = self.base_model(model).config
        vcfg, tcfg = cfg.vision_config, cfg.text_config
        size = self.reference_size(model) if image_size is None else image_hw(image_size)
        n0, per_tile, layers, reducible = self.tower_shape(model)
        keep = per_tile if keep is None else keep
        c, inter = vcfg.hidden_size, vcfg.intermediate_size
        fixed = 2 * (n0 - self.tower_extra) * c * vcfg.num_channels * vcfg.patch_size**2
        if method == "visionzip":
            after = keep + (n0 - per_tile)
            counts = [n0] * reducible + [after if keep != per_tile else n0] * (layers - reducible)
            tower = fixed + sum(vit_layer_flops(c, inter, n, n) for n in counts)
        else:
            sched = self.tower_schedule(model, keep) if method in MERGING else [0] * layers
            match = {"crossget": "complete", "tome": "bipartite"}.get(method)
            width = similarity_width(method, self.tower_importance, PatchConfig(method=method).resolved_metric, c,
                                     vcfg.num_attention_heads)
            tower = EncoderCost(c, inter, layers, n0, self.tower_extra, fixed).flops(
                sched, extra=int(method == "crossget"), match=match, metric_dim=width)
        tiles = self.tiles(model, size)
        width_in = c * (1 if isinstance(cfg.vision_feature_layer, int) else len(cfg.vision_feature_layer))
        total = tiles * tower + 2 * tiles * keep * (width_in * tcfg.hidden_size + tcfg.hidden_size**2)
        visual = tiles * keep if keep != per_tile else self.stock_image_tokens(model, size)
        return float(total + site_and_lm_flops(tcfg, "none", visual, visual, text_len, fastv_layer))

    def solve_tower_keep(self, model: nn.Module, target: float, method: str, size: Any,
                         text_len: int) -> tuple[int, float]:
        """Largest ``keep`` per tile whose tower-site :meth:`prefill_flops` are at most ``target``
        x the stock ones, and that ratio.

        Raises:
            ValueError: no reachable ``keep`` costs so little.
        """
        ref = self.prefill_flops(model, "none", None, size, text_len)
        per_tile = self.tower_shape(model)[1]
        for keep in range(per_tile, 0, -1):
            try:
                ratio = self.prefill_flops(model, method, keep, size, text_len, site="tower") / ref
            except ValueError:
                break  # below what the tower's layers reach
            if ratio <= target + 1e-12:
                return keep, ratio
        raise ValueError(f"flops={target} is out of reach for method={method!r} at {self.name}'s tower site with a "
                         f"{text_len}-token prompt and {self.image_label(model, size)}")

    def tokens_per_layer(
        self, model: nn.Module, text_len: int | None = None, image_size: Any = None
    ) -> dict[str, list[int]]:
        """At the tower site: tokens after each tower layer per tile (``vision``) and in each LM
        layer (``language``) for one image of ``image_size``; otherwise
        :meth:`PackedSiteFamily.tokens_per_layer`."""
        s = self.site(model)
        if not isinstance(s, TowerSite):
            return super().tokens_per_layer(model, text_len, image_size)
        n0, per_tile, layers, reducible = self.tower_shape(model)
        if s.method in MERGING:
            vision = [m for _, m in self.vision_counts(model, self.tower_schedule(model, s.keep))]
        elif s.visionzip_layer is not None:
            vision = [n0] * (reducible - 1) + [s.keep + (n0 - per_tile)] * (layers - reducible + 1)
        else:
            vision = [n0] * layers
        text_len = DEFAULT_TEXT_LEN if text_len is None else text_len
        visual = self.image_tokens(model, self.default_image(model, image_size))
        n_lm = len(self.base_model(model).language_model.layers)
        return {"vision": vision, "language": [visual + text_len] * n_lm}

    def vision_counts(self, model: nn.Module, sched: Sequence[int]) -> list[tuple[int, int]]:
        """``(tokens in, tokens out)`` of every tower layer per tile with ``sched``."""
        return token_counts(self.tower_shape(model)[0], sched, self.tower_extra)
