"""lightning_mim.editing: inpaint / outpaint / class edit (maskgit/inference.py) on token grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_mim.editing import blurred_composite, class_edit, class_edit_token_mask, inpaint, outpaint

K, MASK = 16, 40


def position_logits(calls=None):
    """Logits depending on position only (works for any grid size), recording each call's input."""

    def fn(tokens):
        if calls is not None:
            calls.append(tokens.clone())
        b, n = tokens.shape
        table = torch.sin(torch.arange(n * K, dtype=torch.float32).view(n, K))
        return table.expand(b, -1, -1)

    return fn


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def official_latent_mask(top, left, height, width, image_size=256, s=16):
    """A literal transcription of create_latent_mask_and_input_tokens_for_image_editing."""
    g = image_size // s
    m = np.zeros((g, g))
    t = max(0, top // s - 1)
    b = min(g, height // s + top // s + 1)
    l = max(0, left // s - 1)  # noqa: E741
    r = min(g, left // s + width // s + 1)
    m[t:b, l:r] = 1
    return m.astype(bool)


def test_inpaint_changes_only_the_region():
    tokens = torch.randint(0, K, (3, 8, 8), generator=gen())
    region = torch.zeros(8, 8, dtype=torch.bool)
    region[2:5, 3:7] = True
    out = inpaint(position_logits(), tokens, region, mask_id=MASK, steps=4, generator=gen())
    assert out.shape == (3, 8, 8)
    assert torch.equal(out[:, ~region], tokens[:, ~region])
    assert (out[:, region] < K).all()
    assert not torch.equal(out, tokens)  # the region was re-sampled


def test_inpaint_per_sample_region_and_steps():
    tokens = torch.randint(0, K, (2, 6, 6), generator=gen())
    region = torch.zeros(2, 6, 6, dtype=torch.bool)
    region[0, :3] = True  # 18 cells
    region[1, 5, 5] = True  # 1 cell
    out, history = inpaint(position_logits(), tokens, region, mask_id=MASK, steps=3, generator=gen(), return_steps=True)
    assert len(history) == 3 and history[0].shape == (2, 6, 6)
    assert (history[0][0] == MASK).sum() == 15 and (history[0][1] == MASK).sum() == 1  # floor(18·cos(π/6)) = 15
    assert torch.equal(out[~region], tokens[~region]) and (out != MASK).all()


def test_inpaint_errors():
    tokens = torch.zeros(1, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="bool"):
        inpaint(position_logits(), tokens, torch.zeros(4, 4), mask_id=MASK, steps=2)
    with pytest.raises(ValueError, match="shape"):
        inpaint(position_logits(), tokens, torch.zeros(3, 4, dtype=torch.bool), mask_id=MASK, steps=2)
    with pytest.raises(ValueError, match=r"\(B, h, w\)"):
        inpaint(position_logits(), tokens[0], torch.zeros(4, 4, dtype=torch.bool), mask_id=MASK, steps=2)


def test_outpaint_places_the_grid_and_fills_the_rest():
    tokens = torch.randint(0, K, (2, 4, 4), generator=gen())
    calls = []
    out = outpaint(position_logits(calls), tokens, (6, 8), offset=(1, 3), mask_id=MASK, steps=3, generator=gen())
    assert out.shape == (2, 6, 8)
    assert torch.equal(out[:, 1:5, 3:7], tokens)
    assert (out < K).all()
    first = calls[0].view(2, 6, 8)
    assert (first == MASK).sum().item() == 2 * (48 - 16) and torch.equal(first[:, 1:5, 3:7], tokens)
    with pytest.raises(ValueError, match="does not fit"):
        outpaint(position_logits(), tokens, 6, offset=(3, 0), mask_id=MASK, steps=2)


@pytest.mark.parametrize("box", [(64, 64, 160, 192), (8, 8, 48, 48), (0, 0, 256, 256), (200, 30, 256, 250), (100, 100, 101, 101)])
def test_class_edit_token_mask_matches_official(box):
    x0, y0, x1, y1 = box
    expected = official_latent_mask(top=y0, left=x0, height=y1 - y0, width=x1 - x0)
    assert np.array_equal(class_edit_token_mask(box, 256, 16).numpy(), expected)


def test_class_edit_token_mask_values():
    m = class_edit_token_mask((64, 64, 160, 192), 256, 16)
    rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
    assert (rows.min().item(), rows.max().item()) == (3, 12)  # box rows 4..11, one extra each side
    assert (cols.min().item(), cols.max().item()) == (3, 10)
    # the official quirk: end = top//s + height//s + 1, so y 8..48 (cells 0..2) ends at row 3 (exclusive)
    m = class_edit_token_mask((0, 8, 16, 48), 256, 16)
    assert m.any(1).nonzero().flatten().tolist() == [0, 1, 2]
    assert class_edit_token_mask((0, 0, 32, 32), (64, 128), (4, 8)).shape == (4, 8)
    with pytest.raises(ValueError, match="multiple"):
        class_edit_token_mask((0, 0, 8, 8), 250, 16)
    with pytest.raises(ValueError, match="x0"):
        class_edit_token_mask((10, 0, 5, 8), 256, 16)


def test_blurred_composite_matches_pil_reference():
    from PIL import Image, ImageFilter

    m = class_edit_token_mask((64, 64, 160, 192), 256, 16)
    pil = Image.fromarray(np.uint8(m.numpy() * 255.0)).resize((256, 256))
    ref = np.float32(pil.filter(ImageFilter.GaussianBlur(radius=256 // 16 - 1))) / 255.0
    ones, zeros = torch.ones(1, 1, 256, 256), torch.zeros(1, 1, 256, 256)
    ours = blurred_composite(ones, zeros, m)[0, 0].numpy()
    assert np.abs(ours - ref).max() < 0.035 and np.abs(ours - ref).mean() < 0.01


def test_blurred_composite_mixes_edited_inside_original_outside():
    edited, original = torch.full((2, 3, 64, 64), 0.9), torch.full((2, 3, 64, 64), 0.1)
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[2:6, 2:6] = True
    hard = blurred_composite(edited, original, mask, radius=0)
    assert torch.equal(hard[:, :, 16:48, 16:48], edited[:, :, 16:48, 16:48])
    assert (hard[:, :, :16] == 0.1).all()
    soft = blurred_composite(edited, original, mask)  # radius 64//16 − 1 = 3
    assert soft[0, 0, 32, 32].item() == pytest.approx(0.9, abs=1e-3)
    assert soft[0, 0, 2, 2].item() == pytest.approx(0.1, abs=1e-3)
    assert 0.1 < soft[0, 0, 16, 32].item() < 0.9  # the seam is blended
    with pytest.raises(ValueError, match="divide"):
        blurred_composite(edited, original, torch.zeros(7, 7))
    with pytest.raises(ValueError, match="one shape"):
        blurred_composite(edited, original[:1], mask)


def test_class_edit_official_defaults_and_composite():
    tokens = torch.randint(0, K, (2, 16, 16), generator=gen())
    calls = []
    decoded_images = []

    def tokens_to_images(t):
        img = (t.float() / K)[:, None].repeat_interleave(16, 2).repeat_interleave(16, 3).expand(-1, 3, -1, -1)
        decoded_images.append(img)
        return img

    original = torch.rand(2, 3, 256, 256, generator=gen())
    res = class_edit(position_logits(calls), tokens, (64, 64, 160, 192), 256, mask_id=MASK,
                     original_images=original, tokens_to_images=tokens_to_images, generator=gen())
    assert len(calls) == 10  # steps 12, start_iter 2
    assert torch.equal(res.token_mask, class_edit_token_mask((64, 64, 160, 192), 256, 16))
    assert torch.equal(res.tokens[:, ~res.token_mask], tokens[:, ~res.token_mask])
    assert (res.tokens < K).all()
    expected = blurred_composite(decoded_images[0], original, res.token_mask)
    assert torch.equal(res.images, expected)
    plain = class_edit(position_logits(), tokens, (64, 64, 160, 192), 256, mask_id=MASK, steps=4, start_iter=0)
    assert plain.images is None
    with pytest.raises(ValueError, match="both"):
        class_edit(position_logits(), tokens, (64, 64, 160, 192), 256, mask_id=MASK, original_images=original)
