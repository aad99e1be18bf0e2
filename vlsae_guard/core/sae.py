"""The sparse-autoencoder math: the VL-SAE, the paper's two ablations and the auxiliary AE.

Nothing here knows about LLaVA or any serving stack; backends import this module, never the
reverse.

Conventions
-----------
* Decoder directions are stored as rows: ``decoder.weight`` has shape ``(n_concepts, d)``, so
  decoding ``k`` active concepts gathers ``k`` contiguous rows (``embedding_bag``) instead of a
  dense ``n_concepts x d`` product. Mathematically it is ``Linear(n_concepts -> d, bias=True)``
  with the weight transposed; :mod:`vlsae_guard.core.checkpoint` converts the official layout.
* TopK keeps exactly ``k`` concepts per row. The reference code keeps the entries strictly above
  the ``(n - k)``-th smallest value, which drops *all* members of a tie at the boundary; ours
  keeps ``k`` of them (``torch.topk`` picks which). Outside exact ties the two agree; in float16
  ties are common (a random 32768-concept SAE keeps 224-252 of 256), so ``encode_topk(...,
  ties="official")`` reproduces the reference: its activations, its threshold.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import reference
from .sae_config import MODALITIES, AuxConfig, Modality, SAEConfig

TopKTies = Literal["keep-k", "official"]
TOPK_TIES: tuple[TopKTies, ...] = ("keep-k", "official")


class Codes(NamedTuple):
    """Top-k concept activations in compact form: ``values`` and ``indices`` of shape (..., k)."""

    values: Tensor
    indices: Tensor
    n_concepts: int

    def dense(self) -> Tensor:
        """Scatter into a dense (..., n_concepts) tensor with zeros elsewhere."""
        shape = (*self.values.shape[:-1], self.n_concepts)
        out = self.values.new_zeros(shape)
        return out.scatter_(-1, self.indices, self.values)


class TrainOutput(NamedTuple):
    """One modality's training forward: reconstruction, codes, and the auxiliary-k term.

    ``aux_recon`` decodes the top ``k_aux`` *dead* concepts without the bias; the caller fits it
    to the residual ``x - recon`` so that gradient reaches concepts TopK never selects
    (Gao et al., 2024, "Scaling and evaluating sparse autoencoders").
    """

    recon: Tensor
    codes: Codes
    aux_recon: Tensor | None


class Decoder(nn.Module):
    """``z @ weight + bias`` with concept directions as rows, plus a sparse path for top-k codes."""

    def __init__(self, n_concepts: int, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_concepts, d))
        self.bias = nn.Parameter(torch.zeros(d))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    def forward(self, z: Tensor) -> Tensor:
        # Explicit output width: reshape(..., -1) cannot infer it for an empty batch.
        out = torch.addmm(self.bias, z.reshape(-1, z.shape[-1]), self.weight)
        return out.reshape(*z.shape[:-1], self.weight.shape[-1])

    def sparse(self, codes: Codes, bias: bool = True) -> Tensor:
        """Decode top-k codes by gathering k rows; ``bias=False`` returns the pure concept sum."""
        k = codes.indices.shape[-1]
        idx = codes.indices.reshape(-1, k)
        vals = codes.values.reshape(-1, k).to(self.weight.dtype)
        if idx.device.type == "cpu" and not torch.is_grad_enabled():
            out = _gather_nonzero(idx, vals, self.weight)
        else:
            out = F.embedding_bag(idx, self.weight, per_sample_weights=vals, mode="sum")
        if bias:
            out = out + self.bias
        return out.reshape(*codes.indices.shape[:-1], self.weight.shape[-1])


def _gather_nonzero(idx: Tensor, vals: Tensor, weight: Tensor) -> Tensor:
    """``embedding_bag`` over the non-zero slots only: the same sum, bit for bit.

    The guard zeroes the slots of the concepts it drops, and on a CPU the gather is bound by
    memory (LLaVA-7B: 576 x 256 rows of 16 KB per image), so reading only the rows that add
    something saves what the mask drops (benchmarks/perf_guard.py; adding ``0 * row`` never
    changes a float sum). Not on accelerators: the data-dependent length costs a host sync.
    """
    keep = vals != 0
    if bool(keep.all()):
        return F.embedding_bag(idx, weight, per_sample_weights=vals, mode="sum")
    counts = keep.sum(-1)
    offsets = counts.cumsum(0) - counts
    return F.embedding_bag(idx[keep], weight, offsets, per_sample_weights=vals[keep], mode="sum")


class SparseAutoencoder(nn.Module):
    """Shared API of all architectures: encode / decode per modality, save and load."""

    config: SAEConfig
    # The modalities an architecture reads; vision-encoder SAEs read one.
    modalities: tuple[Modality, ...] = MODALITIES

    def __init__(self, config: SAEConfig):
        super().__init__()
        self.config = config
        self.aux: AuxiliaryAE | None = AuxiliaryAE(config.aux) if config.aux else None

    def check_modality(self, modality: str) -> None:
        """Refuse a modality this architecture has no encoder or decoder for."""
        _check_modality(modality)
        if modality not in self.modalities:
            raise ValueError(
                f"architecture {self.config.architecture!r} reads {' and '.join(self.modalities)}"
                f" only, not {modality}"
            )

    @property
    def k(self) -> int:
        return self.config.k

    @property
    def n_concepts(self) -> int:
        return self.config.n_concepts

    def _scores(self, x: Tensor, modality: Modality) -> Tensor:
        """Scores whose top-k positions are the active concepts (monotone in the activation)."""
        raise NotImplementedError

    def _activation(self, top_scores: Tensor) -> Tensor:
        """Map selected scores to activations; identity unless the score is a proxy."""
        return top_scores

    def decoder_for(self, modality: Modality) -> Decoder:
        raise NotImplementedError

    def _reference_activations(self, x: Tensor, modality: Modality) -> Tensor:
        """All ``n_concepts`` activations, computed as the reference code computes them."""
        return self._activation(self._scores(x, modality))

    def encode_topk(
        self, x: Tensor, modality: Modality = "vision", ties: TopKTies = "keep-k"
    ) -> Codes:
        """Top-k activations of ``x`` (any leading shape, last dim ``d_in``) in compact form.

        ``ties="official"``: the reference code's TopK, which keeps the activations whose
        magnitude is strictly above the ``(n - k)``-th smallest; a tie at that value drops all
        its members, whose slots here hold 0 (fewer than k active concepts).
        """
        self.check_modality(modality)
        if ties not in TOPK_TIES:
            raise ValueError(f"ties must be one of {TOPK_TIES}, got {ties!r}")
        if x.shape[-1] != self.config.d_in:
            raise ValueError(f"expected inputs with last dim {self.config.d_in}, got {x.shape}")
        x = x.to(self.dtype)
        if ties == "official":
            return self._reference_topk(x, modality)
        return self._select(self._scores(x, modality))

    def _select(self, scores: Tensor) -> Codes:
        """The active concepts of each row from its scores: the k largest."""
        top, idx = scores.topk(self.k, dim=-1, sorted=False)
        return Codes(self._activation(top), idx, self.n_concepts)

    def _reference_topk(self, x: Tensor, modality: Modality) -> Codes:
        acts = self._reference_activations(x, modality)
        if self.k < self.n_concepts:  # with k = n it keeps everything (and has no threshold)
            acts = reference.sparsify(acts, self.k)
        # Every kept entry is among the k largest magnitudes; a dropped tie fills its slot with 0.
        idx = acts.abs().topk(self.k, dim=-1, sorted=False).indices
        return Codes(acts.gather(-1, idx), idx, self.n_concepts)

    def encode(self, x: Tensor, modality: Modality = "vision", ties: TopKTies = "keep-k") -> Tensor:
        """Dense activations (..., n_concepts) with the top-k kept and zeros elsewhere."""
        return self.encode_topk(x, modality, ties).dense()

    def decode(self, z: Tensor | Codes, modality: Modality = "vision") -> Tensor:
        """Reconstruct from dense activations or from :class:`Codes` (the fast sparse path)."""
        self.check_modality(modality)
        decoder = self.decoder_for(modality)
        width = z.n_concepts if isinstance(z, Codes) else z.shape[-1]
        if width != self.n_concepts:
            raise ValueError(f"expected codes over {self.n_concepts} concepts, got {width}")
        if isinstance(z, Codes):
            return decoder.sparse(z)
        return decoder(z.to(self.dtype))

    def forward(self, x: Tensor, modality: Modality = "vision") -> Tensor:
        return self.decode(self.encode_topk(x, modality), modality)

    def forward_train(
        self,
        x: Tensor,
        modality: Modality = "vision",
        dead: Tensor | None = None,
        k_aux: int = 0,
    ) -> TrainOutput:
        """Encode and decode with gradients; one score matmul serves TopK and auxiliary-k.

        ``dead`` is a bool mask over concepts; with ``k_aux > 0`` the top ``k_aux`` dead
        concepts of each row are decoded (no bias) into ``aux_recon``.
        """
        self.check_modality(modality)
        decoder = self.decoder_for(modality)
        scores = self._scores(x.to(self.dtype), modality)
        codes = self._train_select(scores)
        aux_recon = None
        n_dead = 0 if dead is None else int(dead.sum())
        if k_aux > 0 and n_dead > 0:
            masked = scores.masked_fill(~dead.to(scores.device), float("-inf"))
            top_a, idx_a = masked.topk(min(k_aux, n_dead), dim=-1, sorted=False)
            dead_codes = Codes(self._train_activation(top_a), idx_a, self.n_concepts)
            aux_recon = decoder.sparse(dead_codes, bias=False)
        return TrainOutput(decoder.sparse(codes), codes, aux_recon)

    def _train_select(self, scores: Tensor) -> Codes:
        """The active concepts while training (BatchTopK selects over the batch)."""
        top, idx = scores.topk(self.k, dim=-1, sorted=False)
        return Codes(self._train_activation(top), idx, self.n_concepts)

    def _train_activation(self, top_scores: Tensor) -> Tensor:
        """:meth:`_activation` with finite gradients everywhere (for training)."""
        return self._activation(top_scores)

    # Buffers count too: the vLLM plugin freezes the SAE's tensors into non-persistent buffers.
    @property
    def dtype(self) -> torch.dtype:
        return next(itertools.chain(self.parameters(), self.buffers())).dtype

    @property
    def device(self) -> torch.device:
        return next(itertools.chain(self.parameters(), self.buffers())).device

    # The public entry points of checkpoint.py's load and save (see PERSISTENCE).
    @classmethod
    def from_pretrained(cls, path_or_hub_id: str, **kwargs) -> SparseAutoencoder:
        sae = PERSISTENCE["load"](path_or_hub_id, **kwargs)
        if not isinstance(sae, cls):
            raise TypeError(
                f"{path_or_hub_id} holds a {type(sae).__name__} "
                f"(architecture {sae.config.architecture!r}), not a {cls.__name__}"
            )
        return sae

    def save_pretrained(self, directory) -> None:
        PERSISTENCE["save"](self, directory)

    def with_config(self, **updates) -> SparseAutoencoder:
        """Replace config fields (e.g. statistics after training), validated like a load."""
        self.config = SAEConfig.model_validate({**self.config.model_dump(), **updates})
        return self


class VLSAE(SparseAutoencoder):
    """The VL-SAE: distance-based encoder shared by both modalities, one decoder per modality.

    ``a_j = 2 - ||x/||x|| - w_j/||w_j||||_2 = 2 - sqrt(2 - 2 cos(x, w_j))`` is monotone in the
    cosine, so TopK runs on the cosine and only the k winners go through the square root.

    Nothing derived from the encoder is cached: a cache keyed on the parameter's version
    counter misses writes through ``.data`` (which has its own counter) and can be fooled by
    allocator address reuse. Dividing the scores by the row norms instead of normalising a
    copy of the ``n x d`` weight keeps the per-call overhead to one read of the weight.
    """

    def __init__(self, config: SAEConfig):
        super().__init__(config)
        n, d = config.n_concepts, config.d_in
        self.encoder = nn.Parameter(torch.empty(n, d))
        nn.init.kaiming_uniform_(self.encoder, a=5**0.5)
        self.vision_decoder = Decoder(n, d)
        self.text_decoder = Decoder(n, d)

    def unit_encoder(self) -> Tensor:
        """Row-normalised encoder: the concept directions the inputs are compared against."""
        return F.normalize(self.encoder, dim=-1)

    def _scores(self, x: Tensor, modality: Modality) -> Tensor:
        w = self.encoder
        # Same eps as F.normalize, so zero rows score 0 like in the reference.
        inv_norm = torch.linalg.vector_norm(w, dim=-1).clamp_min(1e-12).reciprocal()
        rows = F.normalize(x.reshape(-1, x.shape[-1]), dim=-1)
        # One GEMM into the output, scaled in place: no second rows x n_concepts tensor
        # (benchmarks/perf_sae.py: the scaling pass was 21 ms of 1017 with a copy, 2 without).
        scores = torch.mm(rows, w.t()).mul_(inv_norm)
        return scores.reshape(*x.shape[:-1], self.n_concepts)

    def _activation(self, top_scores: Tensor) -> Tensor:
        # Rounding can push |cos| slightly past 1; clamping keeps activations inside [0, 2].
        return 2 - torch.sqrt((2 - 2 * top_scores).clamp(0, 4))

    def _reference_activations(self, x: Tensor, modality: Modality) -> Tensor:
        # The reference's cdist of the unit vectors, its rounding included.
        acts = reference.activations(x.reshape(-1, x.shape[-1]), self.encoder)
        return acts.reshape(*x.shape[:-1], self.n_concepts)

    def _train_activation(self, top_scores: Tensor) -> Tensor:
        # d/dc sqrt(2 - 2c) is infinite at c = 1 (an input along a concept direction, e.g.
        # right after initialising the encoder from data): floor the root's argument at 1e-6.
        return 2 - torch.sqrt((2 - 2 * top_scores).clamp(1e-6, 4))

    def decoder_for(self, modality: Modality) -> Decoder:
        return self.vision_decoder if modality == "vision" else self.text_decoder


class SAEV(SparseAutoencoder):
    """Ablation SAE-V: one Linear+ReLU encoder and one decoder for both modalities."""

    def __init__(self, config: SAEConfig):
        super().__init__(config)
        self.encoder = nn.Linear(config.d_in, config.n_concepts)
        self.decoder = Decoder(config.n_concepts, config.d_in)

    def _scores(self, x: Tensor, modality: Modality) -> Tensor:
        return F.relu(self.encoder(x))

    def decoder_for(self, modality: Modality) -> Decoder:
        return self.decoder


class SAED(SparseAutoencoder):
    """Ablation SAE-D: one Linear+ReLU encoder and one decoder per modality."""

    def __init__(self, config: SAEConfig):
        super().__init__(config)
        n, d = config.n_concepts, config.d_in
        self.vision_encoder = nn.Linear(d, n)
        self.text_encoder = nn.Linear(d, n)
        self.vision_decoder = Decoder(n, d)
        self.text_decoder = Decoder(n, d)

    def _scores(self, x: Tensor, modality: Modality) -> Tensor:
        encoder = self.vision_encoder if modality == "vision" else self.text_encoder
        return F.relu(encoder(x))

    def decoder_for(self, modality: Modality) -> Decoder:
        return self.vision_decoder if modality == "vision" else self.text_decoder


class AuxiliaryAE(nn.Module):
    """The paper's alignment stage: projects each modality into a common width ``d_proj``."""

    def __init__(self, config: AuxConfig):
        super().__init__()
        self.config = config
        self.vision_projection = nn.Linear(config.d_vision, config.d_proj)
        self.text_projection = nn.Linear(config.d_text, config.d_proj)
        self.vision_decoder = nn.Linear(config.d_proj, config.d_vision)
        self.text_decoder = nn.Linear(config.d_proj, config.d_text)

    def project(self, x: Tensor, modality: Modality) -> Tensor:
        _check_modality(modality)
        layer = self.vision_projection if modality == "vision" else self.text_projection
        return layer(x.to(layer.weight.dtype))

    def reconstruct(self, e: Tensor, modality: Modality) -> Tensor:
        _check_modality(modality)
        layer = self.vision_decoder if modality == "vision" else self.text_decoder
        return layer(e.to(layer.weight.dtype))


class BatchTopKSAE(SparseAutoencoder):
    """BatchTopK SAE (Bussmann et al., 2024, "BatchTopK Sparse Autoencoders"), as the
    ``dictionary_learning`` package (saprmarks/dictionary_learning) defines it and Pach et al.
    (2025, ExplainableML/sae-for-vlm) train on CLIP's vision encoder.

    ``f = relu((x - b_dec) W_enc + b_enc)``; training keeps the ``k * batch`` largest entries of
    the whole batch, inference keeps those above ``threshold`` (a running mean of the smallest
    kept activation), so rows have varying numbers of active concepts; ``x_hat = f W_dec + b_dec``.
    ``decoder.bias`` is ``b_dec``. A negative threshold (never learned) keeps every positive
    entry, as there. One modality: it reads what it was trained on, nothing shared with text.
    """

    modalities = ("vision",)

    def __init__(self, config: SAEConfig):
        super().__init__(config)
        self.encoder = nn.Linear(config.d_in, config.n_concepts)
        self.decoder = Decoder(config.n_concepts, config.d_in)
        self.register_buffer("threshold", torch.tensor(-1.0))

    def _scores(self, x: Tensor, modality: Modality) -> Tensor:
        return F.relu(self.encoder(x - self.decoder.bias))

    def _select(self, scores: Tensor) -> Codes:
        """The entries above the threshold."""
        return self._select_nonzero(scores * (scores > self.threshold))

    def _reference_topk(self, x: Tensor, modality: Modality) -> Codes:
        return self._select(self._scores(x, modality))  # the threshold rule has no ties

    def _train_select(self, scores: Tensor) -> Codes:
        """BatchTopK: the ``k * rows`` largest entries of the batch, wherever they fall."""
        flat = scores.reshape(-1)
        rows = flat.numel() // self.n_concepts
        top, idx = flat.topk(min(self.k * rows, flat.numel()), sorted=False)
        kept = torch.zeros_like(flat).scatter(0, idx, top).reshape(scores.shape)
        return self._select_nonzero(kept)

    def _select_nonzero(self, kept: Tensor) -> Codes:
        """The non-zero entries, in as many slots as the busiest row needs (the other rows'
        spare slots hold 0); one host sync for that width."""
        width = max(1, int((kept > 0).sum(-1).max())) if kept.numel() else 1
        top, idx = kept.topk(width, dim=-1, sorted=False)
        return Codes(top, idx, self.n_concepts)

    @staticmethod
    def smallest_kept(codes: Codes) -> Tensor:
        """The smallest positive activation of ``codes`` (inf if none), detached."""
        values = codes.values.detach().float()
        return torch.where(values > 0, values, torch.inf).min()

    @torch.no_grad()
    def update_threshold(self, low: Tensor, beta: float) -> None:
        """``threshold <- beta threshold + (1 - beta) low``, the first update setting it:
        dictionary_learning's rule, ``low`` being the smallest activation a training step's
        BatchTopK kept (:meth:`smallest_kept`; inf, none kept, counts as 0 as there)."""
        low = torch.as_tensor(low, dtype=torch.float32).to(self.threshold)
        low = torch.where(torch.isfinite(low), low, torch.zeros_like(low))
        self.threshold.copy_(
            low if self.threshold < 0 else beta * self.threshold + (1 - beta) * low
        )

    def decoder_for(self, modality: Modality) -> Decoder:
        return self.decoder


class MatryoshkaSAE(BatchTopKSAE):
    """Matryoshka BatchTopK SAE (Bussmann et al., 2025, "Learning Multi-Level Features with
    Matryoshka Sparse Autoencoders"; dictionary_learning's ``MatryoshkaBatchTopKSAE``).

    The encoder and decoder are BatchTopK's; the concepts come in nested ``config.groups``, and
    training fits every prefix of groups on its own (:meth:`prefix_reconstructions`), so the
    first groups hold the general concepts and later ones refine them.
    """

    def group_of(self) -> Tensor:
        """Each concept's group index (0 = the first, most general level)."""
        sizes = torch.tensor(self.config.groups)
        return torch.repeat_interleave(torch.arange(len(sizes)), sizes)

    def prefix_reconstructions(self, codes: Codes) -> list[Tensor]:
        """``b_dec + sum of the active concepts in groups 0..g``, for each group g."""
        ends = torch.tensor(self.config.groups, device=codes.indices.device).cumsum(0)
        return [
            self.decoder.sparse(
                Codes(codes.values * (codes.indices < end), codes.indices, codes.n_concepts)
            )
            for end in ends.tolist()
        ]


ARCHITECTURES: dict[str, type[SparseAutoencoder]] = {
    "vl-sae": VLSAE,
    "sae-v": SAEV,
    "sae-d": SAED,
    "batchtopk": BatchTopKSAE,
    "matryoshka": MatryoshkaSAE,
}


def build(config: SAEConfig) -> SparseAutoencoder:
    """Instantiate the architecture a config names (random initialisation)."""
    return ARCHITECTURES[config.architecture](config)


# Checkpoint files are checkpoint.py's business, and it imports this module to build what it
# reads. So that the dependency runs one way (the math knows no file format), checkpoint.py puts
# its ``load`` and ``save`` here when it is imported; ``import vlsae_guard`` imports it, and so
# does any import of this module, which runs the package's __init__ first.
PERSISTENCE: dict[str, Callable[..., Any]] = {}


def _check_modality(modality: str) -> None:
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
