"""The training recipe: answer-only loss, frozen stages, the original jsonl format, resumable runs."""

from __future__ import annotations

import argparse
import collections
import copy
import json
import math
import random
import re
import shutil

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from owl.config import IMAGE_TOKEN_ID
from owl.model import attend, write_out_attention
from owl.processing import encode_prompt
from owl.train import (
    IGNORE,
    ObjectProbe,
    OrderProbe,
    ReferenceProbe,
    TrainSettings,
    parse_args,
    question_weights,
    set_stage,
    tokenize_as_prompted,
    tokenize_recipe,
    train,
)
from tests.conftest import make_tiny

TEXT = (
    "SYS\nHuman: <image>\nHuman: What colour is the circle?\nAI: Red.\n"
    "Human: How many shapes are there?\nAI: Three."
)


def supervised(ids, labels, tokenizer) -> str:
    return tokenizer.decode([i for i, label in zip(ids, labels, strict=True) if label != IGNORE and i >= 3])


def test_recipe_tokenisation_supervises_answers_and_their_end_tokens(tokenizer):
    ids, labels = tokenize_recipe(TEXT, tokenizer, 9, 512)
    assert ids[0] == tokenizer.bos_token_id and ids.count(IMAGE_TOKEN_ID) == 9
    assert [label for label in labels if label == tokenizer.eos_token_id] == [2, 2]  # one EOS per answer
    assert supervised(ids, labels, tokenizer).replace(" ", "") == "Red.Three."
    assert all(label == IGNORE for i, label in zip(ids, labels, strict=True) if i == IMAGE_TOKEN_ID)


def test_prompt_tokenisation_trains_on_the_ids_a_chat_sends(tokenizer):
    ids, labels = tokenize_as_prompted(TEXT, tokenizer, 9, 512)
    prompt = TEXT[: TEXT.rfind("AI: ") + 4]
    expected = encode_prompt(prompt, tokenizer, 9, num_images=1)
    assert ids[: len(expected)] == expected  # the very prompt the model gets at inference
    assert ids[len(expected) :] == [*tokenizer.encode("Three."), tokenizer.eos_token_id]
    assert supervised(ids, labels, tokenizer).replace(" ", "") == "Red.Three."


def test_asked_answers_train_earlier_answers_after_the_space_a_chat_asks_with():
    """With ``asked_answers`` that share of a conversation's earlier answers is encoded as the chat
    asks for an answer: the ids up to it are the chat's prompt, trailing space token and all, and
    the answer follows as the model generates it. The same answers are supervised, the choice is
    the same on every call, and 0 keeps the chat history's form (with the embedded model's
    tokenizer, where a word takes its space with it)."""
    from owl.checkpoint import DEFAULT_CHECKPOINT
    from owl.tokenizer import SentencePieceTokenizer
    from owl.train import SyntheticData

    tokenizer = SentencePieceTokenizer(DEFAULT_CHECKPOINT / "tokenizer.model")
    data = SyntheticData(3, extra_turns=2)
    cut, earlier = 0, 0
    for index in range(200):
        text = data[index][0]
        first = text.index("AI: ") + 4
        plain = tokenize_as_prompted(text, tokenizer, 4, 4096)
        asked = tokenize_as_prompted(text, tokenizer, 4, 4096, asked=1.0)
        assert tokenize_as_prompted(text, tokenizer, 4, 4096, asked=0.0) == plain
        prompt = encode_prompt(text[:first], tokenizer, 4, text[:first].count("<image>"))
        answer = tokenizer.encode(text[first : text.index("\nHuman: ", first)])
        assert asked[0][: len(prompt) + len(answer)] == [*prompt, *answer]
        assert asked[1][len(prompt) : len(prompt) + len(answer)] == answer
        assert asked[1][: len(prompt)] == [IGNORE] * len(prompt)
        after = len(prompt) + len(answer)  # the line break, where the chat's answer would end
        assert tokenizer.decode(asked[0][after : after + 1]) == "\n"
        assert asked[1][after] == tokenizer.eos_token_id
        assert plain[0][: len(prompt)] != prompt  # in a history the space goes with the answer
        said = [t for t, label in zip(*asked, strict=True) if label not in (IGNORE, tokenizer.eos_token_id)]
        told = [t for t, label in zip(*plain, strict=True) if label not in (IGNORE, tokenizer.eos_token_id)]
        assert tokenizer.decode(said).replace(" ", "") == tokenizer.decode(told).replace(" ", "")
        answers = text.count("AI: ")
        ends = sum(label == tokenizer.eos_token_id for label in asked[1])
        assert ends == answers  # one end per answer, where plain has one for the last
        assert sum(label == tokenizer.eos_token_id for label in plain[1]) == 1
        assert len(asked[0]) == len(plain[0]) + answers - 1  # one space token per earlier answer
        half = tokenize_as_prompted(text, tokenizer, 4, 4096, asked=0.5)
        assert half == tokenize_as_prompted(text, tokenizer, 4, 4096, asked=0.5)
        cut += len(half[0]) - len(plain[0])
        earlier += answers - 1
    assert 0.4 < cut / earlier < 0.6
    with pytest.raises(ValueError, match="asked_answers must be 0 to 1, got -0.5"):
        TrainSettings(out="x", asked_answers=-0.5)


def test_truncation_never_cuts_an_image(tokenizer):
    ids, _ = tokenize_recipe(TEXT, tokenizer, 9, 12)
    assert ids.count(IMAGE_TOKEN_ID) in (0, 9) and len(ids) <= 12


@pytest.mark.parametrize(
    ("stage", "trains_vision", "trains_language"),
    [("all", True, True), ("pretrain", True, False), ("instruct", False, True)],
)
def test_stages_freeze_what_the_recipe_freezes(stage, trains_vision, trains_language):
    model = set_stage(make_tiny("tiny"), stage)
    named = dict(model.named_parameters())
    assert named["vision_model.embeddings.cls_token"].requires_grad is trains_vision
    assert named["abstractor.visual_fc.weight"].requires_grad is trains_vision
    assert named["language_model.lm_head.weight"].requires_grad is trains_language


def test_object_probe_reads_each_object_from_the_patches_under_it():
    from owl.data.scenes import RenderSettings, Scene, Shape

    scene = Scene(
        "white",
        (Shape("circle", "red", "large", 0.5, 0.5, 0.18), Shape("star", "blue", "small", 0.1, 0.1, 0.07)),
    )
    masks = ObjectProbe.masks(scene, RenderSettings(width=200, height=200), grid=8)
    assert masks.shape == (2, 64) and torch.allclose(masks.sum(1), torch.ones(2))
    assert set(masks[0].nonzero().flatten().tolist()) >= {27, 28, 35, 36}  # the middle of an 8x8 grid
    assert masks[0].count_nonzero() < 16 and masks[0, 0] == 0  # only the patches under it
    assert masks[1].nonzero().flatten().tolist() == [0]  # a small shape still owns its centre patch
    # A 2:1 picture is squashed to a square: the circle covers fewer columns than rows.
    wide = ObjectProbe.masks(scene, RenderSettings(width=400, height=200), grid=16)[0].view(16, 16) > 0
    assert wide.any(0).sum() < wide.any(1).sum()

    probe = ObjectProbe(4, grid=8)
    kinds, colours, sizes = probe.targets(scene)
    assert [probe.kinds[i] for i in kinds] == ["circle", "star"]
    assert [probe.colours[i] for i in colours] == ["red", "blue"]
    assert [probe.sizes[i] for i in sizes] == ["large", "small"]
    # Every patch under an object is asked for that object's shape, every other patch for "none".
    labels = probe.patch_kinds(masks, kinds)
    assert set(labels[masks[0] > 0].tolist()) == {1 + probe.kinds.index("circle")}
    assert labels[0] == 1 + probe.kinds.index("star")
    assert (labels > 0).sum() == (masks > 0).sum() and labels[63] == 0


def test_object_probe_can_weigh_the_shape_head_more():
    """``shape_weight`` scales the shape head's term alone: the loss grows by exactly the extra
    weight times that head's cross-entropy (over the seven terms), on the same tokens and heads."""
    from owl.data.scenes import RenderSettings, Scene, Shape

    scene = Scene(
        "white",
        (Shape("circle", "red", "large", 0.5, 0.5, 0.18), Shape("star", "blue", "small", 0.1, 0.1, 0.07)),
    )
    layouts = [(scene, RenderSettings(width=200, height=200))]
    torch.manual_seed(0)
    tokens = torch.randn(1, 1 + 64, 4)
    plain, heavy = ObjectProbe(4, grid=8), ObjectProbe(4, grid=8, shape_weight=4.0)
    heavy.load_state_dict(plain.state_dict())
    objects = ObjectProbe.masks(scene, layouts[0][1], grid=8) @ tokens[0, 1:]
    shape_ce = torch.nn.functional.cross_entropy(plain.shape(objects), plain.targets(scene)[0])
    extra = heavy.loss(tokens, layouts) - plain.loss(tokens, layouts)
    assert shape_ce > 0.1 and torch.allclose(extra, 3.0 * shape_ce / 7, atol=1e-6)


def test_the_vision_stage_trains_the_tower_to_read_objects(tmp_path):
    """150 small steps of the vision stage: held-out objects' colours come out of the pooled tokens."""
    from owl.data.scenes import RenderSettings, Scene, Shape, contrasts, render
    from owl.processing import ImageProcessor
    from owl.train import pretrain_vision

    torch.manual_seed(0)  # the probe's initial weights
    model = make_tiny("tiny")
    processor = ImageProcessor(model.config.vision.image_size)
    settings = TrainSettings(
        out=tmp_path, vision_steps=150, vision_batch_size=8, vision_lr=5e-3, eval_every=1000
    )
    before = {k: v.clone() for k, v in model.vision_model.state_dict().items()}
    probe, queries = pretrain_vision(model, processor, settings, torch.device("cpu"))
    assert queries is None  # the abstractor waits for the next stage unless asked
    assert any(not torch.equal(before[k], v) for k, v in model.vision_model.state_dict().items())
    # Large shapes of every colour that shows on grey, three of each, none of them drawn in training.
    layouts, pixels = [], []
    colours = [c for c in probe.colours if contrasts(c, "grey")] * 3
    for i, colour in enumerate(colours):
        scene = Scene("grey", (Shape(probe.kinds[i % 6], colour, "large", 0.3 + 0.02 * i, 0.5, 0.2),))
        layouts.append((scene, RenderSettings(150, 100)))
        pixels.append(processor.pixels(render(scene, width=150, height=100)))
    model.eval()
    scores = probe.accuracy(model.vision_model(torch.stack(pixels)), layouts)
    assert scores["colour"] >= 0.5  # a tower that learnt nothing gets about 1 in 7


def test_the_vision_stage_can_train_the_abstractor_to_gather_each_cell(tmp_path):
    """With ``vision_abstractor`` the query tokens and abstractor train beside the tower: on
    held-out pictures the query of an object's cell names its colour."""
    from owl.data.scenes import RenderSettings, Scene, Shape, contrasts, render
    from owl.processing import ImageProcessor
    from owl.train import pretrain_vision

    torch.manual_seed(0)
    model = make_tiny("tiny")
    processor = ImageProcessor(model.config.vision.image_size)
    settings = TrainSettings(
        out=tmp_path,
        vision_steps=300,
        vision_batch_size=8,
        vision_lr=5e-3,
        eval_every=1000,
        vision_abstractor=True,
    )
    before = {k: v.clone() for k, v in model.abstractor.state_dict().items()}
    _, queries = pretrain_vision(model, processor, settings, torch.device("cpu"))
    assert any(not torch.equal(before[k], v) for k, v in model.abstractor.state_dict().items())
    # One large shape per picture, in each quarter in turn (the tiny config's 2x2 grid of cells).
    layouts, pixels = [], []
    colours = [c for c in queries.colours if contrasts(c, "grey")] * 2
    for i, colour in enumerate(colours):
        x, y = (0.27, 0.73)[i % 2], (0.27, 0.73)[(i // 2) % 2]
        scene = Scene("grey", (Shape(queries.kinds[1 + i % 6], colour, "large", x, y, 0.17),))
        layouts.append((scene, RenderSettings(120, 120)))
        pixels.append(processor.pixels(render(scene, width=120, height=120)))
    model.eval()
    vectors = model.encode_images(torch.stack(pixels))
    assert queries.accuracy(vectors, layouts)["query colour"] >= 0.5  # chance is 1 in 8


def test_query_probe_asks_each_query_for_the_object_in_its_cell():
    """Vectors trained against the probe's loss alone end up saying what the probe asks of each query."""
    from owl.data.scenes import RenderSettings, Scene, Shape
    from owl.train import QueryProbe

    torch.manual_seed(0)
    scene = Scene(
        "white",
        (Shape("star", "blue", "small", 0.8, 0.3, 0.07), Shape("circle", "red", "large", 0.25, 0.7, 0.15)),
    )
    probe = QueryProbe(16, queries=16).requires_grad_(False)  # a 4x4 grid of cells, row by row
    assert [probe.cell(shape) for shape in scene.shapes] == [1 * 4 + 3, 2 * 4 + 1]
    vectors = torch.randn(1, 17, 16, requires_grad=True)
    optimizer = torch.optim.Adam([vectors], lr=0.05)
    for _ in range(600):
        loss = probe.loss(vectors, [(scene, RenderSettings(100, 100))])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    slots = vectors[0, :16].detach()
    kinds = [probe.kinds[i] for i in probe.shape(slots).argmax(-1)]
    assert kinds[7] == "star" and kinds[9] == "circle" and kinds.count("none") == 14
    assert [probe.colours[i] for i in probe.colour(slots[[7, 9]]).argmax(-1)] == ["blue", "red"]
    assert [probe.sizes[i] for i in probe.size(slots[[7, 9]]).argmax(-1)] == ["small", "large"]
    assert torch.allclose(probe.position(slots[[7, 9]]), torch.tensor([[0.8, 0.3], [0.25, 0.7]]), atol=0.05)


def test_query_probe_tally_reads_how_many_of_each_colour_and_shape_off_the_queries_mean():
    """With ``tally``, heads on the mean of the cells' vectors are asked how many objects of each
    colour and shape the picture holds; when each object's cell holds a code of its colour and
    shape, the mean adds them up and the heads learn to read the counts, twos and threes too."""
    from owl.data.scenes import RenderSettings, random_scene
    from owl.train import QueryProbe

    torch.manual_seed(0)
    probe = QueryProbe(16, queries=16, tally=True)
    one_hot = torch.nn.functional.one_hot

    def vectors(layouts) -> torch.Tensor:
        """Each object's cell holds its colour and its shape, one-hot (added where two share one)."""
        out = torch.zeros(len(layouts), 17, 16)
        for picture, (scene, _) in enumerate(layouts):
            for shape in scene.shapes:
                colour = one_hot(torch.tensor(probe.colours.index(shape.colour)), 8)
                kind = one_hot(torch.tensor(probe.kinds.index(shape.kind) - 1), 8)
                out[picture, probe.cell(shape)] += 16.0 * torch.cat([colour, kind])  # the mean: counts
        return out

    rng = random.Random(0)
    train, held = ([(random_scene(rng), RenderSettings(100, 100)) for _ in range(n)] for n in (512, 256))
    twos = [
        scene for scene, _ in held if max(collections.Counter(s.colour for s in scene.shapes).values()) > 1
    ]
    assert len(twos) > 20
    optimizer = torch.optim.Adam(probe.parameters(), lr=0.1)
    train_vectors = vectors(train)
    for _ in range(500):
        loss = probe.loss(train_vectors, train)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    scores = probe.accuracy(vectors(held), held)
    assert scores["tally of colours"] >= 0.9 and scores["tally of shapes"] >= 0.9
    assert "tally of colours" not in QueryProbe(16, queries=16).accuracy(vectors(held), held)
    said, _ = probe.counted(vectors([(scene, None) for scene in twos])[:, :16])
    repeated = [
        int(said[picture, probe.colours.index(colour)].argmax()) == n
        for picture, scene in enumerate(twos)
        for colour, n in collections.Counter(s.colour for s in scene.shapes).items()
        if n > 1
    ]
    assert sum(repeated) >= 0.7 * len(repeated)  # most colours there twice or three times: so counted


def test_query_probe_leaves_out_a_cell_with_two_centres():
    from owl.data.scenes import RenderSettings, Scene, Shape
    from owl.train import QueryProbe

    crowded = Scene(
        "white",
        (
            Shape("star", "blue", "small", 0.07, 0.07, 0.06),
            Shape("cross", "red", "small", 0.2, 0.22, 0.06),
        ),
    )
    probe = QueryProbe(8, queries=16)
    assert probe.cell(crowded.shapes[0]) == probe.cell(crowded.shapes[1]) == 0
    vectors = torch.randn(1, 17, 8)
    # Whatever the vectors say about cell 0, the loss does not change: nothing is asked of it.
    changed = vectors.clone()
    changed[0, 0] = torch.randn(8) * 10
    layouts = [(crowded, RenderSettings(100, 100))]
    assert torch.isclose(probe.loss(vectors, layouts), probe.loss(changed, layouts))


def test_order_probe_numbers_each_image_slot_by_its_image_in_its_row():
    s, t = IMAGE_TOKEN_ID, 7  # an image slot, a text token
    ids = torch.tensor([[t, s, s, t, t, s, s, t], [t, t, s, s, t, t, t, t]])
    labels = OrderProbe(8, per_image=2).labels(ids)
    n = IGNORE
    assert labels.tolist() == [[n, 0, 0, n, n, 1, 1, n], [n, n, 0, 0, n, n, n, n]]


def fit(model, params, captured: list, loss_of, ids, pixels, steps: int) -> torch.Tensor:
    """Trains ``params`` through ``loss_of(what a hook put in captured)`` alone; returns the last loss."""
    optimizer = torch.optim.Adam(params, lr=3e-3)
    for _ in range(steps):
        captured.clear()
        model(ids, pixels)
        loss = loss_of(captured[0])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss


def train_through(model, part, params, loss_of, ids, pixels, steps: int = 150) -> torch.Tensor:
    """Trains ``params`` through ``loss_of(output of part)`` alone; returns ``part``'s output after."""
    captured = []
    hook = part.register_forward_hook(lambda module, args, out: captured.append(out))
    try:
        fit(model, params, captured, loss_of, ids, pixels, steps)
        captured.clear()
        with torch.no_grad():
            model(ids, pixels)
    finally:
        hook.remove()
    return captured[0]


def train_probe_layer(model, probe, index: int, loss_of, ids) -> torch.Tensor:
    """Trains the decoder layers and ``probe`` through ``loss_of(output of layer index)`` alone, on
    random pictures; checks that layer is the one the probe hooks and returns its output after."""
    size = model.config.vision.image_size
    pixels = torch.randn(ids.shape[0], 3, size, size)
    layers = model.language_model.get_decoder().layers
    assert type(probe).part(model) is layers[index]
    return train_through(
        model, layers[index], [*layers.parameters(), *probe.parameters()], loss_of, ids, pixels
    )


def train_attention(model, probe, loss_of, ids, pixels, steps: int = 60) -> torch.Tensor:
    """Trains the language model through ``loss_of(what the probe captured)`` alone; returns the
    last loss."""
    captured = []
    hook = probe.part(model).register_forward_pre_hook(
        lambda *call: captured.append(probe.capture(*call)), with_kwargs=True
    )
    try:
        return fit(model, model.language_model.parameters(), captured, loss_of, ids, pixels, steps)
    finally:
        hook.remove()


def attention_seen(model, probe, ids, pixels) -> tuple:
    """What ``probe`` captures of its attention layer in one forward pass (no gradients)."""
    captured = []
    hook = probe.part(model).register_forward_pre_hook(
        lambda *call: captured.append(probe.capture(*call)), with_kwargs=True
    )
    try:
        with torch.no_grad():
            model(ids, pixels)
    finally:
        hook.remove()
    return captured[0]


def test_order_probe_trains_the_first_layer_to_know_which_image_a_vector_is_from():
    """Through the probe alone, the first decoder layer learns to tell the second of two identical
    pictures from the first (only what comes before them differs)."""
    torch.manual_seed(0)
    model = make_tiny()
    per_image = model.config.num_image_tokens
    probe = OrderProbe.for_model(model)
    row = [5, 6] + [IMAGE_TOKEN_ID] * per_image + [7] + [IMAGE_TOKEN_ID] * per_image + [8]
    ids = torch.tensor([row, row])
    pixels = torch.zeros(4, 3, model.config.vision.image_size, model.config.vision.image_size)
    first_layer = OrderProbe.part(model)
    params = [*first_layer.parameters(), *probe.parameters()]
    hidden = train_through(model, first_layer, params, lambda out: probe.loss(out, ids), ids, pixels)
    guess = probe.index(hidden[0]).argmax(-1)
    slots = ids[0] == IMAGE_TOKEN_ID
    assert guess[slots].tolist() == [0] * per_image + [1] * per_image


@pytest.mark.parametrize("text", ["llama", "bloom"])
def test_order_probe_hooks_the_first_decoder_layer_of_either_language_model(text):
    from owl.checkpoint import build_model
    from owl.config import preset
    from tests.test_variants import BLOOM_TEXT

    config = preset("tiny") if text == "llama" else preset("tiny").replace(name="tiny-bloom", text=BLOOM_TEXT)
    model = build_model(config, device=torch.device("cpu"), dtype=torch.float32)
    decoder = model.language_model.get_decoder()
    first = decoder.layers[0] if text == "llama" else decoder.h[0]
    assert OrderProbe.part(model) is first


def two_image_row(per_image: int, between: int = 7) -> list[int]:
    """Text, a picture, ``between``, a second picture, a question and a two-token answer."""
    return (
        [5, 6] + [IMAGE_TOKEN_ID] * per_image + [between] + [IMAGE_TOKEN_ID] * per_image + [8, 9, 10, 11, 12]
    )


def answer_labels(ids: torch.Tensor) -> torch.Tensor:
    labels = torch.full_like(ids, IGNORE)
    labels[:, -2:] = ids[:, -2:]
    return labels


def test_reference_probe_asks_the_positions_before_each_answer_token_about_their_image():
    probe = ReferenceProbe(per_image=2)
    s = IMAGE_TOKEN_ID
    ids = torch.tensor([[4, s, s, 5, s, s, 6, 7, 8, 9, 10], [4, s, s, 6, 7, 8, 9, 10, 11, 12, 13]])
    labels = torch.full_like(ids, IGNORE)
    labels[:, 7:9] = ids[:, 7:9]  # first answer
    labels[:, 10] = ids[:, 10]  # second answer
    # Row 0: a turn about the second image, then a comparison; row 1 has one image, nothing to choose.
    assert probe.targets(ids, labels, [[1, None], [0, 0]]) == [(0, 6, 1), (0, 7, 1)]
    assert probe.targets(ids, labels, [[None, 0], [0, 0]]) == [(0, 9, 0)]


def test_reference_probe_reads_the_models_own_attention():
    """The probe's loss is minus the log of the attention mass the last layer's first heads put on
    the asked image, as the model itself computes it (eager attention, returned weights)."""
    torch.manual_seed(0)
    model = make_tiny()
    per_image = model.config.num_image_tokens
    probe = ReferenceProbe.for_model(model)
    ids = torch.tensor([two_image_row(per_image)] * 2)
    labels, references = answer_labels(ids), [[0], [1]]
    size = model.config.vision.image_size
    captured = []
    hook = ReferenceProbe.part(model).register_forward_pre_hook(
        lambda *call: captured.append(ReferenceProbe.capture(*call)), with_kwargs=True
    )
    model.language_model.config._attn_implementation = "eager"
    with torch.no_grad():
        attentions = model(ids, torch.randn(4, 3, size, size), output_attentions=True).attentions[-1]
        loss = probe.loss(captured[0], ids, labels, references)
    hook.remove()
    slots = ids[0] == IMAGE_TOKEN_ID
    image = (slots.long().cumsum(0) - 1) // per_image
    expected = [
        -torch.log(attentions[row, head, position][slots & (image == asked)].sum())
        for row, position, asked in probe.targets(ids, labels, references)
        for head in range(ReferenceProbe.heads)
    ]
    assert len(expected) == 8
    assert torch.isclose(loss, torch.stack(expected).mean(), atol=1e-5)


def test_reference_probe_teaches_the_last_layer_to_look_at_the_asked_image():
    """Two rows alike but for one token between the pictures; trained through the probe alone, the
    last layer's heads learn to look at the first picture in one row and the second in the other."""
    torch.manual_seed(0)
    model = make_tiny()
    per_image = model.config.num_image_tokens
    probe = ReferenceProbe.for_model(model)
    ids = torch.tensor([two_image_row(per_image, 20), two_image_row(per_image, 21)])
    labels, references = answer_labels(ids), [[0], [1]]
    size = model.config.vision.image_size
    pixels = torch.randn(2, 3, size, size).repeat(2, 1, 1, 1)
    loss = train_attention(model, probe, lambda out: probe.loss(out, ids, labels, references), ids, pixels)
    assert loss.item() < -math.log(0.9)  # at least 90 % of those heads' attention on the asked image


def grounding_scenes():
    from owl.data.scenes import Scene, Shape

    first = Scene(
        "white",
        (Shape("star", "blue", "small", 0.8, 0.3, 0.07), Shape("circle", "red", "large", 0.25, 0.7, 0.15)),
    )
    second = Scene("black", (Shape("star", "red", "small", 0.2, 0.2, 0.07),))
    return first, second


def test_grounding_probe_asks_each_object_word_about_the_objects_it_names():
    from owl.train import GroundingProbe

    red, star, green = 50, 51, 52
    probe = GroundingProbe(
        per_image=5,
        grid=2,
        words={red: ("colour", "red"), star: ("kind", "star"), green: ("colour", "green")},
    )
    first, second = grounding_scenes()  # cells (2x2): blue star 1, red circle 2; red star 0
    s = IMAGE_TOKEN_ID
    ids = torch.tensor([[4, star, s, s, s, s, s, 7, star, 8, s, s, s, s, s, 9, red, green, star, 10, red]])
    labels = torch.full_like(ids, IGNORE)
    labels[0, 20] = red  # an answer word: not asked
    assert probe.targets(ids, labels, [[first, second]]) == [
        (0, 8, [3]),  # the star of the first picture (a word before every picture is not asked)
        (0, 16, [4, 10]),  # the red circle, and the red star of the second picture
        (0, 18, [3, 10]),  # both stars; "green" names nothing and is not asked
    ]
    adjacent = torch.tensor([[4, *[s] * 10, star, red]])  # two pictures with nothing between them
    assert probe.targets(adjacent, torch.full_like(adjacent, IGNORE), [[first, second]]) == [
        (0, 11, [2, 6]),
        (0, 12, [3, 6]),
    ]


def test_grounding_probe_teaches_the_first_layer_to_find_the_named_object():
    """Two rows alike but for the object word after one picture; trained through the probe alone,
    the first layer's heads learn to look at the star's image vector in one row and the circle's in
    the other."""
    from owl.train import GroundingProbe

    torch.manual_seed(0)
    model = make_tiny()
    per_image = model.config.num_image_tokens
    star, circle = 20, 21
    probe = GroundingProbe(per_image, 2, {star: ("kind", "star"), circle: ("kind", "circle")})
    first, _ = grounding_scenes()
    ids = torch.tensor([[5, 6, *[IMAGE_TOKEN_ID] * per_image, 7, word, 8] for word in (star, circle)])
    labels = torch.full_like(ids, IGNORE)
    size = model.config.vision.image_size
    pixels = torch.randn(1, 3, size, size).repeat(2, 1, 1, 1)
    assert GroundingProbe.part(model) is model.language_model.get_decoder().layers[0].self_attn
    loss = train_attention(
        model, probe, lambda out: probe.loss(out, ids, labels, [[first], [first]]), ids, pixels
    )
    assert [slots for _, _, slots in probe.targets(ids, labels, [[first], [first]])] == [[2 + 1], [2 + 2]]
    assert loss.item() < -math.log(0.9)  # at least 90 % of those heads' attention on the named object


def test_summary_probe_asks_each_pictures_last_vector_about_the_whole_picture():
    from owl.train import SummaryProbe

    probe = SummaryProbe(8, per_image=3)
    first, second = grounding_scenes()
    s = IMAGE_TOKEN_ID
    ids = torch.tensor([[4, s, s, s, 7, s, s, s, 8], [4, s, s, s, 7, 8, 9, 9, 9]])
    found = probe.targets(ids, [[first, second], [second]])
    assert [(row, end) for row, end, _ in found] == [(0, 3), (0, 7), (1, 3)]
    assert [scene for _, _, scene in found] == [first, second, second]


def test_summary_probe_teaches_a_pictures_last_vector_what_the_picture_holds():
    """Two rows alike but for their pictures (two objects, then one); trained through the probe
    alone, the first two layers bring each picture's count and shapes to its last vector, whose
    input is the same learned vector in both."""
    from owl.train import SummaryProbe

    torch.manual_seed(0)
    model = make_tiny()
    per_image = model.config.num_image_tokens
    probe = SummaryProbe.for_model(model)
    first, second = grounding_scenes()
    ids = torch.tensor([[5, 6, *[IMAGE_TOKEN_ID] * per_image, 7]] * 2)
    hidden = train_probe_layer(model, probe, 1, lambda out: probe.loss(out, ids, [[first], [second]]), ids)
    end = hidden[:, 2 + per_image - 1]
    assert (probe.count(end).argmax(-1) + 1).tolist() == [2, 1]
    shapes = [[probe.kinds[i] for i in (row > 0).nonzero().flatten()] for row in probe.shapes(end)]
    assert shapes == [["circle", "star"], ["star"]]


def test_summary_probe_with_counts_teaches_a_pictures_last_vector_how_many_of_each_it_holds():
    """As above, with ``counts``: two red objects and a blue one against one red; the last vector
    says how many of each colour and shape, not only which are there."""
    from owl.data.scenes import Scene, Shape
    from owl.train import SummaryProbe

    torch.manual_seed(0)
    model = make_tiny()
    per_image = model.config.num_image_tokens
    probe = SummaryProbe.for_model(model, counts=True)
    first = Scene(
        "white",
        (
            Shape("star", "red", "small", 0.8, 0.3, 0.07),
            Shape("circle", "red", "large", 0.25, 0.7, 0.15),
            Shape("star", "blue", "small", 0.55, 0.2, 0.07),
        ),
    )
    _, second = grounding_scenes()  # a red star
    ids = torch.tensor([[5, 6, *[IMAGE_TOKEN_ID] * per_image, 7]] * 2)
    hidden = train_probe_layer(model, probe, 1, lambda out: probe.loss(out, ids, [[first], [second]]), ids)
    end = hidden[:, 2 + per_image - 1]
    colours = probe.colour_counts(end).view(2, len(probe.colours), -1).argmax(-1)
    kinds = probe.kind_counts(end).view(2, len(probe.kinds), -1).argmax(-1)
    assert [colours[:, probe.colours.index(c)].tolist() for c in ("red", "blue", "green")] == [
        [2, 1],
        [1, 0],
        [0, 0],
    ]
    assert [kinds[:, probe.kinds.index(k)].tolist() for k in ("star", "circle", "square")] == [
        [2, 1],
        [1, 0],
        [0, 0],
    ]


def four_words() -> dict[int, tuple[str, str]]:
    """Token ids 50-53 as "red", "star", "circle", "blue"."""
    return {50: ("colour", "red"), 51: ("kind", "star"), 52: ("kind", "circle"), 53: ("colour", "blue")}


def test_answer_probe_asks_each_answer_word_about_what_it_describes_in_the_turns_picture():
    from owl.train import AnswerProbe

    red, star, circle, blue = 50, 51, 52, 53
    words = four_words()
    probe = AnswerProbe(per_image=5, grid=2, words=words)
    first, second = grounding_scenes()  # cells (2x2): blue star 1, red circle 2; red star 0
    s = IMAGE_TOKEN_ID
    # picture, question, answer "red circle blue star", picture, question, answer "star red",
    # a comparison answered "star"
    ids = torch.tensor(
        [[4, *[s] * 5, 7, 8, red, circle, blue, star, 2, *[s] * 5, 9, star, red, 2, 7, star, 2]]
    )
    labels = torch.full_like(ids, IGNORE)
    for p in (*range(8, 13), 19, 20, 21, 23, 24):
        labels[0, p] = ids[0, p]
    found = probe.targets(
        ids, labels, [[first, second]], [[(0, "shape"), (1, "colour"), (None, "same_shapes")]]
    )
    assert found == [
        (0, 7, [1 + 2]),  # "red" in the first picture: its red circle
        (0, 8, [1 + 2]),  # "circle" after "red": the red circle
        (0, 9, [1 + 1]),  # "blue": the blue star
        (0, 10, [1 + 1]),  # "star" after "blue": the blue star, not the second picture's star
        (0, 18, [13 + 0]),  # the second turn is about the second picture: its red star
        (0, 19, [13 + 0]),
    ]


def test_answer_probe_asks_each_word_of_a_description_about_the_object_it_describes():
    from owl.data.scenes import Scene, Shape
    from owl.train import AnswerProbe

    red, star, circle, blue, white = 50, 51, 52, 53, 54
    words = {**four_words(), white: ("colour", "white")}
    probe = AnswerProbe(per_image=5, grid=2, words=words)
    scene = Scene(  # left to right: red star (cell 0), red circle (cell 2), blue star (cell 1)
        "white",
        (
            Shape("star", "blue", "small", 0.8, 0.2, 0.07),
            Shape("star", "red", "small", 0.2, 0.2, 0.07),
            Shape("circle", "red", "small", 0.3, 0.8, 0.07),
        ),
    )
    s = IMAGE_TOKEN_ID
    # picture, question, "A red star, a red circle and a blue star on a white background."
    answer = [9, red, star, 9, red, circle, 9, blue, star, 9, white, 9, 2]
    ids = torch.tensor([[4, *[s] * 5, 7, *answer]])
    labels = torch.full_like(ids, IGNORE)
    labels[0, 7:] = ids[0, 7:]
    found = probe.targets(ids, labels, [[scene]], [[(0, "describe")]])
    first = 1  # the picture's first image vector
    assert found == [
        (0, 7, [first + 0]),  # the first "red": the red star only, not the red circle too
        (0, 8, [first + 0]),
        (0, 10, [first + 2]),  # the second "red": the red circle
        (0, 11, [first + 2]),
        (0, 13, [first + 1]),  # "blue star": the blue star
        (0, 14, [first + 1]),
    ]  # the background's "white" is not asked
    # Asked as another kind, the same words ask for every object they fit, the background's too
    # (no white object: not asked).
    found = probe.targets(ids, labels, [[scene]], [[(0, "colour")]])
    assert found[0] == (0, 7, [first + 0, first + 2]) and len(found) == 6
    # A description whose kind words do not match the objects one to one falls back to that.
    short = ids.clone()
    short[0, 15] = 9  # the last "star"
    assert probe.targets(short, labels, [[scene]], [[(0, "describe")]])[0] == (0, 7, [first + 0, first + 2])


def test_answer_probe_asks_two_heads_beside_the_reference_probes():
    from owl.train import AnswerProbe, ReferenceProbe

    model = make_tiny()
    assert AnswerProbe.part(model) is ReferenceProbe.part(model)
    asked = set(range(AnswerProbe.first_head, AnswerProbe.first_head + AnswerProbe.heads))
    assert not asked & set(range(ReferenceProbe.first_head, ReferenceProbe.first_head + ReferenceProbe.heads))
    assert max(asked) < model.config.text["num_attention_heads"]


def test_comparison_probe_asks_two_heads_to_read_both_pictures_at_a_comparisons_answer():
    from owl.train import ComparisonProbe

    red, star, circle = 50, 51, 52
    words = {red: ("colour", "red"), star: ("kind", "star"), circle: ("kind", "circle")}
    probe = ComparisonProbe(per_image=5, grid=2, words=words)
    first, second = grounding_scenes()  # cells (2x2): blue star 1, red circle 2; red star 0
    s = IMAGE_TOKEN_ID
    # two pictures, "same count?" answered at 13-14; "which has a red star?" at 19-20; a question
    # about the first picture ("red?") at 23-24
    ids = torch.tensor([[4, *[s] * 5, *[s] * 5, 7, 8, 9, 2, 7, red, star, 8, 9, 2, 7, red, 9, 2]])
    labels = torch.full_like(ids, IGNORE)
    for p in (13, 14, 19, 20, 23, 24):
        labels[0, p] = ids[0, p]
    turns = [[(None, "same_count"), (1, "which_image"), (0, "colour")]]
    found = probe.targets(ids, labels, [[first, second]], turns)
    assert found == [
        (0, 12, [[5], [10]]),  # each head on one picture's last vector
        (0, 13, [[5], [10]]),
        (0, 18, [[6 + 0], [6 + 0]]),  # the second picture's red star, not the first's red circle
        (0, 19, [[6 + 0], [6 + 0]]),
    ]
    # Before the second picture has arrived there is nothing to compare.
    assert probe.targets(ids[:, :8], labels[:, :8], [[first, second]], turns) == []
    # "How many red things in the second image?" (answered at 23-24): only with counts, both heads
    # on that picture's last vector, where the summary says how many of each it holds.
    counted = [[(None, "same_count"), (1, "which_image"), (1, "count_colour")]]
    assert probe.targets(ids, labels, [[first, second]], counted) == found[:4]
    counting = ComparisonProbe(per_image=5, grid=2, words=words, counts=True)
    assert counting.targets(ids, labels, [[first, second]], counted) == [
        *found[:4],
        (0, 22, [[10], [10]]),
        (0, 23, [[10], [10]]),
    ]
    about_first = [[(None, "same_count"), (1, "which_image"), (0, "count")]]
    assert counting.targets(ids, labels, [[first, second]], about_first)[4:] == [
        (0, 22, [[5], [5]]),
        (0, 23, [[5], [5]]),
    ]


def test_comparison_probe_teaches_two_heads_to_read_one_picture_each():
    """Trained through the probe alone, the third layer's two asked heads put at least 90 % of
    their attention on their own picture's last vector."""
    from owl.train import ComparisonProbe

    torch.manual_seed(0)
    model = make_tiny()
    per_image = model.config.num_image_tokens
    probe = ComparisonProbe(per_image, grid=2, words={})
    first, second = grounding_scenes()
    ids = torch.tensor([[5, *[IMAGE_TOKEN_ID] * (2 * per_image), 7, 8, 9, 2]] * 2)
    labels = torch.full_like(ids, IGNORE)
    labels[:, -3:] = ids[:, -3:]
    turns = [[(None, "same_count")], [(None, "more_objects")]]
    assert len(probe.targets(ids, labels, [[first, second]] * 2, turns)) == 2 * 3
    size = model.config.vision.image_size
    pixels = torch.randn(4, 3, size, size)
    assert ComparisonProbe.part(model) is model.language_model.get_decoder().layers[-2].self_attn
    pictures = [[first, second]] * 2
    loss = train_attention(
        model, probe, lambda out: probe.loss(out, ids, labels, pictures, turns), ids, pixels
    )
    assert loss.item() < -math.log(0.9)


def test_binding_probe_asks_only_words_that_name_one_object():
    from owl.train import BindingProbe

    red, star, circle = 50, 51, 52
    words = {red: ("colour", "red"), star: ("kind", "star"), circle: ("kind", "circle")}
    probe = BindingProbe(8, per_image=5, words=words)
    first, second = grounding_scenes()  # blue star, red circle; then a red star
    s = IMAGE_TOKEN_ID
    ids = torch.tensor(
        [[4, circle, s, s, s, s, s, 7, star, circle, 8, s, s, s, s, s, 9, red, star, circle, 10, circle]]
    )
    labels = torch.full_like(ids, IGNORE)
    labels[0, 21] = circle  # an answer word: not asked
    found = [
        (row, position, (shape.colour, shape.kind))
        for row, position, shape in probe.targets(ids, labels, [[first, second]])
    ]
    assert found == [
        (0, 8, ("blue", "star")),  # the only star before the second picture
        (0, 9, ("red", "circle")),
        (0, 19, ("red", "circle")),  # "red" and "star" name two objects each by now: not asked
    ]


def test_binding_probe_teaches_the_first_layer_to_bring_the_named_object_to_its_word():
    """Two rows alike but for their pictures; trained through the probe alone, the first layer
    carries each row's star (its colour and place) to the word "star"."""
    from owl.data.scenes import Scene, Shape
    from owl.train import BindingProbe

    torch.manual_seed(0)
    model = make_tiny()
    per_image, star = model.config.num_image_tokens, 20
    probe = BindingProbe(model.config.text_hidden_size, per_image, {star: ("kind", "star")})
    scenes = [
        [Scene("white", (Shape("star", "blue", "small", 0.2, 0.3, 0.07),))],
        [Scene("white", (Shape("star", "red", "large", 0.8, 0.75, 0.15),))],
    ]
    ids = torch.tensor([[5, 6, *[IMAGE_TOKEN_ID] * per_image, 7, star, 8]] * 2)
    labels = torch.full_like(ids, IGNORE)
    size = model.config.vision.image_size
    pixels = torch.randn(2, 3, size, size)
    first_layer = BindingProbe.part(model)
    assert first_layer is model.language_model.get_decoder().layers[0]
    params = [*first_layer.parameters(), *probe.parameters()]
    hidden = train_through(
        model, first_layer, params, lambda out: probe.loss(out, ids, labels, scenes), ids, pixels
    )
    word = hidden[:, per_image + 3]
    assert [probe.colours[i] for i in probe.colour(word).argmax(-1)] == ["blue", "red"]
    assert torch.allclose(probe.position(word), torch.tensor([[0.2, 0.3], [0.8, 0.75]]), atol=0.1)


def test_relation_probe_compares_the_two_named_objects_at_the_second_ones_word():
    from owl.data.scenes import Scene, Shape
    from owl.train import RelationProbe

    red, star, circle, blue = 50, 51, 52, 53
    words = four_words()
    probe = RelationProbe(8, words)
    scene = Scene(
        "white",
        (
            Shape("star", "blue", "small", 0.8, 0.3, 0.07),
            Shape("circle", "red", "large", 0.25, 0.35, 0.15),
            Shape("star", "red", "small", 0.5, 0.9, 0.07),
        ),
    )
    s, ai = IMAGE_TOKEN_ID, 9
    # "<image> is the blue star above the circle? AI: Above. is the red star ... the red circle? AI: Below."
    ids = torch.tensor(
        [[4, s, s, s, 7, blue, star, 8, circle, 10, ai, 30, 2, 7, red, star, 8, red, circle, 10, ai, 31, 2]]
    )
    labels = torch.full_like(ids, IGNORE)
    labels[0, 11:13] = ids[0, 11:13]
    labels[0, 21:23] = ids[0, 21:23]
    turns = [[(0, "relative"), (0, "relative")]]
    found = probe.targets(ids, labels, [[scene]], turns)
    assert [(row, position) for row, position, _ in found] == [(0, 8), (0, 18)]
    assert [(a.colour, a.kind, b.colour, b.kind) for _, _, (a, b) in found] == [
        ("blue", "star", "red", "circle"),
        ("red", "star", "red", "circle"),
    ]
    assert probe.targets(ids, labels, [[scene]], [[(0, "where"), (0, "colour")]]) == []
    # "star" alone names two objects: no comparison is asked
    ids[0, 5] = 4
    assert [position for _, position, _ in probe.targets(ids, labels, [[scene]], turns)] == [18]
    # the blue star and the red circle are 0.05 apart vertically: only across is asked; the red star
    # is right of and below the red circle
    hidden = torch.zeros(1, ids.shape[1], 8)
    with torch.no_grad():
        probe.sides.bias.copy_(torch.tensor([-9.0, 9.0]))  # "left of: no", "above: yes"
    ids[0, 5] = blue
    assert probe.loss(hidden, ids, labels, [[scene]], turns).item() == pytest.approx(
        (math.log1p(math.exp(-9)) * 2 + math.log1p(math.exp(9))) / 3, rel=1e-4
    )


def test_relation_probe_teaches_the_second_layer_to_compare_two_places_at_the_word():
    """Two rows alike but for their pictures (the star left of and above the circle, then right of
    and below it); trained through the probe alone, the second layer's output at "circle" says so."""
    from owl.data.scenes import Scene, Shape
    from owl.train import RelationProbe

    torch.manual_seed(0)
    model = make_tiny()
    per_image, star, circle, ai = model.config.num_image_tokens, 20, 21, 22
    probe = RelationProbe(model.config.text_hidden_size, {star: ("kind", "star"), circle: ("kind", "circle")})
    scenes = [
        [
            Scene(
                "white",
                (
                    Shape("star", "blue", "small", 0.2, 0.3, 0.07),
                    Shape("circle", "red", "large", 0.7, 0.8, 0.15),
                ),
            )
        ],
        [
            Scene(
                "white",
                (
                    Shape("star", "blue", "small", 0.8, 0.75, 0.07),
                    Shape("circle", "red", "large", 0.3, 0.2, 0.15),
                ),
            )
        ],
    ]
    ids = torch.tensor([[5, 6, *[IMAGE_TOKEN_ID] * per_image, 7, star, 8, circle, ai, 9, 2]] * 2)
    labels = torch.full_like(ids, IGNORE)
    labels[:, -2:] = ids[:, -2:]
    turns = [[(0, "relative")], [(0, "relative")]]
    hidden = train_probe_layer(model, probe, 1, lambda out: probe.loss(out, ids, labels, scenes, turns), ids)
    word = hidden[:, per_image + 5]
    assert (probe.sides(word) > 0).tolist() == [[True, True], [False, False]]


def test_count_probe_asks_each_question_word_how_many_objects_it_names_in_each_picture():
    from owl.data.scenes import Scene, Shape
    from owl.train import CountProbe

    red, stars, star = 50, 51, 52
    words = {red: ("colour", "red"), stars: ("kind", "star"), star: ("kind", "star")}
    probe = CountProbe(8, per_image=3, words=words)
    first = Scene(
        "white",
        (
            Shape("star", "red", "small", 0.2, 0.3, 0.07),
            Shape("star", "blue", "small", 0.8, 0.3, 0.07),
            Shape("circle", "red", "large", 0.5, 0.8, 0.15),
        ),
    )
    second = Scene("black", (Shape("square", "green", "small", 0.5, 0.5, 0.07),))
    s = IMAGE_TOKEN_ID
    ids = torch.tensor(
        [[4, red, s, s, s, 7, stars, 8, red, 9, red, star, 10, s, s, s, 8, red, star, 11, stars]]
    )
    labels = torch.full_like(ids, IGNORE)
    labels[0, 20] = stars  # an answer word: not asked
    found = probe.targets(ids, labels, [[first, second]])
    assert found == [
        (0, 6, [2]),  # two stars
        (0, 8, [2]),  # two red objects
        (0, 10, [2]),
        (0, 11, [1]),  # "red star": one
        (0, 17, [2, 0]),  # after the second picture, a count for each
        (0, 18, [1, 0]),
    ]  # "red" before any picture: not asked
    hidden = torch.zeros(1, ids.shape[1], 8)
    with torch.no_grad():
        probe.count.bias.zero_()
        probe.count.bias[2] = 20.0  # the first picture: "two"
        probe.count.bias[probe.counts] = 20.0  # the second: "none"
    # wrong at the two "red star" counts of one in the first picture, right everywhere else
    assert probe.loss(hidden, ids, labels, [[first, second]]).item() == pytest.approx(2 * 20 / 8, rel=1e-3)


def tally_scene():
    from owl.data.scenes import Scene, Shape

    # cells of a 2x2 grid: two red stars share cell 0, a blue star in cell 1, a red circle in cell 3
    return Scene(
        "white",
        (
            Shape("star", "red", "small", 0.1, 0.2, 0.05),
            Shape("star", "red", "small", 0.3, 0.4, 0.05),
            Shape("star", "blue", "small", 0.8, 0.3, 0.05),
            Shape("circle", "red", "large", 0.7, 0.7, 0.15),
        ),
    )


def test_tally_probe_asks_where_a_count_begins_for_its_objects_beside_its_own_position():
    from owl.data.scenes import Scene, Shape
    from owl.train import ComparisonProbe, TallyProbe

    red, star, circle, blue = 50, 51, 52, 53
    probe = TallyProbe(per_image=5, grid=2, words=four_words())
    model = make_tiny()
    assert TallyProbe.part(model) is ComparisonProbe.part(model)
    assert TallyProbe.first_head >= ComparisonProbe.first_head + ComparisonProbe.heads
    second = Scene("black", (Shape("star", "green", "small", 0.8, 0.8, 0.05),))
    s, ai = IMAGE_TOKEN_ID, 9
    # "<image> how many red? AI: Three. how many objects? AI: Four. <image> how many stars in the
    # second? AI: One. how many red star? AI: ... how many blue circle? AI: ..., and a colour question"
    ids = torch.tensor(
        [
            [
                *[1, *[s] * 5, 7, red, ai, 30, 2],
                *[7, ai, 31, 2],
                *[*[s] * 5, 7, star, 8, ai, 32, 2],
                *[7, red, star, ai, 33, 2],
                *[7, blue, circle, ai, 34, 2],
                *[7, red, ai, 35, 2],
            ]
        ]
    )
    labels = torch.full_like(ids, IGNORE)
    for start in (9, 13, 24, 30, 36, 41):
        labels[0, start : start + 2] = ids[0, start : start + 2]
    turns = [
        [
            (0, "count_colour"),
            (0, "count"),
            (1, "count_shape"),
            (0, "count_shape"),
            (0, "count_shape"),
            (0, "colour"),
        ]
    ]
    assert probe.targets(ids, labels, [[tally_scene(), second]], turns) == [
        (0, 8, [1, 1, 4]),  # three red objects: the two red stars of cell 0 count twice
        (0, 12, [1, 1, 2, 4]),  # every object
        (0, 23, [18]),  # the second picture's star
        (0, 29, [1, 1]),  # "red star"
        (0, 35, []),  # no blue circle: nothing but the position itself
    ]  # a colour question is not asked
    # the loss: the cross-entropy against those shares (1/(n+1) on each object and on the position
    # itself), here for attention scores of log 3 on the position itself, log 5 on cell 0 of the
    # first picture and 0 elsewhere: log(sum of e^score) - share(itself) log 3 - share(cell 0) log 5
    scores = torch.zeros(5, 1, ids.shape[1])
    for k, position in enumerate((8, 12, 23, 29, 35)):
        scores[k, 0, position] = math.log(3)
    scores[:, 0, 1] = math.log(5)
    probe.scores = lambda captured, rows, positions: scores[: len(rows)]
    log3, log5 = math.log(3), math.log(5)
    expected = [
        math.log(9 + 6) - log3 / 4 - log5 / 2,  # 9 keys visible
        math.log(13 + 6) - log3 / 5 - log5 * 2 / 5,
        math.log(24 + 6) - log3 / 2,
        math.log(30 + 6) - log3 / 3 - log5 * 2 / 3,
        math.log(36 + 6) - log3,
    ]
    captured = (None, torch.zeros(1, ids.shape[1], 8), None)
    loss = probe.loss(captured, ids, labels, [[tally_scene(), second]], turns)
    assert loss.item() == pytest.approx(sum(expected) / len(expected), rel=1e-5)


def test_tally_probe_teaches_a_share_kept_at_home_that_falls_with_each_object_counted():
    """Two rows alike but for the word of the question ("star": three of them, "circle": one);
    trained through the probe alone, the head keeps a quarter of its attention on its own position
    in one row and half in the other. Three decoder layers, so that the one asked (the next to
    last) comes after one that can bring the question's word to where the answer begins."""
    from owl.train import TallyProbe

    torch.manual_seed(0)
    model = make_tiny(layers=3)
    per_image, star, circle, ai = model.config.num_image_tokens, 20, 21, 22
    probe = TallyProbe(per_image, 2, {star: ("kind", "star"), circle: ("kind", "circle")})
    ids = torch.tensor(
        [[1, 6, *[IMAGE_TOKEN_ID] * per_image, 7, word, 8, ai, 9, 2] for word in (star, circle)]
    )
    labels = torch.full_like(ids, IGNORE)
    labels[:, -2:] = ids[:, -2:]
    size = model.config.vision.image_size
    pixels = torch.randn(1, 3, size, size).repeat(2, 1, 1, 1)
    scenes, turns = [[tally_scene()], [tally_scene()]], [[(0, "count_shape")], [(0, "count_shape")]]
    train_attention(model, probe, lambda out: probe.loss(out, ids, labels, scenes, turns), ids, pixels, 150)
    home = ids.shape[1] - 3
    assert [position for _, position, _ in probe.targets(ids, labels, scenes, turns)] == [home, home]
    seen = attention_seen(model, probe, ids, pixels)
    attention = torch.softmax(probe.scores(seen, [0, 1], torch.tensor([home, home])), -1)
    assert torch.allclose(attention[:, 0, home], torch.tensor([1 / 4, 1 / 2]), atol=0.08)


def test_where_probe_asks_where_a_where_answer_starts_for_the_named_objects_bands():
    from owl.data.scenes import Scene, Shape
    from owl.train import WhereProbe

    red, star, circle, blue = 50, 51, 52, 53
    probe = WhereProbe(8, four_words())
    scene = Scene(
        "white",
        (
            Shape("star", "blue", "small", 0.2, 0.5, 0.07),  # left, middle
            Shape("circle", "red", "large", 0.5, 0.8, 0.15),  # middle, bottom
            Shape("star", "red", "small", 0.8, 0.4, 0.07),  # right, neither band
        ),
    )
    s, ai = IMAGE_TOKEN_ID, 9
    # "<image> where is the blue star? AI: At the middle left. where is the circle? AI: At the bottom.
    # where is the star? AI: ...  where is the red star? AI: ...  (and a colour question)"
    ids = torch.tensor(
        [
            [
                *[1, s, s, s, 7, blue, star, 10, ai, 30, 2],
                *[7, circle, 10, ai, 31, 2],
                *[7, star, 10, ai, 32, 2],
                *[7, red, star, 10, ai, 33, 2],
                *[7, circle, 10, ai, 34, 2],
            ]
        ]
    )
    labels = torch.full_like(ids, IGNORE)
    for start in (9, 15, 21, 28, 34):
        labels[0, start : start + 2] = ids[0, start : start + 2]
    turns = [[(0, "where")] * 4 + [(0, "colour")]]
    # "star" alone names two objects, the red star is between bands down, the last turn is not a
    # "where" question: none of them is asked
    assert probe.targets(ids, labels, [[scene]], turns) == [
        (0, 8, ("left", "middle")),
        (0, 14, ("middle", "bottom")),
    ]
    hidden = torch.zeros(1, ids.shape[1], 8)
    with torch.no_grad():
        probe.across.bias.copy_(torch.tensor([20.0, 0.0, 0.0]))  # "left"
        probe.down.bias.copy_(torch.tensor([0.0, 20.0, 0.0]))  # "middle"
    # across: right, then wrong by 20; down: right, then wrong by 20
    assert probe.loss(hidden, ids, labels, [[scene]], turns).item() == pytest.approx((10 + 10) / 2, rel=1e-3)


def test_where_probe_teaches_the_last_layer_the_bands_where_the_answer_begins():
    """Two rows alike but for their pictures (the star at the middle left, then at the bottom
    right); trained through the probe alone, the last layer's output where the answer begins says
    so."""
    from owl.data.scenes import Scene, Shape
    from owl.train import WhereProbe

    torch.manual_seed(0)
    model = make_tiny()
    per_image, star, ai = model.config.num_image_tokens, 20, 22
    probe = WhereProbe(model.config.text_hidden_size, {star: ("kind", "star")})
    scenes = [
        [Scene("white", (Shape("star", "blue", "small", 0.2, 0.5, 0.07),))],
        [Scene("white", (Shape("star", "blue", "small", 0.8, 0.8, 0.07),))],
    ]
    ids = torch.tensor([[5, 6, *[IMAGE_TOKEN_ID] * per_image, 7, star, 8, ai, 9, 2]] * 2)
    labels = torch.full_like(ids, IGNORE)
    labels[:, -2:] = ids[:, -2:]
    turns = [[(0, "where")], [(0, "where")]]
    hidden = train_probe_layer(model, probe, -1, lambda out: probe.loss(out, ids, labels, scenes, turns), ids)
    start = hidden[:, -3]
    assert [probe.ACROSS[i] for i in probe.across(start).argmax(-1)] == ["left", "right"]
    assert [probe.DOWN[i] for i in probe.down(start).argmax(-1)] == ["middle", "bottom"]


def test_length_groups_batch_examples_of_about_one_length_and_use_each_once():
    """Each pool's examples come out once, in batches sorted by length (less padding than taking
    them in order), and batch ``u`` is the same whenever it is asked for, as on a resumed run."""
    from owl.train import LengthGroups

    rng = random.Random(0)
    data = [("x" * rng.randint(1, 200), []) for _ in range(64)]

    def padding(batches):
        return sum(len(b) * max(len(t) for t, _ in b) - sum(len(t) for t, _ in b) for b in batches)

    groups = LengthGroups(data, size=4, pool=8, length=lambda sample: len(sample[0]), seed=3)
    taken = [groups.batch(unit) for unit in range(16)]
    assert sorted(i for indices, _ in taken for i in indices) == list(range(64))
    assert all([data[i] for i in indices] == samples for indices, samples in taken)
    in_order = [data[k : k + 4] for k in range(0, 64, 4)]
    assert padding([samples for _, samples in taken]) < padding(in_order) / 3
    lengths = [max(len(t) for t, _ in samples) for _, samples in taken[:8]]
    assert lengths != sorted(lengths)  # not shortest first
    resumed = LengthGroups(data, size=4, pool=8, length=lambda sample: len(sample[0]), seed=3)
    assert resumed.batch(11) == taken[11]


def test_reused_pictures_are_asked_about_again_in_new_conversations():
    """With reuse 2 every other example holds a new conversation about the pictures of the one
    before it (the same pixels and layouts, other questions); the next one draws new pictures; an
    example is the same whether drawn in order or alone; reuse 1 is the stream as before."""
    from owl.data.build import make_example
    from owl.train import SyntheticData

    def pixels(images):
        return [image.tobytes() for image in images]

    data = SyntheticData(0, extra_turns=2, reuse=2, keep_layouts=True)
    for first in range(0, 12, 2):
        text, images = data[first]
        again, same = data[first + 1]
        assert pixels(same) == pixels(images) and again != text
        assert data.layout(first + 1)[0] == data.layout(first)[0]  # (scene, settings) per picture
        assert pixels(data[first + 2][1]) != pixels(images)
        data.layout(first + 2)
    alone = SyntheticData(0, extra_turns=2, reuse=2)[7]
    assert alone[0] == SyntheticData(0, extra_turns=2, reuse=2, keep_layouts=True)[7][0]
    assert alone[0] == data[7][0]
    assert SyntheticData(0, extra_turns=2)[5][0] == make_example(0, 5, extra_turns=2).text
    with pytest.raises(ValueError, match="at least 1"):
        SyntheticData(0, reuse=0)


def test_question_weights_reach_the_training_stream_and_bad_ones_are_named():
    """``--question-weights`` is parsed into a mix that the synthetic stream draws its questions
    with; a kind that does not exist, a weight that is not a number or not above 0 is refused
    with what was wrong."""
    from owl.data.build import make_example
    from owl.train import SyntheticData

    settings = parse_args(["--out", "x", "--question-weights", "where=3, same_shapes=2,background=0.5"])
    assert settings.question_weights == {"where": 3.0, "same_shapes": 2.0, "background": 0.5}
    data = SyntheticData(0, extra_turns=2, weights=settings.question_weights)
    texts = [data[i][0] for i in range(30)]
    assert texts == [
        make_example(0, i, extra_turns=2, weights=settings.question_weights).text for i in range(30)
    ]
    assert texts != [make_example(0, i, extra_turns=2).text for i in range(30)]
    assert parse_args(["--out", "x"]).question_weights is None
    for bad, said in (
        ("wher=2", "no question kind 'wher'"),
        ("where=two", "not a number"),
        ("where=0", "above 0"),
    ):
        with pytest.raises(SystemExit):
            parse_args(["--out", "x", "--question-weights", bad])
        with pytest.raises(argparse.ArgumentTypeError, match=said):
            question_weights(bad)


def test_settings_out_of_range_are_refused_before_training_starts(capsys):
    """A value out of range fails when the settings are made, by its flag's name on the command
    line, not when the batch or scene that reads it is first drawn (after the vision stage)."""
    for flags, said in (
        (["--repeats", "1.5"], "--repeats must be 0 to 1, got 1.5"),
        (["--reuse", "0"], "--reuse must be at least 1, got 0"),
        (["--pair-turns", "-0.1"], "--pair-turns must be 0 to 1, got -0.1"),
        (["--average", "1"], "--average must be at least 0 and below 1, got 1.0"),
        (["--answer-probe", "-1"], "--answer-probe must not be negative, got -1.0"),
        (["--vision-min-objects", "5"], "--vision-min-objects must be at most 4"),
        (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["--epochs", "-1"], "--epochs must be at least 0, got -1.0"),
        (["--threads", "0"], "--threads must be at least 1, got 0"),
        (["--max-minutes", "0"], "--max-minutes must be above 0, got 0.0"),
        (["--lora-r", "0"], "--lora-r must be at least 1, got 0"),
    ):
        with pytest.raises(SystemExit):
            parse_args(["--recipe", "tiny", "--out", "x", *flags])
        assert said in capsys.readouterr().err
    with pytest.raises(ValueError, match="repeats must be 0 to 1, got -0.5"):
        TrainSettings(out="x", repeats=-0.5)
    assert parse_args(["--recipe", "tiny", "--out", "x", "--repeats", "1"]).repeats == 1.0


def test_a_frozen_towers_outputs_are_kept_per_picture():
    """The cache encodes only pictures it has not seen, in one batch, and gives back what the
    tower gives (the same picture twice in a batch encoded once); autocast is another precision,
    encoded anew; it forgets the oldest beyond its size; it refuses a tower that trains."""
    from owl.train import FrozenTowerCache

    model = make_tiny()
    tower = model.vision_model
    size = model.config.vision.image_size
    pictures = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="frozen"):
        FrozenTowerCache(tower)
    tower.requires_grad_(False)
    with torch.no_grad():
        expected = tower(pictures)
    cache = FrozenTowerCache(tower, size=3)
    batches = []
    encode = cache.encode
    cache.encode = lambda pixels: batches.append(len(pixels)) or encode(pixels)
    out = model.vision_model(pictures[[0, 1, 0]])
    assert torch.allclose(out, expected[[0, 1, 0]], atol=1e-5)
    assert (cache.misses, cache.hits, batches) == (2, 1, [2])
    out = model.vision_model(pictures[[1, 2]])
    assert torch.allclose(out, expected[[1, 2]], atol=1e-5)
    assert (cache.misses, cache.hits, batches) == (3, 2, [2, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.vision_model(pictures[[1]])
    assert (cache.misses, batches) == (4, [2, 1, 1])
    model.vision_model(pictures[[3]])  # five entries: the two used longest ago (0, then 1) forgotten
    model.vision_model(pictures[[2, 0]])
    assert (cache.misses, cache.hits, batches[-1]) == (6, 3, 1)
    assert list(model.state_dict()) == list(make_tiny().state_dict())  # the tower's weights as they were


def test_the_weight_average_follows_its_decay_and_forgets_the_start():
    """After each step the average moves toward the weights by 1 - decay, the decay ramping up as
    (1 + n) / (10 + n); put_in makes it the weights; its state survives a save and load."""
    from owl.train import WeightAverage

    weight = torch.nn.Parameter(torch.zeros(3))
    average = WeightAverage([weight], decay=0.5)
    expected = torch.zeros(3)
    for n, value in enumerate([10.0, 20.0, 40.0]):
        with torch.no_grad():
            weight.fill_(value)
        average.update()
        decay = min(0.5, (1 + n) / (10 + n))
        expected = decay * expected + (1 - decay) * value
    assert torch.allclose(average.average[0], expected)
    saved = average.state_dict()
    again = WeightAverage([weight], decay=0.5)
    again.load_state_dict(saved)
    assert again.updates == 3 and torch.equal(again.average[0], average.average[0])
    average.put_in()
    assert torch.equal(weight.detach(), expected)
    with pytest.raises(ValueError, match="another set of weights"):
        WeightAverage([weight, weight], decay=0.5).load_state_dict(saved)


def test_an_averaged_run_exports_the_average_and_the_weights_as_trained(tmp_path):
    """--average: the final model is the average (of what trained; the frozen tower is as it was),
    final-unaveraged the last step's weights, and a resumed run carries on the saved average."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    small = ["--config", "tiny", "--batch-size", "2", "--vision-batch-size", "4", "--vision-steps", "2"]
    small += ["--easy-steps", "1", "--eval-every", "100", "--save-every", "100", "--threads", "1"]
    final = train(
        parse_args(["--recipe", "tiny", "--out", str(out), *small, "--steps", "4", "--average", "0.9"])
    )
    averaged = load_file(final / "model.safetensors")
    trained = load_file(out / "final-unaveraged" / "model.safetensors")
    assert trained.keys() == averaged.keys()
    assert torch.equal(
        trained["abstractor.visual_fc.weight"],
        load_file(out / "latest" / "model.safetensors")["abstractor.visual_fc.weight"],
    )
    tower = [k for k in trained if k.startswith("vision_model.")]
    assert tower and all(torch.equal(trained[k], averaged[k]) for k in tower)  # frozen: nothing to average
    assert not torch.equal(trained["abstractor.visual_fc.weight"], averaged["abstractor.visual_fc.weight"])
    assert torch.load(out / "training_state.pt", weights_only=True)["average"]["updates"] == 4
    halves = tmp_path / "halves"
    for steps in (["--steps", "2"], ["--steps", "4", "--resume"]):
        train(parse_args(["--recipe", "tiny", "--out", str(halves), *small, "--average", "0.9", *steps]))
    assert torch.load(halves / "training_state.pt", weights_only=True)["average"]["updates"] == 4


@pytest.mark.parametrize("kind", ["none", "boolean mask", "added mask", "causal", "dropout"])
def test_written_out_attention_computes_what_sdpa_does(kind):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=generator) for _ in range(3))
    masks = {
        "boolean mask": torch.rand(2, 1, 5, 5, generator=generator) > 0.3,
        "added mask": torch.randn(2, 1, 5, 5, generator=generator),
    }
    masks["boolean mask"][..., 0] = True  # every query sees at least one key
    mask, causal = masks.get(kind), kind == "causal"
    dropout = 0.5 if kind == "dropout" else 0.0

    def run(function, **extra):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        torch.manual_seed(1)
        out = function(*leaves, mask, causal=causal, **extra)
        out.backward(torch.ones_like(out))
        return out.detach(), [t.grad for t in leaves]

    out, grads = run(attend, dropout=dropout, written_out=True)
    with torch.no_grad():  # no backward to come: torch's own kernel, exactly
        sdpa = F.scaled_dot_product_attention(q, k, v, mask, is_causal=causal)
        assert torch.equal(attend(q, k, v, mask, causal=causal, written_out=True), sdpa)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    assert torch.equal(attend(*leaves, mask, causal=causal), sdpa)  # not asked to write it out
    if dropout:  # weights dropped at random, the rest scaled up: on average the plain attention
        plain, _ = run(attend, written_out=True)
        draws = torch.stack([attend(*leaves, mask, dropout=dropout, written_out=True) for _ in range(400)])
        assert not torch.allclose(out, plain)
        torch.testing.assert_close(draws.mean(0).detach(), plain, atol=0.25, rtol=0)
        return
    expected, expected_grads = run(
        lambda *t, causal, **_: F.scaled_dot_product_attention(*t, is_causal=causal)
    )
    torch.testing.assert_close(out, expected)
    for grad, wanted in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, wanted)


@pytest.mark.parametrize("name", ["tiny", "tiny-v0"])
def test_training_with_written_out_attention_gives_the_same_loss_and_gradients(name):
    model = make_tiny(name).requires_grad_(True)
    written = copy.deepcopy(model)
    write_out_attention(written)
    assert written.language_model.config._attn_implementation == "owl"
    per_image = model.config.num_image_tokens
    rows = [
        [1, *[IMAGE_TOKEN_ID] * per_image, *range(40, 52)],
        [1, *[IMAGE_TOKEN_ID] * per_image, *range(60, 66)],  # padded: the mask matters
    ]
    width = max(map(len, rows))
    ids = torch.tensor([row + [2] * (width - len(row)) for row in rows])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    labels = ids.masked_fill((mask == 0) | (ids == IMAGE_TOKEN_ID), IGNORE)
    size = model.config.vision.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    results = []
    for each in (model, written):
        each.train()
        each.abstractor.eval()  # its attention dropout would draw differently
        out = each(ids, pixels, attention_mask=mask, labels=labels)
        out.loss.backward()
        results.append(
            (out.loss.detach(), {n: p.grad for n, p in each.named_parameters() if p.grad is not None})
        )
    (loss, grads), (written_loss, written_grads) = results
    torch.testing.assert_close(written_loss, loss)
    assert grads.keys() == written_grads.keys() and len(grads) > 50
    for key, grad in grads.items():
        assert (written_grads[key] - grad).abs().max() <= 1e-5 * grad.abs().max() + 1e-7, key  # float noise
    with torch.no_grad():  # inference runs torch's kernel as before
        model.eval()
        written.eval()
        assert torch.equal(
            written(ids, pixels, attention_mask=mask).logits, model(ids, pixels, attention_mask=mask).logits
        )


def test_the_tiny_recipe_runs_its_stages_and_resumes(tmp_path):
    """The embedded model's recipe at toy size: tokenizer, vision stage, then the rest with the tower
    frozen and the query and order probes on; a resumed run picks up its own tokenizer and probes."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    small = ["--config", "tiny", "--batch-size", "2", "--vision-batch-size", "4", "--vision-steps", "3"]
    small += ["--easy-steps", "1", "--eval-every", "100", "--save-every", "2", "--threads", "1"]
    train(parse_args(["--recipe", "tiny", "--out", str(out), *small, "--steps", "2"]))
    train(
        parse_args(
            ["--recipe", "tiny", "--out", str(out / "vision"), *small, "--steps", "0", "--binding-probe", "0"]
        )
    )
    saved = torch.load(out / "vision" / "training_state.pt", weights_only=True)
    assert saved["step"] == 0 and not any(k.startswith("binding.") for k in saved["probes"])
    # a probe turned on when resuming starts afresh beside the saved ones
    resumed = [
        "--steps",
        "1",
        "--resume",
        "--binding-probe",
        "0.5",
        "--relation-probe",
        "0.5",
        "--count-probe",
        "1",
        "--where-probe",
        "1",
        "--tally-probe",
        "1",
    ]
    train(parse_args(["--recipe", "tiny", "--out", str(out / "vision"), *small, *resumed]))
    probes = torch.load(out / "vision" / "training_state.pt", weights_only=True)["probes"]
    named = ("binding", "relation", "count", "where")  # the tally probe has no weights of its own
    assert all(any(k.startswith(f"{name}.") for k in probes) for name in named)
    after_two = load_file(out / "latest" / "model.safetensors")
    state = torch.load(out / "training_state.pt", weights_only=True)
    assert state["step"] == 2
    assert any(k.startswith("query.") for k in state["probes"])
    assert any(k.startswith("order.") for k in state["probes"])
    assert not any(k.startswith("object.") for k in state["probes"])  # the tower is frozen: no object probe
    final = train(parse_args(["--recipe", "tiny", "--out", str(out), *small, "--steps", "4", "--resume"]))
    weights = load_file(final / "model.safetensors")
    assert (final / "tokenizer.model").is_file()
    tower = [k for k in weights if k.startswith("vision_model.")]
    assert tower and all(torch.equal(weights[k], after_two[k]) for k in tower)  # frozen after its stage
    assert not torch.equal(weights["abstractor.visual_fc.weight"], after_two["abstractor.visual_fc.weight"])
    assert not any("probe" in k or k.startswith(("object.", "query.", "order.")) for k in weights)


@pytest.mark.parametrize("killed_at", [0, 2])
def test_a_recipe_run_killed_after_a_checkpoint_resumes_to_the_weights_of_one_never_stopped(
    tmp_path, monkeypatch, killed_at
):
    """Fixed seeds and resumable checkpoints together: a run of the tiny recipe killed right after
    a checkpoint (at the end of its vision stage, step 0, or at step 2 of the language stage) and
    started again with --resume exports, bit for bit, the weights (the average and the weights as
    trained) and the tokenizer of the same run never stopped."""
    from safetensors.torch import load_file

    import owl.train

    small = ["--config", "tiny", "--batch-size", "2", "--vision-batch-size", "4", "--vision-steps", "2"]
    small += ["--easy-steps", "1", "--eval-every", "100", "--save-every", "2", "--threads", "1"]
    small += ["--steps", "5", "--warmup", "2"]  # the schedule and the probes' fade both move
    straight = train(parse_args(["--recipe", "tiny", "--out", str(tmp_path / "straight"), *small]))

    save = owl.train._save

    def save_then_die(model, tokenizer, optimizer, scheduler, step, *rest, **named):
        save(model, tokenizer, optimizer, scheduler, step, *rest, **named)
        if step == killed_at:
            raise KeyboardInterrupt  # as a Ctrl-C right after the checkpoint

    monkeypatch.setattr(owl.train, "_save", save_then_die)
    args = ["--recipe", "tiny", "--out", str(tmp_path / "stopped"), *small]
    with pytest.raises(KeyboardInterrupt):
        train(parse_args(args))
    monkeypatch.setattr(owl.train, "_save", save)
    assert torch.load(tmp_path / "stopped" / "training_state.pt", weights_only=True)["step"] == killed_at
    resumed = train(parse_args([*args, "--resume"]))

    exported = {}
    for folder in ("final", "final-unaveraged"):
        ours = exported[folder] = load_file(straight.parent / folder / "model.safetensors")
        theirs = load_file(resumed.parent / folder / "model.safetensors")
        assert ours.keys() == theirs.keys() and len(ours) > 50
        differ = [key for key in ours if not torch.equal(ours[key], theirs[key])]
        assert not differ, f"{folder}: {len(differ)} tensors differ, {differ[:3]}"
    assert (straight / "tokenizer.model").read_bytes() == (resumed / "tokenizer.model").read_bytes()
    averaged, trained = exported["final"], exported["final-unaveraged"]
    key = "abstractor.visual_fc.weight"
    assert not torch.equal(averaged[key], trained[key])  # two exports compared, not one twice


def test_a_run_that_cannot_keep_to_its_time_budget_says_so_after_its_first_steps(
    tmp_path, capsys, monkeypatch
):
    """A stage whose pace runs past --max-minutes says so after its first ten steps, with where the
    budget will stop the run; mixed precision on a CPU without fast bfloat16 is named before
    anything trains, and a float32 run there is not warned."""
    import owl.train

    monkeypatch.setattr(owl.train, "native_bfloat16", lambda: False)
    small = ["--config", "tiny", "--batch-size", "2", "--vision-batch-size", "2", "--easy-steps", "1"]
    small += ["--eval-every", "100000", "--save-every", "100000", "--threads", "1"]
    budget = ["--max-minutes", "0.0001", "--vision-steps", "12", "--steps", "30", "--autocast", "bfloat16"]
    train(parse_args(["--recipe", "tiny", "--out", str(tmp_path / "a"), *small, *budget]))
    said = capsys.readouterr().err
    assert "this CPU has no fast bfloat16 arithmetic" in said
    assert re.search(
        r"vision stage: [\d.]+ s a step; at this pace its 12 steps end about \d+ min after the start, "
        r"past the 0\.0001-minute budget \(--max-minutes\): it runs to its end all the same, and the "
        r"language stage then stops after its first step",
        said,
    )
    assert "stopping at step 1:" in said
    assert not re.search(r"training: [\d.]+ s a step", said)  # stopped before its pace was judged

    budget = ["--max-minutes", "0.1", "--vision-steps", "0", "--steps", "1000000", "--autocast", "none"]
    train(parse_args(["--recipe", "tiny", "--out", str(tmp_path / "b"), *small, *budget]))
    said = capsys.readouterr().err
    assert "bfloat16" not in said and not re.search(r"vision stage: [\d.]+ s a step", said)
    foreseen = re.search(
        r"training: [\d.]+ s a step; at this pace its 1000000 steps end about .+ after the "
        r"start, past the 0\.1-minute budget \(--max-minutes\): it would stop near step (\d+)",
        said,
    )
    stopped = re.search(r"stopping at step (\d+):", said)
    assert foreseen and stopped and int(foreseen[1]) > 10 and 10 < int(stopped[1]) < 1000000


def test_probes_fade_to_nothing_over_the_last_part_of_a_run(tmp_path):
    """--probe-fade F: every probe keeps its whole weight until the last F of the run, then it falls
    in a straight line to nothing at the last step; a step where it is nothing leaves the probes
    untouched, and without a fade they learn."""
    from owl.train import probe_share

    shares = [probe_share(step, 10, 0.4) for step in range(10)]
    assert shares[:6] == [1.0] * 6
    assert shares[6:] == pytest.approx([0.75, 0.5, 0.25, 0.0])
    assert {probe_share(step, 10, 0.0) for step in range(10)} == {1.0}

    small = ["--config", "tiny", "--batch-size", "2", "--vision-batch-size", "4", "--vision-steps", "2"]
    small += ["--easy-steps", "1", "--eval-every", "100", "--save-every", "100", "--threads", "1"]
    start = tmp_path / "start"
    train(parse_args(["--recipe", "tiny", "--out", str(start), *small, "--steps", "0"]))
    before = torch.load(start / "training_state.pt", weights_only=True)["probes"]
    after = {}
    for fade in ("0", "1"):
        out = tmp_path / f"fade{fade}"
        shutil.copytree(start, out)
        resumed = ["--steps", "1", "--resume", "--probe-fade", fade]
        train(parse_args(["--recipe", "tiny", "--out", str(out), *small, *resumed]))
        after[fade] = torch.load(out / "training_state.pt", weights_only=True)["probes"]
    assert before.keys() == after["0"].keys() == after["1"].keys() and len(before) > 4
    assert all(torch.equal(before[k], after["1"][k]) for k in before)
    assert not all(torch.equal(before[k], after["0"][k]) for k in before)


def test_the_conversation_seed_draws_the_language_stages_conversations_alone(tmp_path):
    """--conversation-seed draws the language stage's conversations, and the data seed (the vision
    stage's pictures and the tokenizer's corpus) no longer does: from one saved vision stage, a
    language step gives the same weights whatever the data seed, and others with other conversations."""
    from safetensors.torch import load_file

    small = ["--config", "tiny", "--batch-size", "2", "--vision-batch-size", "4", "--vision-steps", "2"]
    small += ["--easy-steps", "1", "--eval-every", "100", "--save-every", "100", "--threads", "1"]
    start = tmp_path / "start"
    train(parse_args(["--recipe", "tiny", "--out", str(start), *small, "--steps", "0"]))
    weights = {}
    for name, seeds in [("data", ["7", "7"]), ("talk", ["0", "7"]), ("own", ["0", "1"])]:
        out = tmp_path / name
        shutil.copytree(start, out)
        args = ["--recipe", "tiny", "--out", str(out), *small, "--steps", "1", "--resume"]
        args += ["--data-seed", seeds[0], "--conversation-seed", seeds[1]]
        weights[name] = load_file(train(parse_args(args)) / "model.safetensors")
    assert weights["data"].keys() == weights["talk"].keys()
    assert all(torch.equal(weights["data"][k], weights["talk"][k]) for k in weights["data"])
    assert not all(torch.equal(weights["own"][k], weights["talk"][k]) for k in weights["own"])


def colour_data(folder):
    """Four one-image conversations in the original jsonl format; returns the jsonl's path."""
    (folder / "images").mkdir(parents=True)
    rows = []
    for i, colour in enumerate([(255, 0, 0), (0, 0, 255), (0, 200, 0), (250, 250, 0)]):
        Image.new("RGB", (40, 30), colour).save(folder / "images" / f"{i}.png")
        rows.append(
            {
                "text": f"SYS\nHuman: <image>\nHuman: What colour?\nAI: Colour {i}.",
                "image": [f"images/{i}.png"],
                "task_type": "test_sft",
            }
        )
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return folder / "train.jsonl"


def test_a_short_run_on_jsonl_saves_and_resumes(tmp_path, tokenizer_file):
    folder = tmp_path / "data"
    colour_data(folder)
    make_tiny("tiny").config.save(tmp_path / "config.json")
    common = [
        "--out",
        str(tmp_path / "run"),
        "--config",
        str(tmp_path / "config.json"),
        "--tokenizer",
        str(tokenizer_file),
        "--data",
        str(folder / "train.jsonl"),
        "--stage",
        "all",
        "--batch-size",
        "2",
        "--save-every",
        "2",
        "--eval-every",
        "100",
        "--lr",
        "1e-3",
        "--augment",
        "recipe",
        "--device",
        "cpu",
    ]
    first = parse_args([*common, "--steps", "2"])
    assert isinstance(first, TrainSettings)
    final = train(first)
    assert (final / "model.safetensors").is_file() and (final / "config.json").is_file()
    state = torch.load(tmp_path / "run" / "training_state.pt", weights_only=True)
    assert state["step"] == 2
    train(parse_args([*common, "--steps", "4", "--resume"]))
    assert torch.load(tmp_path / "run" / "training_state.pt", weights_only=True)["step"] == 4


def test_lora_runs_resume_and_end_in_a_merged_model_that_loads(tmp_path, tokenizer_file):
    from owl.checkpoint import load, save_export

    base = make_tiny("tiny")
    save_export(base, None, tmp_path / "base")
    data = colour_data(tmp_path / "data")

    def run(out, steps, *extra):
        args = [
            "--out",
            str(tmp_path / out),
            "--init",
            str(tmp_path / "base"),
            "--tokenizer",
            str(tokenizer_file),
        ]
        args += ["--data", str(data), "--stage", "lora", "--batch-size", "2", "--save-every", "2"]
        args += ["--eval-every", "100", "--lr", "5e-2", "--augment", "none", "--device", "cpu"]
        return train(parse_args([*args, "--steps", str(steps), *extra]))

    straight = run("straight", 4)
    run("resumed", 2)
    resumed = run("resumed", 4, "--resume")
    assert (straight / "adapter_model.safetensors").is_file()

    merged = load(straight, tokenizer=tokenizer_file).model.state_dict()
    again = load(resumed, tokenizer=tokenizer_file).model.state_dict()
    before = base.state_dict()
    assert set(merged) == set(before)  # the plain architecture, no adapter wrappers left
    q_proj = "language_model.model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[q_proj], before[q_proj])  # the adapters were folded in
    k_proj = "language_model.model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(merged[k_proj], before[k_proj])  # what LoRA does not adapt is untouched
    assert all(torch.equal(merged[k], again[k]) for k in merged)  # resuming changes nothing
