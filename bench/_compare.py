"""chatsrv against the naive relay (``bench._reference``): the upstream patterns both are measured
at, and chatsrv's ratio to the relay for every figure.

A pattern is named ``steady<R>`` (every stream gets R tokens/s, one token per upstream write) or
``burst<R>`` / ``burst<R>x<N>`` (R tokens/s on average, in irregular groups of up to N tokens
per write, N from ``--burst`` when not named; see ``bench._script.BURSTS``). Every pattern's
streams last as long as ``--tokens`` tokens take at 50 tokens/s (200: 3.98 s), so a faster
pattern sends more tokens per stream (steady200: 800), and every window holds the same
plateau of active streams.

The ratio of a figure is chatsrv's over the reference's (below 1: chatsrv needs less, or is
faster), both taken in the same sitting, one worker, as the median over the repeats of each;
``paired`` is the range of the ratios of each repeat's two phases, which ran one after the other
(the reference first), so the machine's drift affects both alike. The knee's ratio is the
other way round in meaning (above 1: chatsrv carries more streams); a server that passed every
level of the ramp has a knee that is only a lower bound, and the row says so
(``reference_censored``, ``chatsrv_censored``; the table shows such a knee as ``≥N``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from statistics import median
from typing import Any

from bench._script import Script

# The rate that ``--tokens`` is given for: a pattern at rate R sends tokens * R / BASE_RATE.
BASE_RATE = 50.0
_NAME = re.compile(r"^(?P<kind>steady|burst)(?P<rate>\d+(?:\.\d+)?)(?:x(?P<burst>\d+))?$")

# The figures compared, as keys of a phase's summary, and how the ratio table names them.
FIGURES = {
    "server_cpu_us_per_token": "CPU µs/token",
    "added_latency_ms_p50": "added p50 ms",
    "added_latency_ms_p99": "added p99 ms",
    "ttfd_ms_p99": "ttfd p99 ms",
    "rss_kb_per_stream": "RSS KB/stream",
}
KNEE = "knee_streams"


@dataclass(frozen=True)
class Pattern:
    name: str
    rate: float  # tokens/s per stream, on average
    burst: int = 1  # tokens per upstream write, at most

    def script(self, tokens_at_base: int) -> Script:
        return Script(
            tokens=max(1, round(tokens_at_base * self.rate / BASE_RATE)),
            interval_s=1.0 / self.rate,
            burst=self.burst,
        )

    def describe(self, tokens_at_base: int) -> dict[str, Any]:
        script = self.script(tokens_at_base)
        return {"name": self.name, "rate": self.rate, "burst": self.burst, "tokens": script.tokens}


def pattern(name: str, burst: int) -> Pattern:
    """The pattern a name stands for; ``burst`` is the group size of a ``burst<R>`` name."""
    found = _NAME.match(name.strip())
    if found is None:
        raise ValueError(f"{name!r}: a pattern is steady<R>, burst<R> or burst<R>x<N>")
    rate = float(found["rate"])
    if rate <= 0:
        raise ValueError(f"{name!r}: the rate must be positive")
    if found["kind"] == "steady":
        return Pattern(name.strip(), rate)
    return Pattern(name.strip(), rate, int(found["burst"] or burst))


def patterns(names: str | None, rates: list[float], burst: int) -> list[Pattern]:
    """``--patterns`` when given, else a steady pattern per ``--rates`` and ``burst50``."""
    if names is None:
        listed = [f"steady{rate:g}" for rate in rates] + ["burst50"]
    else:
        listed = [name for name in names.split(",") if name.strip()]
    return [pattern(name, burst) for name in dict.fromkeys(listed)]


def summary(phase: dict[str, Any]) -> dict[str, Any]:
    """The figures of a phase that repeats are summarized by, and compared on."""
    return {
        "server_cpu_us_per_token": phase.get("server_cpu_us_per_token"),
        "added_latency_ms_p50": (phase.get("added_latency_ms") or {}).get("p50"),
        "added_latency_ms_p99": (phase.get("added_latency_ms") or {}).get("p99"),
        "ttfd_ms_p99": (phase.get("ttfd_ms") or {}).get("p99"),
        "rss_kb_per_stream": (phase.get("rss") or {}).get("kb_per_stream"),
        "tokens_per_s": phase.get("tokens_per_s"),
        "machine_busy_pct": phase.get("machine_busy_pct"),
        "foreign_cpu_cores": phase.get("foreign_cpu_cores"),
        "errors": phase["errors"],
    }


def standing(repeats: list[dict[str, Any]]) -> dict[str, Any]:
    """The repeat with the median CPU per token: it stands for the phase."""
    ordered = sorted(repeats, key=lambda p: p.get("server_cpu_us_per_token") or 0.0)
    return ordered[len(ordered) // 2]


def _median(values: list[Any]) -> float | None:
    present = [v for v in values if v is not None]
    return median(present) if present else None


def _ratio(value: float | None, basis: float | None) -> float | None:
    return value / basis if value is not None and basis is not None and basis > 0 else None


def ratios(
    reference: dict[str, dict[str, Any]],
    chatsrv: dict[str, dict[str, Any]],
    knees: tuple[int | None, int | None, bool, bool] | None = None,
    ramp_pattern: str | None = None,
) -> list[dict[str, Any]]:
    """One row per pattern and figure: the reference's value, chatsrv's, and the ratio.
    ``reference``/``chatsrv`` map a pattern's name to ``{"repeats": [summaries]}``; ``knees``
    is (the reference's knee, chatsrv's, and whether each is only a lower bound)."""
    rows: list[dict[str, Any]] = []
    for name in reference.keys() & chatsrv.keys():
        ref_repeats = reference[name]["repeats"]
        our_repeats = chatsrv[name]["repeats"]
        for key, label in FIGURES.items():
            ref = _median([r.get(key) for r in ref_repeats])
            ours = _median([r.get(key) for r in our_repeats])
            paired = [
                ratio
                for a, b in zip(ref_repeats, our_repeats, strict=False)
                if (ratio := _ratio(b.get(key), a.get(key))) is not None
            ]
            rows.append(
                {
                    "pattern": name,
                    "figure": key,
                    "label": label,
                    "reference": ref,
                    "chatsrv": ours,
                    "ratio": _ratio(ours, ref),
                    "paired": [min(paired), max(paired)] if len(paired) > 1 else None,
                }
            )
    order = list(reference)
    rows.sort(key=lambda r: (order.index(r["pattern"]), list(FIGURES).index(r["figure"])))
    if knees is not None and ramp_pattern is not None:
        ref_knee, our_knee, ref_censored, our_censored = knees
        rows.append(
            {
                "pattern": ramp_pattern,
                "figure": KNEE,
                "label": "knee streams",
                "reference": ref_knee,
                "chatsrv": our_knee,
                "ratio": _ratio(our_knee, ref_knee),
                "paired": None,
                "reference_censored": ref_censored,
                "chatsrv_censored": our_censored,
            }
        )
    return rows


def find(rows: list[dict[str, Any]], pattern_name: str, figure: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["pattern"] == pattern_name and r["figure"] == figure), None)


def table(rows: list[dict[str, Any]]) -> str:
    """The ratio table: pattern by figure, the reference, chatsrv, and chatsrv's ratio."""
    lines = [
        f"{'pattern':<12} {'figure':<14} {'reference':>10} {'chatsrv':>10} {'ratio':>8}  paired"
    ]
    for row in rows:
        ref = ("≥" if row.get("reference_censored") else "") + _f(row["reference"])
        ours = ("≥" if row.get("chatsrv_censored") else "") + _f(row["chatsrv"])
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}x"
        if row["ratio"] is not None and row.get("reference_censored"):
            ratio = ("?" if row.get("chatsrv_censored") else "≤") + ratio
        elif row["ratio"] is not None and row.get("chatsrv_censored"):
            ratio = "≥" + ratio
        paired = row.get("paired")
        shown = f"{paired[0]:.2f} to {paired[1]:.2f}" if paired else ""
        lines.append(
            f"{row['pattern']:<12} {row['label']:<14} {ref:>10} {ours:>10} {ratio:>8}  {shown}"
        )
    return "\n".join(lines)


def _f(value: float | None) -> str:
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.1f}"
