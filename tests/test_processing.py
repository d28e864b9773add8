"""Images become the right pixels, prompts the right ids and image slots."""

from __future__ import annotations

import base64
import io

import pytest
import sentencepiece
import torch
from PIL import Image

from owl.config import CLIP_MEAN, CLIP_STD, IMAGE_TOKEN_ID
from owl.processing import (
    ImageError,
    ImageLimits,
    ImageProcessor,
    ImageTooLarge,
    PromptError,
    aspect_hint,
    check_public_host,
    encode_prompt,
    image_spans,
    load_image,
)

SLOTS = 9


def png_bytes(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


# --- prompt ids ------------------------------------------------------------------------------------


def test_prompt_ids_equal_raw_sentencepiece_per_chunk(tokenizer, tokenizer_file):
    raw = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_file))
    chunks = [
        "The following is a conversation.\nHuman: ",
        "\nHuman: ",
        "\nHuman: Which one is red? 2048 café\nAI: ",
    ]
    prompt = "<image>".join(chunks)
    expected = [raw.bos_id()]
    for i, chunk in enumerate(chunks):
        expected += raw.encode(chunk)
        if i < len(chunks) - 1:
            expected += [IMAGE_TOKEN_ID] * SLOTS
    assert encode_prompt(prompt, tokenizer, SLOTS, num_images=2) == expected


def test_text_only_prompt_is_bos_plus_the_whole_string(tokenizer, tokenizer_file):
    raw = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_file))
    prompt = "Human: Hello there\nAI: "
    assert encode_prompt(prompt, tokenizer, SLOTS) == [1, *raw.encode(prompt)]


def test_chunk_after_an_image_starts_with_a_lone_space_piece(tokenizer):
    # SentencePiece's dummy prefix: every chunk, even one starting with a newline, gets "▁" first.
    ids = encode_prompt("<image>\nHuman: hi", tokenizer, SLOTS)
    assert tokenizer.convert_ids_to_tokens(ids[1 + SLOTS : 3 + SLOTS]) == ["▁", "<0x0A>"]


@pytest.mark.parametrize(
    ("prompt", "spans"),
    [
        ("no images here", []),
        ("a<image>b", [(2, SLOTS)]),
        ("<image>x<image>y", [(1, SLOTS), (None, SLOTS)]),
        ("p<image>q<image>r<image>s", [(None, SLOTS)] * 3),
    ],
)
def test_image_slot_offsets_and_lengths(tokenizer, prompt, spans):
    ids = encode_prompt(prompt, tokenizer, SLOTS, num_images=len(spans))
    found = image_spans(ids, SLOTS)
    assert [length for _, length in found] == [length for _, length in spans]
    for (offset, _), (expected, _) in zip(found, spans, strict=True):
        if expected is not None:
            assert offset == expected
        assert ids[offset - 1] != IMAGE_TOKEN_ID and ids[offset : offset + SLOTS] == [IMAGE_TOKEN_ID] * SLOTS
    assert sum(token == IMAGE_TOKEN_ID for token in ids) == SLOTS * len(spans)


def test_placeholder_and_image_counts_must_match(tokenizer):
    with pytest.raises(PromptError, match="2 <image> placeholders but 3 images"):
        encode_prompt("<image> and <image>", tokenizer, SLOTS, num_images=3)


def test_model_refuses_slots_without_images(tiny_model):
    from owl.model import ImageSlotError

    ids = torch.tensor([[1, 5, *[IMAGE_TOKEN_ID] * SLOTS, 6]])
    with pytest.raises(ImageSlotError, match="9 image slots .* but 2 images were given"):
        tiny_model.embed(ids, torch.zeros(2, SLOTS, 64))


# --- pixels ----------------------------------------------------------------------------------------


def test_pixels_are_rgb_normalised_with_clip_statistics():
    processor = ImageProcessor(image_size=28)
    pixels = processor([Image.new("RGB", (50, 30), (255, 0, 0))])
    assert pixels.shape == (1, 3, 28, 28)
    expected = [
        (1 - CLIP_MEAN[0]) / CLIP_STD[0],
        (0 - CLIP_MEAN[1]) / CLIP_STD[1],
        (0 - CLIP_MEAN[2]) / CLIP_STD[2],
    ]
    assert torch.allclose(pixels[0, :, 14, 14], torch.tensor(expected), atol=1e-6)


def test_squash_resize_keeps_left_and_right_apart():
    image = Image.new("RGB", (200, 20), (0, 0, 255))
    image.paste((255, 255, 0), (100, 0, 200, 20))  # right half yellow
    pixels = ImageProcessor(image_size=20)([image])[0]
    assert pixels[2, 10, 2] > pixels[0, 10, 2]  # left: blue
    assert pixels[0, 10, 17] > pixels[2, 10, 17]  # right: yellow


def test_resize_is_pil_bicubic():
    image = Image.effect_noise((37, 23), 60).convert("RGB")
    ours = ImageProcessor(image_size=16).pixels(image)
    reference = torch.tensor(
        list(image.resize((16, 16), Image.Resampling.BICUBIC).getdata()), dtype=torch.float32
    )
    reference = reference.view(16, 16, 3).permute(2, 0, 1) / 255
    reference = (reference - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    assert torch.allclose(ours, reference, atol=1e-6)


def test_every_source_kind_decodes_to_the_same_image(tmp_path):
    image = Image.new("RGB", (8, 6), (10, 200, 30))
    data = png_bytes(image)
    (tmp_path / "a.png").write_bytes(data)
    sources = [
        image,
        data,
        str(tmp_path / "a.png"),
        tmp_path / "a.png",
        base64.b64encode(data).decode(),
        base64.urlsafe_b64encode(data).decode().rstrip("="),
        "data:image/png;base64," + base64.b64encode(data).decode(),
    ]
    for source in sources:
        assert list(load_image(source).getdata()) == list(image.getdata()), type(source)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to view
    rotated = load_image(png_bytes(image, "JPEG", exif=exif.tobytes()))
    assert rotated.size == (20, 40)


@pytest.mark.parametrize(
    ("size", "exif", "said"),
    [
        ((200, 100), None, None),  # 2:1, inside what the model saw
        ((90, 100), None, None),
        ((400, 100), None, "4.0 times as wide as it is tall (400 × 100 px)"),
        ((100, 250), None, "2.5 times as tall as it is wide (100 × 250 px)"),
        ((400, 100), 6, "4.0 times as tall as it is wide (100 × 400 px)"),  # shown turned
    ],
)
def test_very_wide_or_tall_pictures_get_a_hint(tmp_path, size, exif, said):
    path = tmp_path / "picture.jpg"
    kwargs = {}
    if exif:
        tags = Image.Exif()
        tags[0x0112] = exif
        kwargs["exif"] = tags.tobytes()
    Image.new("RGB", size).save(path, "JPEG", **kwargs)
    hint = aspect_hint(path, 112)
    if said is None:
        assert hint is None
    else:
        assert said in hint and "112 × 112 square" in hint and hint.startswith("picture.jpg is ")


def test_a_file_that_is_no_picture_gets_no_hint(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a picture")
    assert aspect_hint(path, 224) is None


def test_alpha_is_composited_on_white():
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert load_image(png_bytes(image)).getpixel((1, 1)) == (255, 255, 255)


def test_sixteen_bit_grey_is_scaled_not_clipped():
    image = Image.new("I;16", (4, 4), 32768)
    value = load_image(png_bytes(image)).getpixel((0, 0))
    assert 120 <= value[0] <= 135


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (b"", "empty"),
        (b"this is not an image at all", "not an image format"),
        (png_bytes(Image.new("RGB", (64, 64)))[:60], "corrupt or truncated|could not be opened"),
        ("http://example.com/cat.png", "URLs are not allowed"),
        ("data:text/plain;base64,aGVsbG8=", "holds text/plain, not an image"),
        ("not a path, not base64!", "neither an existing file"),
        (12345, "cannot read an image from a int"),
    ],
)
def test_bad_images_get_specific_errors(source, message):
    with pytest.raises(ImageError, match=message):
        load_image(source)


def test_pixel_limit_refuses_decompression_bombs():
    data = png_bytes(Image.new("L", (3000, 3000)))
    with pytest.raises(ImageError, match="9 megapixels; the limit is 1 megapixels"):
        load_image(data, limits=ImageLimits(max_pixels=1_000_000))


def png_claiming(width: int, height: int) -> bytes:
    """A 1×1 PNG whose header claims ``width`` × ``height`` (its checksum mended): what a
    decompression bomb shows before a pixel is decoded."""
    import struct
    import zlib

    data = bytearray(png_bytes(Image.new("1", (1, 1))))
    header = b"IHDR" + struct.pack(">II", width, height) + bytes(data[24:29])
    data[12:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(header))
    return bytes(data)


def test_a_header_past_pils_own_bomb_limit_is_refused_as_too_large(tmp_path):
    """20,000 × 20,000 is past twice PIL's limit, where PIL refuses at open, before our own check."""
    data = png_claiming(20_000, 20_000)
    with pytest.raises(ImageTooLarge, match="too large to decode safely"):
        load_image(data)
    path = tmp_path / "bomb.png"
    path.write_bytes(data)
    assert aspect_hint(path, 224) is None  # the engine reports it; the hint stays out of the way


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "localhost", "10.1.2.3", "192.168.0.1", "169.254.169.254", "::1"]
)
def test_urls_to_private_addresses_are_refused(host):
    with pytest.raises(ImageError, match="not a public address"):
        check_public_host(host, 80)
