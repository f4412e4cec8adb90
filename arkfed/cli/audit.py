"""``arkfed audit``: checks a site runs on what it is asked to release.

``audit privacy``: the membership-inference audit of :mod:`arkfed.evaluation.privacy_audit`, on
the site's own data; only summary numbers are printed and saved.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

audit_app = typer.Typer(help="Audits a site runs on a model before it is released.", no_args_is_help=True)


@audit_app.command("privacy")
def privacy(
    release: Path = typer.Argument(..., help="what `arkfed export` wrote, or a run folder", show_default=False),
    site: str = typer.Option(..., "--site", help="site name (sites/NAME.yaml) or YAML path: the site whose data is audited"),
    which: str = typer.Option("teacher", help="teacher | student (a run folder holds both; an export is one model)"),
    held_out: Optional[str] = typer.Option(None, help="the non-member split: val | test [test if the site has one, else val]"),
    max_images: Optional[int] = typer.Option(None, min=2, help="at most this many images of each split (a seeded draw)"),
    bootstrap: int = typer.Option(1000, min=0, help="bootstrap resamples for the attack AUC's 95% CI (0 = none)"),
    seed: int = typer.Option(0, min=0),
    batch_size: int = typer.Option(64, min=1),
    device: str = typer.Option("cpu", help="cpu | cuda | auto"),
    plugins_dir: Optional[List[Path]] = typer.Option(None, "--plugins-dir", help="extra dataset plugin folder(s)"),
    out: Optional[Path] = typer.Option(None, help="folder for results.json (summary numbers only)"),
) -> None:
    """Membership inference on the site's own data: can the model's loss tell its training images from
    held-out ones? Loss-threshold attack AUC (0.5 = chance) with a bootstrap 95% CI, and the TPR at 1% FPR."""
    from rich.console import Console

    from arkfed.evaluation.privacy_audit import run_audit

    r = run_audit(release, site, which, held_out, device, batch_size, max_images, bootstrap, seed, plugins_dir or (), out)
    low, high = r["attack_auc_ci95"]
    Console(highlight=False).print(
        f"site {r['site']}: {r['attack']}, {r['members']} training vs {r['non_members']} {r['held_out']} images\n"
        f"attack AUC {r['attack_auc']:.3f} (95% CI {low:.3f}-{high:.3f}; 0.5 = chance), TPR at 1% FPR {r['tpr_at_0.01_fpr']:.3f}"
        + (f"\nsaved {Path(out) / 'results.json'}" if out else ""))


def register(app: typer.Typer) -> None:
    app.add_typer(audit_app, name="audit")
