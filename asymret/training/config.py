"""The experiment config: one YAML per query/gallery pair x loss x dataset (``configs/``).

Every section is a strict pydantic model: an unknown key, a wrong type or a bad value is an error
that names the key path and the file that set it (``asymret.config``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from asymret.retrieval.specs import EncoderSpec, Strict
from asymret.retrieval.transforms import AugmentSpec


class DataConfig(Strict):
    """Training data: a reader from ``asymret.retrieval.datasets`` and its arguments."""

    format: Literal["sfm120k", "folder", "csv", "veri776", "msmt17", "inshop", "sop", "cub200"] = "folder"
    root: str = Field("", description="dataset root (images); for sfm120k the ims/ folder")
    pkl: str | None = Field(None, description="sfm120k: the retrieval-SfM-120k training pickle")
    csv: str | None = Field(None, description="csv: path,label[,camera] file")
    num_workers: int = Field(2, ge=0)
    augment: AugmentSpec = Field(default_factory=AugmentSpec,
                                 description="training-time augmentation of query-side images (off: AML)")

    @model_validator(mode="after")
    def _format_fields(self):
        if self.format == "sfm120k" and not self.pkl:
            raise ValueError("format sfm120k needs data.pkl (the retrieval-SfM-120k .pkl file)")
        if self.format == "csv" and not self.csv:
            raise ValueError("format csv needs data.csv (a path,label[,camera] file)")
        return self


class MiningConfig(Strict):
    """AML tuples: (anchor, positive, ``num_negatives`` negatives), re-mined every epoch."""

    tuples_per_epoch: int = Field(2000, gt=0)
    num_negatives: int = Field(5, ge=0)
    pool_size: int = Field(20000, gt=0, description="random pool the hard negatives are mined from")


class LossTerm(Strict):
    """One loss of several trained together: ``weight · L_name`` (L with its own ``params``)."""

    name: str
    weight: float = Field(1.0, ge=0, description="multiplies this loss's total (which includes its own weight "
                          "parameter, where it has one)")
    params: dict = Field(default_factory=dict, description="overrides of the paper defaults")


class LossConfig(Strict):
    """One loss (``{name, params, mode}``) or several summed with weights.

    Several losses are written as a list, ``loss: [{name: mqd, weight: 4}, {name: attentive, weight: 1}]``,
    or as ``loss: {terms: [...], mode: ...}`` when ``mode`` is needed too; ``name`` then reads
    ``mqd+attentive`` (set by the list, not by hand).
    """

    name: str = "contr_plus"
    params: dict = Field(default_factory=dict, description="overrides of the paper defaults")
    mode: Literal["asymmetric", "symmetric"] = Field(
        "asymmetric", description="symmetric: every tuple member through the query network (no teacher)")
    terms: list[LossTerm] = Field(default_factory=list, description="several losses in one run, summed with their "
                                  "weights (written as a list under loss:)")

    @model_validator(mode="before")
    @classmethod
    def _list_form(cls, data):
        if isinstance(data, list):
            if not data:
                raise ValueError("an empty list names no loss; give {name: ...} or a list of {name, weight, params}")
            data = {"terms": data}
        if not isinstance(data, dict) or not data.get("terms"):
            return data
        terms = data["terms"]
        names = [t.get("name") if isinstance(t, dict) else None for t in terms] if isinstance(terms, list) else []
        if not names or not all(isinstance(n, str) for n in names):
            return data  # the field validation names the malformed term
        doubled = sorted({n for n in names if names.count(n) > 1})
        if doubled:
            raise ValueError(f"the loss list names {', '.join(map(repr, doubled))} more than once; list each loss "
                             "once, with its weight")
        joined = "+".join(names)
        if data.get("name", joined) != joined:
            raise ValueError(f"loss.name is set by a list of losses ({joined!r}); leave it out, not {data['name']!r} "
                             "(to replace an inherited list: loss: {_delete_: true, name: ...})")
        if data.get("params"):
            raise ValueError("with a list of losses, give params inside each one ({name, weight, params}), "
                             "not in loss.params")
        return {**data, "name": joined}

    def specs(self) -> list[tuple[str, float, dict]]:
        """``(name, weight, params)`` of every loss of the run: one (weight 1) unless ``terms`` lists several."""
        if self.terms:
            return [(t.name, t.weight, dict(t.params)) for t in self.terms]
        return [(self.name, 1.0, dict(self.params))]

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.specs()]


class OptimConfig(Strict):
    optimizer: Literal["adam", "sgd", "adamw"] = "adam"
    lr: float = Field(1e-6, gt=0)
    weight_decay: float = Field(1e-6, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    schedule: Literal["exponential", "cosine", "constant"] = "exponential"
    gamma: float = Field(0.99004983, gt=0, le=1, description="exponential decay per epoch (AML: e^-0.01)")
    warmup_epochs: int = Field(0, ge=0)
    min_lr: float = Field(0.0, ge=0)
    gem_lr_mult: float = Field(10.0, gt=0, description="AML trains GeM p with 10x lr, no weight decay")
    head_lr_mult: float = Field(1.0, gt=0, description="lr multiplier of the layers after the backbone (projection, "
                                "fc/bnneck head): a fresh head on a pretrained backbone learns faster than it")


class ReIDConfig(Strict):
    """The re-ID recipe of D3still/ACD (methods.md §3): a P×K batch for the trained network's own loss
    (CE with label smoothing + batch-hard triplet) and a random distillation batch per step."""

    ids_per_batch: int = Field(16, ge=1, description="P identities per P×K batch")
    images_per_id: int = Field(6, ge=1, description="K images of each identity")
    distill_batch_size: int = Field(256, ge=0, description="images per distillation batch; 0 = no distillation "
                                    "stream (the network's own loss only)")
    supervised: dict = Field(default_factory=dict, description="overrides of reid_supervised's defaults "
                             "(ce_weight, triplet_weight, epsilon, margin)")
    flip: bool = Field(True, description="P×K batch augmentation: random horizontal flip (probability 0.5)")
    pad: int = Field(10, ge=0, description="P×K batch augmentation: random crop after zero-padding by this many pixels")
    erasing: float = Field(0.5, ge=0, le=1, description="P×K batch augmentation: random erasing probability")
    uncertainty_views: int = Field(4, ge=2, description="attentive loss: gallery views per image for its variance")
    distill_augment: bool = Field(False, description="give the distillation batch's two views the P×K batch's "
                                  "augmentation, drawn independently per view, as the D3still / ACD code does; a "
                                  "frozen gallery network then runs on its view every step instead of being read "
                                  "from the embedding cache")


class ACDConfig(Strict):
    """ACD co-training (methods.md §4), active when ``gallery_frozen: false``: the query network is frozen,
    the gallery network and its classifier are trained with the base method's loss plus ``L_ACD``."""

    pair: str | None = Field(None, description="an earlier run's pair.pt: its frozen query network and the "
                             "gallery network to co-train (else query_net/gallery_net with weights:)")
    alpha: float = Field(3.0, ge=0)
    beta: float = Field(2.0, ge=0)
    tau: float = Field(2.0, gt=0, description="4 for a Swin gallery network")
    base_weight: float = Field(1.0, ge=0, description="w of the base method's loss, whose gradient now reaches "
                               "the gallery")
    raho: bool = Field(True, description="resolution-aware learning-rate tiers (Eq. 12-13)")
    raho_p: float = Field(0.3, gt=0, le=1)
    raho_gamma: float = Field(0.05, gt=0, le=1)
    raho_batches: int = Field(4, ge=1, description="distillation batches RAHO measures block importance on")


class TrainConfig(Strict):
    recipe: Literal["auto", "aml", "reid"] = Field(
        "auto", description="aml: tuples/relational batches (retrieval); reid: P×K + distillation batches; "
        "auto: reid for the re-ID, local-feature and ACD losses, else aml")
    epochs: int = Field(100, gt=0)
    batch_size: int = Field(5, gt=0, description="tuples (AML) or images per step")
    accumulate: int = Field(1, ge=1, description=(
        "gradient accumulation steps (AML's update_every): the gradients of k steps are summed for the AML "
        "tuple losses, which sum over tuples as their code does, and averaged for mean-reduced losses"))
    amp: bool = Field(True, description="bf16 autocast on CUDA; ignored on CPU")
    bn_eval: bool = Field(True, description="keep BatchNorm in eval mode (AML)")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1 ...")
    optim: OptimConfig = Field(default_factory=OptimConfig)
    mining: MiningConfig = Field(default_factory=MiningConfig)
    validate_every: int = Field(1, ge=0, description="epochs between validations; 0 = never")
    reid: ReIDConfig = Field(default_factory=ReIDConfig)


class EvalConfig(Strict):
    benchmark: Literal["roxford5k", "rparis6k", "mini-roxford", "veri776", "mini-veri", "msmt17", "inshop", "sop",
                       "cub200", "none"] = "none"
    root: str = ""
    distractors: str | None = None
    multiscale: bool = False


class WhiteningConfig(Strict):
    """Learned whitening (Radenović et al. TPAMI 2018; cirtorch ``whitenlearn``) at the end of training:
    each network's, from the training set's matching pairs, stored in the pair file (docs/whitening.md).

    cirtorch's defaults: every pair (``max_pairs: null``), every dimension kept (``dim: null``). A gallery
    network whose ``weights:`` file carries a whitening (a converted cirtorch network's ``Lw``, learned on
    retrieval-SfM-120k-whiten) keeps it (``keep_checkpoint``), as AML tested with it.
    """

    learn: bool = Field(False, description="learn each network's whitening after the last epoch")
    kind: Literal["learned", "pca"] = Field("learned", description="learned: from matching pairs (Lw); pca: "
                                            "unsupervised PCA whitening of the same images")
    pairs: Literal["auto", "sfm", "labels"] = Field(
        "auto", description="sfm: SfM-120k's qidxs/pidxs; labels: each image with a random other image of its "
        "label; auto: sfm when the data has them, else labels")
    max_pairs: int | None = Field(None, gt=0, description="a random subset of this many pairs (null: all; kind "
                                  "pca: of this many images)")
    dim: int | None = Field(None, gt=0, description="dimensions kept, the top ones (null: all)")
    keep_checkpoint: bool = Field(True, description="a gallery network whose weights file carries a whitening "
                                  "keeps it; false learns it anew from the training pairs")
    batch_size: int = Field(32, gt=0, description="images per encoding batch")


class ExperimentConfig(Strict):
    name: str = "experiment"
    seed: int = 0
    output_dir: str = "runs"
    query_net: EncoderSpec = Field(default_factory=EncoderSpec)
    gallery_net: EncoderSpec = Field(default_factory=lambda: EncoderSpec(backbone="resnet50"))
    gallery_frozen: bool = Field(True, description="False: co-train the gallery network (ACD)")
    data: DataConfig = Field(default_factory=DataConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    acd: ACDConfig = Field(default_factory=ACDConfig)
    whitening: WhiteningConfig = Field(default_factory=WhiteningConfig)

    @model_validator(mode="after")
    def _spec_whitening(self):
        for side in ("query_net", "gallery_net"):
            spec = getattr(self, side)
            if spec.whitening != "none" or spec.whitening_dim is not None:
                raise ValueError(f"{side}.whitening / {side}.whitening_dim are not read; post-processing whitening "
                                 f"is set for the pair in the whitening: section (whitening.learn: true, "
                                 f"whitening.kind, whitening.dim)")
        return self

    @model_validator(mode="after")
    def _co_training(self):
        if not self.gallery_frozen and self.loss.mode == "symmetric":
            raise ValueError("gallery_frozen: false co-trains the gallery network against a frozen query network "
                             "(ACD); it cannot be combined with loss.mode: symmetric")
        if not self.gallery_frozen and self.train.recipe == "aml":
            raise ValueError("ACD co-training (gallery_frozen: false) uses the re-ID recipe; set train.recipe: "
                             "reid or auto")
        return self
