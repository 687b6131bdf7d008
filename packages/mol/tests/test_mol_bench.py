"""Every quick ``polyfm bench`` case of mol builds and steps, ours and the reference:
inference gives outputs of the same shapes, training steps finite losses."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from polyfm.mol.bench import cases
from polyfm.mol.conformers import Conformer

CASES = cases(quick=True)


def _shapes(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, Conformer):
        return out.coordinates.shape
    if isinstance(out, tuple):  # unimol_tools' inner_smi2coords: (atoms, coordinates, mol)
        return out[1].shape
    return [_shapes(o) for o in out]


def test_every_family_is_benchmarked() -> None:
    names = {c.name for c in CASES}
    assert {"mol/conformers/etkdg", "mol/chemberta-77m/inference", "mol/chemberta-77m/mlm-train"} <= names
    assert {"mol/unimol/forward", "mol/unimol/train"} <= names
    assert all(c.reference is not None and c.reference_name for c in CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_quick_case_steps_ours_and_reference(case) -> None:
    device = torch.device("cpu")
    ours = case.ours(device)()
    try:
        reference = case.reference(device)()
    except ImportError as exc:  # the references are test-only dependencies
        pytest.skip(f"reference not installed: {exc}")
    if case.name.endswith("train"):
        assert ours.ndim == 0 and torch.isfinite(ours), case.name
        assert reference.ndim == 0 and torch.isfinite(reference), case.name
    else:
        assert _shapes(ours) == _shapes(reference), case.name


def test_unimol_layer_on_packed_tokens_matches_the_padded_layout() -> None:
    """On CPU the per-token layers see the real tokens only (packed), on GPUs the padded
    batch: the same outputs at real tokens, the same pair representation at real queries."""
    from polyfm.mol.models.unimol import UniMol

    torch.manual_seed(0)
    model = UniMol(encoder_layers=1, embed_dim=32, ffn_embed_dim=64, attention_heads=4).eval()
    layer, (batch, length, heads) = model.encoder.layers[0], (3, 7, 4)
    padding = torch.arange(length) >= torch.tensor([[7], [4], [2]])
    x = torch.randn(batch, length, 32)
    bias = torch.randn(batch, heads, length, length).masked_fill(padding[:, None, None, :], float("-inf"))
    rows = (~padding).nonzero().unbind(1)
    with torch.no_grad():
        padded_x, padded_pair = layer(x, bias.view(-1, length, length))
        packed_x, packed_pair = layer(x[rows], bias.view(-1, length, length), rows, (batch, length))
    torch.testing.assert_close(packed_x, padded_x[rows])
    packed_pair, padded_pair = (p.view(batch, heads, length, length).transpose(1, 2)[rows] for p in (packed_pair, padded_pair))
    torch.testing.assert_close(packed_pair, padded_pair)
