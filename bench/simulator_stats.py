"""Measure the galvanizing-line simulator: NOK share, speed, and what each drift scenario moves.

    python bench/simulator_stats.py [--coils 2000] [--seeds 0 1 2 3 4] [--no-docs]

Prints the figures, writes one plot per scenario to ``docs/img/sim_<scenario>.png`` and rewrites the
numbers in ``docs/simulator.md`` between ``<!-- stats:begin -->`` and ``<!-- stats:end -->``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ml.dataset import CoilDataset  # noqa: E402
from ml.sim import SCENARIOS, DriftConfig, LineConfig, LineSimulator, SimCoil, coils_to_dataset, gold_set  # noqa: E402
from ml.sim import stats as st  # noqa: E402

DOC = ROOT / "docs" / "simulator.md"
IMG = ROOT / "docs" / "img"
BEGIN, END = "<!-- stats:begin -->", "<!-- stats:end -->"

# Drift timeline of every scenario run: off until START, full after START + RAMP.
START, RAMP, AFTER = 1000, 300, 1200


def scenario_stat(scenario: str, ds: CoilDataset, sim: LineSimulator) -> tuple[str, np.ndarray]:
    """The per-coil statistic a scenario claims to move: (its name, one value per coil)."""
    if scenario == "sensor-drift":
        cols = list(sim.drifted_sensors)
        return f"offset of drifted gauges {cols} vs their side", st.sensor_offsets(ds.X)[:, cols]
    if scenario == "knife-wear":
        return "edge/centre coating ratio", st.edge_centre_ratio(ds.X)
    if scenario == "product-mix":
        return "Z100 share", (ds.column("coating") == "Z100").astype(float)
    return "one-sided transverse band share", st.transverse_band(ds.X).astype(float)


def table_head(names: list[str]) -> str:
    return "| " + " | ".join(names) + " |\n|" + " --- |" * len(names)


def fmt(v: np.ndarray | float) -> str:
    return " / ".join(f"{x:.3f}" for x in np.atleast_1d(np.asarray(v, dtype=float)))


def default_line(seeds: list[int], n: int) -> tuple[list[dict], float]:
    rows, took, made = [], 0.0, 0
    for seed in seeds:
        sim = LineSimulator(LineConfig(seed=seed))
        t = time.perf_counter()
        coils = sim.take(n)
        took += time.perf_counter() - t
        made += n
        y = np.array([c.label for c in coils])
        yt = np.array([c.true_label for c in coils])
        b = np.array([c.borderline for c in coils])
        causes = Counter(
            "+".join(sorted(set(c.defects) & {"clog", "tilt", "speed-transient"})) or "other"
            for c in coils
            if c.true_label
        )
        rows.append(
            {
                "seed": seed,
                "operator": y.mean(),
                "true": yt.mean(),
                "borderline_nok": b[yt == 1].mean() if yt.any() else float("nan"),
                "flipped": (y != yt).mean(),
                "causes": causes,
                "minutes": np.median(np.diff([c.produced_at.timestamp() for c in coils])) / 60,
                "nan": np.mean([np.isnan(c.thickness).mean() for c in coils]),
            }
        )
    return rows, made / took


def run_scenario(scenario: str, seed: int) -> dict:
    sim = LineSimulator(LineConfig(seed=seed, drift=DriftConfig(scenario, start=START, ramp=RAMP)))
    coils = sim.take(START + RAMP + AFTER)
    ds = coils_to_dataset(coils, sim)
    name, values = scenario_stat(scenario, ds, sim)
    before, after = slice(0, START), slice(START + RAMP, None)
    yt = ds.column("y_true").astype(float)
    return {
        "scenario": scenario,
        "coils": coils,
        "name": name,
        "values": values,
        "before": np.nanmean(values[before], axis=0),
        "after": np.nanmean(values[after], axis=0),
        "nok_before": (ds.y[before].mean(), yt[before].mean()),
        "nok_after": (ds.y[after].mean(), yt[after].mean()),
        "stripe": (st.apparent_stripe(ds.X[before]).mean(), st.apparent_stripe(ds.X[after]).mean()),
        "details": sim.drift_details(),
    }


def pick(coils: list[SimCoil], scenario: str) -> tuple[SimCoil, SimCoil]:
    """(before, after): after the drift a coil that shows it; before a clean OK coil, of the same class if possible."""
    want = {
        "sensor-drift": lambda c: c.true_label == 0 and "clog" not in c.defects,
        "knife-wear": lambda c: c.true_label == 1 and "edge-streak" not in c.defects,
        "product-mix": lambda c: c.product["coating"] == "Z100" and c.true_label == 0,
        "new-defect": lambda c: "pressure-surge" in c.defects and c.true_label == 1,
    }[scenario]
    after_pool, before_pool = coils[START + RAMP :], coils[:START]
    after = next((c for c in after_pool if want(c)), after_pool[0])
    clean = [c for c in before_pool if c.true_label == 0 and not set(c.defects) - {"dropout", "speed-transient"}]
    same = [c for c in clean if c.product["coating"] == after.product["coating"]]
    return (same or clean or before_pool)[0], after


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenario, coils = result["scenario"], result["coils"]
    fig = plt.figure(figsize=(12.5, 4.4), constrained_layout=True)
    gs = fig.add_gridspec(1, 3, width_ratios=[1, 1, 2.0])
    for k, (coil, title) in enumerate(zip(pick(coils, scenario), ("before", "after"), strict=True)):
        ax = fig.add_subplot(gs[0, k])
        vmin, vmax = np.nanpercentile(coil.thickness, [1, 99.5])
        im = ax.imshow(coil.thickness, aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.axvline(8.5, color="w", lw=0.8)
        lab = "NOK" if coil.true_label else "OK"
        ax.set_title(f"{title}: {coil.coil_id}\n{coil.product['coating']}, {lab}", fontsize=9)
        ax.set_xlabel("sensor (top | bottom)", fontsize=8)
        if k == 0:
            ax.set_ylabel("section (head → tail)", fontsize=8)
        fig.colorbar(im, ax=ax, label="g/m² per side", fraction=0.08, pad=0.02)
    ax = fig.add_subplot(gs[0, 2])
    values = np.asarray(result["values"], dtype=float)
    values = values if values.ndim == 2 else values[:, None]
    w = 50 if scenario in ("sensor-drift", "knife-wear") else 150
    for j in range(values.shape[1]):
        v = values[:, j]
        ok = np.isfinite(v)
        smooth = np.convolve(np.where(ok, v, 0), np.ones(w), "valid")
        smooth /= np.maximum(np.convolve(ok, np.ones(w), "valid"), 1)
        ax.plot(np.arange(len(smooth)) + w // 2, smooth, lw=1.2)
    ax.axvspan(START, START + RAMP, color="orange", alpha=0.15, label="drift ramp")
    ax.axvline(START, color="orange", lw=0.8)
    ax.set_xlabel("coil index")
    ax.set_title(f"{scenario}: {result['name']}", fontsize=9)
    ax.set_ylabel(f"mean of {w} coils", fontsize=8)
    ax.legend(fontsize=8, loc="best")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--coils", type=int, default=2000, help="coils per seed for the default line")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--scenario-seed", type=int, default=7)
    ap.add_argument("--no-docs", action="store_true", help="print only; write neither plots nor docs")
    args = ap.parse_args()

    lines: list[str] = []
    out = lines.append
    cmd = "python bench/simulator_stats.py " + " ".join(sys.argv[1:])
    out(
        f"Measured with `{cmd.strip()}` on {platform.machine()} ({os.cpu_count()} cores), "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, numpy {np.__version__}."
    )
    out("")

    rows, speed = default_line(args.seeds, args.coils)
    out(
        f"**Default line** ({args.coils} coils per seed). Generation speed: **{speed:,.0f} coils/s** "
        f"(one process; {args.coils * len(args.seeds) / speed:.1f} s for all {args.coils * len(args.seeds)})."
    )
    out("")
    head = ["seed", "NOK share (operator)", "NOK share (true)", "borderline among true NOK", "labels flipped"]
    out(table_head([*head, "min/coil", "NaN share"]))
    for r in rows:
        out(
            f"| {r['seed']} | {r['operator']:.2%} | {r['true']:.2%} | {r['borderline_nok']:.1%} "
            f"| {r['flipped']:.2%} | {r['minutes']:.1f} | {r['nan']:.2%} |"
        )
    op = np.mean([r["operator"] for r in rows])
    tr = np.mean([r["true"] for r in rows])
    out(f"| **mean** | **{op:.2%}** | **{tr:.2%}** | | | | |")
    causes = sum((r["causes"] for r in rows), Counter())
    total = sum(causes.values())
    out("")
    out(
        "What made the true NOK coils NOK (events present on the coil): "
        + ", ".join(f"{k} {v / total:.0%}" for k, v in causes.most_common())
        + "."
    )
    out("")

    out(
        f"**Drift scenarios** (seed {args.scenario_seed}; drift starts at coil {START}, ramps over {RAMP} coils, "
        f"severity 1; *before* = coils 0–{START - 1}, *after* = the {AFTER} coils after the ramp)."
    )
    out("")
    head = ["scenario", "statistic", "before", "after", "NOK share before (operator / true)"]
    out(table_head([*head, "after (operator / true)", "apparent-stripe share before → after"]))
    results = []
    for scenario in SCENARIOS:
        r = run_scenario(scenario, args.scenario_seed)
        results.append(r)
        out(
            f"| `{scenario}` | {r['name']} | {fmt(r['before'])} | {fmt(r['after'])} "
            f"| {r['nok_before'][0]:.2%} / {r['nok_before'][1]:.2%} "
            f"| {r['nok_after'][0]:.2%} / {r['nok_after'][1]:.2%} "
            f"| {r['stripe'][0]:.1%} → {r['stripe'][1]:.1%} |"
        )
        if not args.no_docs:
            IMG.mkdir(parents=True, exist_ok=True)
            plot(r, IMG / f"sim_{scenario}.png")
    sd = next(r for r in results if r["scenario"] == "sensor-drift")["details"]
    out("")
    out(f"Sensor-drift gauges on this line: {sd.get('sensors')}, gain errors at full level {sd.get('gains_at_full')}.")

    t = time.perf_counter()
    gold = gold_set(seed=args.scenario_seed)
    took = time.perf_counter() - t
    b = gold.column("borderline").astype(bool)
    out("")
    out(
        f"**Gold set** (`gold_set(seed={args.scenario_seed})`): {len(gold)} coils ({gold.n_nok} NOK), found in "
        f"{gold.meta['coils_scanned']} coils of the later period in {took:.1f} s; borderline: "
        f"{b[gold.y == 1].sum()} NOK and {b[gold.y == 0].sum()} OK coils."
    )

    text = "\n".join(lines)
    print(text)
    if not args.no_docs:
        doc = DOC.read_text()
        if BEGIN not in doc or END not in doc:
            raise SystemExit(f"{DOC} has no {BEGIN} … {END} section")
        head, rest = doc.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        DOC.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")
        print(f"\nwrote {DOC.relative_to(ROOT)} and {len(SCENARIOS)} plots in {IMG.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
