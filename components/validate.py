"""The data validation gate: check a transaction frame against the data contract with Great Expectations.

The suite is derived from `core.schema`, so the gate can never disagree with training or serving about
what a valid transaction is. Each call runs in its own in-memory GX context (nothing is written into the
repository or the working directory) and writes a real Data Docs site under `docs_dir`, which a person
can open when the gate fails. The result is reduced to a small `ValidationSummary` so that callers (the
pipeline step, the CLI, tests) never need to understand GX result objects.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import great_expectations as gx
import great_expectations.expectations as gxe
import pandas as pd
from great_expectations.core.expectation_validation_result import ExpectationValidationResult
from great_expectations.data_context import EphemeralDataContext
from great_expectations.data_context.types.base import (
    DataContextConfig,
    InMemoryStoreBackendDefaults,
    ProgressBarsConfig,
)
from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

from core.schema import COLUMNS, LABEL, LABEL_RATE_BOUNDS, Column

SUITE_NAME = "transactions_contract"
DOCS_SITE = "validation_docs"
_EXAMPLES = 3  # unexpected values quoted per failure: enough to recognise the problem, short enough to read

# Accepted pandas dtypes per schema dtype family. Width variants are accepted because they carry the same
# meaning; a float in an int column is not (it is how pandas represents an int column that got nulls).
_TYPE_LISTS: dict[str, list[str]] = {
    "float": ["float64", "float32"],
    "int": ["int64", "int32", "int16", "int8"],
    # "str" checks every value of an object column; StringDtype covers frames read with string dtypes.
    "str": ["str", "StringDtype"],
    "bool": ["bool"],
}
# GX's type-list check cannot match a tz-aware dtype (DatetimeTZDtype), but the single-type check compares
# the dtype's scalar type, which is pandas' Timestamp for tz-aware columns. Naive datetimes fail on purpose:
# the contract says UTC, and a naive timestamp does not say which zone it is in.
_DATETIME_TYPE = "Timestamp"


@dataclass
class FailedExpectation:
    """One broken rule of the contract, in words a person can act on."""

    expectation: str
    column: str | None
    observed: str
    expected: str


@dataclass
class ValidationSummary:
    """What the gate decided, and why."""

    success: bool
    rows: int
    evaluated: int
    failed: list[FailedExpectation] = field(default_factory=list)
    docs_index: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def describe_failures(self) -> str:
        if not self.failed:
            return f"all {self.evaluated} expectations passed on {self.rows} rows"
        lines = [f"{len(self.failed)} of {self.evaluated} expectations failed on {self.rows} rows:"]
        for failure in self.failed:
            where = f"column {failure.column}" if failure.column else "table"
            lines.append(f"- {where}: {failure.expectation}: expected {failure.expected}; observed {failure.observed}")
        if self.docs_index:
            lines.append(f"Data Docs: {self.docs_index}")
        return "\n".join(lines)


def build_suite(min_rows: int = 1000) -> gx.ExpectationSuite:
    """The contract of `core.schema` as a GX suite: table-level rules first, then each column's rules."""
    expectations: list[gxe.Expectation] = [
        gxe.ExpectTableColumnsToMatchSet(column_set=[c.name for c in COLUMNS], exact_match=True),
        gxe.ExpectTableRowCountToBeBetween(min_value=min_rows),
    ]
    for column in COLUMNS:
        expectations.extend(_column_expectations(column))
    # Passed to the constructor rather than via `add_expectation`, which needs an active data context:
    # this way the suite can be built (and inspected) anywhere, e.g. by tests or a CLI that prints it.
    return gx.ExpectationSuite(name=SUITE_NAME, expectations=expectations)


def _column_expectations(column: Column) -> list[gxe.Expectation]:
    name = column.name
    expectations: list[gxe.Expectation] = [_type_expectation(column)]
    # mostly = share of values that must be non-null; 1.0 for every column today, but the schema decides.
    expectations.append(gxe.ExpectColumnValuesToNotBeNull(column=name, mostly=1.0 - column.max_null_fraction))
    if column.min_value is not None or column.max_value is not None:
        expectations.append(
            gxe.ExpectColumnValuesToBeBetween(column=name, min_value=column.min_value, max_value=column.max_value)
        )
    if column.categories:
        expectations.append(gxe.ExpectColumnValuesToBeInSet(column=name, value_set=list(column.categories)))
    if name == "transaction_id":
        # A duplicated transaction id means a replayed or double-ingested feed, which would leak into training.
        expectations.append(gxe.ExpectColumnValuesToBeUnique(column=name))
    if name == LABEL:
        low, high = LABEL_RATE_BOUNDS
        expectations.append(gxe.ExpectColumnMeanToBeBetween(column=name, min_value=low, max_value=high))
    return expectations


def _type_expectation(column: Column) -> gxe.Expectation:
    if column.dtype == "datetime":
        return gxe.ExpectColumnValuesToBeOfType(column=column.name, type_=_DATETIME_TYPE)
    return gxe.ExpectColumnValuesToBeInTypeList(column=column.name, type_list=_TYPE_LISTS[column.dtype])


def validate_transactions(frame: pd.DataFrame, docs_dir: str | Path, min_rows: int = 1000) -> ValidationSummary:
    """Validate `frame` against the contract, write Data Docs under `docs_dir` and summarise the outcome."""
    docs_dir = Path(docs_dir).resolve()
    docs_dir.mkdir(parents=True, exist_ok=True)
    context = _ephemeral_context(docs_dir)
    suite = context.suites.add(build_suite(min_rows))
    result = _checkpoint(context, suite).run(batch_parameters={"dataframe": frame})
    (validation,) = result.run_results.values()
    # GX returns results in its own order; report them in suite order (table rules, then schema column order).
    order = {expectation.id: i for i, expectation in enumerate(suite.expectations)}
    results = sorted(validation.results, key=lambda r: order.get(r.expectation_config.id, len(order)))
    index = docs_dir / "index.html"
    present = set(frame.columns)
    return ValidationSummary(
        success=bool(result.success),
        rows=len(frame),
        evaluated=len(results),
        failed=[_describe(r, present) for r in results if not r.success],
        docs_index=str(index) if index.exists() else None,
    )


def _checkpoint(context: EphemeralDataContext, suite: gx.ExpectationSuite) -> gx.Checkpoint:
    """Suite + in-memory dataframe batch + an action that renders the results into the Data Docs site."""
    asset = context.data_sources.add_pandas("transactions").add_dataframe_asset("frame")
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(
            name="transactions", data=asset.add_batch_definition_whole_dataframe("all"), suite=suite
        )
    )
    return context.checkpoints.add(
        gx.Checkpoint(
            name="transactions_gate",
            validation_definitions=[definition],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=[DOCS_SITE])],
            # SUMMARY keeps a few unexpected examples without materialising every bad row (fast on big frames).
            result_format="SUMMARY",
        )
    )


def _ephemeral_context(docs_dir: Path) -> EphemeralDataContext:
    """A throwaway in-memory context whose only files are the Data Docs site under `docs_dir`."""
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),  # no tqdm bars in logs
        data_docs_sites={
            DOCS_SITE: {
                "class_name": "SiteBuilder",
                "show_how_to_buttons": False,
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            }
        },
    )
    return gx.get_context(project_config=config, mode="ephemeral")


def _describe(result: ExpectationValidationResult, present: set[str]) -> FailedExpectation:
    config = result.expectation_config
    column = config.kwargs.get("column")
    # A missing column makes GX raise odd internal errors (e.g. "list index out of range" in the type check);
    # the frame itself says what really happened.
    observed = "column missing" if column is not None and column not in present else _observed(result)
    return FailedExpectation(expectation=config.type, column=column, observed=observed, expected=_expected(config))


def _expected(config: ExpectationConfiguration) -> str:
    kwargs = config.kwargs
    kind = config.type
    if kind == "expect_table_columns_to_match_set":
        return f"exactly the {len(kwargs['column_set'])} contract columns"
    if kind == "expect_table_row_count_to_be_between":
        return f"at least {kwargs['min_value']} rows"
    if kind == "expect_column_values_to_be_in_type_list":
        return f"dtype in {', '.join(kwargs['type_list'])}"
    if kind == "expect_column_values_to_be_of_type":
        return f"values of type {kwargs['type_']} (tz-aware datetime)"
    if kind == "expect_column_values_to_not_be_null":
        mostly = kwargs.get("mostly", 1.0)
        return "no nulls" if mostly >= 1.0 else f"at most {1.0 - mostly:.1%} nulls"
    if kind == "expect_column_values_to_be_between":
        return f"values {_bounds(kwargs)}"
    if kind == "expect_column_values_to_be_in_set":
        return f"values in {{{', '.join(map(str, kwargs['value_set']))}}}"
    if kind == "expect_column_values_to_be_unique":
        return "unique values"
    if kind == "expect_column_mean_to_be_between":
        return f"mean {_bounds(kwargs)}"
    return str({k: v for k, v in kwargs.items() if k not in ("column", "batch_id")})


def _bounds(kwargs: dict[str, Any]) -> str:
    low, high = kwargs.get("min_value"), kwargs.get("max_value")
    if low is None:
        return f"at most {_number(high)}"
    if high is None:
        return f"at least {_number(low)}"
    return f"between {_number(low)} and {_number(high)}"


def _observed(result: ExpectationValidationResult) -> str:
    error = _exception_message(result)
    if error is not None:
        # GX catches errors inside metrics (e.g. comparing strings with numbers) and marks the expectation
        # failed with an empty result; say why instead.
        return f"could not be evaluated: {error}"
    details: dict[str, Any] = result.result or {}
    kind = result.expectation_config.type
    if kind == "expect_table_columns_to_match_set":
        return _column_mismatch(details)
    if kind == "expect_table_row_count_to_be_between":
        return f"{details.get('observed_value')} rows"
    if kind == "expect_column_mean_to_be_between":
        mean = details.get("observed_value")
        return "mean undefined (no non-null values)" if _is_missing(mean) else f"mean {mean:.4g}"
    if "unexpected_count" in details:
        return _unexpected_values(kind, details, result.expectation_config.kwargs)
    if "observed_value" in details:
        return f"dtype {details['observed_value']}" if "type" in kind else str(details["observed_value"])
    return "failed (no details reported)"


def _exception_message(result: ExpectationValidationResult) -> str | None:
    """GX reports errors either at the top level of `exception_info` or keyed per failing metric."""
    info = result.exception_info or {}
    if info.get("raised_exception"):
        return str(info.get("exception_message") or "unknown error")
    for value in info.values():
        if isinstance(value, dict) and value.get("raised_exception"):
            return str(value.get("exception_message") or "unknown error")
    return None


def _column_mismatch(details: dict[str, Any]) -> str:
    mismatched = (details.get("details") or {}).get("mismatched") or {}
    parts = []
    if mismatched.get("missing"):
        parts.append(f"missing columns: {', '.join(mismatched['missing'])}")
    if mismatched.get("unexpected"):
        parts.append(f"unexpected columns: {', '.join(mismatched['unexpected'])}")
    return "; ".join(parts) or f"columns {details.get('observed_value')}"


def _unexpected_values(kind: str, details: dict[str, Any], kwargs: dict[str, Any]) -> str:
    """'5.0% of 5000 values outside [0.01, 50000] (e.g. -24.82, -99.63)' for the map expectations."""
    count = int(details.get("unexpected_count") or 0)
    # Null values are skipped by every map expectation except the null check itself, so count them out.
    total = int(details.get("element_count") or 0) - int(details.get("missing_count") or 0)
    share = f"{count / total:.1%}" if total else f"{count}"
    what = {
        "expect_column_values_to_not_be_null": "null",
        "expect_column_values_to_be_between": (
            f"outside [{_number(kwargs.get('min_value'))}, {_number(kwargs.get('max_value'))}]"
        ),
        "expect_column_values_to_be_in_set": "not in the allowed set",
        "expect_column_values_to_be_unique": "duplicated",
        "expect_column_values_to_be_in_type_list": "of the wrong type",
        "expect_column_values_to_be_of_type": "of the wrong type",
    }.get(kind, "unexpected")
    text = f"{share} of {total} values {what}"
    examples = [v for v in details.get("partial_unexpected_list") or [] if not _is_missing(v)]
    if examples:
        text += f" (e.g. {', '.join(_example(v) for v in _distinct(examples)[:_EXAMPLES])})"
    return text


def _distinct(values: list[Any]) -> list[Any]:
    seen: dict[str, Any] = {}
    for value in values:
        seen.setdefault(repr(value), value)
    return list(seen.values())


def _example(value: Any) -> str:
    return repr(value) if isinstance(value, str) else _number(value)


def _number(value: Any) -> str:
    """Print 50000.0 as 50000 and 0.01 as 0.01, so numbers read like the schema that defines them."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
