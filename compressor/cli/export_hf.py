"""``compressor export-hf MODEL_DIR --out DIR``: a model directory as directories transformers loads (the
logic is :mod:`compressor.export.hf`), optionally uploaded to the Hugging Face Hub."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer


def export_hf(
    model_dir: Annotated[Path, typer.Argument(help="A model directory written by a stage (manifest.json, "
                                              "model.safetensors, tokenizer files).")],
    out: Annotated[Path, typer.Option("--out", help="New or empty directory to write.")],
    push_to_hub: Annotated[Optional[str], typer.Option("--push-to-hub", help="Also upload the export to this Hub "
                                                       "model repository (user/name); needs network and a token.")] = None,
    private: Annotated[bool, typer.Option("--private", help="With --push-to-hub: create the repository private.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print what was written as JSON.")] = False,
) -> None:
    """Write a model as transformers directories: the encoder for AutoModel/AutoTokenizer, each task head in its
    transformers class (token/sequence classification, question answering), a model card."""
    from compressor.export.hf import export_hf as write_export
    from compressor.export.hf import check_hub, check_out_dir
    from compressor.export.hf import push_to_hub as push

    check_out_dir(out)
    if push_to_hub:
        check_hub(push_to_hub)  # before the export: a push that cannot happen leaves nothing behind
    info = write_export(model_dir, out)
    url = push(out, push_to_hub, private) if push_to_hub else None
    if json_out:
        typer.echo(json.dumps({"out": str(out), "hub": url, **info}, indent=2))
        return
    typer.echo(f"wrote {out} (encoder: AutoModel; largest difference to compressor "
               f"{info['parity_max_abs_diff']['encoder']:.2g})")
    for name, t in info["tasks"].items():
        where = f"{t['auto_class']} ({t['class']})" if t["class"] else "head.safetensors + head.json (no transformers class)"
        typer.echo(f"  {name}: {out / t['folder']}: {where}")
    if url:
        typer.echo(f"pushed to {url}")
