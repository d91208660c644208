"""Draw the training-time scaling curve of several runs in one figure (sigma against epoch, tree and chain).

    python benchmarks/train_plot_scaling.py --runs eaglevlm=out/eaglevlm/metrics.json \
        specvlm=out/specvlm/metrics.json --out results/train_scaling_curve.png
"""

from __future__ import annotations

import argparse
import json


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", required=True, help="name=metrics.json pairs")
    parser.add_argument("--title", default="mini VLM drafts: sigma against training epochs (H100)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for (name, path), colour in zip(
        (pair.split("=", 1) for pair in args.runs), ("tab:blue", "tab:orange", "tab:green")
    ):
        metrics = json.load(open(path))
        evals = metrics["eval"]
        for mode, style in (("tree", "-"), ("chain", "--")):
            points = [(e["epoch"], e["sigma"][mode]) for e in evals if mode in e["sigma"]]
            if points:
                left.plot(*zip(*points), style, marker="o", color=colour, label=f"{name} ({mode})")
        right.plot(
            [e["epoch"] for e in evals],
            [e["depth_agreement"][0] for e in evals],
            "-",
            marker="o",
            color=colour,
            label=f"{name} depth 1",
        )
        right.plot(
            [e["epoch"] for e in evals],
            [e["depth_agreement"][-1] for e in evals],
            ":",
            marker="s",
            color=colour,
            label=f"{name} depth {len(evals[0]['depth_agreement'])}",
        )
    left.set_xlabel("epoch")
    left.set_ylabel("sigma: accepted tokens per target forward")
    left.set_title(args.title, fontsize=10)
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    right.set_xlabel("epoch")
    right.set_ylabel("top-1 agreement with the target (held out)")
    right.set_ylim(0, 1)
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
