"""Issue 19, folds: per fold the LP-FT default's last-epoch validation accuracy, its rivals', the probe's and the
WiSE-FT line; means over folds and paired differences to the default (fold 0 from the baseline commit)."""
import json, subprocess, sys, math
import numpy as np
shown = json.load(open(sys.argv[1])); repo = "/work/ref4"
def get(d, dotted):
    for k in dotted.split("."):
        d = (d or {}).get(k)
    return d
def curve(rev):
    try:
        text = subprocess.run(["git", "show", f"{rev}:metrics/train_finetune_holdout/interpolation.csv"], cwd=repo, capture_output=True, text=True, check=True).stdout
    except subprocess.CalledProcessError:
        return None
    return {round(float(l.split(",")[0]), 1): float(l.split(",")[1]) for l in text.splitlines()[1:]}
rows = {}
for commit in shown:
    entries = [commit] + [e["revs"][0] for e in commit.get("experiments") or []]
    for r in entries:
        if r.get("rev") == "workspace": continue
        name = r.get("name") or r["rev"][:7]
        m = (r.get("data") or {}).get("metrics") or {}
        ft = (m.get("metrics/train_finetune_holdout/metrics.json") or {}).get("data") or {}
        pr = (m.get("metrics/train_probe/metrics.json") or {}).get("data") or {}
        fold = get((r.get("data") or {}).get("params", {}).get("params.yaml", {}).get("data"), "data.val_fold")
        rows[name] = dict(ft=get(ft, "val.acc"), probe=pr.get("best/val_acc"), C=pr.get("best/C"), fold=fold, curve=curve(r["rev"]), wall=ft.get("wall_time_s"))
base = [n for n in rows if not n.startswith(("ft_", "scratch_"))]
print("baseline:", base)
folds = {0: base[0], **{f: f"ft_fold{f}" for f in range(1, 6)}}
def pct(x): return f"{100*x:.2f}"
def mean_se(xs):
    xs = np.array(xs); return xs.mean(), (xs.std(ddof=1) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan"))
print("fold | default | eval256 | ema99 | probe (flip) C | WiSE-FT w=0..1")
done = [f for f in folds if folds[f] in rows and rows[folds[f]]["ft"] is not None]
for f in done:
    d = rows[folds[f]]; e = rows.get(f"ft_eval256_fold{f}", {}); a = rows.get(f"ft_ema99_fold{f}", {})
    print(f, pct(d["ft"]), e.get("ft") and pct(e["ft"]), a.get("ft") and pct(a["ft"]), pct(d["probe"]), d["C"], " ".join(pct(v) for v in (d["curve"] or {}).values()))
for label, key in (("eval256", "ft_eval256_fold"), ("ema99", "ft_ema99_fold")):
    fs = [f for f in done if f > 0 and rows.get(f"{key}{f}", {}).get("ft") is not None]
    if fs:
        diff = [rows[f"{key}{f}"]["ft"] - rows[folds[f]]["ft"] for f in fs]
        m, se = mean_se(diff); print(f"{label} vs default on folds {fs}: {100*m:+.2f} ± {100*se:.2f}; default mean there {pct(np.mean([rows[folds[f]]['ft'] for f in fs]))}, rival {pct(np.mean([rows[f'{key}{f}']['ft'] for f in fs]))}")
m, se = mean_se([rows[folds[f]]["ft"] for f in done]); print(f"default over folds {done}: {pct(m)} ± {pct(se)}")
m, se = mean_se([rows[folds[f]]["probe"] for f in done]); print(f"probe over folds {done}: {pct(m)} ± {pct(se)}")
for w in [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]:
    vals = [rows[folds[f]]["curve"][w] for f in done]
    diff = [v - rows[folds[f]]["curve"][1.0] for v, f in zip(vals, done)]
    m, se = mean_se(vals); dm, dse = mean_se(diff)
    print(f"w={w}: {pct(m)} ± {pct(se)}  vs w=1 {100*dm:+.2f} ± {100*dse:.2f}")
