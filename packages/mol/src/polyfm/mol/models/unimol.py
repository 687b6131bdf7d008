"""Uni-Mol (Zhou et al., ICLR 2023): a transformer over atoms with a pair representation.

Read top to bottom: the dictionary (the official ``dict.txt`` format), the Gaussian
kernel over pair distances, the attention layer whose pre-softmax scores become the
next layer's pair representation, the encoder, the pretraining heads, and the model.

Parameter names follow the official code (deepmodeling/Uni-Mol ``unimol/models/unimol.py``
and its ``TransformerEncoderWithPair``), so the released checkpoints
(``{'model': state_dict}``, e.g. ``mol_pre_all_h_220816.pt``) load without renaming:
``embed_tokens``, ``encoder.layers.N.self_attn.in_proj``, ``encoder.emb_layer_norm``,
``encoder.final_layer_norm``, ``encoder.final_head_layer_norm``, ``gbf.{means,stds,mul,bias}``,
``gbf_proj.linear{1,2}``, ``lm_head``, ``pair2coord_proj``, ``dist_head``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from polyfm.core.encoder import Encoder
from polyfm.core.errors import CheckpointError, DataError
from polyfm.core.weights import PretrainedMixin, WeightSpec, load_checkpoint_file, load_state_dict_checked, unwrap_state_dict

Rows = tuple[torch.Tensor, ...]  # batch and position indices of the real (unpadded) tokens

# The released molecule dictionary (mol.dict.txt, identical for the all-H and no-H models),
# in file order. The official loader (unicore.data.Dictionary) numbers symbols in file
# order, so [PAD]=0, [CLS]=1, [SEP]=2, [UNK]=3; the task then appends [MASK] (index 30).
OFFICIAL_MOL_SYMBOLS: tuple[str, ...] = (
    "[PAD]", "[CLS]", "[SEP]", "[UNK]", "C", "N", "O", "S", "H", "Cl", "F", "Br", "I", "Si", "P",
    "B", "Na", "K", "Al", "Ca", "Sn", "As", "Hg", "Fe", "Zn", "Cr", "Se", "Gd", "Au", "Li",
)  # fmt: skip


class UniMolDictionary:
    """Atom-type vocabulary in the official ``dict.txt`` format (``<symbol> [<count>]`` per line).

    Special symbols are found by name, not position, so a dictionary in another order
    (unimol_tools' loader puts [CLS],[UNK],[PAD],[SEP] first) works too. ``[MASK]`` is
    appended when the file lacks it, as the official task does.
    """

    def __init__(self, symbols: Sequence[str], add_mask: bool = True) -> None:
        self.symbols: list[str] = []
        self.indices: dict[str, int] = {}
        for symbol in symbols:
            if symbol not in self.indices:  # duplicates keep their first index, as in unicore
                self.indices[symbol] = len(self.symbols)
                self.symbols.append(symbol)
        if add_mask and "[MASK]" not in self.indices:
            self.indices["[MASK]"] = len(self.symbols)
            self.symbols.append("[MASK]")
        for special in ("[PAD]", "[CLS]", "[SEP]", "[UNK]"):
            if special not in self.indices:
                raise DataError(
                    f"the Uni-Mol dictionary has no {special} symbol; the official dict.txt starts with [PAD] [CLS] [SEP] [UNK]."
                )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> UniMolDictionary:
        path = Path(path)
        if not path.exists():
            raise DataError("Uni-Mol dictionary file not found; pass the dict.txt released with the checkpoint.", path=path)
        symbols = []
        for line_number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            line = raw.rstrip()
            if not line:
                continue
            parts = line.rsplit(" ", 1)
            if len(parts) == 2 and parts[1] == "#overwrite":
                parts = parts[0].rsplit(" ", 1)
            if len(parts) == 2 and not parts[1].lstrip("-").isdigit():
                raise DataError(f"expected '<symbol> <count>', got {raw!r}", path=path, row=line_number)
            symbols.append(parts[0])
        return cls(symbols)

    @classmethod
    def official(cls) -> UniMolDictionary:
        return cls(OFFICIAL_MOL_SYMBOLS)

    def __len__(self) -> int:
        return len(self.symbols)

    def index(self, symbol: str) -> int:
        return self.indices.get(symbol, self.indices["[UNK]"])

    @property
    def pad(self) -> int:
        return self.indices["[PAD]"]

    @property
    def bos(self) -> int:
        return self.indices["[CLS]"]

    @property
    def eos(self) -> int:
        return self.indices["[SEP]"]

    @property
    def unk(self) -> int:
        return self.indices["[UNK]"]

    @property
    def mask(self) -> int:
        return self.indices["[MASK]"]

    def special_indices(self) -> list[int]:
        return [i for s, i in self.indices.items() if s.startswith("[") and s.endswith("]")]

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write in the official format (the appended [MASK] is left out, as in the release)."""
        path = Path(path)
        lines = [s for s in self.symbols if s != "[MASK]"]
        path.write_text("".join(f"{s} {len(lines) - i}\n" for i, s in enumerate(lines)), encoding="utf-8")
        return path


def _activation(name: str) -> Any:
    table = {"gelu": F.gelu, "relu": F.relu, "tanh": torch.tanh, "linear": lambda x: x}
    if name not in table:
        raise ValueError(f"activation_fn must be one of {sorted(table)}, got {name!r}")
    return table[name]


def gaussian(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Normal density; the official constant 3.14159 is kept for agreement with released weights.

    The normalisation is folded into the exponent, which is floored at -87: far from
    their means the densities would otherwise be denormal floats (below 1.2e-38), on
    which CPUs are several times slower. Same values up to rounding and those < 1.7e-38."""
    exponent = -0.5 * ((x - mean) / std) ** 2 - torch.log((2 * 3.14159) ** 0.5 * std)
    return torch.exp(exponent.clamp(min=-87.0))


class GaussianLayer(nn.Module):
    """K Gaussian basis functions of an affinely transformed distance; the affine
    (``mul``, ``bias``) depends on the pair type ``i * len(dict) + j``."""

    def __init__(self, num_kernels: int = 128, edge_types: int = 1024) -> None:
        super().__init__()
        self.num_kernels = num_kernels
        self.means = nn.Embedding(1, num_kernels)
        self.stds = nn.Embedding(1, num_kernels)
        self.mul = nn.Embedding(edge_types, 1)
        self.bias = nn.Embedding(edge_types, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.means.weight, 0, 3)
        nn.init.uniform_(self.stds.weight, 0, 3)
        nn.init.constant_(self.bias.weight, 0)
        nn.init.constant_(self.mul.weight, 1)

    def forward(self, distance: torch.Tensor, edge_type: torch.Tensor) -> torch.Tensor:
        mul = self.mul(edge_type).type_as(distance)
        bias = self.bias(edge_type).type_as(distance)
        x = mul * distance.unsqueeze(-1) + bias  # broadcast against the K kernels
        mean = self.means.weight.float().view(-1)
        std = self.stds.weight.float().view(-1).abs() + 1e-5
        return gaussian(x.float(), mean, std).type_as(self.means.weight)


class NonLinearHead(nn.Module):
    def __init__(self, input_dim: int, out_dim: int, activation_fn: str = "gelu", hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or input_dim
        self.linear1 = nn.Linear(input_dim, hidden)
        self.linear2 = nn.Linear(hidden, out_dim)
        self.activation = _activation(activation_fn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.linear2(self.activation(self.linear1(x)))
        return out


class SelfMultiheadAttention(nn.Module):
    """Attention with an additive per-head bias; returns the biased pre-softmax scores,
    which are the updated pair representation."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.1) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.dropout = embed_dim, num_heads, dropout
        self.head_dim = embed_dim // num_heads
        self.scaling = self.head_dim**-0.5
        self.in_proj = nn.Linear(embed_dim, embed_dim * 3)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(
        self, x: torch.Tensor, attn_bias: torch.Tensor, rows: Rows | None = None, shape: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` is ``(B, N, D)``, or with ``rows`` the ``(T, D)`` real tokens of a ``(B, N) = shape``
        batch (``rows``: their batch and position indices); the output has the layout of ``x``."""
        batch, length = shape if rows is not None and shape is not None else x.shape[:2]
        qkv = self.in_proj(x)
        if rows is None:  # one copy puts every head of q, k and v in place
            q, k, v = (
                qkv.view(batch, length, 3, self.num_heads, self.head_dim)
                .permute(2, 0, 3, 1, 4)
                .reshape(3, batch * self.num_heads, length, self.head_dim)
                .unbind(0)
            )
        else:  # scattered into place; padded q, k, v are zero (padded keys are masked, padded queries unused)
            heads = qkv.new_zeros(3, batch, self.num_heads, length, self.head_dim)
            heads.permute(1, 3, 0, 2, 4)[rows] = qkv.view(-1, 3, self.num_heads, self.head_dim)
            q, k, v = heads.view(3, batch * self.num_heads, length, self.head_dim).unbind(0)
        scores = torch.baddbmm(attn_bias, q, k.transpose(1, 2), alpha=self.scaling)
        probs = F.dropout(F.softmax(scores, dim=-1), p=self.dropout, training=self.training)
        out = torch.bmm(probs, v).view(batch, self.num_heads, length, self.head_dim).transpose(1, 2)
        out = out.reshape(batch, length, self.embed_dim) if rows is None else out[rows].reshape(-1, self.embed_dim)
        return self.out_proj(out), scores


class TransformerEncoderLayer(nn.Module):
    """Pre-LayerNorm block: attention with pair bias, then a GELU feed-forward."""

    def __init__(
        self,
        embed_dim: int,
        ffn_embed_dim: int,
        attention_heads: int,
        dropout: float,
        attention_dropout: float,
        activation_dropout: float,
        activation_fn: str,
    ) -> None:
        super().__init__()
        self.self_attn = SelfMultiheadAttention(embed_dim, attention_heads, dropout=attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(embed_dim)
        self.fc1 = nn.Linear(embed_dim, ffn_embed_dim)
        self.fc2 = nn.Linear(ffn_embed_dim, embed_dim)
        self.final_layer_norm = nn.LayerNorm(embed_dim)
        self.dropout, self.activation_dropout = dropout, activation_dropout
        self.activation = _activation(activation_fn)

    def forward(
        self, x: torch.Tensor, pair: torch.Tensor, rows: Rows | None = None, shape: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        attended, pair = self.self_attn(self.self_attn_layer_norm(x), pair, rows, shape)
        x = x + F.dropout(attended, p=self.dropout, training=self.training)
        h = self.activation(self.fc1(self.final_layer_norm(x)))
        h = self.fc2(F.dropout(h, p=self.activation_dropout, training=self.training))
        return x + F.dropout(h, p=self.dropout, training=self.training), pair


def _norm_excess(x: torch.Tensor, eps: float = 1e-10, tolerance: float = 1.0) -> torch.Tensor:
    """How far each vector's norm strays from sqrt(dim) beyond a tolerance (Uni-Mol's norm losses)."""
    x = x.float()
    norm = torch.sqrt(torch.sum(x**2, dim=-1) + eps)
    return F.relu((norm - x.shape[-1] ** 0.5).abs() - tolerance)


def _masked_mean(mask: torch.Tensor, value: torch.Tensor, dim: Any = -1, eps: float = 1e-10) -> torch.Tensor:
    return (torch.sum(mask * value, dim=dim) / (eps + torch.sum(mask, dim=dim))).mean()


class TransformerEncoderWithPair(nn.Module):
    def __init__(
        self,
        encoder_layers: int,
        embed_dim: int,
        ffn_embed_dim: int,
        attention_heads: int,
        emb_dropout: float,
        dropout: float,
        attention_dropout: float,
        activation_dropout: float,
        activation_fn: str,
        final_head_layer_norm: bool,
    ) -> None:
        super().__init__()
        self.emb_dropout = emb_dropout
        self.emb_layer_norm = nn.LayerNorm(embed_dim)
        self.final_layer_norm = nn.LayerNorm(embed_dim)
        # only the pretrained checkpoints (trained with the delta-pair norm loss) carry it
        self.final_head_layer_norm = nn.LayerNorm(attention_heads) if final_head_layer_norm else None
        self.layers = nn.ModuleList(
            TransformerEncoderLayer(
                embed_dim, ffn_embed_dim, attention_heads, dropout, attention_dropout, activation_dropout, activation_fn
            )
            for _ in range(encoder_layers)
        )

    def forward(self, emb: torch.Tensor, attn_bias: torch.Tensor, padding_mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        batch, length, _ = emb.shape
        x = F.dropout(self.emb_layer_norm(emb), p=self.emb_dropout, training=self.training)
        if padding_mask is not None:
            x = x * (1 - padding_mask.unsqueeze(-1).type_as(x))
            # padded keys get -inf in the bias of every head; the scores carry it through the layers
            attn_bias = (
                attn_bias.view(batch, -1, length, length)
                .masked_fill(padding_mask[:, None, None, :], float("-inf"))
                .view(-1, length, length)
            )
        input_bias = attn_bias
        pair = attn_bias
        rows = None
        if padding_mask is not None and x.device.type == "cpu":
            # on CPU the per-token layers run on the real tokens only (packed); on GPUs the
            # padded layout is kept, as finding the tokens would make the host wait
            rows = (~padding_mask).nonzero().unbind(1)
            x = x[rows]
        for layer in self.layers:
            x, pair = layer(x, pair, rows, (batch, length))
        if rows is not None:  # padded positions come back as zeros
            x = x.new_zeros(batch, length, x.shape[-1]).index_put(rows, x)

        token_mask = torch.ones(batch, length, device=x.device) if padding_mask is None else 1.0 - padding_mask.float()
        x_norm = _masked_mean(token_mask, _norm_excess(x))
        x = self.final_layer_norm(x)

        delta_pair = pair - input_bias
        if padding_mask is not None:  # -inf - -inf is nan at padded keys: zero them
            delta_pair = (
                delta_pair.view(batch, -1, length, length)
                .masked_fill(padding_mask[:, None, None, :], 0.0)
                .view(-1, length, length)
            )
        pair = pair.view(batch, -1, length, length).permute(0, 2, 3, 1).contiguous()
        delta_pair = delta_pair.view(batch, -1, length, length).permute(0, 2, 3, 1).contiguous()
        pair_mask = token_mask[..., None] * token_mask[..., None, :]
        delta_pair_norm = _masked_mean(pair_mask, _norm_excess(delta_pair), dim=(-1, -2))
        if self.final_head_layer_norm is not None:
            delta_pair = self.final_head_layer_norm(delta_pair)
        return {"x": x, "pair": pair, "delta_pair": delta_pair, "x_norm": x_norm, "delta_pair_norm": delta_pair_norm}


class MaskLMHead(nn.Module):
    """Atom-type prediction head (``lm_head``): dense, GELU, LayerNorm, projection to the dictionary."""

    def __init__(self, embed_dim: int, output_dim: int, activation_fn: str = "gelu") -> None:
        super().__init__()
        self.dense = nn.Linear(embed_dim, embed_dim)
        self.layer_norm = nn.LayerNorm(embed_dim)
        self.weight = nn.Parameter(torch.empty(output_dim, embed_dim))
        self.bias = nn.Parameter(torch.zeros(output_dim))
        nn.init.normal_(self.weight, std=0.02)
        self.activation = _activation(activation_fn)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(self.layer_norm(self.activation(self.dense(features))), self.weight) + self.bias


class DistanceHead(nn.Module):
    """Pair distance prediction (``dist_head``), symmetrised."""

    def __init__(self, heads: int, activation_fn: str = "gelu") -> None:
        super().__init__()
        self.dense = nn.Linear(heads, heads)
        self.layer_norm = nn.LayerNorm(heads)
        self.out_proj = nn.Linear(heads, 1)
        self.activation = _activation(activation_fn)

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        batch, length, _, _ = pair.shape
        x: torch.Tensor = self.out_proj(self.layer_norm(self.activation(self.dense(pair)))).view(batch, length, length)
        return (x + x.transpose(-1, -2)) * 0.5


def _init_bert(module: nn.Module) -> None:
    """The official init (normal 0.02, zero bias, zero padding row); Gaussian kernels keep their own."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()


class UniMol(Encoder, PretrainedMixin):
    """Uni-Mol molecular encoder.

    ``forward(src_tokens, src_distance, src_coord, src_edge_type)`` follows the official
    signature; ``forward_features(batch_input)`` takes the same four tensors in a dict and
    returns the [CLS] representation ``(B, embed_dim)`` (unimol_tools' ``cls_repr``).

    ``dictionary`` is a ``dict.txt`` path, a list of symbols, or None for the released
    molecule dictionary. ``pretraining_heads`` adds ``lm_head``, ``pair2coord_proj`` and
    ``dist_head`` (present in the released pretrained checkpoints). ``pooling="mean"``
    averages the atom representations instead of reading [CLS] (often better from scratch
    on small data). ``pretrained`` (a registered name or ``.pt`` path) loads released weights
    into the model built from these arguments.
    """

    def __init__(
        self,
        dictionary: str | list[str] | None = None,
        encoder_layers: int = 15,
        embed_dim: int = 512,
        ffn_embed_dim: int = 2048,
        attention_heads: int = 64,
        num_kernels: int = 128,
        dropout: float = 0.1,
        emb_dropout: float = 0.1,
        attention_dropout: float = 0.1,
        activation_dropout: float = 0.0,
        activation_fn: str = "gelu",
        pretraining_heads: bool = True,
        final_head_layer_norm: bool = True,
        pooling: str = "cls",
        pretrained: str | None = None,
    ) -> None:
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        self.pooling = pooling
        self.dictionary: UniMolDictionary
        if isinstance(dictionary, UniMolDictionary):
            self.dictionary = dictionary
        elif dictionary is None:
            self.dictionary = UniMolDictionary.official()
        elif isinstance(dictionary, str | os.PathLike):
            self.dictionary = UniMolDictionary.load(dictionary)
        else:
            self.dictionary = UniMolDictionary(list(dictionary))
        self.feature_dim = embed_dim
        self.attention_heads = attention_heads
        # whether the loaded released weights were trained with hydrogens (mol_pre_all_h) or without
        # (mol_pre_no_h); None when unknown. The data modules refuse the other setting of remove_hs.
        self.hydrogens: bool | None = None
        self.padding_idx = self.dictionary.pad
        vocab = len(self.dictionary)
        self.embed_tokens = nn.Embedding(vocab, embed_dim, self.padding_idx)
        self.encoder = TransformerEncoderWithPair(
            encoder_layers,
            embed_dim,
            ffn_embed_dim,
            attention_heads,
            emb_dropout,
            dropout,
            attention_dropout,
            activation_dropout,
            activation_fn,
            final_head_layer_norm,
        )
        self.gbf_proj = NonLinearHead(num_kernels, attention_heads, activation_fn)
        self.gbf = GaussianLayer(num_kernels, vocab * vocab)
        self.lm_head: MaskLMHead | None = None
        self.pair2coord_proj: NonLinearHead | None = None
        self.dist_head: DistanceHead | None = None
        if pretraining_heads:
            self.lm_head = MaskLMHead(embed_dim, vocab, activation_fn)
            self.pair2coord_proj = NonLinearHead(attention_heads, 1, activation_fn)
            self.dist_head = DistanceHead(attention_heads, activation_fn)
        self.apply(_init_bert)
        self.gbf.reset_parameters()
        # what a checkpoint must agree on with this model (the .pt files do not record it)
        self.architecture: dict[str, Any] = {
            "encoder_layers": encoder_layers, "embed_dim": embed_dim, "ffn_embed_dim": ffn_embed_dim,
            "attention_heads": attention_heads, "num_kernels": num_kernels, "activation_fn": activation_fn,
        }  # fmt: skip
        if pretrained:  # so a YAML recipe can start from a released checkpoint
            self.load_pretrained(pretrained)

    def load_pretrained(self, name_or_path: str) -> UniMol:
        """Load a registered checkpoint (``unimol-mol-no-h``) or a ``.pt`` file / folder into this
        model. Pretraining heads and ``final_head_layer_norm`` this model does not build are left out."""
        from polyfm.core.weights import get_weights
        from polyfm.mol.weights import check_architecture, encoder_state_from_lightning

        if str(name_or_path).endswith(".ckpt"):  # ours: a pretraining or fine-tuning run of this architecture
            loaded = encoder_state_from_lightning(name_or_path)
        else:
            if not Path(name_or_path).expanduser().exists():  # a local .pt records no architecture; its keys are checked below
                check_architecture(name_or_path, "Uni-Mol", dict(get_weights(name_or_path).config), self.architecture)
            source = type(self).from_pretrained(name_or_path, **self.architecture)
            if source.dictionary.symbols != self.dictionary.symbols:
                raise CheckpointError(
                    f"{name_or_path} comes with another atom dictionary ({len(source.dictionary)} symbols) than this model's "
                    f"({len(self.dictionary)}); pass its dict.txt as dictionary=..."
                )
            loaded = source.state_dict()
            self.hydrogens = source.hydrogens
        own = self.state_dict()
        heads = ("lm_head.", "pair2coord_proj.", "dist_head.", "encoder.final_head_layer_norm.")
        state = {k: v for k, v in loaded.items() if k in own or not k.startswith(heads)}
        load_state_dict_checked(self, state, strict=True, source=str(name_or_path))
        return self

    def block_names(self) -> list[str]:
        stem = ["embed_tokens", "gbf", "gbf_proj", "encoder.emb_layer_norm"]
        return [
            *stem,
            *(f"encoder.layers.{i}" for i in range(len(self.encoder.layers))),
            "encoder.final_layer_norm",
            "encoder.final_head_layer_norm",
            "lm_head",
            "pair2coord_proj",
            "dist_head",
        ]

    def pair_bias(self, src_distance: torch.Tensor, src_edge_type: torch.Tensor) -> torch.Tensor:
        """Initial per-head attention bias ``(B*H, N, N)`` from distances and pair types."""
        n = src_distance.size(-1)
        bias: torch.Tensor = self.gbf_proj(self.gbf(src_distance, src_edge_type))
        return bias.permute(0, 3, 1, 2).contiguous().view(-1, n, n)

    def forward(
        self,
        src_tokens: torch.Tensor,
        src_distance: torch.Tensor,
        src_coord: torch.Tensor,
        src_edge_type: torch.Tensor,
        masked_tokens: torch.Tensor | None = None,
        features_only: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Encoder outputs; with ``features_only=False`` also the pretraining predictions:
        ``logits`` (atom types at ``masked_tokens``), ``coord`` (denoised coordinates) and
        ``distance`` (normalised pair distances)."""
        padding_mask: torch.Tensor | None = src_tokens.eq(self.padding_idx)
        if padding_mask is not None and not padding_mask.any():
            padding_mask = None
        x = self.embed_tokens(src_tokens)
        out = self.encoder(x, self.pair_bias(src_distance, src_edge_type), padding_mask)
        pair = out["pair"].masked_fill(out["pair"] == float("-inf"), 0.0)
        result = {"encoder_rep": out["x"], "pair_rep": pair, "x_norm": out["x_norm"], "delta_pair_norm": out["delta_pair_norm"]}
        if features_only:
            return result
        if self.lm_head is None or self.pair2coord_proj is None or self.dist_head is None:
            raise RuntimeError(
                "This UniMol was built with pretraining_heads=False; build it with pretraining_heads=True to pretrain."
            )
        features = out["x"] if masked_tokens is None else out["x"][masked_tokens]
        result["logits"] = self.lm_head(features)
        # the official code since its padding fix (deepmodeling/Uni-Mol #211): [CLS] and [SEP]
        # count as atoms, and padded positions (at the origin) take no part in the update
        delta_pos = src_coord.unsqueeze(1) - src_coord.unsqueeze(2)
        coord_update = self.pair2coord_proj(out["delta_pair"]) * delta_pos
        if padding_mask is not None:
            real = 1 - padding_mask.type_as(x)
            coord_update = coord_update * (real.unsqueeze(-1) * real.unsqueeze(1)).unsqueeze(-1)
            coord_update = coord_update / real.sum(dim=1).view(-1, 1, 1, 1)
        else:
            coord_update = coord_update / src_coord.shape[1]
        result["coord"] = src_coord + coord_update.sum(dim=2)
        result["distance"] = self.dist_head(pair)
        return result

    def forward_features(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """[CLS] representation (``pooling="cls"``, unimol_tools' ``cls_repr``), or the mean over atoms."""
        tokens = x["src_tokens"]
        rep = self.forward(tokens, x["src_distance"], x["src_coord"], x["src_edge_type"])["encoder_rep"]
        if self.pooling == "cls":
            return rep[:, 0, :]
        d = self.dictionary
        atoms = (~torch.isin(tokens, torch.tensor([d.pad, d.bos, d.eos], device=tokens.device))).unsqueeze(-1).to(rep.dtype)
        return (rep * atoms).sum(1) / atoms.sum(1).clamp(min=1.0)

    # -- checkpoints ------------------------------------------------------------------

    @classmethod
    def _from_checkpoint(cls, path: Path, spec: WeightSpec | None, **config: Any) -> UniMol:
        """Load an official checkpoint (``{'model': state_dict}``). ``path`` is the .pt
        file, or a folder holding it and its ``dict.txt`` (or ``mol.dict.txt``)."""
        folder = path if path.is_dir() else path.parent
        if path.is_dir():
            candidates = sorted(p for p in path.iterdir() if p.suffix in (".pt", ".pth", ".safetensors"))
            if len(candidates) != 1:
                raise CheckpointError(
                    f"{path} should hold exactly one checkpoint (.pt/.safetensors), found {[p.name for p in candidates]}."
                )
            path = candidates[0]
        if config.get("dictionary") is None:
            for name in ("dict.txt", "mol.dict.txt"):
                if (folder / name).exists():
                    config["dictionary"] = str(folder / name)
                    break
        state = unwrap_state_dict(load_checkpoint_file(path), keys=("model", "model_state_dict", "state_dict"))
        config.setdefault("pretraining_heads", any(k.startswith("lm_head.") for k in state))
        config.setdefault("final_head_layer_norm", "encoder.final_head_layer_norm.weight" in state)
        model = cls(**config)
        expected_vocab = len(model.dictionary)
        if "embed_tokens.weight" in state and state["embed_tokens.weight"].shape[0] != expected_vocab:
            raise CheckpointError(
                f"{path} has {state['embed_tokens.weight'].shape[0]} atom types but the dictionary has {expected_vocab} "
                "(with [MASK]); pass the dict.txt released with this checkpoint as dictionary=..."
            )
        # fine-tuned checkpoints carry task heads we do not build: the official code's
        # classification_heads.<name>.*, unimol_tools' classification_head.* ({'model_state_dict': ...})
        ignored = ("classification_heads.", "classification_head.")
        load_state_dict_checked(model, state, strict=True, ignore_unexpected=ignored, source=str(path))
        model.hydrogens = trained_with_hydrogens(path, spec)
        return model

    def official_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict in the official layout (it is ours): save as ``{'model': ...}``."""
        return {k: v.detach().clone() for k, v in self.state_dict().items()}


def trained_with_hydrogens(path: Path, spec: WeightSpec | None) -> bool | None:
    """From the registry's ``hydrogens`` meta, else the official file names (``mol_pre_all_h_*``,
    ``mol_pre_no_h_*``, ``oled_pre_no_h_*``); None when neither tells."""
    told = str((spec.meta if spec is not None else {}).get("hydrogens", ""))
    if told.startswith(("all", "none")):
        return told.startswith("all")
    name = path.name.lower()
    if "_all_h" in name:
        return True
    if "_no_h" in name:
        return False
    return None


def edge_types(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Pair type ``i * len(dict) + j`` for every pair of tokens (``(B, N)`` -> ``(B, N, N)``)."""
    return tokens.unsqueeze(-1) * vocab_size + tokens.unsqueeze(-2)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_molecule(model: UniMol, atoms: int) -> float:
    """Rough forward FLOPs of the trunk for a molecule of ``atoms`` tokens (for MFU)."""
    n, d = atoms + 2, model.feature_dim
    layers = len(model.encoder.layers)
    first = model.encoder.layers[0] if layers else None
    ffn = first.fc1.out_features if isinstance(first, TransformerEncoderLayer) else 0
    per_layer = 2 * n * (4 * d * d + 2 * d * ffn) + 4 * n * n * d
    return float(layers * per_layer + 2 * n * n * model.gbf.num_kernels * (model.gbf.num_kernels + model.attention_heads))


__all__ = ["OFFICIAL_MOL_SYMBOLS", "UniMol", "UniMolDictionary", "edge_types", "count_parameters", "flops_per_molecule"]
