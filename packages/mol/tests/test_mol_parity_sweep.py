"""Adversarial inputs against the reference code: Uni-Mol without hydrogens (unimol_tools'
``ConformerGen`` and ``UniMolModel`` with ``remove_hs=True``) on elements the dictionary lacks and
single atoms; ChemBERTa-2's MTR head; SMILES RDKit refuses, empty cells, blank lines and
duplicates in CSV and SD files."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from polyfm.core.errors import ConfigError, DataError
from polyfm.mol.conformers import collate_unimol
from polyfm.mol.data import MoleculeDataModule, UniMolFeaturiser, read_molecules
from polyfm.mol.models.unimol import OFFICIAL_MOL_SYMBOLS, UniMol, UniMolDictionary

# elements mol.dict.txt lacks (Pt, Te, Mg, a dummy atom), deuterium (an H), single atoms, a drug
ADVERSARIAL = ["[Pt]", "N.N.Cl[Pt]Cl", "C[Te]C", "[Mg+2].[Cl-].[Cl-]", "*C", "[2H]C([2H])([2H])O", "[Na+]", "C",
               "CC(=O)Nc1ccc(O)cc1"]  # fmt: skip


@pytest.fixture(scope="module")
def no_h(tmp_path_factory):
    """A random Uni-Mol saved as the no-H checkpoint, with a dict.txt in unimol_tools' special
    order (so the same ids mean the same rows on both sides), and unimol_tools' model of it."""
    tools = pytest.importorskip("unimol_tools.models.unimol", reason="unimol-tools (requirements-test-nodeps.txt) not installed")
    folder = tmp_path_factory.mktemp("no-h")
    order = ["[CLS]", "[UNK]", "[PAD]", "[SEP]", *[s for s in OFFICIAL_MOL_SYMBOLS if not s.startswith("[")]]
    dictionary = UniMolDictionary(order).write(folder / "dict.txt")
    torch.manual_seed(0)
    ours = UniMol(dictionary=str(dictionary), final_head_layer_norm=False)
    with torch.no_grad():  # non-trivial pair affines, so the geometry reaches the output
        ours.gbf.mul.weight.normal_(1.0, 0.2)
        ours.gbf.bias.weight.normal_(0.0, 0.2)
    checkpoint = folder / "mol_pre_no_h_220816.pt"
    torch.save({"model": ours.official_state_dict()}, checkpoint)
    theirs = tools.UniMolModel(output_dim=1, data_type="molecule", remove_hs=True, pretrained_model_path=str(checkpoint),
                               pretrained_dict_path=str(dictionary)).eval()  # fmt: skip
    loaded = UniMol.from_pretrained(checkpoint, dictionary=str(dictionary)).eval()
    return loaded, theirs, dictionary


def test_unimol_without_hydrogens_matches_unimol_tools_on_rare_elements_and_single_atoms(no_h, caplog) -> None:
    from unimol_tools.data.conformer import ConformerGen

    ours, theirs, dictionary = no_h
    featuriser = UniMolFeaturiser(dictionary=str(dictionary), remove_hs=True, mmff=True)
    with caplog.at_level(logging.WARNING, logger="polyfm.mol.data"):
        featurise = featuriser.prepare(ADVERSARIAL, list(range(1, len(ADVERSARIAL) + 1)))
    mine = [featurise(i) for i in range(len(ADVERSARIAL))]
    reference, _ = ConformerGen(remove_hs=True, pretrained_dict_path=str(dictionary), multi_process=False).transform(ADVERSARIAL)
    for smiles, a, b in zip(ADVERSARIAL, mine, reference, strict=True):
        for key in a:  # the same tokens ([UNK] for the missing elements), coordinates and distances
            np.testing.assert_allclose(a[key], b[key], atol=1e-4, err_msg=f"{smiles} {key}")
    unk = ours.dictionary.unk
    assert [int((m["src_tokens"] == unk).sum()) for m in mine] == [1, 1, 1, 1, 1, 0, 0, 0, 0]
    assert [len(m["src_tokens"]) for m in mine[-3:-1]] == [3, 3]  # [CLS] atom [SEP]: Na+, and methane without its H
    # [UNK] as the official code does, but said, with the rows and elements
    assert featuriser.unknown_atom_rows == {1: ["Pt"], 2: ["Pt"], 3: ["Te"], 4: ["Mg"], 5: ["*"]}
    assert "5 of 9 molecules hold elements the Uni-Mol dictionary lacks (*, Mg, Pt, Te)" in caplog.text
    batch = collate_unimol(mine, ours.padding_idx)
    with torch.no_grad():
        expected = theirs(**batch, return_repr=True)
        got = ours.forward_features(batch)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_chemberta_mtr_head_is_chemberta2s_regression_head(tmp_path) -> None:
    """ChemBERTa-2's RobertaForRegression: <s> -> dropout -> dense -> ReLU -> dropout -> out_proj,
    on transformers' RobertaModel; a released MTR checkpoint's ``regression.*`` loads key for key."""
    from transformers import RobertaConfig, RobertaForMaskedLM

    from polyfm.mol.models import ChemBERTa
    from polyfm.mol.objectives import MultiTaskRegression

    config = RobertaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
                           max_position_embeddings=40, type_vocab_size=1)  # fmt: skip
    torch.manual_seed(0)
    trunk = RobertaForMaskedLM(config).eval()
    head = {"regression.dense.weight": torch.randn(32, 32) * 0.3, "regression.dense.bias": torch.randn(32) * 0.3,
            "regression.out_proj.weight": torch.randn(7, 32) * 0.3, "regression.out_proj.bias": torch.randn(7) * 0.3}  # fmt: skip
    state = {k: v for k, v in trunk.state_dict().items() if k.startswith("roberta.")} | head
    state |= {"norm_mean": torch.zeros(7), "norm_std": torch.ones(7)}
    folder = tmp_path / "mtr"
    folder.mkdir()
    config.save_pretrained(str(folder))
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.warns(UserWarning, match="lm_head is freshly initialised"):
        model = ChemBERTa.from_pretrained(folder).eval()
    objective = MultiTaskRegression(32, 7, dropout=0.0)
    objective.load_state_dict(head, strict=True)  # the same names and shapes
    ids = torch.tensor([[0, 5, 6, 7, 8, 2, 1, 1], [0, 9, 10, 11, 12, 13, 14, 2]])
    mask = (ids != 1).long()
    with torch.no_grad():
        cls = trunk.roberta(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
        expected = F.linear(torch.relu(F.linear(cls, head["regression.dense.weight"], head["regression.dense.bias"])),
                            head["regression.out_proj.weight"], head["regression.out_proj.bias"])  # fmt: skip
        got = objective.predict(model, {"input_ids": ids, "attention_mask": mask})
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_refused_smiles_name_the_file_the_row_its_line_and_rdkits_reason(tmp_path) -> None:
    path = tmp_path / "assay.csv"
    # a blank line (pandas skips it) and a quoted cell over two lines: rows and lines part ways
    path.write_text('smiles,y,note\nCCO,1,a\n\nC(C)(C)(C)(C)C,2,b\nc1cccc1,3,"two\nlines"\nC1CC,4,c\n,5,d\n  ,6,e\nCCN,7,f\n')
    with pytest.raises(DataError) as raised:
        read_molecules(path, target_columns=["y"])
    message = str(raised.value)
    assert message.startswith(f"{path}: 5 invalid SMILES in column 'smiles'")
    assert "row 2 (line 4) 'C(C)(C)(C)(C)C': RDKit cannot sanitise it (Explicit valence for atom # 0 C, 5, is greater than permitted)" in message
    assert "row 3 (line 5) 'c1cccc1': RDKit cannot sanitise it (Can't kekulize mol. Unkekulized atoms: 0 1 2 3 4)" in message
    assert "row 4 (line 7) 'C1CC': RDKit cannot parse it (not SMILES syntax" in message
    assert "row 5 (line 8) '': empty SMILES" in message and "row 6 (line 9) '  ': empty SMILES" in message
    kept = read_molecules(path, target_columns=["y"], skip_invalid=True)
    assert kept.rows == [1, 7] and [r for r, _, _ in kept.skipped] == [2, 3, 4, 5, 6]
    # a bad label names the line it is on, past the blank line
    path.write_text("smiles,y\nCCO,1\n\n\nCCN,high\n")
    with pytest.raises(DataError, match=r"assay\.csv, row 2, key 'y': \(line 5\) target 'high' is not a number"):
        read_molecules(path)


def test_duplicates_are_logged_dropped_or_refused_by_row(tmp_path, caplog) -> None:
    path = tmp_path / "assay.csv"
    # the same molecules written two ways (canonical SMILES are compared), one with another label
    path.write_text("smiles,y,name\nCCO,1,a\nOCC,1,b\nc1ccccc1,2,c\nCCN,4,e\nC1=CC=CC=C1,3,d\n")
    with caplog.at_level(logging.WARNING, logger="polyfm.mol.data"):
        table = read_molecules(path, target_columns=["y"])
    assert len(table) == 5 and table.duplicates == [[1, 2], [3, 5]]
    assert "2 molecules appear on more than one row (the same canonical SMILES, 4 rows; 1 with different labels)" in caplog.text
    assert "'c1ccccc1' at row 3 (line 4), row 5 (line 6) (labels differ)" in caplog.text and "duplicates='first'" in caplog.text
    first = read_molecules(path, target_columns=["y"], duplicates="first")
    assert first.rows == [1, 3, 4] and first.other_columns["name"] == ["a", "c", "e"] and first.targets[:, 0].tolist() == [1, 2, 4]
    with pytest.raises(DataError, match=r"assay\.csv: 2 molecules appear on more than one row .*'CCO' at row 1 \(line 2\), row 2 \(line 3\)"):
        read_molecules(path, target_columns=["y"], duplicates="error")
    # the data module takes the option, checked before anything is read
    dm = MoleculeDataModule(str(path), target_columns=["y"], split="random", split_fractions=(0.6, 0.2, 0.2), duplicates="first")
    assert dm.read().rows == [1, 3, 4]
    with pytest.raises(DataError, match="appear on more than one row"):
        MoleculeDataModule(str(path), target_columns=["y"], duplicates="error").read()
    with pytest.raises(ConfigError, match="duplicates='drop'"):
        MoleculeDataModule(str(tmp_path / "not-read.csv"), duplicates="drop")


def test_duplicate_records_of_an_sd_file_are_named_by_record(tmp_path) -> None:
    from rdkit import Chem

    path = tmp_path / "library.sdf"
    writer = Chem.SDWriter(str(path))
    for title, smiles in (("ethanol", "CCO"), ("benzene", "c1ccccc1"), ("alcohol", "OCC")):
        mol = Chem.MolFromSmiles(smiles)
        mol.SetProp("_Name", title)
        mol.SetProp("y", "1")
        writer.write(mol)
    writer.close()
    with pytest.raises(DataError, match=r"library\.sdf: 1 molecules appear on more than one record .*'CCO' at record 1 'ethanol', record 3 'alcohol'"):
        read_molecules(path, duplicates="error")
    assert read_molecules(path, duplicates="first").rows == [1, 2]


@pytest.mark.parametrize("smiles", ["", "   "])
def test_an_empty_smiles_list_entry_is_refused_with_its_position(smiles) -> None:
    from polyfm.mol.data import MoleculePretrainDataModule

    dm = MoleculePretrainDataModule(smiles=["CCO", smiles, "CCN"], skip_invalid=False)
    with pytest.raises(DataError, match=r"1 invalid SMILES in the list \(entries from 1\): entry 2 '\s*': empty SMILES\. Fix them"):
        dm.setup()


def test_blank_lines_keep_rows_and_labels_together(tmp_path: Path) -> None:
    path = tmp_path / "gaps.csv"
    path.write_text("smiles,y\n\nCCO,1\n\n\nCCN,2\n\n")
    table = read_molecules(path)
    assert table.rows == [1, 2] and table.targets[:, 0].tolist() == [1.0, 2.0] and table.smiles == ["CCO", "CCN"]


def test_the_data_module_embeds_the_canonical_smiles_unless_told_not_to(no_h, tmp_path) -> None:
    """unimol_tools embeds the SMILES as written; the data module embeds RDKit's canonical SMILES
    (one conformer per molecule however it is written), or the text with ``canonicalize=False``."""
    from rdkit import Chem
    from unimol_tools.data.conformer import ConformerGen

    _, _, dictionary = no_h
    written = ["OCC", "C1=CC=CC=C1O", "OC(=O)c1ccccc1"]
    path = tmp_path / "written.csv"
    path.write_text("smiles,y\n" + "".join(f"{s},1\n" for s in written))
    tools = ConformerGen(remove_hs=True, pretrained_dict_path=str(dictionary), multi_process=False)
    for canonicalize in (True, False):
        dm = MoleculeDataModule(str(path), model="unimol", dictionary=str(dictionary), remove_hs=True, canonicalize=canonicalize,
                                split="random", split_fractions=(1.0, 0.0, 0.0))  # fmt: skip
        dm.setup()
        smiles = [Chem.MolToSmiles(Chem.MolFromSmiles(s)) for s in written] if canonicalize else written
        reference, _ = tools.transform(smiles)
        for i, expected in enumerate(reference):
            got = dm.train_set.featurise(i)
            for key in got:
                np.testing.assert_allclose(got[key], expected[key], atol=1e-4, err_msg=f"{smiles[i]} {key}")


def test_released_weights_refuse_the_other_hydrogen_setting(tmp_path) -> None:
    """The no-H weights fed hydrogens (or the all-H weights fed none) would run on inputs the
    model never saw; unimol_tools cannot do it (it picks the checkpoint from remove_hs)."""
    import lightning as L

    from polyfm.core.tasks import Regression
    from polyfm.core.weights import get_weights
    from polyfm.mol.models.unimol import trained_with_hydrogens

    assert trained_with_hydrogens(Path("weights.pt"), get_weights("unimol-mol-no-h")) is False
    assert trained_with_hydrogens(Path("weights.pt"), get_weights("unimol-mol-all-h")) is True
    assert trained_with_hydrogens(Path("my_model.pt"), None) is None
    small = {"encoder_layers": 1, "embed_dim": 16, "ffn_embed_dim": 32, "attention_heads": 2, "num_kernels": 8}
    torch.manual_seed(0)
    checkpoint = tmp_path / "mol_pre_no_h_220816.pt"
    torch.save({"model": UniMol(**small).official_state_dict()}, checkpoint)
    path = tmp_path / "assay.csv"
    path.write_text("smiles,y\n" + "".join(f"{s},{i}\n" for i, s in enumerate(["CCO", "CCN", "CCC", "CCCl", "CCCO", "CCCN", "CCOC", "CCS"])))
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    for remove_hs, ok in ((False, False), (True, True)):
        encoder = UniMol(**small, pretraining_heads=False, pretrained=str(checkpoint))  # the recipe's way
        assert encoder.hydrogens is False
        task = Regression(encoder, target_mean=[2.5], target_std=[1.0])
        dm = MoleculeDataModule(str(path), model="unimol", remove_hs=remove_hs, mmff=False, split="random",
                                split_fractions=(0.5, 0.25, 0.25))  # fmt: skip
        if ok:
            trainer.validate(task, dm, verbose=False)
        else:
            with pytest.raises(ConfigError, match=r"pretrained without hydrogens, but the data has remove_hs=False: pass remove_hs=True"):
                trainer.validate(task, dm, verbose=False)
    all_h = tmp_path / "all" / "mol_pre_all_h_220816.pt"
    all_h.parent.mkdir()
    torch.save({"model": UniMol(**small).official_state_dict()}, all_h)
    assert UniMol.from_pretrained(all_h, **small).hydrogens is True
