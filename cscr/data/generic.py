"""A user's own logs: JSONL (or a JSON array), Parquet or CSV rows of ``prompt``, ``model``,
``quality`` (in [0, 1]; empty = missing cell), ``cost`` (>= 0, never empty), plus optional
``prompt_id``, ``split`` (train / val / probe / test), ``category`` and ``response``.

Layouts:

- one log file (option ``file``, or the only log file in the data directory);
- one file per model: a folder (the data directory, or option ``file=FOLDER``) holding several
  log files, each the logs of the model its file name (without suffix) names, e.g. RouterArena's
  ``cached_results/<model>.jsonl``; rows need no ``model`` field.

Field names: any field may be renamed or sit inside a nested object, given as a dotted path:
``--option quality=evaluation_result.score --option prompt=question --option
prompt_id=global_index``. A row whose nested object is null has a missing quality cell.

Costs: the ``cost`` field, or (option ``prices=FILE``, a price table in any format
``cscr.data.io.read_price_table`` reads, e.g. RouterArena's ``model_cost/cost.json``) per-token
prices times the token counts in fields ``input_tokens`` / ``output_tokens`` (e.g.
``token_usage.input_tokens``), or, where a row has no count, estimated from the prompt and
response texts (the rule is written to table.meta).

A row with neither quality nor cost (e.g. a failed call) counts as absent. Rows are pivoted to one row per prompt (by ``prompt_id``, or by the prompt text when there is no
id). Where no split is given, a test split is carved; val and probe are carved out of train
unless the file already has them. The cost unit is ``cfg.cost`` (usd or params; params needs a
``cost`` field holding parameter counts). A quality outside [0, 1] is refused unless option
``clip_quality=true``. Errors name the file and its 1-based line (CSV: the file line, the header
being line 1) and the prompt by its id, or by its first words when the logs have no id.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cscr.config import DataConfig
from cscr.data.io import (
    TOKEN_RULE,
    build_table,
    check_options,
    csv_lines,
    estimate_tokens,
    experts_from_registry,
    flag,
    get_path,
    prompt_name,
    read_price_table,
    read_records_at,
)
from cscr.data.registry import register_loader
from cscr.data.table import Expert, RoutingTable, TableError

REQUIRED = ["prompt", "model", "quality", "cost"]
FIELDS = ("prompt", "model", "quality", "cost", "prompt_id", "split", "category", "response",
          "input_tokens", "output_tokens")
SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
OPTIONS = ["file", "prices", "clip_quality", *FIELDS]


# ---- finding and reading the files ----------------------------------------------------------


def find_logs(cfg: DataConfig, options: dict[str, Any], loader: str = "generic") -> tuple[list[Path], bool]:
    """(log files, one file per model?). The target is option ``file`` or the data directory."""
    if options.get("file"):
        target = Path(options["file"]).expanduser()
    elif cfg.data_dir is None:
        raise TableError(f"{loader}: give the log file or folder (option file=PATH or --data-dir)")
    else:
        target = Path(cfg.data_dir).expanduser()
    if not target.exists():
        raise FileNotFoundError(f"log file {target} does not exist")
    if target.is_file():
        return [target], False
    skip = {Path(options["prices"]).expanduser().resolve()} if options.get("prices") else set()
    files = [f for f in sorted(target.iterdir()) if f.suffix in SUFFIXES and f.resolve() not in skip]
    if not files:
        raise TableError(f"{loader}: no log file ({'/'.join(SUFFIXES)}) in {target}; use option file=PATH")
    return files, len(files) > 1


def read_items(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(location, row) for every row of a log file: ``<path>:<line>`` (1-based file line: JSONL, and
    CSV, whose header is line 1), ``<path>: item <N>`` (a JSON array) or ``<path>: row <N>`` (Parquet)."""
    if path.suffix == ".parquet":
        try:
            df = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise TableError(f"{path}: malformed Parquet ({type(exc).__name__}: {exc})") from exc
        return [(f"{path}: row {i}", r) for i, r in enumerate(_records(df), 1)]
    if path.suffix == ".csv":
        try:
            df = pd.read_csv(path)
        except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
            raise TableError(f"{path}: malformed CSV ({exc})") from exc
        return list(zip(csv_lines(path), _records(df), strict=True))
    if path.suffix in (".jsonl", ".json"):
        return read_records_at(path)
    raise TableError(f"{path}: unsupported log format {path.suffix!r}; use one of {SUFFIXES}")


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    return [{k: _none_if_nan(v) for k, v in r.items()} for r in df.to_dict(orient="records")]


def _none_if_nan(v: Any) -> Any:
    return None if isinstance(v, float) and math.isnan(v) else v


def field_map(options: dict[str, Any]) -> dict[str, str]:
    """Canonical field -> where it sits in a row (the option's dotted path, else its own name)."""
    return {f: str(options.get(f) or f) for f in FIELDS}


def rows_frame(files: Sequence[Path], fields: dict[str, str], per_model: bool, model_given: bool,
               required: Sequence[str] = REQUIRED, extra: dict[str, str] | None = None) -> pd.DataFrame:
    """One flat row per log row: the canonical fields (None where absent), ``where`` (file and
    line) and, for the one-file-per-model layout, the model named by the file. ``extra``: more
    columns to read (column -> dotted path)."""
    extra = extra or {}
    out: dict[str, list[Any]] = {f: [] for f in (*FIELDS, *extra, "where")}
    seen = dict.fromkeys(FIELDS, False)
    for path in files:
        items = read_items(path)
        if not items:
            raise TableError(f"{path}: no rows")
        for where, row in items:
            out["where"].append(where)
            for f in FIELDS:
                v = get_path(row, fields[f])
                if f == "model" and per_model and not model_given:
                    v = path.stem
                seen[f] |= v is not None or _has(row, fields[f])
                out[f].append(v)
            for col, path_ in extra.items():
                out[col].append(get_path(row, path_))
    missing = [f for f in required if not seen[f] and not (f == "model" and per_model)]
    if missing:
        raise TableError(f"{files[0]}: missing column(s) {[fields[f] for f in missing]} "
                         "(rename with --option FIELD=COLUMN, nested fields as a dotted path like evaluation_result.score)")
    return pd.DataFrame(out)


def _has(row: dict[str, Any], path: str) -> bool:
    if path in row:
        return True
    head, _, rest = path.partition(".")
    return bool(rest) and isinstance(row.get(head), dict) and _has(row[head], rest)


# ---- validating and pivoting ----------------------------------------------------------------


def _numbers(df: pd.DataFrame, col: str) -> pd.Series:
    vals = df[col].map(lambda v: {"true": 1.0, "false": 0.0}.get(v.strip().lower(), v) if isinstance(v, str) else v)
    num = pd.to_numeric(vals.map(lambda v: float(v) if isinstance(v, bool) else v), errors="coerce")
    bad = vals.notna() & num.isna()
    if bad.any():
        r = df[bad].iloc[0]
        raise TableError(f"{r['where']}: non-numeric {col} {vals[bad].iloc[0]!r}")
    return num.astype(np.float64)


def table_from_rows(cfg: DataConfig, df: pd.DataFrame, *, source: str, experts: list[Expert] | None = None,
                    meta: dict[str, Any] | None = None, clip_quality: bool = False,
                    mask_nan_cost: bool = False) -> RoutingTable:
    """Validate flat rows (prompt, model, quality, cost, optional prompt_id, split, category,
    response, and where), pivot them to one row per prompt, and build the table.

    ``mask_nan_cost``: an empty cost is a failed call (its quality cell becomes missing, as in
    ``build_table(nan_cost="mask")``) rather than an error."""
    meta = dict(meta or {})
    df = df.reset_index(drop=True)
    for col in ("prompt", "model"):
        if df[col].isna().any():
            raise TableError(f"{df['where'][df[col].isna()].iloc[0]}: empty {col!r}")
    df["prompt"] = df["prompt"].astype(str)
    df["model"] = df["model"].astype(str)
    has_ids = df["prompt_id"].notna().any()
    if has_ids:
        if df["prompt_id"].isna().any():
            raise TableError(f"{df['where'][df['prompt_id'].isna()].iloc[0]}: empty prompt_id")
        df["prompt_id"] = df["prompt_id"].astype(str)
        df["name"] = [repr(p) for p in df["prompt_id"]]
    else:
        df["prompt_id"] = [hashlib.sha1(p.encode()).hexdigest()[:16] for p in df["prompt"]]
        df["name"] = [prompt_name(p) for p in df["prompt"]]
    df["quality"] = _numbers(df, "quality")
    df["cost"] = _numbers(df, "cost")

    if not mask_nan_cost:  # a row with neither quality nor cost (a failed call) is as good as absent
        empty = df["quality"].isna() & df["cost"].isna()
        meta["rows_without_quality_or_cost"] = int(empty.sum())
        df = df[~empty].reset_index(drop=True)

    def at(mask: pd.Series) -> pd.Series:
        return df[mask].iloc[0]

    if df["cost"].isna().any() and not mask_nan_cost:
        r = at(df["cost"].isna())
        raise TableError(f"{r['where']}: cost is NaN or empty for prompt {r['name']}, model {r.model!r}")
    if (df["cost"] < 0).any():
        r = at(df["cost"] < 0)
        raise TableError(f"{r['where']}: negative cost {r.cost} for prompt {r['name']}, model {r.model!r}")
    q = df["quality"]
    out = (q < 0) | (q > 1)
    if out.any():
        if not clip_quality:
            r = at(out)
            raise TableError(f"{r['where']}: quality outside [0, 1]: {r.quality} for prompt {r['name']}, model "
                             f"{r.model!r} ({int(out.sum())} such rows); rescale the scores to [0, 1], or pass "
                             "--option clip_quality=true to clip them")
        df["quality"] = q.clip(0.0, 1.0)
    meta["quality_cells_clipped"] = int(out.sum())
    dup = df.duplicated(["prompt_id", "model"])
    if dup.any():
        r = at(dup)
        raise TableError(f"{r['where']}: duplicate prompt ids: prompt {r['name']} has two rows for model {r.model!r}")
    per_id = df.groupby("prompt_id", sort=False)
    texts = per_id["prompt"].nunique()
    if (texts > 1).any():
        pid = texts[texts > 1].index[0]
        r = at((df["prompt_id"] == pid) & (df["prompt"] != df[df["prompt_id"] == pid]["prompt"].iloc[0]))
        raise TableError(f"{r['where']}: duplicate prompt ids: prompt id {pid!r} has different prompt texts")

    prompts = per_id.first()
    models = list(dict.fromkeys(df["model"]))
    quality = df.pivot(index="prompt_id", columns="model", values="quality").reindex(index=prompts.index, columns=models)
    cost = df.pivot(index="prompt_id", columns="model", values="cost").reindex(index=prompts.index, columns=models)
    logged = df.assign(one=1).pivot(index="prompt_id", columns="model", values="one").reindex(
        index=prompts.index, columns=models)
    absent = logged.isna().to_numpy()
    meta["absent_pairs"] = int(absent.sum())
    cost_arr = cost.to_numpy(dtype=np.float64)
    if absent.any() and not mask_nan_cost:
        # a (prompt, model) pair with no log row: quality missing; cost = that model's median
        med = np.nanmedian(cost_arr, axis=0)
        cost_arr = np.where(absent, med[None, :], cost_arr)
        meta["absent_pairs_policy"] = "quality missing; cost filled with the model's median cost (never 0)"
    responses = None
    if df["response"].notna().any():
        r = df.pivot(index="prompt_id", columns="model", values="response").reindex(index=prompts.index, columns=models)
        responses = r.astype(object).where(r.notna(), None).to_numpy(dtype=object)
    base = None
    if df["split"].notna().any():
        splits = per_id["split"].nunique()
        if (splits > 1).any():
            raise TableError(f"{source}: prompt {prompts.loc[splits[splits > 1].index[0], 'name']} has rows in different splits")
        if prompts["split"].isna().any():
            raise TableError(f"{source}: prompt {prompts['name'][prompts['split'].isna()].iloc[0]} has no split "
                             "while other prompts have one")
        base = prompts["split"].astype(str).to_numpy()
    by_name = {e.name: e for e in experts or []}
    return build_table(
        cfg=cfg,
        source=source,
        prompt_ids=prompts.index.to_numpy(dtype=object),
        texts=prompts["prompt"].to_numpy(dtype=object),
        categories=prompts["category"].fillna("").astype(str).to_numpy(),
        experts=[by_name.get(m) or Expert(name=m, kind="black-box") for m in models],
        quality=quality.to_numpy(dtype=np.float64),
        cost=cost_arr,
        cost_unit=cfg.cost,
        base_splits=base,
        responses=responses,
        meta=meta,
        nan_cost="mask" if mask_nan_cost else "error",
    )


def priced_costs(df: pd.DataFrame, prices_file: str | Path, cost_unit: str, loader: str) -> tuple[pd.Series, list[Expert], str]:
    """Per-row USD cost from a price table and each row's token counts (fields input_tokens /
    output_tokens; estimated from the prompt / response text where a row has none): the cost
    column, the priced experts, and the rule for table.meta."""
    if cost_unit != "usd":
        raise TableError(f"{loader}: a price table gives prices, not parameter counts; use cost='usd'")
    models = list(dict.fromkeys(df["model"].astype(str)))
    experts = experts_from_registry(models, read_price_table(Path(prices_file)), f"price table {prices_file}",
                                    need="price")
    by = {e.name: e for e in experts}
    tin = pd.to_numeric(df["input_tokens"], errors="coerce")
    tout = pd.to_numeric(df["output_tokens"], errors="coerce")
    est_in = tin.isna()
    est_out = tout.isna()
    no_text = est_out & df["response"].isna()
    if no_text.any():
        r = df[no_text].iloc[0]
        raise TableError(f"{r['where']}: no output token count (field output_tokens) and no response text to "
                         "estimate it from")
    tin = tin.where(~est_in, pd.Series(estimate_tokens(list(df["prompt"].astype(str))), index=df.index))
    tout = tout.where(~est_out, pd.Series(estimate_tokens([None if v is None else str(v) for v in df["response"]]),
                                          index=df.index))
    pin = df["model"].map(lambda m: by[str(m)].input_price).astype(np.float64)
    pout = df["model"].map(lambda m: by[str(m)].output_price).astype(np.float64)
    cost = (pin * tin + pout * tout) / 1e6
    rule = (f"usd = (input_price * input_tokens + output_price * output_tokens) / 1e6 with prices from {prices_file}; "
            f"token counts from the logs ({int(est_in.sum())} input / {int(est_out.sum())} output counts estimated "
            f"as {TOKEN_RULE})")
    return cost, experts, rule


@register_loader("generic")
def load_generic(cfg: DataConfig, **options: Any) -> RoutingTable:
    """Options: ``file`` (log file or folder of per-model files), ``prices`` (price table),
    ``clip_quality`` (true: clip scores to [0, 1]), and a field name per canonical field
    (``prompt``, ``model``, ``quality``, ``cost``, ``prompt_id``, ``split``, ``category``,
    ``response``, ``input_tokens``, ``output_tokens``), dotted for nested fields."""
    check_options("generic", options, OPTIONS)
    files, per_model = find_logs(cfg, options)
    fields = field_map(options)
    required = [f for f in REQUIRED if not (f == "cost" and options.get("prices"))]
    df = rows_frame(files, fields, per_model, model_given=bool(options.get("model")), required=required)
    meta: dict[str, Any] = {"files": [str(f) for f in files], "layout": "one file per model" if per_model else "one file",
                            "fields": {f: p for f, p in fields.items() if p != f}}
    experts = None
    if options.get("prices") and df["cost"].isna().all():
        df["cost"], experts, meta["cost_model"] = priced_costs(df, options["prices"], cfg.cost, "generic")
    where = str(files[0].parent if per_model else files[0])
    return table_from_rows(cfg, df, source=f"generic ({where})", experts=experts, meta=meta,
                           clip_quality=flag(options.get("clip_quality", False), "clip_quality"))
