"""What every generation method shares: the plan's provenance rows, the conditioning source, the strategy interface.

A method is a :class:`Method` subclass in its own module of this package with a module-level
``METHOD`` instance; :mod:`diffinv.diffusion.methods` finds it, so a new method is one file
(plus its test) and the sampler, guidance and output code stay shared, which keeps methods
comparable.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch

from diffinv import rng
from diffinv.data.real import DataError, LabelledImages
from diffinv.data.synthetic import slug
from diffinv.diffusion.backbone import Backbone
from diffinv.diffusion.perturb import paper_partners, perturb, pick_partners
from diffinv.diffusion.store import EmbeddingStore, StoreError
from diffinv.errors import UserError

Row = dict[str, Any]


@dataclass(frozen=True)
class GenerationSettings:
    """What the methods and the sampler read; :meth:`of` takes these fields from any object that has them (a stage's config).

    ``class_store``, ``adapters`` and ``judge`` name folders only so that a method can refuse
    settings without them; the stage opens them and hands their contents over as :class:`Inputs`.
    ``adapter_prompt`` is read by the stage from the adapters' folder: it changes the plan.
    """

    method: str = "di"
    seed: int = 0
    per_image: int = 5
    partners: str = "one"
    interp: float = 0.1
    interp_mode: str = "linear"
    noise: float = 0.1
    guidance: float = 2.0
    uncond: str = "mean"
    sampler: str = "dpm++2m"
    steps: int = 10
    eta: float = 0.0
    clip_x0: bool = False
    unit_noise: bool = False
    strength: float = 0.5
    img2img_embedding: str = "own"
    class_store: str = ""
    adapters: str = ""
    adapter_prompt: str = ""  # the prompt the adapters were fitted under ("": their class's learned embedding)
    pool: tuple[str, ...] = ()
    space: str = "encoder"
    judge: str = ""
    image_model: str = ""
    image_arch: str = ""
    image_size: int = 0
    pool_cache: str = ""
    bad_images: str = "skip"
    templates: tuple[str, ...] = ("a photo of a {}",)
    save_size: int | None = None
    batch_size: int = 64

    @classmethod
    def of(cls, source: object, **from_folders: Any) -> GenerationSettings:
        """The settings of ``source``, with the fields the stage read from the folders they name (``from_folders``)."""
        return cls(**{f.name: getattr(source, f.name) for f in fields(cls) if f.name not in FROM_FOLDERS}, **from_folders)


FROM_FOLDERS = ("adapter_prompt",)


@dataclass(frozen=True)
class Adapter:
    """One class's LoRA adapter of the UNet, as ``diffinv finetune`` saved it."""

    state: dict[str, torch.Tensor]
    rank: int
    alpha: float


@dataclass
class Inputs:
    """What a method reads beyond its store, opened by the stage from the folders the settings name.

    A method lists the fields it needs in :attr:`Method.needs`; the others stay empty.
    """

    stores: dict[str, EmbeddingStore] = field(default_factory=dict)  # other stores, by the names of extra_stores()
    model: str = ""  # the model's path or id
    real: LabelledImages | None = None  # "real": the images the store was inverted from
    held_out: list[tuple[LabelledImages, str]] = field(default_factory=list)  # "held_out": the real data's other images, each with its name
    pool: list[str] = field(default_factory=list)  # "pool": the datasets retrieval searches
    judge: str = ""  # "judge": the weights file of the classifier whose features are the space
    adapters: list[Adapter] = field(default_factory=list)  # "adapters": one per class, in class order
    adapters_info: dict[str, Any] = field(default_factory=dict)  # what the adapters are, for the manifest


@dataclass
class Conditioning:
    """What a batch draws its conditioning from, loaded once per run.

    ``embeddings`` [N, K, D]: the store's rows (per image, or per class for class-inversion);
    ``uncond`` [K, D] or, per class, [C, K, D]; ``extra`` holds what only one method needs
    (prompt embeddings, class embeddings, the real images of img2img).
    """

    embeddings: torch.Tensor
    uncond: torch.Tensor
    resolution: int = 32
    extra: dict[str, Any] = field(default_factory=dict)


class Method:
    """A way to make synthetic images from a store. Subclasses override what differs."""

    name = ""
    store_target = "image"  # the store it reads: one row per "image" or per "class"
    text_encoder = False  # needs the model's tokenizer and text encoder
    uses_embeddings = True  # samples from the store's embeddings, so the store must be of the model used
    samples = True  # runs the sampler (retrieval finds its images instead)
    needs: frozenset[str] = frozenset()  # the fields of Inputs the stage must fill (see Inputs)

    def wants_text_encoder(self, settings: GenerationSettings) -> bool:
        """Whether the model must be loaded with its tokenizer and text encoder for these settings."""
        return self.text_encoder

    @property
    def uses_adapters(self) -> bool:
        """Samples through per-class LoRA adapters (``--adapters``)."""
        return "adapters" in self.needs

    def check(self, settings: GenerationSettings, store: EmbeddingStore) -> None:
        """Refuse, with a message that says what to do, a store or settings this method cannot use."""
        self.check_settings(settings)
        if settings.adapters and not self.uses_adapters:
            raise UserError(f"--adapters are sampled through by --method lora or di+lora, not {self.name}; drop --adapters")
        if store.info.get("target", "image") != self.store_target:
            raise StoreError(self.wrong_store_message(store))

    def check_settings(self, settings: GenerationSettings) -> None:
        """Refuse settings this method cannot use, before any store exists (a study checks every candidate so)."""

    def notes(self, settings: GenerationSettings) -> list[str]:
        """What the user should know about how these settings act (logged before generating); none by default."""
        return []

    def wrong_store_message(self, store: EmbeddingStore) -> str:
        return (f"{store.root} holds one embedding per class; --method {self.name} needs a per-image store "
                f"(`diffinv invert` without --target class)")

    def plan(self, settings: GenerationSettings, store: EmbeddingStore, common: Row) -> list[Row]:
        """One provenance row per sample, in a fixed order (default: ``per_image`` samples of every store row)."""
        return per_image_rows(settings, store, common)

    def extra_stores(self, settings: GenerationSettings) -> dict[str, str]:
        """Other stores this method reads, by name (opened and checked against the model by the stage)."""
        return {}

    def load(self, settings: GenerationSettings, store: EmbeddingStore, backbone: Backbone, rows: list[Row],
             inputs: Inputs) -> Conditioning:
        """The conditioning source (default: the store's embeddings, guided by the mean embedding)."""
        device = backbone.device
        embeddings = store.embeddings.to(device)
        if settings.uncond == "class-mean":
            labels = store.labels
            uncond = torch.stack([embeddings[labels == c].mean(0) for c in range(len(store.classes))])
        else:
            uncond = store.mean_embedding().to(device)
        return Conditioning(embeddings, uncond, resolution=int(store.info["resolution"]))

    def conditioning(self, rows: list[Row], src: Conditioning, settings: GenerationSettings,
                     keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cond, uncond [B, L, D] for a batch of plan rows; keys [B] the rows' sample keys.

        Default: the row's own embedding, moved towards its partner (rows that have one) and noised.
        """
        own = src.embeddings[torch.tensor([r["_src"] for r in rows])]
        return perturbed(rows, own, src, settings, keys), uncond_for(rows, src)

    def start_noise(self, rows: list[Row], src: Conditioning, noise: torch.Tensor) -> torch.Tensor:
        """The noise [B, C, h, w] sampling starts from (default: the keyed Gaussian draw, unchanged)."""
        return noise

    def start(self, backbone: Backbone, rows: list[Row], src: Conditioning) -> torch.Tensor | None:
        """Clean latents [B, C, h, w] that sampling starts from part-way (img2img); None: pure noise."""
        return None

    def pixels(self, backbone: Backbone, rows: list[Row], src: Conditioning) -> torch.Tensor | None:
        """Images [B, 3, R, R] in [-1, 1] that are not sampled at all (retrieval copies them); None: sample."""
        return None


# ----------------------------------------------------------------------------- shared pieces of plans


def common_fields(settings: GenerationSettings, store: EmbeddingStore, model: str, uncond: str) -> Row:
    """The fields every row of a plan shares (what a sample was made with)."""
    return {"method": settings.method, "seed": settings.seed, "sampler": settings.sampler, "steps": settings.steps,
            "eta": settings.eta if settings.sampler == "ddim" else None, "clip_x0": settings.clip_x0,
            "unit_noise": settings.unit_noise, "guidance": settings.guidance, "uncond": uncond, "model": model,
            "resolution": store.info["resolution"], "save_size": settings.save_size or store.info["resolution"]}


def row(common: Row, cls: str, label: int, sample_id: str, identity: str, index: int, seed: int, **extra: Any) -> Row:
    """A sample's provenance row; ``_key`` (internal) keys all its randomness by its identity."""
    return {"id": sample_id, "file": f"{slug(cls)}/{sample_id}.png", "class": cls, "label": int(label), "index": index,
            **common, "source": None, "partner": None, "partner_fallback": None, "interp": None, "interp_mode": None,
            "noise": None, **extra, "_key": rng.key_of(seed, identity)}


def per_image_rows(settings: GenerationSettings, store: EmbeddingStore, common: Row) -> list[Row]:
    """``per_image`` samples of every store row, in store order."""
    rows = []
    for r, store_row in enumerate(store.rows):
        for k in range(settings.per_image):
            rows.append(row(common, store_row["class"], store_row["label"], f"{slug(store_row['id'])}-{k:02d}",
                            f"{store_row['id']}|{k}", k, settings.seed, source=store_row["id"], _src=r))
    return rows


def per_class_rows(settings: GenerationSettings, store: EmbeddingStore, common: Row, extra) -> list[Row]:
    """As many samples per class as the per-image methods make from that class's real images.

    ``extra(c, name, j, first_row)`` gives the method's own fields of sample j of class c.
    """
    # Real images per class: a class store records them, an image store has a row for each.
    per_class_store = store.info.get("target", "image") == "class"
    counts = [0] * len(store.classes)
    first_row: dict[int, int] = {}
    for r, store_row in enumerate(store.rows):
        counts[store_row["label"]] += store_row["n_images"] if per_class_store else 1
        first_row.setdefault(store_row["label"], r)
    rows = []
    for c, name in enumerate(store.classes):
        for j in range(counts[c] * settings.per_image):
            rows.append(row(common, name, c, f"{slug(name)}-{j:05d}", f"{name}|{j}", j, settings.seed,
                            **extra(c, name, j, first_row.get(c))))
    return rows


def add_partners(rows: list[Row], store: EmbeddingStore, settings: GenerationSettings) -> None:
    """Partner j of each sample (same class, keyed by the sample), and the s / sigma it used."""
    sources = torch.tensor([r["_src"] for r in rows], dtype=torch.int64)
    if settings.partners == "paper":
        # Per image (keyed by its id), per_image partners without replacement; sample k takes the k-th.
        image_keys = rng.keys_tensor(settings.seed, [f"{i}|partners" for i in store.ids])
        table, table_fallback = paper_partners(image_keys, store.labels, settings.per_image)
        k = torch.tensor([r["index"] for r in rows], dtype=torch.int64)
        partners, fallback = table[sources, k], table_fallback[sources, k]
    else:
        keys = torch.tensor([r["_key"] for r in rows], dtype=torch.int64)
        partners, fallback = pick_partners(keys, sources, store.labels)
    ids = store.ids
    for r, j, fb in zip(rows, partners.tolist(), fallback.tolist()):
        r.update(partner=ids[j], partner_fallback=bool(fb), interp=settings.interp, interp_mode=settings.interp_mode,
                 noise=settings.noise, _partner=j)


def perturbed(rows: list[Row], own: torch.Tensor, src: Conditioning, settings: GenerationSettings, keys: torch.Tensor) -> torch.Tensor:
    """own [B, K, D] moved by s towards each row's partner (when the plan gave it one), plus sigma noise."""
    with_partner = "_partner" in rows[0]
    partner = src.embeddings[torch.tensor([r["_partner"] for r in rows])] if with_partner else own
    return perturb(own.to(keys.device), partner.to(keys.device), keys, settings.interp if with_partner else 0.0, settings.noise,
                   settings.interp_mode)


def uncond_for(rows: list[Row], src: Conditioning) -> torch.Tensor:
    """Guidance's unconditional input per row [B, K, D]: the mean embedding, or its class's mean."""
    if src.uncond.dim() == 3:
        return src.uncond[torch.tensor([r["label"] for r in rows])]
    return src.uncond.expand(len(rows), -1, -1)


def index_real(real: LabelledImages | None, rows: list[Row]) -> LabelledImages:
    """Set each row's ``_real``, the index of its source image in ``real`` (the images the store was inverted from)."""
    if real is None:
        raise RuntimeError("the method reads the real images but does not list 'real' in its needs")
    index = {image_id: i for i, image_id in enumerate(real.ids)}
    missing = sorted({r["source"] for r in rows} - set(index))
    if missing:
        raise DataError(f"the method needs the store's real images, but {len(missing)} are no longer in them, e.g. {missing[:3]}")
    for r in rows:
        r["_real"] = index[r["source"]]
    return real
