"""Helpers shared by the loaders: reading source files with clear errors, cost registries,
token estimates, and ``build_table`` (missing cells, splits, meta) that every loader ends with.
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cscr.config import DataConfig
from cscr.data.table import Expert, RoutingTable, TableError, assign_splits
from cscr.jsonl import iter_jsonl

# ---- locating files -------------------------------------------------------------------------


def source_dir(cfg: DataConfig, *subdirs: str) -> Path:
    """The folder holding a loader's files: ``<data_dir>/<subdir>`` for the first subdir that
    exists, else ``data_dir`` itself (a user may point straight at the files)."""
    if cfg.data_dir is None:
        raise TableError("no data directory given")
    root = Path(cfg.data_dir).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data directory {root} does not exist")
    for sub in subdirs:
        if (root / sub).is_dir():
            return root / sub
    return root


def registries_dir(cfg: DataConfig) -> Path | None:
    """``<data_dir>/registries`` or ``<data_dir>/../registries`` when present."""
    if cfg.data_dir is None:
        return None
    root = Path(cfg.data_dir).expanduser()
    for cand in (root / "registries", root.parent / "registries"):
        if cand.is_dir():
            return cand
    return None


def registry_path(cfg: DataConfig, options: dict[str, Any], filename: str) -> Path | None:
    """The cost registry a loader reads: option ``registry=FILE``, else ``<registries>/<filename>``
    (``registries_dir``) when that file exists, else None (the loader says whether that is an error)."""
    if options.get("registry"):
        return Path(options["registry"])
    rd = registries_dir(cfg)
    return rd / filename if rd is not None and (rd / filename).exists() else None


def check_options(loader: str, options: dict[str, Any], known: Iterable[str]) -> None:
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TableError(f"{loader}: unknown option(s) {unknown}; known: {sorted(known)}")


# ---- reading files with one clear error per problem ------------------------------------------


def read_csv(path: Path, required: Sequence[str] = ()) -> pd.DataFrame:
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise TableError(f"{path}: malformed CSV ({exc})") from exc
    require_columns(df, required, path)
    return df


def csv_lines(path: Path) -> list[str]:
    """``<path>:<line>`` of each data record of a CSV file with a header: the 1-based file line the
    record starts on (a quoted field may span several lines, so this is not always row + 2)."""
    import csv

    out, end = [], 0
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        for k, rec in enumerate(reader):
            start, end = end + 1, reader.line_num
            if k > 0 and rec:  # the header and blank lines are no records (as pandas reads them)
                out.append(f"{path}:{start}")
    return out


def require_columns(df: pd.DataFrame, required: Iterable[str], where: Any) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise TableError(f"{where}: missing column(s) {missing}; found {list(df.columns)[:12]}")


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise TableError(f"{path}: malformed JSON ({exc})") from exc


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [obj for _, obj in iter_jsonl(path, TableError)]


def read_records(path: Path) -> list[dict[str, Any]]:
    """JSON Lines, or a JSON array of objects (either extension)."""
    return [obj for _, obj in read_records_at(path)]


def read_records_at(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(location, object) for each record: ``<path>:<N>`` for JSON Lines (N the 1-based file line,
    as editors and compilers write it) or ``<path>: item <N>`` for a JSON array (1-based)."""
    path = Path(path)
    with open(path, encoding="utf-8") as fh:
        head = fh.read(64).lstrip()[:1]
    if path.suffix == ".json" and head == "[":
        data = read_json(path)
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise TableError(f"{path}: expected a JSON array of objects")
        return [(f"{path}: item {i}", r) for i, r in enumerate(data, 1)]
    return [(f"{path}:{ln}", obj) for ln, obj in iter_jsonl(path, TableError)]


def get_path(obj: Any, path: str) -> Any:
    """The value at a dotted ``path`` ("evaluation_result.score") of nested mappings; a key that
    itself holds dots is found first. None where any step is missing or null."""
    if isinstance(obj, dict) and path in obj:
        return obj[path]
    cur = obj
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def prompt_name(text: Any, words: int = 8) -> str:
    """A prompt named by its first words (for errors about a file without an id column)."""
    parts = str(text).split()
    head = " ".join(parts[:words])
    return repr(head + (" ..." if len(parts) > words else ""))


def flag(value: Any, name: str) -> bool:
    """A boolean loader option: true/false, yes/no, 1/0 (strings from --option) or a bool."""
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise TableError(f"option {name} must be true or false, got {value!r}")


def literal(value: Any, where: str) -> Any:
    """A value that may be a Python-literal string (``"['a', 'b']"``, ``"{'m': 1.0}"``)."""
    if not isinstance(value, str):
        return value
    s = value.strip()
    if not s or s[0] not in "[{(":
        return value
    try:
        return ast.literal_eval(s)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        try:
            return json.loads(s)
        except json.JSONDecodeError as exc:
            raise TableError(f"{where}: cannot parse {s[:60]!r} as a Python literal or JSON") from exc


def text_of(value: Any, where: str = "value") -> str | None:
    """Prompt or response text: a string, or a list of strings (joined with newlines), or a
    Python-literal string of such a list (RouterBench). None for empty cells."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return value  # a text that merely starts with "["
    if isinstance(value, (list, tuple, np.ndarray)):
        return "\n".join(str(v) for v in value)
    return str(value)


# ---- costs -----------------------------------------------------------------------------------


def estimate_tokens(texts: Sequence[str | None]) -> np.ndarray:
    """Token count estimate (n,): ceil(characters / 4), the usual rule of thumb for BPE
    tokenizers on English text. Recorded in table.meta wherever a cost depends on it."""
    return np.array([math.ceil(len(t) / 4) if t else 0 for t in texts], dtype=np.float64)


TOKEN_RULE = "ceil(characters / 4)"


def _norm(name: str) -> str:
    return name.strip().lower().replace("/", "__")


def load_registry(path: Path) -> dict[str, dict[str, Any]]:
    data = read_json(path)
    if not isinstance(data, dict):
        raise TableError(f"{path}: expected a JSON object mapping model name -> fields")
    return data


def registry_lookup(registry: dict[str, dict[str, Any]], name: str) -> dict[str, Any] | None:
    """Find ``name`` in a cost registry: exact key, then "/" <-> "__", then the hf_id, then the
    part after the organisation (``org__model`` / ``org/model``), case-insensitive."""
    if name in registry:
        return registry[name]
    n = _norm(name)
    base = n.split("__")[-1]
    by_key = {_norm(k): v for k, v in registry.items()}
    if n in by_key:
        return by_key[n]
    for v in registry.values():
        if isinstance(v, dict) and v.get("hf_id") and _norm(v["hf_id"]) == n:
            return v
    hits = [v for k, v in by_key.items() if k.split("__")[-1] == base]
    return hits[0] if len(hits) == 1 else None


PRICE_FORMATS = ("input_price/output_price (USD per million tokens)",
                 "input_token_price_per_million/output_token_price_per_million",
                 "cost_usd_per_1k_tokens")


def entry_prices(entry: dict[str, Any], where: str) -> tuple[float, float] | None:
    """(input, output) USD per million tokens from a registry or price-table entry in any of
    ``PRICE_FORMATS`` (None: the entry has no price). A missing input or output price takes the other."""
    pin: Any
    pout: Any
    if "input_price" in entry or "output_price" in entry:
        pin, pout = entry.get("input_price"), entry.get("output_price")
    elif "input_token_price_per_million" in entry or "output_token_price_per_million" in entry:
        pin, pout = entry.get("input_token_price_per_million"), entry.get("output_token_price_per_million")
    elif entry.get("cost_usd_per_1k_tokens") is not None:
        try:
            pin = pout = float(entry["cost_usd_per_1k_tokens"]) * 1000.0
        except (TypeError, ValueError) as exc:
            raise TableError(f"{where}: cost_usd_per_1k_tokens is not a number") from exc
    else:
        return None
    pin, pout = (pout if pin is None else pin), (pin if pout is None else pout)
    try:
        pin, pout = float(pin), float(pout)
    except (TypeError, ValueError) as exc:
        raise TableError(f"{where}: prices are not numbers") from exc
    if not (math.isfinite(pin) and math.isfinite(pout)) or pin < 0 or pout < 0:
        raise TableError(f"{where}: prices must be finite numbers >= 0")
    return pin, pout


def read_price_table(path: Path) -> dict[str, dict[str, float]]:
    """A user price table: JSON/YAML mapping model -> prices in any of ``PRICE_FORMATS`` (e.g.
    RouterArena's model_cost/cost.json); or a CSV with columns model, input_price, output_price.
    Returned as model -> {input_price, output_price} per million tokens."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"price table {path} does not exist")
    if path.suffix == ".csv":
        df = read_csv(path, ["model", "input_price", "output_price"])
        raw = {r.model: {"input_price": r.input_price, "output_price": r.output_price} for r in df.itertuples()}
    elif path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise TableError(f"{path}: malformed YAML ({exc})") from exc
    else:
        raw = read_json(path)
    if not isinstance(raw, dict):
        raise TableError(f"{path}: expected a mapping model -> prices")
    out = {}
    for model, v in raw.items():
        if not isinstance(v, dict):
            raise TableError(f"{path}: prices of {model!r} must be a mapping")
        prices = entry_prices(v, f"{path}: {model!r}")
        if prices is None:
            raise TableError(f"{path}: {model!r} needs one of {', '.join(PRICE_FORMATS)}")
        out[model] = {"input_price": prices[0], "output_price": prices[1]}
    return out


def experts_from_registry(
    names: Sequence[str], registry: dict[str, dict[str, Any]] | None, where: str, need: str | None = None
) -> list[Expert]:
    """Experts with n_params, prices (USD per million tokens; any of ``PRICE_FORMATS``) and hub id
    from a cost registry or price table. ``need`` ("n_params" or "price"): raise if an expert lacks it."""
    experts, lacking = [], []
    for name in names:
        entry = registry_lookup(registry, name) if registry else None
        entry = entry or {}
        n_params = entry.get("n_params")
        prices = entry_prices(entry, f"{where}: {name!r}")
        if (need == "n_params" and n_params is None) or (need == "price" and prices is None):
            lacking.append(name)
        experts.append(
            Expert(
                name=name,
                kind="open-weights" if n_params is not None else "black-box",
                n_params=None if n_params is None else float(n_params),
                input_price=None if prices is None else prices[0],
                output_price=None if prices is None else prices[1],
                hub_id=entry.get("hf_id"),
            )
        )
    if lacking:
        what = "parameter count (n_params)" if need == "n_params" else f"price ({' or '.join(PRICE_FORMATS)})"
        raise TableError(f"{where}: model(s) {lacking} have no {what}")
    return experts


def registry_experts(cfg: DataConfig, options: dict[str, Any], filename: str, models: Sequence[str],
                     loader: str) -> tuple[list[Expert], Path]:
    """The one registry -> experts step of the loaders: the registry file (option ``registry``, else
    ``<registries>/<filename>``; refused when absent), each model's parameter count and prices,
    and a clear error when a model lacks what ``cfg.cost`` needs."""
    reg_path = registry_path(cfg, options, filename)
    if reg_path is None:
        raise FileNotFoundError(f"{loader} needs the cost registry registries/{filename} (or option registry=FILE)")
    experts = experts_from_registry(models, load_registry(reg_path), f"registry {reg_path}",
                                    need="n_params" if cfg.cost == "params" else "price")
    return experts, reg_path


def expert_costs(cfg: DataConfig, experts: Sequence[Expert], in_tokens: np.ndarray, out_tokens: np.ndarray,
                 loader: str, answer_note: str = "") -> tuple[np.ndarray, str]:
    """The one cost step of the loaders: cost (n, M) in ``cfg.cost`` and its rule for
    ``table.meta["cost_model"]``. params: each expert's parameter count (billions); usd:
    (input_price * in_tokens + output_price * out_tokens) / 1e6, ``out_tokens`` (n,) or (n, M)."""
    if cfg.cost == "params":
        return param_costs(experts, len(in_tokens), loader), "parameter count (billions) from the registry (n_params)"
    lacking = [e.name for e in experts if e.input_price is None or e.output_price is None]
    if lacking:
        raise TableError(f"{loader}: cost='usd' needs prices for every expert; none for {lacking}")
    rule = f"usd = (input_price * prompt_tokens + output_price * answer_tokens) / 1e6; tokens = {TOKEN_RULE}"
    return token_costs(experts, in_tokens, out_tokens), rule + (f"; {answer_note}" if answer_note else "")


def token_costs(experts: Sequence[Expert], in_tokens: np.ndarray, out_tokens: np.ndarray) -> np.ndarray:
    """USD cost (n, M) = (input_price * in_tokens + output_price * out_tokens) / 1e6;
    ``out_tokens`` is (n,) or (n, M)."""
    pin = np.array([e.input_price for e in experts], dtype=np.float64)
    pout = np.array([e.output_price for e in experts], dtype=np.float64)
    out = np.asarray(out_tokens, dtype=np.float64)
    out = out[:, None] if out.ndim == 1 else out
    return (in_tokens[:, None] * pin[None, :] + out * pout[None, :]) / 1e6


def param_costs(experts: Sequence[Expert], n: int, where: str) -> np.ndarray:
    lacking = [e.name for e in experts if e.n_params is None]
    if lacking:
        raise TableError(f"{where}: cost='params' needs a parameter count for every expert; none for {lacking} (use cost='usd')")
    return np.tile(np.array([e.n_params for e in experts], dtype=np.float64), (n, 1))


# ---- the common last step --------------------------------------------------------------------


def to_quality(values: Any, where: str, rows: Sequence[str] | None = None) -> np.ndarray:
    """Numbers or booleans (or "True"/"False" strings) to float64; empty cells -> NaN. ``rows``:
    each row's location (``<file>:<line>``), named in the error for a bad cell."""
    arr = pd.DataFrame(values) if not isinstance(values, pd.DataFrame) else values
    out = np.empty(arr.shape, dtype=np.float64)
    for j, col in enumerate(arr.columns):
        s = arr[col]
        if s.dtype == object or pd.api.types.is_string_dtype(s):
            mapped = s.map(lambda v: {"true": 1.0, "false": 0.0}.get(v.strip().lower(), v) if isinstance(v, str) else v)
            s = pd.to_numeric(mapped, errors="coerce")
            bad = mapped.notna() & s.isna()
            if bad.any():
                at = rows[int(np.flatnonzero(bad.to_numpy())[0])] if rows is not None else where
                raise TableError(f"{at}: non-numeric quality {mapped[bad].iloc[0]!r} for model {col!r}")
        out[:, j] = s.astype(np.float64).to_numpy()
    return out


def build_table(
    *,
    cfg: DataConfig,
    source: str,
    prompt_ids: Sequence[str] | np.ndarray,
    texts: Sequence[str] | np.ndarray,
    categories: Sequence[str] | np.ndarray | None,
    experts: list[Expert],
    quality: np.ndarray,
    cost: np.ndarray,
    cost_unit: str,
    base_splits: Sequence[str] | np.ndarray | None = None,
    responses: np.ndarray | None = None,
    meta: dict[str, Any] | None = None,
    nan_cost: str = "error",
) -> RoutingTable:
    """Validate, apply ``cfg.missing`` to empty quality cells, assign splits, record meta.

    ``base_splits``: the source's own split per row ("train"/"test"/"val"; None: no split
    upstream, a test split is carved with assign_splits). ``nan_cost``: "error" (user data: one
    clear error) or "mask" (recorded data: an empty cost makes its quality cell missing too, and
    the cost is filled with the expert's median over the rows that have one, counted in meta).
    """
    meta = dict(meta or {})
    n, m = len(prompt_ids), len(experts)
    names = [e.name for e in experts]
    quality = np.asarray(quality, dtype=np.float64).copy()
    cost = np.asarray(cost, dtype=np.float64).copy()
    if quality.shape != (n, m) or cost.shape != (n, m):
        raise TableError(f"{source}: quality {quality.shape} / cost {cost.shape} do not match ({n}, {m})")
    q = quality[~np.isnan(quality)]
    if q.size and (q.min() < 0 or q.max() > 1):
        i, j = np.argwhere((quality < 0) | (quality > 1))[0]
        raise TableError(f"{source}: quality outside [0, 1]: {quality[i, j]} for prompt {prompt_ids[i]!r}, model {names[j]!r}")
    neg = np.argwhere(cost < 0)
    if len(neg):
        i, j = neg[0]
        raise TableError(f"{source}: negative cost {cost[i, j]} for prompt {prompt_ids[i]!r}, model {names[j]!r}")
    bad_cost = ~np.isfinite(cost)
    if bad_cost.any():
        if nan_cost == "error":
            i, j = np.argwhere(bad_cost)[0]
            raise TableError(f"{source}: cost is NaN or empty for prompt {prompt_ids[i]!r}, model {names[j]!r} ({int(bad_cost.sum())} cells)")
        meta["missing_cost_cells"] = int(bad_cost.sum())
        quality[bad_cost] = np.nan
        for j in range(m):
            col = cost[:, j]
            ok = np.isfinite(col)
            if not ok.any():
                raise TableError(f"{source}: model {names[j]!r} has no cost at all")
            col[~ok] = float(np.median(col[ok]))
        meta["missing_cost_policy"] = "quality cell masked; cost filled with the expert's median (never 0)"
    miss = np.isnan(quality)
    meta["missing_quality_cells"] = int(miss.sum())
    meta["rows_with_missing_quality"] = int(miss.any(axis=1).sum())
    meta["missing_policy"] = cfg.missing
    keep: np.ndarray = np.ones(n, dtype=bool)
    if cfg.missing == "drop":
        keep = np.asarray(~miss.any(axis=1))
        meta["rows_dropped"] = int((~keep).sum())
    if not keep.any():
        raise TableError(f"{source}: every row misses a quality cell; nothing left with missing='drop'")
    idx = np.flatnonzero(keep)
    base = None if base_splits is None else np.asarray(base_splits, dtype=object)[idx]
    val_fraction, probe_size = cfg.val_fraction, cfg.probe_size
    if base is not None:
        bad = sorted(set(base) - {"train", "val", "probe", "test"})
        if bad:
            raise TableError(f"{source}: unknown split value(s) {bad}; expected train/val/probe/test")
        if (base == "val").any():
            val_fraction = 0.0  # the source has its own validation split
        if (base == "probe").any():
            probe_size = 0
        if not (base == "train").any():
            raise TableError(f"{source}: no train rows")
    splits = assign_splits(len(idx), base, val_fraction=val_fraction, probe_size=probe_size, seed=cfg.seed)
    meta.update({"seed": cfg.seed, "val_fraction": val_fraction, "probe_size": probe_size,
                 "upstream_split": base is not None})
    table = RoutingTable(
        prompt_ids=np.asarray(prompt_ids, dtype=object)[idx],
        texts=np.asarray(texts, dtype=object)[idx],
        splits=splits,
        categories=np.asarray(categories if categories is not None else [""] * n, dtype=object)[idx],
        experts=experts,
        quality=quality[idx],
        cost=cost[idx],
        source=source,
        cost_unit=cost_unit,
        responses=None if responses is None else np.asarray(responses, dtype=object)[idx],
        meta=meta,
    )
    return table


def env_data_dir() -> str | None:
    return os.environ.get("CSCR_DATA_DIR") or None


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([bBmMkKtT]?)\s*$")


def parse_size(size: Any, where: str) -> float:
    """A model size like "70B", "141B", "560M" or a number -> billions of parameters."""
    if isinstance(size, (int, float)) and not isinstance(size, bool):
        return float(size)
    m = _SIZE.match(str(size))
    if not m:
        raise TableError(f"{where}: cannot read model size {size!r} (expected e.g. '70B')")
    scale = {"": 1.0, "b": 1.0, "m": 1e-3, "k": 1e-6, "t": 1e3}[m.group(2).lower()]
    return float(m.group(1)) * scale
