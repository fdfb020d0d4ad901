"""The experiment config: one YAML per query/gallery pair x loss x dataset (``configs/``).

Every section is a strict pydantic model: an unknown key, a wrong type or a bad value is an error
that names the key path and the file that set it (``asymret.config``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from asymret.retrieval.specs import EncoderSpec, Strict


class DataConfig(Strict):
    """Training data: a reader from ``asymret.retrieval.datasets`` and its arguments."""

    format: Literal["sfm120k", "folder", "csv", "veri776"] = "folder"
    root: str = Field("", description="dataset root (images); for sfm120k the ims/ folder")
    pkl: str | None = Field(None, description="sfm120k: the retrieval-SfM-120k training pickle")
    csv: str | None = Field(None, description="csv: path,label[,camera] file")
    num_workers: int = Field(2, ge=0)

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


class LossConfig(Strict):
    name: str = "contr_plus"
    params: dict = Field(default_factory=dict, description="overrides of the paper defaults")
    mode: Literal["asymmetric", "symmetric"] = Field(
        "asymmetric", description="symmetric: every tuple member through the query network (no teacher)")


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


class TrainConfig(Strict):
    epochs: int = Field(100, gt=0)
    batch_size: int = Field(5, gt=0, description="tuples (AML) or images per step")
    accumulate: int = Field(1, ge=1, description="gradient accumulation steps")
    amp: bool = Field(True, description="bf16 autocast on CUDA; ignored on CPU")
    bn_eval: bool = Field(True, description="keep BatchNorm in eval mode (AML)")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1 ...")
    optim: OptimConfig = Field(default_factory=OptimConfig)
    mining: MiningConfig = Field(default_factory=MiningConfig)
    validate_every: int = Field(1, ge=0, description="epochs between validations; 0 = never")


class EvalConfig(Strict):
    benchmark: Literal["roxford5k", "rparis6k", "mini-roxford", "veri776", "mini-veri", "none"] = "none"
    root: str = ""
    distractors: str | None = None
    multiscale: bool = False


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
