"""A user's path through the CLI: fit a recipe on their own CSV, predict new molecules into a
CSV named by the input (its other columns kept), resume from last.ckpt, and a clear error when
the recipe's task does not fit the CSV's target columns."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

import polyfm.mol
from polyfm.core.cli import main
from polyfm.core.errors import ConfigError
from polyfm.mol.samples import sample_smiles

RECIPES = Path(polyfm.mol.__file__).parent / "recipes"
TINY_CHEMBERTA = [
    "--model.init_args.encoder.init_args.hidden_size=16",
    "--model.init_args.encoder.init_args.num_hidden_layers=1",
    "--model.init_args.encoder.init_args.num_attention_heads=2",
    "--model.init_args.encoder.init_args.intermediate_size=32",
]
QUIET = ["--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def write_data(folder: Path) -> tuple[Path, Path]:
    molecules = sample_smiles()[::20][:40]  # varied scaffolds
    train = folder / "my_assay.csv"
    train.write_text("smiles,pIC50\n" + "".join(f"{s},{5 + len(s) / 20:.2f}\n" for s in molecules))
    new = folder / "screen_batch1.tsv"
    new.write_text("compound_id\tsmiles\tsupplier\nZ1\tCCO\tEnamine\nZ2\tc1ccccc1O\tMcule\nZ3\t[Na+].[Cl-]\t\n")
    return train, new


def test_mol_cli_fit_predict_to_csv_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    train, new = write_data(tmp_path)
    recipe = ["--config", str(RECIPES / "finetune-chemberta-esol.yaml"), *TINY_CHEMBERTA, *QUIET, "--data.init_args.batch_size=8"]
    own_data = [
        f"--data.init_args.csv_path={train}",
        "--data.init_args.target_columns=[pIC50]",
        "--model.init_args.target_names=[pIC50]",
        "--model.init_args.target_mean=[6.0]",
        "--model.init_args.target_std=[1.0]",
    ]
    main(["fit", *recipe, *own_data, "--trainer.max_steps=2", "--trainer.limit_val_batches=1"])
    last = tmp_path / "runs/mol-chemberta-esol/logs/version_0/checkpoints/last.ckpt"
    assert last.is_file()

    main(["predict", *recipe, *own_data, f"--ckpt_path={last}", f"--data.init_args.predict_path={new}"])
    out = tmp_path / "runs/mol-chemberta-esol/predictions/screen_batch1.csv"
    table = pd.read_csv(out, keep_default_na=False)
    assert list(table.columns) == ["row", "smiles", "canonical_smiles", "compound_id", "supplier", "pred_pIC50"]
    assert table["compound_id"].tolist() == ["Z1", "Z2", "Z3"] and table["supplier"].tolist() == ["Enamine", "Mcule", ""]
    assert table["canonical_smiles"][1] == "Oc1ccccc1"
    # the file holds what the checkpoint predicts, in original units
    from polyfm.core.tasks import Regression

    task = Regression.load_from_checkpoint(last, encoder=_tiny_encoder(), weights_only=True).eval()
    from polyfm.mol.data import ChemBERTaFeaturiser

    with torch.no_grad():
        direct = task(ChemBERTaFeaturiser(tokenizer=None, max_length=128).tokenizer(["CCO"]))[0, 0].item()
    assert table["pred_pIC50"][0] == pytest.approx(direct, abs=1e-4)

    # without predict_path: the test split, with its measured values beside the predictions
    main(["predict", *recipe, *own_data, f"--ckpt_path={last}"])
    split = pd.read_csv(tmp_path / "runs/mol-chemberta-esol/predictions/my_assay_test.csv")
    assert list(split.columns) == ["row", "smiles", "canonical_smiles", "pIC50", "pred_pIC50"] and len(split) >= 3
    written = dict(line.split(",") for line in train.read_text().splitlines()[1:])  # smiles -> pIC50 as written
    first = (tmp_path / "runs/mol-chemberta-esol/predictions/my_assay_test.csv").read_text().splitlines()[1].split(",")
    assert first[3] == written[first[1]]

    main(["fit", *recipe, *own_data, "--trainer.max_steps=4", "--trainer.limit_val_batches=1", f"--ckpt_path={last}"])
    resumed_path = tmp_path / "runs/mol-chemberta-esol/logs/version_3/checkpoints/last.ckpt"
    resumed = torch.load(resumed_path, weights_only=True)
    assert resumed["global_step"] == 4

    # two checkpoints: an ensemble, with the spread across them beside each mean
    main(["predict", *recipe, *own_data, f"--ckpt_path={last},{resumed_path}", f"--data.init_args.predict_path={new}"])
    ensemble = pd.read_csv(out, keep_default_na=False)
    assert list(ensemble.columns) == ["row", "smiles", "canonical_smiles", "compound_id", "supplier", "pred_pIC50", "pred_pIC50_std"]
    later = Regression.load_from_checkpoint(resumed_path, encoder=_tiny_encoder(), weights_only=True).eval()
    with torch.no_grad():
        both = [direct, later(ChemBERTaFeaturiser(tokenizer=None, max_length=128).tokenizer(["CCO"]))[0, 0].item()]
    assert ensemble["pred_pIC50"][0] == pytest.approx(sum(both) / 2, abs=1e-4)
    assert ensemble["pred_pIC50_std"][0] == pytest.approx(abs(both[0] - both[1]) / 2**0.5, abs=1e-4)


def _tiny_encoder() -> torch.nn.Module:
    from polyfm.mol.models import ChemBERTa

    return ChemBERTa(vocab_size=160, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=130, pooling="mean")  # fmt: skip


def test_mol_cli_recipe_task_must_match_the_csv_targets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The recipe's ESOL head (name, mean, std) on another CSV's column: refused with the overrides to pass."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("POLYFM_TRACEBACK", "1")  # the error itself, not the CLI's one-line print and exit 2
    train, _ = write_data(tmp_path)
    with pytest.raises(ConfigError) as caught:
        main(["fit", "--config", str(RECIPES / "finetune-chemberta-esol.yaml"), *TINY_CHEMBERTA, *QUIET,
              f"--data.init_args.csv_path={train}", "--data.init_args.target_columns=[pIC50]", "--trainer.fast_dev_run=true"])  # fmt: skip
    message = str(caught.value)
    assert "my_assay.csv" in message and "['pIC50']" in message and "named ['logSolubility']" in message
    assert "--model.init_args.target_names='[\"pIC50\"]'" in message and "--model.init_args.target_mean='[" in message


def write_chemberta2_cache(cache: Path) -> torch.nn.Module:
    """The registered chemberta-2-77m-mlm folder as `polyfm weights fetch` leaves it: the released
    tokenizer layout and a RobertaForMaskedLM of the 77M configuration (random weights)."""
    import importlib.util

    from transformers import RobertaConfig, RobertaForMaskedLM, RobertaTokenizerFast

    spec = importlib.util.spec_from_file_location("layouts", Path(__file__).with_name("test_mol_tokenizer_layouts.py"))
    assert spec is not None and spec.loader is not None
    layouts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(layouts)  # the released tokenizer files, as that test writes them
    folder = cache / "weights" / "chemberta-2-77m-mlm"
    layouts.write_chemberta2_folder(folder)
    RobertaTokenizerFast.from_pretrained(str(folder)).save_pretrained(str(folder))
    (folder / "added_tokens.json").write_text('{"<s>": 591, "</s>": 592}')
    specials = {"bos_token": "<s>", "cls_token": "[CLS]", "eos_token": "</s>", "mask_token": "[MASK]", "pad_token": "[PAD]",
                "sep_token": "[SEP]", "unk_token": "[UNK]"}  # fmt: skip
    (folder / "special_tokens_map.json").write_text(json.dumps(specials))
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=600, hidden_size=384, num_hidden_layers=3, num_attention_heads=12, intermediate_size=464,
                           max_position_embeddings=515, type_vocab_size=1)  # fmt: skip
    reference = RobertaForMaskedLM(config).eval()
    reference.config.save_pretrained(str(folder))
    torch.save(reference.state_dict(), folder / "pytorch_model.bin")  # the hub's file for this model
    return reference


def test_mol_cli_pretrained_chemberta2_recipe_loads_the_registered_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("POLYFM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("POLYFM_OFFLINE", "1")
    reference = write_chemberta2_cache(tmp_path / "cache")
    train, new = write_data(tmp_path)
    own_data = [f"--data.init_args.csv_path={train}", "--data.init_args.target_columns=[pIC50]",
                "--model.init_args.target_names=[pIC50]", "--model.init_args.target_mean=[6.0]", "--model.init_args.target_std=[1.0]"]  # fmt: skip
    recipe = ["--config", str(RECIPES / "finetune-chemberta2-esol.yaml"), *QUIET, *own_data, "--data.init_args.batch_size=8"]
    main(["fit", *recipe, "--trainer.max_steps=1", "--trainer.limit_val_batches=1", "--model.init_args.optim.lr=0.0"])
    last = tmp_path / "runs/mol-chemberta2-esol/logs/version_0/checkpoints/last.ckpt"
    state = torch.load(last, weights_only=True)["state_dict"]
    # lr 0: the fine-tuned trunk is still the released one
    expected = reference.state_dict()["roberta.encoder.layer.2.output.dense.weight"]
    torch.testing.assert_close(state["encoder.roberta.encoder.layer.2.output.dense.weight"], expected)
    main(["predict", *recipe, f"--ckpt_path={last}", f"--data.init_args.predict_path={new}"])
    table = pd.read_csv(tmp_path / "runs/mol-chemberta2-esol/predictions/screen_batch1.csv")
    assert table["pred_pIC50"].notna().all() and table["compound_id"].tolist() == ["Z1", "Z2", "Z3"]


def test_mol_pretrained_argument_names_the_architecture_to_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from polyfm.core.errors import CheckpointError
    from polyfm.core.weights import get_weights, weights_dir
    from polyfm.mol.models import ChemBERTa, UniMol
    from polyfm.mol.models.unimol import UniMolDictionary

    monkeypatch.setenv("POLYFM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("POLYFM_OFFLINE", "1")
    write_chemberta2_cache(tmp_path / "cache")
    with pytest.raises(
        CheckpointError, match=r"chemberta-2-77m-mlm is a ChemBERTa with hidden_size: 384.*this one has hidden_size: 16"
    ):
        ChemBERTa(vocab_size=600, hidden_size=16, num_attention_heads=2, pretrained="chemberta-2-77m-mlm")
    assert ChemBERTa(pretrained="chemberta-2-77m-mlm", pooling="mean").pooling == "mean"
    with pytest.raises(
        CheckpointError, match=r"unimol-mol-no-h is a Uni-Mol with encoder_layers: 15.*this one has encoder_layers: 1"
    ):
        UniMol(encoder_layers=1, embed_dim=16, ffn_embed_dim=32, attention_heads=4, pretrained="unimol-mol-no-h")
    # a local .pt of the model's own architecture loads, without the pretraining heads it does not build
    small = {"encoder_layers": 1, "embed_dim": 16, "ffn_embed_dim": 32, "attention_heads": 4, "num_kernels": 8}
    torch.manual_seed(0)
    released = UniMol(**small)
    folder = weights_dir(get_weights("unimol-mol-no-h"))
    folder.mkdir(parents=True)
    torch.save({"model": released.official_state_dict()}, tmp_path / "small.pt")
    UniMolDictionary.official().write(tmp_path / "mol.dict.txt")
    tuned = UniMol(**small, pretraining_heads=False, final_head_layer_norm=False, pretrained=str(tmp_path / "small.pt"))
    assert tuned.lm_head is None and torch.equal(tuned.gbf.mul.weight, released.gbf.mul.weight)


def test_mol_cli_pretrain_then_finetune_from_its_last_ckpt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pretrain-chemberta-mlm.yaml, then finetune-chemberta-esol.yaml with pretrained: <its last.ckpt>."""
    monkeypatch.chdir(tmp_path)
    train, _ = write_data(tmp_path)
    tiny = [a.replace("encoder.", "model.") for a in TINY_CHEMBERTA]
    main(["fit", "--config", str(RECIPES / "pretrain-chemberta-mlm.yaml"), *tiny, *QUIET, f"--data.init_args.csv_path={train}",
          "--data.init_args.batch_size=8", "--trainer.max_steps=2", "--trainer.limit_val_batches=1"])  # fmt: skip
    pretrained = next((tmp_path / "runs/mol-chemberta-mlm").rglob("last.ckpt"))
    trunk = torch.load(pretrained, weights_only=True)["state_dict"]["model.roberta.encoder.layer.0.output.dense.weight"]
    main(["fit", "--config", str(RECIPES / "finetune-chemberta-esol.yaml"), *TINY_CHEMBERTA, *QUIET,
          f"--model.init_args.encoder.init_args.pretrained={pretrained}", "--model.init_args.optim.lr=0.0",
          f"--data.init_args.csv_path={train}", "--data.init_args.target_columns=[pIC50]", "--model.init_args.target_names=[pIC50]",
          "--data.init_args.batch_size=8", "--trainer.max_steps=1", "--trainer.limit_val_batches=1"])  # fmt: skip
    tuned = torch.load(tmp_path / "runs/mol-chemberta-esol/logs/version_0/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    torch.testing.assert_close(tuned["encoder.roberta.encoder.layer.0.output.dense.weight"], trunk)
    # a checkpoint of another width is refused with the keys, not loaded halfway
    from polyfm.core.errors import CheckpointError
    from polyfm.mol.models import ChemBERTa

    with pytest.raises(CheckpointError, match="roberta.encoder.layer.0"):
        ChemBERTa(vocab_size=160, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                  max_position_embeddings=130, pretrained=str(pretrained))  # fmt: skip
