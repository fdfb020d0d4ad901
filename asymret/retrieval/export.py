"""One side of a pair as an ONNX model: the whole embedding in one graph, its preprocessing in the file.

:func:`export_onnx` writes the eval-mode embedding ``images -> backbone -> [1x1 projection] -> pooling
(GeM with its learned p) -> [fc or BNNeck retrieval feature] -> L2 -> [whitening l2n(P (x - m))]`` as an
ONNX graph with input ``images`` ``(B, 3, H, W)`` float32 (already resized and normalised as
``spec.input`` says) and output ``embeddings`` ``(B, dim)``. The batch axis is dynamic, and so are H and
W for an int ``input.size`` (the retrieval convention: longer side fixed, aspect kept); a ``[h, w]``
spec fixes them. The encoder spec, the hashes that identify the embedding space and the caller's
``meta`` go into the model's ``metadata_props`` (keys ``asymret.*``, JSON values; docs/export.md), so
that a runtime can preprocess without asymret's training code and a server can check the gallery.

:class:`OnnxEncoder` runs such a file with ONNX Runtime. It needs neither torch nor onnx to encode;
only its ``transform`` (PIL -> array, the same torchvision pipeline as the PyTorch encoder) needs
torchvision.

The exporter is torch's TorchScript-based one (``dynamo=False``): it honours the requested opset
(17 by default) and dynamic axes by name, and takes well under a second; the torch.export-based
exporter of torch 2.9+ writes opset 18 at the least (its down-conversion to 17 fails on the axes of a Reduce op).
"""

from __future__ import annotations

import json
import warnings
from functools import cached_property
from pathlib import Path

import numpy as np

from asymret import __version__
from asymret.errors import ConfigError, DataError, InputError, NotFoundError
from asymret.retrieval.specs import EncoderSpec

FORMAT = "asymret.onnx_encoder"
FORMAT_VERSION = 1
DEFAULT_OPSET = 17
MIN_OPSET = 13  # the oldest opset the tests run; older ones may export but are not checked here
INPUT_NAME, OUTPUT_NAME = "images", "embeddings"
PREFIX = "asymret."
PARITY_LIMIT = 1e-3  # ONNX Runtime vs PyTorch on the L2-normalised output; a few 1e-7 is usual
INSTALL_HINT = 'pip install "asymret[onnx]"'


def _require(module: str):
    """``import module`` or an :class:`ConfigError` that says how to install the [onnx] extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"ONNX export and the ONNX runtime need the {module} package; "
                          f"install them with: {INSTALL_HINT}") from None


def max_opset() -> int:
    """The newest opset both the installed onnx and torch's TorchScript exporter write."""
    import torch.onnx._constants as constants

    onnx = _require("onnx")
    return min(onnx.defs.onnx_opset_version(), getattr(constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 17))


def check_exportable(spec: EncoderSpec) -> None:
    """:class:`ConfigError` unless ``spec`` is single scale at 1 (the graph holds one forward pass)."""
    scales = tuple(spec.input.scales)
    if scales != (1.0,):
        raise ConfigError(
            f"ONNX export takes single-scale encoders, but this one encodes at input.scales {list(scales)}; "
            "export a copy of the spec with input.scales: [1] (and combine scales in the runtime if you need them)"
        )


def _embedding_module(encoder, whitening):
    """The eval-mode encoder (and whitening) as one module ``images -> embeddings`` to trace."""
    import copy

    import torch
    import torch.nn.functional as F
    from torch import nn

    class Embedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = copy.deepcopy(encoder).cpu().float().eval()
            self.whiten = whitening is not None
            if self.whiten:
                self.register_buffer("m", whitening.m.detach().cpu().float().clone())
                self.register_buffer("P", whitening.P.detach().cpu().float().clone())

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            x = self.encoder(images)  # L2-normalised: fc / BNNeck feature or the pooled vector
            if self.whiten:  # asymret.retrieval.whitening.apply_whitening
                x = F.normalize((x - self.m) @ self.P.T, dim=-1)
            return x

    module = Embedding().eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _example_input(spec: EncoderSpec):
    import torch

    size = spec.input.size
    if isinstance(size, int):
        # not square, so that no traced shape can stand for both H and W
        h, w = size, max(8, round(size * 3 / 4))
    else:
        h, w = size
    return torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))


def _check_parity(module, path: Path, spec: EncoderSpec) -> dict | None:
    """Run the exported graph in ONNX Runtime next to PyTorch; :class:`ConfigError` where they disagree.

    Tracing records one input shape; a backbone whose forward branches on the size in Python would give a
    graph that is right only there. Longer-side specs are therefore checked at two aspect ratios (portrait
    and landscape), fixed-size ones at their size. Returns ``{"max_abs_diff", "shapes"}``, or None when
    onnxruntime is not installed.
    """
    import torch

    try:
        import onnxruntime as ort
    except ImportError:
        return None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    example = _example_input(spec)
    inputs = [example]
    if isinstance(spec.input.size, int):
        inputs.append(example[:1].transpose(2, 3).contiguous())
    worst = 0.0
    for x in inputs:
        with torch.no_grad():
            expected = module(x).numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
        diff = float(np.abs(got - expected).max()) if got.shape == expected.shape else float("inf")
        worst = max(worst, diff)
        if not diff <= PARITY_LIMIT:
            raise ConfigError(
                f"the exported {spec.backbone} graph does not reproduce PyTorch on a {tuple(x.shape)} batch (max "
                f"|diff| {diff:.3g}): its forward depends on the input size in a way the trace fixed; export it "
                "with a fixed input.size: [height, width]"
            )
    return {"max_abs_diff": worst, "shapes": [list(x.shape) for x in inputs]}


def export_onnx(encoder, path, whitening=None, opset: int = DEFAULT_OPSET, meta: dict | None = None) -> Path:
    """Write ``encoder`` (an :class:`~asymret.retrieval.encoders.Encoder`, then ``whitening`` when given, as
    pairs apply it) to ``path`` as an ONNX model of opset ``opset``; returns the path.

    ``meta``: JSON-like extras stored under ``asymret.meta`` (the CLI puts the side, the pair's meta and the
    pair's gallery-space hash there). Raises :class:`ConfigError` for multi-scale specs and unsupported
    opsets, :class:`InputError` for a whitening of the wrong size or non-JSON ``meta``.
    """
    import torch

    onnx = _require("onnx")
    from asymret.retrieval.sides import SideEncoder, embedding_space

    spec = encoder.spec
    check_exportable(spec)
    top = max_opset()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= top:
        raise ConfigError(f"opset {opset} is not supported; pick one from {MIN_OPSET} to {top} (default {DEFAULT_OPSET})")
    if whitening is not None and whitening.P.shape[1] != encoder.dim:
        raise InputError(f"the whitening takes {whitening.P.shape[1]}-d descriptors but the encoder gives "
                         f"{encoder.dim}-d ones; pass the whitening learned for this encoder's space")
    try:
        meta = json.loads(json.dumps(meta or {}))
    except (TypeError, ValueError) as exc:
        raise InputError(f"ONNX metadata must be JSON-like (str, numbers, lists, dicts): {exc}") from None

    module = _embedding_module(encoder, whitening)
    example = _example_input(spec)
    axes = {0: "batch"} if not isinstance(spec.input.size, int) else {0: "batch", 2: "height", 3: "width"}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # the TorchScript exporter's deprecation notice and timm's shape-assert TracerWarnings
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(module, (example,), str(tmp), input_names=[INPUT_NAME],
                                  output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: {0: "batch"}},
                                  opset_version=opset, do_constant_folding=True, dynamo=False)
            except torch.onnx.errors.OnnxExporterError as exc:  # an operator with no ONNX form at this opset
                raise ConfigError(f"{spec.backbone} cannot be exported to ONNX opset {opset}: "
                                  f"{str(exc).splitlines()[0]}; try a newer --opset (up to {top}) or a fixed "
                                  "input.size: [height, width]") from None
            except AssertionError as exc:  # timm's shape asserts: e.g. a ViT of one image size, a longer-side spec
                raise ConfigError(f"{spec.backbone} does not run on a {tuple(example.shape)} batch, which input.size "
                                  f"{spec.input.size} allows ({exc}); set input.size to the [height, width] it "
                                  "takes") from None
        check = _check_parity(module, tmp, spec)
        model = onnx.load(str(tmp))
        dim = whitening.dim if whitening is not None else encoder.dim
        network = SideEncoder(encoder, whitening).network_spec()  # what a gallery this side built records
        props = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "asymret_version": __version__,
            "encoder_spec": spec.model_dump(mode="json"),
            "input": spec.input.model_dump(mode="json"),
            "dim": dim,
            "opset": opset,
            "weights_sha256": network["weights_sha256"],
            "whitening": network["whitening"],
            "embedding_space": embedding_space(network),
            "parity": check,
            "meta": meta,
        }
        for key, value in props.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = PREFIX + key, json.dumps(value, sort_keys=True)
        model.producer_name, model.producer_version = "asymret", __version__
        model.doc_string = (f"asymret {spec.backbone} encoder{' + ' + whitening.kind + ' whitening' if whitening else ''}: "
                            f"{INPUT_NAME} (B, 3, H, W) float32, preprocessed as {PREFIX}input says -> "
                            f"{OUTPUT_NAME} (B, {dim}), L2-normalised")
        onnx.checker.check_model(model)
        onnx.save(model, str(tmp))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_metadata(path) -> dict:
    """The ``asymret.*`` metadata of an exported file, JSON-decoded, keys without the prefix (needs onnx)."""
    onnx = _require("onnx")
    model = onnx.load(str(path), load_external_data=False)
    return _decode({p.key: p.value for p in model.metadata_props}, path)


def _decode(props: dict[str, str], path) -> dict:
    ours = {k[len(PREFIX):]: v for k, v in props.items() if k.startswith(PREFIX)}
    try:
        decoded = {k: json.loads(v) for k, v in ours.items()}
    except ValueError:
        decoded = {}
    if decoded.get("format") != FORMAT:
        raise DataError(f"{path} is not an ONNX model written by asymret export (no {PREFIX}format metadata); "
                        "export it with: asymret export --pair PAIR --side query|gallery --format onnx OUT.onnx")
    version = decoded.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise DataError(f"{path} has asymret ONNX format {version!r}, newer than this asymret ({__version__}) "
                        f"reads (up to {FORMAT_VERSION}); upgrade asymret")
    return decoded


class OnnxEncoder:
    """An exported encoder run by ONNX Runtime: ``encode`` a preprocessed ``(B, 3, H, W)`` float32 batch.

    Attributes: ``spec`` (the :class:`EncoderSpec` of the exported encoder), ``dim``, ``side``, ``meta``,
    ``metadata`` (all ``asymret.*`` keys), ``opset``, ``transform`` (PIL image -> tensor, built on first use
    with torchvision, exactly as the PyTorch encoder's). ``providers``: ONNX Runtime execution providers
    (default: CPU).
    """

    def __init__(self, path, providers=None, threads: int | None = None):
        """``threads``: ONNX Runtime's intra-op threads (default: its own choice, one per physical core); set it
        to the thread count a PyTorch comparison uses (``asymret profile`` does)."""
        ort = _require("onnxruntime")
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise NotFoundError(f"ONNX model not found: {self.path}; pass the file asymret export wrote")
        providers = list(providers or ["CPUExecutionProvider"])
        state = ort.capi.onnxruntime_pybind11_state  # where onnxruntime's own exception types live
        unreadable = tuple(getattr(state, name) for name in ("Fail", "InvalidProtobuf", "InvalidGraph",
                                                             "InvalidArgument", "NoSuchFile", "NotImplemented",
                                                             "RuntimeException") if hasattr(state, name))
        try:
            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
            self.session = ort.InferenceSession(str(self.path), sess_options=options, providers=providers)
        except ValueError as exc:  # an execution provider this onnxruntime build lacks
            raise ConfigError(f"ONNX Runtime cannot use providers {providers} ({exc}); pick from "
                              f"{ort.get_available_providers()}") from None
        except unreadable as exc:
            raise DataError(f"{self.path} is not a readable ONNX model ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200]}); export it again") from None
        info = self.session.get_modelmeta()
        self.metadata = _decode(info.custom_metadata_map, self.path)
        self.spec = EncoderSpec.model_validate(self.metadata["encoder_spec"])
        self.dim = int(self.metadata["dim"])
        self.meta = self.metadata.get("meta") or {}
        self.side = self.meta.get("side")
        self.opset = self.metadata.get("opset")
        self.input_name = self.session.get_inputs()[0].name
        shape = self.session.get_inputs()[0].shape
        self._fixed_hw = tuple(shape[2:]) if all(isinstance(s, int) for s in shape[2:]) else None

    @cached_property
    def transform(self):
        from asymret.retrieval.transforms import build_transform

        return build_transform(self.spec.input)

    def encode(self, batch) -> np.ndarray:
        """``(B, dim)`` float32 embeddings of a preprocessed ``(B, 3, H, W)`` batch (numpy or tensor)."""
        if hasattr(batch, "detach"):  # a torch tensor, without importing torch
            batch = batch.detach().cpu().numpy()
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim == 3:
            batch = batch[None]
        if batch.ndim != 4 or batch.shape[1] != 3 or not len(batch):
            raise InputError(f"encode takes a (B, 3, H, W) batch of preprocessed images, got shape {batch.shape}")
        if self._fixed_hw is not None and tuple(batch.shape[2:]) != self._fixed_hw:
            raise InputError(f"this model takes {self._fixed_hw[0]}x{self._fixed_hw[1]} images (input.size), got "
                             f"{batch.shape[2]}x{batch.shape[3]}; preprocess with OnnxEncoder.transform")
        return self.session.run([OUTPUT_NAME], {self.input_name: batch})[0]

    def __repr__(self) -> str:
        return (f"OnnxEncoder({str(self.path)!r}, {self.spec.backbone} at {self.spec.input.size} px, {self.dim}-d, "
                f"side={self.side!r}, opset={self.opset})")
