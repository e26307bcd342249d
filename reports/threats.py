"""The threat-tier views of a results file (``view=threats`` and ``view=threats-verdict`` blocks; reports/readme.py).

A trigger-activated watermark (SleeperMark, WDM) is read per model attack, with the attack's threat tier (what it
knows of the defence: ``blind``, ``method_known``, ``trigger_known``; a declared class attribute, read from the
registry where the file does not record it), its recorded cost, the verifier's TPR and the evasion rate ``1 - TPR``
with 95% intervals, the random-string control (``random_trigger_wake@<fpr>``, the ``trigger_specificity`` metric)
and the attacked model's quality on ordinary prompts: its ``[no_trigger]`` row's FID and CLIP score against the
clean base model's images of the same prompts and seeds. *Usable*: that FID at most :data:`FID_BAR` times, and that
CLIP score at least :data:`CLIP_BAR` times, the unattacked watermarked model's. *Evades and usable*: the evasion
rate in a usable cell, 0 in an unusable one.

``view=threats-verdict`` says the same in sentences: which attacks break each defence (TPR below
:data:`BROKEN_BELOW`), at which tier and at what quality cost, and which do not. Every number comes from the file.
"""

from __future__ import annotations

from typing import Any

from .readme import format_interval, fpr_meaning  # readme imports this module only inside a function

FID_BAR = 1.25
CLIP_BAR = 0.9
BROKEN_BELOW = 0.5
_TIERS = ("", "blind", "method_known", "trigger_known")
END = "<!-- results:end -->"


def tier_of(model_attack_label: str) -> str:
    """The declared threat tier of a model attack, from its label (``finetune(lr=0.001)`` -> ``finetune``'s tier);
    ``""`` for no attack, ``"?"`` for a name the registry does not know."""
    name = model_attack_label.split("(")[0].split(" ")[0]
    if name == "none":
        return ""
    from markbench.plugins import ThreatTier
    from markbench.registries import model_attacks

    if name not in model_attacks:
        return "?"
    cls = model_attacks.get(name)
    if getattr(cls, "identity", False):
        return ""
    return ThreatTier(getattr(cls, "tier", ThreatTier.BLIND)).value


def serves_prompts(model_attack_label: str) -> bool:
    """Whether a model attack is a suspect *service* that rewrites prompts and leaves the weights alone
    (``ModelAttack.serves_prompts``, e.g. ``prompt_sanitise``): it defeats black-box verification through prompts, it
    does not remove the mark from the model."""
    name = model_attack_label.split("(")[0].split(" ")[0]
    from markbench.registries import model_attacks

    return name in model_attacks and bool(getattr(model_attacks.get(name), "serves_prompts", False))


def _index(board: dict[str, Any]) -> dict[tuple[str, str, str], dict[str, dict[str, Any]]]:
    out: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = {}
    for c in board.get("cells", []):
        out.setdefault((c["defense_label"], c["model_attack_label"], c["image_attack_label"]), {})[c["metric"]] = c
    return out


def _fmt(c: dict[str, Any] | None, digits: int = 3) -> str:
    return format_interval(c, digits)


def detection_metric(board: dict[str, Any], rows: dict[str, dict[str, Any]]) -> str | None:
    """The TPR a defence's cells are read at: the board's ranking metric where the cells have it (an analytic
    threshold for bits), else the empirical one its negatives resolve (``tpr@fpr<=k/N``, score defences)."""
    if rows.get(board.get("metric", ""), {}).get("value") is not None:
        return board["metric"]
    empirical = sorted(m for m in rows if m.startswith("tpr@fpr<="))
    return empirical[0] if empirical else None


def _defenses(board: dict[str, Any], sel: dict[str, list[str]]) -> list[str]:
    return sel.get("defenses") or [d for d in board.get("grid", {}).get("defenses", [])
                                   if "[" not in d and d != "none"]


def _attacks(board: dict[str, Any], sel: dict[str, list[str]]) -> list[str]:
    order = {t: i for i, t in enumerate(_TIERS)}
    attacks = sel.get("model_attacks") or board.get("grid", {}).get("model_attacks", [])
    return sorted(attacks, key=lambda a: (order.get(tier_of(a), len(order)), attacks.index(a)))


def cost_text(cost: dict[str, Any] | None) -> str:
    """A model attack's recorded cost in a few words: steps, seconds, and what a trigger search found."""
    if not cost:
        return "-"
    parts = []
    if cost.get("steps") is not None:
        parts.append(f"{cost['steps']} steps")
    if cost.get("seconds") is not None:
        parts.append(f"{cost['seconds']:.0f} s")
    if cost.get("search_found") is not None:
        parts.append(f"found '{cost['search_found']}' ({'claimed' if cost.get('search_claimed') else 'not claimed'})")
    return ", ".join(parts) or "-"


def rows(board: dict[str, Any], sel: dict[str, list[str]] | None = None) -> list[dict[str, Any]]:
    """One record per (marked defence, model attack) of the file (image attack ``none``, or the selection's first):
    the numbers the views show."""
    sel = sel or {}
    idx = _index(board)
    attacks = {(r["defense_label"], r["model_attack_label"]): r for r in board.get("model_attacks", [])}
    ia = (sel.get("image_attacks") or ["none"])[0]
    out = []
    for d in _defenses(board, sel):
        base_q = idx.get((f"{d}[no_trigger]", "none", ia), {})
        fid0, clip0 = base_q.get("fid"), base_q.get("clip_score")
        for ma in _attacks(board, sel):
            cell = idx.get((d, ma, ia))
            if not cell:
                continue
            metric = detection_metric(board, cell)
            tpr = cell.get(metric) if metric else None
            evasion = None
            if tpr and tpr.get("value") is not None:
                evasion = {"value": 1 - tpr["value"], "n": tpr.get("n"),
                           "low": None if tpr.get("high") is None else 1 - tpr["high"],
                           "high": None if tpr.get("low") is None else 1 - tpr["low"]}
            q = idx.get((f"{d}[no_trigger]", ma, ia), {})
            fid, clip = q.get("fid"), q.get("clip_score")
            usable = None
            if ma != "none" and all(x and x.get("value") is not None for x in (fid, clip, fid0, clip0)):
                usable = fid["value"] <= FID_BAR * fid0["value"] and clip["value"] >= CLIP_BAR * clip0["value"]
            wake = next((cell[m] for m in sorted(cell) if m.startswith("random_trigger_wake@")
                         and metric and m.split("@")[1] == metric.split("@")[1]), None)
            recorded = attacks.get((d, ma), {})
            out.append({"defense": d, "model_attack": ma, "tier": recorded.get("tier") or tier_of(ma),
                        "cost": recorded.get("cost"), "metric": metric, "tpr": tpr,
                        "evasion": evasion, "bit_accuracy": cell.get("bit_accuracy"), "auc": cell.get("auc"),
                        "wake": wake, "fid": fid, "clip": clip, "fid0": fid0, "clip0": clip0, "usable": usable,
                        "n": (tpr or {}).get("n")})
    return out


def conditions_sentence(board: dict[str, Any], source: str) -> str:
    """What every number of a one-run block depends on: the results file, config, run, N, seeds, negatives."""
    src = board.get("source", {})
    seeds = board.get("grid", {}).get("seeds", [])
    return (f"Generated by `bench readme` from `{source}` (config `{src.get('config_path', '?')}`, run "
            f"{board.get('generated', '?')}, git {str(src.get('git_hash', '?'))[:12]}); do not edit by hand. "
            f"N = {board.get('n_images', '?')} images per cell, {len(seeds)} seed(s) (one embedding and one attack "
            f"run per cell: the intervals cover image sampling only); negatives: {board.get('negatives')}; 95% "
            f"intervals in brackets.")


def render_threats(board: dict[str, Any], source: str, sel: dict[str, list[str]], opts: str = "") -> str:
    """The threat-tier matrix block (markers included)."""

    recs = rows(board, sel)
    extra = " ".join([opts] + [f"{k}={','.join(v)}" for k, v in sel.items() if v]).strip()
    lines = [f"<!-- results:begin source={source}{' ' + extra if extra else ''} -->", "",
             conditions_sentence(board, source),
             f"Usable: the attacked model's trigger-free FID at most {FID_BAR:g} x and CLIP score at least "
             f"{CLIP_BAR:g} x the unattacked watermarked model's (FID and CLIP score against the clean base model's "
             f"images of the same prompts and seeds). Evades and usable: the evasion rate (1 - TPR) in a usable "
             f"cell, 0 in an unusable one. Random strings: the share of random strings of the trigger's token "
             f"length, put in its place, that wake the mark (`trigger_specificity`; `-`: not measured, or no prompt "
             f"trigger)."]
    for m in sorted({r["metric"] for r in recs if r["metric"]}):
        lines.append(f"`{m}`: TPR at {fpr_meaning(m)}.")
    lines += ["", "| defence | model attack | tier | N | TPR [95% CI] | evasion [95% CI] | bit accuracy / AUC | "
                  "random strings that wake it | FID, trigger-free | CLIP score, trigger-free | usable | "
                  "evades and usable | attack cost |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in recs:
        acc = _fmt(r["bit_accuracy"]) if r["bit_accuracy"] else (f"AUC {_fmt(r['auc'])}" if r["auc"] else "-")
        if r["model_attack"] == "none":
            usable, joint = "(reference)", "-"
        elif r["usable"] is None:
            usable, joint = "-", "-"
        else:
            usable = "yes" if r["usable"] else "no"
            joint = _fmt(r["evasion"]) if r["usable"] else "0 (not usable)"
        tpr = _fmt(r["tpr"]) + (f" (`{r['metric']}`)" if r["metric"] != board.get("metric") else "")
        lines.append(f"| {r['defense']} | {r['model_attack']} | {r['tier'] or '-'} | {r['n'] or '-'} | {tpr} | "
                     f"{_fmt(r['evasion'])} | {acc} | {_fmt(r['wake'])} | {_fmt(r['fid'], 1)} | "
                     f"{_fmt(r['clip'], 1)} | {usable} | {joint} | {cost_text(r['cost'])} |")
    if not recs:
        lines.append("| (no cell of the file matches this block's selection) |" + " |" * 12)
    lines += ["", END]
    return "\n".join(lines)


def verdicts(board: dict[str, Any], sel: dict[str, list[str]] | None = None) -> list[str]:
    """One sentence per defence: the attacks that break it (TPR below :data:`BROKEN_BELOW`), their tiers and the
    quality of the model they leave; the lowest tier that breaks it; the attacks it survives."""
    out = []
    by_def: dict[str, list[dict[str, Any]]] = {}
    for r in rows(board, sel):
        by_def.setdefault(r["defense"], []).append(r)
    order = {t: i for i, t in enumerate(_TIERS)}

    def short(r: dict[str, Any]) -> str:
        q = ""
        bits = r.get("bit_accuracy")
        if bits and bits.get("value") is not None:
            q += f", bit accuracy {bits['value']:.3f}"
        if r["fid"] is not None and r["clip"] is not None:
            q += f"; trigger-free FID {r['fid']['value']:.1f}, CLIP score {r['clip']['value']:.1f}"
        return f"`{r['model_attack']}` ({r['tier']}: TPR {r['tpr']['value']:.2f}{q})"

    for d, recs in by_def.items():
        clean = next((r for r in recs if r["model_attack"] == "none"), None)
        attacked = [r for r in recs if r["model_attack"] != "none" and r["tpr"] and r["tpr"].get("value") is not None]
        broken = [r for r in attacked if r["tpr"]["value"] < BROKEN_BELOW]
        service = [r for r in broken if serves_prompts(r["model_attack"])]  # the weights keep the mark
        broken = [r for r in broken if r not in service]
        usable = [r for r in broken if r["usable"]]
        unusable = [r for r in broken if r["usable"] is False]
        unknown = [r for r in broken if r["usable"] is None]
        kept = [r for r in attacked if r["tpr"]["value"] >= BROKEN_BELOW]
        metric = (clean or (attacked[0] if attacked else {})).get("metric") or "?"
        head = f"**{d}** (`{metric}`"
        if clean and clean["tpr"]:
            head += f", unattacked {clean['tpr']['value']:.2f}"
            if clean["fid"] is not None and clean["clip"] is not None:
                head += (f"; its trigger-free images: FID {clean['fid']['value']:.1f}, CLIP score "
                         f"{clean['clip']['value']:.1f}")
        parts = [head + ")"]
        if usable:
            parts.append("broken (TPR below " + f"{BROKEN_BELOW:g}) with the model still usable by "
                         + "; ".join(short(r) for r in usable) + ".")
        if unusable:
            parts.append(("Broken" if usable else "broken") + " only at the price of an unusable model by "
                         + "; ".join(short(r) for r in unusable) + ".")
        if unknown:
            parts.append("Broken, quality not measured, by " + "; ".join(short(r) for r in unknown) + ".")
        if kept:
            parts.append(("Not broken" if broken else "not broken by any attack of the grid; it keeps its mark under")
                         + (" by " if broken else " ") + "; ".join(short(r) for r in kept) + ".")
        if service:
            parts.append("Its verification through the suspect's prompts (the weights unchanged, so not a removal) is "
                         "defeated by " + "; ".join(short(r) for r in service) + ".")
        if usable:
            lowest = min((r["tier"] for r in usable), key=lambda t: order.get(t, len(order)))
            parts.append(f"The lowest tier that breaks it and leaves a usable model: `{lowest}`.")
        elif broken:
            parts.append("No attack of the grid breaks it and leaves a usable model.")
        if broken or service:
            parts.append(f"(TPR per image at the metric's FPR; a verifier that pools several images can still detect "
                         f"a mark whose bit accuracy stays above chance. Usable is a point comparison at N = "
                         f"{(clean or attacked[0])['n'] if (clean or attacked) else '?'} images.)")
        out.append(parts[0] + ": " + " ".join(parts[1:]))
    return out


def render_verdict(board: dict[str, Any], source: str, sel: dict[str, list[str]], opts: str = "") -> str:
    """The verdict block (markers included): :func:`verdicts` with the conditions they hold under."""
    extra = " ".join([opts] + [f"{k}={','.join(v)}" for k, v in sel.items() if v]).strip()
    lines = [f"<!-- results:begin source={source}{' ' + extra if extra else ''} -->", "",
             conditions_sentence(board, source),
             f"Usable: trigger-free FID at most {FID_BAR:g} x and CLIP score at least {CLIP_BAR:g} x the unattacked "
             f"watermarked model's, both against the clean base model's images.", ""]
    lines += [f"* {v}" for v in verdicts(board, sel)] or ["* (no cell of the file matches this block's selection)"]
    lines += ["", END]
    return "\n".join(lines)
