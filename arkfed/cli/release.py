"""``arkfed release``: a versioned foundation-model release of a run, with its lineage (:mod:`arkfed.evaluation.release`)."""

from __future__ import annotations

from pathlib import Path

import typer

HELP = (
    "Write a versioned foundation-model release of RUN: the teacher backbone as plain timm (as `arkfed export`), its "
    "projector, the heads the run folder holds (teacher's in heads/, student's in student-heads/: every site's for a "
    "local run), the training-time normalisation, and lineage.json (parent releases, each contributing site with its "
    "dataset fingerprint, visits, validation AUCs at release, teacher schedule steps), also in the model card. A content "
    "hash seals it: a release changed afterwards is refused on load. Continue it with `arkfed train --from RELEASE`."
)


def release(
    run: Path = typer.Argument(..., help="run folder", show_default=False),
    out: Path = typer.Option(..., help="release folder to write (new or empty)"),
) -> None:
    from rich.console import Console

    from arkfed.evaluation.release import write_release

    lineage = write_release(run, out)
    console = Console(highlight=False, soft_wrap=True)
    parents = ", ".join(p.get("id") or p.get("file") or p.get("path", "?") for p in lineage["parents"]) or "none"
    console.print(f"release {lineage['id']} (version {lineage['version']}, parent: {parents}) in {out}")
    for name, site in sorted(lineage["sites"].items()):
        auc = (site.get("val_auc") or {}).get("teacher")
        shown = f"{auc:.3f}" if isinstance(auc, (int, float)) else "n/a"
        console.print(f"  {name}: {site['visits']} visits ({site['visits_total']} in the lineage), teacher val AUC {shown}, "
                      f"head {'released' if site['head']['teacher'] else 'not released'}")
    console.print(f"content hash: {lineage['content_hash']}")


def register(app: typer.Typer) -> None:
    app.command(name="release", help=HELP)(release)
