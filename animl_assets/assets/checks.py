"""Asset checks shared by several stages."""

import dagster as dg
import pandas as pd

from animl_assets.assets.artifacts import table

FAILURE_RATE = "failure_rate"


def failure_rate_spec(asset: str) -> dg.AssetCheckSpec:
    """A warning (non-blocking) check on the share of an asset's images that failed."""
    return dg.AssetCheckSpec(FAILURE_RATE, asset=asset, blocking=False,
                             description="Warns when more than max_failure_rate of the images failed.")


def failure_rate_check(failed: pd.DataFrame, total: int, max_rate: float) -> dg.AssetCheckResult:
    """``failed`` (one row per failed image, with a ``category`` or ``status`` column) against ``total``."""
    rate = len(failed) / total if total else 0.0
    by = "status" if "status" in failed.columns else "category"
    per_category = failed[by].value_counts().rename_axis("category").reset_index(name="images")
    return dg.AssetCheckResult(
        check_name=FAILURE_RATE, passed=rate <= max_rate, severity=dg.AssetCheckSeverity.WARN,
        description=f"{len(failed)} of {total} images failed ({rate:.1%}; warns above {max_rate:.1%})",
        metadata={"failure_rate": dg.MetadataValue.float(round(rate, 4)), "max_failure_rate": max_rate,
                  "failed_images": len(failed), "images": total, "per_category": table(per_category)},
    )


LOGGED_EXAMPLES = 10


def log_failures(log, failures: pd.DataFrame, by: str, where: str, limit: int = LOGGED_EXAMPLES) -> None:
    """One warning with the count per category and at most ``limit`` examples, however many images failed
    (the full list is in the asset's manifest; one line per image flooded the event log)."""
    if failures.empty:
        return
    counts = ", ".join(f"{n} {category}" for category, n in failures[by].value_counts().items())
    examples = "; ".join(f"{row.iloc[0]}: {row[by]} ({row['error']})" for _, row in failures.head(limit).iterrows())
    more = f" and {len(failures) - limit} more" if len(failures) > limit else ""
    log.warning(f"{len(failures)} images failed ({counts}); full list in {where}. E.g. {examples}{more}")


def problems_check(check_name: str, problems: list[str], limit: int = 20,
                   severity: dg.AssetCheckSeverity = dg.AssetCheckSeverity.ERROR) -> dg.AssetCheckResult:
    """A check that passes when ``problems`` is empty; the first ``limit`` are listed."""
    return dg.AssetCheckResult(
        check_name=check_name, passed=not problems, severity=severity,
        metadata={"problems": len(problems), "examples": table(pd.DataFrame({"problem": problems[:limit]},
                                                                           dtype=str))},
    )
