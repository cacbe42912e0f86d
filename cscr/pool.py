"""The expert pool: which experts, where their answers come from, what they cost.

A pool is a YAML file validated with pydantic (unknown fields refused, one clear error naming
the file and the field)::

    name: local-small
    experts:
      - name: smollm2
        kind: open-weights            # open-weights | black-box | recorded
        source: {model: smollm2}      # packaged name, HF folder, .gguf file or Hub id
        backend: transformers         # transformers | vllm (open weights); black-box: openai
        cost: {n_params: 0.135}       # billions of parameters, and/or prices (USD per 1M tokens)
      - name: gpt-4o-mini
        kind: black-box
        source: {base_url: "https://api.openai.com/v1", model: gpt-4o-mini, api_key_env: OPENAI_API_KEY}
        cost: {input_price: 0.15, output_price: 0.6}
      - name: claude-v2
        kind: recorded                # answers recorded in a routing table
        source: {table: runs/routerbench}   # a run folder or table folder; omit: the run's own table
        cost: {input_price: 8, output_price: 24}

Relative paths in ``source.model`` / ``source.table`` are resolved against the YAML's folder
when they exist there, else against the working directory.

``ExpertSpec`` is the one expert spec type: labelling and fingerprints read it, and serving
deploys it (``max_new_tokens``, ``num_cpus``, ``num_gpus``, ``engine_kwargs``; ``cscr.llm`` builds
its backend). Black-box experts have ``backend: openai`` (set for them).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cscr.config import ConfigError
from cscr.data.table import Expert

KINDS = ("open-weights", "black-box", "recorded")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Cost(_Strict):
    n_params: float | None = Field(None, ge=0, description="parameters, billions")
    input_price: float | None = Field(None, ge=0, description="USD per million input tokens")
    output_price: float | None = Field(None, ge=0, description="USD per million output tokens")

    @model_validator(mode="after")
    def _some(self) -> Cost:
        if self.n_params is None and self.input_price is None and self.output_price is None:
            raise ValueError("cost needs n_params and/or input_price / output_price")
        return self


class Source(_Strict):
    model: str | None = None  # open-weights: model source; black-box: the API's model name
    base_url: str | None = None  # black-box: OpenAI-compatible base URL (ending in /v1)
    api_key_env: str | None = None  # black-box: environment variable holding the API key
    table: str | None = None  # recorded: run folder or table folder (None: the run's table)
    column: str | None = None  # recorded: the expert's name in that table (default: its own name)


class ExpertSpec(_Strict):
    """One expert: the pool's entry, what labelling and fingerprints run, and what serving deploys
    (the one expert spec type; ``cscr.data.table.Expert`` is a routing table's column record).

    The admin API's short form ``{"name", "model", "backend", "base_url", "api_key_env",
    "retries", ...}`` is accepted too: ``base_url`` or ``backend: openai`` makes a black-box expert,
    anything else an open-weights one.
    """

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:\-/]+$")
    kind: Literal["open-weights", "black-box", "recorded"]
    source: Source
    cost: Cost | None = None  # every pool entry has one (Pool checks); the admin API sends c_m apart
    backend: Literal["transformers", "vllm", "openai"] = "transformers"  # openai: black-box experts (set for them)
    timeout_s: float = Field(60.0, gt=0)  # black-box: per-request timeout
    max_retries: int = Field(3, ge=0, le=10)  # black-box: retries after a failed request (the openai SDK's)
    max_concurrency: int = Field(8, ge=1)  # requests in flight (labelling: black-box calls; serving: per replica)
    max_new_tokens: int = Field(256, ge=1)  # serving: cap on the tokens generated for one request
    num_cpus: float = Field(0.25, ge=0)  # serving: Ray resources of the expert's replica
    num_gpus: float = Field(0.0, ge=0)
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)  # serving: backend extras (vLLM engine args)

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "source" not in data and ("model" in data or "base_url" in data):
            source = {k: data.pop(k) for k in ("model", "base_url", "api_key_env") if k in data}
            data["source"] = source
            if "kind" not in data:
                black = data.get("backend") == "openai" or source.get("base_url") is not None
                data["kind"] = "black-box" if black else "open-weights"
            if "retries" in data:
                data["max_retries"] = data.pop("retries")
        if data.get("kind") == "black-box":
            data.setdefault("backend", "openai")
        return data

    @model_validator(mode="after")
    def _source_fits_kind(self) -> ExpertSpec:
        s = self.source
        if self.kind == "open-weights" and not s.model:
            raise ValueError(f"open-weights expert {self.name!r} needs source.model (a packaged name, "
                             "a model folder, a .gguf file or a Hub id)")
        if self.kind == "open-weights" and self.backend == "openai":
            raise ValueError(f"open-weights expert {self.name!r}: backend is transformers or vllm")
        if self.kind == "black-box" and not (s.base_url and s.model):
            raise ValueError(f"black-box expert {self.name!r} needs source.base_url and source.model")
        if self.kind == "black-box" and self.backend != "openai":
            raise ValueError(f"black-box expert {self.name!r} is called through its OpenAI-compatible API: "
                             "backend openai (or no backend)")
        if self.kind == "recorded" and (s.model or s.base_url):
            raise ValueError(f"recorded expert {self.name!r} reads a routing table: give source.table "
                             "(or nothing: the run's table), not model/base_url")
        return self

    @property
    def model(self) -> str | None:
        """The model source (open-weights) or the API's model name (black-box)."""
        return self.source.model

    @property
    def prices(self) -> Cost:
        """The cost of a pool entry (ValueError for a spec without one, e.g. the admin API's)."""
        if self.cost is None:
            raise ValueError(f"expert {self.name!r} has no cost")
        return self.cost

    def to_expert(self) -> Expert:
        """The routing-table view of this expert."""
        cost = self.prices
        hub = None
        if self.kind == "open-weights" and self.source.model:
            from cscr.models import PACKAGED

            hub = PACKAGED[self.source.model].hub_id if self.source.model in PACKAGED else None
        return Expert(self.name, self.kind, cost.n_params, cost.input_price, cost.output_price, hub)


class Pool(_Strict):
    name: str = "pool"
    description: str = ""
    experts: list[ExpertSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> Pool:
        names = [e.name for e in self.experts]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate expert names {dup}")
        free = [e.name for e in self.experts if e.cost is None]
        if free:
            raise ValueError(f"expert(s) {free} need a cost (n_params and/or input_price / output_price)")
        return self

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.experts]

    def get(self, name: str) -> ExpertSpec:
        for e in self.experts:
            if e.name == name:
                return e
        raise KeyError(f"unknown expert {name!r}; the pool has {self.names}")

    def of_kind(self, *kinds: str) -> list[ExpertSpec]:
        return [e for e in self.experts if e.kind in kinds]

    def to_experts(self) -> list[Expert]:
        return [e.to_expert() for e in self.experts]


def _format_error(path: str, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return f"{path}: invalid pool: " + "; ".join(parts)


def _resolve(value: str | None, base: Path) -> str | None:
    if value is None:
        return None
    p = Path(value).expanduser()
    if not p.is_absolute() and (base / p).exists():
        return str((base / p).resolve())
    return value


def pool_from_dict(d: object, where: str = "<pool>", base: Path | None = None) -> Pool:
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: a pool is a mapping with an 'experts' list, got {type(d).__name__}")
    try:
        pool = Pool.model_validate(d)
    except ValidationError as exc:
        raise ConfigError(_format_error(where, exc)) from None
    if base is None:
        return pool
    experts = [e.model_copy(update={"source": e.source.model_copy(update={
        "model": _resolve(e.source.model, base) if e.kind == "open-weights" else e.source.model,
        "table": _resolve(e.source.table, base)})}) for e in pool.experts]
    return pool.model_copy(update={"experts": experts})


def load_pool(path: str | os.PathLike[str]) -> Pool:
    """Read and validate a pool YAML file (ConfigError with the file and field on any problem)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"pool file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: malformed YAML ({exc})") from None
    return pool_from_dict(data, str(path), path.parent.resolve())
