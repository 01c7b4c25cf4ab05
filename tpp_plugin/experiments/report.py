r"""The output of ``python -m tpp_plugin reproduce``: the tables printed on the terminal (accuracy,
the per-layer firing diagnostic, spikes and energy, the calibration times and report) and the
PNG of a configuration's result, all read from the JSON-ready result dict.
"""

from __future__ import annotations

from ..calibration import format_report

__all__ = [
    "format_accuracy_table",
    "format_diagnostic_table",
    "format_spike_table",
    "format_calibration_times",
    "format_calibration_report",
    "plot_result",
]


# ------------------------------------------------------------------------------------------------
# the tables and the plot of a configuration
# ------------------------------------------------------------------------------------------------
def _rows(result) -> dict:
    """``{label: [(mean, std), ...]}`` in display order, the ANN rows first."""
    Ts = result["config"]["T"]
    ann = result["ann"]
    L = result["config"]["L"]
    rows = {(f"ANN (QCFS, L={L})" if L else "ANN (ReLU)"): [(ann["accuracy"], 0.0)] * len(Ts)}
    if "accuracy_L_eq_T" in ann:
        rows["ANN with L=T"] = [(a, 0.0) for a in ann["accuracy_L_eq_T"]]
    for v in result["variants"].values():
        rows[v["label"]] = list(zip(v["mean"], v["std"]))
    return rows


def format_accuracy_table(result) -> str:
    """Accuracy (%) per variant and ``T``, ``mean±std`` over seeds for stochastic variants."""
    cfg = result["config"]
    Ts = cfg["T"]
    rows = _rows(result)
    width = max(len(k) for k in rows) + 2
    head = f"{'':<{width}}" + "".join(f"{f'T={T}':>11}" for T in Ts)
    seeds = f"mean±std over {cfg['seeds']} seed(s)" if cfg["seeds"] > 1 else "1 seed"
    title = (f"{cfg['dataset']} {cfg['model']} ({cfg['spiking_layers']} spiking layers), "
             f"{cfg['ann']} → {cfg.get('conversion', cfg['framework'])}; test accuracy %, "
             f"{seeds}")
    lines = [title, head, "-" * len(head)]
    for label, cells in rows.items():
        text = "".join(
            (f"{100 * m:.1f}±{100 * s:.1f}" if s else f"{100 * m:.1f}").rjust(11)
            for m, s in cells
        )
        lines.append(f"{label:<{width}}{text}")
    if "calibration" in result:
        lines.append(format_calibration_times(result))
    if "oracle" in result:
        o = result["oracle"]
        agreement = ", ".join(f"{100 * a:.2f}%" for a in o["agreement_min_over_seeds"])
        lines.append(f"TPP exact == ANN with L=T image for image: {o['holds']} "
                     f"(agreement per T: {agreement})")
    return "\n".join(lines)


def format_diagnostic_table(result, T: int) -> str:
    """Per-layer share (%) of over-/under-firing neurons at one ``T``, as ``over/under``."""
    Ts = result["config"]["T"]
    i = Ts.index(T)
    variants = list(result["variants"].values())
    n_layers = len(variants[0]["diagnostic"])
    width = max(len(v["label"]) for v in variants) + 2
    head = f"{'':<{width}}" + "".join(f"{f'layer {j + 1}':>12}" for j in range(n_layers))
    lines = [f"spike count vs round(Σx/θ) at T={T}: % of neurons over-firing/under-firing",
             head, "-" * len(head)]
    for v in variants:
        cells = "".join(
            f"{100 * d['over'][i]:.1f}/{100 * d['under'][i]:.1f}".rjust(12)
            for d in v["diagnostic"]
        )
        lines.append(f"{v['label']:<{width}}{cells}")
    return "\n".join(lines)


def format_spike_table(result) -> str:
    """Spikes and synaptic operations (SOPs) per image per variant and ``T`` (mean over seeds),
    and the SNN's energy estimate against the ANN's."""
    cfg, ann = result["config"], result["ann"]
    Ts = cfg["T"]
    variants = [v for v in result["variants"].values() if "spikes_per_image" in v]
    if not variants:
        return ""
    width = max(len(v["label"]) for v in variants) + 2
    head = f"{'':<{width}}" + "".join(f"{f'T={T}':>19}" for T in Ts)

    def cell(spikes, sops):
        return "—".rjust(19) if spikes is None else f"{spikes:,.0f} / {sops:,.0f}".rjust(19)

    energy = cfg.get("energy_pj", {})
    lines = [f"spikes / SOPs per image (SOP = a spike reaching a synapse); ANN: "
             f"{ann.get('macs_per_image', 0):,} MACs per image", head, "-" * len(head)]
    for v in variants:
        cells = "".join(cell(a, b) for a, b in zip(v["spikes_per_image"], v["sops_per_image"]))
        lines.append(f"{v['label']:<{width}}{cells}")
    if energy and ann.get("energy_pj_per_image"):
        lines.append(f"energy per image, {energy['accumulate']} pJ/AC and "
                     f"{energy['multiply_accumulate']} pJ/MAC: ANN "
                     f"{ann['energy_pj_per_image'] / 1e3:,.1f} nJ; SNN as % of the ANN:")
        for v in variants:
            cells = "".join(("—" if e is None else f"{100 * e / ann['energy_pj_per_image']:.1f}%")
                            .rjust(19) for e in v["energy_pj_per_image"])
            lines.append(f"{v['label']:<{width}}{cells}")
    return "\n".join(lines)


def plot_result(result, path: str, diag_T: int) -> None:
    """Accuracy vs ``T`` (log-2 axis, error bars = std over seeds) and the per-layer diagnostic
    at ``diag_T``, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result["config"]
    Ts = cfg["T"]
    fig, (ax, ax2, ax3) = plt.subplots(1, 3, figsize=(19, 4.8),
                                       gridspec_kw={"width_ratios": [3, 2, 3]})
    colors = {}
    lines = _line_styles(result)  # calibration rows: colour per recipe, line style per neuron
    for label, cells in _rows(result).items():
        means = [100 * m for m, _ in cells]
        stds = [100 * s for _, s in cells]
        style = {"linestyle": "--", "color": "black" if label.startswith("ANN (") else "gray"} \
            if label.startswith("ANN") else {"marker": "o", "markersize": 3, **lines.get(label, {})}
        bars = ax.errorbar(Ts, means, yerr=stds, label=label, capsize=2, **style)
        colors[label] = bars.lines[0].get_color()
    ax.set_xscale("log", base=2)
    ax.set_xticks(Ts, [str(T) for T in Ts])
    ax.set_xlabel("time steps T")
    ax.set_ylabel("test accuracy (%)")
    detail = (f" L={cfg['L']}" if cfg["L"] else f" mode={cfg['mode']}" if cfg.get("mode")
              else " calibration: " + ", ".join(cfg.get("calibration") or []))
    ax.set_title(f"{cfg['dataset']} {cfg['model']} {cfg['ann']}{detail}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    i = Ts.index(diag_T)
    for v in result["variants"].values():
        layers = range(1, len(v["diagnostic"]) + 1)
        style = lines.get(v["label"], {})
        line, = ax2.plot(layers, [100 * d["under"][i] for d in v["diagnostic"]], marker="v",
                         label=v["label"], **style)
        ax2.plot(layers, [100 * d["over"][i] for d in v["diagnostic"]], marker="^",
                 **({"linestyle": ":"} if not style else {"linestyle": style["linestyle"],
                                                          "alpha": 0.5}),
                 color=line.get_color())
    ax2.set_xticks(list(layers))
    ax2.set_xlabel("spiking layer")
    ax2.set_ylabel("% of neurons (▼ under-firing, ^ over-firing)")
    ax2.set_title(f"count ≠ round(Σx/θ) at T={diag_T}", fontsize=10)
    ax2.grid(alpha=0.3)
    for v in result["variants"].values():  # accuracy against the spike budget, per variant
        points = [(s, 100 * m) for s, m in zip(v.get("spikes_per_image", []), v["mean"])
                  if s is not None and s > 0]
        if points:
            ax3.plot(*zip(*points), marker="o", markersize=3, label=v["label"],
                     **{"color": colors.get(v["label"]), **lines.get(v["label"], {})})
    if ax3.lines:
        ax3.set_xscale("log")
    ax3.axhline(100 * result["ann"]["accuracy"], linestyle="--", color="black", linewidth=1)
    ax3.set_xlabel("spikes per image (points: T)")
    ax3.set_ylabel("test accuracy (%)")
    ax3.set_title("accuracy vs spikes per image", fontsize=10)
    ax3.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _line_styles(result) -> dict:
    """``{label: {'color', 'linestyle'}}`` of the rows of a calibration comparison (colour per
    recipe, line style per neuron); ``{}`` otherwise."""
    if "calibration" not in result:
        return {}
    recipes = list(result["config"]["calibration"])
    dashes = {None: "-", "exact": "--", "bernoulli": ":", "unbiased": "-."}
    return {v["label"]: {"color": f"C{recipes.index(v['recipe']) % 10}",
                         "linestyle": dashes.get(v["count"], "-")}
            for v in result["variants"].values()}


# ------------------------------------------------------------------------------------------------
# calibration recipes side by side (reproduce_calibration)
# ------------------------------------------------------------------------------------------------
def format_calibration_times(result) -> str:
    """One line: the calibration time of each recipe (per ``T`` for ``tpp``)."""
    calib = result["calibration"]
    parts = []
    for recipe, rec in calib["recipes"].items():
        if rec["per_T"]:
            times = ", ".join(f"T={T} {s:.2f}" for T, s in zip(result["config"]["T"],
                                                              rec["seconds"]))
            parts.append(f"{recipe} {times} s")
        else:
            parts.append(f"{recipe} {rec['seconds']:.2f} s")
    return (f"calibration time (conversion wall clock, {calib['images']} calibration images): "
            + "; ".join(parts))


def format_calibration_report(result, T: int) -> str:
    """The ``tpp`` calibration's per-layer report at ``T`` (``''`` without ``tpp``)."""
    rec = result["calibration"]["recipes"].get("tpp")
    if rec is None:
        return ""
    report = rec["reports"][result["config"]["T"].index(T)]
    return (f"tpp calibration for T={T}, per layer (θ, output step s and references: median "
            f"[min, max] over channels):\n" + format_report(report))
