"""Frozen configuration dataclasses, one per stage.

Each field has a comment; ``__post_init__`` validates. Configs become plain dicts only at the Ray
boundary (``asdict`` / ``from_dict``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is out of its allowed range."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def from_dict(cls: type[T], d: dict[str, Any]) -> T:
    """Build a config from a dict, refusing unknown keys with a clear error."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(d) - names)
    _check(not unknown, f"{cls.__name__}: unknown field(s) {unknown}; known: {sorted(names)}")
    return cls(**d)


def asdict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "routerbench"  # loader name: routerbench, llmrouter, routellm, embedllm, mixinstruct, generic
    data_dir: str | None = None  # folder with the source files; None: the loader's Hub download
    val_fraction: float = 0.1  # fraction of train prompts carved out as validation
    probe_size: int = 192  # prompts carved out of train as the held-out probe set (never trained on)
    seed: int = 0  # seed of the val / probe carve-out
    cost: Literal["usd", "params"] = "usd"  # cost unit where a source offers both
    missing: Literal["mask", "drop"] = "mask"  # what to do with rows that miss a quality cell

    def __post_init__(self) -> None:
        _check(0.0 <= self.val_fraction < 0.5, f"val_fraction must be in [0, 0.5), got {self.val_fraction}")
        _check(self.probe_size >= 0, f"probe_size must be >= 0, got {self.probe_size}")
        _check(self.cost in ("usd", "params"), f"cost must be 'usd' or 'params', got {self.cost!r}")
        _check(self.missing in ("mask", "drop"), f"missing must be 'mask' or 'drop', got {self.missing!r}")


#: EncoderConfig.backend values (cscr.encoder_onnx: the two ONNX Runtime ones)
ENCODER_BACKENDS = ("torch", "onnx", "onnx-int8")


@dataclass(frozen=True)
class EncoderConfig:
    model: str | None = None  # sentence-transformers path or Hub id; None: the packaged all-MiniLM-L6-v2
    batch_size: int = 64  # prompts per encoder forward
    device: str = "cpu"  # torch device (onnx backends: cpu, or cuda with onnxruntime-gpu installed)
    max_seq_length: int = 256  # tokens the encoder sees per window (its special tokens included)
    # prompts longer than the window (cscr.encoder.LONG_PROMPT_MODES): head (first window only),
    # tail (last window), head+tail (mean of both), windows (mean over up to max_windows windows)
    long_prompt: str = "windows"  # chosen on RouterBench validation (issue 10)
    max_windows: int = 8  # windows mode: at most this many windows (evenly spaced, first and last kept)
    # what runs the forward pass (ENCODER_BACKENDS; cscr.encoder_onnx): torch, or ONNX Runtime on
    # a local export of the same weights (onnx: float32, onnx-int8: dynamically quantised int8)
    backend: str = "torch"

    def __post_init__(self) -> None:
        _check(self.backend in ENCODER_BACKENDS,
               f"encoder backend must be one of {ENCODER_BACKENDS}, got {self.backend!r}")
        _check(self.batch_size > 0, f"batch_size must be > 0, got {self.batch_size}")
        _check(self.max_seq_length > 0, f"max_seq_length must be > 0, got {self.max_seq_length}")
        modes = ("head", "tail", "head+tail", "windows")
        _check(self.long_prompt in modes, f"long_prompt must be one of {modes}, got {self.long_prompt!r}")
        _check(self.max_windows >= 2, f"max_windows must be >= 2, got {self.max_windows}")


@dataclass(frozen=True)
class FingerprintConfig:
    """How expert descriptors are computed (jobs/fingerprint.py; SPEC.md section 2)."""

    kind: Literal["auto", "logit", "perplexity"] = "auto"  # auto: logit for open weights, else perplexity
    n_probes: int = 192  # N: probe prompts
    steps: int = 10  # T: greedy steps per probe (logit footprint)
    basis_size: int = 256  # K: shared token-string basis size (logit)
    scorer: str | None = None  # scorer LM for perplexity fingerprints; None: packaged SmolLM2
    scorer_context: Literal["none", "prompt"] = "none"  # score answers alone (SPEC) or after their prompt
    max_new_tokens: int = 64  # answer length of live perplexity experts
    max_answer_tokens: int = 128  # answer tokens scored
    max_prompt_tokens: int = 256  # prompt tokens kept (the end of the prompt)
    backend: Literal["transformers", "vllm"] | None = None  # None: each expert's own backend

    def __post_init__(self) -> None:
        _check(self.kind in ("auto", "logit", "perplexity"), f"unknown fingerprint kind {self.kind!r}")
        _check(self.n_probes > 1, f"n_probes must be > 1, got {self.n_probes}")
        _check(self.steps > 0, f"steps must be > 0, got {self.steps}")
        _check(self.basis_size > 1, f"basis_size must be > 1, got {self.basis_size}")
        _check(self.scorer_context in ("none", "prompt"), f"unknown scorer context {self.scorer_context!r}")
        _check(min(self.max_new_tokens, self.max_answer_tokens, self.max_prompt_tokens) > 0,
               "max_new_tokens, max_answer_tokens and max_prompt_tokens must be > 0")
        _check(self.backend in (None, "transformers", "vllm"), f"unknown backend {self.backend!r}")


@dataclass(frozen=True)
class HeadConfig:
    in_dim: int = 384  # prompt-embedding width (MiniLM: 384)
    hidden: int = 384  # hidden width (ablation: 4x)
    out_dim: int = 192  # D': descriptor width; set from the descriptors at train time
    activation: Literal["gelu", "relu"] = "gelu"  # hidden activation
    dropout: float = 0.0  # dropout after the hidden layer
    # what the router scores (beyond the write-up for "quality"): similarity q.d_m (SPEC 5), or
    # quality = sigmoid(a q.d_m + b(d_m)), P(good) with a shared slope and a descriptor-computed bias
    utility: Literal["similarity", "quality"] = "similarity"
    members: int = 1  # an ensemble of this many MLPs, trained together from their own inits; logits averaged
    # quality heads: the quality map reads a learned linear map P of the unit query, a * (P q).d_m + b(d_m)
    # (beyond the write-up; P starts as the identity; the InfoNCE keeps the unit query q)
    query_map: bool = False
    # logits of the prompt's category read from the unit query (beyond the write-up): an auxiliary
    # classifier trained when loss.category_weight > 0, never read by routing; set at train time
    # to the number of train categories (0: none)
    categories: int = 0

    def __post_init__(self) -> None:
        _check(min(self.in_dim, self.hidden, self.out_dim) > 0, "head widths must be > 0")
        _check(self.categories >= 0, f"categories must be >= 0, got {self.categories}")
        _check(self.members >= 1, f"members must be >= 1, got {self.members}")
        _check(self.utility in ("similarity", "quality"),
               f"utility must be 'similarity' or 'quality', got {self.utility!r}")
        _check(self.activation in ("gelu", "relu"), f"activation must be gelu or relu, got {self.activation!r}")
        _check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class LossConfig:
    bands: int = 5  # B: cost percentile bands (1 = vanilla)
    tau_min: float = 0.05  # base temperature
    alpha: float = 0.25  # temperature slope in band mean cost
    gamma: float = 0.2  # negative cost penalty (denominator only)
    tolerance: float = 0.0  # positives: quality >= best - tolerance (graded data)
    # weight of the quality BCE added to the InfoNCE (beyond the write-up; 0: similarity utilities, SPEC 5);
    # > 0 makes the head a quality head (TrainConfig sets head.utility from it). 1000 (with lr 3e-3 and 80
    # epochs): chosen by nested 5-fold CV on train + val of RouterBench, LLMRouter and RouteLLM and the
    # unseen-experts CV (docs/routing-quality.md); at this weight the BCE dominates the InfoNCE (64 scored
    # within fold noise of it). A record without the field means 0 (TrainConfig.from_nested)
    bce_weight: float = 1000.0
    # the quality BCE's target on a train cell: (1 - s) * its own quality + s * the mean quality of that
    # expert over the prompt's category in the train split (all train prompts when the table has none);
    # beyond the write-up. 0: the cell's own quality
    category_smoothing: float = 0.75
    # weight of an auxiliary cross-entropy: the unit query predicts the prompt's category (the head's
    # ``category_map``; beyond the write-up). Routing never reads it; 0: none. A table without
    # categories (one group) adds nothing
    category_weight: float = 0.0
    # weight of the routing regret (cscr/losses.py ``routing_regret``; beyond the write-up): minus what
    # a softened choice by the quality map earns over a spectrum of cost knobs, at ``regret_temperature``
    # (quality units). Needs the quality map (bce_weight > 0); 0: none (the default: no weight was up on
    # all three data sets under nested CV; docs/routing-quality.md, the row "routing regret")
    regret_weight: float = 0.0
    regret_temperature: float = 0.05
    # what the regret scores a choice by: each cell's recorded quality, or the BCE's targets (shrunk
    # towards the category means by ``category_smoothing``)
    regret_on: Literal["recorded", "targets"] = "recorded"

    def __post_init__(self) -> None:
        _check(self.bce_weight >= 0, f"bce_weight must be >= 0, got {self.bce_weight}")
        _check(self.category_weight >= 0, f"category_weight must be >= 0, got {self.category_weight}")
        _check(self.regret_weight >= 0, f"regret_weight must be >= 0, got {self.regret_weight}")
        _check(self.regret_temperature > 0, f"regret_temperature must be > 0, got {self.regret_temperature}")
        _check(self.regret_on in ("recorded", "targets"),
               f"regret_on must be 'recorded' or 'targets', got {self.regret_on!r}")
        _check(self.regret_weight == 0 or self.bce_weight > 0,
               "regret_weight > 0 needs the quality map (bce_weight > 0)")
        _check(0 <= self.category_smoothing <= 1,
               f"category_smoothing must be in [0, 1], got {self.category_smoothing}")
        _check(self.bands >= 1, f"bands must be >= 1, got {self.bands}")
        _check(self.tau_min >= 0 and self.alpha >= 0, "tau_min and alpha must be >= 0")
        _check(self.tau_min + self.alpha > 0, "tau_min + alpha must be > 0 (temperature would be 0)")
        _check(self.gamma >= 0, f"gamma must be >= 0, got {self.gamma}")
        _check(0 <= self.tolerance <= 1, f"tolerance must be in [0, 1], got {self.tolerance}")


@dataclass(frozen=True)
class IndexConfig:
    top_k: int = 0  # k: experts retrieved before the cost penalty; 0: every expert (k = M, SPEC 5; k < M: ablation)
    use_gpu: bool | None = None  # None: the GPU index when faiss-gpu and CUDA are present

    def __post_init__(self) -> None:
        _check(self.top_k >= 0, f"top_k must be >= 1 (or 0: every expert), got {self.top_k}")


@dataclass(frozen=True)
class TrainConfig:
    # batch size, the head's dropout and query map and the loss's category smoothing: chosen by 5-fold
    # cross-validation on train + val of RouterBench and LLMRouter; epochs and lr (with loss.bce_weight) by
    # nested 5-fold CV on all three data sets (docs/routing-quality.md); SPEC: lr 5e-4, batch 512, 10 epochs
    epochs: int = 80  # passes over the train prompts (the best epoch on validation is kept)
    batch_size: int = 128  # prompts per step
    lr: float = 3e-3  # AdamW learning rate
    weight_decay: float = 0.01  # AdamW weight decay
    seed: int = 0  # torch / numpy seed
    # head.utility follows loss.bce_weight (__post_init__)
    head: HeadConfig = field(default_factory=lambda: HeadConfig(dropout=0.1, query_map=True))
    loss: LossConfig = field(default_factory=LossConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    select_window: int = 1  # best epoch by the trailing mean of this many epochs' val AUDC (1: its own)
    # after training, fit the category prior (cscr/prior.py; beyond the write-up): the per-category
    # train quality table mixed in by the category read from the prompt, its weight chosen on the
    # validation split (0 where it does not help there); chosen by nested 5-fold CV (docs/routing-quality.md)
    category_prior: bool = True
    # experts that join after training (the unseen-experts experiment) calibrated on their probe outcomes
    # (cscr/newcomer.py; beyond the write-up), when pseudo-newcomers among the trained experts gain on average
    # (AUDC on the train and validation prompts, whose answers by them no draw's head read)
    newcomer_levels: bool = True
    # distinct pseudo-newcomer draws behind that choice (a head trained per draw): 6 chosen over 3 and 9 by
    # nested 5-fold CV on RouterBench and LLMRouter (docs/routing-quality.md)
    newcomer_draws: int = 6

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        _check(self.select_window >= 1, f"select_window must be >= 1, got {self.select_window}")
        _check(self.newcomer_draws >= 1, f"newcomer_draws must be >= 1, got {self.newcomer_draws}")
        # the quality map is trained by the BCE: a quality head exactly when bce_weight > 0
        utility: Literal["similarity", "quality"] = "quality" if self.loss.bce_weight > 0 else "similarity"
        if self.head.utility != utility:
            object.__setattr__(self, "head", dataclasses.replace(self.head, utility=utility))
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _check(self.lr > 0, f"lr must be > 0, got {self.lr}")

    @staticmethod
    def from_nested(d: dict[str, Any]) -> TrainConfig:
        """A TrainConfig from a nested dict (a record's ``asdict``): a missing field takes its
        dataclass field default, but a missing ``loss.bce_weight`` is 0 (similarity utilities: what a
        record written before the quality head meant), a missing ``loss.category_smoothing`` is 0, a missing
        ``category_prior`` false, and the
        head's missing fields are HeadConfig's (no dropout, no query map): what older records meant."""
        d = dict(d)
        head = from_dict(HeadConfig, d.pop("head", {}))  # a record without query_map: none (HeadConfig's default)
        loss_d = dict(d.pop("loss", {}))
        loss_d.setdefault("bce_weight", 0.0)  # a record written before the quality head: similarity utilities
        loss_d.setdefault("category_smoothing", 0.0)  # a record written before the smoothing: none
        d.setdefault("category_prior", False)  # a record written before the category prior: none
        loss = from_dict(LossConfig, loss_d)
        index = from_dict(IndexConfig, d.pop("index", {}))
        return from_dict(TrainConfig, {**d, "head": head, "loss": loss, "index": index})


@dataclass(frozen=True)
class EvalConfig:
    n_lambdas: int = 1000  # at most this many knob values per sweep (exact breakpoints; rank-spaced beyond)
    bootstrap: int = 5000  # paired bootstrap resamples
    seed: int = 0  # seed for random routers and the bootstrap
    binarize_at: float = 0.5  # correctness threshold for McNemar on graded quality

    def __post_init__(self) -> None:
        _check(self.n_lambdas >= 2, f"n_lambdas must be >= 2, got {self.n_lambdas}")
        _check(self.bootstrap >= 1, f"bootstrap must be >= 1, got {self.bootstrap}")
