"""Draw a run's validation curves from its metrics.jsonl (README, Watching a run): the validation MSE at each t of
zd.VAL_T against the step, for the UNet and the EMA, and the min-SNR-weighted totals beside training's loss.

    python img/plot_validation.py runs/demo img/validation.png

Needs matplotlib (pip install matplotlib); zd itself does not.
"""
import json
import sys

try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    sys.exit("plot_validation.py needs matplotlib: pip install matplotlib")


def main(run, out):
    lines = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
    val = [m for m in lines if "val_loss" in m]
    if not val:
        sys.exit(f"{run}/metrics.jsonl has no validation line: train with --val-data or --val-fraction")
    train = [m for m in lines if "loss" in m]
    ts = list(val[0]["val_loss_by_t"])
    steps = [m["step"] for m in val]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), constrained_layout=True)
    colours = plt.cm.viridis([i / (len(ts) - 1) for i in range(len(ts))])
    for ax, name, label in ((axes[0], "val", "UNet"), (axes[1], "val_ema", "EMA")):
        for t, colour in zip(ts, colours):
            ax.plot(steps, [m[f"{name}_loss_by_t"][t] for m in val], color=colour, label=f"t = {t}",
                    lw=2.5 if t == ts[-1] else 1.2)
        ax.set(title=f"validation MSE per t, {label}", xlabel="step", yscale="log")
    axes[0].legend(fontsize=7, ncol=2)
    axes[2].plot([m["step"] for m in train], [m["loss"] for m in train], color="0.7", lw=0.8,
                 label="training (its batches)")
    axes[2].plot(steps, [m["val_loss"] for m in val], "o-", label="validation, UNet")
    axes[2].plot(steps, [m["val_ema_loss"] for m in val], "s-", label="validation, EMA")
    axes[2].set(title="min-SNR-weighted loss", xlabel="step", yscale="log")
    axes[2].legend(fontsize=8)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(*sys.argv[1:])
