"""Batched encoding: rows in record order, equal to encoding each image on its own, sharding, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from asymret.errors import ImageError, InputError
from asymret.retrieval.encode import encode_images, encode_records, inference, shard_bounds
from asymret.retrieval.encoders import create_encoder
from asymret.retrieval.records import ImageRecord, load_image
from asymret.retrieval.specs import MULTISCALE, EncoderSpec, InputSpec

# Mixed sizes and orientations: after the longer-side resize some share a shape, some do not.
SIZES = [(40, 24), (24, 40), (40, 24), (36, 36), (20, 12), (40, 24), (24, 40)]


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[ImageRecord]:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    out = []
    for i, (w, h) in enumerate(SIZES):
        path = root / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(path)
        out.append(ImageRecord(path=path, label=i))
    return out


@pytest.fixture(scope="module")
def encoder():
    return create_encoder(EncoderSpec(backbone="resnet10t", dim=16, input=InputSpec(size=32)))


def one_by_one(encoder, records) -> np.ndarray:
    """The reference: each image alone through the encoder's transform and multi-scale batch call."""
    return np.concatenate(
        [encoder.encode_batch(encoder.transform(load_image(r))[None]).numpy() for r in records]
    )


@pytest.mark.parametrize("batch_size, num_workers", [(3, 0), (4, 2)])
def test_rows_follow_record_order_and_equal_single_image_encoding(encoder, records, batch_size, num_workers):
    out = encode_records(encoder, records, batch_size=batch_size, num_workers=num_workers, progress=False)
    assert out.dtype == np.float32 and out.shape == (len(records), encoder.dim)
    np.testing.assert_allclose(out, one_by_one(encoder, records), rtol=1e-4, atol=1e-5)


def test_multiscale_spec_is_encoded_at_every_scale(records):
    multiscale = create_encoder(
        EncoderSpec(backbone="resnet10t", dim=16, input=InputSpec(size=32, scales=MULTISCALE))
    )
    single = create_encoder(multiscale.spec.model_copy(update={"input": InputSpec(size=32)}))
    single.load_state_dict(multiscale.state_dict())
    out = encode_records(multiscale, records[:3], batch_size=3, num_workers=0, progress=False)
    np.testing.assert_allclose(out, one_by_one(multiscale, records[:3]), rtol=1e-4, atol=1e-5)
    assert np.abs(out - encode_records(single, records[:3], num_workers=0, progress=False)).max() > 1e-3


def test_shards_are_contiguous_and_concatenate_to_the_whole(encoder, records):
    full = encode_records(encoder, records, batch_size=2, num_workers=0, progress=False)
    shards = [encode_records(encoder, records, 2, 0, progress=False, shard=s, num_shards=3) for s in range(3)]
    assert [len(s) for s in shards] == [2, 2, 3]
    np.testing.assert_allclose(np.concatenate(shards), full, rtol=1e-5, atol=1e-6)
    bounds = [shard_bounds(10, s, 4) for s in range(4)]
    assert bounds == [(0, 2), (2, 5), (5, 7), (7, 10)]
    with pytest.raises(InputError):
        shard_bounds(10, 4, 4)


def test_query_box_is_applied_before_encoding(encoder, records, tmp_path):
    image = load_image(records[0]).crop((10, 5, 30, 20))
    image.save(tmp_path / "crop.png")
    boxed = ImageRecord(path=records[0].path, split="query", bbx=(10, 5, 30, 20))
    out = encode_records(encoder, [boxed], num_workers=0, progress=False)
    np.testing.assert_allclose(out, one_by_one(encoder, [ImageRecord(path=tmp_path / "crop.png")]), atol=1e-6)


def test_fixed_size_spec_batches_everything_and_keeps_training_mode(records):
    encoder = create_encoder(EncoderSpec(backbone="resnet10t", head="bnneck", input=InputSpec(size=(32, 16))))
    encoder.train()
    out = encode_records(encoder, records, batch_size=8, num_workers=0, progress=False)
    assert encoder.training
    np.testing.assert_allclose(out, one_by_one(encoder, records), rtol=1e-4, atol=1e-5)


def test_encode_images_matches_encode_records(encoder, records):
    from_memory = encode_images(encoder, [load_image(r) for r in records[:3]])
    np.testing.assert_allclose(
        from_memory, encode_records(encoder, records[:3], progress=False, num_workers=0), atol=1e-6
    )


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_missing_image_raises_its_own_one_sentence_error(encoder, records, tmp_path, num_workers):
    broken = records[:2] + [ImageRecord(path=tmp_path / "gone.jpg")]
    with pytest.raises(ImageError) as info:
        encode_records(encoder, broken, batch_size=2, num_workers=num_workers, progress=False)
    assert str(info.value) == f"image not found: {tmp_path / 'gone.jpg'}"


def test_encoding_is_fp32_unless_amp_is_asked(monkeypatch):
    seen = []
    real = torch.autocast
    monkeypatch.setattr(torch, "autocast", lambda device_type, dtype=None, enabled=True:
                        seen.append((device_type, enabled)) or real("cpu", enabled=False))
    for device, amp in (("cuda", False), ("cuda", True), ("cpu", True)):
        with inference(torch.device(device), amp):
            pass
    assert seen == [("cuda", False), ("cuda", True), ("cpu", False)]


@pytest.mark.gpu
def test_cuda_encodes_in_fp32_by_default_and_bf16_autocast_stays_close(encoder, records):
    cpu = encode_records(encoder, records, num_workers=0, progress=False, device="cpu")
    gpu = encode_records(encoder, records, num_workers=0, progress=False, device="cuda")
    amp = encode_records(encoder, records, num_workers=0, progress=False, device="cuda", amp=True)
    encoder.cpu()
    assert np.min(np.sum(cpu * gpu, axis=1)) > 0.99999
    assert np.min(np.sum(cpu * amp, axis=1)) > 0.99


def test_images_of_one_shape_share_a_forward_pass(encoder, records, monkeypatch):
    seen = []
    real = encoder.encode_batch
    monkeypatch.setattr(encoder, "encode_batch", lambda batch: seen.append(tuple(batch.shape)) or real(batch))
    encode_records(encoder, records, batch_size=len(records), num_workers=0, progress=False)
    # longer side 32: 40x24 -> 32x19 (three), 24x40 -> 19x32 (two), 36x36 -> 32x32, 20x12 kept
    assert sorted(seen) == sorted([(3, 3, 19, 32), (2, 3, 32, 19), (1, 3, 32, 32), (1, 3, 12, 20)])
