"""`peftkit monitor ...`: watch production adapters from the command line or from cron (tables for
people, --json for scripts). `peftkit monitor run` exits 1 when anything alerts, so cron can mail it."""

from __future__ import annotations

import json as _json
import sys
import time
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal

from ..command_args import Positional
from ..errors import PeftkitError, RequestError
from ..registry.store import Registry
from ..registry.traffic import count_samples
from ..registry.watch import Watch, set_watch, watch_of
from ..terminal import printable
from .drift import MIN_SAMPLES, check_drift


def _log(message: str) -> None:
    print(printable(f"peftkit monitor: {message}"), file=sys.stderr, flush=True)


def _signal_rows(signals: list[dict[str, Any]]) -> list[str]:
    rows = [("signal", "statistic", "threshold", "p", "alert")]
    for s in signals:
        p = s.get("p_value")
        rows.append((s["signal"], f"{s['statistic']:.4g}", f"{s['threshold']:.4g}",
                     "" if p is None else f"{p:.2g}", "ALERT" if s["alert"] else "ok"))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def monitor_watch(
    name: str,
    valid_regex: str | None = None,
    valid_schema: Path | None = None,
    window: int | None = None,
    psi: float | None = None,
    alpha: float | None = None,
    max_drop: float | None = None,
    reeval_test: Literal["absolute", "significance"] | None = None,
    user: str | None = None,
    registry: str | None = None,
    json: bool = False,
) -> None:
    """Set what adapter NAME is watched for: an output validity check and the alert thresholds.

    Options not given keep their current value (or the default). The change is in the audit log.

    Args:
        name: the adapter name (as the registry or `peftkit serve --adapters` names it)
        valid_regex: an output is valid when the whole of it (stripped) matches this regular expression
        valid_schema: a JSON schema file: an output is valid when it is JSON that satisfies it
        window: live requests per drift window (default 200)
        psi: the population stability index at which a distribution has shifted (default 0.25)
        alpha: the significance level of the drift tests (default 0.01)
        max_drop: re-evaluation alerts when the score falls this far below its reference (default 0.05)
        reeval_test: absolute: a drop of max_drop alerts; significance: only when a test also rejects
        user: who sets it (default: $PEFTKIT_USER, else the OS user)
        registry: the registry (default: $PEFTKIT_REGISTRY, else ~/.peftkit/registry)
        json: print the settings as JSON
    """
    reg = Registry.open(registry)
    current = (watch_of(reg.db, name) or Watch()).to_dict()
    schema = None
    if valid_schema is not None:
        try:
            schema = _json.loads(Path(valid_schema).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise RequestError(
                f"--valid-schema {valid_schema}: cannot read a JSON schema from it ({e})"
            ) from None
    given = {"valid_regex": valid_regex, "valid_schema": schema, "window": window, "psi": psi, "alpha": alpha,
             "max_drop": max_drop, "reeval_test": reeval_test}  # fmt: skip
    changed = {k: v for k, v in given.items() if v is not None}
    if "valid_regex" in changed:
        changed["valid_schema"] = None  # one validity check: the one given last
    elif "valid_schema" in changed:
        changed["valid_regex"] = None
    watch = set_watch(reg.db, name, Watch.from_dict({**current, **changed}), user=user)
    if json:
        print(_json.dumps(watch.to_dict(), indent=2))
    else:
        print(printable(f"watching {name}: {watch.to_dict()}"))


def monitor_drift(
    name: str,
    window: int | None = None,
    base: str | None = None,
    registry: str | None = None,
    json: bool = False,
) -> int:
    """Check whether adapter NAME's live traffic drifted from its reference.

    The window is the newest captured requests (`peftkit serve --capture RATE`); the reference is the
    name's gate eval set, else the requests captured before the window. Each signal has a statistic, the
    threshold it alerts at, and whether it does; the result is stored in the registry (and exported by
    the servers as peftkit_drift_* metrics). Exits 1 when a signal alerts.

    Args:
        name: the adapter name
        window: how many of the newest captured requests (default: the name's watch setting, 200)
        base: the base model that reads the prompts (default: the one the version records, else the built-in)
        registry: the registry (default: $PEFTKIT_REGISTRY, else ~/.peftkit/registry)
        json: print the result as JSON
    """
    result = check_drift(Registry.open(registry, create=False), name, window=window, base=base, log=_log)
    if json:
        print(_json.dumps(result, indent=2))
    else:
        print(printable(f"{name}: {result['window']['n']} requests against {result['reference']['what']}"))
        for line in _signal_rows(result["signals"]):
            print(printable(line))
        for signal, why in result["skipped"].items():
            print(printable(f"{signal}: skipped, {why}"))
        print("DRIFT: an alert fired" if result["alert"] else "no drift")
    return 1 if result["alert"] else 0


def monitor_reeval(name: str, registry: str | None = None, json: bool = False) -> int:
    """Score adapter NAME's production version on its gate's eval set again, and record the score.

    It alerts (exit 1) when the score is below the gate's min_score, or fell by the name's max_drop from
    the score it passed its gate with (or, promoted with --force, from the previous production version's).

    Args:
        name: the adapter name
        registry: the registry (default: $PEFTKIT_REGISTRY, else ~/.peftkit/registry)
        json: print the result as JSON
    """
    from .reeval import reevaluate

    result = reevaluate(Registry.open(registry, create=False), name, log=_log)
    if json:
        print(_json.dumps(result, indent=2))
    else:
        ref = result["reference"]
        against = f" (reference {ref['score']:.4g}: {ref['what']})" if ref else ""
        print(printable(f"{name}@{result['version']}: {result['metric']} {result['score']:.4g}{against}"))
        for check, ok in result["checks"].items():
            print(printable(f"  {'ok' if ok else 'FAILED'}: {check}"))
    return 1 if result["alert"] else 0


def monitor_run(
    names: Annotated[list[str] | None, Positional()] = None,
    base: str | None = None,
    ab: bool = False,
    rollback: bool = False,
    registry: str | None = None,
    json: bool = False,
) -> int:
    """Run every check: re-evaluation and drift of each watched adapter (for cron or CI).

    Re-evaluation for each adapter in production with a gate; drift for each adapter with captured
    traffic. Results go to the registry, where the servers export them as metrics. Exits 1 when anything
    alerts, 2 when a check could not run (the next run catches up: each one reads the registry as it is).

    Args:
        names: only these adapter names (default: all)
        base: the base model that reads the prompts in drift checks (default: the one each version
            records, else the built-in)
        ab: also decide every route's canary split (`peftkit monitor ab`)
        rollback: with --ab, roll back every canary decided worse (audited; the servers follow)
        registry: the registry (default: $PEFTKIT_REGISTRY, else ~/.peftkit/registry)
        json: print every result as JSON
    """
    from .reeval import reevaluate

    reg = Registry.open(registry, create=False)
    production = sorted({v.name for v in reg.versions() if v.stage == "production" and reg.gate(v.name)})
    captured = sorted(n for n, count in count_samples(reg.db).items() if count >= MIN_SAMPLES and n)
    if names:
        production, captured = [n for n in production if n in names], [n for n in captured if n in names]
    report: dict[str, Any] = {"at": time.time(), "reeval": {}, "drift": {}, "errors": {}}
    checks = (("reeval", production, reevaluate), ("drift", captured, partial(check_drift, base=base)))
    for kind, todo, run in checks:
        for name in todo:
            try:
                report[kind][name] = run(reg, name, log=_log)
            except PeftkitError as e:
                report["errors"][f"{kind} {name}"] = str(e)
                _log(f"{kind} of {name} failed: {e}")
    if ab:
        report["ab"] = _decide_canaries(reg, names, rollback)
        report["errors"].update({f"ab {r}": v["error"] for r, v in report["ab"].items() if "error" in v})
    alerts = [f"{k} {n}" for k in ("reeval", "drift") for n, r in report[k].items() if r["alert"]]
    alerts += [f"ab {n}" for n, r in report.get("ab", {}).items() if r.get("decision") == "rollback"]
    report["alerts"] = alerts
    if json:
        print(_json.dumps(report, indent=2))
    else:
        ran = len(report["reeval"]) + len(report["drift"])
        print(printable(f"ran {ran} checks; alerts: {', '.join(alerts) or 'none'}; "
                        f"failed: {', '.join(report['errors']) or 'none'}"))  # fmt: skip
    return 2 if report["errors"] else 1 if alerts else 0


def monitor_ab(
    route: str,
    stable: str | None = None,
    canary: str | None = None,
    hours: float | None = None,
    alpha: float = 0.05,
    mde: float = 0.05,
    rollback: bool = False,
    user: str | None = None,
    registry: str | None = None,
    json: bool = False,
) -> None:
    """Decide a canary: compare the two arms of ROUTE and say promote, continue or rollback.

    The arms and the start of the comparison are the route's newest canary split in the audit log
    (set through the admin API), or --stable and --canary. Measured: feedback (share of up), validity,
    re-evaluation score, latency and output length, each with a 95% interval and a p-value.

    Args:
        route: the route (a model name requests use) whose traffic the two arms share
        stable: the stable arm's model name (with --canary: instead of the route's split)
        canary: the canary arm's model name
        hours: only the last this many hours (default: since the split was set)
        alpha: the significance level, shared by the guard measures (Bonferroni)
        mde: the smallest difference in the primary rate worth detecting (for "how many more")
        rollback: when the decision is rollback, set the route's canary share to 0 now (audited; every
            server on the registry follows within seconds)
        user: who rolls back (default: $PEFTKIT_USER, else the OS user)
        registry: the registry (default: $PEFTKIT_REGISTRY, else ~/.peftkit/registry)
        json: print the result as JSON
    """
    from .ab import ab_decision

    reg = Registry.open(registry, create=False)
    since = None if hours is None else time.time() - hours * 3600
    result = ab_decision(reg, route, stable=stable, canary=canary, since=since, alpha=alpha, mde=mde)
    if rollback and result["decision"] == "rollback":
        result["rolled_back"] = _roll_back(reg, route, result, user)
    if json:
        print(_json.dumps(result, indent=2))
        return
    print(printable(f"{route}: {result['stable']} (stable) against {result['canary']} (canary)"))
    for key, m in result["measures"].items():
        print(printable(f"  {key}: {m['a']:.4g} -> {m['b']:.4g} (difference {m['difference']:+.4g}, "
                        f"95% [{m['low']:+.4g}, {m['high']:+.4g}], p {m['p']:.2g}, n {m['n_a']}/{m['n_b']})"))  # fmt: skip
    print(printable(f"decision: {result['decision']}: {result['reason']}"))
    if result["more"]:
        more = result["more"]
        print(
            printable(f"  about {more['per_arm']} more {more['unit']} per arm to see a difference of {mde:g}")
        )
    if result.get("rolled_back"):
        print(printable(f"  rolled back: {route} now sends everyone to {result['stable']}"))


def _decide_canaries(reg: Registry, names: list[str] | None, rollback: bool) -> dict[str, Any]:
    """The A/B decision of every route whose newest split has a canary (and its rollback, if asked)."""
    from .ab import ab_decision

    newest: dict[str, Any] = {}
    for entry in reg.history():
        if entry.action == "route":
            newest[entry.name] = entry.details.get("after") or {}
    out: dict[str, Any] = {}
    for route, split in sorted(newest.items()):
        if not split.get("canary") or (names and route not in names):
            continue
        try:
            result = ab_decision(reg, route)
            if rollback and result["decision"] == "rollback":
                result["rolled_back"] = _roll_back(reg, route, result, None)
                _log(f"rolled back the canary of {route}: {result['reason']}")
            out[route] = result
        except PeftkitError as e:
            out[route] = {"error": str(e)}
    return out


def _roll_back(reg: Registry, route: str, result: dict[str, Any], user: str | None) -> dict[str, Any]:
    """Set the route's canary share to 0 in the audit log, which every server routes by."""
    from ..serve.routes import Split, audit_route
    from .ab import route_split

    before, _ = route_split(reg, route)
    after = Split(before["stable"])
    reason = f"peftkit monitor ab: {result['reason']}"
    return audit_route(reg, route, Split(**before), after, user or "", reason)


def monitor_report(
    name: str,
    html: Path | None = None,
    days: float = 30.0,
    overwrite: bool = False,
    registry: str | None = None,
) -> None:
    """Write an HTML page of adapter NAME in production: score, drift and feedback over time.

    One self-contained file (plots inline, nothing fetched): the re-evaluated score per version, each
    drift signal against its threshold, the share of up feedback per day, A/B decisions and the audit log.

    Args:
        name: the adapter name
        html: the HTML page to write (OUT.html)
        days: how far back
        overwrite: replace an existing OUT.html
        registry: the registry (default: $PEFTKIT_REGISTRY, else ~/.peftkit/registry)
    """
    from ..io import unwritable_reason
    from .report import write_report

    if html is None:
        raise RequestError("give the page to write: --html OUT.html")
    out = Path(html)
    if out.exists() and not overwrite:
        raise RequestError(f"{out} exists; give --overwrite to replace it, or another path")
    why = unwritable_reason(out)
    if why:
        raise RequestError(f"cannot write {out}: {why}")
    if not days > 0:
        raise RequestError(f"--days must be above 0, not {days}")
    write_report(Registry.open(registry, create=False), name, out, days)
    print(printable(f"wrote {out}"))
